"""Evaluator figures against references: pycocotools run directly, hand counts, the seed's MAE."""

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from leukodet.evaluation.metrics import evaluate, evaluate_by_source, resolve_share_class
from leukodet.structures import ImagePredictions
from leukodet.models.base import Detections
from leukodet.registry import METRICS

H, W = 192, 256
CLASSES = ["lymphoblast", "non_lymphoblast"]


def circle(cx, cy, r, n=16):
    """A cell outline: an n-gon polygon, flat [x1, y1, ...]."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).round(1).reshape(-1).tolist()


def extent(polygon):
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def record(cells, name="img", height=H, width=W, points=()):
    """cells: [(cx, cy, r, class)]; points: [(x, y, class)] count-only."""
    annotations = []
    for cx, cy, r, label in cells:
        polygon = circle(cx, cy, r)
        x0, y0, x1, y1 = extent(polygon)
        annotations.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": 1, "segmentation": [polygon],
                            "category_id": label, "iscrowd": 0})
    return {"file_name": name, "image_id": 1, "height": height, "width": width, "annotations": annotations,
            "points": [{"xy": [x, y], "category_id": c} for x, y, c in points]}


def prediction(cells, height=H, width=W):
    """cells: [(cx, cy, r, class, score)] -> ImagePredictions with the circles' RLE masks."""
    polygons = [circle(cx, cy, r) for cx, cy, r, _, _ in cells]
    return ImagePredictions(np.array([extent(p) for p in polygons], np.float32).reshape(-1, 4),
                            np.array([c[4] for c in cells], np.float32), np.array([c[3] for c in cells], np.int64),
                            [mask_utils.merge(mask_utils.frPyObjects([p], height, width)) for p in polygons])


def noisy_case(seed, n_images=4, cells_per_image=12):
    """Cells with jittered, resized, sometimes misclassified or missed predictions and a few strays."""
    rng = np.random.default_rng(seed)
    records, preds = [], []
    for i in range(n_images):
        cells = [(float(rng.uniform(15, W - 15)), float(rng.uniform(15, H - 15)), float(rng.uniform(6, 12)),
                  int(rng.integers(0, 2))) for _ in range(cells_per_image)]
        found = [(cx + rng.normal(0, 1.5), cy + rng.normal(0, 1.5), r * rng.uniform(0.8, 1.2),
                  label if rng.random() > 0.15 else 1 - label, float(rng.uniform(0.05, 1)))
                 for cx, cy, r, label in cells if rng.random() > 0.1]
        found += [(float(rng.uniform(15, W - 15)), float(rng.uniform(15, H - 15)), 8.0, int(rng.integers(0, 2)),
                   float(rng.uniform(0.05, 0.6))) for _ in range(3)]
        records.append(record(cells, f"img{i}"))
        preds.append(prediction(found))
    return records, preds


def cocoeval_directly(records, preds, iou_type, max_dets=(1, 10, 100), category=None):
    """COCOeval on a COCO dataset and results built here from the same records and predictions."""
    images, annotations, results = [], [], []
    for image_id, (rec, pred) in enumerate(zip(records, preds), start=1):
        images.append({"id": image_id, "height": rec["height"], "width": rec["width"]})
        for ann in rec["annotations"]:
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], rec["height"], rec["width"]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ann["category_id"] + 1,
                                "bbox": ann["bbox"], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                "segmentation": ann["segmentation"]})
        for box, score, label, rle in zip(pred.boxes, pred.scores, pred.labels, pred.rles):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                            "segmentation": rle})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        direct = COCOeval(gt, gt.loadRes(results), iou_type)
        direct.params.maxDets = list(max_dets)
        if category is not None:
            direct.params.catIds = [category + 1]
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    return direct.stats  # [0] AP 0.50:0.95 at maxDets 100, [1] AP50 at the last maxDets


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_ap_equals_pycocotools_directly(kind):
    records, preds = noisy_case(seed=0)
    table = evaluate(records, preds, CLASSES).table
    stats = cocoeval_directly(records, preds, kind)  # at most 100 detections per image: defaults apply
    assert table.loc["all", f"ap50_{kind}"] == pytest.approx(stats[1], abs=1e-12)
    assert table.loc["all", f"ap_{kind}"] == pytest.approx(stats[0], abs=1e-12)
    assert 0.3 < stats[1] < 0.95  # a case with real errors, not a trivial one
    for c, name in enumerate(CLASSES):
        assert table.loc[name, f"ap50_{kind}"] == pytest.approx(cocoeval_directly(records, preds, kind, category=c)[1])


