"""The evaluation gallery: each image's ground truth and predictions side by side, misses (FN) and
false detections (FP) marked, and ``gallery.csv`` listing the images worst count first.

Matching is the evaluator's own (``match_image`` on the evaluator's ground-truth masks), so the
FP and FN drawn on an image add up to the FP and FN of the metrics table.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukodet.data.catalog import class_colors
from leukodet.data.imageio import read_image
from leukodet.evaluation.matching import match_image
from leukodet.evaluation.metrics import Evaluator, to_rle_predictions
from leukodet.io import atomic_write_text
from leukodet.viz import draw_annotations, draw_predictions, write_rgb

logger = logging.getLogger(__name__)

GALLERY_CSV = "gallery.csv"
GALLERY_COLUMNS = ["image", "true_count", "predicted_count", "count_error", "n_fp", "n_fn", "thumbnail", "full",
                   "min_confidence", "iou_threshold", "iou_type"]
THUMBNAIL_WIDTH = 480  # both panels together
FULL_PANEL_WIDTH = 1600  # a 4100 px field is shrunk for the page, which never needs more
MARK_COLOR = (255, 255, 255)  # class colours are saturated hues, so white never reads as a class
MARK_EDGE = (0, 0, 0)


@dataclass
class ImageErrors:
    """One image's matching outcome at the operating point: which predictions are FP (unmatched, or
    matched to a cell of another class) and which true cells are FN (missed, or taken by another
    class), instances and count-only points apart."""

    fp: np.ndarray  # prediction indices
    fn_instances: np.ndarray  # ground-truth instance indices
    fn_points: np.ndarray  # count-only point indices

    @property
    def n_fp(self) -> int:
        return len(self.fp)

    @property
    def n_fn(self) -> int:
        return len(self.fn_instances) + len(self.fn_points)


def image_errors(matched: np.ndarray, matched_point: np.ndarray, pred_labels: np.ndarray, gt_labels: np.ndarray,
                 point_labels: np.ndarray) -> ImageErrors:
    """FP and FN of one image from ``match_image``'s indices, by the evaluator's rule (a match with
    another class is both an FP and an FN)."""
    gt_hit = matched >= 0
    point_hit = matched_point >= 0
    same = np.zeros(len(pred_labels), dtype=bool)
    same[gt_hit] = pred_labels[gt_hit] == gt_labels[matched[gt_hit]]
    same[point_hit] = pred_labels[point_hit] == point_labels[matched_point[point_hit]]
    found_instances = set(matched[gt_hit & same].tolist())
    found_points = set(matched_point[point_hit & same].tolist())
    return ImageErrors(np.nonzero(~same)[0],
                       np.array([g for g in range(len(gt_labels)) if g not in found_instances], dtype=np.int64),
                       np.array([p for p in range(len(point_labels)) if p not in found_points], dtype=np.int64))


def mark_boxes(image: np.ndarray, boxes: np.ndarray, tag: str) -> None:
    """Draw a white box with a black edge and ``tag`` around each XYXY box, in place."""
    thickness = max(1, round(min(image.shape[:2]) / 300))
    scale = max(0.35, min(image.shape[:2]) / 900)
    pad = 2 * thickness
    for x0, y0, x1, y1 in np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)).astype(int):
        corners = (x0 - pad, y0 - pad), (x1 + pad, y1 + pad)
        cv2.rectangle(image, *corners, MARK_EDGE, 3 * thickness)
        cv2.rectangle(image, *corners, MARK_COLOR, thickness)
        origin = (max(0, x0 - pad), min(image.shape[0] - 3, y1 + pad + int(14 * scale) + 2))
        cv2.putText(image, tag, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, MARK_EDGE, 3 * thickness, cv2.LINE_AA)
        cv2.putText(image, tag, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, MARK_COLOR, thickness, cv2.LINE_AA)


def point_boxes(points_xy: np.ndarray, radius: float) -> np.ndarray:
    points_xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    return np.concatenate([points_xy - radius, points_xy + radius], axis=1)


def title_strip(width: int, text: str) -> np.ndarray:
    scale = max(0.4, width / 1400)
    height = int(24 * scale) + 10
    strip = np.full((height, width, 3), 32, np.uint8)
    cv2.putText(strip, text, (6, height - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (240, 240, 240), 1, cv2.LINE_AA)
    return strip


def side_by_side(image: np.ndarray, record: dict, truth, prediction, errors: ImageErrors,
                 class_names: Sequence[str], colors) -> np.ndarray:
    """Ground truth (FN marked) | predictions (FP marked), each under a title strip."""
    truth_panel = draw_annotations(image, record, class_names, colors)
    mark_boxes(truth_panel, truth.boxes[errors.fn_instances], "FN")
    radius = max(4.0, min(image.shape[:2]) / 60)
    mark_boxes(truth_panel, point_boxes(truth.points_xy[errors.fn_points], radius), "FN")
    predicted_panel = draw_predictions(image, prediction, class_names, colors)
    mark_boxes(predicted_panel, prediction.boxes[errors.fp], "FP")
    width = image.shape[1]
    cells = len(truth.labels) + len(truth.point_labels)
    left = np.vstack([title_strip(width, f"ground truth: {cells} cells, {errors.n_fn} FN"), truth_panel])
    right = np.vstack([title_strip(width, f"predictions: {len(prediction)}, {errors.n_fp} FP"), predicted_panel])
    gap = np.full((left.shape[0], max(4, width // 100), 3), 255, np.uint8)
    return np.hstack([left, gap, right])


def resized_to_width(image: np.ndarray, width: int) -> np.ndarray:
    if image.shape[1] <= width:
        return image
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def display_names(records: Sequence[dict]) -> list[str]:
    """Each image's path relative to the folder all the split's images share (its name when flat)."""
    paths = [os.path.abspath(r["file_name"]) for r in records]
    if not paths:
        return []
    root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def worst_first(rows: list[dict]) -> list[dict]:
    """Largest count error first (either sign), then most FP + FN, then by name."""
    return sorted(rows, key=lambda r: (-abs(r["count_error"]), -(r["n_fp"] + r["n_fn"]), r["image"]))


def write_gallery(records: Sequence[dict], predictions: Sequence, class_names: Sequence[str], min_confidence: float,
                  iou_threshold: float, out_dir: str | os.PathLike, max_thumbnails: int | None = 500) -> Path:
    """Draw the split's images, ground truth beside predictions (scores > ``min_confidence``), FP
    and FN marked, into ``out_dir/full/`` and ``out_dir/thumbs/``, and write ``out_dir/gallery.csv``
    (worst count error first). ``records`` are the split's dataset dicts, ``predictions`` one per
    record in the same order (as the evaluator takes them). Only the ``max_thumbnails`` worst images
    are drawn (None: all); every image is listed. Returns the CSV's path."""
    out_dir = Path(out_dir)
    evaluator = Evaluator(records, class_names, iou_threshold=iou_threshold)
    kept = [p.select(np.nonzero(p.scores > min_confidence)[0]) for p in to_rle_predictions(predictions, records)]
    iou_type = "segm" if evaluator.has_masks and all(p.rles is not None for p in kept) else "bbox"
    names = display_names(records)
    outcomes = []
    for i, (truth, prediction) in enumerate(zip(evaluator.truths, kept)):
        segm = iou_type == "segm"
        matched = match_image(truth.boxes, truth.labels, prediction.boxes, prediction.scores, prediction.labels,
                              len(class_names), gt_masks=evaluator.gt_rles[i] if segm else None,
                              pred_masks=prediction.rles if segm else None, iou_type=iou_type,
                              iou_threshold=iou_threshold, points_xy=truth.points_xy, point_labels=truth.point_labels)
        errors = image_errors(matched.matched, matched.matched_point, prediction.labels, truth.labels,
                              truth.point_labels)
        true_count = len(truth.labels) + len(truth.point_labels)
        outcomes.append({"index": i, "errors": errors, "image": names[i], "true_count": true_count,
                         "predicted_count": len(prediction), "count_error": len(prediction) - true_count,
                         "n_fp": errors.n_fp, "n_fn": errors.n_fn})
    ordered = worst_first(outcomes)
    colors = class_colors(len(class_names))
    drawn = ordered if max_thumbnails is None else ordered[:max_thumbnails]
    for outcome in drawn:
        i = outcome["index"]
        picture = side_by_side(read_image(records[i]["file_name"]), records[i], evaluator.truths[i], kept[i],
                               outcome["errors"], class_names, colors)
        name = f"{i:05d}_{Path(records[i]['file_name']).stem}.jpg"
        write_rgb(out_dir / "full" / name, resized_to_width(picture, 2 * FULL_PANEL_WIDTH))
        write_rgb(out_dir / "thumbs" / name, resized_to_width(picture, THUMBNAIL_WIDTH), jpeg_quality=80)
        outcome.update(thumbnail=f"thumbs/{name}", full=f"full/{name}")
    if len(drawn) < len(ordered):
        logger.info("gallery: drew the %d worst of %d images (max_thumbnails)", len(drawn), len(ordered))
    path = out_dir / GALLERY_CSV
    atomic_write_text(path, gallery_csv(ordered, min_confidence, iou_threshold, iou_type))
    logger.info("gallery of %d images written to %s", len(ordered), path)
    return path


def gallery_csv(rows: Sequence[dict], min_confidence: float, iou_threshold: float, iou_type: str) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, GALLERY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"thumbnail": "", "full": "", **row, "min_confidence": min_confidence,
                         "iou_threshold": iou_threshold, "iou_type": iou_type})
    return text.getvalue()
