"""The RBC paper's count-accuracy table, from cached raw predictions (the model runs once).

Per image: the ground-truth cell count and, at each min confidence, the segmented count and the
accuracy min(segmented, true) / true (all classes together), with a mean row; beside it, per min
confidence, the evaluator's count and touching-cell figures, so the claim that touching cells
need a lower min confidence can be read off the same run.
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


@dataclass
class CountTable:
    per_image: pd.DataFrame  # image, true, segmented_<t>, accuracy_<t> per min confidence t; last row "mean"
    summary: pd.DataFrame  # one row per min confidence: SUMMARY_COLUMNS and the total count's MAE and bias

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
                cache_cap: int = RAW_MAX_DETECTIONS, class_bias: tuple[float, ...] = ()) -> CountTable:
    """Score ``raw`` (cached raw predictions, one per dataset dict) re-filtered at each min
    confidence (and ``nms``, ``max_detections``, ``class_bias``) with one ``Evaluator``: every figure is what
    ``evaluate`` gives at that point. Images with no true cell have no accuracy (NaN) and are left
    out of the mean accuracy, as in ``count_accuracy``."""
    if not min_confidences:
        raise ValueError("eval.count_min_confidence is empty: give at least one min confidence")
    evaluator = Evaluator(dataset_dicts, class_names, iou_threshold)
    raw = to_rle_predictions(raw, dataset_dicts)
    binding_warnings(min_confidences, cache_floor, cache_cap, raw)
    true = np.array([t.counts(len(class_names)).sum() for t in evaluator.truths], dtype=np.int64)
    columns = {"image": image_names(dataset_dicts), "true": true}
    summary = []
    for min_confidence in min_confidences:
        point = OperatingPoint(min_confidence, nms, max_detections, class_bias=class_bias)
        result = evaluator([refilter(r, point) for r in raw], iou_type)
        segmented = result.per_image[[f"pred_{name}" for name in class_names]].to_numpy().sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(true > 0, np.minimum(segmented, true) / true, np.nan)
        columns[f"segmented_{min_confidence:g}"] = segmented
        columns[f"accuracy_{min_confidence:g}"] = accuracy
        figures = result.summary()
        any_cell = result.table.loc["any_cell"]
        summary.append({"min_confidence": min_confidence, **{k: figures[k] for k in SUMMARY_COLUMNS},
                        "count_mae": any_cell["count_mae"], "count_bias": any_cell["count_bias"]})
    means = {name: mean(values[~np.isnan(values)]) if name.startswith("accuracy") else mean(values)
             for name, values in columns.items() if name != "image"}
    per_image = pd.concat([pd.DataFrame(columns), pd.DataFrame([{"image": "mean", **means}])], ignore_index=True)
    return CountTable(per_image, pd.DataFrame(summary))
