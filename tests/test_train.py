"""The training loop: configs compose, a hard-killed run resumes on schedule, the default reaches its target."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from leukodet.engine.module import lr_factor
from conftest import REPO, compose

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "exp").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(exp):
    cfg = compose(f"+exp={exp}")
    assert cfg.model.name and cfg.preprocess.steps and cfg.train.max_steps > 0


def test_seed_arms_have_the_seed_values():
    segmented, raw = compose("+exp=segmented"), compose("+exp=raw")
    assert segmented.train.lr == raw.train.lr == 0.001
    assert (segmented.eval.min_confidence, raw.eval.min_confidence) == (0.85, 0.70)
    assert [s.name for s in segmented.preprocess.steps] == ["scale", "bilateral", "equalize", "green_threshold",
                                                            "mask_and"]
    assert "min_confidence" not in segmented.model  # the operating point lives in eval alone


def test_schedule_shapes():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0)
    assert lr_factor(75, 0, 100, "step") == pytest.approx(0.1)
    assert lr_factor(95, 0, 100, "step") == pytest.approx(0.01)
    with pytest.raises(ValueError, match="choose cosine, step or constant"):
        lr_factor(5, 0, 10, "linear")


def tiny_run_args(tmp_path, max_steps):
    return [sys.executable, str(REPO / "tools" / "train.py"), f"data.root={tmp_path / 'data'}",
            "data.generate.n_images=16", "+data.generate.width=256", "+data.generate.height=192",
            f"train.max_steps={max_steps}", "train.steps_per_epoch=4", "train.checkpoint_every_steps=2",
            "train.num_workers=0", "train.warmup_steps=2", "model.min_size=192", "model.max_size=256",
            "model.weights=none", f"train.run_dir={tmp_path / 'run'}", f"paths.output_dir={tmp_path / 'outputs'}"]


@pytest.mark.long
def test_hard_kill_then_resume_finishes_the_same_schedule(tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(tiny_run_args(tmp_path, 10), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= 4:
            break
        time.sleep(0.5)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= killed_at < 10

    done = subprocess.run(tiny_run_args(tmp_path, 10), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    # issue 28: output that is not a terminal gets progress lines, and no third-party notices
    assert re.search(r"step 10/10, loss \d+\.\d+, \d+\.\d+ steps/s", done.stdout)
    for notice in ("weights_only", "litlogger", "LeafSpec", "limit_val_batches", "Total estimated model params"):
        assert notice not in done.stdout + done.stderr
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 10
    # the learning rate continued the cosine schedule instead of restarting its warmup
    lrs = pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv").dropna(subset=["lr-SGD"])
    resumed = lrs[lrs.step > killed_at]
    for _, row in resumed.iterrows():
        assert row["lr-SGD"] == pytest.approx(0.01 * lr_factor(int(row.step), 2, 10, "cosine"), rel=1e-4)
    assert (tmp_path / "run" / "test_metrics.csv").is_file() and (tmp_path / "run" / "loss_curves.png").is_file()
    # issue 27: the run ends ready to use: its operating point chosen on val, the test split scored there
    chosen = json.loads((last.parent / "thresholds.json").read_text())
    assert chosen["split"] == "val" and (tmp_path / "run" / "sweep_val.csv").is_file()
    assert f"min confidence {chosen['min_confidence']:g}, NMS {chosen['nms']:g}" in done.stdout
    assert "chosen on val (best f1)" in done.stdout
    report = (tmp_path / "run" / "report.html").read_text()  # the run's page, with its gallery and curves
    assert "test_gallery/gallery.csv" in report and "loss_curves.png" in report
    # issue 14, finding 3: the killed attempt's rows survive the resume (Lightning's CSVLogger deleted
    # them), and every logged step appears once across the attempts
    metrics = pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert metrics.dropna(subset=["train/loss"]).step.tolist() == [3, 7]
    assert lrs.step.tolist() == sorted(set(lrs.step)) and lrs.step.min() < killed_at

    # evaluate the checkpoint: a sweep writes thresholds.json, a multirun re-filters the same cache
    evaluate = [sys.executable, str(REPO / "tools" / "evaluate.py"), f"ckpt={last}", f"paths.output_dir={tmp_path / 'ev'}",
                "split=val"]
    done = subprocess.run(evaluate + ["sweep=true", "eval.sweep_min_confidence=[0.1,0.5]", "eval.sweep_nms=[0.3]"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((last.parent / "thresholds.json").read_text())["min_confidence"] in (0.1, 0.5)
    assert len(list((last.parent / "cache").glob("raw_val_*.npz"))) == 2  # best.ckpt's (training's sweep), last.ckpt's
    done = subprocess.run(evaluate[:2] + ["-m", *evaluate[2:], "eval.min_confidence=0.1,0.5"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results saved to") == 2 and "cached raw predictions" not in done.stdout
    # scored in tiles at the trained scale: predicted anew (its own cache), at the trained cell size
    done = subprocess.run(evaluate + ["eval.tiling=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((last.parent / "cache").glob("raw_val_*.npz"))) == 3


@pytest.mark.long
def test_training_at_a_fixed_cell_size_validates_and_predicts_in_tiles(tmp_path):
    # issue 26, item 1: windows at one cell size; the run's generated smears hold ~27 px cells
    done = subprocess.run(tiny_run_args(tmp_path, 4) + ["train.cell_px=48", "train.choose_point=false"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"training at 48 px a cell in 192 px windows \(cells in the files: \S+ 2\d px\)", done.stdout)
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    scale = torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["trained_scale"]
    assert scale["fixed"] and scale["network_cell_px"] == 48 and scale["network_px"] == 192
    assert list(scale["source_cell_px"].values()) == [pytest.approx(scale["cell_px"])]  # one source
    assert "val/ap50_segm" in pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv").columns  # validated in tiles
    infer = subprocess.run([sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={best}",
                            f"input={tmp_path / 'data' / 'images'}", f"infer.out_dir={tmp_path / 'infer'}",
                            "infer.tiling=false", "infer.overlays=false"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert "predicts in tiles at that scale whatever infer.tiling says" in infer.stdout + infer.stderr
    tiling = json.loads((tmp_path / "infer" / "run.json").read_text())["tiling"]
    assert tiling["fixed"] and tiling["input_cell_px"] == scale["cell_px"]


@pytest.mark.slow
def test_default_short_schedule_reaches_ap50(tmp_path):
    """The README main job's schedule on the generated sample: validation segm AP50 >= 0.8."""
    from leukodet.engine.train import fit

    cfg = compose(f"data.root={tmp_path / 'data'}", f"paths.output_dir={tmp_path}")
    result = fit(cfg, tmp_path / "run")
    assert result.best_metric == "val/ap50_segm" and result.best_score >= 0.8


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    """Lightning's DDP strategy, gloo backend, 2 CPU processes: trains, validates on the gathered
    predictions of both ranks, and evaluates."""
    args = tiny_run_args(tmp_path, 4) + ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["global_step"] == 4
    metrics = pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert metrics["val/ap50_segm"].notna().any()


def test_best_checkpoint_mode_follows_the_metric_direction():
    from leukodet.engine.train import best_metric_mode

    assert best_metric_mode("val/ap50_segm") == "max" and best_metric_mode("val/f1") == "max"
    assert best_metric_mode("val/count_mae") == "min" and best_metric_mode("val/loss") == "min"
