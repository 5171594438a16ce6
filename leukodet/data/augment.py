"""Training-time augmentations, registered in ``AUGMENTATIONS`` and built on torchvision.transforms.v2,
which moves tv_tensors ``BoundingBoxes`` and ``Mask`` together with the image.

Config (``conf/augment``): ``transforms: [{name: hflip, p: 0.5}, ...]``; a new augmentation is one
registered function returning a v2 transform plus a YAML entry.
"""

from __future__ import annotations

import math
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


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) and scikit-image's scaling
# of optical density (log(rgb) / log(1e-6): 0 white, 1 opaque), as in its rgb2hed / hed2rgb. Written
# here on the tensor so the jitter stays inside the v2 pipeline, without scikit-image as a
# dependency for two 3x3 products.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
LOG_ADJUST = math.log(1e-6)


class RandomHEDJitter(v2.Transform):
    """Stain augmentation of Tellez et al. (2018): in haematoxylin-eosin-DAB space each stain's
    amount is scaled by U(1 - sigma, 1 + sigma) and shifted by U(-bias, bias), with probability
    ``p``. It mimics another staining protocol rather than another camera (colour_jitter)."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.02, p: float = 0.8):
        super().__init__()
        self.sigma, self.bias, self.p = sigma, bias, p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return {"scale": None, "shift": None}
        return {"scale": 1 + (torch.rand(3) * 2 - 1) * self.sigma, "shift": (torch.rand(3) * 2 - 1) * self.bias}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["scale"] is None or not isinstance(inpt, tv_tensors.Image):
            return inpt  # boxes, masks and labels do not change colour
        pixels = inpt.as_subclass(torch.Tensor)
        rgb = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
        density = torch.log(rgb.clamp_min(1e-6)) / LOG_ADJUST
        # not clipped at zero as rgb2hed does: the three vectors span RGB, so unjittered pixels come back
        stains = torch.einsum("chw,cs->shw", density, HED_FROM_RGB)
        stains = stains * params["scale"][:, None, None] + params["shift"][:, None, None]
        rgb = torch.exp(torch.einsum("shw,sc->chw", stains, RGB_FROM_HED) * LOG_ADJUST).clamp(0, 1)
        out = (rgb * 255).round().to(torch.uint8) if pixels.dtype == torch.uint8 else rgb.to(pixels.dtype)
        return tv_tensors.wrap(out, like=inpt)


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


@AUGMENTATIONS.register(name="hed_jitter")
def hed_jitter(sigma: float = 0.05, bias: float = 0.02, p: float = 0.8) -> v2.Transform:
    """Haematoxylin/eosin amounts scaled and shifted (:class:`RandomHEDJitter`): another stain."""
    return RandomHEDJitter(sigma, bias, p)


@AUGMENTATIONS.register(name="sharpen")
def sharpen(factor: float = 2.0, p: float = 0.3) -> v2.Transform:
    """Unsharp the image by ``factor``: a sharper scanner than the training one (blur's converse)."""
    return v2.RandomAdjustSharpness(factor, p)


def build_augmentation(config: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> v2.Compose | None:
    """A v2 pipeline from a list of ``{name: ..., params}`` or a ``conf/augment`` node holding it
    under ``transforms``; None when the list is empty."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        config = config.get("transforms")
    transforms = [AUGMENTATIONS.build(spec) for spec in config or []]
    return v2.Compose(transforms) if transforms else None
