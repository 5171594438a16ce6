"""Whole-field inference: mosaics of 1, 2, 4, 8, 40, 400 fields of a split, their ground truth moved
along, predicted tiled at the trained scale (``leukodet.engine.tiling``; TIFFs read by region) and
squeezed whole (what inference did before), scored at one operating point against the same fields
one by one (the 1-field rows).

    python bench/bench_tiled_mosaic.py --ckpt RUN/checkpoints/best.ckpt --split test val \\
        --source dataset2 [--fields 1 2 4 8 40 400] [--resample 0.5 1 2] [--gap 0 1]

Each (size, gap, mode, resampling) runs in a fresh process, so its peak RSS is its own. Columns:
F1 and AP50 (segm, else bbox) at the point, cells found / true, class-agnostic cells missed (no
prediction at IoU >= 0.5) and counted twice (a second prediction at IoU >= 0.5 on a true cell),
predictions on no true cell ("extra", class-agnostic) and those of them at a field's edge (box
centre within ``--edge-band`` of it, as below: where a field's border cuts cells; a mosaic puts
those pieces beside another field, which no camera frame has; ``--gap 1`` puts a cell diameter of
background between fields), count error per field (|found - true| per class, summed, over the fields), throughput
(file megapixels/s), the child process's peak RSS, and the F1 and extra predictions (all, at the
edges) of the same fields predicted one by one (whole and tiled; the 1-field rows, so ``--fields`` must start with
1). ``f1_interior`` and ``f1_per_field_interior_tiled``: the same F1s over the cells away from the
fields' edges (``--edge-band``, 0.5 cell diameters: a field's border cuts the cells there, and a
mosaic puts those pieces beside another field's or the background, which no camera frame has;
seams between tiles fall anywhere, so these columns still hold every seam). ``*_cut_ignored``:
every true cell, and the predictions less those on no true cell whose box comes within ``--touch``
(0.1) cell diameters of a field's border: the labels leave out the cells a field's border cuts, so
those are ignored, as COCO ignores predictions in unlabelled regions (alone and in mosaics alike).
``--cell-diameter`` is the fields' scale given to the tiler, as a lab gives its microscope's
(default: the median equivalent diameter of the fields' own annotations, times the resampling).
``--sahi`` adds rows of SAHI's sliced prediction (``pip install sahi``) over the same
torchvision model, slices of the same size and overlap, its own merge (greedy non-maximum merging
at intersection-over-smaller 0.5, masks united), run at the operating point's min confidence
(SAHI cuts before it merges), images read whole. Not a timed test: the figures go in README with
the command.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leukodet.data.catalog import get_dataset_dicts, register_datasets, split_name  # noqa: E402
from leukodet.data.imageio import read_image  # noqa: E402
from leukodet.engine.evaluate import load_detector, operating_point, run_config  # noqa: E402
from leukodet.engine.predictor import predict_original  # noqa: E402
from leukodet.data.scale import cell_diameter  # noqa: E402
from leukodet.engine.tiling import Tiling, TrainedScale  # noqa: E402
from leukodet.evaluation.metrics import evaluate  # noqa: E402
from leukodet.preprocess.mapper import DatasetMapper  # noqa: E402


def grid_shape(fields: int) -> tuple[int, int]:
    """(columns, rows) of a mosaic of this many fields, as wide as or wider than high."""
    rows = int(math.floor(math.sqrt(fields)))
    while fields % rows:
        rows -= 1
    return fields // rows, rows


def moved(annotation: dict, dx: float, dy: float, factor: float) -> dict:
    x, y, w, h = annotation["bbox"]
    out = {**annotation, "bbox": [(x + dx) * factor, (y + dy) * factor, w * factor, h * factor],
           "area": annotation.get("area", w * h) * factor ** 2}
    if annotation.get("segmentation"):
        out["segmentation"] = [((np.asarray(p, np.float64).reshape(-1, 2) + (dx, dy)) * factor).ravel().tolist()
                               for p in annotation["segmentation"]]
    return out


def mosaic(records: list[dict], fields: int, start: int, factor: float, path: Path, gap: int = 0) -> dict:
    """Fields ``start ..`` (cycling over ``records``) side by side at their native pixels, each in a
    cell of the largest field's size (the rest: that field's border colour), ``gap`` px of
    background (the fields' median border colour) between neighbours, resampled by ``factor``;
    written as a tiled TIFF (read by region when predicted tiled). ``fields``: each field's (x0, y0,
    x1, y1), resampled."""
    import tifffile

    columns, rows = grid_shape(fields)
    cell_w, cell_h = max(r["width"] for r in records), max(r["height"] for r in records)
    canvas = np.zeros((rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap, 3), np.uint8)
    annotations, borders, placed = [], [], []
    for k in range(fields):
        record = records[(start + k) % len(records)]
        image = read_image(record["file_name"])
        x0, y0 = (k % columns) * (cell_w + gap), (k // columns) * (cell_h + gap)
        border = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
        borders.append(border)
        canvas[y0:y0 + cell_h, x0:x0 + cell_w] = border.astype(np.uint8)
        canvas[y0:y0 + image.shape[0], x0:x0 + image.shape[1]] = image
        annotations += [moved(a, x0, y0, factor) for a in record["annotations"]]
        placed.append([v * factor for v in (x0, y0, x0 + image.shape[1], y0 + image.shape[0])])
    if gap:  # the gaps: no field's pixel lies there
        background = np.median(borders, axis=0).astype(np.uint8)
        for c in range(1, columns):
            canvas[:, c * (cell_w + gap) - gap:c * (cell_w + gap)] = background
        for r in range(1, rows):
            canvas[r * (cell_h + gap) - gap:r * (cell_h + gap)] = background
    if factor != 1.0:
        size = (round(canvas.shape[1] * factor), round(canvas.shape[0] * factor))
        canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    tifffile.imwrite(path, canvas, tile=(256, 256), compression="zlib", photometric="rgb")
    return {"file_name": str(path), "image_id": start + 1, "width": canvas.shape[1], "height": canvas.shape[0],
            "annotations": annotations, "box_only": records[0].get("box_only", False), "fields": placed}


def predict_child(args: tuple) -> tuple[list, float, float]:
    """In a fresh process: predictions for the mosaic files, seconds, peak RSS (MB)."""
    ckpt, files, preprocess, tiling, point, threads = args
    torch.set_num_threads(threads)
    detector = load_detector(ckpt).adapter.for_inference()
    mapper = DatasetMapper(preprocess)
    predictions = []
    start = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            sample = (mapper.map_regions(path) if tiling else None) or mapper.map_image(path)
            predictions.append(predict_original(detector, [sample], point, tiling)[0])
    seconds = time.perf_counter() - start
    return predictions, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predict_sahi_child(args: tuple) -> tuple[list, float, float]:
    """``predict_child`` through SAHI's ``get_sliced_prediction``: the checkpoint's torchvision
    model, slices of ``tile`` px overlapping by ``overlap`` px, cut at ``point.min_confidence``."""
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    from leukodet.structures import ImagePredictions

    ckpt, files, preprocess, (tile, overlap), point, threads = args
    torch.set_num_threads(threads)
    module = load_detector(ckpt)
    model = module.adapter.model
    model.roi_heads.nms_thresh, model.roi_heads.detections_per_img = point.nms, point.max_detections
    names = {str(i + 1): name for i, name in enumerate(module.hparams.class_names)}  # torchvision's 0 is background
    sliced = AutoDetectionModel.from_pretrained(model_type="torchvision", model=model, device="cpu",
                                                confidence_threshold=point.min_confidence, category_mapping=names)
    mapper = DatasetMapper(preprocess)
    predictions = []
    start = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            image = mapper.map_image(path)["image"].permute(1, 2, 0).numpy()
            found = get_sliced_prediction(image, sliced, slice_height=tile, slice_width=tile,
                                          overlap_height_ratio=overlap / tile, overlap_width_ratio=overlap / tile,
                                          perform_standard_pred=False, verbose=0).object_prediction_list
            height, width = image.shape[:2]
            rles = [mask_utils.merge(mask_utils.frPyObjects(p.mask.segmentation, height, width)) for p in found]
            predictions.append(ImagePredictions(
                np.array([p.bbox.to_xyxy() for p in found], np.float32).reshape(-1, 4),
                np.array([p.score.value for p in found], np.float32),
                np.array([p.category.id - 1 for p in found], np.int64), rles))
    seconds = time.perf_counter() - start
    return predictions, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_field_interior(record: dict, centres: np.ndarray, band: float) -> np.ndarray:
    """Which of these (x, y) lie more than ``band`` px inside one of the record's fields."""
    fields = np.asarray(record["fields"], np.float64)[:, None, :]
    x, y = centres[None, :, 0], centres[None, :, 1]
    return ((x >= fields[..., 0] + band) & (x <= fields[..., 2] - band) & (y >= fields[..., 1] + band)
            & (y <= fields[..., 3] - band)).any(axis=0)


