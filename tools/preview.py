"""Panels of every preprocessing step for a few images of a dataset:
`python tools/preview.py +exp=segmented +n=4`."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import get_dataset_dicts
from leukodet.data.pipeline import ensure_prepared
from leukodet.preprocess.preview import write_previews


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    ensure_prepared(cfg.data)
    records = get_dataset_dicts(f"{cfg.data.name}_{cfg.get('split', 'train')}")[: cfg.get("n", 4)]
    out_dir = Path(HydraConfig.get().runtime.output_dir) / "preview"
    steps = OmegaConf.to_container(cfg.preprocess.steps, resolve=True)
    written = write_previews([r["file_name"] for r in records], steps, out_dir)
    print(f"{len(written)} panels; results saved to {out_dir}")


if __name__ == "__main__":
    main()
