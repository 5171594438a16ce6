"""Model predictions for mapper samples, in original image pixels (what every output uses)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

from leukodet.engine.tiling import Tiling, predict_tiled
from leukodet.structures import RAW, ImagePredictions, OperatingPoint, refilter, to_original


def predict_original(adapter, batch: list[dict], prefilter: OperatingPoint = RAW,
                     tiling: Tiling | None = None) -> list[ImagePredictions]:
    """Predict one batch (cut at ``prefilter``) and move each image's detections back to its file's
    pixels. A detector knows no class bias: it cuts at ``prefilter.detector_cut()`` and the bias
    and cut are applied here. With ``tiling`` each image is predicted in tiles at the trained
    scale (``leukodet.engine.tiling``), whatever its size."""
    if tiling is not None:
        return [predict_tiled(adapter, sample, tiling.for_sample(sample), prefilter) for sample in batch]
    cut = prefilter.detector_cut()
    detections = [to_original(det, sample["scale"], (sample["orig_width"], sample["orig_height"]))
                  for det, sample in zip(adapter.predict(batch, cut), batch)]
    return detections if cut is prefilter else [refilter(d, prefilter) for d in detections]


def predict_loader(adapter, loader: Iterable[list[dict]], prefilter: OperatingPoint = RAW,
                   desc: str = "predicting", tiling: Tiling | None = None) -> Iterator[tuple[dict, ImagePredictions]]:
    """Stream (sample, predictions) over a loader, so memory stays flat over any number of images."""
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch"):
            yield from zip(batch, predict_original(adapter, batch, prefilter, tiling))
