"""The plain structures every layer shares: detections, per-image predictions and the operating point.

Models return ``Detections`` (torch, model-input pixels). Everything after the model works on
``ImagePredictions`` (numpy, the file's pixels, masks as COCO RLE): RLE keeps hundreds of cell
masks per image small, and pycocotools computes mask IoU on it in C. The operating point (min
confidence, NMS, cap) is one value, ``OperatingPoint``, applied by one function, ``refilter``,
for validation, evaluation, sweeps, count tables and inference alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms

# Raw detections keep every candidate scored above this, with no final NMS, up to this many per
# image: a threshold sweep re-filters them instead of re-running the model.
RAW_SCORE_FLOOR = 0.05
RAW_MAX_DETECTIONS = 1000


def scoring_floor(min_confidence: float, floor: float = RAW_SCORE_FLOOR) -> float:
    """The lowest score an evaluation keeps: AP is scored over every score above it, P/R/F1 and
    counts above ``min_confidence`` (see ``leukodet.evaluation.metrics.Evaluator``)."""
    return min(floor, min_confidence)


@dataclass(frozen=True)
class OperatingPoint:
    """Where a detector's output is cut: score > ``min_confidence``, per-class NMS at IoU ``nms``,
    then the ``max_detections`` highest scores; ``source`` says where the values came from."""

    min_confidence: float = 0.5
    nms: float = 0.5
    max_detections: int = 300
    source: str = "default"

    def scored(self) -> "OperatingPoint":
        """The same NMS and cap down to the scoring floor: what an evaluation needs (AP over all
        scores; the evaluator applies min confidence itself, and NMS and cap commute with a higher
        score cut, so the point's own figures are unchanged)."""
        return replace(self, min_confidence=scoring_floor(self.min_confidence))

    def describe(self) -> str:
        return f"min confidence {self.min_confidence:g}, NMS {self.nms:g}, at most {self.max_detections} ({self.source})"


RAW = OperatingPoint(RAW_SCORE_FLOOR, 1.0, RAW_MAX_DETECTIONS, "raw")


@dataclass
class Detections:
    """One image's detections as a model gives them, on the CPU. ``labels`` are 0-based class ids;
    ``masks`` is bool (K, H, W) at the model input's size, or None for a box-only model."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class ImagePredictions:
    """One image's predictions in the file's pixels."""

    boxes: np.ndarray  # (K, 4) float32 XYXY
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int64, 0-based
    rles: list[dict] | None  # K COCO RLEs at the file's size, or None (box-only)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep) -> "ImagePredictions":
        keep = np.asarray(keep, dtype=np.int64)
        return ImagePredictions(self.boxes[keep], self.scores[keep], self.labels[keep],
                                None if self.rles is None else [self.rles[i] for i in keep])

    def above(self, min_confidence: float) -> "ImagePredictions":
        return self.select(np.nonzero(self.scores > min_confidence)[0])


def refilter(predictions: ImagePredictions, point: OperatingPoint) -> ImagePredictions:
    """``predictions`` cut at ``point``: score > min confidence, per-class NMS, the cap, in
    torchvision RoIHeads' (and detectron2's) own order. On raw detections this gives exactly what
    the detector gives at that point, since each Mask R-CNN mask depends on its box alone (tested
    for every registered torchvision model)."""
    kept = predictions.above(point.min_confidence)
    if len(kept) == 0:
        return kept
    order = batched_nms(torch.from_numpy(kept.boxes).float(), torch.from_numpy(kept.scores).float(),
                        torch.from_numpy(kept.labels), point.nms)[:point.max_detections]
    return kept.select(order.numpy())


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool/uint8 -> K RLEs (counts kept as bytes, as pycocotools makes them)."""
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(np.ascontiguousarray(masks, dtype=np.uint8).transpose(1, 2, 0)))


def to_original(det: Detections, scale: tuple[float, float], orig_size: tuple[int, int]) -> ImagePredictions:
    """Detections in model-input pixels -> ImagePredictions in file pixels (``orig_size`` = (W, H)).

    Masks are resized one at a time, so memory stays at one full-size mask per detection's RLE.
    """
    sx, sy = scale
    boxes = det.boxes.cpu().float() / torch.tensor([sx, sy, sx, sy])
    rles = None
    if det.masks is not None:
        masks = det.masks.cpu()
        width, height = orig_size
        if masks.shape[-2:] == (height, width):
            rles = encode_masks(masks.numpy())
        else:
            rles = [encode_masks(F.interpolate(m[None, None].float(), size=(height, width), mode="nearest")[0].numpy())[0]
                    for m in masks]
    return ImagePredictions(boxes.numpy(), det.scores.cpu().numpy().astype(np.float32),
                            det.labels.cpu().numpy().astype(np.int64), rles)
