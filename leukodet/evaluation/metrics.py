"""The evaluator: every figure of docs/metrics.md at one operating point.

P/R/F1/accuracy from one-to-one matching (class-aware and class-agnostic), per-class count MAE and
bias, the share class's share error (e.g. lymphoblasts), RBC count accuracy, confusion matrix, and COCO AP50 / AP50:95 for
boxes and masks. Where the definitions leave a case open, the choice is stated where it is made:
count-only points (``ImageTruth``), the "all" and "any_cell" count rows (``count_columns``),
images without cells (``share``, ``count_accuracy``), touching cells (``touching_instances``,
``touching_recall``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from leukodet.evaluation.coco_eval import coco_ap, coco_ground_truth
from leukodet.evaluation.matching import Tally, match_image
from leukodet.structures import ImagePredictions, encode_masks
from leukodet.registry import METRICS

TABLE_COLUMNS = ["tp", "fp", "fn", "precision", "recall", "f1", "accuracy", "count_mae", "count_bias",
                 "ap50_bbox", "ap50_segm", "ap_bbox", "ap_segm"]


def ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def mean(values) -> float:
    """Mean, NaN (without numpy's warning) when there is nothing to average."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision, recall, F1, accuracy = TP/(TP+FP+FN); NaN where a ratio is 0/0, except F1 = 0
    when there are errors but no TP."""
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * precision * recall, precision + recall) if tp else (0.0 if fp + fn else float("nan"))
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": precision, "recall": recall,
            "f1": f1, "accuracy": ratio(tp, tp + fp + fn)}


def to_numpy(values, dtype) -> np.ndarray:
    """numpy or torch (any device) -> a numpy array of ``dtype``."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def as_predictions(pred, height: int, width: int, image: str = "") -> ImagePredictions:
    """ImagePredictions as they are, or any object with ``boxes`` (K, 4) XYXY, ``scores``,
    ``labels`` (0-based) and ``masks`` (K, H, W) or None, numpy or torch, in the original image's
    pixels (e.g. ``leukodet.models.base.Detections``); masks are encoded as RLE."""
    if isinstance(pred, ImagePredictions):
        return pred
    rles = None
    if getattr(pred, "masks", None) is not None:
        masks = to_numpy(pred.masks, np.uint8)
        if len(masks) and masks.shape[1:] != (height, width):
            raise ValueError(f"{image}: prediction masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
                             f"{height}x{width}; give predictions in the original image's pixels")
        rles = encode_masks(masks)
    return ImagePredictions(to_numpy(pred.boxes, np.float32).reshape(-1, 4), to_numpy(pred.scores, np.float32),
                            to_numpy(pred.labels, np.int64), rles)


def to_rle_predictions(predictions: Sequence, dataset_dicts: Sequence[dict]) -> list[ImagePredictions]:
    """One ``ImagePredictions`` (masks as RLE) per dataset dict, from ``as_predictions``-ready
    objects in the same order: the compact form the evaluator scores and the sweep cache stores
    (``sweep.save_raw`` / ``load_raw``)."""
    if len(predictions) != len(dataset_dicts):
        raise ValueError(f"{len(dataset_dicts)} images but {len(predictions)} predictions")
    return [as_predictions(p, r["height"], r["width"], r["file_name"]) for p, r in zip(predictions, dataset_dicts)]


@dataclass
class ImageTruth:
    """One image's ground truth: instances (XYXY boxes, labels) and count-only points.

    A point is a cell that was counted but not outlined: it counts as ground truth of its class
    for counts and for TP/FP/FN (a prediction containing it matches it, see ``match_points``),
    and COCO AP leaves out images with points, since COCOeval would call every prediction on a
    point a false positive.
    """

    boxes: np.ndarray
    labels: np.ndarray
    points_xy: np.ndarray
    point_labels: np.ndarray

    @classmethod
    def of(cls, record: dict) -> "ImageTruth":
        anns, points = record["annotations"], record.get("points", [])
        return cls(np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                            dtype=np.float64).reshape(-1, 4),
                   np.array([a["category_id"] for a in anns], dtype=np.int64),
                   np.array([p["xy"] for p in points], dtype=np.float64).reshape(-1, 2),
                   np.array([p["category_id"] for p in points], dtype=np.int64))

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(np.concatenate([self.labels, self.point_labels]), minlength=num_classes)


