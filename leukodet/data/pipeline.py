"""Config-driven entry points of the data stage, shared by the tools and the main job."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import register_datasets, split_names
from leukodet.data.prepare import Prepared, prepare_dataset

logger = logging.getLogger(__name__)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def generate_if_configured(data_cfg: Mapping) -> None:
    """Generate the synthetic sample named by ``data_cfg.generate`` if it is not on disk yet."""
    if not data_cfg.get("generate"):
        return
    from leukodet.data.synthetic import ensure_sample

    ensure_sample(data_cfg["root"], **_plain(data_cfg["generate"]))


def prepare_from_config(data_cfg: Mapping) -> Prepared:
    """Generate (if configured), prepare and register the dataset described by ``data_cfg``."""
    generate_if_configured(data_cfg)
    prepared = prepare_dataset(out_dir=data_cfg["prepared_dir"], **_plain(data_cfg["prepare"]))
    register_datasets(data_cfg)
    return prepared


def ensure_prepared(data_cfg: Mapping) -> list[str]:
    """Prepare the dataset unless all its split files exist, then register it; returns split names."""
    prepared_dir = Path(data_cfg["prepared_dir"])
    if not all((prepared_dir / f"{split}.json").is_file() for split in split_names(data_cfg)):
        prepare_from_config(data_cfg)
    return register_datasets(data_cfg)
