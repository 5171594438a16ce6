"""Red-cell size classes from each cell's area, for RBC data annotated without size labels.

The rule (``SizeRule``), applied to every outlined or boxed cell after the class map:

- area: a polygon's shoelace area; a box's inscribed ellipse, pi/4 * w * h, because red cells are
  round and a box around a disc is 4/pi larger than it, so one set of thresholds fits boxes and masks;
- ``by: area_px`` compares that area in the source image's pixels (before ``prepare.scale``);
  ``by: area_um2`` first multiplies it by the pixel size squared: the rule's ``um_per_px``, else
  the one its source states (``um_per_px`` on a ``prepare.sources`` entry; both given must agree);
- ``small`` when area < ``small_below``, ``large`` when area > ``large_above``, else ``normal``
  (an area equal to a threshold is normal);
- ``edge``: a cell whose extent reaches within ``EDGE_MARGIN_PX`` of the image border is cut off, so
  its area says nothing about its size: it gets this class (e.g. ``undefined``), or, with
  ``edge: null``, is measured like the others.

Count-only points have no area: preparing them with a size rule is an error (use their labels).
Labels from the annotations stay the other route: leave ``size_classes`` null and map the labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from leukodet.data.records import BOX, POINT, ImageRecord, Region
from leukodet.data.via import polygon_area

EDGE_MARGIN_PX = 1.0
SMALL, NORMAL, LARGE = "small", "normal", "large"
UNITS = ("area_px", "area_um2")


@dataclass(frozen=True)
class SizeRule:
    """See the module doc; ``from_config`` checks a ``prepare.size_classes`` mapping."""

    small_below: float
    large_above: float
    by: str = "area_px"
    um_per_px: float | None = None
    edge: str | None = "undefined"

    def __post_init__(self):
        where = "prepare.size_classes"
        if self.by not in UNITS:
            raise ValueError(f"{where}.by={self.by!r}: choose one of {', '.join(UNITS)}")
        if self.um_per_px is not None and not self.um_per_px > 0:
            raise ValueError(f"{where}.um_per_px={self.um_per_px}: the pixel size in micrometres must be > 0")
        if self.by == "area_px" and self.um_per_px is not None:
            raise ValueError(f"{where}.um_per_px is set but by=area_px ignores it: use by=area_um2 or drop it")
        if not 0 < self.small_below <= self.large_above:
            raise ValueError(f"{where}: need 0 < small_below ({self.small_below}) <= large_above ({self.large_above})")

    @classmethod
    def from_config(cls, node: Mapping | None) -> "SizeRule | None":
        if not node:
            return None
        known = {"small_below", "large_above", "by", "um_per_px", "edge"}
        unknown = set(node) - known
        if unknown:
            raise ValueError(f"prepare.size_classes: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = {"small_below", "large_above"} - set(node)
        if missing:
            raise ValueError(f"prepare.size_classes needs {sorted(missing)} (areas in the unit of 'by')")
        return cls(**node)

    @property
    def classes(self) -> list[str]:
        return [LARGE, NORMAL, SMALL] + ([self.edge] if self.edge else [])

    def area(self, region: Region, um_per_px: float | None = None) -> float:
        """The cell's area in the rule's unit (see the module doc); ``um_per_px``: its source's pixel
        size, for a rule in um² that states none."""
        if region.kind == BOX:
            _, _, w, h = region.bbox_xywh()
            pixels = math.pi / 4 * w * h
        else:
            pixels = polygon_area(region.points)
        if self.by == "area_px":
            return pixels
        pixel_size = self.um_per_px or um_per_px
        if not pixel_size:
            raise ValueError("prepare.size_classes.by=area_um2 needs the pixel size in micrometres: "
                             "prepare.size_classes.um_per_px, or um_per_px on each source")
        return pixels * pixel_size ** 2

    def classify(self, area: float) -> str:
        if area < self.small_below:
            return SMALL
        return LARGE if area > self.large_above else NORMAL

    def label(self, region: Region, width: int, height: int, um_per_px: float | None = None) -> str:
        if self.edge:
            x, y, w, h = region.bbox_xywh()
            if min(x, y, width - (x + w), height - (y + h)) < EDGE_MARGIN_PX:
                return self.edge
        return self.classify(self.area(region, um_per_px))


def assign_size_classes(records: Sequence[ImageRecord], rule: SizeRule) -> list[ImageRecord]:
    """Every region relabelled by ``rule`` (the records are copied, not changed)."""
    out = []
    for record in records:
        points = sum(r.kind == POINT for r in record.regions)
        if points:
            raise ValueError(f"{record.file_name}: {points} count-only point(s) have no area for "
                             "prepare.size_classes; take their size class from the labels instead")
        stated = record.um_per_px
        if rule.by == "area_um2" and rule.um_per_px and stated and not math.isclose(rule.um_per_px, stated):
            raise ValueError(f"{record.file_name}: prepare.size_classes.um_per_px={rule.um_per_px:g} but its source "
                             f"states um_per_px={stated:g}; keep one")
        try:
            regions = [replace(r, label=rule.label(r, record.width, record.height, stated)) for r in record.regions]
        except ValueError as err:
            raise ValueError(f"{record.file_name}: {err}") from None
        out.append(replace(record, regions=regions))
    return out
