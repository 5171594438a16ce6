"""A dataset's scale: how large its cells are in pixels and, where a source states its pixel size
(``um_per_px`` on a ``prepare.sources`` entry), in micrometres.

``tools/prepare.py`` writes ``scale.json`` beside the splits (``scale_summary`` of each split, per
source), training records the scale its model saw (``leukodet.engine.tiling.TrainedScale``), and
inference brings another microscope's images to it (``infer.um_per_px`` / ``infer.cell_diameter_px``,
or the pixel size a TIFF or slide file states).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# Pixel sizes a light microscope's image can have (x100 oil objective on a camera, ~0.05 um/px, up
# to a x5 overview, ~2 um/px). A file stating a size outside it carries a placeholder, not a
# measurement: TIFF writers put 72 dpi (353 um/px) in by default.
PLAUSIBLE_UM_PER_PX = (0.02, 5.0)
# What a file's own metadata may state: up to a x10 objective's ~1 um/px. Larger values in a camera
# frame's tags are often the sensor's pixel pitch (1.4-6.5 um) with no objective applied.
FILE_STATED_UM_PER_PX = (0.02, 1.0)


def cell_diameter(annotation: Mapping) -> float:
    """A cell's diameter in its image's pixels from its box: sqrt(w * h), the diameter of the disc
    as large as the box's inscribed ellipse (a cell's outline is near one), the same for box-only
    and polygon data."""
    _, _, w, h = annotation["bbox"]
    return math.sqrt(max(w, 0) * max(h, 0))


def check_um_per_px(value, where: str) -> float | None:
    """``value`` as a pixel size in micrometres (None stays None); ValueError naming ``where``
    when it is not a number in the plausible range."""
    if value is None:
        return None
    try:
        um = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: um_per_px={value!r} is not a number (the pixel size in micrometres)") from None
    low, high = PLAUSIBLE_UM_PER_PX
    if not low <= um <= high:
        raise ValueError(f"{where}: um_per_px={um:g} is outside {low:g}-{high:g} um a pixel, the range of "
                         "light-microscope images; give the pixel size in micrometres")
    return um


def scale_summary(records: Sequence[Mapping]) -> dict[str, dict]:
    """Per source of these dataset dicts: images, annotated cells, the cells' median diameter in
    file pixels (``cell_px``), the source's pixel size (``um_per_px``, None where not stated) and
    the median diameter in micrometres (``cell_um``, where it is)."""
    diameters: dict[str, list[float]] = {}
    images: dict[str, int] = {}
    pixel_size: dict[str, float | None] = {}
    for record in records:
        source = record.get("source", "")
        images[source] = images.get(source, 0) + 1
        pixel_size.setdefault(source, record.get("um_per_px"))
        diameters.setdefault(source, []).extend(d for d in map(cell_diameter, record.get("annotations", [])) if d > 0)
    summary = {}
    for source in sorted(images):
        found, um = diameters[source], pixel_size[source]
        cell_px = round(float(np.median(found)), 2) if found else None
        summary[source] = {"images": images[source], "cells": len(found), "cell_px": cell_px, "um_per_px": um,
                           "cell_um": None if cell_px is None or um is None else round(cell_px * um, 3)}
    return summary
