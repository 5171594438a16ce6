"""Inference on a folder of smear images: overlays, per-image counts, per-detection results, a
per-folder summary and a VIA project to correct.

Flow: discover images -> skip those already done -> read + preprocess in loader workers (the
training mapper, from the checkpoint's run config) -> predict in batches -> one JSON record per
image (its detections, RLE masks and outlines) and an overlay, each written atomically as the
image finishes -> the folder-wide files, streamed from the records.

The per-image records make the run resumable (an image with a record is done) and keep memory
flat: nothing accumulates in memory between images, and the folder-wide files are rebuilt from
the records on every run, so they always cover every image done, in this run or before.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from tqdm import tqdm

from leukodet.data.catalog import class_colors
from leukodet.data.imageio import ImageReadError, image_size, read_image
from leukodet.data.mapper import DatasetMapper
from leukodet.data.via_export import mask_polygon, region, write_via_project
from leukodet.engine.data import make_loader
from leukodet.engine.evaluate import load_detector, run_config
from leukodet.engine.predictor import predict_original
from leukodet.evaluation.predictions import ImagePredictions
from leukodet.evaluation.sweep import load_thresholds
from leukodet.io import atomic_open, atomic_write_text
from leukodet.viz import draw_predictions, write_rgb

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
LYMPHOBLAST = "lymphoblast"
RESEARCH_NOTE = "research aid, not a diagnosis"


def discover_images(input_path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, images): every image under a folder, recursively, any letter case of the usual
    suffixes, sorted by relative path; or a single file (its folder is the root)."""
    path = Path(input_path).expanduser()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    images = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(path).as_posix())
    return path, images


@dataclass(frozen=True)
class Operating:
    """Thresholds the detector runs at, and where they came from (for the log and counts.csv)."""

    min_confidence: float
    nms: float
    max_detections: int
    source: str


def operating_point(run_cfg: DictConfig, infer_cfg: DictConfig) -> Operating:
    """``infer.min_confidence`` / ``infer.nms`` when given, else the checkpoint's
    ``thresholds.json`` (a sweep's best point), else the run's ``eval`` values."""
    saved = load_thresholds(Path(run_cfg.ckpt).parent / "thresholds.json")
    if saved is not None:
        base, source = saved, f"thresholds.json (best {saved.get('metric', '?')} on {saved.get('split', '?')})"
    else:
        base, source = run_cfg.eval, "the training run's eval config"
    overridden = [k for k in ("min_confidence", "nms") if infer_cfg.get(k) is not None]
    if overridden:
        source = f"{source}, overridden: {', '.join(f'infer.{k}' for k in overridden)}"
    return Operating(float(infer_cfg.min_confidence if infer_cfg.min_confidence is not None else base["min_confidence"]),
                     float(infer_cfg.nms if infer_cfg.nms is not None else base["nms"]),
                     int(run_cfg.eval.max_detections), source)


class InferenceReader:
    """Loader-worker side: a file -> the model sample (training mapper) plus the picture to draw
    on; any failure becomes an ``{"error": ...}`` item, so one bad file never stops the run."""

    def __init__(self, preprocess_cfg, max_megapixels: float, with_display: bool):
        self.mapper = DatasetMapper(preprocess_cfg)
        self.max_pixels = max_megapixels * 1e6
        self.with_display = with_display

    def __call__(self, path: Path) -> dict:
        try:
            width, height = image_size(path)
            if width * height > self.max_pixels:
                raise ImageReadError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} MP, above "
                                     f"infer.max_megapixels={self.max_pixels / 1e6:g}; raise it or downscale the file")
            sample = self.mapper.map_image(path)
            if self.with_display:
                sample["display"] = read_image(path)
            return sample
        except Exception as err:  # noqa: BLE001 - reported per file in errors.csv, the run goes on
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            return {"file_name": str(path), "error": f"{type(err).__name__}: {message}"}


