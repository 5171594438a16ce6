"""Config-driven entry points of the data stage, shared by the tools and the main job."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import register_datasets, split_names
from leukodet.data.prepare import Prepared, prepare_dataset
from leukodet.io import atomic_write_text

logger = logging.getLogger(__name__)

PREPARED_WITH = "prepared_with.json"  # the prepare settings the split files were made with
# what the split files hold; a new format re-prepares older folders. 2: each image's source (annotation file)
PREPARED_FORMAT = 2


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def generate_if_configured(data_cfg: Mapping) -> None:
    """Generate the synthetic sample named by ``data_cfg.generate`` if it is not on disk yet."""
    if not data_cfg.get("generate"):
        return
    from leukodet.data.synthetic import ensure_sample

    ensure_sample(data_cfg["root"], **_plain(data_cfg["generate"]))


def prepare_settings(data_cfg: Mapping) -> str:
    """``data.prepare`` and the split files' format as canonical JSON: what ``PREPARED_WITH`` holds
    and is compared with."""
    return json.dumps({**_plain(data_cfg["prepare"]), "format": PREPARED_FORMAT}, indent=2, sort_keys=True)


def prepare_from_config(data_cfg: Mapping) -> Prepared:
    """Generate (if configured), prepare and register the dataset described by ``data_cfg``."""
    generate_if_configured(data_cfg)
    prepared = prepare_dataset(out_dir=data_cfg["prepared_dir"], **_plain(data_cfg["prepare"]))
    atomic_write_text(Path(data_cfg["prepared_dir"]) / PREPARED_WITH, prepare_settings(data_cfg))
    register_datasets(data_cfg)
    return prepared


def ensure_prepared(data_cfg: Mapping) -> list[str]:
    """Prepare the dataset unless its split files exist and were made with the same ``prepare``
    settings (a changed split, scale or balance re-prepares), then register it; returns split names."""
    prepared_dir = Path(data_cfg["prepared_dir"])
    missing = [s for s in split_names(data_cfg) if not (prepared_dir / f"{s}.json").is_file()]
    stamp = prepared_dir / PREPARED_WITH
    if missing or not stamp.is_file() or stamp.read_text() != prepare_settings(data_cfg):
        if not missing:
            logger.warning("%s was prepared with other settings than data.prepare now gives, or by an older "
                           "leukodet: preparing again", prepared_dir)
        prepare_from_config(data_cfg)
    return register_datasets(data_cfg)
