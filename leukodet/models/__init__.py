"""Model adapters, registered in ``leukodet.registry.MODELS`` on import."""

from leukodet.models import detectron2_adapter, torchvision_maskrcnn  # noqa: F401  (registration)
from leukodet.models.base import DetectorAdapter, Detections, postprocess

__all__ = ["DetectorAdapter", "Detections", "postprocess"]
