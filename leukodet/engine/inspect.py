"""The data tools' engine calls: generate the sample, draw a split's annotations, preview the
preprocessing chain."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata, split_name
from leukodet.data.imageio import IMAGE_SUFFIXES
from leukodet.data.pipeline import ensure_prepared
from leukodet.data.synthetic import generate_smears
from leukodet.preprocess.preview import write_previews
from leukodet.viz import render_split

logger = logging.getLogger(__name__)


def make_sample(cfg: DictConfig, out_dir: Path) -> Path:
    """`tools/make_sample.py`: (re)generate the synthetic sample a data config names
    (``data.generate``: kind, n_images, seed, width, height) into ``data.root``."""
    if not cfg.data.get("generate"):
        raise ValueError(f"data={cfg.data.name} has no 'generate' block: choose a generated dataset "
                         f"(data=sample_wbc or data=sample_rbc)")
    images = generate_smears(cfg.data.root, **OmegaConf.to_container(cfg.data.generate, resolve=True))
    logger.info("%d images, %d annotated cells in %s", len(images), sum(len(i.labels) for i in images), cfg.data.root)
    return Path(cfg.data.root)


def show_split(cfg: DictConfig, out_dir: Path) -> list[Path]:
    """`tools/show_dataset.py`: a prepared split's annotations drawn over its images (``split``,
    default train; ``limit`` images, default 16)."""
    ensure_prepared(cfg.data)
    name = split_name(cfg.data.name, cfg.get("split") or "train")
    written = render_split(get_dataset_dicts(name), get_metadata(name), out_dir / "annotations" / name,
                           cfg.get("limit", 16))
    logger.info("%d images of %s drawn", len(written), name)
    return written


def preview(cfg: DictConfig, out_dir: Path) -> list[Path]:
    """`tools/preview.py`: panels of every preprocessing step for the first ``n`` images (default 4)
    of ``images`` (a folder) or of a prepared split (``split``, default train)."""
    n = cfg.get("n", 4)
    if cfg.get("images"):
        paths = sorted(p for p in Path(cfg.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    else:
        ensure_prepared(cfg.data)
        paths = [r["file_name"] for r in get_dataset_dicts(split_name(cfg.data.name, cfg.get("split") or "train"))[:n]]
    written = write_previews(paths, cfg.preprocess, out_dir / "preview")
    logger.info("%d of %d panels written", len(written), len(paths))
    return written
