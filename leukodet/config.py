"""Typed schemas for the config groups whose values the loop uses directly, so that a wrong type
fails at composition with the key and the value (Hydra/OmegaConf validate against these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class TrainSchema:
    max_steps: int = 200
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_steps: int = 20
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.7, 0.9])
    gamma: float = 0.1
    grad_clip: Optional[float] = 10.0
    steps_per_epoch: int = 100
    validation_steps: Optional[int] = None
    checkpoint_every_steps: int = 25
    best_metric: str = "auto"
    num_workers: int = 1
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    precision: str = "auto"
    resume: bool = True
    run_dir: Optional[str] = None


@dataclass
class EvalSchema:
    # the operating point; null (in the checkpoint tools' config) means "not given on the command line"
    min_confidence: Optional[float] = 0.5
    nms: Optional[float] = 0.5
    max_detections: Optional[int] = 300
    iou_threshold: float = 0.5
    share_class: Optional[str] = None
    split: str = "test"
    sweep_min_confidence: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    sweep_nms: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.5])
    sweep_metric: str = "f1"
    count_min_confidence: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9])


@dataclass
class InferSchema:
    out_dir: str = MISSING
    overwrite: bool = False
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    overlays: bool = True
    flag_share: float = 0.2
    max_megapixels: float = 100.0


def input_name(path: Any) -> str:
    """``${input_name:${input}}``: the input folder's (or file's) name, for a stable output folder."""
    return Path(str(path)).resolve().name if path else "no_input"


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(group="train", name="schema", node=TrainSchema)
    store.store(group="eval", name="schema", node=EvalSchema)
    store.store(group="infer", name="schema", node=InferSchema)
    OmegaConf.register_new_resolver("input_name", input_name, replace=True)


register_schemas()
