"""Deterministic synthetic blood smears with VIA 2.x annotations: the project's own sample data.

Images look like a Wright/Giemsa-stained monolayer: a pale pink background with an illumination
gradient, red cells (pink biconcave discs with a paler central pallor, some touching or
overlapping) and white cells with purple nuclei. ``kind="wbc"`` annotates the white cells by type
(lymphoblast: large cell, large round finely stippled nucleus, thin pale-blue rim; neutrophil:
3-4 lobed nucleus in pale granular cytoplasm; lymphocyte: small cell, small dense nucleus;
monocyte: kidney-shaped nucleus in grey-blue cytoplasm). ``kind="rbc"`` annotates every red cell
by size class (large / normal / small) and draws no white cells.

Stain is modelled as optical density (Beer-Lambert): a pixel is the lit background times
exp(-density), so overlapping red cells come out darker, as on a slide. Every cell absorbs green
more than the background does, and cells cover about half of each field (as in the thin part of a
real smear), so a global histogram equalization of the green channel followed by an Otsu
inverse-binary threshold, the "segmented" preprocessing, recovers the cell foreground.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukodet.data.via_export import mask_polygon
from leukodet.io import atomic_write_text

logger = logging.getLogger(__name__)

WBC_CLASS_MAP = {"lymphoblast": "lymphoblast", "neutrophil": "non_lymphoblast",
                 "lymphocyte": "non_lymphoblast", "monocyte": "non_lymphoblast"}
WBC_TYPES = tuple(WBC_CLASS_MAP)
WBC_TYPE_WEIGHTS = (0.45, 0.25, 0.15, 0.15)  # lymphoblasts ~45%: the two target classes balance
IMAGES_PER_PATIENT = 4

NORMAL_RBC_RADIUS = 16.0  # px in a 384 px high field; other sizes scale with the field
MIN_VISIBLE_AREA = 40  # px; a cell hidden or cut off more than this is not annotated
TOUCHING_SHARE = 0.35  # red cells placed against a neighbour (touching or overlapping it)

BACKGROUND_RGB = np.array([238.0, 226.0, 232.0])


def _density(rgb) -> np.ndarray:
    """The optical density that turns the lit background into ``rgb``."""
    return np.log(BACKGROUND_RGB / np.asarray(rgb, float))


RBC_DENSITY = _density((214, 112, 128))  # at full thickness (the rim)
RBC_SIZES = {"normal": (0.9, 1.1), "large": (1.22, 1.4), "small": (0.62, 0.8)}  # radius / normal radius
RBC_SIZE_WEIGHTS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class _WbcLook:
    radius: tuple[float, float]  # cell radius range, in normal red-cell radii
    cytoplasm: np.ndarray  # optical densities
    nucleus: np.ndarray
    chromatin: tuple[float, float]  # nucleus texture (blur sigma in px, amplitude): fine vs coarse
    granules: float  # cytoplasm texture amplitude


WBC_LOOKS = {
    "lymphoblast": _WbcLook((1.6, 2.0), _density((176, 182, 222)), _density((128, 80, 170)), (0.7, 0.12), 0.05),
    "neutrophil": _WbcLook((1.6, 1.85), _density((222, 190, 214)), _density((96, 50, 140)), (1.0, 0.2), 0.3),
    "lymphocyte": _WbcLook((1.05, 1.25), _density((160, 178, 226)), _density((80, 42, 122)), (1.6, 0.25), 0.05),
    "monocyte": _WbcLook((1.9, 2.3), _density((194, 186, 216)), _density((134, 92, 174)), (1.2, 0.2), 0.1),
}


@dataclass
class SyntheticImage:
    """Ground truth of one generated image.

    ``instances`` holds every annotated cell's visible part: pixel value k is ``labels[k - 1]``,
    0 is none (visible parts never overlap, so one array replaces a stack of full-size masks).
    ``foreground`` is every cell, red and white, annotated or not.
    """

    file_name: str
    labels: list[str]
    instances: np.ndarray
    foreground: np.ndarray

    @property
    def masks(self) -> list[np.ndarray]:
        """One bool HxW mask per label, in label order."""
        return [self.instances == k for k in range(1, len(self.labels) + 1)]


@dataclass
class _Cell:
    """A cell's outline, evaluated on the pixels of its window of the image."""

    label: str
    x: float
    y: float
    radius: float
    window: tuple[slice, slice]
    dx: np.ndarray  # window pixel offsets from the centre
    dy: np.ndarray
    rho: np.ndarray  # radial coordinate: < 1 inside, 1 on the outline

    @property
    def mask(self) -> np.ndarray:
        return self.rho <= 1


