"""Cross-validation (`tools/crossval.py`): k folds grouped by ``data.prepare.group_regex`` and
stratified by class, or leave one source (annotation file, i.e. acquisition) out. Each fold is a
training run in ``<out>/fold<i>/`` on data prepared with ``data.prepare.fold`` (its test split is the
held-out fold, train and val are split from the rest): it trains in the one loop (``fit``, which
also picks its checkpoint on val), chooses its operating point by a sweep on its own val split, and
scores the held-out fold once at that point. Nothing is chosen on a held-out fold.

``crossval.calibration.images`` > 0 adds what a lab could do on a new scanner: label a few of its
images and re-choose the operating point, class bias included, on them (``calibrate_fold``). The
figures then come from the held-out fold's other images only, beside the val-chosen point's on the
same images; with ``crossval.calibration.fine_tune.steps``, also the fold's model fine-tuned on them."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from leukodet.data.catalog import get_dataset_dicts, get_metadata, register_datasets, split_name
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.adapt import BOUNDARY_MOVES, boundary_shift, labelled_fine_tuning, moved_boundary
from leukodet.engine.evaluate import (bias_class, cached_raw_predictions, choose_on_val, load_detector,
                                      predict_split, score_split)
from leukodet.engine.module import DetectionModule
from leukodet.engine.train import RunConfigError, config_differences, fit
from leukodet.evaluation.metrics import evaluate, evaluate_by_source
from leukodet.evaluation.sweep import sweep
from leukodet.io import atomic_write_text
from leukodet.structures import RAW, OperatingPoint, refilter

matplotlib.use("Agg")
import matplotlib.pyplot as plt

logger = logging.getLogger(__name__)

FOLD_RESULT = "fold_result.json"  # written last: a fold with it is finished


def fold_count(cfg: DictConfig) -> int:
    """``crossval.k`` folds, or one per annotation file with ``crossval.by=source``."""
    return len(cfg.data.prepare.sources) if cfg.crossval.by == "source" else int(cfg.crossval.k)


def fold_config(cfg: DictConfig, index: int, fold_dir: Path) -> DictConfig:
    """The training config of fold ``index``: its own dataset name (catalog) and prepared splits in
    ``fold_dir``, whose test split is the held-out fold. ``crossval.folds`` (which folds this process
    runs) and ``crossval.calibration`` (an analysis of the finished fold) are dropped: they are not
    part of what a fold is."""
    fold = copy.deepcopy(cfg)
    with open_dict(fold):
        k = None if cfg.crossval.by == "source" else int(cfg.crossval.k)
        fold.data.name = f"{cfg.data.name}_cv{cfg.crossval.by}{fold_count(cfg)}_fold{index}"
        fold.data.prepared_dir = str(fold_dir / "prepared")
        fold.data.prepare.fold = {"k": k, "index": index, "by": str(cfg.crossval.by)}
        fold.train.run_dir = str(fold_dir)
        fold.eval.split = "test"
        fold.crossval.pop("folds")
        fold.crossval.pop("calibration", None)
    return fold


def finished_fold(fold_cfg: DictConfig, fold_dir: Path) -> dict | None:
    """A finished fold's row, when it was made with this config and budget; refuses one made with
    other settings (as a training run refuses to resume with them)."""
    done = fold_dir / FOLD_RESULT
    if not done.is_file():
        return None
    changed = config_differences(OmegaConf.load(fold_dir / "config.yaml"), fold_cfg)
    if changed:
        raise RunConfigError(f"{fold_dir}: this fold was run with other settings ({', '.join(changed[:8])} differ); "
                             f"give another output folder (hydra.run.dir=...) or delete {fold_dir}")
    row = json.loads(done.read_text())
    if row["max_steps"] != fold_cfg.train.max_steps:
        logger.info("fold %d was trained for %d steps; train.max_steps=%d continues it", row["fold"],
                    row["max_steps"], fold_cfg.train.max_steps)
        return None
    return row


def run_fold(cfg: DictConfig, index: int, out_dir: Path) -> dict:
    """Train, choose on val and score the held-out fold ``index`` (or return its finished row)."""
    fold_dir = out_dir / f"fold{index}"
    fold_cfg = fold_config(cfg, index, fold_dir)
    row = finished_fold(fold_cfg, fold_dir)
    if row is not None:
        logger.info("fold %d: finished earlier (%s), not redone", index, fold_dir / FOLD_RESULT)
        return row
    start = time.perf_counter()
    trained = fit(fold_cfg, fold_dir)  # resumes an interrupted fold from its last.ckpt
    train_seconds = time.perf_counter() - start
    module = load_detector(trained.best_checkpoint)
    max_detections = int(fold_cfg.eval.max_detections)
    point, chosen = choose_on_val(fold_cfg, module, trained.best_checkpoint, fold_dir)
    test = score_split(fold_cfg, module, trained.best_checkpoint, "test", point, fold_dir).summary()
    # the best F1 over the same grid on the held-out fold: what an oracle choice would give, shown
    # beside F1 at the chosen point to size the cost of choosing on val; never used to choose
    records, raw = cached_raw_predictions(fold_cfg, module, trained.best_checkpoint, "test")
    classes = get_metadata(split_name(fold_cfg.data.name, "test"))["thing_classes"]
    _, oracle = sweep(records, raw, classes, list(fold_cfg.eval.sweep_min_confidence), list(fold_cfg.eval.sweep_nms),
                      max_detections, "f1", iou_threshold=fold_cfg.eval.iou_threshold,
                      cross_class_nms=fold_cfg.eval.get("cross_class_nms"))
    counts = {f"test_{c}": sum(a["category_id"] == i for r in records for a in r["annotations"])
              for i, c in enumerate(classes)}
    row = {"fold": index, "by": str(cfg.crossval.by), "seed": int(cfg.seed), "max_steps": int(fold_cfg.train.max_steps),
           "train_images": get_metadata(split_name(fold_cfg.data.name, "train"))["num_images"],
           "val_images": get_metadata(split_name(fold_cfg.data.name, "val"))["num_images"],
           "test_images": len(records), **counts, "train_seconds": round(train_seconds, 1),
           "best_checkpoint": trained.best_checkpoint.name, f"best_{trained.best_metric}": trained.best_score,
           "min_confidence": point.min_confidence, "nms": point.nms, "class_bias": list(point.class_bias),
           "cross_class_nms": point.cross_class_nms, f"val_{chosen['metric']}": chosen["value"],
           **{key: value for key, value in test.items() if not key.startswith("count_bias")},
           "best_f1": oracle["value"], "best_f1_min_confidence": oracle["min_confidence"], "best_f1_nms": oracle["nms"]}
    atomic_write_text(fold_dir / FOLD_RESULT, json.dumps(row, indent=2))
    return row


def val_chosen_point(fold_cfg: DictConfig, row: dict) -> OperatingPoint:
    """A finished fold's operating point, chosen on its val split (``row``: its ``fold_result.json``;
    one written before the class bias was recorded there had none, and the fold's own NMS across classes)."""
    return OperatingPoint(row["min_confidence"], row["nms"], int(fold_cfg.eval.max_detections),
                          "chosen on val", tuple(row.get("class_bias") or ()),
                          row.get("cross_class_nms", fold_cfg.eval.get("cross_class_nms")))


