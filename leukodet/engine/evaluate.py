"""Scoring a trained checkpoint: its run's config, its operating point, its cached raw predictions,
and the one route from predictions to figures (``score_split``) that training, ``tools/evaluate.py``,
count tables and benchmarks share."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from leukodet.data.catalog import get_dataset_dicts, get_metadata, split_name
from leukodet.data.imageio import read_image
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.data import make_loader
from leukodet.engine.module import DetectionModule
from leukodet.engine.predictor import predict_loader
from leukodet.engine.tiling import Tiling, run_tiling
from leukodet.evaluation.counts import CountTable, count_table
from leukodet.evaluation.metrics import EvaluationResult, evaluate, evaluate_by_source, resolve_share_class
from leukodet.evaluation.report import format_table, format_touching, save_report
from leukodet.report import write_gallery, write_run_report
from leukodet.evaluation.sweep import cache_key, load_raw, load_thresholds, plot_heatmap, save_raw, save_thresholds, sweep
from leukodet.io import UnreadableFileError, UnsafeFileError, atomic_write_text, load_tensor_file
from leukodet.models.tta import FlipTTA
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.structures import RAW, ImagePredictions, OperatingPoint, refilter
from leukodet.viz import draw_predictions, write_rgb

logger = logging.getLogger(__name__)

POINT_KEYS = ("min_confidence", "nms", "max_detections", "class_bias", "cross_class_nms")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not inside a leukodet run directory."""


def read_checkpoint(checkpoint: str | Path, map_location: Any = "cpu") -> dict:
    """A checkpoint's contents, loaded as data only (``leukodet.io.load_tensor_file``): a missing,
    empty, truncated or corrupt file, or one carrying Python objects that could run code when
    loaded, raises ``CheckpointError`` naming the file and what to do."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    try:
        return load_tensor_file(checkpoint, map_location)
    except UnsafeFileError as err:
        raise CheckpointError(f"{err}; use a checkpoint written by leukodet, or re-save this one's state_dict "
                              "in a session you trust") from None
    except UnreadableFileError as err:
        raise CheckpointError(f"{err}; copy the checkpoint again or use another one") from None


def load_detector(checkpoint: str | Path) -> DetectionModule:
    """The trained module from a Lightning checkpoint (read as data only, see ``read_checkpoint``),
    on the GPU when there is one, in eval mode."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = read_checkpoint(checkpoint, map_location=device)
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not hparams or "state_dict" not in state:
        raise CheckpointError(f"{checkpoint}: not a leukodet training checkpoint (no hyper_parameters or state_dict); "
                              "pass a run's checkpoints/best.ckpt or last.ckpt")
    module = DetectionModule(hparams["model_cfg"], hparams["optim_cfg"], hparams["class_names"], hparams["box_only"],
                             trained_scale=hparams.get("trained_scale"))
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval()


