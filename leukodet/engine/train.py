"""``train(cfg)``: prepare data, fit any registered model in the one loop, evaluate on the test split."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata, split_name
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.console import LogProgress, output_is_terminal, quiet_third_party_noise
from leukodet.engine.curves import plot_loss_curves
from leukodet.engine.data import make_loader
from leukodet.engine.evaluate import CheckpointError, choose_on_val, load_detector, score_split
from leukodet.engine.module import DetectionModule
from leukodet.engine.tiling import Tiling, measure_trained_scale
from leukodet.evaluation.metrics import evaluate
from leukodet.io import UnreadableFileError, UnsafeFileError, atomic_open, atomic_write_text, load_tensor_file
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.registry import METRICS
from leukodet.report import write_run_report
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
    return OperatingPoint(cfg.eval.min_confidence, cfg.eval.nms, cfg.eval.max_detections, "training run's eval",
                          tuple(cfg.eval.get("class_bias") or ()), cfg.eval.get("cross_class_nms"))


# What may change when a run resumes: how long it runs, where, on what hardware and how it is fed,
# and what other tools read (paths, infer, ...). Anything else would make one run of two.
RESUME_MAY_CHANGE = ("train.max_steps", "train.run_dir", "train.resume", "train.num_workers", "train.devices",
                     "train.progress_every_steps", "train.choose_point",
                     "train.accelerator", "train.strategy", "paths", "infer", "ckpt", "input", "split", "sweep")


# Keys added to the config after runs were saved, with the value that reproduces what those runs
# did: a saved config.yaml without one reads as having it, so older runs still resume.
ADDED_KEYS = {"eval.class_bias": None, "eval.cross_class_nms": None, "eval.sweep_class_bias": [0.0], "eval.tiling": False, "train.cell_px": None}


class RunConfigError(ValueError):
    """A run directory trained with another config than the one given now."""


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.01, "preprocess.steps": [...], ...}``: a config as plain data (enums as
    their names, as config.yaml stores them), one entry per leaf; lists are compared whole."""
    plain = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)), resolve=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(plain, "")
    return flat


def config_differences(saved: Any, given: Any) -> list[str]:
    """The keys (outside ``RESUME_MAY_CHANGE``) whose values differ between two configs (``saved``
    read with ``ADDED_KEYS`` where it lacks them)."""
    before, now = {**ADDED_KEYS, **flat_config(saved)}, flat_config(given)
    missing = object()
    return sorted(key for key in before.keys() | now.keys()
                  if not any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE)
                  and before.get(key, missing) != now.get(key, missing))


