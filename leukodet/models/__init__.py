"""Model adapters, registered in ``leukodet.registry.MODELS`` on import (detectron2's models are
registered by ``leukodet.integrations.detectron2``)."""

from leukodet.models import torchvision_maskrcnn  # noqa: F401  (registration)
from leukodet.models.base import DetectorAdapter

__all__ = ["DetectorAdapter"]
