"""A preprocessing chain: an ordered list of registered steps from config, same for every stage."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukodet.data.imageio import JPEG_SUFFIXES, image_size, read_image
from leukodet.preprocess.steps import PreprocessState, target_size
from leukodet.registry import PREPROCESS


class PreprocessChain:
    """Steps from a config list such as ``[{name: scale, factor: 0.2}, {name: bilateral}]``."""

    def __init__(self, steps: Sequence[Mapping[str, Any]] | None):
        self.specs = [dict(s) for s in (steps or [])]
        self.steps = []
        for spec in self.specs:
            params = {k: v for k, v in spec.items() if k != "name"}
            self.steps.append((spec["name"], PREPROCESS.get(spec["name"]), params))

    def decode_reduction(self, path: Path, orig_size: tuple[int, int]) -> int:
        """How much libjpeg may shrink while decoding: the largest of 1, 2, 4, 8 that keeps the
        decoded image at least as large as the first step's scale target."""
        if not self.steps or self.steps[0][0] != "scale" or path.suffix.lower() not in JPEG_SUFFIXES:
            return 1
        params = self.steps[0][2]
        width, _ = target_size(orig_size, params.get("factor"), params.get("max_size"))
        return max([r for r in (1, 2, 4, 8) if orig_size[0] // r >= width] or [1])

    def run_on_file(self, path: str | os.PathLike, keep_steps: bool = False) -> tuple[PreprocessState, list]:
        """Decode ``path`` (at reduced size where the first step allows) and run every step.
        Returns the state and, with ``keep_steps``, each step's output image for previews."""
        path = Path(path)
        orig_size = image_size(path)
        image = read_image(path, reduce=self.decode_reduction(path, orig_size))
        return self.run(image, orig_size, keep_steps)

    def run(self, image: np.ndarray, orig_size: tuple[int, int] | None = None,
            keep_steps: bool = False) -> tuple[PreprocessState, list]:
        orig_size = orig_size or (image.shape[1], image.shape[0])
        state = PreprocessState(image=image, raw=image, orig_size=orig_size)
        outputs = [("input", image)] if keep_steps else []
        for name, fn, params in self.steps:
            state = fn(state, **params)
            if keep_steps:
                outputs.append((name, state.image if name != "green_threshold" else
                                np.repeat(state.foreground[..., None].astype(np.uint8) * 255, 3, axis=2)))
        return state, outputs
