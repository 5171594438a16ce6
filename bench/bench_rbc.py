"""Benchmark (slow, not in CI): red-cell count accuracy on real data, the RBC paper's table.

    python bench/bench_rbc.py [--steps 400] [--min-confidences 0.5 0.7 0.8 0.9] [--chula-splits val test]

Trains the default model briefly on bccd's red-cell boxes (data=bccd_rbc), then scores count
accuracy = mean over images of min(segmented, true) / true from cached raw predictions at each min
confidence, on bccd's test split and on chula_rbc12 (count-only points, never seen in training:
exact per-image counts; a prediction counts for a point its box or mask contains, one-to-one).

Magnification: a bccd red cell spans ~100 px of its 640x480 fields, a chula one ~33 px. bccd is
trained at 1/3 scale (preprocess.scale, model input 160 px high) so that its cells are chula-sized,
and chula is predicted at its native 480 px; the same weights serve both sizes (the detector is
convolutional). Prints the per-dataset summary and the per-image table means; writes every table
to outputs/bench/rbc/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.evaluate import cached_raw_predictions, count_table_checkpoint
from leukodet.engine.module import DetectionModule
from leukodet.engine.train import fit
from leukodet.evaluation.counts import count_table, merge_classes
from leukodet.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZE = ["preprocess.scale=0.3334", "model.min_size=160", "model.max_size=214"]  # bccd cells ~100 -> ~34 px
CHULA_SIZE = {"min_size": 480, "max_size": 640}


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    import leukodet  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def chula_table(ckpt: Path, out: Path, splits: list[str], min_confidences: list[float]):
    """chula_rbc12 scored by cells alone (its size classes merged), at its native size."""
    cfg = compose("data=chula_rbc12", f"paths.output_dir={out}", f"ckpt={ckpt}", "preprocess=raw")
    ensure_prepared(cfg.data)
    trained_cfg = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["model_cfg"]
    module = DetectionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False,
                                                  model_cfg={**trained_cfg, **CHULA_SIZE}).eval()
    records, raw = [], []
    for split in splits:
        split_records, split_raw = cached_raw_predictions(cfg, module, ckpt, split)
        records += split_records
        raw += split_raw
    return count_table(merge_classes(records), raw, ["RBC"], min_confidences, cfg.eval.nms, cfg.eval.max_detections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--min-confidences", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--chula-splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "rbc"))
    args = parser.parse_args()
    out = Path(args.out)
    thresholds = f"eval.count_min_confidence=[{','.join(map(str, args.min_confidences))}]"
    cfg = compose("data=bccd_rbc", "preprocess=raw", *TRAIN_SIZE, f"train.max_steps={args.steps}",
                  f"train.steps_per_epoch={max(args.steps // 4, 1)}", "train.warmup_steps=50", "train.resume=false",
                  "train.num_workers=1", f"paths.output_dir={out}")
    start = time.perf_counter()
    trained = fit(cfg, out / "run")
    train_s = time.perf_counter() - start
    ckpt = trained.best_checkpoint
    print(f"trained {args.steps} steps in {train_s:.0f} s; {trained.best_metric} = {trained.best_score}")

    tables = {"bccd_rbc test": count_table_checkpoint(compose(f"ckpt={ckpt}", f"paths.output_dir={out}", thresholds),
                                                      out),
              "chula_rbc12 " + "+".join(args.chula_splits): chula_table(ckpt, out, args.chula_splits,
                                                                        args.min_confidences)}
    rows = []
    for name, table in tables.items():
        slug = name.replace(" ", "_").replace("+", "_")
        atomic_write_text(out / f"count_table_{slug}.csv", table.per_image.to_csv(index=False))
        images = len(table.per_image) - 1
        mean_row = table.per_image.iloc[-1]
        for _, point in table.summary.iterrows():
            t = point.min_confidence
            rows.append({"data": name, "images": images, "min_confidence": t, "true_mean": mean_row["true"],
                         "segmented_mean": mean_row[f"segmented_{t:g}"], "count_accuracy": point.count_accuracy,
                         "detection_recall": point.detection_recall,
                         "recall_touching": point.detection_recall_touching,
                         "recall_isolated": point.detection_recall_isolated, "count_mae": point.count_mae,
                         "count_bias": point.count_bias})
    summary = pd.DataFrame(rows)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    print(f"\nbccd_rbc: {args.steps} steps ({train_s:.0f} s), default model, trained at 1/3 scale; "
          f"total {time.perf_counter() - start:.0f} s")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"results saved to {out}")


if __name__ == "__main__":
    main()
