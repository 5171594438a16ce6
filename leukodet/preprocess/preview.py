"""Side-by-side panels of every preprocessing step's output (the seed's Figure 7), for tuning
thresholds by eye."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from leukodet.preprocess.chain import PreprocessChain
from leukodet.viz import write_rgb


def step_panel(outputs: Sequence[tuple[str, np.ndarray]], height: int = 256) -> np.ndarray:
    """The step images scaled to one height, titled, in a row."""
    tiles = []
    for name, image in outputs:
        width = max(1, round(image.shape[1] * height / image.shape[0]))
        tile = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        tile = np.vstack([np.full((24, width, 3), 255, np.uint8), tile])
        cv2.putText(tile, name, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.hstack([tile, np.full((tile.shape[0], 4, 3), 255, np.uint8)]))
    return np.hstack(tiles)


def write_previews(image_paths: Sequence[str | Path], steps: Sequence[dict], out_dir: str | Path) -> list[Path]:
    chain = PreprocessChain(steps)
    out_dir = Path(out_dir)
    written = []
    for path in tqdm(list(image_paths), desc="preview", unit="img"):
        _, outputs = chain.run_on_file(path, keep_steps=True)
        written.append(write_rgb(out_dir / f"{Path(path).stem}_steps.jpg", step_panel(outputs)))
    return written
