"""Panels of every preprocessing step's output for a few images, for tuning thresholds by eye.

    python tools/preview.py +exp=segmented +n=4                  # first n images of the train split
    python tools/preview.py +exp=segmented '+images=/path/to/dir'  # or of a folder
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.inspect import preview


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg):
    run_tool(preview, cfg)


if __name__ == "__main__":
    main()
