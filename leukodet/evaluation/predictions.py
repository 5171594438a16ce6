"""Compact per-image predictions in original image pixels, masks as COCO RLE.

RLE keeps hundreds of cell masks per image small, and pycocotools computes mask IoU on it in C,
so the evaluator, the sweep cache and inference all store predictions this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils


@dataclass
class ImagePredictions:
    boxes: np.ndarray  # (K, 4) float32 XYXY, original pixels
    scores: np.ndarray  # (K,)
    labels: np.ndarray  # (K,) int64, 0-based
    rles: list[dict] | None  # K COCO RLEs at the original size, or None (box-only)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> "ImagePredictions":
        keep = np.asarray(keep, dtype=np.int64)
        return ImagePredictions(self.boxes[keep], self.scores[keep], self.labels[keep],
                                None if self.rles is None else [self.rles[i] for i in keep])


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool/uint8 -> K RLEs (counts kept as bytes, as pycocotools makes them)."""
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(np.ascontiguousarray(masks, dtype=np.uint8).transpose(1, 2, 0)))


def to_original(det, scale: tuple[float, float], orig_size: tuple[int, int]) -> ImagePredictions:
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
