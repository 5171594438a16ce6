"""Draw a prepared split's annotations over its images, to check a conversion by eye:
`python tools/show_dataset.py data=bccd split=val +limit=8`."""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.inspect import show_split


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg):
    run_tool(show_split, cfg)


if __name__ == "__main__":
    main()
