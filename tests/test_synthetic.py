"""The generated sample: deterministic, written as VIA 2.x exports it, polygons true to the masks,
cells separable by the green-channel threshold of the "segmented" preprocessing."""

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukodet.data.synthetic import WBC_CLASS_MAP, ensure_sample, generate_smears

FIRST = "images/patient00_img000.jpg"


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def wbc(tmp_path_factory):
    out = tmp_path_factory.mktemp("wbc")
    return out, generate_smears(out, n_images=12, seed=5)


@pytest.fixture(scope="module")
def rbc(tmp_path_factory):
    out = tmp_path_factory.mktemp("rbc")
    return out, generate_smears(out, n_images=2, seed=2, kind="rbc")


def polygon_mask(region, shape):
    s = region["shape_attributes"]
    drawn = np.zeros(shape, np.uint8)
    cv2.fillPoly(drawn, [np.stack([s["all_points_x"], s["all_points_y"]], 1).astype(np.int32)], 1)
    return drawn > 0


def test_same_seed_same_bytes_other_seed_differs(wbc, tmp_path):
    out, _ = wbc
    generate_smears(tmp_path / "again", n_images=12, seed=5)
    generate_smears(tmp_path / "other", n_images=1, seed=6)
    assert (tmp_path / "again/via_region_data.json").read_bytes() == (out / "via_region_data.json").read_bytes()
    assert (tmp_path / "again" / FIRST).read_bytes() == (out / FIRST).read_bytes()
    assert (tmp_path / "other" / FIRST).read_bytes() != (out / FIRST).read_bytes()


def test_json_is_a_via2_export(wbc):
    out, images = wbc
    data = json.loads((out / "via_region_data.json").read_text())
    assert len(data) == 12
    for key, entry in data.items():
        size = (out / "images" / entry["filename"]).stat().st_size
        assert key == f"{entry['filename']}{size}" and entry["size"] == size
        assert list(entry) == ["filename", "size", "regions", "file_attributes"] and entry["file_attributes"] == {}
        for region in entry["regions"]:
            shape = region["shape_attributes"]
            assert list(shape) == ["name", "all_points_x", "all_points_y"] and shape["name"] == "polygon"
            assert len(shape["all_points_x"]) == len(shape["all_points_y"]) >= 3
            assert all(type(v) is int for v in shape["all_points_x"] + shape["all_points_y"])
            assert list(region["region_attributes"]) == ["cell_type"]
            assert region["region_attributes"]["cell_type"] in WBC_CLASS_MAP
    names = [Path(i.file_name).name for i in images]
    assert (names[0], names[4], names[11]) == ("patient00_img000.jpg", "patient01_img004.jpg", "patient02_img011.jpg")
    assert cv2.imread(images[0].file_name).shape == (384, 512, 3)


def test_polygons_match_instance_masks_and_both_classes_present(wbc):
    out, images = wbc
    data = list(json.loads((out / "via_region_data.json").read_text()).values())
    targets = Counter()
    for entry, truth in zip(data, images):
        assert 1 <= len(entry["regions"]) == len(truth.labels) <= 4
        for region, mask, label in zip(entry["regions"], truth.masks, truth.labels):
            assert region["region_attributes"]["cell_type"] == label
            assert iou(polygon_mask(region, mask.shape), mask) >= 0.9
            assert not (mask & ~truth.foreground).any()
            targets[WBC_CLASS_MAP[label]] += 1
    # lymphoblasts are drawn at ~45% of white cells: both classes well represented
    assert targets["lymphoblast"] >= 5 and targets["non_lymphoblast"] >= 5


def test_equalized_green_otsu_threshold_recovers_the_cells(wbc, rbc):
    scores = []
    for truth in wbc[1] + rbc[1]:
        green = cv2.equalizeHist(cv2.imread(truth.file_name)[..., 1])
        _, cells = cv2.threshold(green, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        scores.append(iou(cells > 0, truth.foreground))
    assert np.mean(scores) >= 0.9 and min(scores) >= 0.85


def test_rbc_kind_has_size_classes_and_touching_cells(rbc):
    out, images = rbc
    data = list(json.loads((out / "via_region_data.json").read_text()).values())
    assert {"large", "normal", "small"} == {label for i in images for label in i.labels}
    kernel = np.ones((3, 3), np.uint8)
    touching = 0
    for entry, truth in zip(data, images):
        # every red cell is annotated: the annotated masks cover (nearly) the whole foreground
        assert truth.instances.astype(bool).sum() >= 0.98 * truth.foreground.sum()
        drawn = [polygon_mask(r, truth.foreground.shape) for r in entry["regions"]]
        assert all(iou(d, m) >= 0.9 for d, m in zip(drawn, truth.masks))  # partly hidden or cut cells too
        grown = [cv2.dilate(d.astype(np.uint8), kernel) > 0 for d in drawn]
        touching += sum((grown[i] & grown[j]).any() for i in range(len(grown)) for j in range(i))
    assert touching >= 10


def test_ensure_sample_generates_only_when_missing(tmp_path):
    out = ensure_sample(tmp_path / "s", kind="rbc", n_images=1, seed=0)
    annotations = out / "via_region_data.json"
    assert annotations.is_file() and (out / FIRST).is_file()
    annotations.write_text("{}")  # a finished sample is left as it is
    assert ensure_sample(out, kind="rbc", n_images=1, seed=0) == out and annotations.read_text() == "{}"
