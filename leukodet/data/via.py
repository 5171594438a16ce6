"""Read VGG Image Annotator (VIA) annotations into :class:`ImageRecord` lists.

Accepted: VIA 1.x JSON (regions as a dict), VIA 2.x annotation exports (regions as a list),
VIA 2.x project files (``_via_img_metadata``) and the CSV exports of VIA 1 (``#filename`` header)
and VIA 2 (a region attribute never given a value is written as a bare ``undefined``: no label).
Shapes: polygon and polyline (closed), rect, circle and ellipse (turned into polygons), point
(count-only). Every shape is clipped to the image (:func:`check_geometry`). VIA 3 projects and
COCO files are recognised and sent to the right reader with a clear message.

Nothing is dropped silently: every region or image left out is returned as a :class:`Skip` with
its file and reason. Errors in the file itself (not JSON, not VIA) raise :class:`AnnotationError`.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from leukodet.data.imageio import ImageReadError, image_size
from leukodet.data.records import BOX, POINT, POLYGON, ImageRecord, Region, Skip
from leukodet.registry import DATASETS

# Vertices used for circles and ellipses: a 40 px radius cell is then off by < 0.3 px.
ELLIPSE_VERTICES = 64
# Count-only points outside the image by up to this many pixels are moved onto the border (a click
# on the image edge); further out is a skip. Shapes are clipped instead (see check_geometry).
POINT_TOLERANCE_PX = 3.0
# A shape is kept when at least this many px² of it lie inside the image: less than one pixel
# holds no mask. prepare's ``min_area_inside`` overrides it.
MIN_AREA_INSIDE_PX = 1.0

CSV_HEADER = ["filename", "file_size", "file_attributes", "region_count", "region_id",
              "region_shape_attributes", "region_attributes"]
# The CSV columns read; the others are VIA's bookkeeping.
CSV_COLUMNS_READ = ["filename", "region_shape_attributes", "region_attributes"]
# VIA 2 writes an attribute that was never given a value (a dropdown without a default option) as
# the bare JavaScript word undefined, which is not JSON: {"cell_type":undefined}. Outside strings
# it is read as null (no label); the first alternative consumes whole strings so none is touched.
JS_UNDEFINED = re.compile(r'"(?:[^"\\]|\\.)*"|\bundefined\b')

# What may have been done to a region that is kept, counted in ParseResult.changes for the summary.
CLIPPED = "clipped to the image border"
CLOSED_POLYLINE = "polyline closed into an outline"


class AnnotationError(ValueError):
    """An annotation file that cannot be read at all; the message names the file."""


@dataclass
class LabelPolicy:
    """How a region's class is found: attribute key, raw -> target map, what to do if unmapped.

    ``class_map`` maps raw labels to target classes; a target of ``None`` drops that label on
    purpose (still reported). An empty map keeps raw labels as they are. ``unmapped`` is
    ``"error"`` (raise) or ``"skip"`` (report and leave the region out).
    ``option_descriptions`` (option id -> description, filled from a VIA project file) lets the
    map name an option by either: VIA's JSON and CSV exports store the id, its COCO export the
    description.
    """

    attribute: str = "class"
    class_map: Mapping[str, str | None] = field(default_factory=dict)
    unmapped: str = "error"
    option_descriptions: Mapping[str, str] = field(default_factory=dict)

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
        for name in (raw, self.option_descriptions.get(raw, raw)):
            if name in self.class_map:
                return self.class_map[name]
        if self.unmapped == "error":
            close = ", ".join(repr(key) for key in self.close_matches(raw))
            hint = f"close matches in the map: {close}; " if close else ""
            raise UnmappedLabelError(f"{where}: label {raw!r} is not in the class map "
                                     f"({hint}known: {', '.join(sorted(map(str, self.class_map)))}); "
                                     "add it to the map or set unmapped=skip")
        raise RegionProblem(f"label {raw!r} not in the class map")

    def close_matches(self, raw: str) -> list[str]:
        """Map keys close to ``raw`` (case, a typo, an option id vs its description)."""
        folded = {str(key).casefold(): str(key) for key in self.class_map}
        return [folded[key] for key in difflib.get_close_matches(raw.casefold(), folded, n=3, cutoff=0.6)]


class UnmappedLabelError(AnnotationError):
    """A label missing from the class map while ``unmapped="error"``: a config problem, never skipped."""


class RegionProblem(ValueError):
    """A region that is skipped (reported), not a fatal error."""


@dataclass
class ParseResult:
    records: list[ImageRecord]
    skips: list[Skip]
    changes: Counter = field(default_factory=Counter)  # kept regions changed on the way in, by how

    @property
    def box_only(self) -> bool:
        """True when every shape is a box: later stages train and score boxes, not fake masks."""
        kinds = {r.kind for rec in self.records for r in rec.regions if r.kind != POINT}
        return kinds == {BOX}

    def extend(self, other: "ParseResult") -> None:
        self.records.extend(other.records)
        self.skips.extend(other.skips)
        self.changes.update(other.changes)

    def describe_changes(self) -> str:
        """One line for the conversion summary, e.g. 'regions kept but changed: 3 clipped to ...'."""
        counts = ", ".join(f"{count} {change}" for change, count in sorted(self.changes.items()))
        return f"regions kept but changed: {counts}" if counts else "no region changed on reading"


# ---------------------------------------------------------------- shapes -> points


def finite_numbers(values: Any, what: str) -> np.ndarray:
    """``values`` as a flat float array; RegionProblem when they are not all finite numbers."""
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
            xs = finite_numbers(shape["all_points_x"], "all_points_x")
            ys = finite_numbers(shape["all_points_y"], "all_points_y")
            if len(xs) != len(ys):
                raise RegionProblem(f"{len(xs)} x values but {len(ys)} y values")
            points = np.stack([xs, ys], axis=1)
            if len(points) > 1 and np.array_equal(points[0], points[-1]):
                points = points[:-1]  # VIA 1 repeats the first vertex to close a polygon
            return Region(label, POLYGON, points)
        if name == "rect":
            x, y, w, h = finite_numbers([shape["x"], shape["y"], shape["width"], shape["height"]], "rect")
            return Region(label, BOX, box_corners(x, y, x + w, y + h))
        if name == "circle":
            cx, cy, r = finite_numbers([shape["cx"], shape["cy"], shape["r"]], "circle")
            return Region(label, POLYGON, _ellipse(cx, cy, r, r))
        if name == "ellipse":
            cx, cy, rx, ry = finite_numbers([shape["cx"], shape["cy"], shape["rx"], shape["ry"]], "ellipse")
            theta = float(finite_numbers([shape.get("theta", 0.0)], "theta")[0])
            return Region(label, POLYGON, _ellipse(cx, cy, rx, ry, theta))
        if name == "point":
            cx, cy = finite_numbers([shape["cx"], shape["cy"]], "point")
            return Region(label, POINT, np.array([[cx, cy]]))
    except KeyError as missing:
        raise RegionProblem(f"{name} shape has no {missing} key") from None
    raise RegionProblem(f"unsupported shape {name!r}")


def box_corners(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The 4 corners of an axis-aligned box, as a BOX region holds them."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon given as (N, 2) vertices."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def gets_clipped(region: Region, width: int, height: int) -> bool:
    """True when :func:`check_geometry` cuts this shape at the image border (points are never cut)."""
    return region.kind != POINT and bool(np.any(region.points < 0) or np.any(region.points > [width, height]))


def _polygon_parts(geometry: Any) -> list:
    """The non-empty polygons in a shapely geometry (intersections and repairs may give collections)."""
    if isinstance(geometry, shapely.Polygon):
        return [] if geometry.is_empty else [geometry]
    return [part for member in getattr(geometry, "geoms", []) for part in _polygon_parts(member)]


def clip_to_image(points: np.ndarray, width: int, height: int) -> shapely.Polygon:
    """The part of the closed outline ``points`` inside the image, by true polygon intersection
    (shapely: outlines may be concave or cross the border more than once; a convex-only clip such
    as cv2.intersectConvexConvex would fill in the concavities). A self-crossing outline is first
    repaired into the parts it encloses. When the cut leaves several parts, the largest is the
    cell (one annotation is one cell). Empty when nothing is inside."""
    outline = shapely.Polygon(points)
    if not outline.is_valid:
        outline = shapely.make_valid(outline)
    parts = _polygon_parts(outline.intersection(shapely.box(0, 0, width, height)))
    return max(parts, key=lambda part: part.area) if parts else shapely.Polygon()


def check_geometry(region: Region, width: int, height: int, min_area_inside: float = MIN_AREA_INSIDE_PX) -> Region:
    """The region as kept. A shape reaching past the image border is clipped to the image and kept
    (a box stays a box); it is refused when degenerate or when less than ``min_area_inside`` px² of
    it lie inside. A point slightly outside is moved onto the border."""
    if region.kind == POINT:
        return _check_point(region, width, height)
    points = region.points
    if len(np.unique(points, axis=0)) < 3:
        raise RegionProblem("fewer than 3 distinct points")
    area_inside = polygon_area(points)
    if area_inside <= 0:
        raise RegionProblem("zero area")
    if gets_clipped(region, width, height):
        inside = clip_to_image(points, width, height)
        if inside.area == 0:
            raise RegionProblem(f"outside the {width}x{height} image")
        area_inside = inside.area
        points = box_corners(*inside.bounds) if region.kind == BOX else np.asarray(inside.exterior.coords)[:-1]
    if area_inside < min_area_inside:
        raise RegionProblem(f"less than {min_area_inside:g} px² inside the {width}x{height} image")
    return Region(region.label, region.kind, points)


def _check_point(region: Region, width: int, height: int) -> Region:
    low, high = -POINT_TOLERANCE_PX, np.array([width, height]) + POINT_TOLERANCE_PX
    if np.any(region.points < low) or np.any(region.points > high):
        raise RegionProblem(f"outside the {width}x{height} image by more than {POINT_TOLERANCE_PX:g} px")
    return Region(region.label, region.kind, np.clip(region.points, 0, [width, height]))


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
                              "'Export annotations (COCO format)' and read that file with a source of "
                              "'name: coco'")
    if isinstance(data, Mapping) and {"images", "annotations", "categories"} <= set(data):
        raise AnnotationError(f"{path}: this is a COCO file (e.g. VIA's 'Export annotations (COCO format)'); "
                              "read it with a source of 'name: coco'")
    if isinstance(data, Mapping) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]  # VIA 2.x project file
    if not isinstance(data, Mapping) or not data:
        got = ("an empty object" if isinstance(data, Mapping) else
               f"a list of {len(data)} items" if isinstance(data, list) else type(data).__name__)
        raise AnnotationError(f"{path}: not a VIA annotation file (expected an object of images, got {got})")
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


def option_descriptions(data: Any, attribute: str) -> dict[str, str]:
    """A VIA 2 project's option id -> description table of region attribute ``attribute``
    (dropdown, radio, checkbox); empty for exports, which carry no attribute definitions."""
    definitions = data.get("_via_attributes") if isinstance(data, Mapping) else None
    definition = ((definitions or {}).get("region") or {}).get(attribute) or {}
    options = definition.get("options") or {}
    return {str(key): description for key, description in options.items()
            if isinstance(description, str) and description.strip()}


def _csv_cell(text: str | None) -> Any:
    """A JSON attribute cell of VIA's CSV, VIA 2's bare ``undefined`` read as null."""
    return json.loads(JS_UNDEFINED.sub(lambda m: "null" if m.group(0) == "undefined" else m.group(0), text or "{}"))


def via_csv_entries(path: Path) -> list[dict]:
    """Entries from VIA's CSV export (one row per region; JSON-encoded attribute cells). VIA 1
    writes its header with a leading '#' (``#filename,...``), VIA 2 without."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise AnnotationError(f"{path}: the file is empty")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    reader.fieldnames = [name.lstrip("#") for name in reader.fieldnames]
    missing = [column for column in CSV_COLUMNS_READ if column not in reader.fieldnames]
    if missing:
        raise AnnotationError(f"{path}: not a VIA CSV export: no {', '.join(missing)} column "
                              f"(VIA writes the header {','.join(CSV_HEADER)})")
    by_file: dict[str, list] = {}
    for row in reader:
        regions = by_file.setdefault(row["filename"], [])
        try:
            cells = {column: _csv_cell(row[column]) for column in ("region_shape_attributes", "region_attributes")}
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: line {reader.line_num}: attribute cell is not JSON: {err.msg}") from None
        if cells["region_shape_attributes"]:  # an image without regions has one row with '{}'
            regions.append({"shape_attributes": cells["region_shape_attributes"],
                            "region_attributes": cells["region_attributes"]})
    return [{"filename": name, "regions": regions} for name, regions in by_file.items()]


def _find_image(filename: str, image_dirs: list[Path]) -> Path | None:
    for folder in image_dirs:
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    return None


@DATASETS.register(name="via")
def read_via(path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
             labels: LabelPolicy | None = None, min_area_inside: float = MIN_AREA_INSIDE_PX) -> ParseResult:
    """Read a VIA JSON, project or CSV file. Images are looked up in ``image_dir``, else next to the
    file or in its ``images/`` folder; their real size is read from the image file. Shapes are
    clipped to the image; one with less than ``min_area_inside`` px² inside is skipped."""
    path = Path(path)
    labels = labels or LabelPolicy()
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".csv":
        entries = via_csv_entries(path)
    else:
        data = load_json(path)
        entries = via_entries(data, path)
        descriptions = option_descriptions(data, labels.attribute)
        if descriptions:
            labels = replace(labels, option_descriptions=descriptions)
    image_dirs = [Path(image_dir)] if image_dir else [path.parent, path.parent / "images"]
    result = ParseResult([], [])
    for entry in entries:
        result.extend(_read_entry(entry, path, image_dirs, labels, min_area_inside))
    return result


def _read_entry(entry: dict, source: Path, image_dirs: list[Path], labels: LabelPolicy,
                min_area_inside: float) -> ParseResult:
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
    result = ParseResult([record], [])
    for index, raw_region in enumerate(entry["regions"]):
        try:
            region = _read_region(raw_region, labels, f"{source}: {filename} region {index}")
            if region is None:
                result.skips.append(Skip(str(source), record.file_name, index, "label dropped by the class map"))
                continue
            record.regions.append(check_geometry(region, width, height, min_area_inside))
        except RegionProblem as problem:
            result.skips.append(Skip(str(source), record.file_name, index, str(problem)))
            continue
        if raw_region["shape_attributes"]["name"] == "polyline":
            result.changes[CLOSED_POLYLINE] += 1
        if gets_clipped(region, width, height):
            result.changes[CLIPPED] += 1
    return result


def _read_region(raw: Any, labels: LabelPolicy, where: str) -> Region | None:
    if not isinstance(raw, Mapping):
        raise RegionProblem(f"region is {type(raw).__name__}, not an object")
    raw_label = labels.raw_label(raw.get("region_attributes", {}))
    target = labels.target(raw_label, where)
    if target is None:
        return None
    return shape_to_region(raw.get("shape_attributes"), target)
