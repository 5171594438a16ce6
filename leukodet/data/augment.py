"""Training-time augmentations, registered in ``AUGMENTATIONS`` and built on torchvision.transforms.v2,
which moves tv_tensors ``BoundingBoxes`` and ``Mask`` together with the image.

Config (``conf/augment``): ``transforms: [{name: hflip, p: 0.5}, ...]``; a new augmentation is one
registered function returning a v2 transform plus a YAML entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from leukodet.registry import AUGMENTATIONS


class RandomRot90(v2.Transform):
    """Rotate counter-clockwise by a random multiple of 90 degrees, with probability ``p``.

    Written here because v2.RandomRotation resamples through an affine grid; a quarter turn is a
    pure transpose of the pixel grid, exact for images and masks alike.
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
            if inpt.format != tv_tensors.BoundingBoxFormat.XYXY:
                raise ValueError(f"rot90 needs XYXY boxes, got {inpt.format}")
            height, width = inpt.canvas_size
            x0, y0, x1, y1 = inpt.unbind(-1)
            for _ in range(turns):  # a quarter turn maps (x, y) to (y, W - x); the canvas turns too
                x0, y0, x1, y1, width, height = y0, width - x1, y1, width - x0, height, width
            return tv_tensors.wrap(torch.stack([x0, y0, x1, y1], -1), like=inpt, canvas_size=(height, width))
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), turns, dims=(-2, -1)), like=inpt)
        return inpt  # labels and other passengers


def _maybe(transform: v2.Transform, p: float) -> v2.Transform:
    return transform if p >= 1 else v2.RandomApply([transform], p=p)


@AUGMENTATIONS.register(name="hflip")
def hflip(p: float = 0.5) -> v2.Transform:
    """Mirror left-right."""
    return v2.RandomHorizontalFlip(p)


@AUGMENTATIONS.register(name="vflip")
def vflip(p: float = 0.5) -> v2.Transform:
    """Mirror top-bottom."""
    return v2.RandomVerticalFlip(p)


@AUGMENTATIONS.register(name="rot90")
def rot90(p: float = 0.5) -> v2.Transform:
    """Quarter turns: smears have no up, so all eight flip/turn combinations are real views."""
    return RandomRot90(p)


@AUGMENTATIONS.register(name="scale_jitter")
def scale_jitter(scale_range: Sequence[float] = (0.8, 1.25), fill: int = 0, p: float = 0.5) -> v2.Transform:
    """Zoom by a random factor in ``scale_range`` about the centre, keeping the canvas size
    (zooming out pads with ``fill``). Cells change size relative to the canvas, which survives the
    model's own resize of every input to its fixed size; resizing the canvas would not."""
    return _maybe(v2.RandomAffine(degrees=0, scale=tuple(scale_range), fill=fill,
                                  interpolation=v2.InterpolationMode.BILINEAR), p)


@AUGMENTATIONS.register(name="color_jitter")
def color_jitter(brightness: float = 0.15, contrast: float = 0.15, saturation: float = 0.0,
                 hue: float = 0.0, p: float = 0.8) -> v2.Transform:
    """Brightness/contrast (and optionally saturation/hue) changes: stain and lamp differences
    between slides. Photometric only; boxes and masks are untouched."""
    return _maybe(v2.ColorJitter(brightness, contrast, saturation, hue), p)


@AUGMENTATIONS.register(name="blur")
def blur(kernel_size: int = 5, sigma: Sequence[float] = (0.1, 1.5), p: float = 0.3) -> v2.Transform:
    """Gaussian blur with a random sigma in ``sigma``: focus differences between scanners."""
    return _maybe(v2.GaussianBlur(kernel_size, tuple(sigma)), p)


def build_augmentation(config: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> v2.Compose | None:
    """A v2 pipeline from a list of ``{name: ..., params}`` or a ``conf/augment`` node holding it
    under ``transforms``; None when the list is empty."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        config = config.get("transforms")
    transforms = [AUGMENTATIONS.build(spec) for spec in config or []]
    return v2.Compose(transforms) if transforms else None
