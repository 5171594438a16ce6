"""Evaluate a trained checkpoint on a registered split: metrics table, report files, overlays."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from leukodet.data.catalog import get_dataset_dicts, get_metadata
from leukodet.data.imageio import read_image
from leukodet.data.mapper import DatasetMapper
from leukodet.engine.data import make_loader
from leukodet.engine.module import DetectionModule
from leukodet.engine.predictor import predict_loader
from leukodet.evaluation.metrics import EvaluationResult, evaluate
from leukodet.evaluation.report import format_table, save_report
from leukodet.viz import draw_predictions, write_rgb


def load_detector(checkpoint: str | Path) -> DetectionModule:
    """The trained module from a Lightning checkpoint, on the GPU when there is one, in eval mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = DetectionModule.load_from_checkpoint(checkpoint, map_location=device, weights_only=False)
    return module.eval()


def evaluate_split(cfg: DictConfig, module: DetectionModule, split: str, out_dir: str | Path,
                   overlays: int = 8) -> EvaluationResult:
    """Predict ``cfg.data``'s ``split`` through the same mapper as training, score it at
    ``cfg.eval``'s operating point, print the table and write the report and a few overlays."""
    out_dir = Path(out_dir)
    name = f"{cfg.data.name}_{split}"
    records, meta = get_dataset_dicts(name), get_metadata(name)
    adapter = module.adapter
    adapter.set_thresholds(cfg.eval.min_confidence, cfg.eval.nms, cfg.eval.max_detections)
    loader = make_loader(records, DatasetMapper(cfg.preprocess), cfg.train.batch_size, False, cfg.train.num_workers)
    predictions = []
    for index, (sample, prediction) in enumerate(predict_loader(adapter, loader, desc=f"evaluating {name}")):
        predictions.append(prediction)
        if index < overlays:
            drawn = draw_predictions(read_image(sample["file_name"]), prediction, meta["thing_classes"],
                                     meta["thing_colors"])
            write_rgb(out_dir / "overlays" / f"{Path(sample['file_name']).stem}.jpg", drawn)
    result = evaluate(records, predictions, meta["thing_classes"], min_confidence=cfg.eval.min_confidence,
                      iou_threshold=cfg.eval.iou_threshold)
    save_report(result, out_dir, prefix=f"{split}_")
    print(f"\n{name}: {len(records)} images, min confidence {cfg.eval.min_confidence}, NMS {cfg.eval.nms}, "
          f"{result.iou_type} IoU >= {cfg.eval.iou_threshold}")
    print(format_table(result))
    return result
