"""Predictions as a VIA 2.x project that a person opens in VIA (File > Open project) to correct,
then feeds back through ``read_via`` as training data.

The file is streamed image by image, so a folder of any size never sits whole in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from leukodet.data.via import polygon_area
from leukodet.io import atomic_open

VIA_FORMAT_VERSION = "2.0.10"


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Integer outline (N, 2) of a mask's largest part, as a person would click it in VIA; None
    when the mask is empty or its outline is degenerate (fewer than 3 points or no area)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    outline = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 0.7, True).reshape(-1, 2)
    if len(np.unique(outline, axis=0)) < 3 or polygon_area(outline.astype(float)) <= 0:
        return None
    return outline


def region(class_name: str, score: float, bbox_xywh: Sequence[float], polygon: Sequence | None,
           attribute: str = "cell_type") -> dict:
    """One VIA region: the mask's outline as a polygon, or the box as a rect when there is no
    usable outline (box-only models, specks)."""
    if polygon is not None:
        points = np.asarray(polygon, dtype=np.int64).reshape(-1, 2)
        shape = {"name": "polygon", "all_points_x": points[:, 0].tolist(), "all_points_y": points[:, 1].tolist()}
    else:
        x, y, w, h = bbox_xywh
        shape = {"name": "rect", "x": round(x), "y": round(y), "width": max(1, round(w)), "height": max(1, round(h))}
    return {"shape_attributes": shape, "region_attributes": {attribute: class_name, "score": f"{score:.3f}"}}


class ViaProjectWriter:
    """Streams VIA image entries (``filename`` relative to ``image_root``, ``size`` in bytes,
    ``regions``) into a VIA 2.x project file, atomically: a context manager, ``add(entry)`` per image.

    The class is a dropdown attribute (VIA lists the classes to pick from when correcting) and
    the score a text attribute. ``default_filepath`` points VIA at ``image_root``.
    """

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str], image_root: str | os.PathLike,
                 attribute: str = "cell_type", name: str = "leukodet"):
        self.path, self.class_names, self.image_root = Path(path), list(class_names), Path(image_root)
        self.attribute, self.name = attribute, name
        self.keys: list[str] = []

    def __enter__(self) -> "ViaProjectWriter":
        attribute = self.attribute
        settings = {
            "ui": {"annotation_editor_height": 25, "annotation_editor_fontsize": 0.8, "leftsidebar_width": 18,
                   "image_grid": {"img_height": 80, "rshape_fill": "none", "rshape_fill_opacity": 0.3,
                                  "rshape_stroke": "yellow", "rshape_stroke_width": 2, "show_region_shape": True,
                                  "show_image_policy": "all"},
                   "image": {"region_label": attribute, "region_color": attribute, "region_label_font": "10px Sans",
                             "on_image_annotation_editor_placement": "NEAR_REGION"}},
            "core": {"buffer_size": 18, "filepath": {},
                     "default_filepath": f"{self.image_root.resolve().as_posix()}/"},
            "project": {"name": self.name},
        }
        self._file = atomic_open(self.path, "w", encoding="utf-8")
        self.out = self._file.__enter__()
        self.out.write(f'{{"_via_settings":{json.dumps(settings)},"_via_img_metadata":{{')
        return self

    def add(self, entry: dict) -> None:
        key = f"{entry['filename']}{entry['size']}"  # VIA's own key: file name + byte size
        self.out.write(("," if self.keys else "") + f"{json.dumps(key)}:")
        json.dump({"filename": entry["filename"], "size": entry["size"], "regions": entry["regions"],
                   "file_attributes": {}}, self.out, separators=(",", ":"))
        self.keys.append(key)

    def __exit__(self, *exc):
        if exc[0] is None:
            attributes = {
                "region": {self.attribute: {"type": "dropdown",
                                            "description": "cell class (predicted; correct it if wrong)",
                                            "options": {c: c for c in self.class_names}, "default_options": {}},
                           "score": {"type": "text", "description": "model confidence", "default_value": ""}},
                "file": {},
            }
            self.out.write(f'}},"_via_attributes":{json.dumps(attributes)},'
                           f'"_via_data_format_version":"{VIA_FORMAT_VERSION}",'
                           f'"_via_image_id_list":{json.dumps(self.keys)}}}')
        return self._file.__exit__(*exc)

