"""COCO writer/reader: pycocotools loads what we write; areas, boxes and ids are right."""

import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from leukodet.data.coco import load_dataset_dicts, read_coco, write_coco
from leukodet.data.prepare import read_sources
from leukodet.data.records import BOX, POINT, POLYGON, ImageRecord, Region
from leukodet.data.via import AnnotationError, LabelPolicy, read_via
from conftest import write_image


def cell_polygon(cx, cy, r, seed, n=40):
    """A realistic irregular cell outline (radius varying a few percent)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = r * (1 + 0.06 * np.random.default_rng(seed).standard_normal(n))
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1)


def test_written_coco_loads_in_pycocotools_with_shoelace_area_close_to_mask_area(tmp_path):
    image = write_image(tmp_path / "img.png", 400, 300)
    regions = [Region("blast", POLYGON, cell_polygon(100 + 60 * i, 150, 25 + 3 * i, i)) for i in range(4)]
    regions.append(Region("other", POINT, np.array([[5.0, 5.0]])))
    record = ImageRecord(str(image), regions, 400, 300)
    path = write_coco(tmp_path / "out" / "train.json", [record], ["blast", "other"])

    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1] and sorted(coco.getAnnIds()) == [1, 2, 3, 4]
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2]
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        assert mask.shape == (300, 400)
        assert ann["area"] == pytest.approx(mask.sum(), rel=0.02)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5
        assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
    stored = json.loads(path.read_text())
    assert stored["points"] == [{"image_id": 1, "category_id": 2, "xy": [5.0, 5.0]}]
    assert stored["images"][0]["file_name"] == "../img.png"  # relative: the folder can move


def test_dataset_dicts_round_trip(tmp_path):
    image = write_image(tmp_path / "img.png", 100, 80)
    square = np.array([[10, 10], [40, 10], [40, 30], [10, 30]], float)
    record = ImageRecord(str(image), [Region("b", POLYGON, square), Region("a", POLYGON, square + 40)], 100, 80)
    dicts, meta = load_dataset_dicts(write_coco(tmp_path / "s.json", [record], ["a", "b"]))
    assert meta["thing_classes"] == ["a", "b"] and meta["box_only"] is False
    (d,) = dicts
    assert d["file_name"] == str(image.resolve()) and (d["height"], d["width"]) == (80, 100)
    assert [a["category_id"] for a in d["annotations"]] == [1, 0]  # 0-based contiguous
    assert d["annotations"][0]["bbox"] == [10, 10, 30, 20] and d["annotations"][0]["bbox_mode"] == 1
    assert d["annotations"][0]["segmentation"] == [square.reshape(-1).tolist()]


def test_box_only_coco_has_no_fake_masks(tmp_path):
    image = write_image(tmp_path / "img.png")
    box = np.array([[1, 1], [9, 1], [9, 9], [1, 9]], float)
    path = write_coco(tmp_path / "s.json", [ImageRecord(str(image), [Region("RBC", BOX, box)], 64, 48)],
                      ["RBC"], box_only=True)
    COCO(str(path))
    dicts, meta = load_dataset_dicts(path)
    assert meta["box_only"] and dicts[0]["box_only"]
    assert "segmentation" not in dicts[0]["annotations"][0]


def test_read_third_party_coco_with_polygons_rle_boxes_and_crowd(tmp_path):
    from pycocotools import mask as mask_utils

    write_image(tmp_path / "img.png", 100, 80)
    blob = np.zeros((80, 100), np.uint8)
    cv2.circle(blob, (70, 40), 12, 1, -1)
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode()
    coco = {"images": [{"id": 7, "file_name": "img.png", "width": 1, "height": 1}],
            "categories": [{"id": 3, "name": "wbc"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]],
                 "bbox": [10, 10, 20, 20], "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 3, "segmentation": rle, "bbox": [58, 28, 25, 25], "iscrowd": 0},
                {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
                {"id": 4, "image_id": 7, "category_id": 3, "segmentation": rle, "bbox": [0, 0, 1, 1], "iscrowd": 1},
            ]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    result = read_coco(tmp_path / "coco.json")
    (record,) = result.records
    assert (record.width, record.height) == (100, 80)  # from the file, not the JSON's 1x1
    assert [r.kind for r in record.regions] == [POLYGON, POLYGON, BOX]
    from leukodet.data.via import polygon_area
    assert polygon_area(record.regions[1].points) == pytest.approx(blob.sum(), rel=0.1)
    assert [s.reason for s in result.skips] == ["crowd region (iscrowd=1)"]


def test_read_coco_rejects_non_coco(tmp_path):
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(AnnotationError, match="not a COCO instances file"):
        read_coco(tmp_path / "x.json")


def test_via_to_coco_on_generated_sample_matches_generator_masks(wbc_sample, tmp_path):
    """The generator's own instance masks vs the COCO masks of the converted VIA polygons."""
    result = read_via(wbc_sample / "via_region_data.json", labels=LabelPolicy("cell_type"))
    classes = sorted({r.label for rec in result.records for r in rec.regions})
    coco = COCO(str(write_coco(tmp_path / "all.json", result.records, classes)))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 16
    for ann in anns:
        assert ann["area"] == pytest.approx(coco.annToMask(ann).sum(), rel=0.02)


