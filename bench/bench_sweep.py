"""Benchmark: a 25-point threshold sweep (5 min confidences x 5 NMS values) on a validation split,
from cached raw predictions vs re-running inference at every point. Prints both times and the
ratio measured in this run.

    python bench/bench_sweep.py --ckpt outputs/runs/<date>/<time>/checkpoints/best.ckpt
(default: outputs/demo/checkpoints/best.ckpt, trained by `make demo`)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.evaluate import load_detector, predict_split
from leukodet.evaluation.metrics import evaluate
from leukodet.evaluation.sweep import sweep
from leukodet.structures import RAW, OperatingPoint

REPO = Path(__file__).resolve().parents[1]
MIN_CONFIDENCES = [0.5, 0.6, 0.7, 0.8, 0.9]
NMS_VALUES = [0.1, 0.2, 0.3, 0.5, 0.7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(REPO / "outputs" / "demo" / "checkpoints" / "best.ckpt"))
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    ckpt = Path(args.ckpt)
    cfg = OmegaConf.load(ckpt.parent.parent / "config.yaml")
    ensure_prepared(cfg.data)
    name = f"{cfg.data.name}_{args.split}"
    records, classes = get_dataset_dicts(name), get_metadata(name)["thing_classes"]
    module = load_detector(ckpt)

    start = time.perf_counter()
    raw = predict_split(cfg, module, records, RAW, "raw predictions (once)")
    cache_build = time.perf_counter() - start
    start = time.perf_counter()
    table, best = sweep(records, raw, classes, MIN_CONFIDENCES, NMS_VALUES)
    from_cache = time.perf_counter() - start

    start = time.perf_counter()
    worst_gap = 0.0
    for nms in NMS_VALUES:
        for min_confidence in MIN_CONFIDENCES:
            point = OperatingPoint(min_confidence, nms, 300)
            direct = predict_split(cfg, module, records, point, f"model at {min_confidence}/{nms}")
            f1 = evaluate(records, direct, classes, min_confidence=min_confidence).summary()["f1"]
            cached = table[(table.min_confidence == min_confidence) & (table.nms == nms)].f1.iloc[0]
            worst_gap = max(worst_gap, abs(f1 - cached)) if f1 == f1 else worst_gap
    rerun = time.perf_counter() - start

    print(f"\n{len(records)} images of {name}, 25 points; checkpoint {ckpt}")
    print(f"raw-prediction cache, built once       : {cache_build:7.2f} s")
    print(f"sweep from the cache (25 points)       : {from_cache:7.2f} s")
    print(f"re-running inference at every point    : {rerun:7.2f} s")
    print(f"ratio re-run / cached sweep = {rerun / from_cache:.1f}x (goal >= 50x); "
          f"including the cache build: {rerun / (from_cache + cache_build):.1f}x")
    print(f"largest F1 difference cached vs re-run: {worst_gap:.2e}; best point {best}")


if __name__ == "__main__":
    main()
