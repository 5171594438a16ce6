"""Every file VIA writes for one project reads to the same records (tests/data/via/README.md)."""

from pathlib import Path

import pytest

from leukodet.data.coco import read_coco
from leukodet.data.records import BOX, POINT, POLYGON
from leukodet.data.via import CLIPPED, CLOSED_POLYLINE, AnnotationError, LabelPolicy, UnmappedLabelError, \
    polygon_area, read_via
from conftest import write_image

DATA = Path(__file__).parent / "data" / "via"
VIA2_JSON = DATA / "via2" / "via_export_json.json"
VIA2_CSV = DATA / "via2" / "via_export_csv.csv"
VIA2_PROJECT = DATA / "via2" / "via_project_2Mar2025_10h0m.json"
VIA2_COCO = DATA / "via2" / "via_export_coco.json"
VIA1_JSON = DATA / "via1" / "via_region_data.json"
VIA1_CSV = DATA / "via1" / "via_region_data.csv"
BY_ID = LabelPolicy("cell_type")
BY_DESCRIPTION = LabelPolicy("cell_type", {"Lymphoblast": "lymphoblast", "Other WBC": "other"})


@pytest.fixture
def images(tmp_path) -> Path:
    write_image(tmp_path / "smear.png", 120, 90)
    write_image(tmp_path / "empty.png", 120, 90, seed=1)
    return tmp_path


def comparable(result):
    """Everything a record and a skip say, except which annotation file they came from."""
    records = [(Path(r.file_name).name, r.width, r.height, [(g.label, g.kind, g.points.tolist()) for g in r.regions])
               for r in result.records]
    skips = [(Path(s.file_name).name, s.region, s.reason) for s in result.skips]
    return records, skips, dict(result.changes)


def test_via2_json_csv_and_project_file_give_identical_records(images):
    json_export = comparable(read_via(VIA2_JSON, images, BY_ID))
    assert comparable(read_via(VIA2_CSV, images, BY_ID)) == json_export
    assert comparable(read_via(VIA2_PROJECT, images, BY_ID)) == json_export
    records, skips, changes = json_export
    smear, empty = records
    assert [(label, kind) for label, kind, _ in smear[3]] == [
        ("lymphoblast", POLYGON), ("lymphoblast", POLYGON), ("other", POLYGON), ("other", POLYGON),
        ("other", BOX), ("lymphoblast", POINT), ("other", POLYGON)]
    assert empty[3] == []
    assert skips == [("smear.png", 7, "no label in region attribute 'cell_type'")]
    assert changes == {CLIPPED: 4, CLOSED_POLYLINE: 1}  # circle, ellipse, polygon, rect; the polyline


def test_via2_csv_writes_an_unset_dropdown_as_bare_undefined_read_as_no_label(images):
    text = VIA2_CSV.read_bytes()
    assert b'"{""cell_type"":undefined,""note"":""check""}"' in text and not text.endswith(b"\n")
    result = read_via(VIA2_CSV, images, BY_ID)
    assert sum(len(r.regions) for r in result.records) == 7
    (skip,) = result.skips
    assert skip.region == 7 and "no label" in skip.reason


def test_via2_shapes_cut_by_the_border_are_clipped_and_kept(images):
    (smear, _) = read_via(VIA2_JSON, images, BY_ID).records
    inside, border_circle, ellipse, concave, rect = (r.points for r in smear.regions[:5])
    for points in (border_circle, ellipse, concave, rect):
        assert points.min() >= 0 and points[:, 0].max() <= 120 and points[:, 1].max() <= 90
    assert polygon_area(border_circle) < polygon_area(inside)
    assert rect.tolist() == [[40, 0], [60, 0], [60, 10], [40, 10]]  # still a box, its top cut off
    # the concave notch at x=112 survives the cut at x=120 (a convex clip would fill it): the
    # 25x20 rectangle left of the border less the notch, a triangle 8 deep with a 20 - 2*50/13 base
    assert [112, 20] in concave.tolist()
    assert polygon_area(concave) == pytest.approx(25 * 20 - 0.5 * 8 * (20 - 2 * 50 / 13))


def test_via1_json_and_csv_agree_and_the_repeated_closing_vertex_is_dropped(images):
    assert VIA1_CSV.read_text().startswith("#filename,file_size,")
    json_export = comparable(read_via(VIA1_JSON, images, BY_ID))
    assert comparable(read_via(VIA1_CSV, images, BY_ID)) == json_export
    records, skips, changes = json_export
    square = records[0][3][0]
    assert square == ("lymphoblast", POLYGON, [[20, 20], [40, 20], [40, 35], [20, 35]])
    assert [kind for _, kind, _ in records[0][3]] == [POLYGON, POLYGON, BOX, POLYGON, POINT]
    assert skips == [] and changes == {CLIPPED: 2}  # the left circle and the right rect


def test_project_file_accepts_the_option_id_or_its_description_as_label(images):
    by_id = comparable(read_via(VIA2_PROJECT, images, BY_ID))
    assert comparable(read_via(VIA2_PROJECT, images, BY_DESCRIPTION)) == by_id
    # an export carries no option table: the description-keyed map fails, naming the close match
    with pytest.raises(UnmappedLabelError, match="'lymphoblast' is not in the class map "
                                                 r"\(close matches in the map: 'Lymphoblast'"):
        read_via(VIA2_JSON, images, BY_DESCRIPTION)


def test_via_coco_export_reads_points_as_count_only_and_shapes_like_the_json_export(images):
    assert b'"segmentation":[[]],"area":[],"bbox":[],"iscrowd":0,"keypoints":[50,20,2],"num_keypoints":1' in \
        VIA2_COCO.read_bytes()
    coco = read_coco(VIA2_COCO, images, BY_DESCRIPTION)
    assert not coco.skips and coco.changes == {CLIPPED: 4}
    (smear, empty) = coco.records
    assert empty.regions == []
    point = smear.regions[5]
    assert (point.label, point.kind, point.points.tolist()) == ("lymphoblast", POINT, [[50, 20]])
    # VIA writes rects as 4-vertex polygons and leaves polylines out of its COCO export
    via = read_via(VIA2_JSON, images, BY_ID).records[0].regions[:6]
    assert [r.label for r in smear.regions] == [r.label for r in via]
    for from_coco, from_json in zip(smear.regions, via):
        if from_json.kind != POINT:
            # VIA's 72-vertex circles and ellipses vs our 64-vertex ones
            assert polygon_area(from_coco.points) == pytest.approx(polygon_area(from_json.points), rel=0.01)


def test_via_coco_export_with_an_id_keyed_map_names_the_close_match(images):
    with pytest.raises(UnmappedLabelError, match=r"'Lymphoblast' is not in the class map \(close matches in the map: "
                                                 "'lymphoblast'"):
        read_coco(VIA2_COCO, images, LabelPolicy("cell_type", {"lymphoblast": "lymphoblast", "other": "other"}))


def test_a_coco_file_given_to_the_via_reader_says_to_use_name_coco(images):
    with pytest.raises(AnnotationError, match="this is a COCO file.*'name: coco'") as err:
        read_via(VIA2_COCO, images)
    assert str(VIA2_COCO) in str(err.value)