def _radial(dx, dy, radius: float, aspect: float = 1.0, angle: float = 0.0, wobble=()) -> np.ndarray:
    """Radial coordinate of offsets ``(dx, dy)`` for a rotated ellipse (semi-axes ``radius`` and
    ``radius * aspect``) whose outline is bent by ``wobble`` harmonics ``(k, amplitude, phase)``."""
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / radius
    v = (dy * c - dx * s) / (radius * aspect)
    if not wobble:
        return np.hypot(u, v)
    theta = np.arctan2(v, u)
    return np.hypot(u, v) / (1 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in wobble))


def _wobble(rng: np.random.Generator, amplitude: float) -> list[tuple[int, float, float]]:
    """Low harmonics that make an outline slightly irregular, as real cells are."""
    return [(k, rng.normal(0, amplitude / k), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]


def _make_cell(rng, label: str, x: float, y: float, radius: float, aspect: float, wobble: float,
               shape: tuple[int, int]) -> _Cell:
    reach = radius * 1.2 + 2
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, shape[0])
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, shape[1])
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(float)
    dx, dy = dx - x, dy - y
    rho = _radial(dx, dy, radius, aspect, rng.uniform(0, np.pi), _wobble(rng, wobble))
    return _Cell(label, x, y, radius, (slice(y0, y1), slice(x0, x1)), dx, dy, rho)


