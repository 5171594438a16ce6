"""Evaluate a trained checkpoint on a registered split: metrics table, report files, overlays,
threshold sweeps and the count-accuracy table from cached raw predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata
from leukodet.data.imageio import read_image
from leukodet.data.mapper import DatasetMapper
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.data import make_loader
from leukodet.engine.module import DetectionModule
from leukodet.engine.predictor import predict_loader
from leukodet.evaluation.counts import CountTable, count_table
from leukodet.evaluation.metrics import EvaluationResult, evaluate
from leukodet.evaluation.predictions import ImagePredictions
from leukodet.evaluation.report import format_table, format_touching, save_report
from leukodet.evaluation.sweep import (cache_key, load_raw, plot_heatmap, refilter, save_raw, save_thresholds,
                                       sweep)
from leukodet.io import atomic_write_text
from leukodet.models.base import RAW_MAX_DETECTIONS, RAW_SCORE_FLOOR, scoring_floor
from leukodet.viz import draw_predictions, write_rgb


def load_detector(checkpoint: str | Path) -> DetectionModule:
    """The trained module from a Lightning checkpoint, on the GPU when there is one, in eval mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = DetectionModule.load_from_checkpoint(checkpoint, map_location=device, weights_only=False)
    return module.eval()


def predict_split(cfg: DictConfig, module: DetectionModule, records: list[dict], desc: str) -> list[ImagePredictions]:
    """Predictions for ``records`` through the training mapper's preprocessing, at the adapter's
    current thresholds."""
    loader = make_loader(records, DatasetMapper(cfg.preprocess), cfg.train.batch_size, False, cfg.train.num_workers)
    return [prediction for _, prediction in predict_loader(module.adapter, loader, desc=desc)]


def report(cfg: DictConfig, name: str, records: list[dict], predictions: list[ImagePredictions], out_dir: Path,
           prefix: str, overlays: int = 8) -> EvaluationResult:
    """Score ``predictions`` (down to the scoring floor) at ``cfg.eval.min_confidence``, print the
    table, write the report files and the first ``overlays`` overlays (at min confidence)."""
    meta = get_metadata(name)
    for record, prediction in list(zip(records, predictions))[:overlays]:
        shown = prediction.select(np.nonzero(prediction.scores > cfg.eval.min_confidence)[0])
        drawn = draw_predictions(read_image(record["file_name"]), shown, meta["thing_classes"], meta["thing_colors"])
        write_rgb(out_dir / "overlays" / f"{Path(record['file_name']).stem}.jpg", drawn)
    result = evaluate(records, predictions, meta["thing_classes"], min_confidence=cfg.eval.min_confidence,
                      iou_threshold=cfg.eval.iou_threshold)
    save_report(result, out_dir, prefix=prefix)
    print(f"\n{name}: {len(records)} images, min confidence {cfg.eval.min_confidence} (AP over scores > "
          f"{scoring_floor(cfg.eval.min_confidence):g}), NMS {cfg.eval.nms}, {result.iou_type} IoU >= {cfg.eval.iou_threshold}")
    print(format_table(result))
    print(format_touching(result))
    return result


def evaluate_split(cfg: DictConfig, module: DetectionModule, split: str, out_dir: str | Path) -> EvaluationResult:
    """Predict ``split`` down to the scoring floor with ``cfg.eval``'s NMS and cap, and report at its
    min confidence (used at the end of training)."""
    name = f"{cfg.data.name}_{split}"
    records = get_dataset_dicts(name)
    module.adapter.set_thresholds(scoring_floor(cfg.eval.min_confidence), cfg.eval.nms, cfg.eval.max_detections)
    predictions = predict_split(cfg, module, records, f"evaluating {name}")
    return report(cfg, name, records, predictions, Path(out_dir), prefix=f"{split}_")


def run_config(cfg: DictConfig) -> DictConfig:
    """The checkpoint's training config (data, preprocessing, model) with this command's eval,
    train.batch_size/num_workers and paths: preprocessing can never differ from training."""
    checkpoint = Path(cfg.ckpt)
    saved = checkpoint.parent.parent / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} not found: ckpt must be a checkpoint inside a leukodet run directory")
    trained = OmegaConf.load(saved)
    return OmegaConf.merge(trained, {"eval": {**cfg.eval, "split": cfg.get("split") or cfg.eval.split},
                                     "paths": cfg.paths, "ckpt": cfg.ckpt, "sweep": cfg.sweep})


