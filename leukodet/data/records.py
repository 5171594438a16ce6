"""Plain records that flow from the annotation readers to the COCO writer and the catalog.

Detectron2-format dataset dicts (what the catalog serves and the mapper reads) are plain dicts:

    {"file_name": str (absolute path), "image_id": int, "height": int, "width": int,
     "box_only": bool,                      # the split has boxes only: train/score boxes
     "annotations": [{"bbox": [x, y, w, h], "bbox_mode": BOX_MODE_XYWH_ABS,
                      "segmentation": [[x1, y1, x2, y2, ...]],   # absent when box-only
                      "category_id": int (0-based, contiguous), "iscrowd": 0}],
     "points": [{"xy": [x, y], "category_id": int}]}   # count-only annotations
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# detectron2.structures.BoxMode.XYWH_ABS; kept as an int so nothing here imports detectron2.
BOX_MODE_XYWH_ABS = 1

POLYGON, BOX, POINT = "polygon", "box", "point"


@dataclass
class Region:
    """One annotated shape. ``points`` is (N, 2) float x, y in image pixels.

    kind: ``polygon`` (outline, N >= 3), ``box`` (the 4 corners of an axis-aligned rect) or
    ``point`` (N == 1, count-only: never a training instance).
    """

    label: str
    kind: str
    points: np.ndarray

    def bbox_xywh(self) -> list[float]:
        x0, y0 = self.points.min(axis=0)
        x1, y1 = self.points.max(axis=0)
        return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


@dataclass
class ImageRecord:
    """One image with its regions. ``width``/``height`` come from the image file when read."""

    file_name: str
    regions: list[Region] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    source: str = ""  # the annotation file it came from, for reports
    group: str = ""  # patient/slide id from the group regex, for grouped splits
    um_per_px: float | None = None  # the pixel size in micrometres, where its source states it


@dataclass
class Skip:
    """A region or image left out, and why: every one is reported, nothing is dropped silently."""

    source: str
    file_name: str
    region: int | None  # region index in the source file, None for a whole image
    reason: str
    stage: str = "parse"
    detail: str = ""  # e.g. which image a duplicate repeats; kept out of ``reason`` so reasons group
