"""Read VGG Image Annotator (VIA) annotations into :class:`ImageRecord` lists.

Accepted: VIA 1.x JSON (regions as a dict), VIA 2.x annotation exports (regions as a list),
VIA 2.x project files (``_via_img_metadata``) and VIA's CSV export. Shapes: polygon and polyline
(closed), rect, circle and ellipse (turned into polygons), point (count-only). VIA 3 projects are
recognised and refused with a clear message.

Nothing is dropped silently: every region or image left out is returned as a :class:`Skip` with
its file and reason. Errors in the file itself (not JSON, not VIA) raise :class:`AnnotationError`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukodet.data.imageio import ImageReadError, image_size
from leukodet.data.records import BOX, POINT, POLYGON, ImageRecord, Region, Skip
from leukodet.registry import DATASETS

# Vertices used for circles and ellipses: a 40 px radius cell is then off by < 0.3 px.
ELLIPSE_VERTICES = 64
# Points outside the image by up to this many pixels are clipped; further out is a skip.
OUTSIDE_TOLERANCE_PX = 3.0

CSV_HEADER = ["filename", "file_size", "file_attributes", "region_count", "region_id",
              "region_shape_attributes", "region_attributes"]


class AnnotationError(ValueError):
    """An annotation file that cannot be read at all; the message names the file."""


@dataclass
class LabelPolicy:
    """How a region's class is found: attribute key, raw -> target map, what to do if unmapped.

    ``class_map`` maps raw labels to target classes; a target of ``None`` drops that label on
    purpose (still reported). An empty map keeps raw labels as they are. ``unmapped`` is
    ``"error"`` (raise) or ``"skip"`` (report and leave the region out).
    """

    attribute: str = "class"
    class_map: Mapping[str, str | None] = field(default_factory=dict)
    unmapped: str = "error"

    def __post_init__(self):
        if self.unmapped not in ("error", "skip"):
            raise ValueError(f"unmapped must be 'error' or 'skip', got {self.unmapped!r}")

    def raw_label(self, attributes: Any) -> str:
        """The raw label in a region's attributes (text, dropdown, radio or checkbox dict)."""
        if not isinstance(attributes, Mapping):
            raise RegionProblem(f"region_attributes is {type(attributes).__name__}, not an object")
        value = attributes.get(self.attribute)
        if isinstance(value, Mapping):  # checkbox: {"option": true, ...}
            chosen = [k for k, on in value.items() if on]
            if len(chosen) != 1:
                raise RegionProblem(f"checkbox attribute {self.attribute!r} has {len(chosen)} options ticked")
            value = chosen[0]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RegionProblem(f"no label in region attribute {self.attribute!r}")
        if not isinstance(value, (str, int)):
            raise RegionProblem(f"label in {self.attribute!r} is {type(value).__name__}, not text")
        return str(value).strip()

    def target(self, raw: str, where: str) -> str | None:
        """The target class of ``raw``; None when the map drops it."""
        if not self.class_map:
            return raw
        if raw in self.class_map:
            return self.class_map[raw]
        if self.unmapped == "error":
            raise UnmappedLabelError(f"{where}: label {raw!r} is not in the class map "
                                  f"(known: {', '.join(sorted(self.class_map))}); add it to the map "
                                  f"or set unmapped=skip")
        raise RegionProblem(f"label {raw!r} not in the class map")


class UnmappedLabelError(AnnotationError):
    """A label missing from the class map while ``unmapped="error"``: a config problem, never skipped."""


class RegionProblem(ValueError):
    """A region that is skipped (reported), not a fatal error."""


@dataclass
class ParseResult:
    records: list[ImageRecord]
    skips: list[Skip]

    @property
    def box_only(self) -> bool:
        """True when every shape is a box: later stages train and score boxes, not fake masks."""
        kinds = {r.kind for rec in self.records for r in rec.regions if r.kind != POINT}
        return kinds == {BOX}

    def extend(self, other: "ParseResult") -> None:
        self.records.extend(other.records)
        self.skips.extend(other.skips)


