"""Training-time augmentations, registered by name and built on torchvision.transforms.v2, which
moves tv_tensors BoundingBoxes and Mask together with the image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from leukodet.registry import AUGMENTATIONS


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees with probability ``p``.

    Written here because v2.RandomRotation resamples through an affine grid; a quarter turn is
    a pure transpose of the pixel grid, exact for images and masks alike.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        turns = int(torch.randint(1, 4, ()).item()) if torch.rand(()) < self.p else 0
        return {"turns": turns}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        turns = params["turns"]
        if turns == 0:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            height, width = inpt.canvas_size
            x0, y0, x1, y1 = inpt.unbind(-1)
            for _ in range(turns):  # counter-clockwise quarter turn: (x, y) -> (y, W - x)
                x0, y0, x1, y1, width, height = y0, width - x1, y1, width - x0, height, width
            return tv_tensors.wrap(torch.stack([x0, y0, x1, y1], -1), like=inpt, canvas_size=(height, width))
        if isinstance(inpt, torch.Tensor) and inpt.ndim >= 2:
            return tv_tensors.wrap(torch.rot90(inpt, turns, dims=(-2, -1)), like=inpt) \
                if isinstance(inpt, tv_tensors.TVTensor) else torch.rot90(inpt, turns, dims=(-2, -1))
        return inpt


def _maybe(transform: v2.Transform, p: float) -> v2.Transform:
    return transform if p >= 1 else v2.RandomApply([transform], p=p)


@AUGMENTATIONS.register(name="hflip")
def hflip(p: float = 0.5) -> v2.Transform:
    return v2.RandomHorizontalFlip(p)


@AUGMENTATIONS.register(name="vflip")
def vflip(p: float = 0.5) -> v2.Transform:
    return v2.RandomVerticalFlip(p)


@AUGMENTATIONS.register(name="rot90")
def rot90(p: float = 0.5) -> v2.Transform:
    return RandomRot90(p)


@AUGMENTATIONS.register(name="scale_jitter")
def scale_jitter(scale_range: Sequence[float] = (0.8, 1.25), p: float = 0.5) -> v2.Transform:
    """Resize by a random factor in ``scale_range`` (cell sizes vary between scanners)."""
    return _maybe(v2.RandomAffine(degrees=0, scale=tuple(scale_range)), p)


@AUGMENTATIONS.register(name="color_jitter")
def color_jitter(brightness: float = 0.15, contrast: float = 0.15, saturation: float = 0.0,
                 hue: float = 0.0, p: float = 0.8) -> v2.Transform:
    """Stain and illumination differences between slides."""
    return _maybe(v2.ColorJitter(brightness, contrast, saturation, hue), p)


def build_augmentation(specs: Sequence[Mapping[str, Any]] | None) -> v2.Transform | None:
    """A v2 pipeline from config, ending with the removal of boxes that became empty."""
    transforms = [AUGMENTATIONS.build(spec) for spec in (specs or [])]
    if not transforms:
        return None
    return v2.Compose([*transforms, v2.SanitizeBoundingBoxes(min_size=1.0)])
