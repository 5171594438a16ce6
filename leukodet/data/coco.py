"""COCO instance JSON: write prepared splits, read them (and third-party COCO sets) back.

Written files load in pycocotools (``COCO()``, ``annToMask``): ids from 1, bbox from the polygon,
area by the shoelace formula. Two project keys ride along, which pycocotools ignores:
``"leukodet": {"box_only": bool}`` (boxes only: train and score boxes, no fake masks) and
``"points"`` (count-only annotations, never training instances).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukodet.data.imageio import ImageReadError, image_size
from leukodet.data.records import BOX, BOX_MODE_XYWH_ABS, POINT, POLYGON, ImageRecord, Region, Skip
from leukodet.data.via import CLIPPED, MIN_AREA_INSIDE_PX, AnnotationError, LabelPolicy, ParseResult, RegionProblem, \
    box_corners, check_geometry, finite_numbers, gets_clipped, load_json, polygon_area
from leukodet.io import atomic_write_text
from leukodet.registry import DATASETS


def to_coco(records: Sequence[ImageRecord], classes: Sequence[str], json_dir: str | os.PathLike,
            box_only: bool = False) -> dict:
    """A COCO instances dict for ``records``. File names are stored relative to ``json_dir``."""
    category_ids = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations, points = [], [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "width": record.width, "height": record.height,
                       "file_name": os.path.relpath(record.file_name, json_dir), "source": source_name(record.source),
                       **({} if record.um_per_px is None else {"um_per_px": record.um_per_px})})
        for region in record.regions:
            category_id = category_ids[region.label]
            if region.kind == POINT:
                points.append({"image_id": image_id, "category_id": category_id,
                               "xy": [float(v) for v in region.points[0]]})
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [round(v, 2) for v in region.bbox_xywh()], "iscrowd": 0,
                "area": round(polygon_area(region.points), 2),
                "segmentation": [] if box_only else [[round(float(v), 2) for v in region.points.reshape(-1)]],
            })
    return {
        "info": {"description": "written by leukodet"},
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "cell"} for name, i in category_ids.items()],
        "points": points, "leukodet": {"box_only": box_only},
    }


def source_name(path: str) -> str:
    """An annotation file's short name in reports: its folder and name (``dataset1/via_region_data.json``)."""
    return "/".join(Path(path).parts[-2:]) if path else ""


def write_coco(path: str | os.PathLike, records: Sequence[ImageRecord], classes: Sequence[str],
               box_only: bool = False) -> Path:
    path = Path(path)
    coco = to_coco(records, classes, path.parent.resolve(), box_only)
    atomic_write_text(path, json.dumps(coco))
    return path