# ---------------------------------------------------------------- shapes -> points


def _numbers(values: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RegionProblem(f"{what} are not numbers: {values!r:.60}") from None
    if not np.all(np.isfinite(array)):
        raise RegionProblem(f"{what} contain NaN or infinity")
    return array


def _ellipse(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> np.ndarray:
    if rx <= 0 or ry <= 0:
        raise RegionProblem(f"zero or negative radius ({rx:g}, {ry:g})")
    t = np.linspace(0, 2 * math.pi, ELLIPSE_VERTICES, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def shape_to_region(shape: Any, label: str) -> Region:
    """One VIA ``shape_attributes`` object as a Region (raises RegionProblem when unusable)."""
    if not isinstance(shape, Mapping):
        raise RegionProblem("shape_attributes is not an object")
    name = shape.get("name")
    try:
        if name in ("polygon", "polyline"):
            xs = _numbers(shape["all_points_x"], "all_points_x")
            ys = _numbers(shape["all_points_y"], "all_points_y")
            if len(xs) != len(ys):
                raise RegionProblem(f"{len(xs)} x values but {len(ys)} y values")
            return Region(label, POLYGON, np.stack([xs, ys], axis=1))
        if name == "rect":
            x, y, w, h = _numbers([shape["x"], shape["y"], shape["width"], shape["height"]], "rect")
            return Region(label, BOX, np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]]))
        if name == "circle":
            cx, cy, r = _numbers([shape["cx"], shape["cy"], shape["r"]], "circle")
            return Region(label, POLYGON, _ellipse(cx, cy, r, r))
        if name == "ellipse":
            cx, cy, rx, ry = _numbers([shape["cx"], shape["cy"], shape["rx"], shape["ry"]], "ellipse")
            theta = float(_numbers([shape.get("theta", 0.0)], "theta")[0])
            return Region(label, POLYGON, _ellipse(cx, cy, rx, ry, theta))
        if name == "point":
            cx, cy = _numbers([shape["cx"], shape["cy"]], "point")
            return Region(label, POINT, np.array([[cx, cy]]))
    except KeyError as missing:
        raise RegionProblem(f"{name} shape has no {missing} key") from None
    raise RegionProblem(f"unsupported shape {name!r}")


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon given as (N, 2) vertices."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def check_geometry(region: Region, width: int, height: int) -> Region:
    """Clip points slightly outside the image; refuse degenerate or far-outside shapes."""
    points = region.points
    low, high = -OUTSIDE_TOLERANCE_PX, np.array([width, height]) + OUTSIDE_TOLERANCE_PX
    if np.any(points < low) or np.any(points > high):
        raise RegionProblem(f"outside the {width}x{height} image by more than {OUTSIDE_TOLERANCE_PX:g} px")
    points = np.clip(points, 0, [width, height])
    if region.kind != POINT:
        if len(np.unique(points, axis=0)) < 3:
            raise RegionProblem("fewer than 3 distinct points")
        if polygon_area(points) <= 0:
            raise RegionProblem("zero area")
    return Region(region.label, region.kind, points)


# ---------------------------------------------------------------- files -> entries


def load_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise AnnotationError(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def via_entries(data: Any, path: Path) -> list[dict]:
    """The per-image entries of any VIA 1.x/2.x JSON flavour, as dicts with a list of regions."""
    if isinstance(data, Mapping) and {"project", "metadata", "file"} <= set(data):
        raise AnnotationError(f"{path}: this is a VIA 3 project, which is not supported; in VIA 3 use "
                              "'Export annotations (COCO format)' and read that file with format=coco")
    if isinstance(data, Mapping) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]  # VIA 2.x project file
    if not isinstance(data, Mapping) or not data:
        raise AnnotationError(f"{path}: not a VIA annotation file (expected an object of images, "
                              f"got {type(data).__name__ if data else 'an empty object'})")
    entries = []
    for key, entry in data.items():
        if not isinstance(entry, Mapping) or "filename" not in entry:
            raise AnnotationError(f"{path}: entry {key!r} is not a VIA image entry (no 'filename'); "
                                  "is this a VIA file?")
        regions = entry.get("regions", [])
        if isinstance(regions, Mapping):  # VIA 1.x keeps regions in a dict keyed "0", "1", ...
            regions = [regions[k] for k in sorted(regions, key=lambda k: int(k) if str(k).isdigit() else 0)]
        if not isinstance(regions, list):
            raise AnnotationError(f"{path}: entry {key!r} has 'regions' of type {type(regions).__name__}")
        entries.append({"filename": str(entry["filename"]), "regions": regions})
    return entries