def _smoothstep(lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    t = np.clip((t - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def _texture(rng, shape, sigma: float) -> np.ndarray:
    """Smooth unit-variance noise: chromatin, granules."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _first_clear(candidates: np.ndarray, radius: float, taken: np.ndarray, gaps: np.ndarray):
    """The first candidate centre at least ``gap * (radius + r)`` from every taken ``(x, y, r)``."""
    if len(taken) == 0:
        return candidates[0]
    distance = np.hypot(candidates[:, None, 0] - taken[None, :, 0], candidates[:, None, 1] - taken[None, :, 1])
    clear = (distance >= gaps[None] * (radius + taken[None, :, 2])).all(axis=1)
    return candidates[np.argmax(clear)] if clear.any() else None


def _place_wbcs(rng, shape, normal_r: float) -> list[_Cell]:
    """1-4 white cells, wholly inside the field and apart from one another."""
    height, width = shape
    cells: list[_Cell] = []
    for _ in range(rng.integers(1, 5)):
        wtype = WBC_TYPES[rng.choice(len(WBC_TYPES), p=WBC_TYPE_WEIGHTS)]
        radius = normal_r * rng.uniform(*WBC_LOOKS[wtype].radius)
        margin = radius + 2
        candidates = rng.uniform((margin, margin), (width - margin, height - margin), (64, 2))
        taken = np.array([(c.x, c.y, c.radius) for c in cells]).reshape(-1, 3)
        centre = _first_clear(candidates, radius, taken, np.full(len(taken), 1.15))
        if centre is not None:
            cells.append(_make_cell(rng, wtype, *centre, radius, rng.uniform(0.9, 1.0), 0.03, shape))
    return cells


def _rbc_size(rng) -> tuple[str, float]:
    """A size class and a radius (in normal radii) drawn for it; the ranges do not overlap, so
    the label follows from the drawn radius."""
    size = tuple(RBC_SIZES)[rng.choice(len(RBC_SIZES), p=RBC_SIZE_WEIGHTS)]
    return size, rng.uniform(*RBC_SIZES[size])


def _place_rbcs(rng, shape, normal_r: float, wbcs: list[_Cell], foreground: np.ndarray, coverage: float):
    """Red cells until ``coverage`` of the field is cells; fills ``foreground`` as it goes.

    Free cells keep a little apart; a share is placed against an earlier red cell, touching or
    overlapping it by up to a fifth of their radii. Cells may be cut by the field's border.
    """
    height, width = shape
    taken = [(c.x, c.y, c.radius) for c in wbcs]
    cells: list[_Cell] = []
    covered, misses = int(foreground.sum()), 0
    while covered < coverage * height * width and misses < 20:
        size, ratio = _rbc_size(rng)
        radius = normal_r * ratio
        if cells and rng.random() < TOUCHING_SHARE:
            neighbour = cells[rng.integers(len(cells))]
            angle = rng.uniform(0, 2 * np.pi, 32)
            reach = (radius + neighbour.radius) * rng.uniform(0.8, 1.0, 32)
            candidates = np.stack([neighbour.x + np.cos(angle) * reach, neighbour.y + np.sin(angle) * reach], 1)
            candidates = candidates[(candidates >= 0).all(1) & (candidates < (width, height)).all(1)]
            rbc_gap = 0.8
        else:
            candidates = rng.uniform(-0.3 * radius, (width + 0.3 * radius, height + 0.3 * radius), (128, 2))
            rbc_gap = 0.95
        # red cells may slip a little under a white cell's edge, never far
        gaps = np.r_[np.full(len(wbcs), 0.9), np.full(len(cells), rbc_gap)]
        centre = _first_clear(candidates, radius, np.array(taken).reshape(-1, 3), gaps) if len(candidates) else None
        if centre is None:
            misses += 1
            continue
        cell = _make_cell(rng, size, *centre, radius, rng.uniform(0.9, 1.0), 0.02, shape)
        covered += int((cell.mask & ~foreground[cell.window]).sum())
        foreground[cell.window] |= cell.mask
        cells.append(cell)
        taken.append((cell.x, cell.y, cell.radius))
    return cells


def _rbc_thickness(cell: _Cell, rng) -> np.ndarray:
    """Biconcave profile: thin centre (the pallor), thick ring, a slightly denser edge."""
    pallor = rng.uniform(0.28, 0.4)
    thickness = pallor + (1 - pallor) * _smoothstep(rng.uniform(0.2, 0.35), rng.uniform(0.7, 0.8), cell.rho)
    thickness += 0.12 * np.exp(-(((cell.rho - 0.92) / 0.06) ** 2))
    return np.where(cell.mask, thickness * rng.uniform(0.9, 1.1), 0.0)


def _near_segment(dx, dy, a, b, width: float) -> np.ndarray:
    """Pixels within ``width`` of the segment a-b (a nuclear strand between two lobes)."""
    ab = np.subtract(b, a)
    t = np.clip(((dx - a[0]) * ab[0] + (dy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0, 1)
    return np.hypot(dx - a[0] - t * ab[0], dy - a[1] - t * ab[1]) <= width


def _nucleus(cell: _Cell, rng) -> np.ndarray:
    """The nucleus mask of a white cell, in its window."""
    r, dx, dy = cell.radius, cell.dx, cell.dy
    tilt = rng.uniform(0, 2 * np.pi)
    if cell.label in ("lymphoblast", "lymphocyte"):  # round, nearly filling the cell (high N:C)
        shift = r * (0.05 if cell.label == "lymphoblast" else 0.12)
        ox, oy = shift * np.cos(tilt), shift * np.sin(tilt)
        size = 0.8 if cell.label == "lymphoblast" else 0.78
        return _radial(dx - ox, dy - oy, r * size, rng.uniform(0.88, 1.0), tilt, _wobble(rng, 0.03)) <= 1
    if cell.label == "monocyte":  # kidney: an ellipse with a bite out of one long side
        nx, ny = -np.sin(tilt), np.cos(tilt)  # across the long axis
        body = _radial(dx + 0.1 * r * nx, dy + 0.1 * r * ny, r * 0.72, 0.72, tilt, _wobble(rng, 0.03)) <= 1
        return body & (_radial(dx - 0.5 * r * nx, dy - 0.5 * r * ny, r * 0.36) > 1)
    lobes = np.zeros(dx.shape, bool)  # neutrophil: 3-4 lobes on an arc, joined by thin strands
    n_lobes, step = int(rng.integers(3, 5)), rng.uniform(1.1, 1.4)
    centres = [(0.42 * r * np.cos(tilt + i * step), 0.42 * r * np.sin(tilt + i * step)) for i in range(n_lobes)]
    for i, (lx, ly) in enumerate(centres):
        lobes |= _radial(dx - lx, dy - ly, r * rng.uniform(0.26, 0.31), 0.75, tilt + i * step + np.pi / 2) <= 1
        if i:
            lobes |= _near_segment(dx, dy, centres[i - 1], (lx, ly), r * 0.06)
    return lobes


def _paint_wbc(density: np.ndarray, cell: _Cell, rng) -> None:
    """Replace the optical density under a white cell (drawn on top of any red cell)."""
    look = WBC_LOOKS[cell.label]
    inside = cell.mask
    nucleus = _nucleus(cell, rng) & inside
    sigma, amount = look.chromatin
    chromatin = np.clip(1 + amount * _texture(rng, inside.shape, sigma), 0.5, None)
    granules = np.clip(1 + look.granules * _texture(rng, inside.shape, 0.6), 0.5, None)
    if cell.label == "lymphoblast":  # one or two pale nucleoli
        for _ in range(rng.integers(1, 3)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4) * cell.radius
            nucleolus = _radial(cell.dx - d * np.cos(a), cell.dy - d * np.sin(a), cell.radius * 0.12) <= 1
            chromatin[nucleolus] *= 0.75
    if cell.label == "monocyte":  # a few small vacuoles
        for _ in range(rng.integers(0, 4)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.85) * cell.radius
            granules[_radial(cell.dx - d * np.cos(a), cell.dy - d * np.sin(a), cell.radius * 0.07) <= 1] *= 0.7
    shade = rng.uniform(0.92, 1.08)
    local = np.where(nucleus[..., None], look.nucleus * chromatin[..., None], look.cytoplasm * granules[..., None])
    density[cell.window][inside] = local[inside] * shade


def render_smear(rng: np.random.Generator, width: int, height: int, kind: str):
    """One smear: (RGB uint8 image, raw labels, instance map, foreground mask); see SyntheticImage."""
    shape = (height, width)
    normal_r = NORMAL_RBC_RADIUS * min(width, height) / 384
    foreground = np.zeros(shape, bool)
    wbcs = _place_wbcs(rng, shape, normal_r) if kind == "wbc" else []
    for cell in wbcs:
        foreground[cell.window] |= cell.mask
    # About half the field is cells, as in a smear's thin part. It matters: a globally equalized
    # histogram is flat, so Otsu then cuts near the median grey level, i.e. at half the pixels.
    rbcs = _place_rbcs(rng, shape, normal_r, wbcs, foreground, coverage=rng.uniform(0.48, 0.51))

    density = np.zeros((height, width, 3))
    instances = np.zeros(shape, np.int32)
    annotated = rbcs if kind == "rbc" else wbcs
    for cell in rbcs:  # densities add up where red cells overlap; the later cell is on top
        density[cell.window] += _rbc_thickness(cell, rng)[..., None] * RBC_DENSITY
    for cell in wbcs:
        _paint_wbc(density, cell, rng)
    for k, cell in enumerate(annotated, start=1):  # a later red cell hides the part it covers
        instances[cell.window][cell.mask] = k

    # Annotate what is visible enough; renumber the rest away.
    areas = np.bincount(instances.ravel(), minlength=len(annotated) + 1)[1:]
    keep = np.flatnonzero(areas >= MIN_VISIBLE_AREA)
    renumber = np.zeros(len(annotated) + 1, np.int32)
    renumber[keep + 1] = np.arange(1, len(keep) + 1)
    labels = [annotated[i].label for i in keep]

    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None] - 0.5
    illumination = 1 + rng.uniform(-0.06, 0.06) * xx + rng.uniform(-0.06, 0.06) * yy - 0.08 * (xx ** 2 + yy ** 2)
    stain = 1 + 0.015 * cv2.resize(rng.standard_normal((6, 8)), (width, height), interpolation=cv2.INTER_CUBIC)
    light = BACKGROUND_RGB * (illumination * stain)[..., None]
    image = light * np.exp(-density) + rng.normal(0, 2.0, density.shape)
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (0, 0), 0.8)  # optics: no crisp edges
    return image, labels, renumber[instances], foreground


def generate_smears(out_dir: str | os.PathLike, n_images: int = 40, width: int = 512, height: int = 384,
                    seed: int = 0, kind: str = "wbc") -> list[SyntheticImage]:
    """Write ``n_images`` smears to ``out_dir/images`` and their annotations to
    ``out_dir/via_region_data.json`` as VIA 2.x exports them (region attribute ``cell_type``).

    Same seed, same bytes. Image i depends only on (seed, i), so a larger sample extends a
    smaller one. Names are ``patientPP_imgIII.jpg``, 4 images per patient.
    """
    if kind not in ("wbc", "rbc"):
        raise ValueError(f"kind must be 'wbc' or 'rbc', got {kind!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    via, truth = {}, []
    for index in range(n_images):
        image, labels, instances, foreground = render_smear(np.random.default_rng([seed, index]), width, height, kind)
        name = f"patient{index // IMAGES_PER_PATIENT:02d}_img{index:03d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {name}")
        data = encoded.tobytes()
        (out_dir / "images" / name).write_bytes(data)
        regions = []
        for k, label in enumerate(labels, start=1):
            outline = mask_polygon(instances == k)
            regions.append({"shape_attributes": {"name": "polygon", "all_points_x": outline[:, 0].tolist(),
                                                 "all_points_y": outline[:, 1].tolist()},
                            "region_attributes": {"cell_type": label}})
        via[f"{name}{len(data)}"] = {"filename": name, "size": len(data), "regions": regions, "file_attributes": {}}
        truth.append(SyntheticImage(str(out_dir / "images" / name), labels, instances, foreground))
    # Written last and atomically: its presence means the sample is complete (see ensure_sample).
    atomic_write_text(out_dir / "via_region_data.json", json.dumps(via, separators=(",", ":")))  # as VIA's JS
    return truth


def ensure_sample(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Generate the sample into ``out_dir`` unless its ``via_region_data.json`` exists; returns
    ``out_dir``. ``kwargs`` go to :func:`generate_smears` (kind, n_images, seed, ...)."""
    out_dir = Path(out_dir)
    if not (out_dir / "via_region_data.json").is_file():
        logger.info("generating sample smears into %s", out_dir)
        generate_smears(out_dir, **kwargs)
    return out_dir
