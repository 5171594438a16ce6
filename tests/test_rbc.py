"""The red-cell pipeline: size classes from area, count accuracy and its table from cached predictions,
recall of touching vs isolated cells, count-only points, the rbc experiment and its tools."""

import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from leukodet.data.prepare import prepare_dataset
from leukodet.data.records import BOX, POINT, POLYGON, ImageRecord, Region
from leukodet.data.sizes import SizeRule, assign_size_classes
from leukodet.data.via import LabelPolicy, read_via
from leukodet.evaluation.counts import count_table, merge_classes
from leukodet.evaluation.metrics import evaluate, touching_instances
from leukodet.structures import ImagePredictions, OperatingPoint, encode_masks, refilter
from conftest import REPO, compose

RBC = ["large", "normal", "small", "undefined"]
H, W = 60, 80


def square(x, y, side, label="cell", kind=POLYGON):
    return Region(label, kind, np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]], float))


# ---------------------------------------------------------------- size classes


def test_size_rule_in_pixels_boundaries_are_normal():
    rule = SizeRule(small_below=100, large_above=400, edge=None)
    areas = {9.99: "small", 10: "normal", 20: "normal", 20.01: "large"}  # square sides -> areas 99.8, 100, 400, 400.4
    for side, expected in areas.items():
        assert rule.label(square(10, 10, side), 200, 200) == expected, side
    # a box counts as its inscribed ellipse: a 20x20 box is a 314 px disc, normal; its polygon (400) too
    assert rule.area(square(10, 10, 20, kind=BOX)) == pytest.approx(np.pi * 100)
    assert rule.label(square(10, 10, 22.6, kind=BOX), 200, 200) == "large"  # pi/4 * 22.6^2 = 401
    assert rule.label(square(10, 10, 22.6), 200, 200) == "large"


def test_size_rule_in_square_micrometres_with_a_pixel_size():
    rule = SizeRule(by="area_um2", um_per_px=0.5, small_below=28.3, large_above=63.6, edge=None)
    # 0.5 um/px: a 12 px square is 36 um2 (normal); 10 px is 25 um2 (small); 16 px is 64 um2 (large)
    assert [rule.label(square(5, 5, s), 100, 100) for s in (10, 12, 16)] == ["small", "normal", "large"]
    assert rule.area(square(5, 5, 12)) == pytest.approx(36.0)
    in_pixels = SizeRule(small_below=28.3 * 4, large_above=63.6 * 4, edge=None)  # the same rule in px
    assert [in_pixels.label(square(5, 5, s), 100, 100) for s in (10, 12, 16)] == ["small", "normal", "large"]


def test_a_rule_in_square_micrometres_takes_the_sources_pixel_size():
    rule = SizeRule(by="area_um2", small_below=28.3, large_above=63.6, edge=None)
    cells = [square(5, 5, s) for s in (10, 12, 16)]  # at 0.5 um/px: 25, 36, 64 um2
    sized = assign_size_classes([ImageRecord("a.jpg", cells, 100, 100, um_per_px=0.5)], rule)
    assert [r.label for r in sized[0].regions] == ["small", "normal", "large"]
    with pytest.raises(ValueError, match="b.jpg: prepare.size_classes.by=area_um2 needs the pixel size"):
        assign_size_classes([ImageRecord("b.jpg", cells, 100, 100)], rule)
    stated = SizeRule(by="area_um2", um_per_px=0.5, small_below=28.3, large_above=63.6, edge=None)
    assert assign_size_classes([ImageRecord("a.jpg", cells, 100, 100, um_per_px=0.5)], stated) == sized
    with pytest.raises(ValueError, match="c.jpg: prepare.size_classes.um_per_px=0.5 but its source states um_per_px=0.4"):
        assign_size_classes([ImageRecord("c.jpg", cells, 100, 100, um_per_px=0.4)], stated)


def test_cells_cut_by_the_border_are_undefined_unless_measured():
    rule = SizeRule(small_below=100, large_above=400)
    assert rule.classes == ["large", "normal", "small", "undefined"]
    assert rule.label(square(0, 30, 5), 100, 100) == "undefined"  # touches the left border
    assert rule.label(square(95, 30, 5), 100, 100) == "undefined"  # reaches the right border
    assert rule.label(square(1, 30, 5), 100, 100) == "small"  # one pixel in
    assert SizeRule(small_below=100, large_above=400, edge=None).label(square(0, 30, 5), 100, 100) == "small"


