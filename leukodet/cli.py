"""What every tool does around its one engine call: load the installed plugins, pass the Hydra
run directory, print "results saved to", and turn the project's known errors into one line.

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def main(cfg):
        run_tool(train_and_evaluate, cfg)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from leukodet.registry import RegistryError, load_plugins

DEBUG_ENV = "LEUKODET_DEBUG"

# Errors that say what is wrong with the user's input (files, config, checkpoint): one line is
# enough. Anything else is a bug and keeps its traceback.
KNOWN_ERRORS = (FileNotFoundError, ValueError, RegistryError, ImportError, OmegaConfBaseException)


def output_dir(cfg: DictConfig) -> Path:
    """The tool's output folder: Hydra's run directory (``train.run_dir`` when a training sets it)."""
    run_dir = cfg.get("train", {}).get("run_dir")
    return Path(run_dir) if run_dir else Path(HydraConfig.get().runtime.output_dir)


def one_line(err: BaseException) -> str:
    """The error's own message; for one re-raised from a loader worker (torch puts the worker's
    whole traceback in the message), the worker's last line, which is the original message."""
    message = str(err).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        raised, _, text = last.partition(": ")  # "package.module.ErrorName: message"
        return text if raised.rsplit(".", 1)[-1] == type(err).__name__ else last
    return message


def run_tool(run: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """``run(cfg, output folder)`` after loading plugins; a known error becomes
    ``error: <message>`` and exit status 2 (the traceback too with LEUKODET_DEBUG=1)."""
    try:
        load_plugins()
        out_dir = output_dir(cfg)
        result = run(cfg, out_dir)
    except KNOWN_ERRORS as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {one_line(err)}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    print(f"results saved to {out_dir}")
    return result
