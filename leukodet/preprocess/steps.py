"""Registered preprocessing steps (OpenCV). Each is ``step(state, **params) -> state``.

A :class:`PreprocessState` passes through the steps: the current image, the image before any
photometric step (``raw``: what the seed cuts the cells out of), the foreground mask once a
threshold step ran, and the transform from file pixels to current pixels. A step registered with
``changes_geometry=True`` must update that transform; the mapper moves polygons, boxes and points
with it, so a new geometric step needs no change anywhere else. The chain checks that the other
steps keep the image size.

New step: decorate a function with ``@step("name")`` and add ``{name: ..., params}`` to a
``conf/preprocess`` file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

from leukodet.registry import PREPROCESS


@dataclass
class PreprocessState:
    """What flows through a chain. Images are RGB uint8 HxWx3; coordinates are continuous
    (pixel corners on integers, as in COCO and VIA)."""

    image: np.ndarray
    raw: np.ndarray
    orig_size: tuple[int, int]  # (width, height) of the file
    # 3x3 homogeneous transform, file pixels -> current pixels.
    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))
    foreground: np.ndarray | None = None  # bool HxW, set by a threshold step

    @classmethod
    def start(cls, image: np.ndarray, orig_size: tuple[int, int] | None = None) -> PreprocessState:
        """State for ``image`` decoded from a file of ``orig_size`` (smaller for a reduced decode)."""
        width, height = orig_size or (image.shape[1], image.shape[0])
        matrix = np.diag([image.shape[1] / width, image.shape[0] / height, 1.0])
        return cls(image=image, raw=image, orig_size=(width, height), matrix=matrix)

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy) from file pixels to current pixels."""
        return float(self.matrix[0, 0]), float(self.matrix[1, 1])

    def transform_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) x, y in file pixels -> current pixels."""
        points = np.asarray(points, np.float64).reshape(-1, 2)
        return points @ self.matrix[:2, :2].T + self.matrix[:2, 2]


def step(name: str, changes_geometry: bool = False):
    """Register a step function under ``name`` and declare whether it moves pixels."""

    def register(fn):
        fn.changes_geometry = changes_geometry
        return PREPROCESS.register(fn, name=name)

    return register


def target_size(orig_size: tuple[int, int], factor: float | None = None, max_size: int | None = None,
                size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Output (width, height): ``round(W * factor) x round(H * factor)``, the longest side at
    ``max_size`` (aspect kept), or exactly ``size`` = (width, height)."""
    if sum(p is not None for p in (factor, max_size, size)) != 1:
        raise ValueError("scale needs exactly one of 'factor', 'max_size' or 'size'")
    if size is not None:
        width, height = (int(s) for s in size)
    else:
        f = factor if factor is not None else max_size / max(orig_size)
        if f <= 0:
            raise ValueError(f"scale factor must be positive, got {f}")
        width, height = round(orig_size[0] * f), round(orig_size[1] * f)
    return max(1, width), max(1, height)