def test_ap_is_over_all_scores_while_matching_is_at_min_confidence():
    """DESIGN.md: AP over all scores. A min confidence of 0.5 must not cut the precision-recall
    curve off (that understates AP), while P/R/F1 and counts are those of scores > 0.5 alone."""
    records, preds = noisy_case(seed=0)
    at_point = evaluate(records, preds, CLASSES, min_confidence=0.5).table
    above = [p.select(np.nonzero(p.scores > 0.5)[0]) for p in preds]
    assert at_point.loc["all", "ap50_segm"] == pytest.approx(cocoeval_directly(records, preds, "segm")[1], abs=1e-12)
    assert at_point.loc["all", "ap50_segm"] > cocoeval_directly(records, above, "segm")[1] + 0.05
    only_above = evaluate(records, above, CLASSES).table
    columns = ["tp", "fp", "fn", "precision", "recall", "f1", "count_mae", "count_bias"]
    pd.testing.assert_frame_equal(at_point[columns], only_above[columns])


def test_ap_counts_every_detection_of_a_crowded_image():
    """150 lymphoblasts in one image: COCO's default maxDets (100 per image and class) would cut the
    lowest-scored third."""
    cells = [(10 + 20 * (k % 15), 10 + 20 * (k // 15), 7, 0) for k in range(150)]
    records = [record(cells, height=210, width=310)]
    rng = np.random.default_rng(1)
    preds = [prediction([(cx, cy, r, label, float(rng.uniform(0.1, 1))) for cx, cy, r, label in cells],
                        height=210, width=310)]
    ours = evaluate(records, preds, CLASSES).table.loc["all", "ap50_segm"]
    assert ours == pytest.approx(cocoeval_directly(records, preds, "segm", max_dets=(1, 10, 300))[1])
    assert ours == pytest.approx(1.0) and cocoeval_directly(records, preds, "segm")[1] < 0.8


def test_perfect_predictions_score_one_with_torch_detections():
    records, _ = noisy_case(seed=2)
    preds = []
    for rec in records:  # masks rasterised as COCO rasterises the ground truth, as a model's torch output
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], H, W)))
                 for a in rec["annotations"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in rec["annotations"])]
        preds.append(Detections(torch.tensor(boxes), torch.linspace(0.99, 0.5, len(boxes)),
                                torch.tensor([a["category_id"] for a in rec["annotations"]]),
                                torch.from_numpy(np.stack(masks)).bool()))
    result = evaluate(records, preds, CLASSES)
    assert result.iou_type == "segm"
    for row in ("all", "any_cell", *CLASSES):
        assert result.table.loc[row, ["precision", "recall", "f1", "accuracy"]].tolist() == [1.0] * 4
        assert result.table.loc[row, "count_mae"] == 0 and result.table.loc[row, "count_bias"] == 0
    for row in ("all", *CLASSES):
        assert result.table.loc[row, ["ap50_bbox", "ap50_segm"]].tolist() == pytest.approx([1.0, 1.0])
    assert result.summary()["count_accuracy"] == 1.0 and result.summary()["share_mae"] == 0.0


