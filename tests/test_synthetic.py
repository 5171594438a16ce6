"""The generated sample: deterministic, written as VIA 2.x writes it, polygons true to the masks."""

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukodet.data.synthetic import WBC_CLASS_MAP, generate_smears


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def wbc(tmp_path_factory):
    out = tmp_path_factory.mktemp("wbc")
    return out, generate_smears(out, n_images=12, seed=5)


def test_same_seed_same_bytes_other_seed_differs(wbc, tmp_path):
    out, _ = wbc
    generate_smears(tmp_path / "again", n_images=12, seed=5)
    generate_smears(tmp_path / "other", n_images=1, seed=6)
    first = "images/patient00_img000.jpg"
    assert (tmp_path / "again/via_region_data.json").read_bytes() == (out / "via_region_data.json").read_bytes()
    assert (tmp_path / "again" / first).read_bytes() == (out / first).read_bytes()
    assert (tmp_path / "other" / first).read_bytes() != (out / first).read_bytes()


def test_json_is_a_via2_export(wbc):
    out, images = wbc
    data = json.loads((out / "via_region_data.json").read_text())
    assert len(data) == 12
    for key, entry in data.items():
        size = (out / "images" / entry["filename"]).stat().st_size
        assert key == f"{entry['filename']}{size}" and entry["size"] == size
        assert set(entry) == {"filename", "size", "regions", "file_attributes"}
        for region in entry["regions"]:
            assert region["shape_attributes"]["name"] == "polygon"
            assert region["region_attributes"]["cell_type"] in WBC_CLASS_MAP
    assert Path(images[0].file_name).name == "patient00_img000.jpg"
    assert Path(images[4].file_name).name.startswith("patient01_")


def test_polygons_match_instance_masks_and_both_classes_present(wbc):
    out, images = wbc
    data = list(json.loads((out / "via_region_data.json").read_text()).values())
    targets = Counter()
    for entry, truth in zip(data, images):
        assert len(entry["regions"]) == len(truth.masks) >= 1
        for region, mask, label in zip(entry["regions"], truth.masks, truth.labels):
            s = region["shape_attributes"]
            drawn = np.zeros(mask.shape, np.uint8)
            cv2.fillPoly(drawn, [np.stack([s["all_points_x"], s["all_points_y"]], 1).astype(np.int32)], 1)
            assert iou(drawn > 0, mask) >= 0.9
            targets[WBC_CLASS_MAP[label]] += 1
    assert targets["lymphoblast"] >= 5 and targets["non_lymphoblast"] >= 5


def test_green_channel_threshold_recovers_the_cells(wbc):
    _, images = wbc
    scores = []
    for truth in images:
        green = cv2.imread(truth.file_name)[..., 1]
        _, cells = cv2.threshold(green, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        scores.append(iou(cells > 0, truth.foreground))
    assert np.mean(scores) >= 0.9


def test_rbc_kind_has_size_classes_and_touching_cells(tmp_path):
    images = generate_smears(tmp_path, n_images=3, seed=2, kind="rbc")
    assert {"large", "normal", "small"} <= {label for i in images for label in i.labels}
    kernel = np.ones((3, 3), np.uint8)
    touching = 0
    for truth in images:
        grown = [cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in truth.masks]
        touching += sum((grown[i] & grown[j]).any() for i in range(len(grown)) for j in range(i))
    assert touching >= 3
