"""Issue 14: never mix results, never change a run silently, load only data, survive kill -9.

Each numbered finding of the issue has a test here or in test_infer.py / test_train.py that fails on
the code before the fix. The fault-injection tests kill tools with SIGKILL at seeded random points
and check that a rerun leaves whole files (and, for inference, the same bytes as a run never killed).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from leukodet.cli import one_line
from leukodet.engine.evaluate import CheckpointError, load_detector
from leukodet.engine.train import KeepingCsvWriter, config_differences
from leukodet.evaluation.sweep import load_raw
from leukodet.io import atomic_write_text
from conftest import REPO, compose

RESULTS = ("counts.csv", "detections.csv", "results_coco.json", "folders.csv", "via_project.json", "errors.csv")


def train_args(tmp: Path, max_steps: int, *extra: str, data: Path | None = None) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "train.py"), f"data.root={data or tmp / 'data'}",
            "data.generate.n_images=12",
            "+data.generate.width=192", "+data.generate.height=160", "data.prepare.group_regex=null",
            f"train.max_steps={max_steps}", "train.steps_per_epoch=2", "train.checkpoint_every_steps=2",
            "train.num_workers=0", "train.warmup_steps=1", "model.min_size=160", "model.max_size=192",
            "model.weights=none", f"train.run_dir={tmp / 'run'}", f"paths.output_dir={tmp / 'outputs'}", *extra]


def tool(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory trained 2 steps (last.ckpt, config.yaml, logs/metrics.csv) on generated data."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    done = tool(train_args(tmp, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- finding 2: a rerun with changed settings silently continued the old run ---------------------------

def test_resuming_with_another_config_is_refused_naming_the_keys(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path) / "run"
    before = files_of(run)
    done = tool(train_args(tmp_path, 4, "preprocess=segmented", "train.lr=0.02", data=tiny_run / "data"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: {run / 'config.yaml'}: this run was trained with other settings")
    assert "(preprocess.steps, train.lr differ)" in done.stderr and "train.resume=false" in done.stderr
    assert "Traceback" not in done.stderr and files_of(run) == before  # config.yaml, log, checkpoints untouched


def test_keys_that_may_change_on_resume_are_ignored():
    saved = compose("train.max_steps=10", "train.num_workers=0", "train.devices=1", "train.run_dir=/a")
    assert config_differences(saved, compose("train.max_steps=20", "train.num_workers=2", "train.devices=2",
                                             "train.run_dir=/b", "paths.output_dir=/c")) == []
    assert config_differences(saved, compose("train.max_steps=20", "eval.min_confidence=0.8", "model.fpn_channels=32")) \
        == ["eval.min_confidence", "model.fpn_channels"]


def test_a_run_saved_before_a_key_was_added_still_resumes():
    saved = OmegaConf.create(OmegaConf.to_yaml(compose()))  # as config.yaml is read back
    del saved.eval["class_bias"], saved.eval["sweep_class_bias"]  # what older runs' files lack
    assert config_differences(saved, compose()) == []
    assert config_differences(saved, compose("eval.sweep_class_bias=[0,1]")) == ["eval.sweep_class_bias"]


# -- findings 3 and 6: the log was wiped on resume; a truncated last.ckpt gave a traceback -------------

def test_a_truncated_last_checkpoint_is_one_line_and_loses_nothing(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path) / "run"
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100_000])
    before = files_of(run)
    done = tool(train_args(tmp_path, 4, data=tiny_run / "data"))
    assert done.returncode == 2, done.stderr[-3000:]
    first = done.stderr.splitlines()[0]
    assert first.startswith(f"error: {last}: not a readable tensor file, truncated or corrupt")
    assert "train.resume=false" in first and "Traceback" not in done.stderr
    assert files_of(run) == before  # metrics.csv was deleted before the crash


def test_the_metrics_writer_keeps_an_earlier_attempts_rows(tmp_path):
    log = tmp_path / "logs"
    atomic_write_text(log / "metrics.csv", "step,train/loss\n" + "".join(f"{s},{10 - s}\n" for s in range(6)))
    writer = KeepingCsvWriter(str(log), resume_from=4)  # last.ckpt at step 4: rows 4 and 5 come again
    assert (log / "metrics.csv").is_file()
    writer.log_metrics({"train/loss": 6.5, "val/f1": 0.5}, step=4)
    writer.save()
    with (log / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"] and rows[-1]["val/f1"] == "0.5"
    assert rows[0]["train/loss"] == "10" and rows[0]["val/f1"] == ""


# -- finding 4: a loader worker outlived its killed parent ---------------------------------------------

def test_loader_workers_die_with_their_parent(tmp_path):
    """A worker blocked writing a large item to its pipe never reaches torch's own parent check."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, time
        import numpy as np
        from leukodet.engine.data import make_loader

        def big(record):
            with open({str(pids)!r}, "a") as out:
                out.write(f"{{os.getpid()}}\\n")
            return np.ones(8_000_000, np.uint8)  # far more than a pipe holds

        loader = make_loader(list(range(50)), big, 1, False, 1)
        next(iter(loader))
        time.sleep(600)  # the worker fills the pipe and blocks
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(pids.read_text().split() if pids.is_file() else []) < 2:
            time.sleep(0.2)
        worker = int(pids.read_text().split()[0])
        time.sleep(1)
    finally:
        parent.kill()
        parent.wait()
    for _ in range(50):
        if not alive(worker):
            break
        time.sleep(0.2)
    still = alive(worker)
    if still:
        os.kill(worker, signal.SIGKILL)
    assert not still, "the loader worker outlived its parent"


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