def jpeg_reduction(orig_size: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest libjpeg decode reduction (1, 2, 4 or 8) whose output, ``ceil(W / r) x
    ceil(H / r)``, is still at least ``target``, so only downscaling remains after it."""
    fits = [r for r in (2, 4, 8) if all(math.ceil(o / r) >= t for o, t in zip(orig_size, target))]
    return max(fits, default=1)


@step("scale", changes_geometry=True)
def scale(state: PreprocessState, factor: float | None = None, max_size: int | None = None,
          size: tuple[int, int] | None = None) -> PreprocessState:
    """Resize to a size computed from the *file* size (see :func:`target_size`), so the output
    size is the same whether or not the chain decoded a JPEG at reduced size first (it does when
    this is the first step). INTER_AREA when shrinking: it averages, so no aliasing."""
    width, height = target_size(state.orig_size, factor, max_size, size)
    current_h, current_w = state.image.shape[:2]
    if (width, height) != (current_w, current_h):
        shrinking = width * height < current_w * current_h
        state.image = cv2.resize(state.image, (width, height),
                                 interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        if state.foreground is not None:
            state.foreground = cv2.resize(state.foreground.view(np.uint8), (width, height),
                                          interpolation=cv2.INTER_NEAREST).view(bool)
        state.matrix = np.diag([width / current_w, height / current_h, 1.0]) @ state.matrix
    state.raw = state.image
    return state


@step("white_balance")
def white_balance(state: PreprocessState, percentile: float = 95.0) -> PreprocessState:
    """Scale each channel so that its ``percentile`` becomes white. In a smear the brightest
    pixels are the empty background (while cells cover less than ``100 - percentile`` % of the
    field), so this removes the lamp and camera colour cast that differs between acquisitions
    (segmentation_wbc's dataset1 is yellow, dataset2 pink). It corrects the acquisition, not a
    filter, so ``raw`` (what ``mask_and`` cuts out) is the balanced image too. Written here: a
    white patch on a robust percentile is two lines of numpy, and OpenCV's white balance is only in
    its contrib build."""
    white = np.percentile(state.image.reshape(-1, 3), percentile, axis=0)
    gain = 255.0 / np.maximum(white, 1.0)
    state.image = np.clip(state.image * gain, 0, 255).astype(np.uint8)
    state.raw = state.image
    return state


STAIN_METHODS = ("reinhard", "macenko")


def stain_normalizer(method: str, reference: dict | None = None):
    """torchstain's numpy normalizer for ``method``, set to ``reference`` (``fit_stain_reference``'s
    output) when given."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    if method not in STAIN_METHODS:
        raise ValueError(f"stain normalization method {method!r}: use {' or '.join(STAIN_METHODS)}")
    normalizer = NumpyReinhardNormalizer() if method == "reinhard" else NumpyMacenkoNormalizer()
    if reference and method == "reinhard":
        normalizer.target_means, normalizer.target_stds = (np.asarray(reference[k], np.float64)
                                                           for k in ("means", "stds"))
    elif reference:
        normalizer.HERef = np.asarray(reference["stain_matrix"], np.float64)
        normalizer.maxCRef = np.asarray(reference["max_concentrations"], np.float64)
    return normalizer


def fit_stain_reference(images: list[np.ndarray], method: str) -> dict:
    """The reference of a set of RGB images (an acquisition's training images): Reinhard, the mean
    over images of each LAB channel's mean and spread (the typical image, as every image is mapped
    onto it alone); Macenko, the stain vectors and 99th-percentile concentrations of all their
    pixels together."""
    normalizer = stain_normalizer(method)
    if method == "reinhard":
        fitted = []
        for image in images:
            normalizer.fit(image)
            fitted.append((normalizer.target_means, normalizer.target_stds))
        means, stds = np.mean(fitted, axis=0)
        return {"means": means.tolist(), "stds": stds.tolist()}
    normalizer.fit(np.concatenate([image.reshape(-1, 1, 3) for image in images]))
    return {"stain_matrix": normalizer.HERef.tolist(), "max_concentrations": normalizer.maxCRef.tolist()}


@step("stain_normalize")
def stain_normalize(state: PreprocessState, method: str = "reinhard", reference: dict | None = None) -> PreprocessState:
    """Map the image's colours onto a reference acquisition's (torchstain: ``reinhard``, each LAB
    channel's mean and spread; ``macenko``, the stain vectors in optical density), so a model
    trained on one scanner sees another's images in its own colours. ``reference`` is fitted on the
    training images (``tools/adapt.py`` does it and stores it in the adapted run's config). Like
    ``white_balance`` it corrects the acquisition, so ``raw`` is the normalized image too. An image
    without stained pixels (Macenko finds no stain plane) is left as it is."""
    if not reference:
        raise ValueError("stain_normalize needs a reference (fitted on the training images): use tools/adapt.py")
    normalizer = stain_normalizer(method, reference)
    try:  # on a stainless image torchstain divides by zero before it fails: its warnings say nothing more
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            state.image = (normalizer.normalize(state.image) if method == "reinhard"
                           else normalizer.normalize(state.image, stains=False)[0])
    except (np.linalg.LinAlgError, ValueError, IndexError):  # no stained pixel to estimate the stains from
        return state
    state.raw = state.image
    return state


@step("bilateral")
def bilateral(state: PreprocessState, diameter: int = 5, sigma_color: float = 75,
              sigma_space: float = 75) -> PreprocessState:
    """Edge-preserving smoothing: flattens stain noise but keeps cell borders sharp."""
    state.image = cv2.bilateralFilter(state.image, int(diameter), sigma_color, sigma_space)
    return state


@step("equalize")
def equalize(state: PreprocessState, mode: str = "luma", clip_limit: float = 2.0,
             tile_grid: int = 8) -> PreprocessState:
    """Histogram equalization: ``luma`` (global, on Y of YCrCb, so hues are kept),
    ``per_channel`` (global, each of R, G, B) or ``clahe`` (contrast-limited and local on Y:
    ``clip_limit``, ``tile_grid`` x ``tile_grid`` tiles)."""
    if mode == "per_channel":
        state.image = cv2.merge([cv2.equalizeHist(c) for c in cv2.split(state.image)])
        return state
    if mode not in ("luma", "clahe"):
        raise ValueError(f"equalize mode must be luma, per_channel or clahe, got {mode!r}")
    ycrcb = cv2.cvtColor(state.image, cv2.COLOR_RGB2YCrCb)
    if mode == "luma":
        ycrcb[..., 0] = cv2.equalizeHist(ycrcb[..., 0])
    else:
        clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(int(tile_grid), int(tile_grid)))
        ycrcb[..., 0] = clahe.apply(ycrcb[..., 0])
    state.image = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)
    return state


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not touch the border (a red cell's pale centre, a
    nucleus's light spots): flood the background from outside, the rest is foreground."""
    padded = np.pad(mask.astype(np.uint8), 1)
    outside = padded.copy()
    cv2.floodFill(outside, None, (0, 0), 1)
    return np.ascontiguousarray((padded | (1 - outside))[1:-1, 1:-1]).view(bool)


@step("green_threshold")
def green_threshold(state: PreprocessState, value: int | str = "otsu", open_size: int = 0,
                    close_size: int = 0, fill: bool = True) -> PreprocessState:
    """Foreground mask = green channel *below* ``value`` (inverse binary: stained cells absorb
    green light), or below Otsu's threshold with ``value: otsu``. Then an optional opening
    (``open_size`` px ellipse: removes specks), closing (``close_size``: bridges gaps) and hole
    filling. Sets ``state.foreground`` (bool HxW); the image is left as it is."""
    green = np.ascontiguousarray(state.image[..., 1])
    if value == "otsu":
        _, mask = cv2.threshold(green, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        # pixel > value -> 0, else 1: "below or at value" is foreground
        _, mask = cv2.threshold(green, float(value), 1, cv2.THRESH_BINARY_INV)
    else:
        raise ValueError(f"green_threshold value must be a number or 'otsu', got {value!r}")
    for size, op in ((open_size, cv2.MORPH_OPEN), (close_size, cv2.MORPH_CLOSE)):
        if size:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(size), int(size)))
            mask = cv2.morphologyEx(mask, op, kernel)
    state.foreground = fill_holes(mask) if fill else mask.astype(bool)
    return state


@step("mask_and")
def mask_and(state: PreprocessState, source: str = "raw", background: int | list[int] = 0) -> PreprocessState:
    """Cut the cells out: the foreground mask ANDed with ``source`` (``raw``: the scaled image
    before filters, as the seed does, so the model sees true colours; ``current``: the filtered
    image). Background pixels become ``background`` (a grey level or an [R, G, B] triple)."""
    if state.foreground is None:
        raise ValueError("mask_and needs a foreground mask: put green_threshold before it")
    if source not in ("raw", "current"):
        raise ValueError(f"mask_and source must be raw or current, got {source!r}")
    image = state.raw if source == "raw" else state.image
    out = np.empty_like(image)
    out[...] = np.asarray(background, np.uint8)
    state.image = cv2.copyTo(image, state.foreground.view(np.uint8), out)
    return state