def on_true_cells(record: dict, prediction) -> np.ndarray:
    """(predictions, true cells): class-agnostic IoU >= 0.5 (masks where both have them, else boxes)."""
    truths = [mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], record["height"], record["width"]))
              if a.get("segmentation") else None for a in record["annotations"]]
    if not len(prediction) or not truths:
        return np.zeros((len(prediction), len(truths)), bool)
    if prediction.rles is not None and all(t is not None for t in truths):
        iou = mask_utils.iou(prediction.rles, truths, [0] * len(truths))
    else:
        xywh = [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in prediction.boxes]
        iou = mask_utils.iou(xywh, [a["bbox"] for a in record["annotations"]], [0] * len(truths))
    return np.asarray(iou).reshape(len(prediction), len(truths)) >= 0.5


def seam_errors(records: list[dict], predictions: list, min_confidence: float, band: float) -> dict:
    """Class-agnostic, at ``min_confidence``: true cells with no prediction at IoU >= 0.5
    (``missed``), extra predictions at IoU >= 0.5 on a true cell (``doubles``), predictions on no
    true cell (``extra``) and those of them whose box centre lies within ``band`` px of a field's
    edge (``extra_at_edges``: where a field's border cuts cells, alone or in a mosaic)."""
    counts = dict.fromkeys(("missed", "doubles", "extra", "extra_at_edges"), 0)
    for record, prediction in zip(records, predictions):
        kept = prediction.above(min_confidence)
        matches = on_true_cells(record, kept)
        hits = matches.sum(axis=0)
        counts["missed"] += int((hits == 0).sum())
        counts["doubles"] += int(np.clip(hits - 1, 0, None).sum())
        extra = ~matches.any(axis=1)
        counts["extra"] += int(extra.sum())
        centres = (kept.boxes[extra, :2] + kept.boxes[extra, 2:]) / 2
        counts["extra_at_edges"] += int((~in_field_interior(record, centres, band)).sum())
    return counts


