"""The protocol every model adapter follows, so one loop trains any of them."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from leukodet.structures import RAW, Detections, OperatingPoint


class DetectorAdapter(torch.nn.Module):
    """Protocol: ``losses(batch) -> {name: loss}``, ``predict(batch, prefilter) -> [Detections]``.

    A batch is a list of mapper samples (``image`` uint8 CHW RGB; ``instances`` with ``boxes``
    XYXY, 0-based ``labels``, ``masks`` or None). Adapters hold no thresholds: ``predict`` returns
    raw detections (``structures.RAW``: score floor, no final NMS, a high cap) unless the caller
    passes the point it will cut at anyway, which spares the mask head the candidates that
    ``structures.refilter`` would drop (at RAW, hundreds of RoIs per image). Either way
    ``refilter(predict(b, RAW), p) == predict(b, p)``, tested for every registered torchvision model.
    """

    num_classes: int
    has_masks: bool

    def compute_losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """The training losses of ``batch``, in whatever mode the modules are in."""
        raise NotImplementedError

    def losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        self.train()
        return self.compute_losses(batch)

    def validation_losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """The training losses (detectors give them only in train mode) with no gradient and no
        state changed: BatchNorm layers use and keep their running statistics."""
        with torch.no_grad(), batchnorm_frozen(self):
            return self.compute_losses(batch)

    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        raise NotImplementedError

    def backbone_features(self, batch: list[dict]):
        """The backbone's forward on ``batch`` as prediction preprocesses it (what BatchNorm
        adaptation, ``leukodet.models.adapt``, runs images through)."""
        raise NotImplementedError(f"{type(self).__name__} cannot adapt its BatchNorm statistics (no backbone_features)")

    def for_inference(self, rpn_proposals: tuple[int, int] | None = None) -> DetectorAdapter:
        """The adapter to predict with once training is over: the same detections, perhaps from
        a faster copy (e.g. BatchNorm folded into convolutions). Default: itself.
        ``rpn_proposals``: (before NMS, after NMS) test-time proposals instead of the trained model's."""
        if rpn_proposals is not None:
            raise ValueError(f"{type(self).__name__} takes no test-time RPN proposal counts; leave them unset")
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


@contextmanager
def batchnorm_frozen(module: torch.nn.Module):
    """``module`` in train mode with every BatchNorm in eval mode (running statistics used, not
    updated) inside the block; every module's mode restored after."""
    modes = {m: m.training for m in module.modules()}
    module.train()
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    try:
        yield module
    finally:
        for m, training in modes.items():
            m.training = training
