"""Registered preprocessing steps (OpenCV). Each is ``step(state, **params) -> state``.

The state carries the current image, the scaled image before any filter (``raw``: what the seed
cuts cells out of), the foreground mask once a threshold step ran, and the scale applied so far.
Only ``scale`` changes geometry (``changes_geometry = True``); the mapper moves annotations by
the state's accumulated scale, so geometric and photometric steps can be freely ordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from leukodet.registry import PREPROCESS


@dataclass
class PreprocessState:
    image: np.ndarray  # current RGB uint8 HxWx3
    raw: np.ndarray  # the (scaled) image before photometric steps
    orig_size: tuple[int, int]  # (width, height) of the file
    foreground: np.ndarray | None = None  # bool HxW, set by a threshold step

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy) from file pixels to current pixels."""
        return self.image.shape[1] / self.orig_size[0], self.image.shape[0] / self.orig_size[1]


def step(name: str, changes_geometry: bool = False):
    """Register a step function under ``name`` and mark whether it moves pixels."""

    def register(fn):
        fn.changes_geometry = changes_geometry
        return PREPROCESS.register(fn, name=name)

    return register


def target_size(orig_size: tuple[int, int], factor: float | None, max_size: int | None) -> tuple[int, int]:
    """Output (width, height) for a scale by ``factor`` or to a longest side of ``max_size``."""
    if (factor is None) == (max_size is None):
        raise ValueError("scale needs exactly one of 'factor' or 'max_size'")
    width, height = orig_size
    f = factor if factor is not None else max_size / max(width, height)
    if f <= 0:
        raise ValueError(f"scale factor must be positive, got {f}")
    return max(1, round(width * f)), max(1, round(height * f))


@step("scale", changes_geometry=True)
def scale(state: PreprocessState, factor: float | None = None, max_size: int | None = None) -> PreprocessState:
    """Resize to ``round(W * factor) x round(H * factor)`` of the *file* size (INTER_AREA when
    shrinking). The chain decodes JPEGs at a reduced size first when this is its first step, so
    this only resizes the remainder."""
    size = target_size(state.orig_size, factor, max_size)
    if size != (state.image.shape[1], state.image.shape[0]):
        shrinking = size[0] < state.image.shape[1]
        state.image = cv2.resize(state.image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    state.raw = state.image
    if state.foreground is not None:
        state.foreground = cv2.resize(state.foreground.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return state


@step("bilateral")
def bilateral(state: PreprocessState, diameter: int = 9, sigma_color: float = 75, sigma_space: float = 75):
    """Edge-preserving smoothing: flattens stain noise but keeps cell borders sharp."""
    state.image = cv2.bilateralFilter(state.image, diameter, sigma_color, sigma_space)
    return state


@step("equalize")
def equalize(state: PreprocessState, mode: str = "luma", clip_limit: float = 2.0, tile_grid: int = 8):
    """Histogram equalization: ``luma`` (global, on Y of YCrCb: colours keep their hue),
    ``per_channel`` (global, each of R, G, B), or ``clahe`` (contrast-limited, local, on Y)."""
    if mode == "per_channel":
        state.image = cv2.merge([cv2.equalizeHist(c) for c in cv2.split(state.image)])
        return state
    if mode not in ("luma", "clahe"):
        raise ValueError(f"equalize mode must be luma, per_channel or clahe, got {mode!r}")
    ycrcb = cv2.cvtColor(state.image, cv2.COLOR_RGB2YCrCb)
    if mode == "luma":
        ycrcb[..., 0] = cv2.equalizeHist(ycrcb[..., 0])
    else:
        clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
        ycrcb[..., 0] = clahe.apply(ycrcb[..., 0])
    state.image = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)
    return state


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not touch the border (e.g. a red cell's pale centre)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]


@step("green_threshold")
def green_threshold(state: PreprocessState, value: int | str = "otsu", open_size: int = 0,
                    close_size: int = 0, fill: bool = True) -> PreprocessState:
    """Foreground = pixels whose green is *below* ``value`` (inverse binary: stained cells absorb
    green), or below Otsu's threshold when ``value="otsu"``. Optional morphological opening
    (removes specks), closing (bridges gaps), and hole filling. The image is left as it is."""
    green = state.image[..., 1]
    if value == "otsu":
        _, mask = cv2.threshold(green, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, mask = cv2.threshold(green, int(value), 1, cv2.THRESH_BINARY_INV)
    for size, op in ((open_size, cv2.MORPH_OPEN), (close_size, cv2.MORPH_CLOSE)):
        if size:
            mask = cv2.morphologyEx(mask, op, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    state.foreground = fill_holes(mask) if fill else mask.astype(bool)
    return state


@step("mask_and")
def mask_and(state: PreprocessState, source: str = "raw", background: int = 0) -> PreprocessState:
    """Cut the cells out: the foreground mask ANDed with ``source`` (``raw``: the scaled image
    before filters, as the seed does; ``current``: the filtered one); the rest is ``background``."""
    if state.foreground is None:
        raise ValueError("mask_and needs a foreground mask: put green_threshold before it")
    if source not in ("raw", "current"):
        raise ValueError(f"mask_and source must be raw or current, got {source!r}")
    image = state.raw if source == "raw" else state.image
    mask = state.foreground.astype(np.uint8) * 255
    out = cv2.bitwise_and(image, image, mask=mask)
    if background:
        out[~state.foreground] = background
    state.image = out
    return state
