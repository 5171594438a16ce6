"""Drawing: annotations or predictions over an image, with class colours and a count legend."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from leukodet.io import atomic_write_bytes


def with_legend(image: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """``image`` with a dark strip below it holding the coloured legend entries side by side, so
    the legend never hides a cell."""
    scale = max(0.4, image.shape[1] / 1400)
    line = int(24 * scale) + 8
    strip = np.zeros((line + 4, image.shape[1], 3), np.uint8)
    x = 6
    for text, color in entries:
        cv2.putText(strip, text, (x, line - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
        x += cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] + 18
    return np.vstack([image, strip])


def draw_annotations(image: np.ndarray, dataset_dict: dict, class_names: Sequence[str],
                     colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """An RGB copy of ``image`` with each annotation's outline (or box) and point in its class
    colour, and a legend strip below counting instances per class."""
    out = image.copy()
    thickness = max(1, round(min(image.shape[:2]) / 300))
    counts: Counter = Counter()
    for ann in dataset_dict["annotations"]:
        color = colors[ann["category_id"]]
        counts[ann["category_id"]] += 1
        polygons = ann.get("segmentation") or []
        if polygons:
            pts = [np.round(np.asarray(p).reshape(-1, 2)).astype(np.int32) for p in polygons]
            cv2.polylines(out, pts, True, color, thickness)
        else:
            x, y, w, h = ann["bbox"]
            cv2.rectangle(out, (round(x), round(y)), (round(x + w), round(y + h)), color, thickness)
    for point in dataset_dict.get("points", []):
        counts[point["category_id"]] += 1
        cv2.circle(out, tuple(round(v) for v in point["xy"]), 2 * thickness + 1, colors[point["category_id"]], -1)
    return with_legend(out, [(f"{class_names[c]}: {counts[c]}", colors[c]) for c in range(len(class_names))])


def write_rgb(path: str | Path, image: np.ndarray, jpeg_quality: int = 90) -> Path:
    """Write an RGB image atomically (format from the suffix)."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise ValueError(f"{path}: cannot encode as {path.suffix}")
    return atomic_write_bytes(path, encoded.tobytes())


def render_split(dataset_dicts: Sequence[dict], metadata: dict, out_dir: str | Path, limit: int | None = None) -> list[Path]:
    """Draw a split's annotations over its images into ``out_dir`` (one JPEG per image), to check
    a conversion by eye before training on it."""
    from tqdm import tqdm

    from leukodet.data.imageio import read_image

    out_dir = Path(out_dir)
    written = []
    for record in tqdm(list(dataset_dicts)[:limit], desc=f"drawing {metadata.get('name', 'split')}", unit="img"):
        drawn = draw_annotations(read_image(record["file_name"]), record, metadata["thing_classes"],
                                 metadata["thing_colors"])
        written.append(write_rgb(out_dir / f"{record['image_id']:05d}_{Path(record['file_name']).stem}.jpg", drawn))
    return written


def draw_predictions(image: np.ndarray, prediction, class_names: Sequence[str],
                     colors: Sequence[tuple[int, int, int]], scale: float = 1.0,
                     origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``image`` with each predicted mask (tinted, outlined) or box in its class colour, class and
    score beside it, and a legend strip of the counts per class. ``scale``: the image's size over
    the file's (a downscaled preview of a big field); ``origin``: the file pixel at the image's top
    left (a full-resolution crop). Each mask is read back by its own box clipped to the view, so
    drawing costs per cell, not per image."""
    from leukodet.structures import crop_rle, mask_box

    out = image.copy()
    ox, oy = origin
    view_x1, view_y1 = ox + math.ceil(image.shape[1] / scale), oy + math.ceil(image.shape[0] / scale)
    thickness = max(1, round(min(image.shape[:2]) / 300))
    text_scale = max(0.35, min(image.shape[:2]) / 1200)
    counts: Counter = Counter()
    for k in range(len(prediction)):
        label = int(prediction.labels[k])
        color = colors[label]
        counts[label] += 1
        x0, y0, x1, y1 = (round((float(v) - o) * scale) for v, o in zip(prediction.boxes[k], (ox, oy, ox, oy)))
        if prediction.rles is not None:
            box = mask_box(prediction.rles[k])
            box = (max(box[0], ox, 0), max(box[1], oy, 0), min(box[2], view_x1), min(box[3], view_y1))
            mask = crop_rle(prediction.rles[k], box).astype(np.uint8)
            mx, my = round((box[0] - ox) * scale), round((box[1] - oy) * scale)
            if scale != 1.0 and mask.size:
                size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
            mask = mask[:out.shape[0] - my, :out.shape[1] - mx]
            if mask.size:  # empty where the cell lies outside the view
                region = out[my:my + mask.shape[0], mx:mx + mask.shape[1]]
                region[mask > 0] = (0.6 * region[mask > 0] + 0.4 * np.array(color)).astype(np.uint8)
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(mx, my))
                cv2.drawContours(out, contours, -1, color, thickness)
        else:
            cv2.rectangle(out, (x0, y0), (x1, y1), color, thickness)
        cv2.putText(out, f"{class_names[label]} {float(prediction.scores[k]):.2f}", (x0, max(10, y0 - 3)),
                    cv2.FONT_HERSHEY_SIMPLEX, text_scale, color, 1, cv2.LINE_AA)
    return with_legend(out, [(f"{class_names[c]}: {counts[c]}", colors[c]) for c in range(len(class_names))])


def busiest_windows(boxes: np.ndarray, width: int, height: int, side: int, count: int) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` windows (x0, y0, x1, y1) of a ``side``-px grid over a ``width`` x ``height``
    image, the last row and column moved inwards to stay whole: those holding the most centres of
    these XYXY boxes, most first; windows without a cell are left out. Where the full-resolution
    crops of a big image's overlay look."""
    if count <= 0 or len(boxes) == 0:
        return []
    if side <= 0:
        raise ValueError(f"a crop side of {side} px: give infer.overlay_crop_side > 0")

    def starts(length: int) -> list[int]:
        out = list(range(0, max(length - side, 0) + 1, side))
        return out + [length - side] if out[-1] + side < length else out

    windows = np.array([(x, y, min(x + side, width), min(y + side, height)) for y in starts(height) for x in starts(width)])
    centres = (np.asarray(boxes[:, :2], np.float64) + np.asarray(boxes[:, 2:], np.float64)) / 2
    inside = ((centres[None, :, 0] >= windows[:, None, 0]) & (centres[None, :, 0] < windows[:, None, 2])
              & (centres[None, :, 1] >= windows[:, None, 1]) & (centres[None, :, 1] < windows[:, None, 3]))
    cells = inside.sum(axis=1)
    order = [i for i in np.argsort(-cells, kind="stable")[:count] if cells[i] > 0]
    return [tuple(int(v) for v in windows[i]) for i in order]
