"""Sweeps from cached raw predictions equal the detector's own filtering at each point; the cache's
limits are warned about; the best point is saved and read back."""

import logging

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from leukodet.evaluation.metrics import as_predictions, evaluate, to_rle_predictions
from leukodet.evaluation.sweep import (binding_warnings, load_raw, load_thresholds, plot_heatmap, save_raw,
                                      save_thresholds, sweep)
from leukodet.engine.predictor import predict_original
from leukodet.structures import (SAME_CELL_IOU, Detections, ImagePredictions, OperatingPoint, biased, refilter,
                                 to_original, unbias)
from leukodet.registry import RegistryError

H, W = 96, 128
CLASSES = ["lymphoblast", "non_lymphoblast"]
POINTS = [(0.05, 0.3, 300), (0.3, 0.5, 300), (0.5, 0.2, 300), (0.2, 0.5, 6)]  # min conf, NMS, cap


def box_masks(boxes: torch.Tensor) -> torch.Tensor:
    """Each detection's mask from its own box only, as a Mask R-CNN mask head's depends on its box only."""
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


class FakeDetector:
    """torchvision's RoIHeads.postprocess_detections (score > min confidence, per-class NMS, cap:
    the model's own final filter) on fixed random head outputs: clusters of proposals per cell."""

    def __init__(self, seed: int, cells: int = 6, proposals_per_cell: int = 8):
        rng = torch.Generator().manual_seed(seed)
        self.centres = torch.rand(cells, 2, generator=rng) * torch.tensor([W - 30, H - 30]) + 15
        centres = self.centres.repeat_interleave(proposals_per_cell, 0) + torch.randn(cells * proposals_per_cell, 2,
                                                                                     generator=rng) * 2
        size = 8 + torch.rand(len(centres), 1, generator=rng) * 4
        self.proposals = torch.cat([centres - size, centres + size], dim=1)
        self.logits = torch.randn(len(centres), len(CLASSES) + 1, generator=rng) * 2
        self.regression = torch.randn(len(centres), 4 * (len(CLASSES) + 1), generator=rng) * 0.2

    def __call__(self, min_confidence: float, nms: float, cap: int) -> Detections:
        heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, min_confidence, nms, cap)
        (boxes,), (scores,), (labels,) = heads.postprocess_detections(self.logits, self.regression,
                                                                      [self.proposals], [(H, W)])
        return Detections(boxes, scores, labels - 1, box_masks(boxes))  # torchvision's label 0 is background

    def record(self, name: str) -> dict:
        boxes = torch.cat([self.centres - 10, self.centres + 10], dim=1).tolist()
        return {"file_name": name, "image_id": 1, "height": H, "width": W,
                "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": 1, "category_id": k % 2, "iscrowd": 0,
                                 "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
                                for k, (x0, y0, x1, y1) in enumerate(boxes)]}


@pytest.fixture(scope="module")
def detectors():
    return [FakeDetector(seed) for seed in range(3)]


def test_refilter_equals_the_detectors_own_filter(detectors):
    records = [d.record(f"img{i}") for i, d in enumerate(detectors)]
    raw = [as_predictions(d(0.01, 1.0, 1000), H, W) for d in detectors]  # the cache: low floor, no NMS, high cap
    table, _ = sweep(records, raw, CLASSES, [0.05, 0.2, 0.3, 0.5], [0.2, 0.3, 0.5], cache_floor=0.01, cache_cap=1000)
    for min_confidence, nms, cap in POINTS:
        direct = [as_predictions(d(min_confidence, nms, cap), H, W) for d in detectors]
        again = [refilter(r, OperatingPoint(min_confidence, nms, cap)) for r in raw]
        assert any(len(a) < len(r) for a, r in zip(again, raw))  # the point filters something
        for d, a in zip(direct, again):
            assert np.array_equal(d.boxes, a.boxes) and np.array_equal(d.scores, a.scores)
            assert np.array_equal(d.labels, a.labels) and [r["counts"] for r in d.rles] == [r["counts"] for r in a.rles]
        if cap == 300:  # the sweep's own cap
            # an evaluation run: the detector down to the floor at this NMS, scored at this min confidence
            at_floor = [as_predictions(d(0.01, nms, cap), H, W) for d in detectors]
            summary = evaluate(records, at_floor, CLASSES, min_confidence=min_confidence).summary()
            row = table[(table.min_confidence == min_confidence) & (table.nms == nms)].iloc[0]
            assert all(row[k] == pytest.approx(v, nan_ok=True) for k, v in summary.items())
            # all but AP (scored over all scores) is what the point's own detections give
            point = evaluate(records, direct, CLASSES).summary()
            assert all(summary[k] == pytest.approx(v, nan_ok=True) for k, v in point.items() if not k.startswith("ap"))


