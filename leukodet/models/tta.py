"""Test-time flip augmentation around any detector with the adapter's ``predict`` (a trained
adapter, its inference copy or the ONNX Runtime detector): the image and its horizontal mirror are
predicted, the mirror's detections are mirrored back, and the pooled detections are cut once at the
operating point (score, per-class NMS, cap).

Each pass is asked for its detections above the point's min confidence with no NMS, so cutting the
pooled raw detections later (``structures.refilter``, what sweeps and the cache do) gives exactly
what this wrapper gives at that point: one refilter still serves every tool.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torchvision.ops import batched_nms

from leukodet.structures import RAW, RAW_MAX_DETECTIONS, Detections, OperatingPoint


def mirrored(detections: Detections, width: int) -> Detections:
    """Detections of a horizontally mirrored image, in the unmirrored image's pixels."""
    boxes = detections.boxes.clone()
    boxes[:, 0], boxes[:, 2] = width - detections.boxes[:, 2], width - detections.boxes[:, 0]
    masks = None if detections.masks is None else detections.masks.flip(-1)
    return Detections(boxes, detections.scores, detections.labels, masks)


def pooled(parts: list[Detections], point: OperatingPoint) -> Detections:
    """The detections of several passes over one image, cut at ``point`` (per-class NMS in score order)."""
    boxes, scores, labels = (torch.cat([getattr(p, key) for p in parts]) for key in ("boxes", "scores", "labels"))
    keep = batched_nms(boxes.float(), scores.float(), labels, point.nms)[:point.max_detections]
    masks = None if parts[0].masks is None else torch.cat([p.masks for p in parts])[keep]
    return Detections(boxes[keep], scores[keep], labels[keep], masks)


class FlipTTA:
    """``detector`` with horizontal-flip test-time augmentation (see the module doc)."""

    def __init__(self, detector):
        self.detector = detector

    @property
    def device(self) -> torch.device:
        return self.detector.device

    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        each_pass = replace(prefilter, nms=1.0, max_detections=RAW_MAX_DETECTIONS)
        plain = self.detector.predict(batch, each_pass)
        flipped = self.detector.predict([{**sample, "image": sample["image"].flip(-1)} for sample in batch], each_pass)
        return [pooled([a, mirrored(b, sample["image"].shape[-1])], prefilter)
                for a, b, sample in zip(plain, flipped, batch)]
