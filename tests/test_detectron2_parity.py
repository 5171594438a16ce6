"""detectron2's DefaultTrainer (with leukodet's mapper) and leukodet's loop (through the adapter)
train the same model to the same losses; bench/bench_detectron2.py times both."""

import importlib.util

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("detectron2", reason="detectron2 is optional and not installed (built from source)")

# Both run the same float operations on the same inputs in the same order (measured difference:
# 0 on CPU); the tolerance allows only for kernels that are not bitwise reproducible elsewhere.
RTOL = 1e-4


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_detectron2", REPO / "bench" / "bench_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.long
def test_default_trainer_and_leukodet_loop_reach_the_same_losses(tmp_path):
    detectron2, leukodet, same_order = load_bench().run_both(tmp_path, steps=3, scale=0.25)
    assert same_order >= 3
    assert len(detectron2.losses) == len(leukodet.losses) == 3
    assert len(set(np.round(leukodet.losses, 3))) == 3  # the weights move: each step's loss differs
    np.testing.assert_allclose(leukodet.losses, detectron2.losses, rtol=RTOL)