@pytest.mark.parametrize("node, message", [
    ({"by": "area_um2", "um_per_px": -0.1, "small_below": 1, "large_above": 2}, "must be > 0"),
    ({"by": "area_px", "um_per_px": 0.1, "small_below": 1, "large_above": 2}, "by=area_px ignores it"),
    ({"by": "diameter", "small_below": 1, "large_above": 2}, "choose one of area_px, area_um2"),
    ({"small_below": 5, "large_above": 2}, "small_below .5. <= large_above"),
    ({"small_below": 5}, "needs \\['large_above'\\]"),
    ({"small_below": 1, "large_above": 2, "small_above": 3}, "unknown key"),
])
def test_size_rule_config_errors_name_the_key(node, message):
    with pytest.raises(ValueError, match=message):
        SizeRule.from_config(node)


def test_points_have_no_area_for_a_size_rule():
    record = ImageRecord("a.jpg", [Region("RBC", POINT, np.array([[5.0, 5.0]]))], 100, 100)
    with pytest.raises(ValueError, match="a.jpg: 1 count-only point.*labels instead"):
        assign_size_classes([record], SizeRule(small_below=1, large_above=2))


def test_derived_sizes_agree_with_the_generated_labels(tmp_path):
    """The generated sample draws sizes from disjoint radius ranges: the area rule recovers the label
    of every cell whose outline is whole (touching no other, inside the field); occluded cells
    show less area and can read as smaller, which is the rule's known limit."""
    from leukodet.data.synthetic import generate_smears

    generate_smears(tmp_path, n_images=4, seed=3, kind="rbc")
    labelled = read_via(tmp_path / "via_region_data.json", labels=LabelPolicy("cell_type")).records
    rule = SizeRule(small_below=500, large_above=1000, edge=None)
    derived = assign_size_classes(labelled, rule)
    whole, agree_whole, agree_all = 0, 0, []
    for truth, record in zip(labelled, derived):
        masks = np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            [r.points.reshape(-1).tolist()], record.height, record.width))) for r in truth.regions])
        touching = touching_instances(np.zeros((len(masks), 4)), encode_masks(masks))
        for t, d, touches in zip(truth.regions, record.regions, touching):
            agree_all.append(t.label == d.label)
            x, y, w, h = t.bbox_xywh()
            if not touches and min(x, y, record.width - x - w, record.height - y - h) > 1:
                whole += 1
                agree_whole += t.label == d.label
    assert whole > 50 and agree_whole / whole >= 0.97
    assert np.mean(agree_all) >= 0.8
    assert {r.label for rec in derived for r in rec.regions} == {"large", "normal", "small"}


def test_prepare_with_size_classes_relabels_before_the_split(tmp_path):
    from leukodet.data.synthetic import generate_smears

    generate_smears(tmp_path / "data", n_images=4, seed=1, kind="rbc")
    prepared = prepare_dataset([{"name": "via", "path": str(tmp_path / "data" / "via_region_data.json")}],
                               tmp_path / "prepared", class_attribute="cell_type", flips=[],
                               split={"train": 0.5, "test": 0.5},
                               size_classes={"by": "area_px", "small_below": 500, "large_above": 1000})
    before = prepared.summary[prepared.summary.stage == "split"]
    assert list(before.columns[3:]) == RBC  # the rule's classes, undefined for cells cut by the border
    assert before[RBC].sum().gt(0).all()


# ---------------------------------------------------------------- evaluation


def mask_of(*windows):
    mask = np.zeros((H, W), np.uint8)
    for y0, y1, x0, x1 in windows:
        mask[y0:y1, x0:x1] = 1
    return mask


def gt_record(masks, labels, name="img", points=()):
    """Ground truth with exact pixel masks (as RLE segmentation) and optional count-only points."""
    annotations = []
    for mask, label in zip(masks, labels):
        rle = encode_masks(mask[None])[0]
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        annotations.append({"bbox": [x, y, w, h], "bbox_mode": 1, "segmentation": rle, "category_id": label,
                            "iscrowd": 0})
    return {"file_name": name, "image_id": 1, "height": H, "width": W, "annotations": annotations,
            "points": [{"xy": [x, y], "category_id": c} for x, y, c in points]}


