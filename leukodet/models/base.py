"""What every model adapter shares: the ``Detections`` it returns and the protocol the loop calls."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

# A raw-prediction cache keeps everything above this score, with no final NMS, up to this many
# detections per image; sweeps re-filter it (see leukodet.evaluation.sweep).
RAW_SCORE_FLOOR = 0.05
RAW_MAX_DETECTIONS = 1000


def scoring_floor(min_confidence: float, floor: float = RAW_SCORE_FLOOR) -> float:
    """The lowest score an evaluation keeps: AP is scored over every score above it, P/R/F1 and
    counts above ``min_confidence`` (see ``leukodet.evaluation.metrics.Evaluator``)."""
    return min(floor, min_confidence)


@dataclass
class Detections:
    """Predictions for one image, on the CPU. ``labels`` are 0-based class ids; ``masks`` is bool
    (K, H, W) at the model input's size, or None for a box-only model."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: torch.Tensor) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep],
                          None if self.masks is None else self.masks[keep])


def postprocess(det: Detections, min_confidence: float, nms: float, max_detections: int) -> Detections:
    """The detector's own final filter, applied to raw detections: score > ``min_confidence``,
    per-class NMS at IoU ``nms``, then the ``max_detections`` highest scores (torchvision's
    RoIHeads.postprocess_detections does exactly this, in this order)."""
    keep = torch.nonzero(det.scores > min_confidence).flatten()
    det = det.select(keep)
    keep = batched_nms(det.boxes, det.scores, det.labels, nms)[:max_detections]
    return det.select(keep)


class DetectorAdapter(torch.nn.Module):
    """Protocol: ``losses(batch) -> {name: loss}``, ``predict(batch) -> [Detections]``.

    A batch is a list of mapper samples (``image`` uint8 CHW RGB; ``instances`` with ``boxes``
    XYXY, 0-based ``labels``, ``masks`` or None). Subclasses implement the three methods below.
    """

    num_classes: int
    has_masks: bool

    def losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, batch: list[dict]) -> list[Detections]:
        raise NotImplementedError

    def set_thresholds(self, min_confidence: float | None = None, nms: float | None = None,
                       max_detections: int | None = None) -> None:
        raise NotImplementedError

    def thresholds(self) -> tuple[float, float, int]:
        raise NotImplementedError

    @contextmanager
    def thresholds_set(self, min_confidence: float | None = None, nms: float | None = None,
                       max_detections: int | None = None):
        """Predict at these thresholds (None keeps the current one) inside the block, then restore."""
        saved = self.thresholds()
        self.set_thresholds(min_confidence, nms, max_detections)
        try:
            yield self
        finally:
            self.set_thresholds(*saved)

    def raw_predictions(self, floor: float = RAW_SCORE_FLOOR, cap: int = RAW_MAX_DETECTIONS):
        """Predict with a low score floor, no final NMS and a high cap (for a threshold-sweep cache)."""
        return self.thresholds_set(floor, 1.0, cap)

    def scored_predictions(self):
        """Predict down to the scoring floor with the usual NMS and cap: what the evaluator needs, since
        AP is scored on every detection above the floor and P/R/F1/counts above min confidence (the
        detector's NMS and cap commute with a higher score cut, so the latter are exact)."""
        return self.thresholds_set(min_confidence=scoring_floor(self.thresholds()[0]))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