def run_config(cfg: DictConfig) -> DictConfig:
    """The checkpoint's training config (data, preprocessing, model, eval) with what this command
    sets: paths, ckpt, split, sweep, infer, loader settings, and the ``eval`` keys it gives a value
    (the checkpoint tools compose ``eval.min_confidence`` / ``nms`` / ``max_detections`` as null, so
    a value there came from the command line); with ``data_from=command`` its ``data`` too.
    Preprocessing can never differ from training."""
    if not cfg.get("ckpt"):
        raise CheckpointError("ckpt=... is required: a checkpoint inside a leukodet run directory")
    checkpoint = Path(cfg.ckpt)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    saved = checkpoint.parent.parent / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"{checkpoint}: no config.yaml two folders up ({saved}); a checkpoint must "
                              f"stay inside its leukodet run directory (<run>/checkpoints/<name>.ckpt)")
    trained = OmegaConf.load(saved)
    given_eval = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if v is not None}
    given = {"eval": given_eval, "paths": cfg.paths, "ckpt": cfg.ckpt, "sweep": cfg.get("sweep", False),
             "split": cfg.get("split"), "train": {"batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers}}
    if "infer" in cfg:
        given["infer"] = cfg.infer
    if "input" in cfg:
        given["input"] = cfg.input
    merged = OmegaConf.merge(trained, given)
    if cfg.get("data_from", "run") == "command":
        merged.data = cfg.data  # whole: none of the run's own data keys (sources, splits) carry over
    elif cfg.get("data_from", "run") != "run":
        raise CheckpointError(f"data_from={cfg.data_from}: give run (the checkpoint's own data) or command")
    # what this command gave, apart from the run's own values: operating_point() ranks them
    OmegaConf.update(merged, "command_point", {k: given_eval.get(k) for k in POINT_KEYS}, force_add=True)
    return merged


def operating_point(run_cfg: DictConfig) -> OperatingPoint:
    """The one place the operating point is decided, key by key: the command line, else
    ``thresholds.json`` beside the checkpoint (a sweep's best point), else the trained run's eval."""
    saved = load_thresholds(Path(run_cfg.ckpt).parent / "thresholds.json") or {}
    values, sources = {}, []
    for key in POINT_KEYS:
        if run_cfg.command_point.get(key) is not None:
            values[key], source = run_cfg.command_point[key], "command line"
        elif key in saved:
            values[key], source = saved[key], f"thresholds.json (best {saved.get('metric', '?')} on {saved.get('split', '?')})"
        elif run_cfg.eval.get(key) is not None:
            values[key], source = run_cfg.eval[key], "training run's eval"
        else:
            values[key], source = getattr(OperatingPoint(), key), "default"
        if source != "default" or key not in ("class_bias", "cross_class_nms"):  # off is not worth a word
            sources.append(f"{key} from {source}")
    across = values["cross_class_nms"]
    return OperatingPoint(float(values["min_confidence"]), float(values["nms"]), int(values["max_detections"]),
                          "; ".join(sources), tuple(float(b) for b in values["class_bias"]),
                          None if across is None else float(across))


def predict_split(cfg: DictConfig, module: DetectionModule, records: list[dict], prefilter: OperatingPoint,
                  desc: str) -> list[ImagePredictions]:
    """Predictions for ``records`` through the training mapper's preprocessing, cut at ``prefilter``."""
    loader = make_loader(records, DatasetMapper(cfg.preprocess), cfg.train.batch_size, False, cfg.train.num_workers)
    return [prediction for _, prediction in predict_loader(with_tta(cfg, module.adapter), loader, prefilter, desc=desc,
                                                           tiling=evaluation_tiling(cfg, module))]


def evaluation_tiling(cfg: DictConfig, module: DetectionModule) -> Tiling | None:
    """``eval.tiling``: score a split predicted in tiles at the trained scale, as inference predicts
    (the input scale from ``infer.cell_diameter_px``, else the training cells'); None: whole images."""
    return run_tiling(cfg, module.hparams.get("trained_scale"), enabled=bool(cfg.eval.get("tiling")))


def with_tta(cfg: DictConfig, detector):
    """``detector``, with horizontal-flip test-time augmentation when ``eval.flip_tta`` is set."""
    return FlipTTA(detector) if cfg.eval.get("flip_tta") else detector


def require_trained_classes(cfg: DictConfig, module: DetectionModule, split: str) -> None:
    """Refuses to score a split whose classes are not the checkpoint's (``data_from=command``), and
    a class bias without one value per class."""
    name = split_name(cfg.data.name, split)
    classes, trained = list(get_metadata(name)["thing_classes"]), list(module.hparams.class_names)
    if classes != trained:
        raise CheckpointError(f"{cfg.ckpt}: trained on classes {trained}, but {name} has {classes}; "
                              "score it on data with the same classes in the same order")
    require_bias_per_class(operating_point(cfg), trained)


def require_bias_per_class(point: OperatingPoint, class_names: Sequence[str]) -> None:
    if point.class_bias and len(point.class_bias) != len(class_names):
        raise CheckpointError(f"class bias {list(point.class_bias)} ({point.source}): give one value per class, "
                              f"in this order: {', '.join(class_names)}")


def cached_raw_predictions(cfg: DictConfig, module: DetectionModule, checkpoint: str | Path,
                           split: str) -> tuple[list[dict], list[ImagePredictions]]:
    """The split's raw predictions (``structures.RAW``) from the cache beside the checkpoint,
    computed once per checkpoint, split and preprocessing."""
    name = split_name(cfg.data.name, split)
    records = get_dataset_dicts(name)
    # keyed by the registered name, not the split alone: one checkpoint can score other datasets' splits
    tiling = evaluation_tiling(cfg, module)
    key = cache_key(checkpoint, name, {"preprocess": OmegaConf.to_container(cfg.preprocess, resolve=True),
                                       "flip_tta": bool(cfg.eval.get("flip_tta")),
                                       **({"tiling": tiling.as_dict()} if tiling else {})})  # old keys still hit
    path = Path(checkpoint).parent / "cache" / f"raw_{split}_{key}.npz"
    if path.is_file():
        try:
            return records, load_raw(path)["predictions"]
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:  # damaged, or not a cache: remake it
            logger.warning("%s: unreadable raw-prediction cache (%s); predicting again", path, err)
    raw = predict_split(cfg, module, records, RAW, f"raw predictions {name}")
    save_raw(path, raw, RAW.min_confidence, RAW.max_detections)
    logger.info("cached raw predictions: %s", path)
    return records, raw


def write_overlays(records: Sequence[dict], predictions: Sequence[ImagePredictions], meta: dict,
                   min_confidence: float, out_dir: Path, limit: int = 8) -> None:
    for record, prediction in list(zip(records, predictions))[:limit]:
        drawn = draw_predictions(read_image(record["file_name"]), prediction.above(min_confidence),
                                 meta["thing_classes"], meta["thing_colors"])
        write_rgb(out_dir / "overlays" / f"{Path(record['file_name']).stem}.jpg", drawn)


def score_split(cfg: DictConfig, module: DetectionModule, checkpoint: str | Path, split: str,
                point: OperatingPoint, out_dir: str | Path) -> EvaluationResult:
    """The one scoring route: the split's cached raw predictions cut at ``point`` (down to the
    scoring floor: AP over all scores, P/R/F1 and counts at the point's min confidence), scored at
    ``eval.iou_threshold``; writes ``<split>_metrics.{csv,json}``, the plots and a few overlays into
    ``out_dir`` and logs the table."""
    out_dir = Path(out_dir)
    name = split_name(cfg.data.name, split)
    records, raw = cached_raw_predictions(cfg, module, checkpoint, split)
    predictions = [refilter(r, point.scored()) for r in raw]
    meta = get_metadata(name)
    write_overlays(records, predictions, meta, point.min_confidence, out_dir)
    result = evaluate(records, predictions, meta["thing_classes"], min_confidence=point.min_confidence,
                      iou_threshold=cfg.eval.iou_threshold, share_class=cfg.eval.get("share_class"))
    save_report(result, out_dir, prefix=f"{split}_")
    if cfg.eval.report:
        write_gallery(records, predictions, meta["thing_classes"], point.min_confidence, cfg.eval.iou_threshold,
                      out_dir / f"{split}_gallery", max_thumbnails=cfg.eval.gallery_images)
    logger.info("%s: %d images, %s; %s IoU >= %g\n%s\n%s%s", name, len(records), point.describe(), result.iou_type,
                cfg.eval.iou_threshold, format_table(result), format_touching(result),
                score_by_source(cfg, records, predictions, meta["thing_classes"], point, out_dir / f"{split}_"))
    return result


BY_SOURCE_FIGURES = ("ap50_segm", "ap50_bbox", "f1", "precision", "recall", "detection_f1", "share_mae",
                     "count_accuracy")


def score_by_source(cfg: DictConfig, records: Sequence[dict], predictions: Sequence[ImagePredictions],
                    classes: Sequence[str], point: OperatingPoint, prefix: Path) -> str:
    """Where a split mixes sources (annotation files: acquisitions), the figures of each, written to
    ``<prefix>metrics_by_source.csv``; returns their table's text ("" for one source)."""
    if len({r.get("source", "") for r in records}) < 2:
        return ""
    table = evaluate_by_source(records, predictions, classes, min_confidence=point.min_confidence,
                               iou_threshold=cfg.eval.iou_threshold, share_class=cfg.eval.get("share_class"))
    atomic_write_text(prefix.with_name(f"{prefix.name}metrics_by_source.csv"), table.to_csv(index=False))
    figures = [c for c in table if (c in BY_SOURCE_FIGURES or c.startswith("count_mae_")) and table[c].notna().any()]
    text = table[["source", "images", *figures]].to_string(index=False, float_format=lambda v: f"{v:.4f}")
    return f"\nper source (an acquisition each):\n{text}"


# Splits an operating point may be chosen on: choosing on the split a model is scored on makes its
# score a best case (a 30-cell test split once chose this project's recipe; see README, Cross-validation).
CHOOSING_SPLITS = ("train", "val")


def bias_class(cfg: DictConfig, classes: Sequence[str]) -> int:
    """The class a sweep's ``class_bias`` values move: ``eval.share_class`` (default the first)."""
    share_class = resolve_share_class(cfg.eval.get("share_class"), classes)
    return classes.index(share_class) if share_class else 0


def sweep_split(cfg: DictConfig, module: DetectionModule, checkpoint: str | Path, split: str, out_dir: Path,
                max_detections: int):
    """Every point of the ``eval.sweep_*`` grid (the class bias on ``eval.share_class``) from the
    cached raw predictions; writes ``sweep_<split>.csv``, a heatmap at the best bias and
    ``thresholds.json`` (the best point, and the split it was chosen on) beside the checkpoint.
    Choosing on another split than train or val warns."""
    name = split_name(cfg.data.name, split)
    if split not in CHOOSING_SPLITS:
        logger.warning("choosing the operating point on the %r split: figures scored on it afterwards are a best "
                       "case, not a measurement; choose on val (the default) or by cross-validation", split)
    records, raw = cached_raw_predictions(cfg, module, checkpoint, split)
    metric = cfg.eval.sweep_metric
    classes = get_metadata(name)["thing_classes"]
    table, best = sweep(records, raw, classes, list(cfg.eval.sweep_min_confidence), list(cfg.eval.sweep_nms),
                        max_detections, metric, iou_threshold=cfg.eval.iou_threshold,
                        class_biases=list(cfg.eval.sweep_class_bias), bias_class=bias_class(cfg, classes),
                        cross_class_nms=cfg.eval.get("cross_class_nms"))
    atomic_write_text(out_dir / f"sweep_{split}.csv", table.to_csv(index=False))
    plot_heatmap(table, metric, out_dir / f"sweep_{split}_{metric}.png", max(best["class_bias"], key=abs))
    thresholds = save_thresholds(Path(checkpoint).parent / "thresholds.json",
                                 {**best, "max_detections": max_detections, "split": split})
    columns = ["class_bias", "cross_class_nms", "min_confidence", "nms", "precision", "recall", "f1",
               "ap50_segm" if "ap50_segm" in table else "ap50_bbox"]
    logger.info("%s\nbest %s = %.4f at min confidence %s, NMS %s, class bias %s, NMS across classes %s; saved %s",
                table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"), metric, best["value"],
                best["min_confidence"], best["nms"], best["class_bias"], best["cross_class_nms"], thresholds)
    return table, best


def choose_on_val(cfg: DictConfig, module: DetectionModule, checkpoint: str | Path,
                  out_dir: Path) -> tuple[OperatingPoint, dict]:
    """The operating point with the best ``eval.sweep_metric`` over the ``eval.sweep_*`` grid on the
    val split, and the sweep's best row (``sweep_split``: thresholds.json beside the checkpoint, so
    the checkpoint tools use it)."""
    max_detections = int(cfg.eval.max_detections)
    _, best = sweep_split(cfg, module, checkpoint, "val", out_dir, max_detections)
    return OperatingPoint(best["min_confidence"], best["nms"], max_detections, f"chosen on val (best {best['metric']})",
                          tuple(best["class_bias"]), best["cross_class_nms"]), best


def evaluate_checkpoint(cfg: DictConfig, out_dir: str | Path):
    """`tools/evaluate.py`: score ``ckpt`` on ``split`` (default ``eval.split``) at its operating
    point (see ``operating_point``), or with ``sweep=true`` choose the point over the
    ``eval.sweep_*`` grid on ``split`` (default ``val``: choices are never made on a test split)."""
    cfg = run_config(cfg)
    ensure_prepared(cfg.data)
    module = load_detector(cfg.ckpt)
    split = cfg.split or ("val" if cfg.sweep else cfg.eval.split)
    require_trained_classes(cfg, module, split)
    if cfg.sweep:
        return sweep_split(cfg, module, cfg.ckpt, split, Path(out_dir), operating_point(cfg).max_detections)
    point = operating_point(cfg)
    result = score_split(cfg, module, cfg.ckpt, split, point, out_dir)
    if cfg.eval.report:
        write_run_report(Path(cfg.ckpt).parent.parent, split, eval_dir=out_dir, point=point)
    return result


def count_table_checkpoint(cfg: DictConfig, out_dir: str | Path) -> CountTable:
    """`tools/count_table.py`: the count-accuracy table of ``ckpt`` on ``split`` at each
    ``eval.count_min_confidence`` (the operating point's NMS and cap), from the cached raw
    predictions; writes ``count_table_<split>.csv`` and ``count_summary_<split>.csv``."""
    cfg = run_config(cfg)
    out_dir = Path(out_dir)
    ensure_prepared(cfg.data)
    split = cfg.split or cfg.eval.split
    name = split_name(cfg.data.name, split)
    point = operating_point(cfg)
    module = load_detector(cfg.ckpt)
    require_trained_classes(cfg, module, split)
    records, raw = cached_raw_predictions(cfg, module, cfg.ckpt, split)
    table = count_table(records, raw, get_metadata(name)["thing_classes"], list(cfg.eval.count_min_confidence),
                        point.nms, point.max_detections, cfg.eval.iou_threshold, class_bias=point.class_bias,
                        cross_class_nms=point.cross_class_nms)
    atomic_write_text(out_dir / f"count_table_{split}.csv", table.per_image.to_csv(index=False))
    atomic_write_text(out_dir / f"count_summary_{split}.csv", table.summary.to_csv(index=False))
    logger.info("%s: %d images, count accuracy = min(segmented, true) / true, NMS %g\n%s", name, len(records),
                point.nms, table.format())
    return table
