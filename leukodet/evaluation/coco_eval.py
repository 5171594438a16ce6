"""COCO AP through pycocotools' COCOeval, with maxDets raised for smears of hundreds of cells."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from leukodet.evaluation.matching import xyxy_to_xywh

MIN_MAX_DETS = 300


def coco_ground_truth(dataset_dicts: Sequence[dict], class_names: Sequence[str]) -> COCO:
    """A COCO object of the dataset dicts: image ids from 1 in order, category ids 1..C, annotation
    ids from 1 in order (so ``imgToAnns`` lists each image's annotations in the dict's order)."""
    images, annotations = [], []
    for image_id, record in enumerate(dataset_dicts, start=1):
        images.append({"id": image_id, "height": record["height"], "width": record["width"]})
        for ann in record["annotations"]:
            x, y, w, h = ann["bbox"]
            entry = {"id": len(annotations) + 1, "image_id": image_id, "category_id": ann["category_id"] + 1,
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}  # area only sorts by size range; we read "all"
            if ann.get("segmentation"):
                entry["segmentation"] = ann["segmentation"]
            annotations.append(entry)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_results(predictions: Sequence, iou_type: str) -> list[dict]:
    """pycocotools result dicts from ImagePredictions (one list entry per image, same order)."""
    results = []
    for image_id, pred in enumerate(predictions, start=1):
        boxes = xyxy_to_xywh(pred.boxes)
        for k in range(len(pred)):
            entry = {"image_id": image_id, "category_id": int(pred.labels[k]) + 1,
                     "score": float(pred.scores[k]), "bbox": [float(v) for v in boxes[k]]}
            if iou_type == "segm":
                entry["segmentation"] = pred.rles[k]
            results.append(entry)
    return results


def coco_ap(gt: COCO, predictions: Sequence, iou_type: str, num_classes: int, max_dets: int = MIN_MAX_DETS,
            image_ids: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """AP at IoU 0.5 and AP over IoU 0.50:0.95 per class (NaN where a class has no ground truth),
    read from COCOeval's precision array at the last maxDets, ``max(max_dets, 300)`` (``summarize``
    hard-codes 100), and ``pr50``: each class's precision at the 101 COCO recall points at IoU 0.5
    (-1 = no ground truth). ``image_ids`` (default all) restricts the images scored."""
    image_ids = sorted(gt.getImgIds()) if image_ids is None else list(image_ids)
    scored = set(image_ids)
    results = [r for r in coco_results(predictions, iou_type) if r["image_id"] in scored]
    no_pr = np.full((num_classes, 101), -1.0)
    if not image_ids:
        return {"ap50": np.full(num_classes, np.nan), "ap": np.full(num_classes, np.nan), "pr50": no_pr}
    if not results:  # COCO.loadRes cannot take an empty list; AP is 0 for every class with ground truth
        has_gt = np.array([len(gt.getAnnIds(imgIds=image_ids, catIds=[c + 1])) > 0 for c in range(num_classes)])
        zeros = np.where(has_gt, 0.0, np.nan)
        return {"ap50": zeros, "ap": zeros.copy(), "pr50": no_pr}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = [1, 10, max(max_dets, MIN_MAX_DETS)]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [IoU threshold, recall, class] at area all, last maxDets
    ap50, ap = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    for c in range(num_classes):
        at50, every = precision[0, :, c], precision[:, :, c]
        if (at50 > -1).any():
            ap50[c] = at50[at50 > -1].mean()
        if (every > -1).any():
            ap[c] = every[every > -1].mean()
    return {"ap50": ap50, "ap": ap, "pr50": precision[0].T.copy()}
