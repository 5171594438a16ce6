"""Cross-validate the configured recipe: each fold trains, chooses its checkpoint and operating
point on its own val split, and is scored once on its held-out fold (see conf/crossval.yaml):

    python tools/crossval.py data=segmentation_wbc                       # 5 folds grouped by data.prepare.group_regex
    python tools/crossval.py data=segmentation_wbc crossval.by=source     # leave one annotation file out
    python tools/crossval.py data=segmentation_wbc crossval.folds=[0,2]  # some folds (another process runs the rest)
    python tools/crossval.py -m data=segmentation_wbc model.freeze_at=1,3  # variants, each in its own folder
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.crossval import cross_validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="crossval")
def main(cfg):
    run_tool(cross_validate, cfg)


if __name__ == "__main__":
    main()