def figures_by_source(cfg: DictConfig, out_dir: Path, row: dict) -> list[dict]:
    """A finished fold's held-out figures for each source (annotation file, i.e. acquisition) of its
    test split, at its val-chosen point: a pooled mean hides a hard acquisition when an easy one
    holds most images. From the cached raw predictions."""
    fold_cfg = fold_config(cfg, row["fold"], out_dir / f"fold{row['fold']}")
    ensure_prepared(fold_cfg.data)  # splits made before sources were recorded are made again
    checkpoint = Path(fold_cfg.train.run_dir) / "checkpoints" / row["best_checkpoint"]
    records, raw = cached_raw_predictions(fold_cfg, load_detector(checkpoint), checkpoint, "test")
    classes = get_metadata(split_name(fold_cfg.data.name, "test"))["thing_classes"]
    point = val_chosen_point(fold_cfg, row)
    table = evaluate_by_source(records, [refilter(r, point.scored()) for r in raw], classes,
                               min_confidence=point.min_confidence, iou_threshold=fold_cfg.eval.iou_threshold,
                               share_class=fold_cfg.eval.get("share_class"))
    table = table.drop(columns=[c for c in table if c.startswith("count_bias")])
    return table.rename(columns={"images": "test_images"}).assign(fold=row["fold"]).to_dict("records")


