"""Side-by-side panels of every preprocessing step's output (the seed's Figure 7), for tuning
thresholds by eye."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leukodet.data.imageio import ImageReadError
from leukodet.preprocess.chain import PreprocessChain
from leukodet.viz import write_rgb

logger = logging.getLogger(__name__)

TITLE_HEIGHT, GAP = 24, 4


def step_panel(outputs: Sequence[tuple[str, np.ndarray]], height: int = 256) -> np.ndarray:
    """The step images scaled to one height, each titled with its step name, in a row."""
    tiles = []
    for name, image in outputs:
        width = max(1, round(image.shape[1] * height / image.shape[0]))
        tile = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        title = np.full((TITLE_HEIGHT, width, 3), 255, np.uint8)
        cv2.putText(title, name, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        tiles += [np.vstack([title, tile]), np.full((TITLE_HEIGHT + height, GAP, 3), 255, np.uint8)]
    return np.hstack(tiles[:-1])


def write_previews(image_paths: Iterable[str | Path], preprocess_cfg: Any, out_dir: str | Path,
                   height: int = 256) -> list[Path]:
    """Write ``<stem>_steps.jpg`` in ``out_dir`` for each image: input, then every step's output.

    ``preprocess_cfg`` is a ``conf/preprocess`` node or its step list. An unreadable image is
    logged with its reason and skipped; the others are still written.
    """
    chain = PreprocessChain(preprocess_cfg)
    out_dir = Path(out_dir)
    written = []
    for path in image_paths:
        try:
            _, outputs = chain.run_on_file(path, keep_steps=True)
        except ImageReadError as err:
            logger.warning("skipped: %s", err)
            continue
        written.append(write_rgb(out_dir / f"{Path(path).stem}_steps.jpg", step_panel(outputs, height)))
        logger.info("%s -> %s", path, written[-1])
    return written
