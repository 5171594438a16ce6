"""Train, then evaluate on the test split: `python tools/train.py +exp=segmented`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from leukodet.engine.train import train_and_evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train_and_evaluate(cfg, cfg.train.run_dir or HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
