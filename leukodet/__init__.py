"""leukodet: find, outline, classify and count blood cells in smear images."""

__version__ = "0.1.0"

from leukodet import config  # noqa: E402,F401  (registers the typed config schemas with Hydra)
