"""`tools/adapt.py`: a trained run adapted to a new acquisition from its unlabelled images.

Two options, each measured by leaving one acquisition out in both directions (README, Adapting to a
new scanner): a stain normalization step mapping every image's colours onto the training images'
(``preprocess.steps.stain_normalize``, its reference fitted here on the run's train split), and AdaBN
(``models.adapt.adapt_batchnorm``: the backbone's BatchNorm statistics re-estimated on the new
images). The result is a run directory like a trained one: ``config.yaml`` (the run's, with the
stain step in its preprocessing and an ``adapted`` block saying what was done) and
``checkpoints/<name>.ckpt`` (the adapted weights) beside a copy of ``thresholds.json``, so
evaluate, count_table, infer and export take it as they take any checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from leukodet.data.catalog import get_dataset_dicts, split_name
from leukodet.data.imageio import read_image
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.evaluate import load_detector, read_checkpoint, run_config
from leukodet.engine.inference.discovery import discover_images
from leukodet.io import atomic_write_text
from leukodet.models.adapt import adapt_batchnorm
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.preprocess.steps import STAIN_METHODS, fit_stain_reference

logger = logging.getLogger(__name__)

STAIN_STEP = "stain_normalize"
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


def adapt_run(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Adapt ``ckpt``'s run to a new acquisition (``adapt.stain``, ``adapt.batchnorm``: the images
    under ``input``) and write the adapted run into ``out_dir``; returns the adapted checkpoint's
    path. Stain normalization reads no new image: each is mapped onto the training reference alone
    when it is predicted."""
    settings, out_dir = cfg.adapt, Path(out_dir)
    if settings.stain not in ("none", *STAIN_METHODS):
        raise ValueError(f"adapt.stain={settings.stain}: use none, {', '.join(STAIN_METHODS)}")
    if settings.stain == "none" and not settings.batchnorm:
        raise ValueError("nothing to adapt: give adapt.stain=reinhard|macenko and/or adapt.batchnorm=true")
    if settings.batchnorm and not cfg.get("input"):
        raise ValueError("adapt.batchnorm=true needs input=...: a folder of the new acquisition's images (no labels "
                         "needed)")
    run_cfg = run_config(cfg)
    checkpoint = Path(cfg.ckpt)
    trained = OmegaConf.load(checkpoint.parent.parent / "config.yaml")
    if settings.stain != "none":
        ensure_prepared(run_cfg.data)
        records = sample(get_dataset_dicts(split_name(run_cfg.data.name, "train")), int(settings.reference_images),
                         int(cfg.seed))
        reference = fit_stain_reference([read_image(r["file_name"]) for r in tqdm(records, desc="stain reference",
                                                                                   unit="img")], settings.stain)
        trained.preprocess = with_stain_step(trained.preprocess, settings.stain, reference)
        logger.info("stain normalization (%s) to the training images' reference, fitted on %d of them: %s",
                    settings.stain, len(records), reference)
    module = load_detector(checkpoint)
    used = 0
    if settings.batchnorm:
        mapper = DatasetMapper(trained.preprocess)
        picked = sample(discover_images(cfg.input)[1], int(settings.images), int(cfg.seed))
        used = adapt_batchnorm(module.adapter, (mapper.map_image(path) for path in tqdm(
            picked, desc="BatchNorm statistics", unit="img")))
        logger.info("BatchNorm statistics re-estimated on %d images of %s", used, cfg.input)
    state = read_checkpoint(checkpoint)
    state["state_dict"] = {key: value.cpu() for key, value in module.state_dict().items()}
    for key in TRAINING_ONLY:
        state.pop(key, None)
    adapted = out_dir / "checkpoints" / checkpoint.name
    adapted.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, adapted)
    if (checkpoint.parent / "thresholds.json").is_file():  # the run's chosen point, until a sweep here replaces it
        shutil.copy(checkpoint.parent / "thresholds.json", adapted.parent / "thresholds.json")
    trained.adapted = {"from": str(checkpoint.resolve()), "input": str(Path(cfg.input).resolve()) if used else None,
                       "stain": settings.stain, "batchnorm_images": used}
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(trained, resolve=True))
    logger.info("adapted checkpoint: %s", adapted)
    return adapted
