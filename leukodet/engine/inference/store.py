"""The resume store of a folder inference: ``run.json`` says what produced the results, and each
image done has a JSON record (written last, atomically: its presence means the image is done)
and an overlay. Results made with other settings are never mixed with new ones."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from leukodet.engine.inference.discovery import relative_name
from leukodet.io import atomic_write_text


class RunSettings:
    """``run.json``: what produced the records in an output folder."""

    KEYS = ("checkpoint", "classes", "min_confidence", "nms", "max_detections", "preprocess")

    def __init__(self, out_dir: Path, settings: dict):
        self.path = out_dir / "run.json"
        self.settings = settings

    def check(self, overwrite: bool) -> None:
        if overwrite or not self.path.is_file():
            return
        before = json.loads(self.path.read_text())
        changed = [k for k in self.KEYS if before.get(k) != self.settings.get(k)]
        if changed:
            raise ValueError(f"{self.path.parent} holds results made with other settings ({', '.join(changed)} "
                             f"differ); pass infer.overwrite=true to replace them, or infer.out_dir=... for a new folder")

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.settings, indent=2))


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

    def is_done(self, path: Path) -> bool:
        return self.record_path(relative_name(path, self.root)).is_file()

    def save(self, record: dict) -> None:
        atomic_write_text(self.record_path(record["file"]), json.dumps(record, separators=(",", ":")))

    def forget(self, rel: str) -> None:
        """Drop an image's old result (its file could not be read this time: the old result must not
        pass for the new file)."""
        self.record_path(rel).unlink(missing_ok=True)
        self.overlay_path(rel).unlink(missing_ok=True)

    def done_records(self, images: Sequence[Path]) -> Iterator[dict]:
        """The records of ``images`` that are done, in input order, one at a time."""
        for path in images:
            record_file = self.record_path(relative_name(path, self.root))
            if record_file.is_file():
                yield json.loads(record_file.read_text())
