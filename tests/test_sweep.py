"""Sweeps from cached raw predictions equal model runs at each point; the cache's limits are warned."""

import numpy as np

from leukodet.evaluation.metrics import evaluate
from leukodet.evaluation.predictions import ImagePredictions, encode_masks, to_original
from leukodet.evaluation.sweep import (binding_warnings, load_thresholds, refilter, save_thresholds, sweep)
from tests.test_models import briefly_trained, tiny_batch


def as_original(adapter, batch):
    return [to_original(det, (1.0, 1.0), (s["image"].shape[2], s["image"].shape[1]))
            for det, s in zip(adapter.predict(batch), batch)]


def records_of(batch):
    out = []
    for i, sample in enumerate(batch):
        inst = sample["instances"]
        out.append({"file_name": f"img{i}", "image_id": i + 1, "height": sample["image"].shape[1],
                    "width": sample["image"].shape[2],
                    "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": 1, "category_id": int(label),
                                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "iscrowd": 0}
                                    for (x0, y0, x1, y1), label in zip(inst["boxes"].tolist(), inst["labels"])]})
    return out


def test_refiltered_cache_equals_model_run_at_each_point():
    adapter = briefly_trained(seed=2)
    batch = tiny_batch()
    with adapter.raw_predictions(floor=0.01, cap=1000):
        raw = as_original(adapter, batch)
    records = records_of(batch)
    for min_confidence, nms in ((0.02, 0.3), (0.05, 0.5), (0.1, 0.7)):
        adapter.set_thresholds(min_confidence, nms, 300)
        direct = as_original(adapter, batch)
        again = [refilter(r, min_confidence, nms, 300) for r in raw]
        for d, a in zip(direct, again):
            assert np.array_equal(d.labels, a.labels) and np.allclose(d.boxes, a.boxes)
            assert [r["counts"] for r in d.rles] == [r["counts"] for r in a.rles]
        m1 = evaluate(records, direct, ["a", "b"], min_confidence=min_confidence).summary()
        m2 = evaluate(records, again, ["a", "b"], min_confidence=min_confidence).summary()
        assert m1 == m2 or all(np.isclose(m1[k], m2[k], equal_nan=True) for k in m1)


def fake_raw(n, score_start=0.99):
    masks = np.zeros((n, 40, 40), np.uint8)
    boxes = np.array([[i % 30, 0, i % 30 + 10, 10] for i in range(n)], np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0:y1, x0:x1] = 1
    return ImagePredictions(boxes, np.linspace(score_start, 0.06, n).astype(np.float32), np.zeros(n, np.int64),
                            encode_masks(masks))


def test_sweep_table_best_point_and_thresholds_file(tmp_path):
    record = {"file_name": "x", "image_id": 1, "height": 40, "width": 40,
              "annotations": [{"bbox": [0, 0, 10, 10], "bbox_mode": 1, "category_id": 0,
                               "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "iscrowd": 0}]}
    table, best = sweep([record], [fake_raw(20)], ["cell"], [0.5, 0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.5, 0.7])
    assert len(table) == 25 and {"precision", "recall", "f1", "ap50_segm"} <= set(table.columns)
    assert best["metric"] == "f1" and best["value"] == table.f1.max()
    path = save_thresholds(tmp_path / "thresholds.json", best)
    assert load_thresholds(path) == best and load_thresholds(tmp_path / "none.json") is None


def test_binding_floor_and_cap_are_warned(caplog):
    notes = binding_warnings([0.01, 0.5], floor=0.05, cap=20, raw=[fake_raw(20), fake_raw(5)])
    assert len(notes) == 2 and "below the cache's score floor" in notes[0] and "1 image(s) reached" in notes[1]
    assert binding_warnings([0.5], floor=0.05, cap=1000, raw=[fake_raw(20)]) == []
