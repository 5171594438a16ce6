"""The RBC paper's count-accuracy table of a checkpoint (its run's data and preprocessing) on a split:
per image the true count and, at each min confidence, the segmented count and min(seg, true) / true,
with the mean row; from cached raw predictions, so the model runs once for all thresholds.

    python tools/count_table.py ckpt=outputs/runs/.../checkpoints/best.ckpt
    python tools/count_table.py ckpt=... split=val 'eval.count_min_confidence=[0.5,0.7,0.9]' eval.nms=0.3
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from leukodet.engine.evaluate import count_table_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise SystemExit("ckpt=... is required: a checkpoint inside a leukodet run directory")
    out_dir = HydraConfig.get().runtime.output_dir
    count_table_checkpoint(cfg, out_dir)
    print(f"results saved to {out_dir}")


if __name__ == "__main__":
    main()