@dataclass
class EvaluationResult:
    table: pd.DataFrame  # rows: classes, "all", "any_cell" (class-agnostic); columns TABLE_COLUMNS
    per_image: pd.DataFrame  # image, true_<class>, pred_<class> (+ the share class's true/pred share)
    confusion: np.ndarray  # (C+1, C+1), rows truth, columns prediction, last = background
    class_names: list[str]
    iou_type: str
    extras: dict  # share errors, RBC count accuracy, and how many images each skipped
    pr_curves: dict  # {"bbox"|"segm": (C, 101) precision at COCO's recall points, IoU 0.5; -1 = none}

    def summary(self) -> dict[str, float]:
        """Headline numbers, flat (what the training loop logs and sweeps rank by)."""
        row, agnostic = self.table.loc["all"], self.table.loc["any_cell"]
        out = {k: float(row[k]) for k in ("precision", "recall", "f1", "accuracy", "count_mae", "count_bias")}
        out.update({f"detection_{k}": float(agnostic[k]) for k in ("precision", "recall", "f1", "accuracy")})
        for kind in self.pr_curves:  # the IoU types AP was computed for
            out[f"ap50_{kind}"] = float(row[f"ap50_{kind}"])
            out[f"ap_{kind}"] = float(row[f"ap_{kind}"])
        for name in self.class_names:
            out[f"count_mae_{name}"] = float(self.table.loc[name, "count_mae"])
            out[f"count_bias_{name}"] = float(self.table.loc[name, "count_bias"])
        out.update(self.extras)
        return out


