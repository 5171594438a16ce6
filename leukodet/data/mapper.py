"""The one mapper: dataset dict (or bare image file) -> model-ready sample.

Training, evaluation and inference all call it, so the preprocessing can never differ between
them. Order: decode (reduced where the chain's scale allows) -> preprocessing chain ->
annotations moved by the chain's scale -> masks rasterised -> training augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from leukodet.data.augment import build_augmentation
from leukodet.preprocess import PreprocessChain


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def rasterize(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """A polygon list as a uint8 mask, rasterised by pycocotools: the same pixels the COCO
    evaluation counts, so a perfect prediction scores IoU 1."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles))


class DatasetMapper:
    """``mapper(dataset_dict) -> sample``; ``mapper.map_image(path)`` for bare files (inference).

    Sample: ``image`` uint8 CHW RGB tensor; ``instances`` with ``boxes`` float32 (N, 4) XYXY,
    ``labels`` int64 (N,), ``masks`` uint8 (N, H, W) or None for box-only data; ``points``
    float32 (M, 2) and ``point_labels``; ``file_name``, ``image_id``, ``orig_height``,
    ``orig_width``, ``scale`` (sx, sy) from file to sample pixels, and ``record`` (the input dict).
    Polygons are scaled first and rasterised at the processed size, so masks are exact there
    instead of being resized (blurred, then re-binarised) from the original size.
    """

    def __init__(self, preprocess_cfg: Mapping | None, augment_cfg: Mapping | None = None, is_train: bool = False):
        steps = _plain(preprocess_cfg or {}).get("steps", [])
        self.chain = PreprocessChain(steps)
        transforms = _plain(augment_cfg or {}).get("transforms", [])
        self.augment = build_augmentation(transforms) if is_train else None
        self.is_train = is_train

    def map_image(self, path: str | os.PathLike) -> dict:
        """Inference entry: the same decoding and chain as training, no annotations."""
        return self({"file_name": str(path), "image_id": -1, "annotations": [], "points": []})

    def __call__(self, record: Mapping) -> dict:
        state, _ = self.chain.run_on_file(record["file_name"])
        image = state.image
        height, width = image.shape[:2]
        sx, sy = state.scale
        box_only = bool(record.get("box_only", False))
        annotations = record.get("annotations", [])
        boxes = np.zeros((len(annotations), 4), np.float32)
        masks = np.zeros((len(annotations), height, width), np.uint8) if not box_only else None
        for i, ann in enumerate(annotations):
            x, y, w, h = ann["bbox"]
            boxes[i] = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
            if masks is not None:
                polygons = [np.asarray(p, float).reshape(-1, 2) * (sx, sy) for p in ann["segmentation"]]
                masks[i] = rasterize([p.reshape(-1) for p in polygons], height, width)
        labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        boxes_t = torch.from_numpy(boxes)
        masks_t = torch.from_numpy(masks) if masks is not None else None
        if self.augment is not None:
            image_t, boxes_t, masks_t, labels = self._augment(image_t, boxes_t, masks_t, labels)
        points = record.get("points", [])
        return {
            "image": image_t,
            "instances": {"boxes": boxes_t, "labels": labels, "masks": masks_t},
            "points": torch.tensor([[p["xy"][0] * sx, p["xy"][1] * sy] for p in points], dtype=torch.float32
                                   ).reshape(-1, 2),
            "point_labels": torch.tensor([p["category_id"] for p in points], dtype=torch.int64),
            "file_name": record["file_name"], "image_id": record.get("image_id", -1),
            "orig_height": state.orig_size[1], "orig_width": state.orig_size[0], "scale": (sx, sy),
            "record": record,
        }

    def _augment(self, image, boxes, masks, labels):
        data = {"image": tv_tensors.Image(image),
                "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])),
                "labels": labels}
        if masks is not None:
            data["masks"] = tv_tensors.Mask(masks)
        out = self.augment(data)
        return (out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor),
                out["masks"].as_subclass(torch.Tensor) if masks is not None else None, out["labels"])
