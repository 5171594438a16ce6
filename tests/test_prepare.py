"""Preparation: cleaning, grouped stratified split, flips with mirrored polygons, balancing, rescale."""

import json
import shutil

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from leukodet.data.prepare import balance_with_flips, flip_record, prepare_dataset, rescale_record, split_records
from leukodet.data.records import POLYGON, ImageRecord, Region
from conftest import write_image

TRIANGLE = np.array([[10.0, 5.0], [30.0, 5.0], [10.0, 25.0]])


def records_with_groups(n_groups, per_group, labels=("a", "b")):
    records = []
    for g in range(n_groups):
        for i in range(per_group):
            label = labels[g % len(labels)]
            rec = ImageRecord(f"/data/patient{g:02d}/img{i}.png", [Region(label, POLYGON, TRIANGLE)], 64, 48)
            rec.group = f"p{g}"
            records.append(rec)
    return records


def test_split_is_grouped_seeded_stratified_and_near_ratio():
    records = records_with_groups(30, 3)
    parts = split_records(records, {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    groups = {name: {r.group for r in part} for name, part in parts.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) \
        and not (groups["val"] & groups["test"])
    for split, target in (("train", 63), ("val", 18), ("test", 9)):
        assert abs(len(parts[split]) - target) <= 3, split  # within one group of its share
    for name, part in parts.items():  # both classes in every split (stratified)
        assert {r.regions[0].label for r in part} == {"a", "b"}, name
    again = split_records(records, {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    assert [r.file_name for r in again["val"]] == [r.file_name for r in parts["val"]]
    other = split_records(records, {"train": 0.7, "val": 0.2, "test": 0.1}, seed=4)
    assert [r.file_name for r in other["val"]] != [r.file_name for r in parts["val"]]


def coco_raster(points, height, width):
    """The mask COCO tools rasterise from a polygon (continuous coordinates, pixel i = [i, i+1))."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.frPyObjects([points.reshape(-1).tolist()], height, width))[..., 0] > 0


def test_pinned_split_holds_out_matching_paths():
    records = records_with_groups(10, 2)
    parts = split_records(records, {"train": 0.8, "val": 0.2}, seed=0, pinned={"test": r"patient0[0-2]/"})
    assert sorted({r.group for r in parts["test"]}) == ["p0", "p1", "p2"]
    assert len(parts["train"]) + len(parts["val"]) == 14 and not any(r.group in {"p0", "p1", "p2"}
                                                                     for r in parts["train"] + parts["val"])


def test_flip_mirrors_polygons_with_the_pixels(tmp_path):
    shape = np.array([[10.0, 5.0], [40.0, 8.0], [12.0, 37.0]])
    image = coco_raster(shape, 48, 64).astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "src.png"), image)
    record = ImageRecord(str(tmp_path / "src.png"), [Region("a", POLYGON, shape)], 64, 48)
    for flip in ("x", "y", "xy"):
        flipped = flip_record(record, flip, tmp_path / f"{flip}.png")
        pixels = cv2.imread(flipped.file_name, cv2.IMREAD_GRAYSCALE) > 0
        drawn = coco_raster(flipped.regions[0].points, 48, 64)
        assert (pixels != drawn).sum() <= 0.02 * pixels.sum(), flip  # edge ties only
        assert (pixels != np.roll(drawn, 1, axis=1 if flip == "x" else 0)).sum() > 0.05 * pixels.sum()


def test_rescale_scales_polygons_and_image(tmp_path):
    write_image(tmp_path / "src.jpg", 100, 50)
    record = ImageRecord(str(tmp_path / "src.jpg"), [Region("a", POLYGON, TRIANGLE)], 100, 50)
    small = rescale_record(record, 0.2, tmp_path / "small.jpg")
    assert (small.width, small.height) == (20, 10)
    assert cv2.imread(small.file_name).shape[:2] == (10, 20)
    np.testing.assert_allclose(small.regions[0].points, TRIANGLE * 0.2)


def test_balancing_flips_the_minority_then_drops_majority_only_images():
    minority = [ImageRecord(f"m{i}", [Region("blast", POLYGON, TRIANGLE)]) for i in range(2)]
    majority = [ImageRecord(f"M{i}", [Region("other", POLYGON, TRIANGLE)] * 2) for i in range(10)]
    plain = balance_with_flips(minority + majority, ["x", "y", "xy"], balance=False, target_ratio=1.0)
    assert len(plain) == 48
    pairs = balance_with_flips(minority + majority, ["x", "y", "xy"], balance=True, target_ratio=1.0, seed=0)
    counts = {"blast": 0, "other": 0}
    for rec, _ in pairs:
        for r in rec.regions:
            counts[r.label] += 1
    assert counts["blast"] == 8  # every minority image in all 4 orientations
    assert counts["other"] <= 8 and counts["blast"] / counts["other"] >= 1.0
    assert all(flip is None for rec, flip in pairs if rec.regions[0].label == "other")


def write_via(folder, entries):
    (folder / "via.json").write_text(json.dumps({
        name: {"filename": name, "size": 1, "file_attributes": {},
               "regions": [{"shape_attributes": {"name": "polygon", "all_points_x": list(xs), "all_points_y": list(ys)},
                            "region_attributes": {"cell_type": label}} for label, xs, ys in regions]}
        for name, regions in entries.items()}))
    return folder / "via.json"


def test_prepare_end_to_end_reports_drops_duplicates_and_writes_splits(tmp_path):
    src = tmp_path / "src"
    entries = {}
    for p in range(20):
        for i in range(2):
            name = f"patient{p:02d}_img{i}.png"
            write_image(src / name, seed=p * 10 + i)
            entries[name] = [("blast" if p % 2 else "neutrophil", [10, 30, 10], [5, 5, 25])]
    write_image(src / "unlabelled.png", seed=999)
    entries["unlabelled.png"] = []
    shutil.copy(src / "patient00_img0.png", src / "patient99_copy.png")
    entries["patient99_copy.png"] = entries["patient00_img0.png"]
    sources = [{"name": "via", "path": str(write_via(src, entries)), "image_dir": str(src)}]

    out = tmp_path / "prepared"
    prepared = prepare_dataset(sources, out, classes=["lymphoblast", "non_lymphoblast"], class_attribute="cell_type",
                               class_map={"blast": "lymphoblast", "neutrophil": "non_lymphoblast"},
                               group_regex=r"patient(\d+)", flips=["x", "y", "xy"], seed=0)
    duplicate, unlabelled = sorted(prepared.skips, key=lambda s: s.reason)
    assert duplicate.reason.startswith("duplicate image") and duplicate.file_name.endswith("patient99_copy.png")
    assert duplicate.detail.endswith("patient00_img0.png") and unlabelled.reason == "no labelled region"
    sizes = {split: len(COCO(str(path)).getImgIds()) for split, path in prepared.split_files.items()}
    assert sizes["train"] % 4 == 0 and sizes["train"] // 4 + sizes["val"] + sizes["test"] == 40  # 4 flips
    assert sizes["val"] >= 6 and sizes["test"] >= 2
    train = json.loads((out / "train.json").read_text())
    assert len({img["file_name"] for img in train["images"]}) == len(train["images"])
    summary = prepared.summary
    assert list(summary.columns) == ["split", "stage", "images", "lymphoblast", "non_lymphoblast"]
    assert (out / "summary.csv").is_file() and (out / "skipped.csv").read_text().count("\n") == 3
    # flipped images live in the output folder, originals are referenced where they are
    assert all((out / img["file_name"]).is_file() for img in train["images"])


def test_prepare_unknown_label_not_in_classes(tmp_path):
    write_image(tmp_path / "a.png")
    sources = [{"name": "via", "path": str(write_via(tmp_path, {"a.png": [("zz", [1, 9, 1], [1, 1, 9])]}))}]
    with pytest.raises(ValueError, match=r"labels \['zz'\] are not in classes"):
        prepare_dataset(sources, tmp_path / "out", classes=["a"], class_attribute="cell_type")


def test_one_bad_file_loses_nothing_else(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_image(good / "a.png")
    write_via(good, {"a.png": [("x", [1, 9, 1], [1, 1, 9])]})
    bad.mkdir()
    (bad / "via.json").write_text('{"a.png": {"filename": "a.png", "regions": [{"shape_att')
    sources = [{"name": "via", "path": str(good / "via.json")}, {"name": "via", "path": str(bad / "via.json")}]
    prepared = prepare_dataset(sources, tmp_path / "out", class_attribute="cell_type", split={"train": 1.0}, flips=[])
    assert len(COCO(str(prepared.split_files["train"])).getImgIds()) == 1
    (skip,) = prepared.skips
    assert "bad/via.json: not valid JSON at line 1" in skip.reason
    with pytest.raises(ValueError, match="no annotation file could be read"):
        prepare_dataset(sources[1:], tmp_path / "out2", class_attribute="cell_type")


def two_acquisitions(tmp_path):
    """Two annotation files (scanners, told apart by image width) with opposite class mixes that
    cancel out overall."""
    sources = []
    for scanner, blasts, width in (("a", 2, 64), ("b", 10, 80)):
        folder = tmp_path / scanner
        entries = {}
        for i in range(12):
            name = f"img{i:02d}.png"
            write_image(folder / name, width=width, seed=width * 100 + i)
            entries[name] = [("blast" if i < blasts else "neutrophil", [10, 30, 10], [5, 5, 25])]
        sources.append({"name": "via", "path": str(write_via(folder, entries)), "image_dir": str(folder)})
    return sources


def test_per_source_balancing_evens_out_each_acquisition(tmp_path):
    sources = two_acquisitions(tmp_path)
    common = dict(classes=["blast", "neutrophil"], class_attribute="cell_type", split={"train": 1.0},
                  flips=["x", "y", "xy"], target_ratio=1.0)
    prepare_dataset(sources, tmp_path / "global", balance=True, **common)
    train = json.loads((tmp_path / "global" / "train.json").read_text())
    assert len(train["images"]) == 24  # 12 blasts, 12 others overall: nothing to balance
    prepare_dataset(sources, tmp_path / "per_source", balance="per_source", **common)
    train = json.loads((tmp_path / "per_source" / "train.json").read_text())
    width = {img["id"]: img["width"] for img in train["images"]}
    counts = {}
    for ann in train["annotations"]:
        key = width[ann["image_id"]], ann["category_id"]
        counts[key] = counts.get(key, 0) + 1
    # a: 2 blasts in 4 orientations, 2 of its 10 others dropped; b: the mirror image
    assert counts == {(64, 1): 8, (64, 2): 8, (80, 1): 8, (80, 2): 8}
    with pytest.raises(ValueError, match="per_source"):
        prepare_dataset(sources, tmp_path / "typo", balance="per-source", **common)


def test_changed_prepare_settings_prepare_again(tmp_path, caplog):
    from leukodet.data.pipeline import ensure_prepared

    data = {"name": "two_scanners", "prepared_dir": str(tmp_path / "prepared"), "generate": None,
            "prepare": {"sources": two_acquisitions(tmp_path), "classes": ["blast", "neutrophil"],
                        "class_attribute": "cell_type", "split": {"train": 0.5, "val": 0.5}, "flips": [], "seed": 0}}
    ensure_prepared(data)
    val = tmp_path / "prepared" / "val.json"
    first = val.read_text()
    stamp = val.stat().st_mtime_ns
    ensure_prepared(data)
    assert val.stat().st_mtime_ns == stamp  # same settings: reused
    data["prepare"]["seed"] = 1
    ensure_prepared(data)
    assert val.read_text() != first and "prepared with other settings" in caplog.text


def test_prepare_writes_each_sources_cell_scale_and_carries_its_pixel_size(tmp_path):
    sources = two_acquisitions(tmp_path)
    sources[0]["um_per_px"] = 0.5  # scanner a states its pixel size, b does not
    common = dict(classes=["blast", "neutrophil"], class_attribute="cell_type", split={"train": 1.0}, flips=[])
    prepare_dataset(sources, tmp_path / "full", **common)
    prepare_dataset(sources, tmp_path / "half", scale=0.5, **common)
    triangle_px = 20  # sqrt of its 20 x 20 box
    for folder, factor in (("full", 1.0), ("half", 0.5)):
        scale = json.loads((tmp_path / folder / "scale.json").read_text())["train"]
        a, b = scale["a/via.json"], scale["b/via.json"]
        assert a["images"] == a["cells"] == 12 and a["cell_px"] == pytest.approx(triangle_px * factor, abs=0.01)
        assert a["um_per_px"] == pytest.approx(0.5 / factor)  # a rescaled image's pixels are larger
        assert a["cell_um"] == pytest.approx(triangle_px * 0.5, abs=0.01)  # the cells' size does not change
        assert b["um_per_px"] is None and b["cell_um"] is None
    train = json.loads((tmp_path / "half" / "train.json").read_text())
    assert {img.get("um_per_px") for img in train["images"]} == {1.0, None}
    for bad, message in (("'abc'", "is not a number"), (350, "outside 0.02-5 um")):
        sources[0]["um_per_px"] = bad.strip("'") if isinstance(bad, str) else bad
        with pytest.raises(ValueError, match=f"a/via.json: um_per_px={bad}.*{message}"):
            prepare_dataset(sources, tmp_path / "bad", **common)