def via_csv_entries(path: Path) -> list[dict]:
    """Entries from VIA's CSV export (one row per region; JSON-encoded attribute cells)."""
    by_file: dict[str, list] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"filename", "region_shape_attributes"} <= set(reader.fieldnames):
            raise AnnotationError(f"{path}: not a VIA CSV export (header should be {','.join(CSV_HEADER)})")
        for line, row in enumerate(reader, start=2):
            regions = by_file.setdefault(row["filename"], [])
            try:
                shape = json.loads(row["region_shape_attributes"] or "{}")
                attributes = json.loads(row.get("region_attributes") or "{}")
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}: line {line}: attribute cell is not JSON: {err.msg}") from None
            if shape:  # an image without regions has one row with '{}'
                regions.append({"shape_attributes": shape, "region_attributes": attributes})
    return [{"filename": name, "regions": regions} for name, regions in by_file.items()]


def _find_image(filename: str, image_dirs: list[Path]) -> Path | None:
    for folder in image_dirs:
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    return None


@DATASETS.register(name="via")
def read_via(path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
             labels: LabelPolicy | None = None) -> ParseResult:
    """Read a VIA JSON or CSV file. Images are looked up in ``image_dir``, else next to the file
    or in its ``images/`` folder; their real size is read from the image file."""
    path = Path(path)
    labels = labels or LabelPolicy()
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    entries = via_csv_entries(path) if path.suffix.lower() == ".csv" else via_entries(load_json(path), path)
    image_dirs = [Path(image_dir)] if image_dir else [path.parent, path.parent / "images"]
    result = ParseResult([], [])
    for entry in entries:
        result.extend(_read_entry(entry, path, image_dirs, labels))
    return result


def _read_entry(entry: dict, source: Path, image_dirs: list[Path], labels: LabelPolicy) -> ParseResult:
    filename = entry["filename"]
    image_path = _find_image(filename, image_dirs)
    if image_path is None:
        where = " or ".join(str(d) for d in image_dirs)
        return ParseResult([], [Skip(str(source), filename, None, f"image file missing (looked in {where})")])
    try:
        width, height = image_size(image_path)
    except ImageReadError as err:
        return ParseResult([], [Skip(str(source), str(image_path), None, f"image unreadable: {err}")])
    record = ImageRecord(str(image_path.resolve()), [], width, height, str(source))
    skips = []
    for index, raw_region in enumerate(entry["regions"]):
        try:
            region = _read_region(raw_region, labels, f"{source}: {filename} region {index}")
            if region is not None:
                record.regions.append(check_geometry(region, width, height))
            else:
                skips.append(Skip(str(source), record.file_name, index, "label dropped by the class map"))
        except RegionProblem as problem:
            skips.append(Skip(str(source), record.file_name, index, str(problem)))
    return ParseResult([record], skips)


def _read_region(raw: Any, labels: LabelPolicy, where: str) -> Region | None:
    if not isinstance(raw, Mapping):
        raise RegionProblem(f"region is {type(raw).__name__}, not an object")
    raw_label = labels.raw_label(raw.get("region_attributes", {}))
    target = labels.target(raw_label, where)
    if target is None:
        return None
    return shape_to_region(raw.get("shape_attributes"), target)