def resume_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """The step a run resumes from (``last.ckpt``'s), or None for a fresh start. Refuses, before
    anything is written, a run directory trained with another config, and a ``last.ckpt`` that
    cannot be read; both name ``train.resume=false``, which starts that folder again from step 0."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not cfg.train.resume or not last.is_file():
        return None
    fresh = (f"pass train.resume=false to train again from step 0 in {run_dir} (replacing its checkpoints and "
             f"log), or train.run_dir=... for a new folder")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        changed = config_differences(OmegaConf.load(saved), cfg)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise RunConfigError(f"{saved}: this run was trained with other settings ({shown} differ); resuming "
                                 f"would make one run of two: {fresh}")
    try:
        state = load_tensor_file(last)
    except (UnreadableFileError, UnsafeFileError) as err:
        raise CheckpointError(f"{err}; cannot resume from it (nothing was changed): {fresh}") from None
    return int(state.get("global_step", 0))


class KeepingCsvWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, changed to lose nothing: it never deletes the file of an
    earlier attempt (Lightning's does, when a run resumes in its folder), keeps that attempt's rows
    before the step the run resumes from (later ones are logged again), and rewrites the whole
    file atomically on each save, so a kill leaves the last whole file."""

    def __init__(self, log_dir: str, resume_from: int | None):
        super().__init__(log_dir)
        self.rows = self._earlier_rows(resume_from)

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning deletes metrics.csv here

    def _earlier_rows(self, resume_from: int | None) -> list[dict]:
        path = Path(self.metrics_file_path)
        if resume_from is None or not path.is_file():
            return []  # a fresh start: the old file stays until the first save replaces it
        with path.open(newline="") as handle:
            rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
        return [row for row in rows if float(row.get("step", "inf")) < resume_from]

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        atomic_write_text(Path(self.log_dir) / self.NAME_HPARAMS_FILE, OmegaConf.to_yaml(OmegaConf.create(
            OmegaConf.to_container(OmegaConf.create(self.hparams)))))

    def save(self) -> None:
        if not self.metrics:
            return
        self.rows.extend({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in self.metrics)
        self.metrics = []
        self.metrics_keys = sorted(set().union(*self.rows))
        with atomic_open(self.metrics_file_path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(self.rows)


class KeepingCsvLogger(CSVLogger):
    """``logs/metrics.csv`` through ``KeepingCsvWriter``, flushed whenever a checkpoint is saved,
    so every row before a checkpoint's step is on disk when a kill makes the run resume from it."""

    def __init__(self, run_dir: Path, resume_from: int | None):
        super().__init__(run_dir, name="logs", version="")
        self._resume_from = resume_from

    @property
    @rank_zero_experiment
    def experiment(self) -> KeepingCsvWriter:
        if self._experiment is None:
            Path(self.root_dir).mkdir(parents=True, exist_ok=True)
            self._experiment = KeepingCsvWriter(self.log_dir, self._resume_from)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()


def precision_for(setting: str) -> str:
    if setting != "auto":
        return setting
    return "16-mixed" if torch.cuda.is_available() else "32-true"


def fit(cfg: DictConfig, run_dir: str | Path, extra_train: Sequence[dict] = (),
        init_weights: dict | None = None, callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``'s train split (and ``extra_train``, more dataset dicts),
    validating on val; resume if a ``last.ckpt`` is in ``run_dir``, else start from ``init_weights``
    (a state dict) when given; ``callbacks``: more Lightning callbacks (adaptation's mean teacher).
    Returns the checkpoints written."""
    run_dir = Path(run_dir)
    resume_from = resume_step(cfg, run_dir)  # refuses before anything in run_dir changes
    L.seed_everything(cfg.seed, workers=True)
    ensure_prepared(cfg.data)
    name = cfg.data.name
    meta = get_metadata(split_name(name, "train"))
    classes, box_only = meta["thing_classes"], meta["box_only"]
    train_records = get_dataset_dicts(split_name(name, "train"))
    scale = measure_trained_scale(cfg, train_records)
    fixed = scale is not None and scale.fixed  # windows at one cell size (train.cell_px), validated in tiles
    train_mapper = DatasetMapper(cfg.preprocess, cfg.augment, is_train=True,
                                 cell_scale=scale.cell_scale(random_crop=True) if fixed else None)
    eval_mapper = DatasetMapper(cfg.preprocess, None, is_train=False,
                                cell_scale=scale.cell_scale(random_crop=False) if fixed else None)
    if fixed:
        logger.info("training at %.0f px a cell in %d px windows (cells in the files: %s)", scale.network_cell_px,
                    scale.network_px, ", ".join(f"{s or 'all'} {d:.0f} px" for s, d in scale.source_cell_px.items()))
    tcfg = cfg.train
    train_loader = make_loader([*train_records, *extra_train], train_mapper,
                               tcfg.batch_size, True, tcfg.num_workers, cfg.seed,
                               class_balanced=tcfg.sampler == "class_balanced")
    val_loader = make_loader(get_dataset_dicts(split_name(name, "val")), eval_mapper, tcfg.batch_size, False,
                             tcfg.num_workers, cfg.seed)

    point = trained_point(cfg)

    def evaluate_fn(records, predictions):
        return evaluate(records, predictions, classes, min_confidence=point.min_confidence,
                        iou_threshold=cfg.eval.iou_threshold, share_class=cfg.eval.share_class).summary()

    optim_cfg = OmegaConf.to_container(tcfg, resolve=True, enum_to_str=True)  # plain data in the checkpoint
    module = DetectionModule(OmegaConf.to_container(cfg.model, resolve=True), optim_cfg, classes, box_only,
                             evaluate_fn, point, None if scale is None else scale.as_dict(),
                             validation_tiling=Tiling(scale) if fixed else None)
    metric = best_metric_name(tcfg, box_only)
    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(checkpoints, filename="best", monitor=metric, mode=best_metric_mode(metric), save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False)
    last = ModelCheckpoint(checkpoints, filename="last", every_n_train_steps=tcfg.checkpoint_every_steps,
                           save_top_k=1, enable_version_counter=False)
    quiet_third_party_noise()
    terminal = output_is_terminal()  # else a line every train.progress_every_steps steps (a log file, CI)
    trainer = L.Trainer(
        default_root_dir=run_dir, max_steps=tcfg.max_steps, max_epochs=-1,
        accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy,
        precision=precision_for(tcfg.precision), gradient_clip_val=tcfg.grad_clip,
        val_check_interval=tcfg.steps_per_epoch, check_val_every_n_epoch=None,
        limit_val_batches=tcfg.validation_steps or 1.0, num_sanity_val_steps=0,
        log_every_n_steps=min(10, tcfg.steps_per_epoch),
        logger=[KeepingCsvLogger(run_dir, resume_from), TensorBoardLogger(run_dir, name="tensorboard", version="")],
        callbacks=[best, last, LearningRateMonitor("step"),
                   *([] if terminal else [LogProgress(tcfg.progress_every_steps)]), *callbacks],
        enable_progress_bar=terminal, enable_model_summary=False,  # its one-row table: the line below says it
    )
    if init_weights is not None:
        module.load_state_dict(init_weights)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    logger.info("model %s: %.1f M parameters, %.1f M trained", cfg.model.name,
                sum(p.numel() for p in module.parameters()) / 1e6, trainable / 1e6)
    last_ckpt = checkpoints / "last.ckpt"
    ckpt_path = str(last_ckpt) if resume_from is not None else None
    if ckpt_path:
        logger.info("resuming from %s (step %d)", ckpt_path, resume_from)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # after resume_step's check
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)
    trainer.save_checkpoint(last_ckpt, weights_only=False)  # the final, full state (resumable), whatever the cadence
    score = best.best_model_score
    return TrainResult(run_dir, Path(best.best_model_path or last_ckpt), last_ckpt, metric,
                       None if score is None else float(score))


def train_and_evaluate(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """The main job: fit, draw the loss curves, choose the best checkpoint's operating point on val
    (``train.choose_point``), then score the test split once, at that point."""

    start = time.perf_counter()
    result = fit(cfg, run_dir)
    metrics_csv = result.run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        plot_loss_curves(metrics_csv, result.run_dir / "loss_curves.png")
    module = load_detector(result.best_checkpoint)
    point = trained_point(cfg)
    if cfg.train.choose_point:  # ready to use: the checkpoint tools read the chosen point from thresholds.json
        point, _ = choose_on_val(cfg, module, result.best_checkpoint, result.run_dir)
    score_split(cfg, module, result.best_checkpoint, cfg.eval.split, point, result.run_dir)
    if cfg.eval.report:
        write_run_report(result.run_dir, cfg.eval.split, point=point)
    logger.info("best %s = %s (%s); total %.0f s", result.best_metric, result.best_score,
                result.best_checkpoint.name, time.perf_counter() - start)
    return result
