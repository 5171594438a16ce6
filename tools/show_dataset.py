"""Draw a prepared split's annotations over its images, to check a conversion by eye:
`python tools/show_dataset.py data=bccd split=val +limit=8`."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from leukodet.data.catalog import get_dataset_dicts, get_metadata
from leukodet.data.pipeline import ensure_prepared
from leukodet.viz import render_split


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    ensure_prepared(cfg.data)
    name = f"{cfg.data.name}_{cfg.get('split') or 'train'}"
    out_dir = Path(HydraConfig.get().runtime.output_dir) / "annotations" / name
    written = render_split(get_dataset_dicts(name), get_metadata(name), out_dir, cfg.get("limit", 16))
    print(f"{len(written)} images drawn; results saved to {out_dir}")


if __name__ == "__main__":
    main()
