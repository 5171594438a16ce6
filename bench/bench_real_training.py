"""Benchmark (slow, not in CI): raw vs segmented arms at the same CPU budget on real data.

    python bench/bench_real_training.py [--steps 300] [--datasets segmentation_wbc_cross bccd]

segmentation_wbc_cross: lymphocyte vs other WBC (the closest public proxy of lymphoblast vs
non-lymphoblast), trained on dataset1 + dataset2 001-030, tested on dataset2 031-060.
bccd: WBC / RBC / platelet boxes in crowded fields (box-only: scored on boxes).
Prints one row per (dataset, arm) with test AP50, F1, count MAE and the training time; writes
the table to outputs/bench/real_training_<datasets>_<arms>.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from leukodet.engine.evaluate import evaluate_split, load_detector
from leukodet.engine.train import fit

REPO = Path(__file__).resolve().parents[1]
# Input sizes per dataset: segmentation_wbc's 120 px crops are upsampled so a cell spans ~200 px.
MODEL_SIZE = {"segmentation_wbc_cross": ["model.min_size=256", "model.max_size=320"],
              "bccd": ["model.min_size=480", "model.max_size=640"]}


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    import leukodet  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--datasets", nargs="+", default=["segmentation_wbc_cross", "bccd"])
    parser.add_argument("--arms", nargs="+", default=["raw", "segmented"])
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench"))
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        for arm in args.arms:
            run_dir = Path(args.out) / f"{dataset}_{arm}"
            cfg = compose(f"data={dataset}", f"preprocess={arm}", f"train.max_steps={args.steps}",
                          f"train.steps_per_epoch={args.steps // 3}", "train.resume=false",
                          f"paths.output_dir={args.out}", *MODEL_SIZE.get(dataset, []))
            start = time.perf_counter()
            trained = fit(cfg, run_dir)
            seconds = time.perf_counter() - start
            result = evaluate_split(cfg, load_detector(trained.best_checkpoint), "test", run_dir)
            summary = result.summary()
            rows.append({"dataset": dataset, "arm": arm, "steps": args.steps, "train_s": round(seconds),
                         "ap50_segm": summary.get("ap50_segm"), "ap50_bbox": summary["ap50_bbox"],
                         "f1": summary["f1"], "detection_f1": summary["detection_f1"],
                         **{k: v for k, v in summary.items() if k.startswith("count_mae_")}})
    table = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / f"real_training_{'_'.join(args.datasets)}_{'_'.join(args.arms)}.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