def loader_settings(infer_cfg: DictConfig, on_gpu: bool) -> tuple[int, int]:
    """(batch size, loader workers); null means the measured best (bench/bench_infer.py): on a GPU
    batches of 8 read ahead by up to 4 workers; on a CPU one image at a time (batching padded images
    was slower there) with one worker reading ahead."""
    batch_size = infer_cfg.batch_size or (8 if on_gpu else 1)
    num_workers = infer_cfg.num_workers if infer_cfg.num_workers is not None else (
        min(4, max(1, (os.cpu_count() or 2) - 1)) if on_gpu else 1)
    return batch_size, num_workers


def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def record_path(out_dir: Path, rel: str) -> Path:
    return out_dir / "records" / f"{rel}.json"


def overlay_path(out_dir: Path, rel: str) -> Path:
    """The overlay's JPEG; a JPEG input keeps its name, others get ``.jpg`` appended (``a.png`` ->
    ``a.png.jpg``), so ``a.png`` and ``a.tif`` in one folder never share an overlay."""
    name = rel if Path(rel).suffix.lower() in (".jpg", ".jpeg") else f"{rel}.jpg"
    return out_dir / "overlays" / name


def detection_rows(prediction: ImagePredictions, class_names: Sequence[str]) -> list[dict]:
    """Per-detection results in file pixels: class, score, XYWH box, area (mask pixels, or the box
    area for box-only models), the RLE mask and the VIA outline."""
    rows = []
    for k in range(len(prediction)):
        x0, y0, x1, y1 = (float(v) for v in prediction.boxes[k])
        row = {"class": class_names[int(prediction.labels[k])], "category_id": int(prediction.labels[k]) + 1,
               "score": round(float(prediction.scores[k]), 4),
               "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]}
        if prediction.rles is not None:
            rle = prediction.rles[k]
            outline = mask_polygon(mask_utils.decode(rle))
            row.update(area=int(mask_utils.area(rle)),
                       segmentation={"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                       polygon=None if outline is None else outline.tolist())
        else:
            row.update(area=round((x1 - x0) * (y1 - y0), 2), polygon=None)
        rows.append(row)
    return rows


def class_counts(detections: Sequence[dict], class_names: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(class_names, 0)
    for det in detections:
        counts[det["class"]] += 1
    return counts


def lymphoblast_share(counts: dict[str, int]) -> float | None:
    """Lymphoblasts / all cells; None without a lymphoblast class or without cells."""
    total = sum(counts.values())
    return counts[LYMPHOBLAST] / total if LYMPHOBLAST in counts and total else None


@dataclass
class InferenceSummary:
    out_dir: Path
    images: int = 0  # found in the input
    processed: int = 0  # in this run
    skipped: int = 0  # done before
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.processed + self.skipped


class RunSettings:
    """``run.json``: what produced the records in an output folder. Records made by another
    checkpoint or operating point are never mixed with new ones."""

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


def predict_batch(adapter, samples: list[dict]) -> list[ImagePredictions | str]:
    """Predictions for a batch; if the batch fails (say, out of memory on one huge image), each
    image is retried alone and a failure is returned as its error message."""
    try:
        return predict_original(adapter, samples)
    except RuntimeError:
        if len(samples) == 1:
            raise
    results: list[ImagePredictions | str] = []
    for sample in samples:
        try:
            results.extend(predict_original(adapter, [sample]))
        except RuntimeError as err:
            results.append(f"RuntimeError: {sample['file_name']}: prediction failed: {err}")
    return results


def run_inference(cfg: DictConfig, out_dir: str | os.PathLike) -> InferenceSummary:
    """`tools/infer.py`: predict every image under ``cfg.input`` with ``cfg.ckpt`` into
    ``out_dir`` (see the module doc for the files written)."""
    if not cfg.get("ckpt"):
        raise ValueError("ckpt=... is required: a checkpoint inside a leukodet run directory")
    if not cfg.get("input"):
        raise ValueError("input=... is required: a folder of images (searched recursively) or one image file")
    infer_cfg = cfg.infer
    run_cfg = run_config(cfg)
    out_dir = Path(out_dir)
    root, images = discover_images(cfg.input)
    summary = InferenceSummary(out_dir, images=len(images))
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}, any case) under {root}")

    module = load_detector(run_cfg.ckpt)
    class_names = list(module.hparams.class_names)
    point = operating_point(run_cfg, infer_cfg)
    module.adapter.set_thresholds(point.min_confidence, point.nms, point.max_detections)
    settings = RunSettings(out_dir, {
        "checkpoint": str(Path(run_cfg.ckpt).resolve()), "model": run_cfg.model.name, "classes": class_names,
        "min_confidence": point.min_confidence, "nms": point.nms, "max_detections": point.max_detections,
        "thresholds_from": point.source, "preprocess": OmegaConf.to_container(run_cfg.preprocess, resolve=True),
        "input": str(root.resolve())})
    settings.check(infer_cfg.overwrite)
    settings.save()
    batch_size, num_workers = loader_settings(infer_cfg, module.device.type == "cuda")
    print(f"{len(images)} images under {root}; model {run_cfg.model.name} on {module.device} "
          f"(batch {batch_size}, {num_workers} loader workers); "
          f"min confidence {point.min_confidence}, NMS {point.nms} from {point.source}")

    todo = images if infer_cfg.overwrite else [p for p in images if not record_path(out_dir, relative_name(p, root)).is_file()]
    summary.skipped = len(images) - len(todo)
    if summary.skipped:
        print(f"{summary.skipped} images already done in {out_dir} (infer.overwrite=true redoes them)")
    colors = class_colors(len(class_names))
    reader = InferenceReader(run_cfg.preprocess, infer_cfg.max_megapixels, infer_cfg.overlays)
    loader = make_loader(todo, reader, batch_size, False, num_workers)
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(todo), desc="inference", unit="img") as bar:
        for batch in (loader if todo else []):
            batch_start = time.perf_counter()
            good = [s for s in batch if "error" not in s]
            outcomes = dict(zip((s["file_name"] for s in good), predict_batch(module.adapter, good))) if good else {}
            per_image = (time.perf_counter() - batch_start) / max(len(batch), 1)
            for sample in batch:
                path = Path(sample["file_name"])
                rel = relative_name(path, root)
                outcome = sample.get("error") or outcomes[sample["file_name"]]
                if isinstance(outcome, str):
                    summary.errors.append((rel, outcome))
                    forget(out_dir, rel)  # an old result of this file must not pass for the new one
                    tqdm.write(f"{rel}: skipped, {outcome}")
                else:
                    counts = save_image_result(out_dir, rel, path, sample, outcome, class_names, colors,
                                               per_image, infer_cfg.overlays)
                    summary.processed += 1
                    tqdm.write(f"{rel}: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + f" ({per_image:.2f} s)")
                bar.update(1)
    summary.seconds = time.perf_counter() - start
    write_folder_outputs(out_dir, root, images, class_names, settings.settings, infer_cfg.flag_share)
    write_errors(out_dir / "errors.csv", summary.errors)
    rate = f" ({summary.processed / summary.seconds:.2f} images/s)" if summary.processed else ""
    print(f"{summary.processed} images in {summary.seconds:.1f} s{rate}, "
          f"{summary.skipped} already done, {len(summary.errors)} could not be processed"
          + (f" (see {out_dir / 'errors.csv'})" if summary.errors else ""))
    return summary


def forget(out_dir: Path, rel: str) -> None:
    record_path(out_dir, rel).unlink(missing_ok=True)
    overlay_path(out_dir, rel).unlink(missing_ok=True)


def save_image_result(out_dir: Path, rel: str, path: Path, sample: dict, prediction: ImagePredictions,
                      class_names: Sequence[str], colors, seconds: float, overlays: bool) -> dict[str, int]:
    """The overlay, then the record (the record last: its presence means the image is done)."""
    detections = detection_rows(prediction, class_names)
    counts = class_counts(detections, class_names)
    if overlays:
        write_rgb(overlay_path(out_dir, rel), draw_predictions(sample["display"], prediction, class_names, colors))
    record = {"file": rel, "size": path.stat().st_size, "width": sample["orig_width"],
              "height": sample["orig_height"], "counts": counts, "seconds": round(seconds, 4), "detections": detections}
    atomic_write_text(record_path(out_dir, rel), json.dumps(record, separators=(",", ":")))
    return counts


def done_records(out_dir: Path, root: Path, images: Sequence[Path]) -> Iterator[dict]:
    """The records of the input's images that are done, in input order, one at a time."""
    for path in images:
        record_file = record_path(out_dir, relative_name(path, root))
        if record_file.is_file():
            yield json.loads(record_file.read_text())


def format_share(share: float | None) -> str:
    return "" if share is None else f"{share:.4f}"


def write_folder_outputs(out_dir: Path, root: Path, images: Sequence[Path], class_names: Sequence[str],
                         settings: dict, flag_share: float) -> None:
    """counts.csv, detections.csv, results_coco.json and via_project.json in one streamed pass
    over the records, then folders.csv; every file written atomically."""
    has_share = LYMPHOBLAST in class_names
    folders: dict[str, dict[str, int]] = {}
    count_header = ["image", "width", "height", *(f"count_{c}" for c in class_names), "total",
                    *(["lymphoblast_share"] if has_share else []), "min_confidence", "nms", "model"]
    with atomic_open(out_dir / "counts.csv", "w", newline="") as counts_file, \
            atomic_open(out_dir / "detections.csv", "w", newline="") as detections_file, \
            atomic_open(out_dir / "results_coco.json", "w") as coco_file:
        counts_csv, detections_csv = csv.writer(counts_file), csv.writer(detections_file)
        counts_csv.writerow(count_header)
        detections_csv.writerow(["image", "detection", "class", "score", "x", "y", "width", "height", "area"])
        coco_file.write("[")
        first = True

        def via_entries() -> Iterator[dict]:
            nonlocal first
            for image_id, record in enumerate(done_records(out_dir, root, images), start=1):
                counts = record["counts"]
                share = lymphoblast_share(counts)
                counts_csv.writerow([record["file"], record["width"], record["height"], *counts.values(),
                                     sum(counts.values()), *([format_share(share)] if has_share else []),
                                     settings["min_confidence"], settings["nms"], settings["model"]])
                folder = folders.setdefault(Path(record["file"]).parent.as_posix(), dict.fromkeys(["images", *class_names], 0))
                folder["images"] += 1
                for c in class_names:
                    folder[c] += counts[c]
                regions = []
                for k, det in enumerate(record["detections"]):
                    detections_csv.writerow([record["file"], k, det["class"], det["score"], *det["bbox"], det["area"]])
                    result = {"image_id": image_id, "file_name": record["file"], "category_id": det["category_id"],
                              "bbox": det["bbox"], "score": det["score"]}
                    if "segmentation" in det:
                        result["segmentation"] = det["segmentation"]
                    coco_file.write(("" if first else ",\n") + json.dumps(result, separators=(",", ":")))
                    first = False
                    regions.append(region(det["class"], det["score"], det["bbox"], det["polygon"]))
                yield {"filename": record["file"], "size": record["size"], "regions": regions}

        write_via_project(out_dir / "via_project.json", via_entries(), class_names, root)
        coco_file.write("]\n")
    write_folder_summary(out_dir / "folders.csv", folders, class_names, flag_share)


def write_folder_summary(path: Path, folders: dict[str, dict[str, int]], class_names: Sequence[str],
                         flag_share: float) -> None:
    """Per subfolder (a patient or slide): images, cells per class, total and, with a lymphoblast
    class, the pooled lymphoblast share and a flag above ``flag_share``, a research aid."""
    has_share = LYMPHOBLAST in class_names
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["folder", "images", *(f"count_{c}" for c in class_names), "total",
                         *(["lymphoblast_share", f"share_above_{flag_share:g}", "note"] if has_share else [])])
        for folder, totals in sorted(folders.items()):
            counts = {c: totals[c] for c in class_names}
            row = [folder, totals["images"], *counts.values(), sum(counts.values())]
            if has_share:
                share = lymphoblast_share(counts)
                flagged = share is not None and share > flag_share
                row += [format_share(share), "yes" if flagged else "no",
                        f"lymphoblast share above {flag_share:.0%}: {RESEARCH_NOTE}" if flagged else ""]
            writer.writerow(row)


def write_errors(path: Path, errors: Sequence[tuple[str, str]]) -> None:
    """errors.csv: this run's files that could not be processed, and why (empty when none)."""
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "error"])
        writer.writerows(errors)
