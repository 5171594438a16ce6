"""One small writer per folder-wide output file of an inference run. Each is a context manager
fed ``add(image_id, record)`` for every image done, in input order, and writes its file atomically
on a clean exit, streaming (nothing accumulates but the per-folder totals)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from leukodet.data.via_export import ViaProjectWriter, region
from leukodet.io import atomic_open, atomic_write_text

RESEARCH_NOTE = "research aid, not a diagnosis"


def class_share(counts: dict[str, int], share_class: str | None) -> float | None:
    """``share_class``'s share of all cells; None without a share class or without cells."""
    total = sum(counts.values())
    return counts[share_class] / total if share_class is not None and total else None


def format_share(share: float | None) -> str:
    return "" if share is None else f"{share:.4f}"


class CsvWriter(AbstractContextManager):
    """A CSV file written row by row into a temp file, renamed over ``path`` on a clean exit."""

    def __init__(self, path: Path, header: Sequence[str]):
        self.path, self.header = path, list(header)

    def __enter__(self):
        self._file = atomic_open(self.path, "w", newline="")
        self.csv = csv.writer(self._file.__enter__())
        self.csv.writerow(self.header)
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


class CountsCsv(CsvWriter):
    """counts.csv: per image, its size, the count of each class, the total, the share class's
    share, and the operating point (class bias included), model and input cell diameter (px) that
    produced it (the image's own, else the run's: records from before it was kept per image)."""

    def __init__(self, path: Path, class_names: Sequence[str], share_class: str | None, settings: dict):
        self.class_names, self.share_class, self.settings = list(class_names), share_class, settings
        tiling = settings.get("tiling")  # the input scale predicted at; blank for whole images
        self.input_cell_px = "" if not tiling else round(tiling["input_cell_px"], 2)
        bias = settings.get("class_bias")  # e.g. "lymphocyte=4;other_wbc=0"; blank: none
        self.class_bias = ";".join(f"{c}={b:g}" for c, b in zip(class_names, bias)) if bias else ""
        super().__init__(path, ["image", "width", "height", *(f"count_{c}" for c in class_names), "total",
                                *([f"{share_class}_share"] if share_class else []), "min_confidence", "nms",
                                "class_bias", "model", "cell_diameter_px"])

    def add(self, image_id: int, record: dict) -> None:
        counts = record["counts"]
        share = [format_share(class_share(counts, self.share_class))] if self.share_class else []
        self.csv.writerow([record["file"], record["width"], record["height"], *counts.values(), sum(counts.values()),
                           *share, self.settings["min_confidence"], self.settings["nms"], self.class_bias,
                           self.settings["model"], record.get("cell_diameter_px", self.input_cell_px)])


class DetectionsCsv(CsvWriter):
    """detections.csv: one row per detection (class, score, XYWH box, area)."""

    def __init__(self, path: Path):
        super().__init__(path, ["image", "detection", "class", "score", "x", "y", "width", "height", "area"])

    def add(self, image_id: int, record: dict) -> None:
        for k, det in enumerate(record["detections"]):
            self.csv.writerow([record["file"], k, det["class"], det["score"], *det["bbox"], det["area"]])


class CocoResults(AbstractContextManager):
    """results_coco.json: COCO detection results (RLE masks), one JSON array streamed."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self._file = atomic_open(self.path, "w")
        self.out = self._file.__enter__()
        self.out.write("[")
        self.first = True
        return self

    def add(self, image_id: int, record: dict) -> None:
        for det in record["detections"]:
            result = {"image_id": image_id, "file_name": record["file"], "category_id": det["category_id"],
                      "bbox": det["bbox"], "score": det["score"]}
            if "segmentation" in det:
                result["segmentation"] = det["segmentation"]
            self.out.write(("" if self.first else ",\n") + json.dumps(result, separators=(",", ":")))
            self.first = False

    def __exit__(self, *exc):
        if exc[0] is None:
            self.out.write("]\n")
        return self._file.__exit__(*exc)


class ViaProject(AbstractContextManager):
    """via_project.json: the predictions as a VIA 2.x project to open, correct and feed back."""

    def __init__(self, path: Path, class_names: Sequence[str], image_root: Path):
        self.writer = ViaProjectWriter(path, class_names, image_root)

    def __enter__(self):
        self.writer.__enter__()
        return self

    def add(self, image_id: int, record: dict) -> None:
        regions = [region(d["class"], d["score"], d["bbox"], d["polygon"]) for d in record["detections"]]
        self.writer.add({"filename": record["file"], "size": record["size"], "regions": regions})

    def __exit__(self, *exc):
        return self.writer.__exit__(*exc)


class GeoJsonFiles(AbstractContextManager):
    """geojson/<image>.geojson: each image's cells as a GeoJSON FeatureCollection that QuPath imports
    (File > Import objects, or drag and drop) over the image: a detection per cell, its outline in
    file pixels, its class (name and colour) and score. Made from the record, so resumed images
    get theirs too; one file per image, as QuPath imports objects per image."""

    def __init__(self, out_dir: Path, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]):
        self.out_dir, self.colors = out_dir, dict(zip(class_names, colors))

    def add(self, image_id: int, record: dict) -> None:
        features = []
        for det in record["detections"]:
            if det.get("polygon"):
                ring = [list(map(int, p)) for p in det["polygon"]]
            else:
                x, y, w, h = det["bbox"]
                ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                             "properties": {"objectType": "detection",
                                            "classification": {"name": det["class"],
                                                               "color": list(self.colors[det["class"]])},
                                            "measurements": {"score": det["score"]}}})
        atomic_write_text(self.out_dir / f"{record['file']}.geojson",
                          json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")))

    def __exit__(self, *exc):
        return False


class FolderSummary(AbstractContextManager):
    """folders.csv: per subfolder (a patient or slide), images, cells per class, the total and,
    with a share class, the pooled share and a flag above ``flag_share``, a research aid."""

    def __init__(self, path: Path, class_names: Sequence[str], share_class: str | None, flag_share: float):
        self.path, self.class_names = path, list(class_names)
        self.share_class, self.flag_share = share_class, flag_share
        self.folders: dict[str, dict[str, int]] = {}

    def add(self, image_id: int, record: dict) -> None:
        folder = self.folders.setdefault(Path(record["file"]).parent.as_posix(),
                                         dict.fromkeys(["images", *self.class_names], 0))
        folder["images"] += 1
        for c in self.class_names:
            folder[c] += record["counts"][c]

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        share_columns = ([f"{self.share_class}_share", f"share_above_{self.flag_share:g}", "note"]
                         if self.share_class else [])
        with CsvWriter(self.path, ["folder", "images", *(f"count_{c}" for c in self.class_names), "total",
                                   *share_columns]) as out:
            for folder, totals in sorted(self.folders.items()):
                counts = {c: totals[c] for c in self.class_names}
                row = [folder, totals["images"], *counts.values(), sum(counts.values())]
                if self.share_class:
                    share = class_share(counts, self.share_class)
                    flagged = share is not None and share > self.flag_share
                    row += [format_share(share), "yes" if flagged else "no",
                            f"{self.share_class} share above {self.flag_share:.0%}: {RESEARCH_NOTE}" if flagged else ""]
                out.csv.writerow(row)
        return False


def write_errors(path: Path, errors: Sequence[tuple[str, str]]) -> None:
    """errors.csv: this run's files that could not be processed, and why (empty when none)."""
    with CsvWriter(path, ["image", "error"]) as out:
        out.csv.writerows(errors)
