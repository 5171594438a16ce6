"""Evaluate a checkpoint (its run's data and preprocessing) on a split, or sweep thresholds:

    python tools/evaluate.py ckpt=outputs/runs/.../checkpoints/best.ckpt split=val
    python tools/evaluate.py ckpt=... sweep=true            # the eval.sweep_* grid on val, writes thresholds.json
    python tools/evaluate.py -m ckpt=... eval.min_confidence=0.5,0.7,0.9 eval.nms=0.2,0.5
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.evaluate import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="checkpoint")
def main(cfg):
    run_tool(evaluate_checkpoint, cfg)


if __name__ == "__main__":
    main()
