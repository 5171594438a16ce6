"""Threshold sweeps that never re-run the model.

Raw predictions (score floor 0.05, no final NMS, up to 1000 per image) are computed once per
checkpoint, split and preprocessing, and cached with RLE masks. A sweep point re-applies the
min confidence, per-class NMS and the usual cap: in Mask R-CNN each box's mask does not depend
on the other boxes, so this is exactly what the model gives at that point, as long as the cache's
floor is at or below the point's min confidence and no image filled the cap above it (both are
warned about). The cache's limit: predictions at or below its score floor, or cut by its cap, are
gone, so sweep min confidences at or above the floor only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leukodet.evaluation.metrics import Evaluator, to_rle_predictions
from leukodet.evaluation.report import plot_grid
from leukodet.io import atomic_write_bytes, atomic_write_text
from leukodet.registry import METRICS
from leukodet.structures import RAW_MAX_DETECTIONS, RAW_SCORE_FLOOR, ImagePredictions, OperatingPoint, refilter, scoring_floor

logger = logging.getLogger(__name__)


def cache_key(checkpoint: str | Path, split: str, settings: dict) -> str:
    """Changes when the checkpoint file, the split (its registered name, e.g. ``bccd_rbc_test``, since
    one checkpoint can score several datasets) or the prediction settings (preprocessing, test-time
    augmentation) change."""
    stat = Path(checkpoint).stat()
    text = json.dumps([str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns, split, settings],
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def save_raw(path: str | Path, raw: Sequence[ImagePredictions], floor: float, cap: int) -> Path:
    """The cache as plain arrays in an ``.npz`` (data only: loading it can never run code, unlike a
    pickle): every image's detections concatenated, with per-image counts, and the RLE masks as
    their sizes and the bytes of their counts strings."""
    rles = [rle for r in raw if r.rles is not None for rle in r.rles]
    counts = [rle["counts"] for rle in rles]
    arrays = {
        "floor": np.float64(floor), "cap": np.int64(cap),
        "per_image": np.array([len(r) for r in raw], np.int64),
        "has_masks": np.array([r.rles is not None for r in raw], bool),
        "boxes": np.concatenate([np.asarray(r.boxes, np.float32).reshape(-1, 4) for r in raw] or [np.zeros((0, 4), np.float32)]),
        "scores": np.concatenate([np.asarray(r.scores, np.float32) for r in raw] or [np.zeros(0, np.float32)]),
        "labels": np.concatenate([np.asarray(r.labels, np.int64) for r in raw] or [np.zeros(0, np.int64)]),
        "rle_sizes": np.array([rle["size"] for rle in rles], np.int64).reshape(-1, 2),
        "rle_lengths": np.array([len(c) for c in counts], np.int64),
        "rle_bytes": np.frombuffer(b"".join(counts), np.uint8),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_raw(path: str | Path) -> dict:
    """``{"floor", "cap", "predictions"}`` from a cache written by ``save_raw``."""
    with np.load(path, allow_pickle=False) as cache:
        arrays = {key: cache[key] for key in cache.files}
    blob = arrays["rle_bytes"].tobytes()
    rle_ends = np.cumsum(arrays["rle_lengths"])
    predictions, start, rle_index = [], 0, 0
    for n, has_masks in zip(arrays["per_image"].tolist(), arrays["has_masks"].tolist()):
        rles = None
        if has_masks:
            rles = []
            for k in range(rle_index, rle_index + n):
                begin = int(rle_ends[k - 1]) if k else 0
                rles.append({"size": arrays["rle_sizes"][k].tolist(), "counts": blob[begin:int(rle_ends[k])]})
            rle_index += n
        predictions.append(ImagePredictions(arrays["boxes"][start:start + n], arrays["scores"][start:start + n],
                                            arrays["labels"][start:start + n], rles))
        start += n
    return {"floor": float(arrays["floor"]), "cap": int(arrays["cap"]), "predictions": predictions}


def binding_warnings(min_confidences: Sequence[float], cache_floor: float, cache_cap: int,
                     raw: Sequence[ImagePredictions]) -> list[str]:
    """Why a sweep from this cache could differ from a model run, if it could: a min confidence
    below the cache's floor, or an image that filled the cap while its lowest cached score is
    above a requested min confidence (the cut-off detections would have passed)."""
    notes = []
    lowest = min(min_confidences)
    if lowest < cache_floor:
        notes.append(f"min confidence {lowest} is below the cache's score floor {cache_floor}: "
                     "detections between them are not in the cache")
    full = sum(len(r) >= cache_cap and float(r.scores.min()) > lowest for r in raw)
    if full:
        notes.append(f"{full} image(s) reached the cache's cap of {cache_cap} detections above min confidence "
                     f"{lowest}: lower-scored ones are missing")
    for note in notes:
        logger.warning(note)
    return notes


def one_class_bias(bias: float, bias_class: int, n_classes: int) -> tuple[float, ...]:
    """A class-bias vector that moves ``bias_class`` only."""
    return tuple(float(bias) if i == bias_class else 0.0 for i in range(n_classes))


def sweep(dataset_dicts: Sequence[dict], raw: Sequence, class_names: Sequence[str],
          min_confidences: Sequence[float], nms_values: Sequence[float], max_detections: int = 300,
          metric: str = "f1", cache_floor: float = RAW_SCORE_FLOOR, cache_cap: int = RAW_MAX_DETECTIONS,
          iou_type: str | None = None, iou_threshold: float = 0.5, class_biases: Sequence[float] = (0.0,),
          bias_class: int = 0, cross_class_nms: float | None = None) -> tuple[pd.DataFrame, dict]:
    """Evaluate every (class bias, min confidence, NMS) point from the raw predictions
    (ImagePredictions or Detections-like, one per dataset dict); a bias is the logit added to the
    scores of class ``bias_class`` (the others get none). Returns the table (one row per point, the
    evaluator's summary as columns) and the best point by ``metric`` (a ``METRICS`` name; the first in
    grid order on ties, so list bias 0 first to prefer the model's own boundary), with its
    ``class_bias`` for every class and its ``cross_class_nms``: ``cross_class_nms``, or for a biased
    point without one ``SAME_CELL_IOU`` (``OperatingPoint.with_bias_suppression``)."""
    chosen = METRICS.get(metric)
    evaluator = Evaluator(dataset_dicts, class_names, iou_threshold)
    raw = to_rle_predictions(raw, dataset_dicts)
    binding_warnings(min_confidences, cache_floor, cache_cap, raw)
    rows = []
    floor = scoring_floor(min(min_confidences), cache_floor)
    for bias in class_biases:
        class_bias = one_class_bias(bias, bias_class, len(class_names))
        for nms in nms_values:
            # the detector's NMS and cap commute with a higher score cut: filter once per NMS, and let
            # the evaluator apply each min confidence (AP is scored over all scores, see Evaluator)
            point = OperatingPoint(floor, nms, max_detections, class_bias=class_bias,
                                   cross_class_nms=cross_class_nms).with_bias_suppression()
            scored = [refilter(r, point) for r in raw]
            for min_confidence in min_confidences:
                result = evaluator(scored, iou_type, min_confidence)
                rows.append({"class_bias": float(bias), "min_confidence": min_confidence, "nms": nms,
                             "cross_class_nms": point.cross_class_nms, **result.summary()})
    table = pd.DataFrame(rows)
    if chosen.key not in table:
        raise KeyError(f"metric {metric!r} is not computed for this data; "
                       f"choose one of: {', '.join(table.columns[4:])}")
    values = table[chosen.key]
    best = values.fillna(-np.inf).idxmax() if chosen.higher_is_better else values.fillna(np.inf).idxmin()
    across = table.cross_class_nms[best]
    return table, {"min_confidence": float(table.min_confidence[best]), "nms": float(table.nms[best]),
                   "class_bias": list(one_class_bias(float(table.class_bias[best]), bias_class, len(class_names))),
                   "cross_class_nms": None if pd.isna(across) else float(across), "metric": metric,
                   "value": float(values[best])}


def save_thresholds(path: str | Path, best: dict) -> Path:
    """``thresholds.json`` (``sweep``'s best point: min_confidence, nms, class_bias, metric, value, plus any
    notes such as the split) beside the checkpoint; inference uses it unless told otherwise."""
    return atomic_write_text(path, json.dumps(best, indent=2))


def load_thresholds(path: str | Path) -> dict | None:
    """The saved best point, or None when there is no file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def plot_heatmap(table: pd.DataFrame, metric: str, path: str | Path, class_bias: float = 0.0) -> Path:
    """The sweep's ``metric`` over NMS (rows) x min confidence (columns) at one class bias, as a PNG."""
    rows = table[table.class_bias == class_bias] if "class_bias" in table else table
    grid = rows.pivot(index="nms", columns="min_confidence", values=metric)
    title = metric if class_bias == 0 else f"{metric} at class bias {class_bias:g}"
    return plot_grid(grid.values, grid.index, grid.columns, path, title=title, xlabel="min confidence",
                     ylabel="NMS IoU", cmap="viridis", number_format="{:.3f}")
