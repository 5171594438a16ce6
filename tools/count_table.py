"""The RBC paper's count-accuracy table of a checkpoint on a split, from cached raw predictions:

    python tools/count_table.py ckpt=outputs/runs/.../checkpoints/best.ckpt
    python tools/count_table.py ckpt=... split=val 'eval.count_min_confidence=[0.5,0.7,0.9]' eval.nms=0.3
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.evaluate import count_table_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="checkpoint")
def main(cfg):
    run_tool(count_table_checkpoint, cfg)


if __name__ == "__main__":
    main()
