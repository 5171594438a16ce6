"""Soak benchmark (issue 14): folder inference over 2,000 generated images, 5% of them bad files
(empty, truncated, text named .jpg, random bytes), killed with SIGKILL every 500 images and run
again until it finishes. Checks that errors.csv lists exactly the bad files and every other image
is counted once, and compares the tool's peak memory over 2,000 images with that over 200.

    python bench/bench_soak.py                       # trains a tiny checkpoint first (CPU, ~1 min)
    python bench/bench_soak.py --ckpt outputs/demo/checkpoints/best.ckpt

Not part of the test run. Prints the figures; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the tool run as a child of a small wrapper that reports the child's peak resident memory
PEAK_RSS = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(done.stdout[-4000:]); print(done.stderr[-2000:], file=sys.stderr); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def train_tiny(work: Path) -> Path:
    args = [sys.executable, str(REPO / "tools" / "train.py"), f"data.root={work / 'data'}", "data.generate.n_images=16",
            "+data.generate.width=256", "+data.generate.height=192", "train.max_steps=4", "train.steps_per_epoch=4",
            "train.num_workers=0", "train.warmup_steps=2", "model.min_size=192", "model.max_size=256",
            f"train.run_dir={work / 'run'}", f"paths.output_dir={work / 'outputs'}"]
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    return work / "run" / "checkpoints" / "last.ckpt"


def bad_bytes(kind: int, good: bytes, rng: random.Random) -> bytes:
    return [b"", good[: len(good) // 3], b"this is not an image\n", rng.randbytes(5000)][kind % 4]


def make_folder(folder: Path, n_images: int, sources: list[Path], bad_fraction: float, seed: int) -> set[str]:
    """``n_images`` files in subfolders of 100; a seeded ``bad_fraction`` of them bad. Returns the
    bad files' relative names."""
    rng = random.Random(seed)
    bad = set(rng.sample(range(n_images), round(n_images * bad_fraction)))
    names = set()
    for i in range(n_images):
        rel = f"slide{i // 100:02d}/img{i:04d}.jpg"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        good = sources[i % len(sources)].read_bytes()
        path.write_bytes(bad_bytes(i, good, rng) if i in bad else good)
        if i in bad:
            names.add(rel)
    return names


def infer_command(ckpt: Path, folder: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={ckpt}", f"input={folder}", f"infer.out_dir={out}",
            "eval.min_confidence=0.05", "hydra.output_subdir=null"]


def peak_run(ckpt: Path, folder: Path, out: Path) -> tuple[float, float]:
    """(peak resident MB, seconds) of one uninterrupted tool run."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *infer_command(ckpt, folder, out)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return int(re.search(r"PEAK_KB (\d+)", done.stdout).group(1)) / 1024, time.perf_counter() - start


def killed_run(ckpt: Path, folder: Path, out: Path, kill_every: int) -> tuple[int, int]:
    """Runs the tool, SIGKILLs it each time ``kill_every`` more images are done, and starts it again
    until it exits by itself. Returns (kills, attempts)."""
    kills = attempts = 0
    while True:
        attempts += 1
        done_before = len(list((out / "records").rglob("*.json"))) if (out / "records").is_dir() else 0
        process = subprocess.Popen(infer_command(ckpt, folder, out), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        while process.poll() is None:
            done = len(list((out / "records").rglob("*.json"))) if (out / "records").is_dir() else 0
            if done - done_before >= kill_every:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                break
            time.sleep(0.5)
        else:
            if process.returncode != 0:
                raise RuntimeError(f"the tool exited with status {process.returncode}")
            return kills, attempts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a checkpoint (default: train a tiny one)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--kill-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="leukodet_soak_"))
    try:
        ckpt = args.ckpt or train_tiny(work)
        sources = sorted((work / "data" / "images").glob("*.jpg")) if not args.ckpt else None
        if not sources:
            from leukodet.data.synthetic import generate_smears

            generate_smears(work / "smears", n_images=20, seed=args.seed, kind="wbc")
            sources = sorted((work / "smears").rglob("*.jpg"))
        big, small = work / "big", work / "small"
        bad = make_folder(big, args.images, sources, args.bad_fraction, args.seed)
        make_folder(small, args.small, sources, args.bad_fraction, args.seed)

        start = time.perf_counter()
        kills, attempts = killed_run(ckpt, big, work / "out_killed", args.kill_every)
        killed_seconds = time.perf_counter() - start
        with (work / "out_killed" / "errors.csv").open(newline="") as handle:
            errors = {row["image"] for row in csv.DictReader(handle)}
        with (work / "out_killed" / "counts.csv").open(newline="") as handle:
            counted = [row["image"] for row in csv.DictReader(handle)]
        peak_small, _ = peak_run(ckpt, small, work / "out_small")
        peak_big, big_seconds = peak_run(ckpt, big, work / "out_big")

        checks = {
            "errors.csv lists exactly the bad files": errors == bad,
            "every good image counted once": sorted(counted) == sorted(set(counted)) and len(counted) == args.images - len(bad),
            "results equal an uninterrupted run's": all(
                (work / "out_killed" / name).read_bytes() == (work / "out_big" / name).read_bytes()
                for name in ("counts.csv", "detections.csv", "results_coco.json", "folders.csv", "errors.csv")),
            f"peak memory over {args.images} within 1.1x of over {args.small}": peak_big <= 1.1 * peak_small,
        }
        print(f"{args.images} images, {len(bad)} bad; killed {kills} times, {attempts} attempts, {killed_seconds:.0f} s")
        print(f"uninterrupted: {args.images} images in {big_seconds:.0f} s")
        print(f"peak resident memory: {peak_big:.0f} MB over {args.images} images, {peak_small:.0f} MB over "
              f"{args.small} ({peak_big / peak_small:.2f}x)")
        for name, ok in checks.items():
            print(f"{'ok ' if ok else 'FAILED'} {name}")
        return 0 if all(checks.values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