# -- finding 5: loading ran code from files -------------------------------------------------------------

class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path) / "run"
    marker = tmp_path / "code_ran"
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["note"] = RunsCode(marker)
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"refused: besides data it holds Python objects \(posix.system\)"):
        load_detector(ckpt)
    done = tool([sys.executable, str(REPO / "tools" / "evaluate.py"), f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'ev'}"])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and errors[0].startswith(f"error: {ckpt}: refused") and "Traceback" not in done.stderr
    cfg = compose("model.weights=" + str(ckpt))
    with pytest.raises(ValueError, match=f"model.weights={ckpt}: refused"):
        from leukodet.registry import MODELS

        MODELS.build(OmegaConf.to_container(cfg.model, resolve=True), num_classes=2, masks=True)
    assert not marker.exists()


def test_the_raw_prediction_cache_is_data_not_pickle(tmp_path):
    import pickle

    marker = tmp_path / "code_ran"
    cache = tmp_path / "raw_val_0123.npz"
    cache.write_bytes(pickle.dumps({"predictions": RunsCode(marker)}))
    with pytest.raises((ValueError, OSError)):
        load_raw(cache)
    assert not marker.exists()


# -- finding 6: errors buried in tracebacks ---------------------------------------------------------------

def test_an_error_raised_in_a_loader_worker_is_one_line():
    message = ("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nleukodet.data.imageio.ImageReadError: /d/a.jpg: file is empty')

    class ImageReadError(ValueError):
        pass

    assert one_line(ImageReadError(message)) == "/d/a.jpg: file is empty"


# -- fault injection: kill -9 at seeded random points, then rerun --------------------------------------

def assert_whole(folder: Path) -> None:
    """Every JSON under ``folder`` parses and every CSV has a header and rows of its width."""
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())
    for path in folder.rglob("*.csv"):
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows and all(len(r) == len(rows[0]) for r in rows), path


def kill_when(process: subprocess.Popen, ready, rng: random.Random, timeout: float = 300) -> bool:
    """SIGKILL the tool's process group once ``ready()`` holds, after a seeded random extra delay;
    False when the tool ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


@pytest.mark.long
def test_inference_killed_at_random_points_ends_byte_identical(tiny_run, tmp_path):
    ckpt = tiny_run / "run" / "checkpoints" / "last.ckpt"
    images = tmp_path / "images"
    shutil.copytree(tiny_run / "data" / "images", images)
    (images / "bad.jpg").write_text("not an image")
    n = len(list(images.glob("*.jpg")))

    def infer(out: Path) -> list[str]:
        return [sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={ckpt}", f"input={images}",
                f"infer.out_dir={out}", "infer.num_workers=1", "eval.min_confidence=0.05", "hydra.output_subdir=null"]

    whole = tmp_path / "whole"
    assert tool(infer(whole)).returncode == 0
    rng = random.Random(14)
    killed = tmp_path / "killed"
    for _ in range(2):
        target = rng.randrange(0, n)  # kill once this many images are done, plus a random delay
        process = subprocess.Popen(infer(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        kill_when(process, lambda: len(list((killed / "records").glob("*.json"))) >= target, rng)
        assert_whole(killed)
    done = tool(infer(killed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_whole(killed)
    for name in RESULTS:
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert [r["image"] for r in csv.DictReader((killed / "errors.csv").open())] == ["bad.jpg"]


@pytest.mark.slow
def test_prepare_killed_at_random_points_then_rerun_leaves_whole_files(tmp_path):
    args = [sys.executable, str(REPO / "tools" / "prepare.py"), f"data.root={tmp_path / 'data'}",
            "data.generate.n_images=40", f"paths.output_dir={tmp_path / 'outputs'}"]
    rng = random.Random(7)
    kills = 0
    for _ in range(3):  # the tool takes ~3 s on 2 cores: generation, reading, splitting, writing
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        start, delay = time.time(), rng.uniform(0.5, 3.0)
        kills += kill_when(process, lambda: time.time() - start > delay, rng)
        if (tmp_path / "data").is_dir():
            assert_whole(tmp_path / "data")
    assert kills >= 2
    done = tool(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_whole(tmp_path / "data")
    assert {"train.json", "val.json", "test.json"} <= {p.name for p in (tmp_path / "data" / "prepared").iterdir()}


@pytest.mark.slow
def test_training_killed_at_random_steps_keeps_every_log_row(tmp_path):
    rng = random.Random(3)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for _ in range(2):
        target = rng.choice([2, 4, 6])
        process = subprocess.Popen(train_args(tmp_path, 10), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)

        def reached() -> bool:
            try:
                return torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= target
            except Exception:  # noqa: BLE001 - not there yet
                return False

        kill_when(process, reached, rng, timeout=600)
        assert_whole(tmp_path / "run")
    done = tool(train_args(tmp_path, 10), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_whole(tmp_path / "run")
    with (tmp_path / "run" / "logs" / "metrics.csv").open(newline="") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r["train/loss"]]
    assert steps == list(range(1, 10, 2))  # every second step (log_every_n_steps), once, across the attempts