def calibration_draws(records: list[dict], n: int, draws: int, seed: int, fold: int) -> list[np.ndarray]:
    """``draws`` random sets of ``n`` image indices of ``records`` (fixed by seed and fold)."""
    if not 0 < n < len(records):
        raise ValueError(f"crossval.calibration.images={n}: give 1..{len(records) - 1} (fold {fold} holds out "
                         f"{len(records)} images; the rest are scored)")
    rng = np.random.default_rng([seed, fold])
    return [np.sort(rng.choice(len(records), n, replace=False)) for _ in range(draws)]


def first(value: float, grid) -> list[float]:
    """``grid`` with ``value`` moved (or added) to the front."""
    return [float(value)] + [float(v) for v in grid if float(v) != float(value)]


def calibrate_fold(cfg: DictConfig, index: int, out_dir: Path, row: dict) -> dict:
    """A finished fold recalibrated on ``crossval.calibration.images`` labelled images of its held-out
    fold: for each draw, the point (class bias, min confidence, NMS) with the best ``eval.sweep_metric``
    on them, scored on the other held-out images, with the val-chosen point (``row``) on those same
    images for comparison. With ``crossval.calibration.fine_tune.steps`` > 0, the fold's model is
    also fine-tuned on its train split plus the draw's labelled images (``fine_tune_on_draw``; runs
    in ``fold<i>/calibrated<n>_fine_tuned<steps>/draw<d>/``). Returns the fold's row of means over the
    draws (and the sd of F1 over them); writes every draw to ``fold<i>/calibrated<n>[_fine_tuned<steps>].csv``
    (``test_indices``: its calibration images, indices into the fold's test split)."""
    settings = cfg.crossval.calibration
    fold_dir = out_dir / f"fold{index}"
    fold_cfg = fold_config(cfg, index, fold_dir)
    register_datasets(fold_cfg.data)
    checkpoint = fold_dir / "checkpoints" / row["best_checkpoint"]
    module = load_detector(checkpoint)
    records, raw = cached_raw_predictions(fold_cfg, module, checkpoint, "test")
    classes = get_metadata(split_name(fold_cfg.data.name, "test"))["thing_classes"]
    val_point = val_chosen_point(fold_cfg, row)
    draws = []
    chosen_sets = calibration_draws(records, int(settings.images), int(settings.draws), int(cfg.seed), index)
    for draw, chosen in enumerate(chosen_sets):
        rest = np.setdiff1d(np.arange(len(records)), chosen)
        point, best = point_on_labelled(fold_cfg, [records[i] for i in chosen], [raw[i] for i in chosen], classes,
                                        val_point, settings.class_bias)
        scored = scored_on_rest(fold_cfg, [records[i] for i in rest], [raw[i] for i in rest], classes,
                                {"calibrated": point, "val_point": val_point})
        if fine_tune_steps(settings):
            scored.update(fine_tune_on_draw(fold_cfg, module, records, chosen, classes, val_point, settings,
                                            fold_dir / f"calibrated{calibration_suffix(settings)}" / f"draw{draw}"))
        draws.append({"fold": index, "draw": draw, "test_indices": " ".join(str(i) for i in chosen),
                      "class_bias": max(best["class_bias"], key=abs), "min_confidence": best["min_confidence"],
                      "nms": best["nms"], "cross_class_nms": best["cross_class_nms"],
                      f"calibration_{best['metric']}": best["value"], **scored})
    table = pd.DataFrame(draws)
    atomic_write_text(fold_dir / f"calibrated{calibration_suffix(settings)}.csv", table.to_csv(index=False))
    means = table.drop(columns=["draw", "test_indices", "cross_class_nms"]).mean(numeric_only=True).to_dict()
    spread = {f"{name}_f1_sd_draws": table[f"{name}_f1"].std(ddof=1) for name in
              ("calibrated", "fine_tuned", "fine_tuned_one_class", "fine_tuned_moved") if f"{name}_f1" in table}
    return {**means, "fold": index, "calibration_images": int(settings.images), "draws": len(table),
            "scored_images": len(records) - int(settings.images), **spread}


