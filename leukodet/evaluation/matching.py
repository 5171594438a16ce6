"""One-to-one matching of predictions to ground truth (DESIGN.md, "Metric definitions").

Matching ignores class: each prediction, highest score first, takes the unmatched ground truth
with the highest IoU >= the threshold. A match with the same class is a TP; a match with another
class is an FP and leaves its ground truth an FN ("matched with a wrong class").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def iou_matrix(pred_boxes: np.ndarray, gt_boxes: np.ndarray, pred_rles: Sequence | None = None,
               gt_rles: Sequence | None = None) -> np.ndarray:
    """(P, G) IoU: mask IoU when both RLE lists are given, else box IoU (boxes XYXY)."""
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros((len(pred_boxes), len(gt_boxes)))
    crowd = [0] * len(gt_boxes)
    if pred_rles is not None and gt_rles is not None:
        return np.asarray(mask_utils.iou(list(pred_rles), list(gt_rles), crowd))
    return np.asarray(mask_utils.iou(xyxy_to_xywh(pred_boxes), xyxy_to_xywh(gt_boxes), crowd))


def match(scores: np.ndarray, ious: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """For each prediction, the index of the ground truth it matched, or -1.

    Greedy, highest score first (stable order on ties), each ground truth matched at most once.
    """
    matched = np.full(len(scores), -1, dtype=np.int64)
    if ious.size == 0:
        return matched
    free = np.ones(ious.shape[1], dtype=bool)
    for p in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = np.where(free & (ious[p] >= threshold), ious[p], -1.0)
        g = int(np.argmax(candidates))
        if candidates[g] >= threshold:
            matched[p] = g
            free[g] = False
    return matched


def tally(matched: np.ndarray, pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> dict:
    """Class-aware TP/FP/FN per class, class-agnostic TP/FP/FN, and the confusion matrix
    (rows ground truth, columns prediction, index ``num_classes`` = background)."""
    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    fn = np.zeros(num_classes, np.int64)
    confusion = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    hit = np.zeros(len(gt_labels), dtype=bool)
    for p, g in enumerate(matched):
        label = pred_labels[p]
        if g < 0:
            fp[label] += 1
            confusion[num_classes, label] += 1
            continue
        hit[g] = True
        confusion[gt_labels[g], label] += 1
        if gt_labels[g] == label:
            tp[label] += 1
        else:
            fp[label] += 1
            fn[gt_labels[g]] += 1
    for g in np.nonzero(~hit)[0]:
        fn[gt_labels[g]] += 1
        confusion[gt_labels[g], num_classes] += 1
    found = int(hit.sum())
    return {"tp": tp, "fp": fp, "fn": fn, "confusion": confusion,
            "any_tp": found, "any_fp": int((matched < 0).sum()), "any_fn": len(gt_labels) - found}
