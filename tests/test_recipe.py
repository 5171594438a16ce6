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


def test_hed_jitter_moves_stain_amounts_and_nothing_else():
    from leukodet.data.augment import RandomHEDJitter

    torch.manual_seed(0)
    pixels = tv_tensors.Image(torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(1, 32, 48, dtype=torch.uint8))
    assert torch.equal(RandomHEDJitter(sigma=0, bias=0, p=1)(pixels), pixels)  # no jitter: the same pixels
    white = tv_tensors.Image(torch.full((3, 4, 4), 255, dtype=torch.uint8))
    stained = RandomHEDJitter(sigma=0, bias=0.02, p=1)
    params = {"scale": torch.ones(3), "shift": torch.tensor([0.02, 0.0, 0.0])}  # more haematoxylin only
    red, green, blue = stained.transform(white, params)[:, 0, 0].tolist()
    assert green < red < blue < 250  # white turns haematoxylin's blue-purple (it absorbs green most)
    cfg = compose("augment=stain_hed")
    out_pixels, out_mask = build_augmentation(cfg.augment)(pixels, mask)
    assert out_pixels.shape == pixels.shape and out_pixels.dtype == torch.uint8 and torch.equal(out_mask.sum(), mask.sum())
    assert {"hed_jitter", "sharpen", "blur"} <= {t["name"] for t in cfg.augment.transforms}


def test_budget_preset_composes():
    cfg = compose("train=cpu_10min")
    assert cfg.train.max_steps == 1600 and cfg.train.sampler == "shuffle" and cfg.train.lr == 0.01