def predictions(masks, labels, scores):
    rles = encode_masks(np.array(masks, np.uint8).reshape(-1, H, W))
    boxes = np.array([mask_utils.toBbox(r) for r in rles], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return ImagePredictions(boxes, np.array(scores, np.float32), np.array(labels, np.int64), rles)


# A: 10x10 at (5, 5); B shares A's right edge; C and D meet at one corner; E and F are 1 px apart;
# G overlaps H. Touching: A, B, C, D, G, H. Isolated: E, F.
CELLS = {"A": (5, 15, 5, 15), "B": (5, 15, 15, 25), "C": (30, 40, 5, 15), "D": (40, 50, 15, 25),
         "E": (5, 15, 40, 50), "F": (5, 15, 51, 61), "G": (30, 42, 40, 52), "H": (36, 48, 48, 60)}


def test_touching_cells_by_mask_and_by_box():
    rles = encode_masks(np.stack([mask_of(w) for w in CELLS.values()]))
    touching = dict(zip(CELLS, touching_instances(np.zeros((len(CELLS), 4)), rles)))
    assert [k for k, t in touching.items() if t] == ["A", "B", "C", "D", "G", "H"]
    # boxes (XYXY, pixel edges): E ends at x=50, F starts at 51 -> apart; A ends at 15 where B starts -> touching
    boxes = np.array([[x0, y0, x1, y1] for y0, y1, x0, x1 in CELLS.values()], float)
    assert touching_instances(boxes).tolist() == [True, True, True, True, False, False, True, True]
    assert touching_instances(boxes[:1]).tolist() == [False]


def test_recall_of_touching_and_isolated_cells_by_hand():
    names = list(CELLS)
    labels = [1, 1, 1, 1, 1, 1, 1, 2]
    record = gt_record([mask_of(CELLS[k]) for k in names], labels)
    # found: A (right class), C (wrong class), E, F; missed: B, D, G, H
    found = {"A": 1, "C": 0, "E": 1, "F": 1}
    preds = predictions([mask_of(CELLS[k]) for k in found], list(found.values()), [0.9] * len(found))
    summary = evaluate([record], [preds], RBC).summary()
    assert (summary["touching_cells"], summary["isolated_cells"]) == (6, 2)
    assert summary["detection_recall_touching"] == pytest.approx(2 / 6)  # A, C found at all
    assert summary["recall_touching"] == pytest.approx(1 / 6)  # A only with its class
    assert summary["detection_recall_isolated"] == summary["recall_isolated"] == 1.0
    from leukodet.evaluation.report import format_touching

    result = evaluate([record], [preds], RBC)
    assert format_touching(result) == ("recall by contact (class-agnostic): touching 6 cells, found 0.3333; "
                                       "isolated 2 cells, found 1.0000")


def test_points_count_when_the_mask_or_box_holds_them_one_to_one():
    """chula_rbc12-style count-only points: a prediction counts for a point its mask holds (its box
    when the prediction has no mask), each prediction and point used once."""
    ring = mask_of((10, 30, 10, 30)) - mask_of((15, 25, 15, 25))  # a mask with a hole, box 10..30
    record = gt_record([], [], points=[(20, 20, 1), (12, 12, 1), (13, 13, 1), (60, 50, 2)])
    masked = predictions([ring], [1], [0.9])
    result = evaluate([record], [masked], RBC)
    assert result.table.loc["any_cell", ["tp", "fp", "fn"]].tolist() == [1, 0, 3]  # (12,12) or (13,13), not (20,20)
    boxed = ImagePredictions(masked.boxes, masked.scores, masked.labels, None)
    result = evaluate([record], [boxed], RBC)
    assert result.iou_type == "bbox"
    assert result.table.loc["any_cell", ["tp", "fp", "fn"]].tolist() == [1, 0, 3]  # the point nearest the centre
    two = predictions([mask_of((10, 16, 10, 16)), mask_of((10, 16, 10, 16))], [1, 1], [0.9, 0.8])
    assert evaluate([record], [two], RBC).table.loc["any_cell", ["tp", "fp"]].tolist() == [2, 0]
    merged = merge_classes([record])[0]
    assert {p["category_id"] for p in merged["points"]} == {0} and record["points"][3]["category_id"] == 2


def count_case():
    """Three images; cached raw predictions with scores spread over the thresholds.
    image a: 4 cells, detections scored 0.95, 0.85, 0.75, 0.65 -> 3 / 2 / 1 above 0.7 / 0.8 / 0.9
    image b: 2 cells, detections 0.95 x3 (one stray)   -> 3 / 3 / 3: accuracy capped at 1
    image c: no cell, one detection 0.99               -> no accuracy"""
    cells = [mask_of((5 + 12 * k, 15 + 12 * k, 5, 15)) for k in range(4)]
    records = [gt_record(cells, [1, 1, 2, 0], "dir/a.jpg"), gt_record(cells[:2], [1, 1], "dir/b.jpg"),
               gt_record([], [], "dir/c.jpg")]
    raw = [predictions(cells, [1, 1, 2, 0], [0.95, 0.85, 0.75, 0.65]),
           predictions([cells[0], cells[1], mask_of((40, 50, 60, 70))], [1, 1, 1], [0.95] * 3),
           predictions([cells[0]], [1], [0.99])]
    return records, raw


def test_count_table_by_hand_and_equal_to_evaluating_each_threshold():
    records, raw = count_case()
    table = count_table(records, raw, RBC, [0.7, 0.8, 0.9], nms=0.5, max_detections=300)
    assert table.per_image.columns.tolist() == ["class", "image", "true", "segmented_0.7", "accuracy_0.7",
                                                "segmented_0.8", "accuracy_0.8", "segmented_0.9", "accuracy_0.9"]
    assert table.per_image["class"].unique().tolist() == [*RBC, "all"]  # a block per class, then all cells
    per_image = table.per_image[table.per_image["class"] == "all"].reset_index(drop=True)
    assert per_image.image.tolist() == ["a.jpg", "b.jpg", "c.jpg", "mean"]
    assert per_image.true.tolist() == [4, 2, 0, 2]
    assert per_image["segmented_0.7"].tolist() == [3, 3, 1, pytest.approx(7 / 3)]
    assert per_image["segmented_0.9"].tolist() == [1, 3, 1, pytest.approx(5 / 3)]
    assert per_image["accuracy_0.7"].tolist()[:2] == [0.75, 1.0] and np.isnan(per_image["accuracy_0.7"][2])
    means = per_image.iloc[-1]
    assert [means[f"accuracy_{t}"] for t in ("0.7", "0.8", "0.9")] == pytest.approx(
        [(3 / 4 + 1) / 2, (2 / 4 + 1) / 2, (1 / 4 + 1) / 2])
    # per class (issue 27): image a holds large, normal x2, small; found at 0.7: normal x2 and small,
    # at 0.9 one normal; b's stray normal is capped by min(found, true); c holds no cell
    normal = table.per_image[table.per_image["class"] == "normal"].reset_index(drop=True)
    assert normal.true.tolist()[:3] == [2, 2, 0] and normal["segmented_0.9"].tolist()[:3] == [1, 3, 1]
    assert normal["accuracy_0.9"].tolist()[:2] == [0.5, 1.0] and normal["accuracy_0.9"].iloc[-1] == 0.75
    large = table.per_image[table.per_image["class"] == "large"].reset_index(drop=True)
    assert large.true.tolist()[:3] == [1, 0, 0] and large["accuracy_0.7"].tolist()[0] == 0.0
    summary = table.summary.set_index(["class", "min_confidence"])
    assert summary.loc[("large", 0.7), "count_accuracy"] == 0.0
    assert summary.loc[("normal", 0.9), "count_accuracy"] == 0.75
    assert np.isnan(summary.loc[("normal", 0.7), "detection_recall"])  # detection figures: all cells only
    for t in (0.7, 0.8, 0.9):
        direct = evaluate(records, [refilter(r, OperatingPoint(t, 0.5, 300)) for r in raw], RBC)
        figures, row = direct.summary(), summary.loc[("all", t)]
        assert row.count_accuracy == pytest.approx(figures["count_accuracy"]) == means[f"accuracy_{t:g}"]
        assert row.detection_recall == figures["detection_recall"]
        assert row.count_mae == direct.table.loc["any_cell", "count_mae"]
        for name in RBC:
            assert summary.loc[(name, t), "count_mae"] == figures[f"count_mae_{name}"]
        found = direct.per_image[[f"pred_{c}" for c in RBC]].sum(axis=1).tolist()
        assert per_image[f"segmented_{t:g}"].tolist()[:3] == found
    assert "mean" in table.format() and "count_accuracy" in table.format()
    one_class = count_table(merge_classes(records), [replace(r, labels=np.zeros_like(r.labels)) for r in raw],
                            ["cell"], [0.7]).per_image
    assert one_class["class"].unique().tolist() == ["cell"] and one_class.true.tolist() == [4, 2, 0, 2]
    with pytest.raises(ValueError, match="count_min_confidence is empty"):
        count_table(records, raw, RBC, [])


# ---------------------------------------------------------------- configs and tools


def test_rbc_experiment_composes():
    cfg = compose("+exp=rbc")
    assert cfg.data.name == "sample_rbc" and cfg.data.generate.kind == "rbc"
    assert cfg.data.prepare.classes == ["large", "normal", "small"]
    assert cfg.model.name == "maskrcnn_r50_fpn" and cfg.model.min_size == 384
    assert cfg.eval.min_confidence == 0.7 and list(cfg.eval.count_min_confidence) == [0.7, 0.8, 0.9]
    assert "min_confidence" not in cfg.model  # the operating point lives in eval alone
    assert "scale_jitter" not in [t.name for t in cfg.augment.transforms]  # size is the class
    assert [s.name for s in cfg.preprocess.steps] == ["scale"]


def test_rbc_data_configs_compose():
    chula = compose("data=chula_rbc12").data.prepare
    assert chula.classes == RBC
    assert (chula.class_map["Macrocyte"], chula.class_map["Normal cell"], chula.class_map["Microcyte"]) == (
        "large", "normal", "small")
    assert set(chula.class_map.values()) == set(RBC)
    bccd = compose("data=bccd_rbc").data
    assert bccd.name == "bccd_rbc" and bccd.prepare.classes == ["RBC"]
    assert bccd.prepare.class_map == {"RBC": "RBC", "WBC": None, "Platelets": None}
    sizes = compose("data=bccd_rbc_sizes").data.prepare
    assert SizeRule.from_config(sizes.size_classes).classes == list(sizes.classes)


@pytest.mark.long
def test_train_rbc_then_count_table_from_the_cache(tmp_path):
    """`+exp=rbc` end to end with the small default model and a few steps, then the count table."""
    run = tmp_path / "run"
    train = [sys.executable, str(REPO / "tools" / "train.py"), "+exp=rbc", "model=maskrcnn_effnet_lite0",
             "model.anchor_sizes=[16,32,64,128]", "model.weights=none", "model.min_size=192", "model.max_size=256", f"data.root={tmp_path / 'data'}",
             "data.generate.n_images=8", "+data.generate.width=256", "+data.generate.height=192",
             "data.prepare.group_regex=null", "data.prepare.split={train:0.5,val:0.25,test:0.25}",
             "train.max_steps=2", "train.batch_size=2", "train.steps_per_epoch=2", "train.warmup_steps=1",
             "train.num_workers=0", f"train.run_dir={run}", f"paths.output_dir={tmp_path / 'outputs'}"]
    done = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recall by contact" in done.stdout
    table = [sys.executable, str(REPO / "tools" / "count_table.py"), f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
             "'eval.count_min_confidence=[0.05,0.5]'", f"paths.output_dir={tmp_path / 'ev'}",
             f"hydra.run.dir={tmp_path / 'ev'}", "train.num_workers=0"]
    for attempt in range(2):
        done = subprocess.run(" ".join(table), shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("cached raw predictions:" in done.stdout) == (attempt == 0)  # the second run reads the cache
    written = pd.read_csv(tmp_path / "ev" / "count_table_test.csv")
    assert written.columns.tolist() == ["class", "image", "true", "segmented_0.05", "accuracy_0.05", "segmented_0.5",
                                        "accuracy_0.5"]
    assert written["class"].unique().tolist() == ["large", "normal", "small", "all"]
    written = written[written["class"] == "all"]
    assert len(written) == 3 and written.image.iloc[-1] == "mean" and (written.true.iloc[:-1] > 0).all()
    summary = pd.read_csv(tmp_path / "ev" / "count_summary_test.csv")
    summary = summary[summary["class"] == "all"]
    assert summary.min_confidence.tolist() == [0.05, 0.5] and summary.touching_cells.iloc[0] > 0
    assert "results saved to" in done.stdout


def test_real_rbc_configs_prepare(shared_datasets, tmp_path):
    """chula_rbc12's size types land in the size classes; bccd_rbc_sizes derives them from box areas."""
    chula = compose("data=chula_rbc12", f"paths.output_dir={tmp_path}", f"paths.shared_datasets={shared_datasets}")
    records = read_via(shared_datasets / "chula_rbc12" / "via_points.json",
                       image_dir=shared_datasets / "chula_rbc12" / "Dataset",
                       labels=LabelPolicy("class", dict(chula.data.prepare.class_map))).records
    counts = Counter(r.label for rec in records for r in rec.regions)
    assert (counts["large"], counts["normal"], counts["small"]) == (689, 6330, 461)
    assert sum(counts.values()) == 22106  # every red cell kept
    bccd = compose("data=bccd_rbc_sizes", f"paths.output_dir={tmp_path}", f"paths.shared_datasets={shared_datasets}")
    from leukodet.data.pipeline import prepare_from_config

    summary = prepare_from_config(bccd.data).summary
    before = summary[summary.stage == "split"]
    assert before[RBC].to_numpy().sum() == 3348  # every RBC box (two zero-size ones are skipped upstream)
    assert before[RBC].sum().gt(0).all() and before["normal"].sum() > before["large"].sum()
