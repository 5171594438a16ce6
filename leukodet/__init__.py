"""leukodet: find, outline, classify and count blood cells in smear images."""

__version__ = "0.1.0"
