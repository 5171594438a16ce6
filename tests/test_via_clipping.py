"""Shapes cut by the image border are clipped by true polygon intersection and kept."""

import json
import math

import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from leukodet.data.coco import read_coco, write_coco
from leukodet.data.prepare import prepare_dataset
from leukodet.data.records import BOX, POLYGON
from leukodet.data.via import CLIPPED, CLOSED_POLYLINE, polygon_area, read_via, shape_to_region
from conftest import write_image

WIDTH, HEIGHT = 200, 150


def via_file(tmp_path, shapes, label="cell"):
    write_image(tmp_path / "a.png", WIDTH, HEIGHT)
    regions = [{"shape_attributes": s, "region_attributes": {"class": label}} for s in shapes]
    path = tmp_path / "via.json"
    path.write_text(json.dumps({"a.png1": {"filename": "a.png", "size": 1, "regions": regions, "file_attributes": {}}}))
    return path


def mask_area(points, width, height) -> int:
    rle = mask_utils.frPyObjects([points.reshape(-1).tolist()], height, width)
    return int(mask_utils.decode(rle).sum())


def test_circle_cut_by_the_border_keeps_the_analytic_area_inside(tmp_path):
    cx, cy, r = 20.0, 75.0, 50.0  # centre inside, 30 px of the circle past the left border
    result = read_via(via_file(tmp_path, [{"name": "circle", "cx": cx, "cy": cy, "r": r}]))
    assert not result.skips and result.changes == {CLIPPED: 1}
    # the circle less the circular segment beyond x = 0, a chord at distance cx from the centre
    segment_outside = r * r * math.acos(cx / r) - cx * math.sqrt(r * r - cx * cx)
    analytic_inside = math.pi * r * r - segment_outside

    coco = COCO(str(write_coco(tmp_path / "out.json", result.records, ["cell"])))
    (ann,) = coco.loadAnns(coco.getAnnIds())
    assert coco.annToMask(ann).sum() == pytest.approx(analytic_inside, rel=0.01)
    assert ann["area"] == pytest.approx(analytic_inside, rel=0.01)


@pytest.mark.parametrize("shape", [
    {"name": "polygon", "all_points_x": [170, 230, 215, 230, 170], "all_points_y": [20, 20, 50, 80, 80]},  # concave
    {"name": "polyline", "all_points_x": [150, 240, 180], "all_points_y": [100, 110, 170]},
    {"name": "rect", "x": -30, "y": 100, "width": 70, "height": 80},
    {"name": "circle", "cx": 100, "cy": 10, "r": 35},
    {"name": "ellipse", "cx": 190, "cy": 140, "rx": 45, "ry": 25, "theta": 0.7},
], ids=lambda shape: shape["name"])
def test_every_shape_crossing_the_border_is_cut_to_what_lies_inside(tmp_path, shape):
    """The clipped mask matches the unclipped shape drawn on a larger canvas and cropped to the image."""
    result = read_via(via_file(tmp_path, [shape]))
    (region,) = result.records[0].regions
    assert result.changes[CLIPPED] == 1
    assert region.kind == (BOX if shape["name"] == "rect" else POLYGON)
    assert region.points.min() >= 0 and region.points[:, 0].max() <= WIDTH and region.points[:, 1].max() <= HEIGHT

    pad = 100
    whole = shape_to_region(shape, "cell").points + pad
    rle = mask_utils.frPyObjects([whole.reshape(-1).tolist()], HEIGHT + 2 * pad, WIDTH + 2 * pad)
    expected = mask_utils.decode(rle)[pad:pad + HEIGHT, pad:pad + WIDTH].sum()
    assert mask_area(region.points, WIDTH, HEIGHT) == pytest.approx(expected, rel=0.01)


def test_an_outline_cut_into_two_parts_keeps_the_larger(tmp_path):
    # a U lying on its side, base beyond the right border: two arms reach into the image
    u_shape = {"name": "polygon", "all_points_x": [160, 230, 230, 170, 170, 210, 210, 160],
               "all_points_y": [10, 10, 90, 90, 70, 70, 30, 30]}
    (region,) = read_via(via_file(tmp_path, [u_shape])).records[0].regions
    assert polygon_area(region.points) == pytest.approx(40 * 20)  # upper arm 40x20, lower 30x20
    assert region.bbox_xywh() == [160, 10, 40, 20]


def test_a_self_crossing_outline_across_the_border_is_repaired_then_clipped(tmp_path):
    # edges (150,10)-(230,50) and (230,20)-(150,50) cross at x = 150 + 320/7, inside the image
    bow_tie = {"name": "polygon", "all_points_x": [150, 230, 230, 150], "all_points_y": [10, 50, 20, 50]}
    (region,) = read_via(via_file(tmp_path, [bow_tie])).records[0].regions
    assert polygon_area(region.points) == pytest.approx(0.5 * 40 * 320 / 7)  # its left lobe, the larger part


def test_shapes_with_nothing_or_too_little_inside_are_skipped(tmp_path):
    path = via_file(tmp_path, [
        {"name": "circle", "cx": -50, "cy": 50, "r": 20},  # wholly outside
        {"name": "rect", "x": -10, "y": 10, "width": 10.5, "height": 1},  # 0.5 px² inside
        {"name": "rect", "x": 10, "y": 10, "width": 10, "height": 5},  # 50 px², inside
    ])
    reasons = {s.region: s.reason for s in read_via(path).skips}
    assert reasons == {0: f"outside the {WIDTH}x{HEIGHT} image",
                       1: f"less than 1 px² inside the {WIDTH}x{HEIGHT} image"}
    assert {s.region for s in read_via(path, min_area_inside=0.25).skips} == {0}
    assert {s.region for s in read_via(path, min_area_inside=60).skips} == {0, 1, 2}


def test_the_coco_reader_clips_by_the_same_rule(tmp_path):
    write_image(tmp_path / "a.png", WIDTH, HEIGHT)
    polygon = [180, 20, 240, 20, 240, 60, 180, 60]
    far_out = [300, 20, 340, 20, 340, 60]
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}],
            "categories": [{"id": 1, "name": "cell"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [polygon], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [far_out], "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    result = read_coco(tmp_path / "coco.json")
    (region,) = result.records[0].regions
    assert polygon_area(region.points) == pytest.approx(20 * 40) and result.changes == {CLIPPED: 1}
    assert [(s.region, s.reason) for s in result.skips] == [(2, f"outside the {WIDTH}x{HEIGHT} image")]


def test_prepare_reports_clipped_regions_and_closed_polylines_and_takes_min_area_inside(tmp_path, caplog):
    path = via_file(tmp_path, [
        {"name": "circle", "cx": 5, "cy": 75, "r": 20},
        {"name": "polyline", "all_points_x": [60, 90, 75], "all_points_y": [50, 50, 80]},
        {"name": "rect", "x": 100, "y": 100, "width": 5, "height": 5},
    ])
    common = {"split": {"train": 1.0}, "flips": []}
    with caplog.at_level("INFO", logger="leukodet.data.prepare"):
        prepare_dataset([{"name": "via", "path": str(path)}], tmp_path / "out", **common)
    printed = caplog.text
    assert f"regions kept but changed: 1 {CLIPPED}, 1 {CLOSED_POLYLINE}" in printed
    prepared = prepare_dataset([{"name": "via", "path": str(path)}], tmp_path / "out2", min_area_inside=30, **common)
    assert [s.reason for s in prepared.skips] == [f"less than 30 px² inside the {WIDTH}x{HEIGHT} image"]
    assert prepared.summary["cell"].tolist() == [2]  # the circle and the polyline
