"""`tools/adapt.py`: a trained run adapted to a new acquisition from its unlabelled images (or a
few labelled ones: ``labelled_fine_tuning``).

Four unlabelled options, each measured by leaving one acquisition out in both directions (README, Adapting to
a new scanner): a stain normalization step mapping every image's colours onto the training images'
(``preprocess.steps.stain_normalize``, its reference fitted here on the run's train split), AdaBN
(``models.adapt.adapt_batchnorm``: the backbone's BatchNorm statistics re-estimated on the new
images), and pseudo-label self-training (``self_train``: the model's confident detections on the new
images become their labels, and it is fine-tuned on them with its own train split; offline, one
round, or online with a mean teacher, ``MeanTeacher``), and the class boundary moved to the new
images (``class_boundary_shift``: the valley of the cells' class margins, ``evaluation.boundary``,
added to the point's class bias). The result is a
run directory like a trained one: ``config.yaml`` (the run's, with the stain step in its
preprocessing and an ``adapted`` block saying what was done) and ``checkpoints/<name>.ckpt`` (the
adapted weights) beside a copy of ``thresholds.json``, so evaluate, count_table, infer and export
take it as they take any checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from torchvision.ops import nms
from tqdm import tqdm

from leukodet.data.catalog import get_dataset_dicts, get_metadata, split_name
from leukodet.data.coco import load_dataset_dicts, write_coco
from leukodet.data.imageio import image_size, read_image
from leukodet.data.pipeline import ensure_prepared
from leukodet.data.records import POLYGON, ImageRecord, Region
from leukodet.data.via_export import mask_polygon
from leukodet.engine.evaluate import (bias_class, choose_on_val, load_detector, operating_point, predict_split,
                                      read_checkpoint, require_bias_per_class, run_config)
from leukodet.engine.inference.discovery import discover_images
from leukodet.engine.module import DetectionModule
from leukodet.engine.train import RunConfigError, fit
from leukodet.evaluation.boundary import MIN_CELLS, ROUGH_CELLS, class_margins, otsu_threshold, reference_valley
from leukodet.evaluation.sweep import load_thresholds, one_class_bias, save_thresholds
from leukodet.io import atomic_write_text
from leukodet.models.adapt import adapt_batchnorm
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.preprocess.steps import STAIN_METHODS, fit_stain_reference
from leukodet.structures import RAW, Detections, OperatingPoint

logger = logging.getLogger(__name__)

STAIN_STEP = "stain_normalize"
TARGET_SOURCE = "unlabelled target"  # the source of the new images a mean teacher labels as training goes
BOUNDARY_MOVES = ("none", "otsu")  # adapt.class_bias and crossval.calibration.fine_tune.class_bias
TRAINING_ONLY = ("optimizer_states", "lr_schedulers", "loops", "callbacks")  # an adapted checkpoint does not resume


def sample(items: list, n: int, seed: int) -> list:
    """At most ``n`` of ``items``, drawn at random (fixed by ``seed``), in their order."""
    if len(items) <= n:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def with_stain_step(preprocess: DictConfig, method: str, reference: dict) -> DictConfig:
    """``preprocess`` with the stain step after its leading ``scale`` (replacing one already there)."""
    steps = [s for s in OmegaConf.to_container(preprocess.steps, resolve=True) if s["name"] != STAIN_STEP]
    at = 1 if steps and steps[0]["name"] == "scale" else 0
    steps.insert(at, {"name": STAIN_STEP, "method": method, "reference": reference})
    adapted = OmegaConf.to_container(preprocess, resolve=True)
    adapted["steps"] = steps
    return OmegaConf.create(adapted)


def predict_images(run_cfg: DictConfig, module: DetectionModule, images: list[Path], point: OperatingPoint,
                   desc: str) -> list:
    """``module``'s predictions on image files (no record of theirs), cut at ``point``."""
    return predict_split(run_cfg, module, [{"file_name": str(p), "image_id": i} for i, p in enumerate(images)], point,
                         desc)


