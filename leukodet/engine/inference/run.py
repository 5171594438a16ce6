"""``run_inference``: discover images -> skip those already done -> read + preprocess in loader
workers (the training mapper, from the checkpoint's run config) -> predict in batches at the
operating point -> one record and an overlay per image, written as it finishes -> one pass over all
the records through the folder-wide writers.

The records make the run resumable and keep memory flat: nothing accumulates between images, and
the folder-wide files are rebuilt from the records on every run, so they cover every image done,
in this run or before.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from tqdm import tqdm

from leukodet.config import Backend
from leukodet.data.catalog import class_colors, get_dataset_dicts, register_datasets, split_name
from leukodet.data.imageio import SLIDE_SUFFIXES, ImageReadError, image_size, read_image
from leukodet.data.via_export import mask_polygon
from leukodet.engine.data import make_loader
from leukodet.engine.evaluate import load_detector, operating_point, require_bias_per_class, run_config, with_tta
from leukodet.engine.inference.discovery import discover_images, relative_name
from leukodet.engine.inference.store import RecordStore, RunSettings, file_identity, stale_inputs_message
from leukodet.engine.inference.writers import (CocoResults, CountsCsv, DetectionsCsv, FolderSummary, GeoJsonFiles,
                                               ViaProject, write_errors)
from leukodet.engine.predictor import predict_original
from leukodet.engine.tiling import Tiling, run_tiling, scale_warning
from leukodet.evaluation.metrics import resolve_share_class
from leukodet.io import file_sha256
from leukodet.models.onnx_runtime import load_exported
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.report import write_inference_report
from leukodet.structures import ImagePredictions, OperatingPoint, crop_rle, mask_box
from leukodet.viz import busiest_windows, draw_predictions, write_rgb

logger = logging.getLogger(__name__)


class InferenceReader:
    """Loader-worker side: a file -> the model sample (training mapper) plus the picture to draw
    on; any failure becomes an ``{"error": ...}`` item, so one bad file never stops the run."""

    def __init__(self, preprocess_cfg, max_megapixels: float, with_display: bool, display_max_side: int = 4096,
                 by_region: bool = False):
        self.mapper = DatasetMapper(preprocess_cfg)
        self.max_pixels = max_megapixels * 1e6
        self.with_display = with_display
        self.display_max_side = display_max_side
        self.by_region = by_region  # tiled prediction: a TIFF is read tile by tile (DatasetMapper.map_regions)

    def __call__(self, path: Path) -> dict:
        try:
            identity = file_identity(path)  # before reading: a file replaced meanwhile is caught next run
            sample = self.mapper.map_regions(path) if self.by_region else None
            if sample is None and path.suffix.lower() in SLIDE_SUFFIXES:
                raise ImageReadError(f"{path}: a slide is only read by region, in tiles at the trained scale, which "
                                     "needs infer.tiling=true and a checkpoint that records its trained scale")
            if sample is None:  # read whole: the size cap keeps a huge file from exhausting memory
                width, height = image_size(path)
                if width * height > self.max_pixels:
                    raise ImageReadError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} MP, above "
                                         f"infer.max_megapixels={self.max_pixels / 1e6:g}; raise it, downscale the "
                                         "file or save it as a tiled TIFF (read by region when infer.tiling=true)")
                sample = self.mapper.map_image(path)
            sample["file_identity"] = identity
            if self.with_display:
                regions = sample.get("regions")
                sample["display"], sample["display_scale"] = (
                    regions.regions.preview(self.display_max_side) if regions is not None
                    else preview(read_image(path), self.display_max_side))
            return sample
        except Exception as err:  # noqa: BLE001 - reported per file in errors.csv, the run goes on
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            return {"file_name": str(path), "error": f"{type(err).__name__}: {message}"}


def preview(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` scaled down (INTER_AREA) so its longest side is at most ``max_side``, and the factor."""
    factor = min(1.0, max_side / max(image.shape[:2]))
    if factor == 1.0:
        return image, 1.0
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), factor


