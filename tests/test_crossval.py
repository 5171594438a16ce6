"""Cross-validation (issue 16): fold splits (grouped, stratified, leave one source out, no leakage),
the tool's per-fold run with resume, and the rule that operating points are chosen on val."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from conftest import REPO, compose

from leukodet.data.prepare import fold_split, split_records
from leukodet.engine.crossval import calibration_draws, val_chosen_point
from leukodet.data.records import ImageRecord, Region
from leukodet.structures import SAME_CELL_IOU, ImagePredictions, OperatingPoint

K = 3
PATIENT = re.compile(r"patient(\d+)")


def record(name: str, group: str, labels: list[str], source: str = "a.json") -> ImageRecord:
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    rec = ImageRecord(name, [Region(label, "polygon", square) for label in labels], 8, 8, source)
    rec.group = group
    return rec


def test_group_folds_partition_the_groups_and_keep_the_class_mix():
    # 10 patients with only class A, 5 with only B, 3 images each: 5 folds of 2 A- and 1 B-patient
    records = [record(f"p{p}_{i}", f"p{p}", ["A"] if p < 10 else ["B"]) for p in range(15) for i in range(3)]
    held_out = [fold_split(records, 5, index, "group", seed=0) for index in range(5)]
    for test, rest in held_out:
        assert len(test) + len(rest) == len(records)
        assert not {r.group for r in test} & {r.group for r in rest}  # no patient on both sides
        assert Counter(r.regions[0].label for r in test) == {"A": 6, "B": 3}
    names = [r.file_name for test, _ in held_out for r in test]
    assert sorted(names) == sorted(r.file_name for r in records)  # every image held out exactly once
    assert [r.file_name for r in fold_split(records, 5, 2, seed=0)[0]] == [r.file_name for r in held_out[2][0]]
    assert [r.file_name for r in fold_split(records, 5, 2, seed=1)[0]] != [r.file_name for r in held_out[2][0]]
    with pytest.raises(ValueError, match="number of groups"):
        fold_split(records, 16, 0)


def test_leave_one_source_out_and_validation_per_source():
    records = [record(f"{s}_{i}", f"{s}_{i}", ["A" if i % 2 else "B"], f"{s}.json") for s in "xy" for i in range(20)]
    test, rest = fold_split(records, None, 1, "source")
    assert {r.source for r in test} == {"y.json"} and {r.source for r in rest} == {"x.json"}
    with pytest.raises(ValueError, match="2 sources"):
        fold_split(records, 3, 0, "source")
    # y's images all sort after x's: drawn by class alone, val could miss an acquisition; per source it cannot
    parts = split_records(records, {"train": 0.8, "val": 0.2}, seed=0, per_source=True)
    assert Counter(r.source for r in parts["val"]) == {"x.json": 4, "y.json": 4}


def crossval_command(tmp: Path) -> list[str]:
    """tools/crossval.py on 24 generated 256x192 smears (6 patients), 3 folds of 2 training steps."""
    return [sys.executable, str(REPO / "tools" / "crossval.py"), f"data.root={tmp / 'data'}",
            "data.generate.n_images=24", "+data.generate.width=256", "+data.generate.height=192", f"crossval.k={K}",
            "train.max_steps=2", "train.steps_per_epoch=2", "train.warmup_steps=1", "train.num_workers=0",
            "model.min_size=192", "model.max_size=256", "eval.sweep_min_confidence=[0.05,0.3]", "eval.sweep_nms=[0.5]",
            f"paths.output_dir={tmp / 'out'}"]


@pytest.fixture(scope="module")
def crossval_run(tmp_path_factory):
    """``crossval_command``: fold 0 alone first, then every fold (as two processes sharing a folder would)."""
    tmp = tmp_path_factory.mktemp("crossval")
    runs = []
    for folds in (["crossval.folds=[0]"], []):
        done = subprocess.run(crossval_command(tmp) + folds, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout + done.stderr)
    (out,) = (tmp / "out" / "crossval").iterdir()  # both commands chose the same folder
    chosen_on = [json.loads((out / f"fold{i}" / "checkpoints" / "thresholds.json").read_text())["split"]
                 for i in range(K)]
    return out, runs, chosen_on


def prepared_patients(fold_dir: Path, split: str) -> list[str]:
    images = json.loads((fold_dir / "prepared" / f"{split}.json").read_text())["images"]
    return [PATIENT.search(Path(image["file_name"]).name).group(1) for image in images]


@pytest.mark.long
def test_crossval_folds_do_not_leak_and_resume(crossval_run):
    out, (first, second), chosen_on = crossval_run
    assert chosen_on == ["val"] * K
    tests = []
    for index in range(K):
        fold = out / f"fold{index}"
        test = prepared_patients(fold, "test")
        seen = set(prepared_patients(fold, "train")) | set(prepared_patients(fold, "val"))
        assert test and not set(test) & seen  # no patient both trained (or validated) on and held out
        tests.append(test)
    assert sorted(p for test in tests for p in test) == sorted(f"{p:02d}" for p in range(6) for _ in range(4))
    assert "fold 0 of 3" in first and "fold 1 of 3" not in first
    assert "fold 0: finished earlier" in second and "fold 1: finished earlier" not in second

    table = pd.read_csv(out / "folds.csv")
    assert table.fold.tolist() == [0, 1, 2] and (table.test_images == 8).all() and (table.max_steps == 2).all()
    for column in ("ap50_segm", "f1", "best_f1", "share_mae", "count_mae_lymphoblast", "count_mae_non_lymphoblast"):
        assert table[column].notna().all(), column
    summary = pd.read_csv(out / "crossval_summary.csv").set_index("metric")
    assert summary.loc["f1", "mean"] == pytest.approx(table.f1.mean())
    assert summary.loc["f1", "sd"] == pytest.approx(table.f1.std(ddof=1)) and summary.loc["f1", "folds"] == 3
    assert (out / "folds.png").stat().st_size > 0
    # issue 27: figures per source (one annotation file here: each fold's row equals its pooled one)
    by_source = pd.read_csv(out / "folds_by_source.csv")
    assert by_source.fold.tolist() == [0, 1, 2] and by_source.source.nunique() == 1
    assert by_source.source.iloc[0].endswith(".json") and (by_source.test_images == 8).all()
    assert by_source.f1.tolist() == pytest.approx(table.f1.tolist())
    assert by_source.ap50_segm.tolist() == pytest.approx(table.ap50_segm.tolist())
    per_source = pd.read_csv(out / "crossval_summary_by_source.csv").set_index("metric")
    assert per_source.loc["f1", "mean"] == pytest.approx(table.f1.mean()) and "per source" in second
    row = json.loads((out / "fold0" / "fold_result.json").read_text())
    assert row["class_bias"] == [0.0, 0.0] and row["cross_class_nms"] is None  # the point chosen on val, whole


def test_a_folds_val_chosen_point_keeps_its_class_bias_and_reads_rows_written_before_it():
    fold_cfg = OmegaConf.create({"eval": {"max_detections": 100, "cross_class_nms": None}})
    row = {"min_confidence": 0.7, "nms": 0.3, "class_bias": [2.0, 0.0], "cross_class_nms": SAME_CELL_IOU}
    point = val_chosen_point(fold_cfg, row)
    assert (point.min_confidence, point.nms, point.max_detections) == (0.7, 0.3, 100)
    assert point.class_bias == (2.0, 0.0) and point.cross_class_nms == SAME_CELL_IOU
    older = val_chosen_point(fold_cfg, {"min_confidence": 0.7, "nms": 0.3})
    assert older.class_bias == () and older.cross_class_nms is None


@pytest.mark.long
def test_sweep_chooses_on_val_by_default_and_warns_on_test(crossval_run, tmp_path, caplog):
    from leukodet.engine.evaluate import evaluate_checkpoint

    out, _, _ = crossval_run
    checkpoint = out / "fold1" / "checkpoints" / "best.ckpt"  # its val and test predictions are cached
    grid = ["sweep=true", "eval.sweep_min_confidence=[0.05]", "eval.sweep_nms=[0.5]"]
    with caplog.at_level(logging.WARNING, logger="leukodet.engine.evaluate"):
        evaluate_checkpoint(compose(f"ckpt={checkpoint}", *grid, config_name="checkpoint"), tmp_path)
        assert json.loads((checkpoint.parent / "thresholds.json").read_text())["split"] == "val"
        assert (tmp_path / "sweep_val.csv").is_file() and "choosing the operating point" not in caplog.text
        evaluate_checkpoint(compose(f"ckpt={checkpoint}", "split=test", *grid, config_name="checkpoint"), tmp_path)
    assert json.loads((checkpoint.parent / "thresholds.json").read_text())["split"] == "test"
    assert "choosing the operating point on the 'test' split" in caplog.text


@pytest.mark.long
def test_recalibration_on_held_out_images_reuses_the_folds_and_scores_the_rest(crossval_run):
    out, _, _ = crossval_run
    finished = {i: (out / f"fold{i}" / "fold_result.json").stat().st_mtime_ns for i in range(K)}
    command = crossval_command(out.parents[2]) + ["crossval.folds=[]", "crossval.calibration.draws=2"]
    done = subprocess.run(command + ["crossval.calibration.images=3"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recalibrated on 3 held-out images" in done.stdout + done.stderr
    assert {i: (out / f"fold{i}" / "fold_result.json").stat().st_mtime_ns for i in range(K)} == finished  # not redone
    table = pd.read_csv(out / "folds_calibrated3.csv")
    assert table.fold.tolist() == [0, 1, 2] and (table.scored_images == 5).all() and (table.draws == 2).all()
    for column in ("calibrated_f1", "val_point_f1", "calibrated_share_mae", "val_point_ap50_segm"):
        assert table[column].notna().all(), column
    summary = pd.read_csv(out / "crossval_summary_calibrated3.csv").set_index("metric")
    assert summary.loc["calibrated_f1", "mean"] == pytest.approx(table.calibrated_f1.mean())
    for index in range(K):
        draws = pd.read_csv(out / f"fold{index}" / "calibrated3.csv")
        chosen = [[int(i) for i in indices.split()] for indices in draws.test_indices]
        assert len(draws) == 2 and all(len(set(c)) == 3 and max(c) < 8 for c in chosen)
        assert draws.class_bias.isin(range(-6, 7)).all()
        # a biased point suppresses across classes (one class a cell), an unbiased one keeps per-class NMS
        assert (draws.cross_class_nms.notna() == (draws.class_bias != 0)).all()
        assert set(draws.cross_class_nms.dropna()) <= {SAME_CELL_IOU}
    assert "cross_class_nms" not in table  # a point's setting, not a mean over draws
    assert pd.read_csv(out / "folds.csv").fold.tolist() == [0, 1, 2]  # the uncalibrated results stay

    # fine-tuned on the same draw's labelled images too: its own files, beside the re-cut ones
    done = subprocess.run(command[:-1] + ["crossval.calibration.draws=1", "crossval.calibration.images=3",
                                          "crossval.calibration.fine_tune.steps=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    tuned = pd.read_csv(out / "folds_calibrated3_fine_tuned2.csv")
    assert tuned.fold.tolist() == [0, 1, 2] and (tuned.draws == 1).all()
    counts = [c for c in tuned if c.startswith("fine_tuned_count_mae_")]
    for column in ("fine_tuned_f1", "fine_tuned_detection_f1", "calibrated_f1", *counts):
        assert tuned[column].notna().all(), column
    assert len(counts) == len([c for c in tuned if c.startswith("calibrated_count_mae_")]) > 0  # one a class
    for index in range(K):
        draw = pd.read_csv(out / f"fold{index}" / "calibrated3_fine_tuned2.csv")
        first_draw = pd.read_csv(out / f"fold{index}" / "calibrated3.csv").iloc[0]
        assert draw.test_indices.tolist() == [first_draw.test_indices]  # the same labelled images
        assert draw.calibrated_f1.iloc[0] == pytest.approx(first_draw.calibrated_f1)
        assert OmegaConf.load(out / f"fold{index}" / "calibrated3_fine_tuned2" / "draw0" / "config.yaml").train.max_steps == 2
    assert len(pd.read_csv(out / "folds_calibrated3.csv")) == K  # the re-cut figures stay


def test_calibration_draws_are_fixed_by_seed_and_leave_images_to_score():
    records = [{"file_name": f"{i}.png"} for i in range(8)]
    draws = calibration_draws(records, 3, 4, seed=0, fold=1)
    assert [d.tolist() for d in draws] == [d.tolist() for d in calibration_draws(records, 3, 4, seed=0, fold=1)]
    assert len({tuple(d) for d in draws}) > 1 and all(len(set(d)) == 3 and d.max() < 8 for d in draws)
    assert [d.tolist() for d in calibration_draws(records, 3, 4, seed=0, fold=2)] != [d.tolist() for d in draws]
    for n in (0, 8):
        with pytest.raises(ValueError, match=f"crossval.calibration.images={n}: give 1..7"):
            calibration_draws(records, n, 1, seed=0, fold=1)


def test_a_fold_is_fine_tuned_on_its_draw_and_scored_on_the_other_images_only(tmp_path, monkeypatch):
    from leukodet.engine import crossval

    records = [{"file_name": f"{i}.png", "annotations": []} for i in range(8)]
    chosen, seen = np.array([1, 4, 6]), {}
    monkeypatch.setattr(crossval, "labelled_fine_tuning", lambda trained, module, labelled, settings, out: seen.update(
        tuned_on=labelled, tuned_from=module) or "tuned model")
    monkeypatch.setattr(crossval, "predict_split", lambda cfg, module, records, point, desc: seen.update(
        predicted=records, by=module) or [f"raw {r['file_name']}" for r in records])
    monkeypatch.setattr(crossval, "scored_on_rest", lambda cfg, records, raw, classes, points: seen.update(
        scored=records, raw=raw, points=points) or {"fine_tuned_f1": 1.0})
    val_point = OperatingPoint(0.7, 0.3, 100)
    settings = OmegaConf.create({"fine_tune": {"steps": 2, "lr_factor": 0.1, "labelled_share": 0.5,
                                               "class_bias": "none"}})
    figures = crossval.fine_tune_on_draw(None, "trained model", records, chosen, ["a"], val_point, settings,
                                         tmp_path / "tuned")

    assert figures == {"fine_tuned_f1": 1.0} and seen["tuned_from"] == "trained model" and seen["by"] == "tuned model"
    assert [r["file_name"] for r in seen["tuned_on"]] == ["1.png", "4.png", "6.png"]
    rest = ["0.png", "2.png", "3.png", "5.png", "7.png"]  # no labelled image is scored
    assert [r["file_name"] for r in seen["predicted"]] == [r["file_name"] for r in seen["scored"]] == rest
    assert seen["raw"] == [f"raw {name}" for name in rest] and seen["points"] == {"fine_tuned": val_point}


def one_cell(margin: float) -> ImagePredictions:
    """An image with one cell whose lymphocyte-minus-other class margin is ``margin`` logits (a box
    of each class on it, the other class scored 0.6)."""
    other = 0.6
    lymphocyte = 1 / (1 + np.exp(-(np.log(other / (1 - other)) + margin)))
    return ImagePredictions(np.array([[10, 10, 40, 40]] * 2, np.float32), np.array([lymphocyte, other], np.float32),
                            np.array([0, 1]), None)


def test_a_fine_tuned_fold_is_also_scored_with_its_boundary_moved_to_the_other_held_out_images(tmp_path,
                                                                                                monkeypatch):
    """crossval.calibration.fine_tune.class_bias=otsu: the tuned model's margins on the other held-out
    images (unlabelled) against its val split's move the boundary, as adapt.class_bias=otsu does."""
    from leukodet.engine import crossval

    records = [{"file_name": f"{i}.png", "annotations": []} for i in range(15)]
    val = [{"file_name": f"val{i}.png", "annotations": []} for i in range(12)]
    # val: two groups of cells at -3 and +3 (valley 0); the other held-out images at -7 and -1 (valley -4)
    margins = {**{f"val{i}.png": 3.0 if i % 2 else -3.0 for i in range(12)},
               **{f"{i}.png": -1.0 if i % 2 else -7.0 for i in range(15)}}
    predicted, seen = [], {}
    monkeypatch.setattr(crossval, "labelled_fine_tuning", lambda *args: "tuned model")
    monkeypatch.setattr(crossval, "get_dataset_dicts", lambda name: val if name == "wbc_fold1_val" else [])
    monkeypatch.setattr(crossval, "predict_split", lambda cfg, module, records, point, desc: predicted.append(
        (module, [r["file_name"] for r in records])) or [one_cell(margins[r["file_name"]]) for r in records])
    monkeypatch.setattr(crossval, "scored_on_rest", lambda cfg, records, raw, classes, points: seen.update(
        points=points) or {f"{name}_f1": 1.0 for name in points})
    fold_cfg = OmegaConf.create({"data": {"name": "wbc_fold1"}, "eval": {"share_class": "lymphocyte"}})
    settings = OmegaConf.create({"fine_tune": {"steps": 2, "lr_factor": 0.1, "labelled_share": 0.5,
                                               "class_bias": "otsu"}})
    val_point = OperatingPoint(0.7, 0.3, 100, class_bias=(0.5, 0.0))
    figures = crossval.fine_tune_on_draw(fold_cfg, "trained model", records, np.array([0, 1, 2]),
                                         ["lymphocyte", "other_wbc"], val_point, settings, tmp_path / "tuned")

    rest = [f"{i}.png" for i in range(3, 15)]  # the labelled three are neither scored nor measured
    assert predicted == [("tuned model", rest), ("tuned model", [r["file_name"] for r in val])]
    assert figures["fine_tuned_moved_shift"] == pytest.approx(4.0, abs=1e-4)  # the valley moved -4, the boundary +4
    assert seen["points"]["fine_tuned"] == val_point
    moved = seen["points"]["fine_tuned_moved"]
    assert moved.class_bias == pytest.approx((4.5, 0.0)) and moved.cross_class_nms == SAME_CELL_IOU
    assert (moved.min_confidence, moved.nms) == (0.7, 0.3)
    # the suppression across classes alone, the boundary where it was: what the move adds is told apart
    one_class = seen["points"]["fine_tuned_one_class"]
    assert one_class.class_bias == val_point.class_bias and one_class.cross_class_nms == SAME_CELL_IOU
    assert figures["fine_tuned_f1"] == figures["fine_tuned_moved_f1"] == figures["fine_tuned_one_class_f1"] == 1.0