class Evaluator:
    """Scores predictions on one split. The ground truth (COCO index, rasterised masks) is prepared
    once, so a threshold sweep pays for it once; call it with each operating point's predictions."""

    def __init__(self, dataset_dicts: Sequence[dict], class_names: Sequence[str], iou_threshold: float = 0.5,
                 share_class: str | None = None):
        self.records = list(dataset_dicts)
        self.class_names = list(class_names)
        self.share_class = resolve_share_class(share_class, self.class_names)
        self.iou_threshold = iou_threshold
        self.truths = [ImageTruth.of(r) for r in self.records]
        self.coco = coco_ground_truth(self.records, self.class_names)
        self.has_masks = all(not r.get("box_only") and all(a.get("segmentation") for a in r["annotations"])
                             for r in self.records)
        self.ap_image_ids = [i for i, t in enumerate(self.truths, start=1) if len(t.points_xy) == 0]

    @cached_property
    def gt_rles(self) -> list[list]:
        """Each image's instance masks, rasterised by COCO itself, so matching and AP see the same masks."""
        return [[self.coco.annToRLE(a) for a in self.coco.imgToAnns[i]] for i in range(1, len(self.records) + 1)]

    @cached_property
    def touching(self) -> list[np.ndarray]:
        """Per image, which ground-truth instances touch or overlap another (``touching_instances``;
        masks when the split has them, else boxes)."""
        return [touching_instances(t.boxes, self.gt_rles[i] if self.has_masks else None)
                for i, t in enumerate(self.truths)]

    def __call__(self, predictions: Sequence, iou_type: str | None = None, min_confidence: float = 0.0
                 ) -> EvaluationResult:
        """Score ``predictions`` (one per dataset dict, original pixels; see ``as_predictions``).
        Matching, P/R/F1 and counts keep scores > ``min_confidence`` (the detector's own rule); AP,
        being threshold-free, is scored on every prediction given, so pass the detector's output
        down to a low floor (``RAW_SCORE_FLOOR``, detectron2's and COCO's practice): AP from
        operating-point detections alone cuts the precision-recall curve off and understates it.
        ``iou_type`` defaults to ``segm`` when both sides have masks, else ``bbox``; AP is computed
        for bbox, and for segm when it is the IoU type."""
        scored = to_rle_predictions(predictions, self.records)
        predictions = [p.select(np.nonzero(p.scores > min_confidence)[0]) for p in scored]
        masks_on_both = self.has_masks and all(p.rles is not None for p in predictions)
        iou_type = iou_type or ("segm" if masks_on_both else "bbox")
        if iou_type == "segm" and not masks_on_both:
            raise ValueError("iou_type=segm needs masks on both sides; this data or model is box-only")
        num_classes = len(self.class_names)

        total = Tally.zeros(num_classes)
        found_any, found_same = [], []  # per image, per ground-truth instance: matched by any / same class
        for i, (truth, pred) in enumerate(zip(self.truths, predictions)):
            segm = iou_type == "segm"
            matched = match_image(
                truth.boxes, truth.labels, pred.boxes, pred.scores, pred.labels, num_classes,
                gt_masks=self.gt_rles[i] if segm else None, pred_masks=pred.rles if segm else None,
                iou_type=iou_type, iou_threshold=self.iou_threshold,
                points_xy=truth.points_xy, point_labels=truth.point_labels)
            total = total + matched.tally
            hit = matched.matched >= 0
            found_any.append(np.isin(np.arange(len(truth.labels)), matched.matched[hit]))
            same = hit.copy()
            same[hit] = pred.labels[hit] == truth.labels[matched.matched[hit]]
            found_same.append(np.isin(np.arange(len(truth.labels)), matched.matched[same]))
        true = np.array([t.counts(num_classes) for t in self.truths], dtype=np.int64).reshape(-1, num_classes)
        found = np.array([np.bincount(p.labels, minlength=num_classes) for p in predictions],
                         dtype=np.int64).reshape(-1, num_classes)

        rows = {name: prf(total.tp[i], total.fp[i], total.fn[i]) for i, name in enumerate(self.class_names)}
        rows["all"] = prf(total.tp.sum(), total.fp.sum(), total.fn.sum())
        rows["any_cell"] = prf(total.any_tp, total.any_fp, total.any_fn)
        for name, columns in count_columns(found - true, self.class_names).items():
            rows[name].update(columns)

        pr_curves = {}
        max_dets = max((len(p) for p in scored), default=0)
        for kind in ("bbox", "segm") if iou_type == "segm" else ("bbox",):
            ap = coco_ap(self.coco, scored, kind, num_classes, max_dets, self.ap_image_ids)
            pr_curves[kind] = ap["pr50"]
            for i, name in enumerate(self.class_names):
                rows[name].update({f"ap50_{kind}": ap["ap50"][i], f"ap_{kind}": ap["ap"][i]})
            rows["all"].update({f"ap50_{kind}": nanmean(ap["ap50"]), f"ap_{kind}": nanmean(ap["ap"])})

        per_image = per_image_counts(self.records, true, found, self.class_names)
        extras = {}
        if self.share_class is not None:
            index = self.class_names.index(self.share_class)
            per_image[f"true_{self.share_class}_share"] = share(true, index)
            per_image[f"pred_{self.share_class}_share"] = share(found, index)
            extras.update(share_errors(share(found, index) - share(true, index)))
        extras.update(count_accuracy(true.sum(axis=1), found.sum(axis=1)))
        extras.update(touching_recall(self.touching, found_any, found_same))
        table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=TABLE_COLUMNS)
        table.index.name = "class"
        return EvaluationResult(table, per_image, total.confusion, self.class_names, iou_type, extras, pr_curves)