def test_sweep_of_detections_table_best_point_and_thresholds_file(detectors, tmp_path):
    records = [d.record(f"img{i}") for i, d in enumerate(detectors)]
    raw = [d(0.01, 1.0, 1000) for d in detectors]  # Detections straight from a model, converted inside
    grid = ([0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.5, 0.7])
    table, best = sweep(records, raw, CLASSES, *grid, cache_floor=0.01)
    assert len(table) == 25 and {"precision", "recall", "f1", "ap50_segm", "count_mae"} <= set(table.columns)
    assert best["metric"] == "f1" and best["value"] == table.f1.max()
    assert table.f1.nunique() > 1  # the grid matters
    first = table[table.f1 == table.f1.max()].iloc[0]
    assert (best["min_confidence"], best["nms"]) == (first.min_confidence, first.nms)
    _, fewest = sweep(records, raw, CLASSES, *grid, metric="count_mae", cache_floor=0.01)
    assert fewest["value"] == table.count_mae.min()  # lower is better for an error

    path = save_thresholds(tmp_path / "thresholds.json", {**best, "split": "val"})
    assert load_thresholds(path) == {**best, "split": "val"} and load_thresholds(tmp_path / "none.json") is None
    assert plot_heatmap(table, "f1", tmp_path / "sweep_f1.png").stat().st_size > 0
    with pytest.raises(RegistryError, match="Did you mean 'ap50_segm'"):
        sweep(records, raw, CLASSES, *grid, metric="ap50_seg")


def test_cache_round_trip_sweeps_the_same(detectors, tmp_path):
    records = [d.record(f"img{i}") for i, d in enumerate(detectors)]
    raw = to_rle_predictions([d(0.01, 1.0, 1000) for d in detectors], records)
    cache = load_raw(save_raw(tmp_path / "raw.pkl", raw, floor=0.01, cap=1000))
    assert (cache["floor"], cache["cap"]) == (0.01, 1000)
    grid = ([0.2, 0.5], [0.3, 0.5])
    before, _ = sweep(records, raw, CLASSES, *grid, cache_floor=0.01)
    after, _ = sweep(records, cache["predictions"], CLASSES, *grid, cache_floor=cache["floor"], cache_cap=cache["cap"])
    assert before.equals(after)
    with pytest.raises(ValueError, match="3 images but 2 predictions"):
        to_rle_predictions(raw[:2], records)


def test_binding_floor_and_cap_are_warned(detectors, caplog):
    raw = [as_predictions(d(0.05, 1.0, 20), H, W) for d in detectors[:2]]
    cut = max(float(r.scores.min()) for r in raw)  # each image's cached scores stop at or below this
    with caplog.at_level(logging.WARNING):
        notes = binding_warnings([0.01, 0.5], cache_floor=0.05, cache_cap=20, raw=raw)
    assert len(notes) == 2 and "below the cache's score floor" in notes[0] and "2 image(s) reached" in notes[1]
    assert caplog.text.count("WARNING") == 2
    # a full cap is harmless when every requested min confidence is at or above each image's lowest cached score
    assert binding_warnings([cut, 0.99], cache_floor=0.05, cache_cap=20, raw=raw) == []
    assert binding_warnings([0.05], cache_floor=0.05, cache_cap=1000, raw=raw) == []


def test_class_bias_moves_the_class_boundary_and_the_sweep_finds_it():
    """Two cells of each class; the model ranks each class right but puts the boundary in the wrong
    place (a lymphoblast scores 0.45 as one and 0.55 as the other class): no threshold fixes that,
    a logit bias of 1 on the first class does, and the sweep finds it."""
    def cell(k: int) -> list[float]:
        return [10 + 30 * k, 10, 30 + 30 * k, 30]

    records = [{"file_name": "a.png", "image_id": 1, "height": H, "width": W,
                "annotations": [{"bbox": [10 + 30 * k, 10, 20, 20], "bbox_mode": 1, "category_id": int(k >= 2),
                                 "iscrowd": 0} for k in range(4)]}]
    boxes = np.array([cell(k) for k in range(4) for _ in range(2)], np.float32)
    labels = np.array([0, 1] * 4)
    scores = np.array([0.45, 0.55, 0.45, 0.55, 0.1, 0.9, 0.1, 0.9], np.float32)
    raw = [ImagePredictions(boxes, scores, labels, None)]
    table, best = sweep(records, raw, CLASSES, [0.5, 0.6], [0.5], class_biases=[0.0, 1.0], iou_type="bbox")
    assert table.class_bias.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert table.f1[table.class_bias == 0].max() < 0.7  # without the bias every lymphoblast is missed or called wrong
    # a biased point suppresses across classes (one class a cell): the bias lifts each hesitant cell's
    # lymphoblast box over the min confidence beside its other-class box, so F1 1 at 0.5 already
    assert best == {"min_confidence": 0.5, "nms": 0.5, "class_bias": [1.0, 0.0], "cross_class_nms": SAME_CELL_IOU,
                    "metric": "f1", "value": 1.0}
    assert table.cross_class_nms.isna().tolist() == [True, True, False, False]
    within_classes, _ = sweep(records, raw, CLASSES, [0.5], [0.5], class_biases=[1.0], iou_type="bbox",
                              cross_class_nms=1.0)  # a cross-class NMS of the run's own is kept
    assert within_classes.cross_class_nms.tolist() == [1.0] and within_classes.precision[0] < 1.0
    kept = refilter(raw[0], OperatingPoint(0.6, 0.5, class_bias=(1.0, 0.0), cross_class_nms=SAME_CELL_IOU))
    assert sorted(kept.labels.tolist()) == [0, 0, 1, 1]
    assert kept.scores[kept.labels == 0] == pytest.approx([1 / (1 + np.exp(-(np.log(0.45 / 0.55) + 1)))] * 2)
    # the bias class is the second one here: its biased sweep cannot reach F1 1
    _, other = sweep(records, raw, CLASSES, [0.5, 0.6], [0.5], class_biases=[0.0, 1.0], iou_type="bbox", bias_class=1)
    assert other["value"] < 1.0 and len(other["class_bias"]) == 2