def fine_tune_steps(settings: DictConfig) -> int:
    """``crossval.calibration.fine_tune.steps`` (0: the folds are recalibrated, not fine-tuned)."""
    return int(settings.get("fine_tune", {}).get("steps", 0))


def calibration_suffix(settings: DictConfig) -> str:
    """``<n>`` or ``<n>_fine_tuned<steps>``: names a calibration's files, so a fine-tuned one keeps
    the cheaper one's beside it."""
    steps = fine_tune_steps(settings)
    return f"{settings.images}_fine_tuned{steps}" if steps else f"{settings.images}"


def point_on_labelled(fold_cfg: DictConfig, records: list[dict], raw: list, classes: list[str],
                      val_point: OperatingPoint, class_biases) -> tuple[OperatingPoint, dict]:
    """The point (class bias, min confidence, NMS) with the best ``eval.sweep_metric`` on a few
    labelled images, and the sweep's best row. A few images tie often: the sweep keeps the first
    best in grid order, so the val-chosen point (its bias, min confidence and NMS) comes first and
    wins its ties."""
    moved = bias_class(fold_cfg, classes)
    val_bias = val_point.class_bias[moved] if val_point.class_bias else 0.0
    max_detections = int(fold_cfg.eval.max_detections)
    _, best = sweep(records, raw, classes, first(val_point.min_confidence, fold_cfg.eval.sweep_min_confidence),
                    first(val_point.nms, fold_cfg.eval.sweep_nms), max_detections, fold_cfg.eval.sweep_metric,
                    iou_threshold=fold_cfg.eval.iou_threshold, class_biases=first(val_bias, class_biases),
                    bias_class=moved, cross_class_nms=fold_cfg.eval.get("cross_class_nms"))
    return OperatingPoint(best["min_confidence"], best["nms"], max_detections, class_bias=tuple(best["class_bias"]),
                          cross_class_nms=best["cross_class_nms"]), best


def scored_on_rest(fold_cfg: DictConfig, records: list[dict], raw: list, classes: list[str],
                   points: dict[str, OperatingPoint]) -> dict:
    """``CALIBRATED_FIGURES`` and count MAE per class of ``raw`` on ``records`` at each named point,
    as ``<name>_<figure>``."""
    scored = {}
    for name, at in points.items():
        result = evaluate(records, [refilter(r, at.scored()) for r in raw], classes, min_confidence=at.min_confidence,
                          iou_threshold=fold_cfg.eval.iou_threshold,
                          share_class=fold_cfg.eval.get("share_class")).summary()
        scored.update({f"{name}_{key}": value for key, value in result.items()
                       if key in CALIBRATED_FIGURES or key.startswith("count_mae_")})
    return scored


