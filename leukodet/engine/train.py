"""``train(cfg)``: prepare data, fit any registered model in the one loop, evaluate on the test split."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata, split_name
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.curves import plot_loss_curves
from leukodet.engine.data import make_loader
from leukodet.engine.evaluate import load_detector, score_split
from leukodet.engine.module import DetectionModule
from leukodet.evaluation.metrics import evaluate
from leukodet.io import atomic_write_text
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.registry import METRICS
from leukodet.structures import OperatingPoint

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: str
    best_score: float | None


def best_metric_name(train_cfg, box_only: bool) -> str:
    name = train_cfg.best_metric
    if name == "auto":
        return "val/ap50_bbox" if box_only else "val/ap50_segm"
    return name if name.startswith("val/") else f"val/{name}"


def best_metric_mode(metric: str) -> str:
    """``max`` or ``min``, from the named metric's direction (``val/loss`` is a loss)."""
    key = metric.removeprefix("val/")
    if key == "loss":
        return "min"
    return "max" if METRICS.get(key).higher_is_better else "min"


def trained_point(cfg: DictConfig) -> OperatingPoint:
    """The operating point a training run validates and is tested at: its own ``eval``."""
    return OperatingPoint(cfg.eval.min_confidence, cfg.eval.nms, cfg.eval.max_detections, "training run's eval")


def precision_for(setting: str) -> str:
    if setting != "auto":
        return setting
    return "16-mixed" if torch.cuda.is_available() else "32-true"


def fit(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``'s train split, validating on val; resume if a
    ``last.ckpt`` is in ``run_dir``. Returns the checkpoints written."""
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    ensure_prepared(cfg.data)
    name = cfg.data.name
    meta = get_metadata(split_name(name, "train"))
    classes, box_only = meta["thing_classes"], meta["box_only"]
    train_mapper = DatasetMapper(cfg.preprocess, cfg.augment, is_train=True)
    eval_mapper = DatasetMapper(cfg.preprocess, None, is_train=False)
    tcfg = cfg.train
    train_loader = make_loader(get_dataset_dicts(split_name(name, "train")), train_mapper, tcfg.batch_size, True,
                               tcfg.num_workers, cfg.seed)
    val_loader = make_loader(get_dataset_dicts(split_name(name, "val")), eval_mapper, tcfg.batch_size, False,
                             tcfg.num_workers, cfg.seed)

    point = trained_point(cfg)

    def evaluate_fn(records, predictions):
        return evaluate(records, predictions, classes, min_confidence=point.min_confidence,
                        iou_threshold=cfg.eval.iou_threshold, share_class=cfg.eval.share_class).summary()

    optim_cfg = OmegaConf.to_container(tcfg, resolve=True, enum_to_str=True)  # plain data in the checkpoint
    module = DetectionModule(OmegaConf.to_container(cfg.model, resolve=True), optim_cfg, classes, box_only,
                             evaluate_fn, point)
    metric = best_metric_name(tcfg, box_only)
    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(checkpoints, filename="best", monitor=metric, mode=best_metric_mode(metric), save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False)
    last = ModelCheckpoint(checkpoints, filename="last", every_n_train_steps=tcfg.checkpoint_every_steps,
                           save_top_k=1, enable_version_counter=False)
    trainer = L.Trainer(
        default_root_dir=run_dir, max_steps=tcfg.max_steps, max_epochs=-1,
        accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy,
        precision=precision_for(tcfg.precision), gradient_clip_val=tcfg.grad_clip,
        val_check_interval=tcfg.steps_per_epoch, check_val_every_n_epoch=None,
        limit_val_batches=tcfg.validation_steps or 1.0, num_sanity_val_steps=0,
        log_every_n_steps=min(10, tcfg.steps_per_epoch),
        logger=[CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="tensorboard", version="")],
        callbacks=[best, last, LearningRateMonitor("step")],
    )
    resume_from = checkpoints / "last.ckpt"
    ckpt_path = str(resume_from) if tcfg.resume and resume_from.is_file() else None
    if ckpt_path:
        logger.info("resuming from %s", ckpt_path)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    trainer.save_checkpoint(resume_from)  # the final state, whatever the step cadence
    score = best.best_model_score
    return TrainResult(run_dir, Path(best.best_model_path or resume_from), resume_from, metric,
                       None if score is None else float(score))


def train_and_evaluate(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """The main job: fit, draw the loss curves, evaluate the best checkpoint on the test split."""

    start = time.perf_counter()
    result = fit(cfg, run_dir)
    metrics_csv = result.run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        plot_loss_curves(metrics_csv, result.run_dir / "loss_curves.png")
    module = load_detector(result.best_checkpoint)
    score_split(cfg, module, result.best_checkpoint, cfg.eval.split, trained_point(cfg), result.run_dir)
    logger.info("best %s = %s (%s); total %.0f s", result.best_metric, result.best_score,
                result.best_checkpoint.name, time.perf_counter() - start)
    return result
