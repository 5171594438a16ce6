"""Conversion of every dataset in ../shared/datasets: counts per class match its README.

Skipped when the datasets are absent. Outputs go to a temp folder, never into the repo.
"""

from collections import Counter

import pytest

from leukodet.data.pipeline import prepare_from_config
from leukodet.data.records import BOX, POINT, POLYGON
from leukodet.data.via import read_via
from conftest import compose

pytestmark = pytest.mark.real_data


def label_counts(result):
    return Counter(r.label for rec in result.records for r in rec.regions)


@pytest.mark.parametrize("part, expected", [
    ("dataset1", {"neutrophil": 176, "lymphocyte": 53, "monocyte": 48, "eosinophil": 22, "basophil": 1}),
    ("dataset2", {"lymphocyte": 28, "neutrophil": 15, "monocyte": 15, "eosinophil": 2}),
])
def test_segmentation_wbc_counts(shared_datasets, part, expected):
    folder = shared_datasets / "segmentation_wbc" / part
    result = read_via(folder / "via_region_data.json", image_dir=folder / "images")
    assert not result.skips
    assert label_counts(result) == expected
    assert {r.kind for rec in result.records for r in rec.regions} == {POLYGON}
    assert len(result.records) == {"dataset1": 300, "dataset2": 60}[part]


def test_bccd_boxes_with_zero_size_reported(shared_datasets):
    folder = shared_datasets / "bccd"
    result = read_via(folder / "via_region_data.json", image_dir=folder / "JPEGImages")
    assert result.box_only and {r.kind for rec in result.records for r in rec.regions} == {BOX}
    skipped = Counter(s.reason for s in result.skips)
    assert skipped == {"fewer than 3 distinct points": 2}  # the two zero-size boxes upstream
    assert label_counts(result) == {"RBC": 3350 - 2, "WBC": 301, "Platelets": 292}
    assert len(result.records) == 292


def test_chula_points_are_count_only(shared_datasets):
    folder = shared_datasets / "chula_rbc12"
    result = read_via(folder / "via_points.json", image_dir=folder / "Dataset")
    assert {r.kind for rec in result.records for r in rec.regions} == {POINT}
    counts = label_counts(result)
    assert counts["Normal cell"] == 6330 and counts["Spherocyte"] == 3449 and counts["Macrocyte"] == 689
    assert counts["Microcyte"] == 461 and counts["uncategorised"] == 184 and sum(counts.values()) == 22106
    assert sum(1 for rec in result.records if not rec.regions) == 2


@pytest.mark.parametrize("dataset, expected_classes", [
    # 81 lymphocytes in the README; dataset1's 139.bmp repeats 112.bmp byte for byte and is dropped
    ("segmentation_wbc", {"lymphocyte": 80, "other_wbc": 279}),
    ("bccd", {"RBC": 3348, "WBC": 301, "Platelets": 292}),
    ("chula_rbc12", None),  # 21 of its images repeat others byte for byte and are dropped
])
def test_prepare_each_real_dataset_from_its_config(shared_datasets, tmp_path, dataset, expected_classes, caplog):
    cfg = compose(f"data={dataset}", f"paths.output_dir={tmp_path}",
                  f"paths.shared_datasets={shared_datasets}")
    with caplog.at_level("INFO", logger="leukodet.data.prepare"):
        prepared = prepare_from_config(cfg.data)
    assert "prepared " in caplog.text and "skipped" in caplog.text  # the conversion report is logged
    before = prepared.summary[prepared.summary.stage == "split"]
    if expected_classes:
        for name, count in expected_classes.items():
            assert before[name].sum() == count, name
    for split in ("train", "val", "test"):
        assert (tmp_path / "prepared" / dataset / f"{split}.json").is_file()