def test_a_biased_point_suppresses_across_classes_unless_it_sets_its_own():
    assert OperatingPoint(0.5, 0.5).with_bias_suppression().cross_class_nms is None  # the detectors' own NMS
    assert OperatingPoint(0.5, 0.5, class_bias=(0.0, 0.0)).with_bias_suppression().cross_class_nms is None
    assert OperatingPoint(0.5, 0.5, class_bias=(-2.0, 0.0)).with_bias_suppression().cross_class_nms == SAME_CELL_IOU
    own = OperatingPoint(0.5, 0.5, class_bias=(2.0, 0.0), cross_class_nms=0.7)
    assert own.with_bias_suppression() == own


def test_biased_scores_keep_each_class_ranking_and_the_detector_cut_loses_nothing(detectors):
    raw = to_rle_predictions([detectors[0](0.01, 1.0, 1000)], [detectors[0].record("a")])[0]
    bias = (2.0, -1.5)
    moved = biased(raw, bias)
    for k in range(2):
        own = raw.labels == k
        assert np.array_equal(np.argsort(raw.scores[own], kind="stable"), np.argsort(moved.scores[own], kind="stable"))
        assert (np.sign(moved.scores[own] - raw.scores[own]) == np.sign(bias[k])).all()
    assert unbias(float(moved.scores[0]), bias[int(raw.labels[0])]) == pytest.approx(float(raw.scores[0]), abs=1e-5)

    class Adapter:  # a model that cuts its own output (as every adapter's predict does)
        def predict(self, batch, prefilter):
            return [d(prefilter.min_confidence, prefilter.nms, prefilter.max_detections) for d in detectors]

    batch = [{"scale": (1.0, 1.0), "orig_width": W, "orig_height": H}] * len(detectors)
    for point in (OperatingPoint(0.5, 0.3, 300, class_bias=bias), OperatingPoint(0.3, 0.5, 4, class_bias=(-1.0, 0.0))):
        assert point.detector_cut().min_confidence < point.min_confidence and not any(point.detector_cut().class_bias)
        direct = predict_original(Adapter(), batch, point)
        for got, detector in zip(direct, detectors):
            want = refilter(to_original(detector(0.01, 1.0, 1000), (1.0, 1.0), (W, H)), point)
            assert len(want) > 0 and np.array_equal(got.labels, want.labels)
            assert np.allclose(got.scores, want.scores) and np.allclose(got.boxes, want.boxes, atol=1e-4)
    unbiased = OperatingPoint(0.5, 0.3)
    assert unbiased.detector_cut() is unbiased


def test_nms_across_classes_keeps_one_class_per_cell():
    # every cell boxed twice, once per class (per-class NMS keeps both: the cell would count twice)
    boxes = np.array([[10 + 30 * k, 10, 30 + 30 * k, 30] for k in range(3) for _ in range(2)], np.float32)
    boxes[1] += 2  # the second box of the first cell a little off (IoU 0.67 with the first)
    raw = ImagePredictions(boxes, np.array([0.6, 0.7, 0.9, 0.8, 0.55, 0.95], np.float32), np.array([0, 1] * 3), None)
    assert len(refilter(raw, OperatingPoint(0.5, 0.5))) == 6
    kept = refilter(raw, OperatingPoint(0.5, 0.5, cross_class_nms=0.5))
    assert kept.labels.tolist() == [1, 0, 1] and kept.scores.tolist() == pytest.approx([0.95, 0.9, 0.7])
    assert len(refilter(raw, OperatingPoint(0.5, 0.5, cross_class_nms=0.7))) == 4  # the shifted pair (IoU 0.67) stays apart
    # the bias moves which class wins a cell; the detector itself suppresses within classes only
    biased_point = OperatingPoint(0.5, 0.5, class_bias=(3.0, 0.0), cross_class_nms=0.5)
    assert refilter(raw, biased_point).labels.tolist() == [0, 0, 0]
    point = OperatingPoint(0.5, 0.5, cross_class_nms=0.5)
    assert point.detector_cut().cross_class_nms is None and biased_point.detector_cut().cross_class_nms is None
    assert "across classes 0.5" in point.describe()
