"""Panels of every preprocessing step's output for a few images, for tuning thresholds by eye.

    python tools/preview.py +exp=segmented +n=4                  # first n images of the train split
    python tools/preview.py +exp=segmented '+images=/path/to/dir'  # or of a folder
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from leukodet.preprocess.preview import write_previews

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    n = cfg.get("n", 4)
    if cfg.get("images"):
        paths = sorted(p for p in Path(cfg.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    else:
        from leukodet.data.catalog import get_dataset_dicts
        from leukodet.data.pipeline import ensure_prepared

        ensure_prepared(cfg.data)
        paths = [r["file_name"] for r in get_dataset_dicts(f"{cfg.data.name}_{cfg.get('split') or 'train'}")[:n]]
    out_dir = Path(HydraConfig.get().runtime.output_dir) / "preview"
    written = write_previews(paths, cfg.preprocess, out_dir)
    print(f"{len(written)} of {len(paths)} panels; results saved to {out_dir}")


if __name__ == "__main__":
    main()
