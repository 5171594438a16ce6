"""The one training loop: a LightningModule around any registered detector adapter.

Lightning gives the loop, checkpoints (last / best by a named metric), resume, DDP, AMP, loggers
and the progress bar; this module only says what a step, a validation pass and the optimiser are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

import leukodet.integrations.detectron2  # noqa: F401  (registers detectron2's models; imports it lazily)
import leukodet.models  # noqa: F401  (registers the adapters)
from leukodet.engine.predictor import predict_original
from leukodet.registry import MODELS
from leukodet.structures import OperatingPoint


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str,
              milestones: Sequence[float] = (0.7, 0.9), gamma: float = 0.1) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine to 0 or steps of ``gamma``
    at the given fractions of training."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"train.schedule={schedule!r}: choose cosine, step or constant")


class DetectionModule(L.LightningModule):
    """Trains an adapter (``losses``/``predict`` protocol) and validates it with the evaluator."""

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any], class_names: Sequence[str],
                 box_only: bool, evaluate_fn=None, validation_point: OperatingPoint = OperatingPoint(),
                 trained_scale: Mapping[str, Any] | None = None, validation_tiling=None):
        super().__init__()
        # Saved in every checkpoint: enough to rebuild the model for evaluation and inference, and
        # the cell scale it was trained at (leukodet.engine.tiling.TrainedScale; None before it existed).
        self.save_hyperparameters({"model_cfg": dict(model_cfg), "optim_cfg": dict(optim_cfg),
                                   "class_names": list(class_names), "box_only": box_only,
                                   "trained_scale": None if trained_scale is None else dict(trained_scale)})
        self.adapter = MODELS.build(model_cfg, num_classes=len(class_names), masks=not box_only)
        self.optim_cfg = dict(optim_cfg)
        self.class_names = list(class_names)
        self.evaluate_fn = evaluate_fn  # (dataset_dicts, predictions) -> {metric: value}
        self.validation_point = validation_point
        self.validation_tiling = validation_tiling  # a model trained on windows is validated in tiles (Tiling)
        self._val_records: list[dict] = []
        self._val_predictions: list = []

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        losses = self.adapter.losses(batch)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=len(batch))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        # the validation loss the seed compares with training; no BatchNorm statistics change
        losses = self.adapter.validation_losses(batch)
        self.log("val/loss", sum(losses.values()), prog_bar=True, batch_size=len(batch), sync_dist=True)
        if self.evaluate_fn is not None:
            # down to the scoring floor: AP over all scores; the evaluator applies min confidence
            self._val_predictions.extend(predict_original(self.adapter, batch, self.validation_point.scored(),
                                                          self.validation_tiling))
            self._val_records.extend(sample["record"] for sample in batch)

    def on_validation_epoch_end(self) -> None:
        if self.evaluate_fn is None:
            return
        records, predictions = self._val_records, self._val_predictions
        if self.trainer.world_size > 1:  # DDP: every rank scores the whole split, so all log the same
            shards = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(shards, (records, predictions))
            records = [r for shard_records, _ in shards for r in shard_records]
            predictions = [p for _, shard_predictions in shards for p in shard_predictions]
        if not records:
            return
        metrics = self.evaluate_fn(records, predictions)
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, prog_bar=False)
        self._val_records, self._val_predictions = [], []

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        if cfg["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                                        weight_decay=cfg["weight_decay"])
        elif cfg["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        else:
            raise ValueError(f"train.optimizer={cfg['optimizer']!r}: choose sgd or adamw")
        total = cfg["max_steps"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, cfg["warmup_steps"], total, cfg["schedule"], cfg["milestones"], cfg["gamma"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