def pseudo_labels(run_cfg: DictConfig, module: DetectionModule, images: list[Path], point: OperatingPoint,
                  path: Path) -> list[dict]:
    """``images`` labelled by ``module``'s detections at ``point`` (each mask's largest part as its
    outline, as a person would click it), written as COCO to ``path`` for a look, and returned as
    dataset dicts for training."""
    classes = get_metadata(split_name(run_cfg.data.name, "train"))["thing_classes"]
    predictions = predict_images(run_cfg, module, images, point, "pseudo-labels")
    records = []
    for image, prediction in zip(images, predictions):
        outlines = [(label, mask_polygon(mask_utils.decode(rle))) for label, rle in
                    zip(prediction.labels, prediction.rles or [])]
        width, height = image_size(image)
        records.append(ImageRecord(str(image), [Region(classes[label], POLYGON, outline.astype(np.float64))
                                                for label, outline in outlines if outline is not None],
                                   width, height, source="pseudo-labels"))
    write_coco(path, records, classes)
    return load_dataset_dicts(path)[0]


class MeanTeacher(L.Callback):
    """Online pseudo-label self-training (mean teacher, Tarvainen & Valpola 2017, as Unbiased Teacher
    uses it for detection): a teacher, the moving average of the model's weights (``decay`` a
    step), labels each new image of a batch with its detections at ``point`` as the model is about
    to be trained on it (after augmentation, so labels and pixels agree; at the scale the model
    trains at); the model learns from them beside its own train split, and the teacher follows it.
    Training ends with the teacher's weights in the model: they move slowly, so they are the steadier
    of the two. The teacher rides in the run's checkpoints, so a resumed run resumes it too.
    ``cells`` / ``images``: the labels it gave, over the new images it was shown."""

    def __init__(self, point: OperatingPoint, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"adapt.self_training.ema_decay={decay}: give a value between 0 and 1 (e.g. 0.99)")
        self.point, self.decay = point, decay
        self.teacher = None
        self.cells = self.images = 0
        self._resumed = None  # the teacher's weights from a checkpoint, until training starts

    def on_train_start(self, trainer, module) -> None:
        self.teacher = copy.deepcopy(module.adapter).eval().requires_grad_(False)
        if self._resumed is not None:
            self.teacher.load_state_dict(self._resumed)
            self._resumed = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        new = [sample for sample in batch if sample["record"].get("source") == TARGET_SOURCE]
        if not new:
            return
        for sample, found in zip(new, self.teacher.predict(new, self.point.detector_cut())):
            if self.point.cross_class_nms is not None and len(found):  # the detector suppresses within classes
                keep = nms(found.boxes, found.scores, self.point.cross_class_nms)
                found = Detections(found.boxes[keep], found.scores[keep], found.labels[keep],
                                   None if found.masks is None else found.masks[keep])
            sample["instances"] = {"boxes": found.boxes, "labels": found.labels,
                                   "masks": None if found.masks is None else found.masks.to(torch.uint8)}
            self.cells += len(found)
        self.images += len(new)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        student = module.adapter.state_dict()
        for name, value in self.teacher.state_dict().items():  # the state dict's tensors are the teacher's own
            if value.is_floating_point():
                value.lerp_(student[name], 1 - self.decay)
            else:
                value.copy_(student[name])

    def on_train_end(self, trainer, module) -> None:
        module.adapter.load_state_dict(self.teacher.state_dict())

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "cells": self.cells, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self._resumed, self.cells, self.images = state["teacher"], state["cells"], state["images"]


