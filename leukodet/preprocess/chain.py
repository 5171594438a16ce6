"""A preprocessing chain: an ordered list of registered steps from config, the same for every stage."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from leukodet.data.imageio import image_size, read_image
from leukodet.preprocess.steps import PreprocessState, jpeg_reduction, target_size
from leukodet.registry import PREPROCESS

StepOutputs = list[tuple[str, np.ndarray]]


class PreprocessChain:
    """Steps from config: a list such as ``[{name: scale, factor: 0.2}, {name: bilateral}]``, or a
    ``conf/preprocess`` node holding it under ``steps`` (None or [] is the identity).

    Unknown step names and parameters fail here, when the chain is built, not at the first image.
    """

    def __init__(self, config: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None):
        if isinstance(config, (DictConfig, ListConfig)):
            config = OmegaConf.to_container(config, resolve=True)
        if isinstance(config, Mapping):
            config = config.get("steps")
        self.steps: list[tuple[str, Any, dict]] = []
        for spec in config or []:
            params = dict(spec)
            name = params.pop("name", None)
            if name is None:
                raise ValueError(f"preprocessing step {spec!r} has no 'name'; known: {', '.join(PREPROCESS.names())}")
            fn = PREPROCESS.get(name)
            try:
                inspect.signature(fn).bind(None, **params)
            except TypeError as err:
                raise TypeError(f"preprocessing step {name!r} with {params}: {err}") from None
            self.steps.append((name, fn, params))

    def decode_reduction(self, orig_size: tuple[int, int]) -> int:
        """How much a JPEG may shrink while decoding: only when the chain starts with ``scale``,
        and never below that step's output size."""
        if not self.steps or self.steps[0][0] != "scale":
            return 1
        return jpeg_reduction(orig_size, target_size(orig_size, **self.steps[0][2]))

    def run_on_file(self, path: str | os.PathLike, keep_steps: bool = False) -> tuple[PreprocessState, StepOutputs]:
        """Read ``path`` (a JPEG at reduced size where the first step allows; other formats in
        full) and run every step. See :meth:`run` for the outputs."""
        orig_size = image_size(path)
        image = read_image(path, reduce=self.decode_reduction(orig_size))
        return self.run(image, orig_size, keep_steps)

    def run(self, image: np.ndarray, orig_size: tuple[int, int] | None = None,
            keep_steps: bool = False) -> tuple[PreprocessState, StepOutputs]:
        """Run the steps on an RGB uint8 image decoded from a file of ``orig_size`` (default: its
        own size). Returns the final state and, with ``keep_steps``, ``(name, image)`` for the
        input and each step: the foreground mask for a step that made one and left the image
        alone (a threshold), else its image."""
        state = PreprocessState.start(image, orig_size)
        outputs = [("input", image)] if keep_steps else []
        for name, fn, params in self.steps:
            before, foreground = state.image, state.foreground
            state = fn(state, **params)
            if not fn.changes_geometry and state.image.shape[:2] != before.shape[:2]:
                raise RuntimeError(f"preprocessing step {name!r} changed the image size but does not declare "
                                   "changes_geometry, so annotations would no longer line up")
            if keep_steps:
                made_mask = state.foreground is not foreground and state.image is before
                outputs.append((name, np.repeat(state.foreground[..., None], 3, axis=2).view(np.uint8) * 255
                                if made_mask else state.image))
        return state, outputs
