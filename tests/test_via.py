"""VIA reader: every format and shape, the class map, and every kind of bad input."""

import json
import math

import numpy as np
import pytest

from leukodet.data.records import BOX, POINT, POLYGON
from leukodet.data.via import CSV_HEADER, AnnotationError, LabelPolicy, polygon_area, read_via
from conftest import write_image

SQUARE = {"name": "polygon", "all_points_x": [10, 30, 30, 10], "all_points_y": [10, 10, 30, 30]}


def region(shape, label="lymphoblast", key="class"):
    return {"shape_attributes": shape, "region_attributes": {key: label}}


def via2(tmp_path, regions, filename="a.jpg", **image_kw):
    write_image(tmp_path / filename, **image_kw)
    data = {f"{filename}123": {"filename": filename, "size": 123, "regions": regions, "file_attributes": {}}}
    path = tmp_path / "via.json"
    path.write_text(json.dumps(data))
    return path


def test_via2_export_all_shapes(tmp_path):
    path = via2(tmp_path, [
        region(SQUARE),
        region({"name": "polyline", "all_points_x": [40, 50, 45], "all_points_y": [5, 5, 15]}),
        region({"name": "rect", "x": 2, "y": 3, "width": 10, "height": 5}),
        region({"name": "circle", "cx": 30, "cy": 20, "r": 8}),
        region({"name": "ellipse", "cx": 30, "cy": 20, "rx": 10, "ry": 5, "theta": math.pi / 2}),
        region({"name": "point", "cx": 5, "cy": 6}),
    ])
    result = read_via(path)
    assert not result.skips
    (record,) = result.records
    assert (record.width, record.height) == (64, 48)
    kinds = [r.kind for r in record.regions]
    assert kinds == [POLYGON, POLYGON, BOX, POLYGON, POLYGON, POINT]
    circle, ellipse = record.regions[3], record.regions[4]
    assert polygon_area(circle.points) == pytest.approx(math.pi * 64, rel=0.01)
    # rotated by 90 degrees: the long axis is vertical
    assert np.ptp(ellipse.points[:, 1]) == pytest.approx(20, abs=0.1)
    assert np.ptp(ellipse.points[:, 0]) == pytest.approx(10, abs=0.1)
    assert record.regions[2].bbox_xywh() == [2, 3, 10, 5]
    assert not result.box_only