def coco_file(tmp_path, annotations, name="coco.json"):
    write_image(tmp_path / "img.png", 100, 80)
    coco = {"images": [{"id": 1, "file_name": "img.png", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "wbc"}], "annotations": annotations}
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return path


def test_via_point_layout_is_a_count_only_point(tmp_path):
    """VIA's COCO export writes a point with an empty outline, empty box and one keypoint."""
    path = coco_file(tmp_path, [
        {"segmentation": [[]], "area": [], "bbox": [], "iscrowd": 0, "keypoints": [12, 7, 2], "num_keypoints": 1,
         "id": 1, "image_id": 1, "category_id": 1},
        {"segmentation": [[]], "area": [], "bbox": [], "iscrowd": 0, "keypoints": [0, 0, 0], "num_keypoints": 0,
         "id": 2, "image_id": 1, "category_id": 1},
        {"segmentation": [], "bbox": [5, 5, 10, 10], "iscrowd": 0, "id": 3, "image_id": 1, "category_id": 1},
    ])
    result = read_coco(path)
    point, box = result.records[0].regions
    assert (point.kind, point.label, point.points.tolist()) == (POINT, "wbc", [[12, 7]])
    assert box.kind == BOX and box.bbox_xywh() == [5, 5, 10, 10]
    assert [(s.region, s.reason) for s in result.skips] == [(2, "keypoint not labelled (visibility 0)")]


@pytest.mark.parametrize("annotation, message", [
    ({"segmentation": [], "bbox": [], "iscrowd": 0}, "annotation 9: no segmentation, no single keypoint and no bbox"),
    ({"segmentation": [[]], "iscrowd": 0}, "annotation 9: no segmentation, no single keypoint and no bbox"),
    ({"segmentation": [[1, 1, 9, 1, 9, 9]], "iscrowd": 0, "category_id": 4}, "annotation 9: category_id 4 is not"),
])
def test_malformed_annotation_names_file_and_annotation_and_other_files_still_convert(tmp_path, annotation, message):
    bad = coco_file(tmp_path, [{"category_id": 1, **annotation, "id": 9, "image_id": 1}], "bad.json")
    with pytest.raises(AnnotationError) as err:
        read_coco(bad)
    assert message in str(err.value) and str(bad) in str(err.value)

    good = coco_file(tmp_path, [{"segmentation": [[1, 1, 9, 1, 9, 9]], "iscrowd": 0, "id": 1, "image_id": 1,
                                 "category_id": 1}], "good.json")
    result = read_sources([{"name": "coco", "path": str(bad)}, {"name": "coco", "path": str(good)}], LabelPolicy())
    assert [len(r.regions) for r in result.records] == [1]
    (skip,) = result.skips
    assert skip.reason.startswith("annotation file unreadable") and message in skip.reason
