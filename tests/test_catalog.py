"""Catalog: named splits -> dataset dicts + metadata; idempotent; mirrored into detectron2."""

import numpy as np
import pytest

from leukodet.data import catalog
from leukodet.data.coco import write_coco
from leukodet.data.records import POLYGON, ImageRecord, Region
from leukodet.viz import draw_annotations, render_split
from conftest import write_image

SQUARE = np.array([[4, 4], [20, 4], [20, 20], [4, 20]], float)


@pytest.fixture
def prepared(tmp_path):
    image = write_image(tmp_path / "img.png")
    records = [ImageRecord(str(image), [Region("a", POLYGON, SQUARE), Region("b", POLYGON, SQUARE + 20)], 64, 48)]
    for split in ("train", "val"):
        write_coco(tmp_path / f"{split}.json", records, ["a", "b"])
    return {"name": "toy", "prepared_dir": str(tmp_path), "prepare": {"split": {"train": 0.5, "val": 0.5}}}


def test_register_twice_and_load(prepared):
    assert catalog.register_datasets(prepared) == ["toy_train", "toy_val"]
    assert catalog.register_datasets(prepared) == ["toy_train", "toy_val"]  # as a multirun does
    dicts = catalog.get_dataset_dicts("toy_val")
    assert len(dicts) == 1 and len(dicts[0]["annotations"]) == 2
    meta = catalog.get_metadata("toy_train")
    assert meta["thing_classes"] == ["a", "b"] and len(meta["thing_colors"]) == 2
    assert meta["thing_colors"][0] != meta["thing_colors"][1]


def test_unknown_and_missing(prepared, tmp_path):
    catalog.register_datasets(prepared)
    with pytest.raises(KeyError, match="'nope' is not registered; registered: .*toy_train"):
        catalog.get_dataset_dicts("nope")
    with pytest.raises(FileNotFoundError, match="test.json does not exist; run 'python tools/prepare.py'"):
        catalog.register_datasets({**prepared, "prepare": {"split": {"test": 1.0}}})


def test_detectron2_catalog_mirror(prepared):
    data = pytest.importorskip("detectron2.data", reason="detectron2 is optional and not installed")
    import leukodet.integrations.detectron2  # noqa: F401  (the engine imports it; alone, this test must too)

    catalog.register_datasets(prepared)
    catalog.register_datasets(prepared)
    assert len(data.DatasetCatalog.get("toy_train")) == 1
    assert data.MetadataCatalog.get("toy_train").thing_classes == ["a", "b"]


def test_drawn_annotations_show_each_class_colour(prepared, tmp_path):
    catalog.register_datasets(prepared)
    (record,) = catalog.get_dataset_dicts("toy_train")
    meta = catalog.get_metadata("toy_train")
    blank = np.zeros((48, 64, 3), np.uint8)
    drawn = draw_annotations(blank, record, meta["thing_classes"], meta["thing_colors"])
    assert drawn.shape[0] > 48 and (drawn[:48] == 0).all(axis=2).sum() < 48 * 64  # legend strip below
    for color in meta["thing_colors"]:
        assert (drawn[:48] == color).all(axis=2).sum() >= 4 * 15  # a closed outline of 16 px squares
    written = render_split([record], meta, tmp_path / "drawn")
    assert len(written) == 1 and written[0].stat().st_size > 0