def self_train(run_cfg: DictConfig, trained: DictConfig, module: DetectionModule, images: list[Path],
               settings: DictConfig, out_dir: Path) -> tuple[DetectionModule, int]:
    """Pseudo-label self-training: the model fine-tuned from its weights on its train split plus the
    new images (``train.lr`` x ``settings.lr_factor``, ``settings.steps`` steps; the run in
    ``out_dir``), the new images labelled by its own detections at its operating point with min
    confidence raised to ``settings.min_confidence``. Offline (Lee 2013), the default: labelled once,
    before, by the model as trained (``pseudo_labels``). ``settings.mean_teacher``: labelled at
    every step by a moving average of the model being tuned (``MeanTeacher``, ``settings.ema_decay``).
    Returns the fine-tuned model (its last checkpoint) and the number of pseudo-labelled cells."""
    point = operating_point(run_cfg)
    point = replace(point, min_confidence=max(point.min_confidence, float(settings.min_confidence)),
                    source="pseudo-labels")
    teacher = None
    if settings.get("mean_teacher"):
        # the teacher cuts its raw scores: a class bias moves counts at the point, not what is a cell
        teacher = MeanTeacher(replace(point, class_bias=(), source="mean teacher"), float(settings.ema_decay))
        labelled = []  # the new images, unlabelled: the teacher labels them batch by batch
        for i, image in enumerate(images):
            width, height = image_size(image)
            labelled.append({"file_name": str(image), "image_id": -1 - i, "width": width, "height": height,
                             "annotations": [], "source": TARGET_SOURCE})
        logger.info("mean teacher on %d new images (%s, weights averaged at %g a step); fine-tuning %d steps",
                    len(labelled), teacher.point.describe(), teacher.decay, settings.steps)
    else:
        labelled = pseudo_labels(run_cfg, module, images, point, out_dir / "pseudo_labels.json")
        logger.info("pseudo-labels: %d cells on %d images (%s); fine-tuning %d steps", labelled_cells(labelled),
                    len(labelled), point.describe(), settings.steps)
    tuned = fine_tune(trained, module, labelled, settings, out_dir, callbacks=[teacher] if teacher else [])
    if teacher:
        logger.info("mean teacher: %d cells labelled over %d new images shown", teacher.cells, teacher.images)
    return tuned, teacher.cells if teacher else labelled_cells(labelled)