def fine_tune_on_draw(fold_cfg: DictConfig, module: DetectionModule, records: list[dict], chosen: np.ndarray,
                      classes: list[str], val_point: OperatingPoint, settings: DictConfig, tune_dir: Path) -> dict:
    """What a lab could do with its few labelled images beyond re-cutting: fine-tune the fold's model
    (``module``, trained with ``fold_cfg``) on its train split plus them (``adapt.labelled_fine_tuning``, ``settings.fine_tune``; the run in
    ``tune_dir``, reused when finished), then score the held-out fold's other images at the
    val-chosen point (``fine_tuned_*``). Not re-chosen on the labelled images: the tuned model has
    learnt them, so every point of the grid scores them alike and the tie goes to the val point. With
    ``settings.fine_tune.class_bias=otsu``, also at that point with the class boundary moved by the
    tuned model's margins on the other images (their labels unread) against its val split
    (``adapt.boundary_shift``): ``fine_tuned_moved_*``, and the shift in logits; and at the val point
    suppressing across classes as the moved one does, unmoved (``fine_tuned_one_class_*``)."""
    tuned = labelled_fine_tuning(fold_cfg, module, [records[i] for i in chosen], settings.fine_tune, tune_dir)
    rest = [records[i] for i in np.setdiff1d(np.arange(len(records)), chosen)]
    raw = predict_split(fold_cfg, tuned, rest, RAW, "raw predictions, fine-tuned")
    points, moved_by = {"fine_tuned": val_point}, {}
    if settings.fine_tune.class_bias == "otsu":  # as adapt.class_bias=otsu moves it; the rest's labels unread
        val = predict_split(fold_cfg, tuned, get_dataset_dicts(split_name(fold_cfg.data.name, "val")), RAW,
                            "class margins, val, fine-tuned")
        moved = bias_class(fold_cfg, classes)
        shift, measured = boundary_shift(val, raw, moved, classes, f"the {len(rest)} other held-out images")
        logger.info("fine-tuned, then %s", measured)
        points["fine_tuned_moved"] = moved_boundary(val_point, shift, moved, len(classes))
        # the moved point suppresses across classes too: this one does that alone, to tell the two apart
        points["fine_tuned_one_class"] = replace(val_point, cross_class_nms=points["fine_tuned_moved"].cross_class_nms)
        moved_by = {"fine_tuned_moved_shift": shift}
    return {**scored_on_rest(fold_cfg, rest, raw, classes, points), **moved_by}


# What a recalibrated fold reports (and count MAE per class), at its calibrated and its val-chosen point
CALIBRATED_FIGURES = ("f1", "precision", "recall", "detection_f1", "share_mae", "ap50_segm", "ap50_bbox")


