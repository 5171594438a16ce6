"""Convert, clean, split, augment and register a dataset: `python tools/prepare.py data=bccd`."""

import hydra

from leukodet.cli import run_tool
from leukodet.data.pipeline import prepare_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg):
    run_tool(lambda cfg, out_dir: prepare_from_config(cfg.data), cfg)


if __name__ == "__main__":
    main()
