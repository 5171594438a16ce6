"""The one mapper: dataset dict (or bare image file) -> model-ready sample.

Training, evaluation and inference all call it, so the preprocessing can never differ between
them. Order: read (a JPEG at reduced size where the chain's first ``scale`` allows) ->
preprocessing chain -> annotations moved by the chain's transform -> masks rasterised at the
processed size -> training augmentation (only when ``is_train``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from leukodet.data.augment import build_augmentation
from leukodet.data.imageio import SLIDE_SUFFIXES, ImageReadError, RegionReader, open_regions, stated_um_per_px
from leukodet.preprocess import PreprocessChain, PreprocessState
from leukodet.preprocess.steps import target_size


def rasterize(polygons: Sequence[np.ndarray], height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Fill polygons ((N, 2) x, y arrays or flat lists, continuous pixel coordinates) into a
    uint8 HxW mask (``out`` if given).

    pycocotools rasterises, because the evaluation builds its ground-truth masks with it: the
    model trains on the very pixels it is scored against (cv2.fillPoly also paints the outline,
    about half a pixel of extra rim, +3% area on a 30 px cell). It runs on the polygons' bounding
    crop only, which gives the same pixels (its rasteriser is shift-invariant) at a fraction of the
    cost of a full-image mask per cell.
    """
    out = np.zeros((height, width), np.uint8) if out is None else out
    polygons = [np.asarray(p, np.float64).reshape(-1, 2) for p in polygons]
    polygons = [p for p in polygons if len(p) >= 3]  # pycocotools reads 2 points as a box
    if not polygons:
        return out
    points = np.concatenate(polygons)
    # the polygons' whole bounding crop, even where it leaves the canvas (a cell cut by a training
    # window): pycocotools drops vertices outside its canvas, which shifts the cut edge by a pixel
    x0, y0 = (math.floor(v) - 1 for v in points.min(axis=0))
    x1, y1 = (math.ceil(v) + 1 for v in points.max(axis=0))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return out
    rles = mask_utils.frPyObjects([(p - (x0, y0)).ravel().tolist() for p in polygons], y1 - y0, x1 - x0)
    with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy-keyword deprecation
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        out[cy0:cy1, cx0:cx1] = mask_utils.decode(rles).max(axis=2)[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def border_median(image: np.ndarray) -> np.ndarray:
    """The median colour of an HxWx3 image's one-pixel border (the lower middle value, as
    torch.median): the smear's background, the fill of padding that should look like more of the
    same slide (training windows and inference tiles alike)."""
    border = np.sort(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
    return border[(len(border) - 1) // 2]


def inside_canvas(xy: torch.Tensor | np.ndarray, width: int, height: int):
    """Which (x, y) points lie on a ``width`` x ``height`` canvas."""
    return (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)


@dataclass(frozen=True)
class CellScale:
    """Training at a fixed cell size (the Cellpose ``diameter`` idea): each preprocessed image is
    resized so that its source's cells are ``cell_px`` pixels across, then cut to a ``side`` x
    ``side`` window (the detector's ``min_size``, which its own resize then leaves alone). Single-
    cell crops, fields and camera frames all reach the network with cells at the same size, as
    tiled prediction (``leukodet.engine.tiling``) later shows them.

    ``source_cell_px``: the median cell diameter of each source (annotation file) in file pixels,
    measured on the training split; ``default_cell_px`` for a record of another source.
    ``random_crop``: a random window of the resized image (smaller images padded with their
    background at a random place); else the image whole at the top left, padded to at least
    ``side`` (validation: its loss at the trained scale, its tiles as inference cuts them)."""

    cell_px: float
    source_cell_px: Mapping[str, float]
    default_cell_px: float
    side: int
    random_crop: bool = True

    def factor(self, record: Mapping, state: PreprocessState) -> float:
        """Resize factor from the preprocessed image to the trained cell scale."""
        file_cell_px = self.source_cell_px.get(record.get("source", ""), self.default_cell_px)
        return self.cell_px / (file_cell_px * state.scale[0])

    def apply(self, record: Mapping, state: PreprocessState) -> PreprocessState:
        """The state resized and windowed; its matrix carries both, so annotations follow."""
        f = self.factor(record, state)
        height, width = state.image.shape[:2]
        new_w, new_h = max(1, round(width * f)), max(1, round(height * f))
        image = state.image
        if (new_w, new_h) != (width, height):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        matrix = np.diag([new_w / width, new_h / height, 1.0]) @ state.matrix
        if self.random_crop:
            (x0, out_w), (y0, out_h) = (self._window_start(new_w), self.side), (self._window_start(new_h), self.side)
        else:
            (x0, out_w), (y0, out_h) = (0, max(new_w, self.side)), (0, max(new_h, self.side))
        canvas = np.empty((out_h, out_w, 3), np.uint8)
        canvas[:] = border_median(image)
        # source and destination of the copy: a positive x0 crops, a negative one pads on the left
        sx0, sy0, dx0, dy0 = max(x0, 0), max(y0, 0), max(-x0, 0), max(-y0, 0)
        copy_w, copy_h = min(new_w - sx0, out_w - dx0), min(new_h - sy0, out_h - dy0)
        canvas[dy0:dy0 + copy_h, dx0:dx0 + copy_w] = image[sy0:sy0 + copy_h, sx0:sx0 + copy_w]
        matrix = np.array([[1.0, 0, -x0], [0, 1.0, -y0], [0, 0, 1.0]]) @ matrix
        return replace(state, image=canvas, raw=canvas, matrix=matrix, foreground=None)

    def _window_start(self, length: int) -> int:
        """Where a random window of ``side`` starts along one axis; a negative start pads."""
        if length >= self.side:
            return int(torch.randint(0, length - self.side + 1, ()).item())
        return -int(torch.randint(0, self.side - length + 1, ()).item())


def visible(boxes: np.ndarray, masks: np.ndarray | None, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the instances seen in a ``width`` x ``height`` window, their boxes): boxes
    clipped to it, a cell cut by the window boxed by its visible mask, empty ones dropped."""
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    if masks is not None:
        for i in np.nonzero((clipped != boxes).any(axis=1))[0]:
            rows, cols = np.nonzero(masks[i].any(axis=1))[0], np.nonzero(masks[i].any(axis=0))[0]
            clipped[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if len(rows) else 0
    keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
    if masks is not None:
        keep &= masks.reshape(len(masks), -1).any(axis=1)
    return np.nonzero(keep)[0], clipped[keep]


class ChainedRegions:
    """Preprocessed tiles of a file read by region: each tile is read with ``CONTEXT`` pixels
    around it, run through the chain and cut back, so neighbourhood filters (bilateral, CLAHE)
    see real pixels at the tile's edge. Steps that look at the whole image (CLAHE's grid, Otsu)
    see the tile with its context instead, as each training field was seen on its own."""

    CONTEXT = 16

    def __init__(self, regions: RegionReader, chain: PreprocessChain):
        self.regions, self.chain = regions, chain
        self.width, self.height = regions.width, regions.height

    def tile(self, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
        """(3, y1 - y0, x1 - x0) uint8 tile, x/y clipped to the image."""
        rx0, ry0 = max(x0 - self.CONTEXT, 0), max(y0 - self.CONTEXT, 0)
        state, _ = self.chain.run(self.regions.read(rx0, ry0, x1 + self.CONTEXT, y1 + self.CONTEXT))
        out = state.image[y0 - ry0:min(y1, self.height) - ry0, x0 - rx0:min(x1, self.width) - rx0]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


class DatasetMapper:
    """``mapper(dataset_dict) -> sample``; ``mapper.map_image(path)`` for a bare image (inference).

    ``preprocess_cfg`` / ``augment_cfg``: ``conf/preprocess`` and ``conf/augment`` nodes (or their
    step / transform lists). Augmentation runs only when ``is_train``. ``cell_scale``
    (:class:`CellScale`) brings the cells to a fixed size after the chain, before the annotations
    are moved; cells cut by its window keep their visible part.

    Sample: ``image`` uint8 CHW RGB tensor; ``instances`` with ``boxes`` float32 (N, 4) XYXY,
    ``labels`` int64 (N,) 0-based, ``masks`` uint8 (N, H, W), or None when the record is
    ``box_only`` or its annotations carry no segmentation; ``points`` float32 (M, 2) and
    ``point_labels`` int64 (M,); ``file_name``, ``image_id``, ``orig_height``, ``orig_width``,
    ``scale`` (sx, sy) from file pixels to preprocessed pixels (before augmentation), and
    ``record`` (the input dict, unchanged, for evaluation).

    Polygons are moved to the processed size and rasterised there, rather than rasterised at the
    file size and resized: the mask edge is then exact at the training resolution (a resized
    binary mask is blurred and re-thresholded) and a 4100x3075 raster per cell is never made.
    After augmentation an instance is kept only while its box is at least 1 px wide and high and
    its mask (if any) is not empty; boxes, labels and masks are filtered together.
    """

    def __init__(self, preprocess_cfg: Any = None, augment_cfg: Any = None, is_train: bool = False,
                 cell_scale: CellScale | None = None):
        self.chain = PreprocessChain(preprocess_cfg)
        self.augment = build_augmentation(augment_cfg) if is_train else None
        self.is_train = is_train
        self.cell_scale = cell_scale

    def map_image(self, path: str | os.PathLike) -> dict:
        """Inference entry: the same reading and chain as training, no annotations; the record
        carries the pixel size the file states (a TIFF's tags), as ``map_regions``' does."""
        return self({"file_name": str(path), "image_id": -1, "annotations": [], "points": [],
                     "um_per_px": stated_um_per_px(path)})

    def map_regions(self, path: str | os.PathLike) -> dict | None:
        """Inference entry for a file read by region (a TIFF or a scanner's slide,
        ``leukodet.data.imageio.open_regions``) when the chain keeps its pixel grid (every ``scale``
        step is the identity at this size): a sample whose ``regions`` gives preprocessed tiles on
        demand and whose ``image`` is None, so a whole slide never sits in memory whole; its record
        carries the pixel size the file states (``um_per_px``). None when the file must be read
        whole; a slide, which cannot be, raises ``ImageReadError``."""
        regions = open_regions(path)
        if regions is None:
            return None
        size = (regions.width, regions.height)
        if any(target_size(size, **params) != size for name, _, params in self.chain.steps if name == "scale"):
            regions.close()
            if Path(path).suffix.lower() in SLIDE_SUFFIXES:
                raise ImageReadError(f"{path}: a slide is read by region, which a preprocessing 'scale' step that "
                                     "resizes the whole image does not allow; use a checkpoint trained without one")
            return None
        pixel_steps = [{"name": name, **params} for name, fn, params in self.chain.steps if not fn.changes_geometry]
        return {"image": None, "regions": ChainedRegions(regions, PreprocessChain(pixel_steps)),
                "instances": {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "masks": None},
                "points": torch.zeros((0, 2)), "point_labels": torch.zeros(0, dtype=torch.int64),
                "file_name": str(path), "image_id": -1, "orig_height": regions.height, "orig_width": regions.width,
                "scale": (1.0, 1.0), "record": {"file_name": str(path), "image_id": -1, "annotations": [],
                                                "um_per_px": regions.um_per_px}}

    def __call__(self, record: Mapping) -> dict:
        state, _ = self.chain.run_on_file(record["file_name"])
        if self.cell_scale is not None:
            state = self.cell_scale.apply(record, state)
        annotations = record.get("annotations", [])
        boxes = np.zeros((len(annotations), 4), np.float32)
        for i, ann in enumerate(annotations):
            x, y, w, h = ann["bbox"]
            corners = state.transform_points([[x, y], [x + w, y], [x, y + h], [x + w, y + h]])
            boxes[i] = [*corners.min(axis=0), *corners.max(axis=0)]
        masks = self._masks(record, state)
        labels = np.array([a["category_id"] for a in annotations], np.int64)
        points = state.transform_points([p["xy"] for p in record.get("points", [])]).astype(np.float32)
        point_labels = np.array([p["category_id"] for p in record.get("points", [])], np.int64)
        if self.cell_scale is not None:
            height, width = state.image.shape[:2]
            keep, boxes = visible(boxes, masks, width, height)
            masks, labels = (None if masks is None else masks[keep]), labels[keep]
            inside = inside_canvas(points, width, height)
            points, point_labels = points[inside], point_labels[inside]
        image = torch.from_numpy(np.ascontiguousarray(state.image.transpose(2, 0, 1)))
        instances = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                     "masks": None if masks is None else torch.from_numpy(masks)}
        points_t, point_labels_t = torch.from_numpy(points), torch.from_numpy(point_labels)
        if self.augment is not None:
            image, instances, points_t, point_labels_t = self._augment(image, instances, points_t, point_labels_t)
        return {
            "image": image, "instances": instances, "points": points_t, "point_labels": point_labels_t,
            "file_name": record["file_name"], "image_id": record.get("image_id", -1),
            "orig_height": state.orig_size[1], "orig_width": state.orig_size[0], "scale": state.scale,
            "record": record,
        }

    @staticmethod
    def _masks(record: Mapping, state: PreprocessState) -> np.ndarray | None:
        """(N, H, W) uint8 instance masks at the processed size; None for box-only data."""
        annotations = record.get("annotations", [])
        with_polygons = [bool(a.get("segmentation")) for a in annotations]
        if record.get("box_only") or (annotations and not any(with_polygons)):
            return None
        if not all(with_polygons):
            missing = with_polygons.index(False)
            raise ValueError(f"{record['file_name']}: annotation {missing} has no segmentation while others do; "
                             "mark the record box_only or give every instance a polygon")
        height, width = state.image.shape[:2]
        masks = np.zeros((len(annotations), height, width), np.uint8)
        for mask, ann in zip(masks, annotations):
            if isinstance(ann["segmentation"], Mapping):
                raise ValueError(f"{record['file_name']}: RLE segmentation is not supported here; use polygons")
            rasterize([state.transform_points(p) for p in ann["segmentation"]], height, width, out=mask)
        return masks

    def _augment(self, image: torch.Tensor, instances: dict, points: torch.Tensor, point_labels: torch.Tensor):
        canvas = tuple(image.shape[-2:])
        data = {"image": tv_tensors.Image(image), "labels": instances["labels"],
                "boxes": tv_tensors.BoundingBoxes(instances["boxes"], format="XYXY", canvas_size=canvas),
                # points ride along as zero-size boxes: v2 moves boxes in the same continuous
                # coordinates as polygons (its KeyPoints flip by W - 1 - x), and unclamped, so a
                # point pushed off the canvas can be dropped instead of piled onto the border
                "points": tv_tensors.BoundingBoxes(torch.cat([points, points], dim=1), format="XYXY",
                                                   canvas_size=canvas, clamping_mode=None)}
        if instances["masks"] is not None:
            data["masks"] = tv_tensors.Mask(instances["masks"])
        out = self.augment(data)
        image = out["image"].as_subclass(torch.Tensor)
        height, width = image.shape[-2:]
        boxes = out["boxes"].as_subclass(torch.Tensor)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        masks = None
        if instances["masks"] is not None:
            masks = out["masks"].as_subclass(torch.Tensor)
            keep &= masks.flatten(1).amax(dim=1) > 0
            masks = masks[keep]
        xy = out["points"].as_subclass(torch.Tensor)[:, :2]
        inside = inside_canvas(xy, width, height)
        instances = {"boxes": boxes[keep], "labels": out["labels"][keep], "masks": masks}
        return image, instances, xy[inside], point_labels[inside]
