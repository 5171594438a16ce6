"""Which images a folder inference works on, and the names they are known by in its outputs."""

from __future__ import annotations

import os
from pathlib import Path

from leukodet.data.imageio import INPUT_SUFFIXES


def discover_images(input_path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, images): every image under a folder, recursively, any letter case of the usual
    suffixes, sorted by relative path; or a single file (its folder is the root)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    images = sorted((p for p in path.rglob("*") if p.suffix.lower() in INPUT_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(path).as_posix())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(INPUT_SUFFIXES))}, any case) under {path}")
    return path, images


def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