def evaluate(dataset_dicts: Sequence[dict], predictions: Sequence, class_names: Sequence[str],
             iou_type: str | None = None, min_confidence: float = 0.0, iou_threshold: float = 0.5,
             share_class: str | None = None) -> EvaluationResult:
    """Score one operating point: ``Evaluator(dataset_dicts, class_names, iou_threshold,
    share_class)(predictions, iou_type, min_confidence)``."""
    return Evaluator(dataset_dicts, class_names, iou_threshold, share_class)(predictions, iou_type, min_confidence)


def evaluate_by_source(dataset_dicts: Sequence[dict], predictions: Sequence, class_names: Sequence[str],
                       **kwargs) -> pd.DataFrame:
    """``evaluate`` (same keyword arguments) on each source's images (``source``: the annotation
    file, i.e. the acquisition, an image came from), a row each: source, images and the summary
    figures. A pooled figure hides a hard acquisition when an easy one holds most images."""
    rows = []
    for source in sorted({d.get("source", "") for d in dataset_dicts}):
        kept = [i for i, d in enumerate(dataset_dicts) if d.get("source", "") == source]
        figures = evaluate([dataset_dicts[i] for i in kept], [predictions[i] for i in kept], class_names,
                           **kwargs).summary()
        rows.append({"source": source, "images": len(kept), **figures})
    return pd.DataFrame(rows)


def resolve_share_class(share_class: str | None, class_names: Sequence[str]) -> str | None:
    """The class whose share of all cells is reported per image (``eval.share_class``; e.g. the
    lymphoblasts among white cells): by default the first class, none for a one-class dataset."""
    if share_class is None:
        return class_names[0] if len(class_names) > 1 else None
    if share_class not in class_names:
        raise ValueError(f"eval.share_class={share_class!r} is not a class of this data: {', '.join(class_names)}")
    return share_class


def nanmean(values: np.ndarray) -> float:
    """Mean over the classes that have a value (COCO's mAP), NaN when none has."""
    values = np.asarray(values, dtype=np.float64)
    return mean(values[~np.isnan(values)])


