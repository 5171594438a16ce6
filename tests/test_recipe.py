"""Recipe options (issue 16): class-balanced sampling, stain and blur augmentation, budget presets."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import compose
from torchvision import tv_tensors

from leukodet.data.augment import build_augmentation
from leukodet.engine.data import class_balanced_weights, make_loader


def image(name: str, *categories: int) -> dict:
    return {"file_name": name, "annotations": [{"category_id": c} for c in categories]}


def test_class_balanced_sampling_draws_each_class_about_equally():
    # 9 images hold only class 1, one holds class 2 (and a class-1 cell): shuffled, class 2 is in 10% of draws
    dicts = [image(f"a{i}", 1, 1) for i in range(9)] + [image("b", 1, 2)]
    assert class_balanced_weights(dicts).tolist() == pytest.approx([0.1] * 9 + [1.0])
    loader = make_loader(dicts, lambda d: d["file_name"], 10, True, 0, seed=0, class_balanced=True)
    draws = Counter(name for _ in range(100) for batch in loader for name in batch)
    assert sum(draws.values()) == 1000  # an epoch is as long as the split
    assert 0.4 < draws["b"] / 1000 < 0.6


def test_stain_augmentation_changes_colours_only():
    cfg = compose("augment=stain")
    assert [t["name"] for t in cfg.augment.transforms][-2:] == ["color_jitter", "blur"]
    transforms = build_augmentation([{"name": "color_jitter", "saturation": 0.3, "hue": 0.05, "p": 1},
                                     {"name": "blur", "kernel_size": 5, "sigma": [1.0, 1.5], "p": 1}])
    torch.manual_seed(0)
    pixels = tv_tensors.Image(torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[2, 3, 20, 30]], format="XYXY", canvas_size=(32, 48))
    out_pixels, out_boxes = transforms(pixels, boxes)
    assert out_pixels.shape == pixels.shape and not torch.equal(out_pixels, pixels)
    assert torch.equal(out_boxes, boxes)


def test_budget_preset_composes():
    cfg = compose("train=cpu_10min")
    assert cfg.train.max_steps == 1600 and cfg.train.sampler == "shuffle" and cfg.train.lr == 0.01