def fine_tune(trained: DictConfig, module: DetectionModule, extra_train: list[dict], settings: DictConfig,
              out_dir: Path, callbacks: Sequence[L.Callback] = ()) -> DetectionModule:
    """``module`` fine-tuned from its weights on ``trained``'s train split plus ``extra_train`` for
    ``settings.steps`` steps at ``train.lr`` x ``settings.lr_factor`` (a run in ``out_dir``); returns
    the model at its last step. The run's config holds ``settings`` and digests of the weights it
    started from and of ``extra_train``, so a folder tuned from other weights, on other images or
    with other settings is refused by name, not resumed or reused."""
    if int(settings.steps) < 1:
        raise ValueError(f"fine-tuning steps={settings.steps}: give 1 or more (e.g. 400)")
    tuning = OmegaConf.create(OmegaConf.to_container(trained, resolve=True))
    tuning.fine_tuning = {**OmegaConf.to_container(settings, resolve=True), "from_weights": weights_digest(module),
                          "extra_images": records_digest(extra_train)}
    tuning.train.max_steps = tuning.train.steps_per_epoch = int(settings.steps)
    tuning.train.warmup_steps = min(int(tuning.train.warmup_steps), int(settings.steps) // 10)
    tuning.train.lr = float(tuning.train.lr) * float(settings.lr_factor)
    tuning.train.run_dir = str(out_dir)
    try:
        result = fit(tuning, out_dir, extra_train=extra_train, init_weights=module.state_dict(), callbacks=callbacks)
    except RunConfigError as err:  # its own advice (train.resume, train.run_dir) does not reach this run
        raise RunConfigError(f"{out_dir} was fine-tuned from other weights, on other images or with other settings; "
                             f"delete it to tune again ({err})") from None
    return load_detector(result.last_checkpoint)


def weights_digest(module: DetectionModule) -> str:
    """A digest of ``module``'s weights (which model a fine-tuning started from)."""
    digest = hashlib.sha1()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def records_digest(records: list[dict]) -> str:
    """A digest of dataset dicts: their files and labels, in order."""
    return hashlib.sha1(json.dumps([[r["file_name"], r.get("annotations", [])] for r in records], sort_keys=True,
                                   default=str).encode()).hexdigest()


def labelled_records(path: str | Path, module: DetectionModule) -> list[dict]:
    """The labelled images of ``adapt.labelled`` (a COCO file) as dataset dicts; refuses, naming it,
    a file whose classes are not the checkpoint's, with no labelled cell, or of boxes only for a
    model that segments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapt.labelled={path}: no such file (give a COCO file of the new acquisition's "
                                f"labelled images)")
    records, meta = load_dataset_dicts(path)
    trained = list(module.hparams.class_names)
    if list(meta["thing_classes"]) != trained:
        raise ValueError(f"adapt.labelled={path}: its classes are {meta['thing_classes']}, the checkpoint's {trained}; "
                         f"label the same classes in the same order")
    if not labelled_cells(records):
        raise ValueError(f"adapt.labelled={path}: no labelled cell in its {len(records)} images")
    if meta["box_only"] and not module.hparams.box_only:
        raise ValueError(f"adapt.labelled={path}: its labels are boxes only, and the checkpoint segments cells; "
                         f"give outlines (polygons)")
    return records


def labelled_fine_tuning(trained: DictConfig, module: DetectionModule, labelled: list[dict], settings: DictConfig,
                         out_dir: Path) -> DetectionModule:
    """``module`` fine-tuned (``fine_tune``) on its train split plus a few labelled images of the new
    acquisition (dataset dicts), those repeated until they make about ``settings.labelled_share`` of
    the images it is shown: ten images among hundreds would otherwise pass a few times each and
    move nothing."""
    share = float(settings.labelled_share)
    if not labelled or not 0 < share < 1:  # fine_tune checks the steps
        raise ValueError(f"labelled fine-tuning: {len(labelled)} labelled images, labelled_share={share}: give at "
                         f"least one image and a share between 0 and 1 (e.g. 0.5)")
    ensure_prepared(trained.data)
    train_images = len(get_dataset_dicts(split_name(trained.data.name, "train")))
    repeats = max(1, round(share / (1 - share) * train_images / len(labelled)))
    logger.info("fine-tuning %d steps on %d train images plus %d labelled new images (each repeated %d times: "
                "%.0f%% of the images shown)", settings.steps, train_images, len(labelled), repeats,
                100 * len(labelled) * repeats / (train_images + len(labelled) * repeats))
    return fine_tune(trained, module, labelled * repeats, settings, out_dir)


def class_boundary_shift(run_cfg: DictConfig, module: DetectionModule, images: list[Path]) -> tuple[float, str]:
    """How far to move the boundary between ``eval.share_class`` and the rest (``boundary_shift``),
    ``module`` predicting the run's val split and ``images`` through ``run_cfg``'s preprocessing
    (no label of either is read). Returns the shift (logits, for that class) and what was measured,
    in words."""
    classes = get_metadata(split_name(run_cfg.data.name, "val"))["thing_classes"]
    if len(classes) < 2:
        raise ValueError(f"adapt.class_bias=otsu: the run has one class ({classes[0]}); there is no boundary between "
                         f"classes to move")
    val = predict_split(run_cfg, module, get_dataset_dicts(split_name(run_cfg.data.name, "val")), RAW,
                        "class margins, val")
    new = predict_images(run_cfg, module, images, RAW, "class margins, new images")
    return boundary_shift(val, new, bias_class(run_cfg, classes), classes,
                          f"{len(images)} new images of {run_cfg.input}")


def boundary_shift(val: list, new: list, moved: int, classes: list[str], new_name: str) -> tuple[float, str]:
    """How far to move the boundary between class ``moved`` and the rest: as far as the valley of the
    cells' class margins (``evaluation.boundary``) moved from the raw predictions ``val`` (the run's
    val split) to ``new`` (the new acquisition's images, ``new_name`` in messages); the val split's
    valley drawn toward the model's own boundary (``reference_valley``), or that boundary itself when
    the val split holds too few cells for a valley (a warning says so; too few new cells refuses).
    Returns the shift (logits, for that class) and what was measured, in words."""
    reference, target = class_margins(val, moved), class_margins(new, moved)
    for name, margins in (("the val split", reference), (new_name, target)):
        if MIN_CELLS <= len(margins) < ROUGH_CELLS:
            logger.warning("adapt.class_bias=otsu: %d cells in %s place the valley of the class margins roughly; "
                           "%d or more place it better", len(margins), name, ROUGH_CELLS)
    try:
        new_valley = otsu_threshold(target)
    except ValueError as err:
        raise ValueError(f"adapt.class_bias=otsu: {new_name}: {err}") from None
    try:  # a val split too small for a valley of its own leaves the model's own boundary as the reference
        val_valley = otsu_threshold(reference)
    except ValueError as err:
        logger.warning("adapt.class_bias=otsu: the val split: %s; the reference is the model's own boundary "
                       "(margin 0)", err)
        val_valley = 0.0
    reference_at = reference_valley(val_valley, len(reference))
    shift = reference_at - new_valley  # the boundary keeps its place relative to the two groups
    return shift, (f"{classes[moved]} boundary moved {shift:+.2f} logits (the valley of the class margins: "
                   f"{new_valley:+.2f} on {len(target)} cells of {new_name}, {val_valley:+.2f} on "
                   f"{len(reference)} cells of the val split, taken as {reference_at:+.2f})")


def moved_boundary(point: OperatingPoint, shift: float, moved: int, n_classes: int) -> OperatingPoint:
    """``point`` with ``shift`` added to its class bias on class ``moved``. A point that suppresses
    only within classes suppresses across them too when the bias is not zero, at the overlap the
    margins took for one cell (``OperatingPoint.with_bias_suppression``): the bias lifts a hesitant
    cell's second box over the min confidence, and the cell would count twice."""
    bias = one_class_bias(shift, moved, n_classes)
    return replace(point, class_bias=tuple(b + m for b, m in zip(point.class_bias or [0.0] * n_classes, bias)),
                   source="the class boundary moved to the new images (adapt.class_bias=otsu)").with_bias_suppression()


def add_class_bias(run_cfg: DictConfig, checkpoint: Path, shift: float) -> OperatingPoint:
    """``checkpoint``'s point with its boundary moved by ``shift`` (``moved_boundary``), written to the
    ``thresholds.json`` beside it; returns the new point. ``run_cfg``: the adapted run's
    (``run_config`` of ``checkpoint``)."""
    classes = get_metadata(split_name(run_cfg.data.name, "val"))["thing_classes"]
    point = operating_point(run_cfg)
    require_bias_per_class(point, classes)
    point = moved_boundary(point, shift, bias_class(run_cfg, classes), len(classes))
    saved = load_thresholds(checkpoint.parent / "thresholds.json") or {}
    save_thresholds(checkpoint.parent / "thresholds.json",
                    {**saved, "min_confidence": point.min_confidence, "nms": point.nms,
                     "max_detections": point.max_detections, "cross_class_nms": point.cross_class_nms,
                     "class_bias": list(point.class_bias), "class_bias_shift": shift,
                     "class_bias_from": "adapt.class_bias=otsu (unlabelled new images)"})
    return point


def labelled_cells(records: list[dict]) -> int:
    return sum(len(record["annotations"]) for record in records)


def adapt_run(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Adapt ``ckpt``'s run to a new acquisition (``adapt.stain``, ``adapt.batchnorm``,
    ``adapt.self_training``, ``adapt.class_bias``: all but the first read the images under ``input``;
    ``adapt.labelled``: fine-tuned on a few labelled ones, ``labelled_fine_tuning``) and
    write the adapted run
    into ``out_dir``; returns the adapted checkpoint's path. Stain normalization reads no new image:
    each is mapped onto the training reference alone when it is predicted."""
    settings, out_dir = cfg.adapt, Path(out_dir)
    tuning_steps = int(settings.self_training.steps)
    if settings.stain not in ("none", *STAIN_METHODS):
        raise ValueError(f"adapt.stain={settings.stain}: use none, {', '.join(STAIN_METHODS)}")
    if (settings.stain == "none" and not settings.batchnorm and not tuning_steps and settings.class_bias == "none"
            and not settings.get("labelled")):
        raise ValueError("nothing to adapt: give adapt.stain=reinhard|macenko, adapt.batchnorm=true, "
                         "adapt.self_training.steps=N, adapt.class_bias=otsu and/or adapt.labelled=labels.json")
    if settings.class_bias not in BOUNDARY_MOVES:
        raise ValueError(f"adapt.class_bias={settings.class_bias}: use none or otsu")
    reads_input = bool(settings.batchnorm or tuning_steps or settings.class_bias != "none")
    if reads_input and not cfg.get("input"):
        raise ValueError("adapt.batchnorm, adapt.self_training and adapt.class_bias need input=...: a folder of the "
                         "new acquisition's images (no labels needed)")
    run_cfg = run_config(cfg)
    checkpoint = Path(cfg.ckpt)
    trained = OmegaConf.load(checkpoint.parent.parent / "config.yaml")
    if settings.class_bias != "none" and trained.get("adapted", {}).get("class_bias"):
        # its margins are measured on raw scores again: a second shift would add the same move twice
        raise ValueError(f"adapt.class_bias={settings.class_bias}: {checkpoint} already has its class boundary "
                         f"moved ({trained.adapted.class_bias}); adapt the checkpoint it came from: "
                         f"{trained.adapted['from']}")
    images = sample(discover_images(cfg.input)[1], int(settings.images), int(cfg.seed)) if cfg.get("input") else []
    module = load_detector(checkpoint)
    labelled = labelled_records(settings.labelled, module) if settings.get("labelled") else []
    ensure_prepared(run_cfg.data)  # the train split: the stain reference's images, self-training's labelled half
    if settings.stain != "none":
        records = sample(get_dataset_dicts(split_name(run_cfg.data.name, "train")), int(settings.reference_images),
                         int(cfg.seed))
        reference = fit_stain_reference([read_image(r["file_name"]) for r in tqdm(records, desc="stain reference",
                                                                                   unit="img")], settings.stain)
        trained.preprocess = with_stain_step(trained.preprocess, settings.stain, reference)
        logger.info("stain normalization (%s) to the training images' reference, fitted on %d of them: %s",
                    settings.stain, len(records), reference)
    used = cells = 0
    if settings.batchnorm:
        mapper = DatasetMapper(trained.preprocess)
        used = adapt_batchnorm(module.adapter, (mapper.map_image(path) for path in tqdm(
            images, desc="BatchNorm statistics", unit="img")))
        logger.info("BatchNorm statistics re-estimated on %d images of %s", used, cfg.input)
    run_cfg.preprocess = trained.preprocess  # the new images seen as the adapted run will see them
    if tuning_steps:
        module, cells = self_train(run_cfg, trained, module, images, settings.self_training, out_dir / "self_training")
    if labelled:
        module = labelled_fine_tuning(trained, module, labelled, settings.fine_tune, out_dir / "labelled_fine_tuning")
    if settings.class_bias == "otsu":  # measured before the adapted run is written: too few cells stop here
        shift, measured = class_boundary_shift(run_cfg, module, images)
        logger.info("%s", measured)
    state = read_checkpoint(checkpoint)
    state["state_dict"] = {key: value.cpu() for key, value in module.state_dict().items()}
    for key in TRAINING_ONLY:
        state.pop(key, None)
    adapted = out_dir / "checkpoints" / checkpoint.name
    adapted.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, adapted)
    if (checkpoint.parent / "thresholds.json").is_file():  # the run's chosen point, until a sweep here replaces it
        shutil.copy(checkpoint.parent / "thresholds.json", adapted.parent / "thresholds.json")
    trained.adapted = {"from": str(checkpoint.resolve()),
                       "input": str(Path(cfg.input).resolve()) if reads_input else None,
                       "stain": settings.stain, "batchnorm_images": used, "self_training_steps": tuning_steps,
                       "self_training": ("mean teacher" if settings.self_training.get("mean_teacher") else "offline")
                       if tuning_steps else None,
                       "pseudo_labelled_images": len(images) if tuning_steps else 0, "pseudo_labelled_cells": cells,
                       "labelled": str(Path(settings.labelled).resolve()) if labelled else None,
                       "labelled_images": len(labelled), "labelled_fine_tuning_steps": int(settings.fine_tune.steps)
                       if labelled else 0,
                       "point": "the trained run's", "class_bias": None}
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(trained, resolve=True))
    moves_point = settings.choose_point or settings.class_bias == "otsu"
    if moves_point:
        adapted_cfg = run_config(OmegaConf.merge(cfg, {"ckpt": str(adapted)}))  # reads the config.yaml just written
    if settings.choose_point:
        # self-training and AdaBN move the scores, so the trained run's point may no longer fit: choose
        # it again on the run's val split as the adapted model sees it (the training acquisition's
        # labels; not one of the new images' is read)
        point, _ = choose_on_val(adapted_cfg, load_detector(adapted), adapted, out_dir)
        trained.adapted.point = f"chosen again on val after adapting: {point.describe()}"
    if settings.class_bias == "otsu":  # after any new choice on val: the boundary moves from that point
        point = add_class_bias(adapted_cfg, adapted, shift)
        trained.adapted.class_bias = f"{measured}; class bias {list(point.class_bias)}"
    if moves_point:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(trained, resolve=True))
    logger.info("adapted checkpoint: %s", adapted)
    return adapted
