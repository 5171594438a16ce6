"""The RBC paper's count-accuracy table, from cached raw predictions (the model runs once).

For each class, and for all cells together when there are several classes (the paper's table
is per class: a model that calls a small cell normal keeps the total and gets both classes
wrong): per image the true count and, at each min confidence, the segmented count and the accuracy
min(segmented, true) / true, with a mean row. Beside it, per class and min confidence, the count
error, and for all cells the evaluator's detection and touching-cell figures, so the claim that
touching cells need a lower min confidence can be read off the same run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leukodet.evaluation.metrics import Evaluator, mean, to_rle_predictions
from leukodet.evaluation.sweep import binding_warnings
from leukodet.structures import RAW_MAX_DETECTIONS, RAW_SCORE_FLOOR, OperatingPoint, refilter

SUMMARY_COLUMNS = ["count_accuracy", "detection_precision", "detection_recall", "detection_recall_touching",
                   "detection_recall_isolated", "touching_cells", "isolated_cells"]


ALL_CELLS = "all"  # the block of every class summed (the table's only block with one class)


@dataclass
class CountTable:
    # class, image, true, segmented_<t>, accuracy_<t> per min confidence t; per class a block of images
    # and a "mean" row, then the "all" block (classes summed) when there are several classes
    per_image: pd.DataFrame
    # per class and min confidence: count accuracy, count MAE and bias; the "all" rows add SUMMARY_COLUMNS
    summary: pd.DataFrame

    def format(self) -> str:
        def text(table: pd.DataFrame) -> str:
            return table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")

        return f"{text(self.per_image)}\n\n{text(self.summary)}"


def merge_classes(dataset_dicts: Sequence[dict]) -> list[dict]:
    """The dataset dicts with every instance and point as class 0: to score cells alone with a model
    trained on other class names (e.g. a bccd "RBC" model on chula_rbc12's size classes)."""
    return [{**r, "annotations": [{**a, "category_id": 0} for a in r["annotations"]],
             "points": [{**p, "category_id": 0} for p in r.get("points", [])]} for r in dataset_dicts]


def image_names(dataset_dicts: Sequence[dict]) -> list[str]:
    """File names relative to the images' common folder: short, and unique where base names repeat."""
    paths = [str(r["file_name"]) for r in dataset_dicts]
    if len(paths) < 2:
        return [Path(p).name for p in paths]
    root = os.path.commonpath(paths)
    return [os.path.relpath(p, root) for p in paths]


def count_table(dataset_dicts: Sequence[dict], raw: Sequence, class_names: Sequence[str],
                min_confidences: Sequence[float] = (0.7, 0.8, 0.9), nms: float = 0.5, max_detections: int = 300,
                iou_threshold: float = 0.5, iou_type: str | None = None, cache_floor: float = RAW_SCORE_FLOOR,
                cache_cap: int = RAW_MAX_DETECTIONS, class_bias: tuple[float, ...] = (),
                cross_class_nms: float | None = None) -> CountTable:
    """Score ``raw`` (cached raw predictions, one per dataset dict) re-filtered at each min
    confidence (and ``nms``, ``max_detections``, ``class_bias``) with one ``Evaluator``: every figure is what
    ``evaluate`` gives at that point. Images with no true cell have no accuracy (NaN) and are left
    out of the mean accuracy, as in ``count_accuracy``."""
    if not min_confidences:
        raise ValueError("eval.count_min_confidence is empty: give at least one min confidence")
    evaluator = Evaluator(dataset_dicts, class_names, iou_threshold)
    raw = to_rle_predictions(raw, dataset_dicts)
    binding_warnings(min_confidences, cache_floor, cache_cap, raw)
    blocks = list(class_names) + ([ALL_CELLS] if len(class_names) > 1 else [])
    true = np.array([t.counts(len(class_names)) for t in evaluator.truths], np.int64).reshape(-1, len(class_names))
    names = image_names(dataset_dicts)
    columns = {block: {"class": block, "image": names, "true": block_counts(true, block, class_names)}
               for block in blocks}
    summary = []
    for min_confidence in min_confidences:
        point = OperatingPoint(min_confidence, nms, max_detections, class_bias=class_bias,
                               cross_class_nms=cross_class_nms)
        result = evaluator([refilter(r, point) for r in raw], iou_type)
        found = result.per_image[[f"pred_{name}" for name in class_names]].to_numpy()
        figures = result.summary()
        for block in blocks:
            segmented, block_true = block_counts(found, block, class_names), columns[block]["true"]
            with np.errstate(invalid="ignore", divide="ignore"):
                accuracy = np.where(block_true > 0, np.minimum(segmented, block_true) / block_true, np.nan)
            columns[block][f"segmented_{min_confidence:g}"] = segmented
            columns[block][f"accuracy_{min_confidence:g}"] = accuracy
            row = result.table.loc["any_cell" if block == ALL_CELLS or len(blocks) == 1 else block]
            detection = {k: figures[k] for k in SUMMARY_COLUMNS[1:]} if block == blocks[-1] else {}
            summary.append({"class": block, "min_confidence": min_confidence,
                            "count_accuracy": mean(accuracy[~np.isnan(accuracy)]), **detection,
                            "count_mae": row["count_mae"], "count_bias": row["count_bias"]})
    per_image = pd.concat([frame for block in blocks for frame in with_mean_row(columns[block])], ignore_index=True)
    return CountTable(per_image, pd.DataFrame(summary))


def block_counts(counts: np.ndarray, block: str, class_names: Sequence[str]) -> np.ndarray:
    """One block's per-image counts from (images, classes) counts: a class's column, or their sum."""
    return counts.sum(axis=1) if block == ALL_CELLS else counts[:, list(class_names).index(block)]


def with_mean_row(columns: dict) -> list[pd.DataFrame]:
    """A block's image rows and its "mean" row (accuracy: over images with a true cell, as
    ``count_accuracy``)."""
    means = {name: mean(values[~np.isnan(values)]) if name.startswith("accuracy") else mean(values)
             for name, values in columns.items() if name not in ("class", "image")}
    return [pd.DataFrame(columns), pd.DataFrame([{"class": columns["class"], "image": "mean", **means}])]
