"""Preprocessing steps (registered in ``leukodet.registry.PREPROCESS``) and the chain that runs them."""

from leukodet.preprocess import steps  # noqa: F401  (registers the steps)
from leukodet.preprocess.chain import PreprocessChain
from leukodet.preprocess.steps import PreprocessState, step

__all__ = ["PreprocessChain", "PreprocessState", "step"]
