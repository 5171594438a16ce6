"""The evaluator: every figure of DESIGN.md's "Metric definitions" at one operating point.

P/R/F1/accuracy from one-to-one matching (class-aware and class-agnostic), per-class count MAE and
bias, lymphoblast-share error, RBC count accuracy, confusion matrix, and COCO AP50 / AP50:95 for
boxes and masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from leukodet.evaluation.coco_eval import coco_ap, coco_ground_truth
from leukodet.evaluation.matching import iou_matrix, match, tally
from leukodet.evaluation.predictions import ImagePredictions
from leukodet.registry import METRICS

LYMPHOBLAST = "lymphoblast"


def ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * precision * recall, precision + recall) if tp else (0.0 if fp + fn else float("nan"))
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": precision, "recall": recall,
            "f1": f1, "accuracy": ratio(tp, tp + fp + fn)}


def gt_arrays(record: dict, use_masks: bool):
    """Ground-truth boxes (XYXY), labels and (for masks) RLEs of one dataset dict."""
    from pycocotools import mask as mask_utils

    anns = record["annotations"]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns], dtype=np.float64).reshape(-1, 4)
    labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
    rles = None
    if use_masks:
        rles = [mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], record["height"], record["width"]))
                for a in anns]
    return boxes, labels, rles


@dataclass
class EvaluationResult:
    table: pd.DataFrame  # rows: classes, "all", "any_cell"; columns as in ``evaluate``
    per_image: pd.DataFrame  # image, true_<class>, pred_<class>
    confusion: np.ndarray  # (C+1, C+1), rows truth, columns prediction, last = background
    class_names: list[str]
    iou_type: str
    extras: dict
    pr_curves: dict  # {"bbox"|"segm": (C, 101) precision at COCO's recall points, IoU 0.5}

    def summary(self) -> dict[str, float]:
        """Headline numbers, flat (what the training loop logs and sweeps rank by)."""
        row = self.table.loc["all"]
        out = {k: float(row[k]) for k in ("precision", "recall", "f1", "accuracy")}
        out.update({f"detection_{k}": float(self.table.loc["any_cell"][k]) for k in ("precision", "recall", "f1")})
        for kind in ("bbox", "segm"):
            if f"ap50_{kind}" in self.table:
                out[f"ap50_{kind}"] = float(row[f"ap50_{kind}"])
                out[f"ap_{kind}"] = float(row[f"ap_{kind}"])
        for name in self.class_names:
            out[f"count_mae_{name}"] = float(self.table.loc[name]["count_mae"])
        out.update(self.extras)
        return out


def evaluate(dataset_dicts: Sequence[dict], predictions: Sequence[ImagePredictions], class_names: Sequence[str],
             iou_type: str | None = None, min_confidence: float = 0.0, iou_threshold: float = 0.5) -> EvaluationResult:
    """Score ``predictions`` (one ImagePredictions per dataset dict, original pixels) at
    ``min_confidence``. ``iou_type`` defaults to ``segm`` when both sides have masks, else ``bbox``.
    AP is computed over all scores above ``min_confidence``."""
    if len(dataset_dicts) != len(predictions):
        raise ValueError(f"{len(dataset_dicts)} images but {len(predictions)} predictions")
    class_names = list(class_names)
    num_classes = len(class_names)
    has_masks = all(p.rles is not None for p in predictions) and not any(r.get("box_only") for r in dataset_dicts)
    iou_type = iou_type or ("segm" if has_masks else "bbox")
    if iou_type == "segm" and not has_masks:
        raise ValueError("iou_type=segm needs masks on both sides; this data or model is box-only")
    predictions = [p.select(np.nonzero(p.scores >= min_confidence)[0]) for p in predictions]

    totals = {"tp": np.zeros(num_classes, np.int64), "fp": np.zeros(num_classes, np.int64),
              "fn": np.zeros(num_classes, np.int64), "confusion": np.zeros((num_classes + 1,) * 2, np.int64),
              "any_tp": 0, "any_fp": 0, "any_fn": 0}
    rows = []
    for record, pred in zip(dataset_dicts, predictions):
        boxes, labels, rles = gt_arrays(record, iou_type == "segm")
        ious = iou_matrix(pred.boxes, boxes, pred.rles if iou_type == "segm" else None, rles)
        counts = tally(match(pred.scores, ious, iou_threshold), pred.labels, labels, num_classes)
        for key in totals:
            totals[key] = totals[key] + counts[key]
        true = np.bincount(labels, minlength=num_classes)
        predicted = np.bincount(pred.labels, minlength=num_classes)
        rows.append({"image": record["file_name"], **{f"true_{n}": int(true[i]) for i, n in enumerate(class_names)},
                     **{f"pred_{n}": int(predicted[i]) for i, n in enumerate(class_names)}})
    per_image = pd.DataFrame(rows, columns=["image", *(f"true_{n}" for n in class_names),
                                            *(f"pred_{n}" for n in class_names)])

    table = {}
    for i, name in enumerate(class_names):
        table[name] = prf(totals["tp"][i], totals["fp"][i], totals["fn"][i])
        error = per_image[f"pred_{name}"] - per_image[f"true_{name}"]
        table[name].update(count_mae=float(error.abs().mean()), count_bias=float(error.mean()))
    table["all"] = prf(totals["tp"].sum(), totals["fp"].sum(), totals["fn"].sum())
    table["any_cell"] = prf(totals["any_tp"], totals["any_fp"], totals["any_fn"])
    all_error = sum(per_image[f"pred_{n}"] - per_image[f"true_{n}"] for n in class_names)
    table["all"].update(count_mae=float(all_error.abs().mean()), count_bias=float(all_error.mean()))
    table["any_cell"].update(count_mae=table["all"]["count_mae"], count_bias=table["all"]["count_bias"])

    gt = coco_ground_truth(dataset_dicts, class_names)
    pr_curves = {}
    for kind in (["bbox", "segm"] if iou_type == "segm" else ["bbox"]):
        ap = coco_ap(gt, predictions, kind, num_classes)
        pr_curves[kind] = ap["pr50"]
        for i, name in enumerate(class_names):
            table[name][f"ap50_{kind}"], table[name][f"ap_{kind}"] = ap["ap50"][i], ap["ap"][i]
        table["all"][f"ap50_{kind}"], table["all"][f"ap_{kind}"] = np.nanmean(ap["ap50"]), np.nanmean(ap["ap"])
        table["any_cell"][f"ap50_{kind}"] = table["any_cell"][f"ap_{kind}"] = float("nan")

    extras = {}
    if LYMPHOBLAST in class_names:
        extras.update(lymphoblast_share_errors(per_image, class_names))
    extras["count_accuracy"] = count_accuracy(per_image, class_names)
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index.name = "class"
    return EvaluationResult(frame, per_image, totals["confusion"], class_names, iou_type, extras, pr_curves)


def lymphoblast_share_errors(per_image: pd.DataFrame, class_names: Sequence[str]) -> dict[str, float]:
    """Mean absolute and signed error of the lymphoblast share (lymphoblasts / all cells) per
    image. Images without any true cell have no share and are left out (and counted)."""
    true_all = sum(per_image[f"true_{n}"] for n in class_names)
    pred_all = sum(per_image[f"pred_{n}"] for n in class_names)
    scored = true_all > 0
    true_share = per_image[f"true_{LYMPHOBLAST}"][scored] / true_all[scored]
    pred_share = (per_image[f"pred_{LYMPHOBLAST}"][scored] / pred_all[scored].where(pred_all[scored] > 0)).fillna(0.0)
    error = pred_share - true_share
    return {"lymphoblast_share_mae": float(error.abs().mean()) if len(error) else float("nan"),
            "lymphoblast_share_bias": float(error.mean()) if len(error) else float("nan"),
            "lymphoblast_share_images_skipped": int((~scored).sum())}


def count_accuracy(per_image: pd.DataFrame, class_names: Sequence[str]) -> float:
    """RBC paper's figure: mean over images of min(segmented, true) / true (images with no true
    cell are left out)."""
    true_all = sum(per_image[f"true_{n}"] for n in class_names)
    pred_all = sum(per_image[f"pred_{n}"] for n in class_names)
    scored = true_all > 0
    if not scored.any():
        return float("nan")
    return float((np.minimum(pred_all[scored], true_all[scored]) / true_all[scored]).mean())


for _name in ("precision", "recall", "f1", "accuracy", "ap50_segm", "ap50_bbox", "ap_segm", "ap_bbox", "count_accuracy"):
    METRICS.register(lambda result, key=_name: result.summary()[key], name=_name)