@pytest.mark.long
def test_a_new_scanners_labelled_images_choose_the_point_and_bias(crossval_run, tmp_path):
    """README, Operating point: a sweep on another labelled dataset (data_from=command) writes the
    bias into thresholds.json; data with other classes is refused by name."""
    from leukodet.engine.evaluate import CheckpointError, evaluate_checkpoint

    out, _, _ = crossval_run
    checkpoint = out / "fold2" / "checkpoints" / "best.ckpt"
    scanner = [f"ckpt={checkpoint}", "data_from=command", "data.name=scanner2", f"data.root={tmp_path / 'scanner2'}",
               "data.generate.n_images=8", "data.generate.seed=7", "+data.generate.width=256",
               "+data.generate.height=192", f"paths.output_dir={tmp_path / 'out'}"]
    grid = ["sweep=true", "split=train", "eval.sweep_min_confidence=[0.05,0.3]", "eval.sweep_nms=[0.5]",
            "eval.sweep_class_bias=[0,-3,3]"]
    table, best = evaluate_checkpoint(compose(*scanner, *grid, config_name="checkpoint"), tmp_path)
    assert sorted(set(table.class_bias)) == [-3.0, 0.0, 3.0] and len(table) == 6
    saved = json.loads((checkpoint.parent / "thresholds.json").read_text())
    assert saved["split"] == "train" and len(saved["class_bias"]) == 2 and saved["class_bias"][1] == 0.0
    assert (tmp_path / "scanner2" / "prepared" / "train.json").is_file()  # the new data, not the fold's
    with pytest.raises(CheckpointError, match=r"trained on classes \['lymphoblast', 'non_lymphoblast'\]"):
        evaluate_checkpoint(compose(f"ckpt={checkpoint}", "data_from=command", "data=sample_rbc",
                                    f"data.root={tmp_path / 'rbc'}", "data.generate.n_images=4",
                                    f"paths.output_dir={tmp_path / 'out'}", "split=train", config_name="checkpoint"),
                            tmp_path)
