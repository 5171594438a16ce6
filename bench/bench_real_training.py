"""Benchmark (slow, not in CI): raw vs segmented arms at the same CPU budget on real data.

    python bench/bench_real_training.py [--steps 300] [--datasets segmentation_wbc_cross bccd]

segmentation_wbc_cross: lymphocyte vs other WBC (the closest public proxy of lymphoblast vs
non-lymphoblast), trained on dataset1 + dataset2 001-030, tested on dataset2 031-060.
bccd: WBC / RBC / platelet boxes in crowded fields (box-only: scored on boxes).
Prints one row per (dataset, arm) with test AP50 (over all scores), F1 at min confidence 0.5,
the best F1 over min confidence (from the raw-prediction cache, as YOLO reports it), count MAE,
the training time and the inference time per image (batch 1, decode and preprocessing included);
writes the table to outputs/bench/real_training_<datasets>_<arms>.csv.

The yardstick in DESIGN.md (YOLOv8n-seg, 10 CPU minutes at 256 px on segmentation_wbc: AP50
~0.78, best F1 ~0.73, ~27 ms per image) corresponds to ``--steps 850`` here (~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata, split_name
from leukodet.engine.evaluate import cached_raw_predictions, load_detector, predict_split, score_split
from leukodet.engine.train import fit, trained_point
from leukodet.evaluation.sweep import sweep

REPO = Path(__file__).resolve().parents[1]
# Input sizes per dataset: segmentation_wbc's 120 px crops are upsampled so a cell spans ~200 px.
MODEL_SIZE = {"segmentation_wbc_cross": ["model.min_size=256", "model.max_size=320"],
              "bccd": ["model.min_size=480", "model.max_size=640"]}


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    import leukodet  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def best_f1(cfg, module, checkpoint: Path) -> dict:
    """The test split's best F1 over min confidence 0.05-0.95 at the run's NMS, from the raw cache."""
    cfg = OmegaConf.merge(cfg, {"ckpt": str(checkpoint)})
    records, raw = cached_raw_predictions(cfg, module, checkpoint, "test")
    classes = get_metadata(split_name(cfg.data.name, "test"))["thing_classes"]
    grid = [round(0.05 * k, 2) for k in range(1, 20)]
    return sweep(records, raw, classes, grid, [cfg.eval.nms], cfg.eval.max_detections, "f1")[1]


def milliseconds_per_image(cfg, module) -> float:
    """Inference time per test image, one at a time in this process (decode, preprocessing, model)."""
    records = get_dataset_dicts(split_name(cfg.data.name, "test"))
    point = trained_point(cfg)
    cfg = OmegaConf.merge(cfg, {"train": {"batch_size": 1, "num_workers": 0}})
    predict_split(cfg, module, records[:2], point, "warm-up")
    start = time.perf_counter()
    predict_split(cfg, module, records, point, "timing")
    return round(1000 * (time.perf_counter() - start) / len(records), 1)


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
            module = load_detector(trained.best_checkpoint)
            summary = score_split(cfg, module, trained.best_checkpoint, "test", trained_point(cfg), run_dir).summary()
            best = best_f1(cfg, module, trained.best_checkpoint)
            rows.append({"dataset": dataset, "arm": arm, "steps": args.steps, "train_s": round(seconds),
                         "ap50_segm": summary.get("ap50_segm"), "ap50_bbox": summary["ap50_bbox"],
                         "f1": summary["f1"], "best_f1": best["value"], "at_min_confidence": best["min_confidence"],
                         "detection_f1": summary["detection_f1"],
                         **{k: v for k, v in summary.items() if k.startswith("count_mae_")},
                         "ms_per_image": milliseconds_per_image(cfg, module)})
    table = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / f"real_training_{'_'.join(args.datasets)}_{'_'.join(args.arms)}.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