def headline_columns(table: pd.DataFrame) -> list[str]:
    """The figures cross-validation reports: AP50, F1 at the chosen point, best F1, count MAE per class
    and the share error (for recalibrated folds each at the calibrated and at the val-chosen point,
    and fine-tuned where the fold was, with its boundary moved where it was)."""
    calibrated = ("calibrated_", "val_point_", "fine_tuned_", "fine_tuned_one_class_", "fine_tuned_moved_")
    prefixes = calibrated if "calibration_images" in table else ("",)
    figures = ["ap50_segm", "ap50_bbox", "f1", "precision", "recall", "best_f1", "detection_f1", "share_mae"]
    figures += sorted(c[len(prefixes[0]):] for c in table.columns if c.startswith(f"{prefixes[0]}count_mae_"))
    wanted = [f"{prefix}{figure}" for figure in figures for prefix in prefixes]
    return [c for c in wanted if c in table and table[c].notna().any()]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (n - 1) and fold count of each headline figure."""
    columns = headline_columns(table)
    return pd.DataFrame({"metric": columns, "mean": [table[c].mean() for c in columns],
                         "sd": [table[c].std(ddof=1) for c in columns], "folds": [int(table[c].notna().sum())
                                                                                 for c in columns]})


def plot_folds(table: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """Each headline figure per fold (dots) with its mean +- sd (bar)."""
    fig, ax = plt.subplots(figsize=(1.1 * len(summary) + 2, 4))
    for x, (metric, mean, sd) in enumerate(zip(summary.metric, summary["mean"], summary.sd)):
        ax.errorbar(x, mean, yerr=0 if math.isnan(sd) else sd, fmt="_", color="black", markersize=20, capsize=6)
        for _, fold in table.iterrows():
            ax.scatter(x + 0.12, fold[metric], s=18, color=f"C{int(fold['fold']) % 10}",
                       label=f"fold {int(fold['fold'])}" if x == 0 else None)
    ax.set_xticks(range(len(summary)), summary.metric, rotation=30, ha="right")
    ax.set(ylim=(0, 1.02), title=f"{len(table)} folds: each fold (dots), mean +- sd (bars)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cross_validate(cfg: DictConfig, out_dir: str | Path) -> pd.DataFrame:
    """Run ``crossval.folds`` (null: every fold) in ``out_dir``, then write ``folds.csv`` (a row per
    finished fold, those of other processes included), ``crossval_summary.csv`` (mean, sd, folds) and
    ``folds.png``, and log both tables; with ``crossval.calibration.images`` = n > 0, the recalibrated
    folds' ``folds_calibrated<n>.csv`` etc. instead (``folds_calibrated<n>_fine_tuned<steps>.csv`` with
    ``crossval.calibration.fine_tune.steps``). Returns the summary."""
    out_dir = Path(out_dir)
    k = fold_count(cfg)
    wanted = list(range(k)) if cfg.crossval.folds is None else [int(i) for i in cfg.crossval.folds]
    unknown = [i for i in wanted if not 0 <= i < k]
    if unknown:
        raise ValueError(f"crossval.folds={unknown}: this cross-validation has folds 0..{k - 1}")
    moving = cfg.crossval.calibration.fine_tune.class_bias
    if moving not in BOUNDARY_MOVES:
        raise ValueError(f"crossval.calibration.fine_tune.class_bias={moving}: use none or otsu")
    for index in wanted:
        logger.info("fold %d of %d (%s)", index, k, out_dir / f"fold{index}")
        run_fold(cfg, index, out_dir)
    rows = [json.loads(p.read_text()) for i in range(k) if (p := out_dir / f"fold{i}" / FOLD_RESULT).is_file()]
    calibration = int(cfg.crossval.get("calibration", {}).get("images", 0))
    suffix = f"_calibrated{calibration_suffix(cfg.crossval.calibration)}" if calibration else ""
    if calibration:
        rows = [calibrate_fold(cfg, row["fold"], out_dir, row) for row in rows]
    table = pd.DataFrame(rows)
    summary = summarize(table)
    atomic_write_text(out_dir / f"folds{suffix}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"crossval_summary{suffix}.csv", summary.to_csv(index=False))
    plot_folds(table, summary, out_dir / f"folds{suffix}.png")
    by_source = "" if calibration else log_by_source(cfg, out_dir, rows)
    point = ["calibration_images", "scored_images", "class_bias"] if calibration else ["test_images"]
    shown = ["fold", *point, "min_confidence", "nms", *headline_columns(table)]
    means = "\n".join(f"{r.metric}: {r['mean']:.3f} +- {r.sd:.3f} ({r.folds} folds)" for _, r in summary.iterrows())
    tuned = fine_tune_steps(cfg.crossval.calibration) if calibration else 0
    logger.info("%d of %d folds finished (%s, seed %s, %s steps%s)\n%s\n%s%s", len(table), k, cfg.crossval.by,
                cfg.seed, cfg.train.max_steps, f"; recalibrated on {calibration} held-out images"
                f"{f' (and fine-tuned on them, {tuned} steps)' if tuned else ''}, means of the draws"
                if calibration else "", table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"), means,
                by_source)
    return summary


def log_by_source(cfg: DictConfig, out_dir: Path, rows: list[dict]) -> str:
    """Every finished fold's figures per source (``figures_by_source``) into ``folds_by_source.csv``,
    their mean, sd and fold count per source into ``crossval_summary_by_source.csv``; returns the
    text that reports them beside the pooled figures."""
    table = pd.DataFrame([figures for row in rows for figures in figures_by_source(cfg, out_dir, row)])
    summary = pd.concat([summarize(group).assign(source=source) for source, group in table.groupby("source")],
                        ignore_index=True)[["source", "metric", "mean", "sd", "folds"]]
    atomic_write_text(out_dir / "folds_by_source.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "crossval_summary_by_source.csv", summary.to_csv(index=False))
    shown = ["fold", "source", "test_images", *headline_columns(table)]
    text = (f"\nper source (annotation file: an acquisition), at each fold's val-chosen point:\n"
            f"{table[shown].to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    if summary.folds.max() > 1:  # with one fold per source (leave one source out) the rows are the means
        means = summary.assign(value=[f"{m:.3f} +- {sd:.3f} ({n})" for m, sd, n in summary[["mean", "sd", "folds"]]
                                      .itertuples(index=False)])
        per_source = means.pivot(index="metric", columns="source", values="value")
        text += f"\nmean +- sd (folds) per source:\n{per_source.to_string()}"
    return text
