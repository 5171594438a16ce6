"""Deterministic synthetic blood smears with VIA 2.x annotations: the project's own sample data.

Images look like a Wright/Giemsa smear: a pale pink background with an illumination gradient,
red cells (pink discs with a paler central pallor, some touching or overlapping) and white cells
with purple nuclei. ``kind="wbc"`` annotates the white cells by type (lymphoblast: large cell,
large round nucleus, thin pale-blue rim; neutrophil: lobed nucleus in granular cytoplasm;
lymphocyte: small cell, small dense nucleus; monocyte: kidney-shaped nucleus). ``kind="rbc"``
annotates every red cell by size class (large / normal / small) and draws no white cells.
Cells are darker than the background in the green channel, as in real smears, so the green
threshold of the "segmented" preprocessing separates them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

WBC_CLASS_MAP = {"lymphoblast": "lymphoblast", "neutrophil": "non_lymphoblast",
                 "lymphocyte": "non_lymphoblast", "monocyte": "non_lymphoblast"}
WBC_TYPES = ("lymphoblast", "neutrophil", "lymphocyte", "monocyte")
WBC_TYPE_WEIGHTS = (0.45, 0.25, 0.15, 0.15)

IMAGES_PER_PATIENT = 4

# RGB colours of a Giemsa stain
BACKGROUND = np.array([236, 222, 226], float)
RBC_RIM = np.array([214, 128, 140], float)
RBC_PALLOR = np.array([224, 152, 164], float)
CYTOPLASM = {"lymphoblast": (160, 160, 215), "neutrophil": (205, 168, 200),
             "lymphocyte": (150, 158, 212), "monocyte": (178, 164, 208)}
NUCLEUS = {"lymphoblast": (112, 70, 160), "neutrophil": (92, 40, 130),
           "lymphocyte": (70, 30, 110), "monocyte": (110, 70, 150)}


@dataclass
class SyntheticImage:
    """Ground truth of one generated image: raw labels, visible instance masks, all-cell foreground."""

    file_name: str
    labels: list[str]
    masks: list[np.ndarray]
    foreground: np.ndarray


def _disc(shape, center, radii, angle) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, (round(center[0]), round(center[1])), (round(radii[0]), round(radii[1])), angle, 0, 360, 1, -1)
    return mask.astype(bool)


def _paint(image: np.ndarray, mask: np.ndarray, color, rng, noise: float = 4.0) -> None:
    image[mask] = np.asarray(color, float) + rng.normal(0, noise, (int(mask.sum()), 3))


def _nucleus(shape, kind: str, center, radius: float, rng) -> np.ndarray:
    """The nucleus mask of a white cell of ``kind`` whose cell radius is ``radius``."""
    cx, cy = center
    if kind == "lymphoblast":  # large, round, high N:C
        return _disc(shape, center, (radius * 0.78, radius * 0.74), rng.uniform(0, 180))
    if kind == "lymphocyte":  # small dense round nucleus filling most of a small cell
        return _disc(shape, (cx + radius * 0.1, cy), (radius * 0.72, radius * 0.7), 0)
    if kind == "monocyte":  # kidney: a disc with a bite taken out
        angle = rng.uniform(0, 2 * np.pi)
        bite = (cx + np.cos(angle) * radius * 0.55, cy + np.sin(angle) * radius * 0.55)
        return _disc(shape, center, (radius * 0.62, radius * 0.55), np.degrees(angle)) & \
            ~_disc(shape, bite, (radius * 0.32, radius * 0.32), 0)
    lobes = np.zeros(shape, bool)  # neutrophil: 3-4 lobes on an arc
    n_lobes, start = rng.integers(3, 5), rng.uniform(0, 2 * np.pi)
    for i in range(n_lobes):
        a = start + i * 1.25
        lobes |= _disc(shape, (cx + np.cos(a) * radius * 0.42, cy + np.sin(a) * radius * 0.42),
                       (radius * 0.27, radius * 0.23), np.degrees(a))
    return lobes


def _place(rng, taken: list, radius: float, width: int, height: int, min_gap: float, tries=200):
    """A centre at least ``min_gap`` x (r1 + r2) from every centre in ``taken`` (None if no room)."""
    for _ in range(tries):
        c = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
        if all(np.hypot(c[0] - x, c[1] - y) >= min_gap * (radius + r) for x, y, r in taken):
            return c
    return None


def render_smear(rng: np.random.Generator, width: int, height: int, kind: str):
    """One smear: (RGB uint8 image, raw labels, visible instance masks, foreground mask)."""
    shape = (height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = 1 + 0.05 * ((xx / width - 0.5) * rng.uniform(-1, 1) + (yy / height - 0.5) * rng.uniform(-1, 1))
    image = BACKGROUND * gradient[..., None] + rng.normal(0, 3, (height, width, 3))
    foreground = np.zeros(shape, bool)
    labels, masks = [], []
    scale = min(width, height) / 384
    normal_r = 16 * scale

    # White cells first (positions), so red cells can be placed around them.
    wbcs = []
    if kind == "wbc":
        for _ in range(rng.integers(1, 5)):
            wtype = rng.choice(WBC_TYPES, p=WBC_TYPE_WEIGHTS)
            radius = normal_r * {"lymphoblast": 1.9, "neutrophil": 1.7, "lymphocyte": 1.15, "monocyte": 2.0}[wtype]
            radius *= rng.uniform(0.92, 1.08)
            center = _place(rng, [w[:3] for w in wbcs], radius, width, height, 1.1)
            if center is not None:
                wbcs.append((center[0], center[1], radius, wtype))

    # Red cells: mostly separate, some pairs touching or overlapping.
    rbcs: list[tuple] = []
    target = int(rng.integers(18, 30) * (width * height) / (512 * 384))
    taken = [(x, y, r) for x, y, r, _ in wbcs]
    while len(rbcs) < target:
        size = rng.choice(["normal", "large", "small"], p=[0.7, 0.15, 0.15]) if kind == "rbc" else "normal"
        radius = normal_r * {"normal": 1.0, "large": 1.3, "small": 0.72}[size] * rng.uniform(0.95, 1.05)
        if rbcs and rng.random() < 0.25:  # a touching or slightly overlapping neighbour
            x, y, r, _ = rbcs[rng.integers(len(rbcs))]
            a = rng.uniform(0, 2 * np.pi)
            d = (r + radius) * rng.uniform(0.85, 1.0)
            center = (x + np.cos(a) * d, y + np.sin(a) * d)
            inside = radius <= center[0] <= width - radius and radius <= center[1] <= height - radius
            clear = all(np.hypot(center[0] - tx, center[1] - ty) >= 0.85 * (radius + tr) for tx, ty, tr in taken)
            if not (inside and clear):
                continue
        else:
            center = _place(rng, taken, radius, width, height, 1.08)
            if center is None:
                break
        rbcs.append((center[0], center[1], radius, size))
        taken.append((center[0], center[1], radius))

    rbc_masks = []
    for x, y, r, size in rbcs:  # later cells are drawn on top of earlier ones
        radii = (r * rng.uniform(0.92, 1.0), r * rng.uniform(0.92, 1.0))
        angle = rng.uniform(0, 180)
        cell = _disc(shape, (x, y), radii, angle)
        _paint(image, cell, RBC_RIM * rng.uniform(0.97, 1.03), rng)
        _paint(image, _disc(shape, (x, y), (radii[0] * 0.45, radii[1] * 0.45), angle), RBC_PALLOR, rng)
        for previous in rbc_masks:
            previous &= ~cell
        rbc_masks.append(cell)
        foreground |= cell

    for x, y, r, wtype in wbcs:
        cell = _disc(shape, (x, y), (r, r * rng.uniform(0.92, 1.0)), rng.uniform(0, 180))
        _paint(image, cell, CYTOPLASM[wtype], rng, noise=8.0 if wtype == "neutrophil" else 4.0)
        nucleus = _nucleus(shape, wtype, (x, y), r, rng) & cell
        _paint(image, nucleus, NUCLEUS[wtype], rng, noise=10.0)
        for previous in rbc_masks:
            previous &= ~cell
        foreground |= cell
        labels.append(str(wtype))
        masks.append(cell)

    if kind == "rbc":
        labels = [size for _, _, _, size in rbcs]
        masks = rbc_masks
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (0, 0), 0.8)
    keep = [i for i, m in enumerate(masks) if m.sum() >= 20]  # fully hidden cells are not annotated
    return image, [labels[i] for i in keep], [masks[i] for i in keep], foreground


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Integer outline (N, 2) of a mask's largest part, as a person would click it in VIA."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 0.7, True).reshape(-1, 2)
    return contour if len(contour) >= 3 else None


def generate_smears(out_dir: str | os.PathLike, n_images: int = 40, width: int = 512, height: int = 384,
                    seed: int = 0, kind: str = "wbc") -> list[SyntheticImage]:
    """Write ``n_images`` smears to ``out_dir/images`` and ``out_dir/via_region_data.json`` (the
    VIA 2.x annotation export format, region attribute ``cell_type``). Same seed, same bytes."""
    if kind not in ("wbc", "rbc"):
        raise ValueError(f"kind must be 'wbc' or 'rbc', got {kind!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    via, truth = {}, []
    for index in range(n_images):
        image, labels, masks, foreground = render_smear(rng, width, height, kind)
        name = f"patient{index // IMAGES_PER_PATIENT:02d}_img{index:03d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        data = encoded.tobytes()
        (out_dir / "images" / name).write_bytes(data)
        regions = []
        for label, mask in zip(labels, masks):
            outline = mask_polygon(mask)
            if outline is not None:
                regions.append({"shape_attributes": {"name": "polygon", "all_points_x": outline[:, 0].tolist(),
                                                     "all_points_y": outline[:, 1].tolist()},
                                "region_attributes": {"cell_type": label}})
        via[f"{name}{len(data)}"] = {"filename": name, "size": len(data), "regions": regions, "file_attributes": {}}
        truth.append(SyntheticImage(str(out_dir / "images" / name), labels, masks, foreground))
    (out_dir / "via_region_data.json").write_text(json.dumps(via))
    return truth


def ensure_sample(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Generate the sample into ``out_dir`` unless its ``via_region_data.json`` already exists."""
    out_dir = Path(out_dir)
    if not (out_dir / "via_region_data.json").is_file():
        print(f"generating sample smears into {out_dir} ...")
        generate_smears(out_dir, **kwargs)
    return out_dir
