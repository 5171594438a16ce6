"""Adapting to a new scanner without its labels (issue 27), measured by leaving one acquisition out.

Takes a finished `crossval.by=source` run (each fold trained on one acquisition, its test split the
other, its operating point chosen on a val split of its own acquisition) and, for each fold and
each adaptation, runs the user's commands: `tools/adapt.py` on the held-out acquisition's image
folder (unlabelled: AdaBN, self-training and the class boundary read pixels only), then `tools/evaluate.py
split=test` on the adapted checkpoint at the fold's val-chosen point (its class bias moved where the
adaptation moves it). The baseline is the same evaluation of the unadapted
checkpoint. Nothing is chosen on the held-out images.

    python tools/crossval.py data=segmentation_wbc crossval.by=source train=cpu_10min model.min_size=256 model.max_size=320
    python bench/bench_adaptation.py outputs/crossval/cv_crossval.by_source,data_segmentation_wbc,...

Prints, per fold and adaptation: the minutes it took, F1, AP50, detection F1, share MAE and count
MAE per class, then the mean over the folds (both directions) of each adaptation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
ADAPTATIONS = {  # name: tools/adapt.py overrides (none: the checkpoint as trained)
    "none": None,
    "adabn": ["adapt.stain=none", "adapt.batchnorm=true"],
    "reinhard": ["adapt.stain=reinhard", "adapt.batchnorm=false"],
    "macenko": ["adapt.stain=macenko", "adapt.batchnorm=false"],
    "reinhard+adabn": ["adapt.stain=reinhard", "adapt.batchnorm=true"],
    "self_training": ["adapt.stain=none", "adapt.batchnorm=false", "adapt.self_training.steps=400"],
    "reinhard+self_training": ["adapt.stain=reinhard", "adapt.batchnorm=false", "adapt.self_training.steps=400"],
    "otsu_bias": ["adapt.stain=none", "adapt.batchnorm=false", "adapt.class_bias=otsu"],
    "reinhard+otsu_bias": ["adapt.stain=reinhard", "adapt.batchnorm=false", "adapt.class_bias=otsu"],
}
# self-training's online form: the same runs, labelled at every step by a moving average of the model
ADAPTATIONS.update({name.replace("self_training", "mean_teacher"): [*overrides, "adapt.self_training.mean_teacher=true"]
                    for name, overrides in list(ADAPTATIONS.items()) if name.endswith("self_training")})
# each again with the operating point re-chosen on the run's val split after adapting
ADAPTATIONS.update({f"{name}+val_point": [*overrides, "adapt.choose_point=true"]
                    for name, overrides in list(ADAPTATIONS.items()) if overrides is not None})
FIGURES = ["f1", "ap50_segm", "detection_f1", "share_mae"]


def tool(name: str, *overrides: str) -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / name), *overrides], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"tools/{name} {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")


def held_out_folder(fold_dir: Path) -> Path:
    """The folder holding the fold's test images (the held-out acquisition's)."""
    test = json.loads((fold_dir / "prepared" / "test.json").read_text())
    files = [(fold_dir / "prepared" / image["file_name"]).resolve() for image in test["images"]]
    return Path(os.path.commonpath(files))


def measure(fold_dir: Path, name: str, out: Path, images: int) -> dict:
    row = json.loads((fold_dir / "fold_result.json").read_text())
    checkpoint = fold_dir / "checkpoints" / row["best_checkpoint"]
    folder = held_out_folder(fold_dir)
    start = time.perf_counter()
    if ADAPTATIONS[name] is not None:
        adapted = out / "adapted"
        tool("adapt.py", f"ckpt={checkpoint}", f"input={folder}", f"adapt.images={images}", *ADAPTATIONS[name],
             f"hydra.run.dir={adapted}")
        checkpoint = adapted / "checkpoints" / checkpoint.name
    seconds = time.perf_counter() - start
    tool("evaluate.py", f"ckpt={checkpoint}", "split=test", "eval.report=false", f"hydra.run.dir={out / 'eval'}")
    summary = json.loads((out / "eval" / "test_metrics.json").read_text())["summary"]
    counts = {k: v for k, v in summary.items() if k.startswith("count_mae_")}
    return {"fold": row["fold"], "held_out": folder.parent.name, "adaptation": name,
            "adapt_minutes": round(seconds / 60, 2), **{k: summary.get(k) for k in FIGURES}, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crossval_dir", type=Path, help="a finished crossval.by=source folder")
    parser.add_argument("--adaptations", nargs="+", default=list(ADAPTATIONS), choices=list(ADAPTATIONS))
    parser.add_argument("--images", type=int, default=64,
                        help="adapt.images: held-out images AdaBN and self-training read")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_adaptation")
    args = parser.parse_args()
    folds = sorted(p for p in args.crossval_dir.glob("fold*") if (p / "fold_result.json").is_file())
    if not folds:
        sys.exit(f"{args.crossval_dir}: no finished fold (fold*/fold_result.json)")
    rows = []
    for fold_dir in folds:
        for name in args.adaptations:
            rows.append(measure(fold_dir, name, args.out / fold_dir.name / name.replace("+", "_"), args.images))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "adaptation.csv", index=False)
    means = table.groupby("adaptation", sort=False)[["adapt_minutes", *FIGURES]].agg(["mean", "std"])
    print(f"\n{table.to_string(index=False, float_format=lambda v: f'{v:.3f}')}\n\nover the {len(folds)} folds "
          f"(mean, sd n-1):\n{means.to_string(float_format=lambda v: f'{v:.3f}')}")


if __name__ == "__main__":
    main()
