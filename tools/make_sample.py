"""Generate the synthetic smears (images + VIA 2.x JSON) a data config names, into its data.root:

    python tools/make_sample.py data=sample_wbc data.generate.n_images=80
    python tools/make_sample.py data=sample_rbc
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.inspect import make_sample


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg):
    run_tool(make_sample, cfg)


if __name__ == "__main__":
    main()