def cached_raw_predictions(cfg: DictConfig, module: DetectionModule, split: str) -> tuple[list[dict], list]:
    """The split's raw predictions (floor, no NMS, high cap) from the cache next to the checkpoint,
    computed once per checkpoint, split and preprocessing."""
    name = f"{cfg.data.name}_{split}"
    records = get_dataset_dicts(name)
    # keyed by the registered name, not the split alone: one checkpoint can score other datasets' splits
    key = cache_key(cfg.ckpt, name, OmegaConf.to_container(cfg.preprocess, resolve=True))
    path = Path(cfg.ckpt).parent / "cache" / f"raw_{split}_{key}.pkl"
    if path.is_file():
        return records, load_raw(path)["predictions"]
    with module.adapter.raw_predictions(RAW_SCORE_FLOOR, RAW_MAX_DETECTIONS):
        raw = predict_split(cfg, module, records, f"raw predictions {name}")
    save_raw(path, raw, RAW_SCORE_FLOOR, RAW_MAX_DETECTIONS)
    print(f"cached raw predictions: {path}")
    return records, raw


def evaluate_checkpoint(cfg: DictConfig, out_dir: str | Path):
    """`tools/evaluate.py`: score ``cfg.ckpt`` on ``cfg.eval.split`` at ``cfg.eval``'s point, or
    with ``cfg.sweep`` over the eval.sweep_* grid (writing sweep.csv, a heatmap and
    thresholds.json next to the checkpoint). Both re-filter the cached raw predictions."""
    cfg = run_config(cfg)
    out_dir = Path(out_dir)
    ensure_prepared(cfg.data)
    module = load_detector(cfg.ckpt)
    split = cfg.eval.split
    name = f"{cfg.data.name}_{split}"
    records, raw = cached_raw_predictions(cfg, module, split)
    if not cfg.sweep:
        predictions = [refilter(r, scoring_floor(cfg.eval.min_confidence), cfg.eval.nms, cfg.eval.max_detections) for r in raw]
        return report(cfg, name, records, predictions, out_dir, prefix=f"{split}_")
    metric = cfg.eval.sweep_metric
    table, best = sweep(records, raw, get_metadata(name)["thing_classes"], list(cfg.eval.sweep_min_confidence),
                        list(cfg.eval.sweep_nms), cfg.eval.max_detections, metric)
    atomic_write_text(out_dir / f"sweep_{split}.csv", table.to_csv(index=False))
    plot_heatmap(table, metric, out_dir / f"sweep_{split}_{metric}.png")
    thresholds = save_thresholds(Path(cfg.ckpt).parent / "thresholds.json", {**best, "split": split})
    columns = ["min_confidence", "nms", "precision", "recall", "f1", "ap50_segm" if "ap50_segm" in table else "ap50_bbox"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"best {metric} = {best['value']:.4f} at min confidence {best['min_confidence']}, NMS {best['nms']}; "
          f"saved {thresholds}")
    return table, best


def count_table_checkpoint(cfg: DictConfig, out_dir: str | Path) -> CountTable:
    """`tools/count_table.py`: the count-accuracy table of ``cfg.ckpt`` on ``cfg.eval.split`` at each
    ``eval.count_min_confidence`` (NMS ``eval.nms``), from the cached raw predictions; writes
    ``count_table_<split>.csv`` and ``count_summary_<split>.csv`` into ``out_dir`` and prints both."""
    cfg = run_config(cfg)
    out_dir = Path(out_dir)
    ensure_prepared(cfg.data)
    split = cfg.eval.split
    name = f"{cfg.data.name}_{split}"
    records, raw = cached_raw_predictions(cfg, load_detector(cfg.ckpt), split)
    table = count_table(records, raw, get_metadata(name)["thing_classes"], list(cfg.eval.count_min_confidence),
                        cfg.eval.nms, cfg.eval.max_detections, cfg.eval.iou_threshold)
    atomic_write_text(out_dir / f"count_table_{split}.csv", table.per_image.to_csv(index=False))
    atomic_write_text(out_dir / f"count_summary_{split}.csv", table.summary.to_csv(index=False))
    print(f"\n{name}: {len(records)} images, count accuracy = min(segmented, true) / true, NMS {cfg.eval.nms}")
    print(table.format())
    return table