def test_via1_dict_regions_and_project_file_read_the_same(tmp_path):
    write_image(tmp_path / "a.jpg")
    regions = [region(SQUARE, "x"), region({"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5}, "y")]
    v1 = {"a.jpg9": {"filename": "a.jpg", "size": 9, "regions": {"0": regions[0], "1": regions[1]},
                     "file_attributes": {}}}
    project = {"_via_settings": {}, "_via_attributes": {"region": {}, "file": {}},
               "_via_img_metadata": {"a.jpg9": {"filename": "a.jpg", "size": 9, "regions": regions,
                                                "file_attributes": {}}},
               "_via_image_id_list": ["a.jpg9"], "_via_data_format_version": "2.0.10"}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    (tmp_path / "project.json").write_text(json.dumps(project))
    for name in ("v1.json", "project.json"):
        (record,) = read_via(tmp_path / name).records
        assert [r.label for r in record.regions] == ["x", "y"]


def test_via_csv_export(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "empty.jpg")
    shape = json.dumps(SQUARE)
    lines = [
        "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes",
        f'a.jpg,9,"{{}}",1,0,"{shape.replace(chr(34), chr(34) * 2)}","{{""class"":""blast""}}"',
        'empty.jpg,9,"{}",0,0,"{}","{}"',
    ]
    (tmp_path / "via.csv").write_text("\n".join(lines) + "\n")
    records = read_via(tmp_path / "via.csv").records
    assert [len(r.regions) for r in records] == [1, 0]
    assert records[0].regions[0].label == "blast"


@pytest.mark.parametrize("label, close", [("Monocyte", "'monocyte'"), ("lymphoblst", "'lymphoblast'"),
                                          ("MONO", "'monocyte'")])
def test_unmapped_label_error_names_close_matches_in_the_map(tmp_path, label, close):
    path = via2(tmp_path, [region(SQUARE, label)])
    with pytest.raises(AnnotationError, match=f"close matches in the map: {close}; known: lymphoblast, monocyte"):
        read_via(path, labels=LabelPolicy("class", {"lymphoblast": "a", "monocyte": "b"}))


def write_csv(tmp_path, text):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "via.csv"
    path.write_text(text)
    return path


def test_via_csv_undefined_is_no_label_but_undefined_inside_a_string_is_text(tmp_path):
    path = write_csv(tmp_path, "\n".join([
        "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes",
        'a.jpg,9,"{}",2,0,"{""name"":""point"",""cx"":1,""cy"":2}","{""class"":undefined,""note"":""""}"',
        'a.jpg,9,"{}",2,1,"{""name"":""point"",""cx"":3,""cy"":4}","{""class"":""undefined ""}"',
    ]))
    result = read_via(path)
    assert [r.label for r in result.records[0].regions] == ["undefined"]
    assert [(s.region, s.reason) for s in result.skips] == [(0, "no label in region attribute 'class'")]


@pytest.mark.parametrize("header, message", [
    (",".join(CSV_HEADER[:-1]), "no region_attributes column"),
    ("file,region_shape_attributes,attributes", "no filename, region_attributes column"),
    ("", "the file is empty"),
    ("  \n", "the file is empty"),
])
def test_via_csv_missing_columns_are_named(tmp_path, header, message):
    path = write_csv(tmp_path, header)
    with pytest.raises(AnnotationError) as err:
        read_via(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_via_csv_cell_that_is_not_json_names_the_line(tmp_path):
    path = write_csv(tmp_path, "filename,region_shape_attributes,region_attributes\na.jpg,{nope},{}\n")
    with pytest.raises(AnnotationError, match="line 2: attribute cell is not JSON"):
        read_via(path)


def test_box_only_when_all_regions_are_rects(tmp_path):
    path = via2(tmp_path, [region({"name": "rect", "x": 1, "y": 1, "width": 9, "height": 9}),
                           region({"name": "point", "cx": 3, "cy": 3})])
    assert read_via(path).box_only


def test_class_attribute_kinds_and_class_map(tmp_path):
    path = via2(tmp_path, [
        region(SQUARE, "L1 blast", key="type"),
        region(SQUARE, {"neutrophil": True, "eosinophil": False}, key="type"),  # checkbox
        region(SQUARE, {"neutrophil": True, "eosinophil": True}, key="type"),  # ambiguous
        region(SQUARE, "platelet", key="type"),  # dropped on purpose
        region(SQUARE, "", key="type"),
    ])
    policy = LabelPolicy("type", {"L1 blast": "lymphoblast", "neutrophil": "non_lymphoblast", "platelet": None})
    result = read_via(path, labels=policy)
    assert [r.label for r in result.records[0].regions] == ["lymphoblast", "non_lymphoblast"]
    reasons = {s.region: s.reason for s in result.skips}
    assert "2 options ticked" in reasons[2]
    assert reasons[3] == "label dropped by the class map"
    assert "no label" in reasons[4]


def test_unmapped_label_error_or_skip(tmp_path):
    path = via2(tmp_path, [region(SQUARE, "monocyte")])
    with pytest.raises(AnnotationError, match="'monocyte' is not in the class map") as err:
        read_via(path, labels=LabelPolicy("class", {"lymphoblast": "lymphoblast"}))
    assert "close matches" not in str(err.value)
    result = read_via(path, labels=LabelPolicy("class", {"lymphoblast": "lymphoblast"}, unmapped="skip"))
    assert result.records[0].regions == [] and "not in the class map" in result.skips[0].reason


def test_bad_regions_are_each_reported_and_the_rest_kept(tmp_path):
    path = via2(tmp_path, [
        region({"name": "polygon", "all_points_x": [1, 20], "all_points_y": [1, 20]}),  # 2 points
        region({"name": "polygon", "all_points_x": [1, 20, float("nan")], "all_points_y": [1, 2, 3]}),
        region({"name": "polygon", "all_points_x": [1, 5, 9], "all_points_y": [1, 5, 9]}),  # collinear
        region({"name": "polygon", "all_points_x": [70, 200, 90], "all_points_y": [1, 5, 9]}),  # wholly outside
        region({"name": "polygon", "all_points_x": ["a", 2, 3], "all_points_y": [1, 5, 9]}),  # wrong type
        region({"name": "polygon", "all_points_x": [1, 2, 3], "all_points_y": [1, 5]}),  # length mismatch
        region({"name": "rect", "x": 5, "y": 5, "width": 0, "height": 0}),  # zero size (as in bccd)
        region({"name": "hexagon"}),
        region({"name": "rect", "x": 5}),
        "not a region",
        region({"name": "polygon", "all_points_x": [-1, 65, 65, -1], "all_points_y": [-2, -2, 49, 49]}),
    ])
    result = read_via(path)
    reasons = [s.reason for s in sorted(result.skips, key=lambda s: s.region)]
    assert len(reasons) == 10
    for expected in ("fewer than 3 distinct", "NaN", "zero area", "outside the 64x48 image", "not numbers",
                     "3 x values but 2 y values", "fewer than 3 distinct", "unsupported shape 'hexagon'",
                     "no 'y' key", "not an object"):
        assert any(expected in r for r in reasons), expected
    (kept,) = result.records[0].regions  # crossing the border: clipped to the image
    assert kept.points.min() == 0 and kept.points[:, 0].max() == 64 and kept.points[:, 1].max() == 48


def test_missing_and_corrupt_images_are_reported(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = {name: {"filename": name, "size": 1, "regions": [region(SQUARE)]}
            for name in ("good.png", "corrupt.jpg", "missing.jpg")}
    (tmp_path / "via.json").write_text(json.dumps(data))
    result = read_via(tmp_path / "via.json")
    assert [r.file_name.rsplit("/", 1)[-1] for r in result.records] == ["good.png"]
    reasons = {s.file_name.rsplit("/", 1)[-1]: s.reason for s in result.skips}
    assert reasons["missing.jpg"].startswith("image file missing")
    assert reasons["corrupt.jpg"].startswith("image unreadable")
    assert "corrupt.jpg" in reasons["corrupt.jpg"]


def test_image_size_comes_from_the_file_not_the_json(tmp_path):
    path = via2(tmp_path, [region(SQUARE)], width=100, height=70)
    data = json.loads(path.read_text())
    next(iter(data.values()))["file_attributes"] = {"width": 9999, "height": 9999}
    path.write_text(json.dumps(data))
    (record,) = read_via(path).records
    assert (record.width, record.height) == (100, 70)


def test_non_ascii_file_names_and_same_name_in_two_folders(tmp_path):
    for folder in ("slide_1", "slide_2"):
        write_image(tmp_path / folder / "zelle_ä_血.png", seed=len(folder))
        (tmp_path / folder / "via.json").write_text(json.dumps(
            {"x": {"filename": "zelle_ä_血.png", "size": 1, "regions": [region(SQUARE)]}}, ensure_ascii=False))
    records = [read_via(tmp_path / f / "via.json").records[0] for f in ("slide_1", "slide_2")]
    assert records[0].file_name != records[1].file_name
    assert all(r.file_name.endswith("zelle_ä_血.png") for r in records)


@pytest.mark.parametrize("text, message", [
    ('{"a.jpg1": {"filename": "a.jpg", "regions": [', "not valid JSON at line 1 column"),
    ("", "the file is empty"),
    ("[1, 2, 3]", "not a VIA annotation file"),
    ("[]", "expected an object of images, got a list of 0 items"),
    ("{}", "got an empty object"),
    ('{"images": [], "annotations": []}', "is this a VIA file"),
    ('{"project": {}, "config": {}, "attribute": {}, "file": {}, "metadata": {}, "view": {}}', "VIA 3 project"),
    ('{"project": {}, "config": {}, "attribute": {}, "file": {}, "metadata": {}, "view": {}}', "'name: coco'"),
    ('{"a": {"filename": "a.jpg", "regions": 5}}', "'regions' of type int"),
])
def test_bad_files_raise_naming_the_file(tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(AnnotationError) as err:
        read_via(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_via(tmp_path / "nope.json")
