"""`tools/export.py`: a trained torchvision detector as ONNX graphs beside its checkpoint, checked
against PyTorch on images before they are put in place, and loaded back for
``infer.backend=onnxruntime`` only when they were made from that very checkpoint.

    <run>/checkpoints/best.ckpt -> best.onnx, best.masks.onnx (see models.onnx_runtime), best.onnx.json

``best.onnx.json`` records the checkpoint's SHA-256, the classes, the input size rule and the
agreement measured at export.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from pycocotools import mask as mask_utils

from leukodet.data.catalog import get_dataset_dicts, split_name
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.evaluate import load_detector, operating_point, run_config
from leukodet.engine.inference.discovery import discover_images
from leukodet.engine.predictor import predict_original
from leukodet.io import atomic_write_text, current_umask, file_sha256
from leukodet.models.onnx_runtime import OPSET, OnnxDetector, export_onnx, info_path, masks_path, onnx_path
from leukodet.models.staged import inference_copy
from leukodet.models.torchvision_maskrcnn import TorchvisionDetector
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.structures import ImagePredictions, OperatingPoint

logger = logging.getLogger(__name__)

# Agreement the exported graphs must reach on the check images (same count and classes on every
# image; measured: box corners within ~1e-4 px, scores ~1e-6, mask IoU 1.0 on the generated sample)
MAX_BOX_DIFFERENCE_PX = 0.5
MAX_SCORE_DIFFERENCE = 1e-3
MIN_MASK_IOU = 0.95


class ExportError(ValueError):
    """An export that could not be made or did not agree with PyTorch; nothing was written."""


@dataclass
class Agreement:
    """PyTorch vs ONNX Runtime detections on the check images, paired by class and box (``paired_order``)."""

    images: int
    same_count_and_classes: int
    detections: int
    max_box_difference_px: float
    max_score_difference: float
    min_mask_iou: float | None

    @property
    def ok(self) -> bool:
        return (self.same_count_and_classes == self.images and self.max_box_difference_px <= MAX_BOX_DIFFERENCE_PX
                and self.max_score_difference <= MAX_SCORE_DIFFERENCE
                and (self.min_mask_iou is None or self.min_mask_iou >= MIN_MASK_IOU))

    def describe(self) -> str:
        iou = "" if self.min_mask_iou is None else f", min mask IoU {self.min_mask_iou:.4f}"
        return (f"{self.same_count_and_classes}/{self.images} images with the same detections and classes "
                f"({self.detections} detections), max box difference {self.max_box_difference_px:.4f} px, "
                f"max score difference {self.max_score_difference:.2g}{iou}")


def paired_order(ref: ImagePredictions, pred: ImagePredictions) -> np.ndarray | None:
    """For each reference detection (score order), the index of its candidate: the unpaired one of
    the same class with the highest box IoU. Pairing by position alone swaps two detections whose
    scores differ by float rounding (seen on a barely trained ResNet-50: 128 px 'box difference'
    between the same two boxes). None when some detection has no same-class partner."""
    from torchvision.ops import box_iou

    iou = box_iou(torch.from_numpy(ref.boxes), torch.from_numpy(pred.boxes)).numpy()
    iou[ref.labels[:, None] != pred.labels[None, :]] = -1.0
    order, free = [], np.ones(len(pred), bool)
    for i in np.argsort(-ref.scores, kind="stable"):
        candidates = np.where(free, iou[i], -1.0)
        j = int(candidates.argmax())
        if candidates[j] < 0:
            return None
        free[j] = False
        order.append((i, j))
    order.sort()
    return np.array([j for _, j in order], np.int64)


def agreement(reference: list[ImagePredictions], candidate: list[ImagePredictions]) -> Agreement:
    same, detections, box_diff, score_diff = 0, 0, 0.0, 0.0
    min_iou = None if reference and reference[0].rles is None else 1.0
    for ref, pred in zip(reference, candidate):
        detections += len(ref)
        if len(ref) != len(pred):
            continue
        index = paired_order(ref, pred) if len(ref) else np.zeros(0, np.int64)
        if index is None:
            continue
        same += 1
        if len(ref):
            pred = pred.select(index)
            box_diff = max(box_diff, float(np.abs(ref.boxes - pred.boxes).max()))
            score_diff = max(score_diff, float(np.abs(ref.scores - pred.scores).max()))
            if min_iou is not None:
                ious = np.diag(mask_utils.iou(pred.rles, ref.rles, [0] * len(ref)))
                min_iou = min(min_iou, float(ious.min()))
    return Agreement(len(reference), same, detections, box_diff, score_diff, min_iou)


def check_images(cfg: DictConfig, limit: int) -> list[Path]:
    """The images to check the export on: under ``input`` when given, else the run's ``eval.split``."""
    if cfg.get("input"):
        _, images = discover_images(cfg.input)
    else:
        ensure_prepared(cfg.data)
        images = [Path(r["file_name"]) for r in get_dataset_dicts(split_name(cfg.data.name, cfg.eval.split))]
    if not images:
        raise ExportError(f"no images to check the export on ({cfg.get('input') or cfg.eval.split + ' split'}); "
                          "give input=<folder of images>")
    return images[:limit]


