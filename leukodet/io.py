"""Small file helpers shared by every stage: outputs are written atomically, with the permissions
any other new file gets, and files are identified by their content."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file in ``path``'s folder for writing; on a clean exit rename it over ``path``.

    A killed run leaves either the old file or the new one, never half a file, also for files
    written row by row (streamed CSV/JSON that never sits whole in memory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; colleagues on a shared machine must read results like any file
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, mode, **kwargs) as out:
            yield out
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "wb") as out:
        out.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
    """The process umask, read from /proc (Linux) without changing it; else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks (checkpoints are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class UnreadableFileError(ValueError):
    """A data file that is empty, truncated, corrupt or of another kind; the message names it."""


class UnsafeFileError(ValueError):
    """A tensor file that holds Python objects besides data: loading it could run code."""


def load_tensor_file(path: str | os.PathLike, map_location="cpu"):
    """``torch.load`` as data only (``weights_only=True``: tensors, numbers, strings, containers).

    A pickle can name any Python callable to be run while loading, and labs exchange checkpoints
    and weight files, so a file that asks for anything else is refused (UnsafeFileError names
    what it holds); a damaged one raises UnreadableFileError. leukodet's checkpoints hold only
    data: no type needs allow-listing (``torch.serialization.add_safe_globals`` would add one).
    """
    import pickle

    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{path}: the file is empty")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):
            raise UnreadableFileError(f"{path}: not a readable tensor file ({_first_sentence(err)})") from None
        raise UnsafeFileError(f"{path}: refused: besides data it holds Python objects "
                              f"({', '.join(_unsafe_globals(path, err))}) whose loading could run code; leukodet "
                              "loads checkpoints and weights as data only") from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere in torch's reader (zip, pickle, storages)
        raise UnreadableFileError(f"{path}: not a readable tensor file, truncated or corrupt "
                                  f"({_first_sentence(err)})") from None


def _unsafe_globals(path: Path, err: BaseException) -> list[str]:
    """The Python types or functions a tensor file would build, to name them in the refusal."""
    import torch

    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path) or ["an object"]
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: the loader's own message names one
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        return found[:1] or ["an object"]


def _first_sentence(err: BaseException) -> str:
    text = str(err).strip().split("\n")[0].split(". ")[0]
    return text if len(text) > 12 else f"{type(err).__name__}: {text}"