def touches_field_border(record: dict, boxes: np.ndarray, reach: float) -> np.ndarray:
    """Which XYXY boxes come within ``reach`` px of one of the record's fields' borders, from
    either side (they meet the field grown by ``reach`` and do not lie inside it shrunk by ``reach``)."""
    fields, b = np.asarray(record["fields"], np.float64)[:, None, :], boxes[None].astype(np.float64)
    meets = ((b[..., 0] < fields[..., 2] + reach) & (b[..., 2] > fields[..., 0] - reach)
             & (b[..., 1] < fields[..., 3] + reach) & (b[..., 3] > fields[..., 1] - reach))
    inside = ((b[..., 0] >= fields[..., 0] + reach) & (b[..., 2] <= fields[..., 2] - reach)
              & (b[..., 1] >= fields[..., 1] + reach) & (b[..., 3] <= fields[..., 3] - reach))
    return (meets & ~inside).any(axis=0)


def without_cut_pieces(records: list[dict], predictions: list, reach: float) -> list:
    """The predictions less those on no true cell (IoU < 0.5 with every one, any class) whose box
    touches a field's border (``touches_field_border``). The labels leave out the cells a field's
    border cuts, so such a prediction is neither right nor wrong: it is ignored, as COCO ignores
    predictions in unlabelled (crowd) regions, for a field alone (its border is the image's edge)
    and in a mosaic alike. Every true cell stays, and so does any prediction on one (a cell counted
    twice still counts against F1)."""
    return [prediction.select(np.nonzero(on_true_cells(record, prediction).any(axis=1)
                                         | ~touches_field_border(record, prediction.boxes, reach))[0])
            for record, prediction in zip(records, predictions)]