def load_dataset_dicts(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Detectron2-format dataset dicts and metadata (class names, box_only) from a leukodet COCO file.

    Category ids become 0-based and contiguous, in the order of the file's categories.
    """
    path = Path(path)
    coco = load_json(path)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    box_only = bool(coco.get("leukodet", {}).get("box_only", False))
    dicts = {}
    for image in coco["images"]:
        dicts[image["id"]] = {
            "file_name": str((path.parent / image["file_name"]).resolve()), "image_id": image["id"],
            "height": image["height"], "width": image["width"], "box_only": box_only,
            "source": image.get("source", ""), "um_per_px": image.get("um_per_px"), "annotations": [], "points": [],
        }
    for ann in coco["annotations"]:
        instance = {"bbox": ann["bbox"], "bbox_mode": BOX_MODE_XYWH_ABS,
                    "category_id": contiguous[ann["category_id"]], "iscrowd": ann.get("iscrowd", 0)}
        if not box_only:
            instance["segmentation"] = ann["segmentation"]
        dicts[ann["image_id"]]["annotations"].append(instance)
    for point in coco.get("points", []):
        dicts[point["image_id"]]["points"].append({"xy": point["xy"], "category_id": contiguous[point["category_id"]]})
    metadata = {"thing_classes": [c["name"] for c in categories], "box_only": box_only, "json_file": str(path)}
    return list(dicts.values()), metadata


@DATASETS.register(name="coco")
def read_coco(path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
              labels: LabelPolicy | None = None, min_area_inside: float = MIN_AREA_INSIDE_PX) -> ParseResult:
    """Read a third-party COCO instances file as records (polygons; an RLE mask becomes the polygon of its largest part;
    annotations without segmentation are boxes, or count-only points when they hold one keypoint, as VIA's COCO export
    writes a point). Crowd regions are skipped and reported. Shapes are clipped to the image as in ``read_via``."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    coco = load_json(path)
    if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
        raise AnnotationError(f"{path}: not a COCO instances file (needs images, annotations, categories)")
    labels = labels or LabelPolicy()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    root = Path(image_dir) if image_dir else path.parent
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    result = ParseResult([], [])
    for image in coco["images"]:
        image_path = root / image["file_name"]
        try:
            width, height = image_size(image_path)
        except ImageReadError as err:
            result.skips.append(Skip(str(path), str(image_path), None, f"image missing or unreadable: {err}"))
            continue
        record = ImageRecord(str(image_path.resolve()), [], width, height, str(path))
        for ann in by_image.get(image["id"], []):
            where = f"{path}: annotation {ann.get('id')}"
            if ann.get("category_id") not in names:
                raise AnnotationError(f"{where}: category_id {ann.get('category_id')!r} is not among the categories")
            try:
                target = labels.target(names[ann["category_id"]], where)
                if target is None:
                    raise RegionProblem("label dropped by the class map")
                region = _coco_region(ann, target, height, width, where)
                record.regions.append(check_geometry(region, width, height, min_area_inside))
            except RegionProblem as problem:
                result.skips.append(Skip(str(path), record.file_name, ann.get("id"), str(problem)))
                continue
            if gets_clipped(region, width, height):
                result.changes[CLIPPED] += 1
        result.records.append(record)
    return result


def _coco_region(ann: dict, label: str, height: int, width: int, where: str) -> Region:
    if ann.get("iscrowd", 0):
        raise RegionProblem("crowd region (iscrowd=1)")
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):  # RLE: trace its outer contours
        import cv2
        from pycocotools import mask as mask_utils

        rle = segmentation if isinstance(segmentation["counts"], str) else \
            mask_utils.frPyObjects(segmentation, height, width)
        contours, _ = cv2.findContours(mask_utils.decode(rle), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = [c.reshape(-1, 2).astype(float) for c in contours]
    else:
        polygons = [np.asarray(p, float).reshape(-1, 2) for p in segmentation or []]
        if not any(len(p) for p in polygons):  # no outline at all ([] or VIA's [[]]): a point or a box
            point = _single_keypoint(ann)
            return Region(label, POINT, point) if point is not None else Region(label, BOX, _bbox_corners(ann, where))
    polygons = [p for p in polygons if len(p) >= 3]
    if not polygons:
        raise RegionProblem("segmentation has no polygon with 3 or more points")
    # One annotation is one cell: keep its largest part, so fragments never count as cells.
    return Region(label, POLYGON, max(polygons, key=polygon_area))


def _single_keypoint(ann: dict) -> np.ndarray | None:
    """The (1, 2) point of an annotation holding exactly one keypoint ``[x, y, visibility]`` (VIA's
    COCO export writes a point so); None for other annotations."""
    keypoints = ann.get("keypoints")
    if not isinstance(keypoints, list) or len(keypoints) != 3:
        return None
    x, y, visibility = finite_numbers(keypoints, "keypoints")
    if visibility == 0:  # COCO: 0 is "not labelled", its x and y mean nothing
        raise RegionProblem("keypoint not labelled (visibility 0)")
    return np.array([[x, y]])


def _bbox_corners(ann: dict, where: str) -> np.ndarray:
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise AnnotationError(f"{where}: no segmentation, no single keypoint and no bbox [x, y, w, h] "
                              f"(segmentation={ann.get('segmentation')!r}, bbox={bbox!r})")
    x, y, w, h = finite_numbers(bbox, "bbox")
    return box_corners(x, y, x + w, y + h)
