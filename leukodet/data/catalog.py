"""Dataset catalog: a split name -> a zero-argument loader of Detectron2-format dataset dicts,
plus metadata (class names, colours, box_only).

Registration is idempotent because a Hydra multirun runs many jobs in one process. Listeners
(``add_listener``) hear of every registration: ``leukodet.integrations.detectron2`` mirrors each
split into detectron2's DatasetCatalog/MetadataCatalog that way.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from leukodet.data.coco import load_dataset_dicts

_LOADERS: dict[str, Callable[[], list[dict]]] = {}
_METADATA: dict[str, dict] = {}
_LISTENERS: list[Callable[[str], None]] = []


def class_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated RGB colours (evenly spaced hues), stable for a given ``n``."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.85, 0.95)) for i in range(n)]


def _load(json_file: Path) -> list[dict]:
    return load_dataset_dicts(json_file)[0]


def register_split(name: str, json_file: str | Path) -> dict:
    """Register one prepared COCO split under ``name``; returns its metadata."""
    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(f"dataset {name!r}: {json_file} does not exist; run "
                                f"'python tools/prepare.py' for this dataset first")
    dicts, metadata = load_dataset_dicts(json_file)
    metadata = {**metadata, "name": name, "thing_colors": class_colors(len(metadata["thing_classes"])),
                "num_images": len(dicts)}
    _LOADERS[name] = partial(_load, json_file)
    _METADATA[name] = metadata
    for listener in _LISTENERS:
        listener(name)
    return metadata


def split_names(data_cfg: Mapping) -> list[str]:
    """The splits a data config prepares: its ratio splits plus any pinned ones."""
    prepare = data_cfg["prepare"]
    return [*prepare["split"], *(s for s in (prepare.get("pinned") or {}) if s not in prepare["split"])]


def register_datasets(data_cfg: Mapping) -> list[str]:
    """Register every prepared split of a data config (``name``, ``prepared_dir``, ``prepare.split``) as
    ``{name}_{split}``, e.g. ``sample_wbc_train``; returns the registered names."""
    prepared = Path(data_cfg["prepared_dir"])
    return [register_split(split_name(data_cfg["name"], split), prepared / f"{split}.json")["name"]
            for split in split_names(data_cfg)]


def split_name(data_name: str, split: str) -> str:
    """The catalog name of one split of a dataset, e.g. ``sample_wbc_train``."""
    return f"{data_name}_{split}"


def registered() -> list[str]:
    return sorted(_LOADERS)


def _require(name: str) -> None:
    if name not in _LOADERS:
        raise KeyError(f"dataset {name!r} is not registered; registered: {', '.join(registered()) or '(none)'}")


def get_dataset_dicts(name: str) -> list[dict]:
    _require(name)
    return _LOADERS[name]()


def get_metadata(name: str) -> dict:
    _require(name)
    return _METADATA[name]


def add_listener(listener: Callable[[str], None]) -> None:
    """Call ``listener(name)`` for every split registered so far and from now on."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)
        for name in registered():
            listener(name)
