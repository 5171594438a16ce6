"""Evaluator metrics against references: pycocotools directly, hand-made matching cases, the seed's MAE."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from leukodet.evaluation.coco_eval import coco_ground_truth, coco_results
from leukodet.evaluation.matching import match, tally
from leukodet.evaluation.metrics import evaluate
from leukodet.evaluation.predictions import ImagePredictions, encode_masks

H, W = 120, 160


def square(x, y, s=20):
    return [float(x), float(y), float(x + s), float(y), float(x + s), float(y + s), float(x), float(y + s)]


def record(cells, name="img"):
    """cells: list of (x, y, class) squares of side 20."""
    return {"file_name": name, "image_id": 1, "height": H, "width": W,
            "annotations": [{"bbox": [x, y, 20, 20], "bbox_mode": 1, "segmentation": [square(x, y)],
                             "category_id": c, "iscrowd": 0} for x, y, c in cells]}


def predictions(cells, dx=0, dy=0):
    """cells: list of (x, y, class, score); masks are the squares shifted by (dx, dy)."""
    masks = np.zeros((len(cells), H, W), np.uint8)
    for i, (x, y, _, _) in enumerate(cells):
        masks[i, y + dy:y + dy + 20, x + dx:x + dx + 20] = 1
    boxes = np.array([[x + dx, y + dy, x + dx + 20, y + dy + 20] for x, y, _, _ in cells], np.float32).reshape(-1, 4)
    return ImagePredictions(boxes, np.array([c[3] for c in cells], np.float32),
                            np.array([c[2] for c in cells], np.int64), encode_masks(masks))


def test_perfect_predictions_score_one():
    records = [record([(10, 10, 0), (60, 40, 1)]), record([(100, 80, 1)])]
    preds = [predictions([(10, 10, 0, 0.9), (60, 40, 1, 0.8)]), predictions([(100, 80, 1, 0.7)])]
    result = evaluate(records, preds, ["a", "b"])
    row = result.table.loc["all"]
    assert row.precision == row.recall == row.f1 == row.accuracy == 1.0
    assert row.ap50_segm == pytest.approx(1.0) and row.ap50_bbox == pytest.approx(1.0)
    assert result.table.loc["a"].count_mae == 0 and result.table.loc["b"].count_mae == 0
    assert result.summary()["count_accuracy"] == 1.0


def test_matching_edge_cases():
    # GT at index 0 is matched; one prediction overlapping two GTs takes the higher IoU
    ious = np.array([[0.55, 0.8]])
    assert match(np.array([0.9]), ious).tolist() == [1]
    assert match(np.array([0.9]), np.array([[0.7, 0.1]])).tolist() == [0]
    # two predictions on one GT: the higher score matches, the other is unmatched
    assert match(np.array([0.6, 0.9]), np.array([[0.9], [0.7]])).tolist() == [-1, 0]
    # empty GT, no predictions
    assert match(np.array([0.5]), np.zeros((1, 0))).tolist() == [-1]
    assert match(np.array([]), np.zeros((0, 3))).tolist() == []
    counts = tally(np.array([-1]), np.array([1]), np.array([], np.int64), 2)
    assert counts["fp"].tolist() == [0, 1] and counts["fn"].tolist() == [0, 0]
    counts = tally(np.array([], np.int64), np.array([], np.int64), np.array([0, 0, 1]), 2)
    assert counts["fn"].tolist() == [2, 1] and counts["any_fn"] == 3
    # wrong-class match: FP for the predicted class, FN for the true one, class-agnostic TP
    counts = tally(np.array([0]), np.array([1]), np.array([0]), 2)
    assert counts["tp"].tolist() == [0, 0] and counts["fp"].tolist() == [0, 1] and counts["fn"].tolist() == [1, 0]
    assert (counts["any_tp"], counts["any_fp"], counts["any_fn"]) == (1, 0, 0)
    assert counts["confusion"][0, 1] == 1


def test_wrong_class_and_missed_cell_end_to_end():
    records = [record([(10, 10, 0), (60, 40, 1), (100, 80, 1)])]
    preds = [predictions([(10, 10, 1, 0.9), (60, 40, 1, 0.8), (130, 5, 0, 0.3)])]
    table = evaluate(records, preds, ["a", "b"]).table
    assert (table.loc["a"].tp, table.loc["a"].fp, table.loc["a"].fn) == (0, 1, 1)
    assert (table.loc["b"].tp, table.loc["b"].fp, table.loc["b"].fn) == (1, 1, 1)
    assert (table.loc["any_cell"].tp, table.loc["any_cell"].fp, table.loc["any_cell"].fn) == (2, 1, 1)
    assert table.loc["all"].accuracy == pytest.approx(1 / 5)


def test_ap50_equals_pycocotools_directly():
    rng = np.random.default_rng(0)
    records, preds = [], []
    for i in range(6):
        cells = [(int(x), int(y), int(c)) for x, y, c in zip(rng.integers(0, 130, 5), rng.integers(0, 90, 5),
                                                               rng.integers(0, 2, 5))]
        records.append(record(cells, f"img{i}"))
        guesses = [(x, y, c if rng.random() > 0.2 else 1 - c, float(rng.random())) for x, y, c in cells[:4]]
        guesses.append((int(rng.integers(0, 130)), int(rng.integers(0, 90)), 0, float(rng.random())))
        preds.append(predictions(guesses, dx=int(rng.integers(0, 4)), dy=int(rng.integers(0, 4))))
    result = evaluate(records, preds, ["a", "b"])
    for kind in ("bbox", "segm"):
        gt = coco_ground_truth(records, ["a", "b"])
        with contextlib.redirect_stdout(io.StringIO()):
            direct = COCOeval(gt, gt.loadRes(coco_results(preds, kind)), kind)  # default maxDets: 5 per image fit
            direct.evaluate()
            direct.accumulate()
            direct.summarize()
        # stats[1] is AP at IoU 0.5 over all classes, stats[0] AP at 0.50:0.95, as COCOeval reports them
        assert result.table.loc["all"][f"ap50_{kind}"] == pytest.approx(direct.stats[1], abs=1e-9)
        assert result.table.loc["all"][f"ap_{kind}"] == pytest.approx(direct.stats[0], abs=1e-9)


def test_seed_count_mae_on_69_images():
    """WBC paper: 69 test images, MAE 0.1159 lymphoblast (8 cells) and 0.1014 non-lymphoblast (7)."""
    records, preds = [], []
    for i in range(69):
        records.append(record([(10, 10, 0), (60, 40, 1)], f"img{i}"))
        cells = [(10, 10, 0, 0.9), (60, 40, 1, 0.9)]
        if i < 8:  # one lymphoblast missed
            cells = cells[1:]
        if 8 <= i < 15:  # one extra non-lymphoblast
            cells = cells + [(120, 80, 1, 0.8)]
        preds.append(predictions(cells))
    table = evaluate(records, preds, ["lymphoblast", "non_lymphoblast"]).table
    assert round(table.loc["lymphoblast"].count_mae, 4) == 0.1159
    assert round(table.loc["non_lymphoblast"].count_mae, 4) == 0.1014
    assert table.loc["lymphoblast"].count_bias == pytest.approx(-8 / 69)
    assert table.loc["non_lymphoblast"].count_bias == pytest.approx(7 / 69)


def test_count_accuracy_and_lymphoblast_share_by_hand():
    records = [record([(10, 10, 0), (40, 10, 1), (70, 10, 1), (100, 10, 1)]), record([(10, 10, 1), (40, 10, 1)])]
    preds = [predictions([(10, 10, 0, 0.9), (40, 10, 0, 0.9)]), predictions([(10, 10, 1, 0.9), (40, 10, 1, 0.9),
                                                                            (70, 70, 1, 0.9)])]
    summary = evaluate(records, preds, ["lymphoblast", "other"]).summary()
    assert summary["count_accuracy"] == pytest.approx((2 / 4 + 2 / 2) / 2)
    # shares: image 1 true 1/4, predicted 2/2; image 2 true 0, predicted 0
    assert summary["lymphoblast_share_mae"] == pytest.approx((0.75 + 0) / 2)


def test_min_confidence_filters_before_scoring():
    records = [record([(10, 10, 0)])]
    preds = [predictions([(10, 10, 0, 0.9), (90, 60, 0, 0.4)])]
    assert evaluate(records, preds, ["a"], min_confidence=0.5).table.loc["all"].precision == 1.0
    assert evaluate(records, preds, ["a"], min_confidence=0.0).table.loc["all"].precision == 0.5


def test_empty_split_gives_undefined_not_a_crash():
    result = evaluate([], [], ["lymphoblast", "other"])
    assert result.table.loc["all"].tp == 0 and np.isnan(result.table.loc["all"].precision)
    assert len(result.per_image) == 0


def test_report_files_and_pr_curves(tmp_path):
    from leukodet.evaluation.report import save_report

    records = [record([(10, 10, 0), (60, 40, 1)])]
    result = evaluate(records, [predictions([(10, 10, 0, 0.9), (60, 40, 1, 0.8), (120, 80, 1, 0.3)])], ["a", "b"])
    assert result.pr_curves["segm"].shape == (2, 101)
    assert result.pr_curves["segm"][0][0] == pytest.approx(1.0)  # class a: first recall point at precision 1
    save_report(result, tmp_path, prefix="val_")
    for name in ("metrics.csv", "metrics.json", "counts_per_image.csv", "confusion.png", "pr_curves.png"):
        assert (tmp_path / f"val_{name}").stat().st_size > 0
