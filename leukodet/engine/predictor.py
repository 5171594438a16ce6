"""Model predictions for mapper samples, in original image pixels (what every output uses)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

from leukodet.evaluation.predictions import ImagePredictions, to_original


def predict_original(adapter, batch: list[dict]) -> list[ImagePredictions]:
    """Predict one batch and move each image's detections back to its file's pixels."""
    detections = adapter.predict(batch)
    return [to_original(det, sample["scale"], (sample["orig_width"], sample["orig_height"]))
            for det, sample in zip(detections, batch)]


def predict_loader(adapter, loader: Iterable[list[dict]], desc: str = "predicting") -> Iterator[tuple[dict, ImagePredictions]]:
    """Stream (sample, predictions) over a loader, so memory stays flat over any number of images."""
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch"):
            yield from zip(batch, predict_original(adapter, batch))
