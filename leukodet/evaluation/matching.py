"""One-to-one matching of predictions to ground truth (docs/metrics.md).

Matching ignores class: each prediction, highest score first, takes the unmatched ground truth
with the highest IoU >= the threshold. A match with the same class is a TP; a match with another
class is an FP and leaves its ground truth an FN ("matched with a wrong class"), while for the
class-agnostic detection figures it is a found cell. Every count follows from one confusion
matrix (rows truth, columns prediction, last row and column = background), see ``Tally``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from leukodet.structures import encode_masks


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


def match_points(scores: np.ndarray, boxes: np.ndarray, points_xy: np.ndarray,
                 rles: Sequence | None = None) -> np.ndarray:
    """For each prediction, the index of the count-only point it counts for, or -1.

    A prediction counts for a point inside its mask (its XYXY box when ``rles`` is None), highest
    score first, one-to-one; of several free points inside, it takes the one nearest its box
    centre.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    points_xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    matched = np.full(len(boxes), -1, dtype=np.int64)
    free = np.ones(len(points_xy), dtype=bool)
    x, y = points_xy[:, 0], points_xy[:, 1]
    for p in np.argsort(-np.asarray(scores), kind="stable"):
        x0, y0, x1, y1 = boxes[p]
        inside = free & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        if inside.any() and rles is not None:
            mask = mask_utils.decode(rles[p])
            rows = np.clip(y.astype(np.int64), 0, mask.shape[0] - 1)
            cols = np.clip(x.astype(np.int64), 0, mask.shape[1] - 1)
            inside &= mask[rows, cols] > 0
        if inside.any():
            distance = np.where(inside, np.hypot(x - (x0 + x1) / 2, y - (y0 + y1) / 2), np.inf)
            matched[p] = int(np.argmin(distance))
            free[matched[p]] = False
    return matched


@dataclass
class Tally:
    """Counts of one image or a whole split, all read off the confusion matrix: ``confusion[t, p]``
    counts predictions of class ``p`` on ground truth of class ``t``; index C (the last) is
    background (an unmatched prediction is in the last row, a missed cell in the last column)."""

    confusion: np.ndarray  # (C + 1, C + 1) int64

    @classmethod
    def zeros(cls, num_classes: int) -> "Tally":
        return cls(np.zeros((num_classes + 1, num_classes + 1), np.int64))

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.confusion + other.confusion)

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.confusion)[:-1]

    @property
    def fp(self) -> np.ndarray:
        """Per predicted class: unmatched or matched to another class."""
        return self.confusion[:, :-1].sum(axis=0) - self.tp

    @property
    def fn(self) -> np.ndarray:
        """Per true class: missed or taken by a prediction of another class."""
        return self.confusion[:-1].sum(axis=1) - self.tp

    @property
    def any_tp(self) -> int:
        """Cells found whatever the class (class-agnostic detection)."""
        return int(self.confusion[:-1, :-1].sum())

    @property
    def any_fp(self) -> int:
        return int(self.confusion[-1, :-1].sum())

    @property
    def any_fn(self) -> int:
        return int(self.confusion[:-1, -1].sum())


def tally(matched: np.ndarray, pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> Tally:
    """The confusion matrix of one image from ``match``'s output (-1 = unmatched)."""
    matched = np.asarray(matched, dtype=np.int64)
    pred_labels = np.asarray(pred_labels, dtype=np.int64)
    gt_labels = np.asarray(gt_labels, dtype=np.int64)
    background = num_classes
    truth = np.full(len(matched), background, dtype=np.int64)
    hit = matched >= 0
    truth[hit] = gt_labels[matched[hit]]
    confusion = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    np.add.at(confusion, (truth, pred_labels), 1)
    missed = np.setdiff1d(np.arange(len(gt_labels)), matched)
    np.add.at(confusion, (gt_labels[missed], background), 1)
    return Tally(confusion)


@dataclass
class ImageMatch:
    """``matched[k]``: the ground-truth instance prediction k matched, or -1; ``matched_point[k]``:
    the count-only point it counts for (only predictions left unmatched by IoU), or -1."""

    matched: np.ndarray
    matched_point: np.ndarray
    tally: Tally


def match_image(gt_boxes: np.ndarray, gt_labels: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray,
                pred_labels: np.ndarray, num_classes: int, *, gt_masks=None, pred_masks=None,
                iou_type: str = "segm", iou_threshold: float = 0.5, points_xy: np.ndarray | None = None,
                point_labels: np.ndarray | None = None) -> ImageMatch:
    """Match one image's predictions to its ground truth, ignoring class (see the module doc).

    Boxes are XYXY. ``iou_type="segm"`` compares masks (RLE lists or (K, H, W) arrays), ``"bbox"``
    boxes. Predictions that match no instance are then matched to the image's count-only
    ``points`` (``match_points``; inside the mask under segm, the box under bbox), which count like
    ground truth of their class.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', not {iou_type!r}")
    pred_labels = np.asarray(pred_labels, dtype=np.int64).reshape(-1)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    pred_rles = gt_rles = None
    if iou_type == "segm":
        if gt_masks is None or pred_masks is None:
            raise ValueError("iou_type='segm' needs gt_masks and pred_masks; use iou_type='bbox' for boxes")
        gt_rles = gt_masks if isinstance(gt_masks, list) else encode_masks(gt_masks)
        pred_rles = pred_masks if isinstance(pred_masks, list) else encode_masks(pred_masks)
    ious = iou_matrix(pred_boxes, gt_boxes, pred_rles, gt_rles)
    matched = match(pred_scores, ious, iou_threshold)
    matched_point = np.full(len(pred_labels), -1, dtype=np.int64)
    truth_index, truth_labels = matched, gt_labels
    if points_xy is not None and len(points_xy):
        rest = np.nonzero(matched < 0)[0]
        matched_point[rest] = match_points(np.asarray(pred_scores)[rest], np.asarray(pred_boxes).reshape(-1, 4)[rest],
                                           points_xy, None if pred_rles is None else [pred_rles[k] for k in rest])
        # points tally as ground truth items after the instances
        truth_index = np.where(matched_point >= 0, len(gt_labels) + matched_point, matched)
        truth_labels = np.concatenate([gt_labels, np.asarray(point_labels, dtype=np.int64).reshape(-1)])
    return ImageMatch(matched, matched_point, tally(truth_index, pred_labels, truth_labels, num_classes))