def count_columns(error: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``count_mae`` and ``count_bias`` (mean signed error) per table row, from the (images, C)
    predicted - true counts. Per class: mean over images of |error|. "all" (class-aware): mean over
    images of the sum over classes of |error|, i.e. cells miscounted per image, a cell counted in the
    wrong class counting twice. "any_cell": mean over images of |total error|, the cell count
    whatever the class."""
    rows = {name: {"count_mae": mean(np.abs(error[:, i])), "count_bias": mean(error[:, i])}
            for i, name in enumerate(class_names)}
    per_image_total = error.sum(axis=1)
    rows["all"] = {"count_mae": mean(np.abs(error).sum(axis=1)), "count_bias": mean(per_image_total)}
    rows["any_cell"] = {"count_mae": mean(np.abs(per_image_total)), "count_bias": mean(per_image_total)}
    return rows


def per_image_counts(records: Sequence[dict], true: np.ndarray, found: np.ndarray,
                     class_names: Sequence[str]) -> pd.DataFrame:
    columns = {"image": [r["file_name"] for r in records]}
    columns.update({f"true_{name}": true[:, i] for i, name in enumerate(class_names)})
    columns.update({f"pred_{name}": found[:, i] for i, name in enumerate(class_names)})
    return pd.DataFrame(columns)


def share(counts: np.ndarray, index: int) -> np.ndarray:
    """Per image, class ``index``'s share of all cells of the split's classes; NaN for an image
    with no cells (no share to compare)."""
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts[:, index] / total, np.nan)


def share_errors(error: np.ndarray) -> dict[str, float]:
    """Mean absolute and signed error of the share class's share over the images where both the
    true and the predicted share exist; the others are skipped, and counted."""
    defined = error[~np.isnan(error)]
    return {"share_mae": mean(np.abs(defined)), "share_bias": mean(defined),
            "share_images_skipped": int(len(error) - len(defined))}


def count_accuracy(true_total: np.ndarray, found_total: np.ndarray) -> dict[str, float]:
    """The RBC paper's "segmentation accuracy": mean over images of min(segmented, true) / true,
    all classes together. Images with no true cell have no ratio: skipped, and counted."""
    scored = true_total > 0
    return {"count_accuracy": mean(np.minimum(found_total[scored], true_total[scored]) / true_total[scored]),
            "count_accuracy_images_skipped": int((~scored).sum())}


def touching_instances(boxes: np.ndarray, rles: Sequence[dict] | None = None) -> np.ndarray:
    """Which of one image's ground-truth cells touch or overlap another: with masks, the cell's mask
    dilated by 1 px (3x3, so diagonal neighbours touch) meets another cell's mask; with boxes only
    (``rles`` None), the XYXY boxes overlap or share an edge, which also flags round cells whose
    box corners meet without the cells touching."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n < 2:
        return np.zeros(n, dtype=bool)
    if rles is None:
        x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
        near = ((x0[:, None] <= x1[None]) & (x0[None] <= x1[:, None])
                & (y0[:, None] <= y1[None]) & (y0[None] <= y1[:, None]))
        np.fill_diagonal(near, False)
        return near.any(axis=1)
    height, width = rles[0]["size"]
    cover = np.zeros((height, width), np.uint16)  # how many cells cover each pixel
    for rle in rles:  # one mask at a time: memory stays at one image, whatever the cell count
        cover += mask_utils.decode(rle)
    kernel = np.ones((3, 3), np.uint8)
    touching = np.zeros(n, dtype=bool)
    for k, rle in enumerate(rles):
        x, y, w, h = mask_utils.toBbox(rle)
        if w == 0 or h == 0:
            continue
        window = (slice(max(int(y) - 1, 0), min(int(np.ceil(y + h)) + 1, height)),
                  slice(max(int(x) - 1, 0), min(int(np.ceil(x + w)) + 1, width)))
        mask = mask_utils.decode(rle)[window]
        others = cover[window] - mask > 0
        touching[k] = bool((cv2.dilate(mask, kernel) & others).any())
    return touching


def touching_recall(touching: Sequence[np.ndarray], found_any: Sequence[np.ndarray],
                    found_same: Sequence[np.ndarray]) -> dict[str, float]:
    """Recall over the split's ground-truth cells that touch or overlap another vs the isolated
    ones: ``detection_recall_*`` counts a cell found by any prediction at IoU >= the threshold,
    ``recall_*`` only by one of its class. Count-only points have no shape and are in neither."""
    touching = np.concatenate([np.asarray(t, dtype=bool) for t in touching]) if len(touching) else np.zeros(0, bool)
    found_any = np.concatenate(found_any) if len(found_any) else np.zeros(0, bool)
    found_same = np.concatenate(found_same) if len(found_same) else np.zeros(0, bool)
    out = {}
    for name, group in (("touching", touching), ("isolated", ~touching)):
        out[f"{name}_cells"] = int(group.sum())
        out[f"detection_recall_{name}"] = ratio(found_any[group].sum(), group.sum())
        out[f"recall_{name}"] = ratio(found_same[group].sum(), group.sum())
    return out


@dataclass(frozen=True)
class Metric:
    """A named figure of ``EvaluationResult.summary()``, and which way is better (for "best by")."""

    key: str
    higher_is_better: bool = True

    def __call__(self, result: EvaluationResult) -> float:
        return result.summary()[self.key]


for _key in ("precision", "recall", "f1", "accuracy", "detection_precision", "detection_recall", "detection_f1",
             "detection_accuracy", "ap50_segm", "ap50_bbox", "ap_segm", "ap_bbox", "count_accuracy"):
    METRICS.register(Metric(_key), name=_key)
for _key in ("count_mae", "share_mae"):
    METRICS.register(Metric(_key, higher_is_better=False), name=_key)
