"""Threshold sweeps that never re-run the model.

Raw predictions (score floor 0.05, no final NMS, up to 1000 per image) are computed once per
checkpoint, split and preprocessing, and cached with RLE masks. A sweep point re-applies the
min confidence, per-class NMS and the usual cap: in Mask R-CNN each box's mask does not depend
on the other boxes, so this is exactly what the model gives at that point, as long as the cache's
floor is at or below the point's min confidence and no image hit the cap (both are warned about).
Predictions below the cached floor are gone: sweep above it only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.ops import batched_nms

from leukodet.evaluation.metrics import evaluate
from leukodet.evaluation.predictions import ImagePredictions
from leukodet.io import atomic_write_bytes, atomic_write_text
from leukodet.models.base import RAW_MAX_DETECTIONS, RAW_SCORE_FLOOR

logger = logging.getLogger(__name__)


def refilter(raw: ImagePredictions, min_confidence: float, nms: float, max_detections: int) -> ImagePredictions:
    """Score > ``min_confidence``, per-class NMS at ``nms``, top ``max_detections``: torchvision
    RoIHeads' own order (see ``leukodet.models.base.postprocess``)."""
    keep = np.nonzero(raw.scores > min_confidence)[0]
    kept = raw.select(keep)
    if len(kept) == 0:
        return kept
    order = batched_nms(torch.from_numpy(kept.boxes).float(), torch.from_numpy(kept.scores),
                        torch.from_numpy(kept.labels), nms)[:max_detections]
    return kept.select(order.numpy())


def cache_key(checkpoint: str | Path, split: str, preprocess: dict) -> str:
    """Changes when the checkpoint file, the split or the preprocessing changes."""
    stat = Path(checkpoint).stat()
    text = json.dumps([str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns, split, preprocess],
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def save_raw(path: str | Path, raw: Sequence[ImagePredictions], floor: float, cap: int) -> Path:
    return atomic_write_bytes(path, pickle.dumps({"floor": floor, "cap": cap, "predictions": list(raw)}))


def load_raw(path: str | Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle)


def binding_warnings(min_confidences: Sequence[float], floor: float, cap: int,
                     raw: Sequence[ImagePredictions]) -> list[str]:
    """Why a sweep from this cache could differ from a model run, if it could."""
    notes = []
    if min(min_confidences) < floor:
        notes.append(f"min confidence {min(min_confidences)} is below the cache's score floor {floor}: "
                     "detections between them are not in the cache")
    full = sum(len(r) >= cap for r in raw)
    if full:
        notes.append(f"{full} image(s) reached the cache's cap of {cap} detections: lower-scored ones are missing")
    for note in notes:
        logger.warning(note)
    return notes


def sweep(dataset_dicts: Sequence[dict], raw: Sequence[ImagePredictions], class_names: Sequence[str],
          min_confidences: Sequence[float], nms_values: Sequence[float], max_detections: int = 300,
          metric: str = "f1", floor: float = RAW_SCORE_FLOOR, cap: int = RAW_MAX_DETECTIONS
          ) -> tuple[pd.DataFrame, dict]:
    """Evaluate every (min confidence, NMS) point from the cache. Returns the table (one row per
    point, the evaluator's headline figures as columns) and the best point by ``metric``."""
    binding_warnings(min_confidences, floor, cap, raw)
    rows = []
    for nms in nms_values:
        for min_confidence in min_confidences:
            predictions = [refilter(r, min_confidence, nms, max_detections) for r in raw]
            summary = evaluate(dataset_dicts, predictions, class_names, min_confidence=min_confidence).summary()
            rows.append({"min_confidence": min_confidence, "nms": nms, **summary})
    table = pd.DataFrame(rows)
    if metric not in table:
        raise KeyError(f"metric {metric!r} is not computed; choose one of: {', '.join(table.columns[2:])}")
    best = table.loc[table[metric].fillna(-1).idxmax()]
    return table, {"min_confidence": float(best.min_confidence), "nms": float(best.nms), "metric": metric,
                   "value": float(best[metric])}


def save_thresholds(path: str | Path, best: dict) -> Path:
    """``thresholds.json`` beside the checkpoint; inference uses it unless told otherwise."""
    return atomic_write_text(path, json.dumps(best, indent=2))


def load_thresholds(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def plot_heatmap(table: pd.DataFrame, metric: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = table.pivot(index="nms", columns="min_confidence", values=metric)
    fig, ax = plt.subplots(figsize=(1.1 * grid.shape[1] + 2, 0.8 * grid.shape[0] + 1.5))
    image = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set(xticks=range(grid.shape[1]), yticks=range(grid.shape[0]), xticklabels=grid.columns,
           yticklabels=grid.index, xlabel="min confidence", ylabel="NMS IoU", title=metric)
    for (i, j), value in np.ndenumerate(grid.values):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
