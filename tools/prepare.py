"""Convert, clean, split, augment and register a dataset: `python tools/prepare.py data=bccd`."""

import hydra
from omegaconf import DictConfig

from leukodet.data.pipeline import prepare_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    prepare_from_config(cfg.data)


if __name__ == "__main__":
    main()
