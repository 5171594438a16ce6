"""Predict every image under a folder: overlays, counts.csv, per-detection results, a per-folder
summary and a VIA project to correct:

    python tools/infer.py ckpt=outputs/runs/.../checkpoints/best.ckpt input=path/to/images
    python tools/infer.py ckpt=... input=... eval.min_confidence=0.8   # instead of thresholds.json

Outputs go to outputs/infer/<input folder name> (infer.out_dir=...); a re-run skips images done.
Exit status 1 when no image could be processed, 2 on a bad argument or file.
"""

import sys

import hydra

from leukodet.cli import run_tool
from leukodet.engine.inference import run_inference


@hydra.main(version_base="1.3", config_path="../conf", config_name="inference")
def main(cfg):
    summary = run_tool(run_inference, cfg)
    if summary.done == 0:
        sys.exit("error: no image could be processed (see errors.csv)")


if __name__ == "__main__":
    main()
