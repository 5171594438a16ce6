"""The resume store of a folder inference: ``run.json`` says what produced the results, and each
image done has a JSON record (written last, atomically: its presence means the image is done)
and an overlay. A record is reused only while the settings (checkpoint content, classes,
operating point, preprocessing, input folder) and its input file (size and modification time, or
else its content hash) are the same; results made otherwise are never mixed with new ones."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from leukodet.engine.inference.discovery import relative_name
from leukodet.io import atomic_write_text, file_sha256

REDO = "pass infer.overwrite=true to redo them, or infer.out_dir=... for a new folder"


class RunSettings:
    """``run.json``: what produced the records in an output folder."""

    # compared before any record is reused: the checkpoint by content (a model retrained at the
    # same path is another model), the input by its resolved path (two folders named ``images``)
    KEYS = ("checkpoint_sha256", "backend", "rpn_proposals", "flip_tta", "classes", "min_confidence", "nms",
            "max_detections", "class_bias", "cross_class_nms", "preprocess", "input", "tiling")

    def __init__(self, out_dir: Path, settings: dict):
        self.path = out_dir / "run.json"
        self.settings = settings

    def differences(self) -> list[str]:
        """What differs from the saved ``run.json``, one phrase per key; empty when nothing does."""
        if not self.path.is_file():
            return []
        before = json.loads(self.path.read_text())
        changed = []
        for key in self.KEYS:
            old, new = before.get(key), self.settings.get(key)
            if old != new:
                scalar = all(isinstance(v, (str, int, float, type(None))) and len(str(v)) < 100 for v in (old, new))
                changed.append(f"{key} {old} -> {new}" if scalar else key)
        return changed

    def check(self, overwrite: bool) -> None:
        changed = [] if overwrite else self.differences()
        if changed:
            raise ValueError(f"{self.path.parent}: holds results made with other settings ({'; '.join(changed)}); "
                             f"{REDO}")

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.settings, indent=2))


def file_identity(path: Path) -> dict:
    """What a record remembers of its input file: size, modification time and content hash."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


class RecordStore:
    """Per-image records and overlays under ``out_dir``, keyed by the image's relative name."""

    def __init__(self, out_dir: Path, root: Path):
        self.out_dir = out_dir
        self.root = root

    def record_path(self, rel: str) -> Path:
        return self.out_dir / "records" / f"{rel}.json"

    def overlay_path(self, rel: str) -> Path:
        """The overlay's JPEG; a JPEG input keeps its name, others get ``.jpg`` appended (``a.png`` ->
        ``a.png.jpg``), so ``a.png`` and ``a.tif`` in one folder never share an overlay."""
        name = rel if Path(rel).suffix.lower() in (".jpg", ".jpeg") else f"{rel}.jpg"
        return self.out_dir / "overlays" / name

    def status(self, path: Path) -> str | None:
        """``"new"`` without a record, ``"done"`` when the record was made from this very file
        (same size and modification time, or else the same content), else why it is stale."""
        record_file = self.record_path(relative_name(path, self.root))
        if not record_file.is_file():
            return "new"
        record = json.loads(record_file.read_text())
        stat = path.stat()
        if (record.get("size"), record.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return "done"
        # touched or copied, perhaps unchanged: only the content decides
        if record.get("sha256") and record["sha256"] == file_sha256(path):
            return "done"
        return "changed since its result was made"

    def save(self, record: dict) -> None:
        atomic_write_text(self.record_path(record["file"]), json.dumps(record, separators=(",", ":")))

    def forget(self, rel: str) -> None:
        """Drop an image's old result (its file could not be read this time: the old result must not
        pass for the new file)."""
        self.record_path(rel).unlink(missing_ok=True)
        self.overlay_path(rel).unlink(missing_ok=True)
        for crop in self.overlay_crops(rel):
            crop.unlink()

    def overlay_crops(self, rel: str) -> list[Path]:
        """The full-resolution crops written beside an image's overlay preview (``<overlay stem>.x<X>_y<Y><suffix>``)."""
        overlay = self.overlay_path(rel)
        pattern = re.compile(re.escape(overlay.stem) + r"\.x\d+_y\d+" + re.escape(overlay.suffix))
        return sorted(p for p in overlay.parent.glob(f"{glob.escape(overlay.stem)}.x*_y*{overlay.suffix}")
                      if pattern.fullmatch(p.name)) if overlay.parent.is_dir() else []

    def done_records(self, images: Sequence[Path]) -> Iterator[dict]:
        """The records of ``images`` that are done, in input order, one at a time."""
        for path in images:
            record_file = self.record_path(relative_name(path, self.root))
            if record_file.is_file():
                yield json.loads(record_file.read_text())


def stale_inputs_message(out_dir: str | os.PathLike, stale: Sequence[tuple[str, str]], shown: int = 5) -> str:
    """One line naming the inputs whose results in ``out_dir`` no longer match their file."""
    names = ", ".join(f"{rel} ({why})" for rel, why in stale[:shown])
    more = f" and {len(stale) - shown} more" if len(stale) > shown else ""
    return f"{out_dir}: {len(stale)} input file(s) differ from the ones its results were made from: {names}{more}; {REDO}"
