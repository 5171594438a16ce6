"""Adapt a trained run to a new acquisition from a folder of its unlabelled images:

    python tools/adapt.py ckpt=outputs/runs/.../checkpoints/best.ckpt      # Reinhard: reads no new image
    python tools/adapt.py ckpt=... input=new_scanner/ adapt.stain=none adapt.batchnorm=true      # AdaBN
    python tools/infer.py ckpt=outputs/adapted/<date>/<time>/checkpoints/best.ckpt input=new_scanner/
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.adapt import adapt_run


@hydra.main(version_base="1.3", config_path="../conf", config_name="adapt")
def main(cfg):
    run_tool(adapt_run, cfg)


if __name__ == "__main__":
    main()