def write_overlay_crops(overlay: Path, sample: dict, prediction: ImagePredictions, class_names: Sequence[str],
                        colors, count: int, side: int) -> list[Path]:
    """Full-resolution crops beside an overlay drawn as a downscaled preview: the ``count``
    ``side``-px windows holding the most cells (``leukodet.viz.busiest_windows``), each with the
    cells that touch it, named ``<overlay stem>.x<X>_y<Y>.jpg`` by its top left in file pixels. The
    pixels are read by region where the file allows it, else the file is read once more."""
    windows = busiest_windows(prediction.boxes, sample["orig_width"], sample["orig_height"], side, count)
    if not windows:
        return []
    regions = sample.get("regions")
    whole = None if regions is not None else read_image(sample["file_name"])
    stem = overlay.name[:-len(overlay.suffix)]
    boxes, written = prediction.boxes, []
    for x0, y0, x1, y1 in windows:
        pixels = regions.regions.read(x0, y0, x1, y1) if regions is not None else whole[y0:y1, x0:x1]
        touching = np.nonzero((boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0))[0]
        drawn = draw_predictions(pixels, prediction.select(touching), class_names, colors, origin=(x0, y0))
        written.append(write_rgb(overlay.with_name(f"{stem}.x{x0}_y{y0}{overlay.suffix}"), drawn))
    return written


