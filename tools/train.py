"""Train, then evaluate on the test split: `python tools/train.py +exp=segmented`."""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.train import train_and_evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg):
    run_tool(train_and_evaluate, cfg)


if __name__ == "__main__":
    main()