def test_seed_count_mae_on_69_images():
    """WBC paper: 69 test images, MAE 0.1159 lymphoblast (8 cells) and 0.1014 non-lymphoblast (7)."""
    records, preds = [], []
    extra_non_lymphoblasts = {0: 1, 1: 1, 2: 1, 3: 1, 12: -1, 13: 2}  # |errors| sum to 7
    for i in range(69):
        cells = ([(20 + 30 * k, 30, 10, 0) for k in range(i % 3 + 1)]
                 + [(20 + 30 * k, 80, 10, 1) for k in range(i % 4 + 1)])
        found = [(cx, cy, r, label, 0.9) for cx, cy, r, label in cells]
        if i < 8:  # one lymphoblast missed in each of 8 images
            found.pop(0)
        extra = extra_non_lymphoblasts.get(i, 0)
        found = found[:-1] if extra < 0 else found + [(20 + 30 * k, 140, 10, 1, 0.8) for k in range(extra)]
        records.append(record(cells, f"img{i}"))
        preds.append(prediction(found))
    table = evaluate(records, preds, CLASSES).table
    assert round(table.loc["lymphoblast", "count_mae"], 4) == 0.1159
    assert round(table.loc["non_lymphoblast", "count_mae"], 4) == 0.1014
    assert table.loc["lymphoblast", "count_bias"] == pytest.approx(-8 / 69)
    assert table.loc["non_lymphoblast", "count_bias"] == pytest.approx(5 / 69)
    assert table.loc["all", "count_mae"] == pytest.approx(15 / 69)  # cells miscounted per image
    # the total count: images 0-3 miss a lymphoblast and add a non-lymphoblast, so they are right
    assert table.loc["any_cell", "count_mae"] == pytest.approx((4 + 1 + 2) / 69)


def test_wrong_class_and_missed_cell_counted_by_hand():
    records = [record([(20, 20, 10, 0), (70, 50, 10, 1), (120, 90, 10, 1)])]
    preds = [prediction([(20, 20, 10, 1, 0.9), (70, 50, 10, 1, 0.8), (200, 150, 10, 0, 0.3)])]
    result = evaluate(records, preds, CLASSES)
    table = result.table
    assert table.loc["lymphoblast", ["tp", "fp", "fn"]].tolist() == [0, 1, 1]
    assert table.loc["non_lymphoblast", ["tp", "fp", "fn"]].tolist() == [1, 1, 1]
    assert table.loc["any_cell", ["tp", "fp", "fn"]].tolist() == [2, 1, 1]
    assert table.loc["all", "accuracy"] == pytest.approx(1 / 5)
    assert table.loc["all", ["precision", "recall", "f1"]].tolist() == pytest.approx([1 / 3] * 3)
    assert result.confusion.tolist() == [[0, 1, 0], [0, 1, 1], [1, 0, 0]]


