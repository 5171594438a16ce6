"""Shared fixtures: tiny images on disk, the generated sample, and the real datasets (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("LEUKODET_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS} (set LEUKODET_SHARED_DATASETS)")
    return SHARED_DATASETS


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A small noisy RGB image written with OpenCV (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(path.suffix, pixels)
    assert ok
    encoded.tofile(str(path))
    return path


@pytest.fixture(scope="session")
def wbc_sample(tmp_path_factory) -> Path:
    """A small generated WBC sample (VIA 2.x JSON + images), made once per test session."""
    from leukodet.data.synthetic import generate_smears

    out = tmp_path_factory.mktemp("sample_wbc")
    generate_smears(out, n_images=16, seed=1, kind="wbc")
    return out


def compose(*overrides: str, config_name: str = "config"):
    """The project's Hydra config, composed as the tools compose it (``checkpoint`` for evaluate and
    count_table, ``inference`` for infer)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import leukodet  # noqa: F401  (registers the typed config schemas)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