def export_checkpoint(cfg: DictConfig, out_dir: str | os.PathLike) -> Agreement:
    """Export ``ckpt`` to ONNX beside it, after checking the graphs against PyTorch on
    ``export.check_images`` images at the checkpoint's operating point (and at the score floor,
    which sweeps use); a disagreement raises ``ExportError`` and writes nothing."""
    run_cfg = run_config(cfg)
    checkpoint = Path(run_cfg.ckpt)
    module = load_detector(checkpoint)
    adapter = module.adapter
    if not isinstance(adapter, TorchvisionDetector):
        raise ExportError(f"{checkpoint}: model {run_cfg.model.name} is not a torchvision detector; only those "
                          "export to ONNX (detectron2 has its own exporter: detectron2.export)")
    proposals = cfg.export.get("rpn_proposals")
    proposals = None if proposals is None else tuple(int(n) for n in proposals)
    fast = adapter.to("cpu").for_inference(proposals)
    mapper = DatasetMapper(run_cfg.preprocess)
    samples = [mapper.map_image(path) for path in check_images(run_cfg, int(cfg.export.check_images))]
    transform = fast.model.transform
    point = operating_point(run_cfg)
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as tmp:
        staged = Path(tmp) / onnx_path(checkpoint).name
        # contiguous weights: the graph is traced once, ONNX Runtime chooses its own layouts
        export_onnx(inference_copy(adapter.model, channels_last=False, rpn_proposals=proposals),
                    samples[0]["image"].float() / 255, staged)
        onnx = OnnxDetector(staged, adapter.num_classes, transform.min_size[-1], transform.max_size, device="cpu")
        results = {}
        with torch.inference_mode():
            for checked in (point, OperatingPoint(0.05, point.nms, point.max_detections, "score floor")):
                reference = [predict_original(fast, [s], checked)[0] for s in samples]
                candidate = [predict_original(onnx, [s], checked)[0] for s in samples]
                results[checked.min_confidence] = agreement(reference, candidate)
                logger.info("ONNX Runtime vs PyTorch at min confidence %g: %s", checked.min_confidence,
                            results[checked.min_confidence].describe())
        failed = [f"min confidence {c:g}: {a.describe()}" for c, a in results.items() if not a.ok]
        if failed:
            raise ExportError(f"{checkpoint}: the exported graphs disagree with PyTorch ({'; '.join(failed)}); "
                              "nothing was written")
        info = {"checkpoint": checkpoint.name, "checkpoint_sha256": file_sha256(checkpoint),
                "model": run_cfg.model.name, "classes": list(module.hparams.class_names), "opset": OPSET,
                "min_size": transform.min_size[-1], "max_size": transform.max_size,
                "has_masks": adapter.has_masks, "rpn_proposals": None if proposals is None else list(proposals),
                "checked_on": [s["file_name"] for s in samples],
                "agreement": {str(c): asdict(a) for c, a in results.items()}}
        written = [onnx_path(checkpoint)] + ([masks_path(onnx_path(checkpoint))] if adapter.has_masks else [])
        for target in written:  # renames within one folder: each file appears whole
            os.replace(Path(tmp) / target.name, target)
            os.chmod(target, 0o666 & ~current_umask())  # as every other output (tempfile's are 0600)
        atomic_write_text(info_path(checkpoint), json.dumps(info, indent=2))
    logger.info("exported %s", ", ".join(str(p) for p in [*written, info_path(checkpoint)]))
    return results[point.min_confidence]