def test_lymphoblast_share_and_count_accuracy_by_hand():
    lymph, other = 0, 1
    records = [record([(20, 20, 8, lymph), (50, 20, 8, other), (80, 20, 8, other), (110, 20, 8, other)], "a"),
               record([(20, 20, 8, other), (50, 20, 8, other)], "b"),
               record([], "c"),
               record([(20, 20, 8, lymph), (50, 20, 8, lymph)], "d")]
    preds = [prediction([(20, 20, 8, lymph, 0.9), (50, 20, 8, lymph, 0.9)]),  # share 1 vs 1/4, count 2 of 4
             prediction([(20, 20, 8, other, 0.9), (50, 20, 8, other, 0.9), (80, 80, 8, other, 0.9)]),  # 0 vs 0
             prediction([(20, 20, 8, lymph, 0.9)]),  # no true cell: no share, no count ratio
             prediction([])]  # nothing found: no predicted share, count 0 of 2
    result = evaluate(records, preds, CLASSES)
    summary = result.summary()
    assert summary["share_mae"] == pytest.approx((0.75 + 0) / 2)
    assert summary["share_bias"] == pytest.approx(0.75 / 2)
    assert summary["share_images_skipped"] == 2
    assert summary["count_accuracy"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    assert summary["count_accuracy_images_skipped"] == 1
    assert result.per_image["true_lymphoblast_share"].tolist()[:2] == [0.25, 0.0]


def test_rbc_count_accuracy_by_hand():
    """RBC paper: mean over images of min(segmented, true) / true, all size classes together."""
    rbc = ["large", "normal", "small", "undefined"]
    records = [record([(20 + 25 * k, 20, 8, k % 4) for k in range(5)], "a"),  # 5 cells, 4 found
               record([(20 + 25 * k, 20, 8, 1) for k in range(2)], "b"),  # 2 cells, 3 found: capped at 1
               record([], "c")]  # no cell: skipped
    preds = [prediction([(20 + 25 * k, 20, 8, 1, 0.9) for k in range(4)]),
             prediction([(20 + 25 * k, 20, 8, 1, 0.9) for k in range(3)]),
             prediction([(20, 20, 8, 2, 0.9)])]
    summary = evaluate(records, preds, rbc).summary()
    assert summary["count_accuracy"] == pytest.approx((4 / 5 + 1) / 2)
    assert summary["count_accuracy_images_skipped"] == 1
    assert "true_large_share" in evaluate(records, preds, rbc).per_image  # the first class by default
    assert resolve_share_class(None, ["cell"]) is None  # one class: no share to report


def test_share_class_is_configurable_and_checked():
    records = [record([(20, 20, 8, 0), (60, 20, 8, 1), (100, 20, 8, 1)], "a")]
    preds = [prediction([(20, 20, 8, 0, 0.9), (60, 20, 8, 1, 0.9)])]
    result = evaluate(records, preds, CLASSES, share_class=CLASSES[1])
    assert result.per_image[f"true_{CLASSES[1]}_share"].tolist() == [pytest.approx(2 / 3)]
    assert result.summary()["share_bias"] == pytest.approx(1 / 2 - 2 / 3)
    with pytest.raises(ValueError, match="share_class='platelet' is not a class"):
        evaluate(records, preds, CLASSES, share_class="platelet")


def test_count_only_points():
    """Points count as cells: true counts from them, a prediction holding a point matches it."""
    records = [record([], "p1", points=[(30, 30, 0), (90, 30, 1), (150, 30, 1)]),
               record([], "p2", points=[(30, 30, 0)])]
    preds = [prediction([(30, 30, 10, 0, 0.9), (90, 30, 10, 0, 0.8), (200, 100, 10, 1, 0.7)]), prediction([])]
    result = evaluate(records, preds, CLASSES)
    table = result.table
    assert result.per_image[["true_lymphoblast", "true_non_lymphoblast"]].values.tolist() == [[1, 2], [1, 0]]
    assert table.loc["lymphoblast", ["tp", "fp", "fn"]].tolist() == [1, 1, 1]
    assert table.loc["non_lymphoblast", ["tp", "fp", "fn"]].tolist() == [0, 1, 2]
    assert table.loc["any_cell", ["tp", "fp", "fn"]].tolist() == [2, 1, 2]
    assert table.loc["lymphoblast", "count_mae"] == pytest.approx((1 + 1) / 2)
    assert np.isnan(table.loc["all", "ap50_segm"])  # COCO AP cannot score points


def test_min_confidence_keeps_scores_above_it():
    records = [record([(20, 20, 10, 0)])]
    preds = [prediction([(20, 20, 10, 0, 0.9), (120, 90, 10, 0, 0.5)])]
    assert evaluate(records, preds, CLASSES, min_confidence=0.5).table.loc["all", "precision"] == 1.0
    assert evaluate(records, preds, CLASSES, min_confidence=0.4).table.loc["all", "precision"] == 0.5


def test_box_only_predictions_are_scored_by_box():
    records, preds = noisy_case(seed=3, n_images=2)
    boxes_only = [Detections(torch.from_numpy(p.boxes), torch.from_numpy(p.scores), torch.from_numpy(p.labels))
                  for p in preds]
    result = evaluate(records, boxes_only, CLASSES)
    assert result.iou_type == "bbox" and np.isnan(result.table.loc["all", "ap50_segm"])
    assert "ap50_segm" not in result.summary()
    assert result.table.loc["all", "ap50_bbox"] == evaluate(records, preds, CLASSES).table.loc["all", "ap50_bbox"]
    with pytest.raises(ValueError, match="needs masks on both sides"):
        evaluate(records, boxes_only, CLASSES, iou_type="segm")


def test_masks_not_at_the_image_size_are_refused():
    det = Detections(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.9]), torch.tensor([0]),
                     torch.zeros(1, H // 2, W // 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="img: prediction masks are 96x128 but the image is 192x256"):
        evaluate([record([(20, 20, 10, 0)])], [det], CLASSES)


def test_empty_split_gives_undefined_not_a_crash():
    result = evaluate([], [], CLASSES)
    assert result.table.loc["all", "tp"] == 0 and np.isnan(result.table.loc["all", "precision"])
    assert len(result.per_image) == 0 and np.isnan(result.summary()["count_accuracy"])


def test_named_metrics_read_the_summary():
    records, preds = noisy_case(seed=4, n_images=2)
    result = evaluate(records, preds, CLASSES)
    assert METRICS.get("f1")(result) == result.table.loc["all", "f1"]
    assert METRICS.get("ap50_segm")(result) == result.table.loc["all", "ap50_segm"]
    assert METRICS.get("count_mae").higher_is_better is False


def test_report_files(tmp_path):
    from leukodet.evaluation.report import format_table, save_report

    records, preds = noisy_case(seed=5, n_images=2)
    result = evaluate(records, preds, CLASSES)
    assert result.pr_curves["segm"].shape == (2, 101)
    assert "any_cell" in format_table(result)
    save_report(result, tmp_path, prefix="val_")
    for name in ("metrics.csv", "metrics.json", "counts_per_image.csv", "confusion.png", "pr_curves.png"):
        assert (tmp_path / f"val_{name}").stat().st_size > 0
    strict = json.loads((tmp_path / "val_metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert strict["table"]["any_cell"]["ap50_segm"] is None and strict["summary"]["f1"] == result.summary()["f1"]


def test_figures_per_source_are_each_acquisitions_own_and_the_pool_hides_the_hard_one():
    """Issue 27: three images of an easy acquisition, one of a hard one whose predictions are
    another case's (mostly wrong): by source, each row is ``evaluate`` on that source's images alone."""
    easy_records, easy_preds = noisy_case(seed=1, n_images=3)
    hard_records, _ = noisy_case(seed=2, n_images=1)
    _, hard_preds = noisy_case(seed=3, n_images=1)
    records = [{**r, "source": "scanner_a/via.json"} for r in easy_records] + \
        [{**r, "source": "scanner_b/via.json"} for r in hard_records]
    preds = easy_preds + hard_preds
    table = evaluate_by_source(records, preds, CLASSES, min_confidence=0.3).set_index("source")
    assert table.images.to_dict() == {"scanner_a/via.json": 3, "scanner_b/via.json": 1}
    for source, subset in (("scanner_a/via.json", slice(0, 3)), ("scanner_b/via.json", slice(3, 4))):
        alone = evaluate(records[subset], preds[subset], CLASSES, min_confidence=0.3).summary()
        assert table.loc[source, "f1"] == alone["f1"] and table.loc[source, "ap50_segm"] == alone["ap50_segm"]
    pooled = evaluate(records, preds, CLASSES, min_confidence=0.3).summary()["f1"]
    assert table.loc["scanner_b/via.json", "f1"] < 0.3 < table.loc["scanner_a/via.json", "f1"]
    assert table.loc["scanner_b/via.json", "f1"] < pooled - 0.2  # the pool hides it
    assert evaluate_by_source(easy_records, easy_preds, CLASSES).source.tolist() == [""]  # no source recorded
