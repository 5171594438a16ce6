"""Evaluate a checkpoint (its run's data and preprocessing) on a split, or sweep thresholds:

    python tools/evaluate.py ckpt=outputs/runs/.../checkpoints/best.ckpt eval.split=test
    python tools/evaluate.py ckpt=... sweep=true            # the eval.sweep_* grid, writes thresholds.json
    python tools/evaluate.py -m ckpt=... eval.min_confidence=0.5,0.7,0.9 eval.nms=0.2,0.5
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from leukodet.engine.evaluate import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise SystemExit("ckpt=... is required: a checkpoint inside a leukodet run directory")
    out_dir = HydraConfig.get().runtime.output_dir
    evaluate_checkpoint(cfg, out_dir)
    print(f"results saved to {out_dir}")


if __name__ == "__main__":
    main()