def loader_settings(infer_cfg: DictConfig, on_gpu: bool) -> tuple[int, int]:
    """(batch size, loader workers); null means the measured best (bench/bench_infer.py): on a GPU
    batches of 8 read ahead by up to 4 workers; on a CPU one image at a time (batching padded images
    was slower there) with one worker reading ahead."""
    batch_size = infer_cfg.batch_size or (8 if on_gpu else 1)
    num_workers = infer_cfg.num_workers if infer_cfg.num_workers is not None else (
        min(4, max(1, (os.cpu_count() or 2) - 1)) if on_gpu else 1)
    return batch_size, num_workers


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
            box = mask_box(rle)
            outline = mask_polygon(crop_rle(rle, box))  # by region: a full decode per cell is 36 MB at 36 MP
            row.update(area=int(mask_utils.area(rle)),
                       segmentation={"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                       polygon=None if outline is None else (outline + [max(box[0], 0), max(box[1], 0)]).tolist())
        else:
            row.update(area=round((x1 - x0) * (y1 - y0), 2), polygon=None)
        rows.append(row)
    return rows


def class_counts(detections: Sequence[dict], class_names: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(class_names, 0)
    for det in detections:
        counts[det["class"]] += 1
    return counts


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


def inference_detector(module, run_cfg: DictConfig):
    """What folder inference predicts with (``infer.backend``): the checkpoint's inference copy
    (BatchNorm folded, channels-last; ``DetectorAdapter.for_inference``) or its ONNX export, with
    flip test-time augmentation when ``eval.flip_tta`` is set; and the test-time RPN proposal
    counts it runs with (None: the model's own)."""
    threads, proposals = run_cfg.infer.threads, run_cfg.infer.get("rpn_proposals")
    if threads:
        torch.set_num_threads(threads)
    if Backend(run_cfg.infer.backend) is Backend.onnxruntime:
        if proposals is not None:
            raise ValueError("infer.rpn_proposals is for the torch backend; an ONNX export has its own "
                             "(tools/export.py ... export.rpn_proposals=[200,50])")
        detector = load_exported(run_cfg.ckpt, threads)
        proposals = detector.rpn_proposals
    else:
        proposals = None if proposals is None else [int(n) for n in proposals]
        detector = module.adapter.for_inference(None if proposals is None else tuple(proposals))
    return with_tta(run_cfg, detector), proposals


def predict_batch(adapter, samples: list[dict], point: OperatingPoint,
                  tiling: Tiling | None = None) -> list[ImagePredictions | str]:
    """Predictions for a batch; if the batch fails (say, out of memory on one huge image), each
    image is retried alone and a failure is returned as its error message."""
    try:
        return predict_original(adapter, samples, point, tiling)
    except RuntimeError:
        if len(samples) == 1:
            raise
    results: list[ImagePredictions | str] = []
    for sample in samples:
        try:
            results.extend(predict_original(adapter, [sample], point, tiling))
        except RuntimeError as err:
            results.append(f"RuntimeError: {sample['file_name']}: prediction failed: {err}")
    return results


def image_record(rel: str, path: Path, sample: dict, prediction: ImagePredictions, class_names: Sequence[str],
                 seconds: float, tiling: Tiling | None = None) -> dict:
    """What one image's results keep; ``cell_diameter_px``: the input cell size it was tiled at
    (None for whole images), which can differ per image (a file's own stated pixel size)."""
    detections = detection_rows(prediction, class_names)
    cell_px = None if tiling is None else round(tiling.cell_px_for(sample.get("record") or {}), 2)
    return {"file": rel, **sample["file_identity"], "width": sample["orig_width"], "height": sample["orig_height"],
            "counts": class_counts(detections, class_names), "seconds": round(seconds, 4),
            "cell_diameter_px": cell_px, "detections": detections}


def reusable_check(settings: RunSettings, store: RecordStore, images: Sequence[Path]) -> list[Path]:
    """The images still to do; refuses (ValueError naming what differs) when the folder's results
    were made with other settings or from input files that have changed since."""
    settings.check(overwrite=False)
    todo, stale = [], []
    for path in images:
        status = store.status(path)
        if status == "new":
            todo.append(path)
        elif status != "done":
            stale.append((relative_name(path, store.root), status))
    if stale:
        raise ValueError(stale_inputs_message(store.out_dir, stale))
    return todo


def training_records(run_cfg: DictConfig) -> list[dict]:
    """The run's training split (for checkpoints that predate the recorded trained scale)."""
    register_datasets(run_cfg.data)
    return get_dataset_dicts(split_name(run_cfg.data.name, "train"))


def run_inference(cfg: DictConfig, out_dir: str | os.PathLike) -> InferenceSummary:
    """`tools/infer.py`: predict every image under ``cfg.input`` with ``cfg.ckpt`` into
    ``out_dir`` (see the module doc for the files written)."""
    if not cfg.get("input"):
        raise ValueError("input=... is required: a folder of images (searched recursively) or one image file")
    run_cfg = run_config(cfg)
    infer_cfg = run_cfg.infer
    out_dir = Path(out_dir)
    root, images = discover_images(run_cfg.input)
    summary = InferenceSummary(out_dir, images=len(images))

    module = load_detector(run_cfg.ckpt)
    detector, proposals = inference_detector(module, run_cfg)
    class_names = list(module.hparams.class_names)
    share_class = resolve_share_class(run_cfg.eval.get("share_class"), class_names)
    point = operating_point(run_cfg)
    require_bias_per_class(point, class_names)
    tiling = run_tiling(run_cfg, module.hparams.get("trained_scale"), partial(training_records, run_cfg))
    backend = Backend(infer_cfg.backend)
    settings = RunSettings(out_dir, {
        "checkpoint": str(Path(run_cfg.ckpt).resolve()), "checkpoint_sha256": file_sha256(run_cfg.ckpt),
        "model": run_cfg.model.name, "backend": backend.value, "classes": class_names,
        "rpn_proposals": proposals, "flip_tta": bool(run_cfg.eval.get("flip_tta")),
        "min_confidence": point.min_confidence, "nms": point.nms, "max_detections": point.max_detections,
        "class_bias": list(point.class_bias) if any(point.class_bias) else None,  # None: as folders made before it
        "cross_class_nms": point.cross_class_nms,
        "thresholds_from": point.source,
        "tiling": None if tiling is None else tiling.as_dict(),
        "preprocess": OmegaConf.to_container(run_cfg.preprocess, resolve=True),
        "input": str(root.resolve())})
    store = RecordStore(out_dir, root)
    todo = images if infer_cfg.overwrite else reusable_check(settings, store, images)
    settings.save()  # only now: a refused run leaves the folder as it was
    batch_size, num_workers = loader_settings(infer_cfg, detector.device.type == "cuda")
    logger.info("%d images under %s; model %s (%s) on %s (batch %d, %d loader workers); %s", len(images), root,
                run_cfg.model.name, backend.value, detector.device, batch_size, num_workers, point.describe())
    if tiling is not None:
        logger.info("%s", tiling.describe())

    summary.skipped = len(images) - len(todo)
    if summary.skipped:
        logger.info("%d images already done in %s (infer.overwrite=true redoes them)", summary.skipped, out_dir)
    colors = class_colors(len(class_names))
    reader = InferenceReader(run_cfg.preprocess, infer_cfg.max_megapixels, infer_cfg.overlays,
                             infer_cfg.overlay_max_side, by_region=tiling is not None)
    loader = make_loader(todo, reader, batch_size, False, num_workers)
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(todo), desc="inference", unit="img") as bar:
        for batch in (loader if todo else []):
            batch_start = time.perf_counter()
            good = [s for s in batch if "error" not in s]
            outcomes = dict(zip((s["file_name"] for s in good), predict_batch(detector, good, point, tiling))) if good else {}
            per_image = (time.perf_counter() - batch_start) / max(len(batch), 1)
            for sample in batch:
                path = Path(sample["file_name"])
                rel = relative_name(path, root)
                outcome = sample.get("error") or outcomes[sample["file_name"]]
                if isinstance(outcome, str):
                    summary.errors.append((rel, outcome))
                    store.forget(rel)
                    tqdm.write(f"{rel}: skipped, {outcome}")
                else:
                    record = image_record(rel, path, sample, outcome, class_names, per_image, tiling)
                    if infer_cfg.overlays:  # the overlay first: the record's presence means the image is done
                        drawn = draw_predictions(sample["display"], outcome, class_names, colors,
                                                 sample["display_scale"])
                        write_rgb(store.overlay_path(rel), drawn)
                        for stale in store.overlay_crops(rel):  # an earlier result's, or another crop size's
                            stale.unlink()
                        if sample["display_scale"] < 1:
                            try:
                                write_overlay_crops(store.overlay_path(rel), sample, outcome, class_names, colors,
                                                    infer_cfg.overlay_crops, infer_cfg.overlay_crop_side)
                            except (OSError, ValueError) as err:  # the counts stand; only the crops are lost
                                tqdm.write(f"{rel}: warning: no full-resolution overlay crops ({err})")
                    store.save(record)
                    summary.processed += 1
                    stated = "" if tiling is None else tiling.stated_scale(sample.get("record") or {})
                    tqdm.write(f"{rel}: " + ", ".join(f"{c} {n}" for c, n in record["counts"].items())
                               + f" ({per_image:.2f} s{stated})")
                    warning = None if tiling is None else scale_warning(outcome, record["cell_diameter_px"])
                    if warning:
                        tqdm.write(f"{rel}: warning: {warning}")
                bar.update(1)
    summary.seconds = time.perf_counter() - start
    with ExitStack() as stack:
        writers = [stack.enter_context(writer) for writer in (
            CountsCsv(out_dir / "counts.csv", class_names, share_class, settings.settings),
            DetectionsCsv(out_dir / "detections.csv"),
            CocoResults(out_dir / "results_coco.json"),
            ViaProject(out_dir / "via_project.json", class_names, root),
            GeoJsonFiles(out_dir / "geojson", class_names, colors),
            FolderSummary(out_dir / "folders.csv", class_names, share_class, infer_cfg.flag_share))]
        for image_id, record in enumerate(store.done_records(images), start=1):
            for writer in writers:
                writer.add(image_id, record)
    write_errors(out_dir / "errors.csv", summary.errors)
    if infer_cfg.report:
        write_inference_report(out_dir)
    rate = f" ({summary.processed / summary.seconds:.2f} images/s)" if summary.processed else ""
    logger.info("%d images in %.1f s%s, %d already done, %d could not be processed%s", summary.processed,
                summary.seconds, rate, summary.skipped, len(summary.errors),
                f" (see {out_dir / 'errors.csv'})" if summary.errors else "")
    return summary