def away_from_field_edges(records: list[dict], predictions: list, band: float) -> tuple[list, list]:
    """The records and predictions without what lies at a field's edge: true cells and predictions
    whose box centre is within ``band`` px of an edge of its field, or in no field. Those are the
    cells a field's border cuts, which a mosaic puts beside another field's or the background (no
    camera frame has them); the same rule holds for a field alone, so the two compare the cells
    that tiles and their seams see, wherever a seam falls."""
    kept_records, kept_predictions = [], []
    for record, prediction in zip(records, predictions):
        boxes = np.array([a["bbox"] for a in record["annotations"]], np.float64).reshape(-1, 4)
        truth = in_field_interior(record, boxes[:, :2] + boxes[:, 2:] / 2, band)
        kept_records.append({**record, "annotations": [a for a, k in zip(record["annotations"], truth) if k]})
        found = in_field_interior(record, (prediction.boxes[:, :2] + prediction.boxes[:, 2:]) / 2, band)
        kept_predictions.append(prediction.select(np.nonzero(found)[0]))
    return kept_records, kept_predictions


def score(records, predictions, classes, point, iou, band: float) -> dict:
    result = evaluate(records, predictions, classes, min_confidence=point.min_confidence, iou_threshold=iou)
    summary, per_image = result.summary(), result.per_image
    errors = sum((per_image[f"pred_{c}"] - per_image[f"true_{c}"]).abs().sum() for c in classes)
    return {"f1": summary["f1"], "ap50": summary.get("ap50_segm", summary.get("ap50_bbox")),
            "found": int(sum(per_image[f"pred_{c}"].sum() for c in classes)),
            "true": int(sum(per_image[f"true_{c}"].sum() for c in classes)),
            **seam_errors(records, predictions, point.min_confidence, band), "count_error": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--source", default=None, help="keep fields whose path contains this (one acquisition)")
    parser.add_argument("--fields", type=int, nargs="+", default=[1, 2, 4, 8, 40, 400])
    parser.add_argument("--whole-up-to", type=int, default=40, help="squeezed-whole rows only up to this many fields")
    parser.add_argument("--resample", type=float, nargs="+", default=[1.0])
    parser.add_argument("--cell-diameter", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sahi", action="store_true", help="add SAHI sliced-prediction rows (pip install sahi)")
    parser.add_argument("--cross-class-nms", type=float, default=None, help="the point's NMS across classes")
    parser.add_argument("--gap", type=float, nargs="+", default=[0.0],
                        help="background between neighbouring fields, in cell diameters (0: edge to edge)")
    parser.add_argument("--touch", type=float, default=0.1,
                        help="the *_cut_ignored columns: a prediction on no true cell whose box comes this many cell "
                             "diameters from a field's border is ignored")
    parser.add_argument("--edge-band", type=float, default=0.5,
                        help="the *_interior columns leave out what lies this many cell diameters from a field's edge")
    args = parser.parse_args()

    cfg = run_config(OmegaConf.create({"ckpt": args.ckpt, "eval": {}, "paths": {},
                                       "train": {"batch_size": 1, "num_workers": 0}}))
    register_datasets(cfg.data)
    records = [r for split in args.split for r in get_dataset_dicts(split_name(cfg.data.name, split))
               if args.source is None or args.source in r["file_name"]]
    module = load_detector(args.ckpt)
    classes = list(module.hparams.class_names)
    point = operating_point(cfg)
    if args.cross_class_nms is not None:
        point = replace(point, cross_class_nms=args.cross_class_nms)
    trained = TrainedScale(**module.hparams["trained_scale"])
    field_cell_px = args.cell_diameter or float(np.median([cell_diameter(a) for r in records for a in r["annotations"]]))
    print(f"{args.ckpt}: {len(records)} fields ({' + '.join(args.split)}, {args.source or 'all sources'}) of "
          f"{cfg.data.name}, cells {field_cell_px:.1f} px; trained at {trained.as_dict()}; {point.describe()}")
    preprocess = OmegaConf.to_container(cfg.preprocess, resolve=True)

    def figures(truths, found, cell_px):  # all cells; cut pieces ignored; as f1_interior, those away from the edges
        band = args.edge_band * cell_px
        ignored = score(truths, without_cut_pieces(truths, found, args.touch * cell_px), classes, point,
                        cfg.eval.iou_threshold, band)
        return {**score(truths, found, classes, point, cfg.eval.iou_threshold, band),
                "f1_cut_ignored": ignored["f1"], "ap50_cut_ignored": ignored["ap50"],
                "f1_interior": score(*away_from_field_edges(truths, found, band), classes, point,
                                     cfg.eval.iou_threshold, band)["f1"]}

    context = multiprocessing.get_context("spawn")
    rows, single = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in args.resample:
            cell_px = field_cell_px * factor
            tiling = Tiling(trained, cell_px)
            grid = tiling.for_sample({"scale": (1.0, 1.0)}).grid()  # SAHI's slices: our tiles
            for fields, gap in [(f, g) for f in args.fields for g in (args.gap if f > 1 else [0.0])]:
                count = max(1, math.ceil(len(records) / fields))  # every field used at least once
                gap_px = round(gap * field_cell_px)
                mosaics = [mosaic(records, fields, i * fields, factor,
                                  Path(tmp) / f"m{fields}_{factor}_{gap}_{i}.tif", gap_px) for i in range(count)]
                modes = [("tiled", predict_child, tiling, point.scored()), ("whole", predict_child, None, point.scored())]
                if args.sahi:
                    modes.append(("sahi", predict_sahi_child, (grid.tile, grid.overlap), point))
                for mode, child, used, cut in modes:
                    if mode == "whole" and fields > args.whole_up_to:
                        continue
                    with context.Pool(1) as pool:
                        predictions, seconds, peak = pool.apply(child, ((
                            args.ckpt, [m["file_name"] for m in mosaics], preprocess, used, cut, args.threads),))
                    row = {"resample": factor, "fields": fields, "gap_cells": gap, "mode": mode, "images": len(mosaics),
                           "size": f"{mosaics[0]['width']}x{mosaics[0]['height']}",
                           **figures(mosaics, predictions, cell_px),
                           "mp_per_s": sum(m["width"] * m["height"] for m in mosaics) / 1e6 / seconds,
                           "peak_rss_mb": peak}
                    row["count_error_per_field"] = row.pop("count_error") / (fields * len(mosaics))
                    if fields == 1:  # field i is mosaic i
                        single[(factor, mode)], single[factor] = predictions, mosaics
                    used_fields = [(i * fields + k) % len(records) for i in range(count) for k in range(fields)]
                    for reference in ("whole", "tiled"):  # the same fields predicted one by one, at this point
                        known = single.get((factor, reference))
                        alone = {} if known is None else figures([single[factor][i] for i in used_fields],
                                                                 [known[i] for i in used_fields], cell_px)
                        row[f"f1_per_field_{reference}"] = alone.get("f1")
                        row[f"extra_per_field_{reference}"] = alone.get("extra")
                        row[f"extra_at_edges_per_field_{reference}"] = alone.get("extra_at_edges")
                        if reference == "tiled":
                            row["f1_per_field_interior_tiled"] = alone.get("f1_interior")
                            row["f1_per_field_cut_ignored_tiled"] = alone.get("f1_cut_ignored")
                    rows.append(row)
                    print(pd.DataFrame([row]).to_string(index=False, header=len(rows) == 1, float_format="%.3f"),
                          flush=True)
    print("\n" + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
