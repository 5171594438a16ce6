"""``report.html`` for a training/evaluation run and for a folder-inference output, from the files
they leave (nothing is recomputed).

The pages open from disk on an offline machine: CSS and the one small script are inline, figures
and thumbnails are referenced by relative paths. Long tables (a gallery, 10,000 inferred images)
travel as compact JSON inside the page and are shown a page of rows at a time, so only that page's
thumbnails are ever in the document; thumbnails of inference overlays are made once and reused.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote

import cv2
import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from leukodet.io import atomic_write_bytes, atomic_write_text
from leukodet.report.gallery import GALLERY_CSV
from leukodet.structures import OperatingPoint, describe_tiling

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
THUMBS_DIR = "report_thumbs"  # inside an inference output folder
THUMBNAIL_WIDTH = 240
PAGE_SIZE = 50
MAX_ERRORS_SHOWN = 500
RESEARCH_NOTE = "research aid, not a diagnosis"
SETTINGS_SECTIONS = ("data", "preprocess", "model", "train", "eval")


def environment() -> Environment:
    return Environment(loader=PackageLoader("leukodet.report", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, path: Path, **context) -> Path:
    html = environment().get_template(template).render(generated=now_text(), **context)
    atomic_write_text(path, html)
    logger.info("report written to %s (%d kB)", path, len(html.encode()) // 1024)
    return path


def now_text() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a CSV as text, or ([], []) when the file is absent."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def url(target: Path, page_dir: Path) -> str:
    """``target`` relative to the page's folder, as a URL path (spaces, '#', '?' escaped)."""
    return quote(Path(os.path.relpath(target, page_dir)).as_posix())


def number(text: str | None):
    """A CSV cell as int or float for sorting in the page; None when empty or not a number."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if math.isnan(value):
        return None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def cell_text(text: str | None) -> str:
    """A metric as the printed table shows it: integers as they are, decimals to 4 places, "-"
    where a figure is undefined."""
    value = number(text)
    if value is None:
        return "-" if text in (None, "") or text.lower() == "nan" else text
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def flatten(settings, prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as (dotted key, value text) rows; lists of mappings (preprocessing steps)
    as one row per item."""
    if isinstance(settings, dict):
        rows = []
        for key, value in settings.items():
            rows += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(settings, list) and any(isinstance(item, dict) for item in settings):
        return [(f"{prefix}[{i}]", json.dumps(item)) for i, item in enumerate(settings)]
    return [(prefix, json.dumps(settings) if isinstance(settings, list) else str(settings))]


# ---------------------------------------------------------------- training / evaluation run


def operating_point(eval_settings: dict, gallery_rows: Sequence[dict],
                    point: OperatingPoint | None = None) -> list[tuple[str, str]]:
    """The point the metrics and gallery are at, and where it came from: ``point`` when the caller
    has it (an ``OperatingPoint``), else the eval settings, corrected by the min confidence the
    gallery was drawn at."""
    if point is not None:
        values = {"min confidence": point.min_confidence, "NMS": point.nms, "max detections": point.max_detections,
                  **({"class bias (logits)": list(point.class_bias)} if any(point.class_bias) else {})}
        source = point.source
    else:
        values = {"min confidence": eval_settings.get("min_confidence"), "NMS": eval_settings.get("nms"),
                  "max detections": eval_settings.get("max_detections")}
        source = "the eval settings of the run (config.yaml) or of this evaluation"
        drawn_at = gallery_rows[0]["min_confidence"] if gallery_rows else None
        if drawn_at is not None and number(drawn_at) != number(str(values["min confidence"])):
            values["min confidence"], source = drawn_at, "min confidence: the gallery's; the rest: " + source
    return [*((k, str(v)) for k, v in values.items()), ("matching IoU", str(eval_settings.get("iou_threshold"))),
            ("from", source)]


def eval_settings_of(run_config: dict, eval_dir: Path) -> dict:
    """The run's eval settings, with the values an evaluation command gave on top (tools/evaluate.py
    keeps its composed config in its Hydra folder; a null there means "not given")."""
    given = load_yaml(eval_dir / ".hydra" / "config.yaml").get("eval") or {}
    return {**run_config.get("eval", {}), **{k: v for k, v in given.items() if v is not None}}


def sweep_choice(run_dir: Path) -> list[tuple[str, str]]:
    """The sweep's best point beside the checkpoints (what tools/infer.py runs at), if any."""
    path = run_dir / "checkpoints" / "thresholds.json"
    if not path.is_file():
        return []
    best = json.loads(path.read_text())
    return [(key, str(value)) for key, value in best.items()]


def metrics_table(path: Path) -> dict:
    header, rows = read_csv(path)
    return {"columns": header, "rows": [[row[header[0]], *(cell_text(row[c]) for c in header[1:])] for row in rows]}


def count_errors(table: dict) -> list[dict]:
    """count MAE and bias per row of the metrics table (classes, all, any_cell)."""
    columns = table["columns"]
    if "count_mae" not in columns:
        return []
    mae, bias = columns.index("count_mae"), columns.index("count_bias")
    return [{"name": row[0], "mae": row[mae], "bias": row[bias]} for row in table["rows"]]


TABLE_SUMMARY_KEY = re.compile(r"^(detection_)?(precision|recall|f1|accuracy|count_mae|count_bias|ap(50)?_\w+)(_.*)?$")


def other_figures(metrics_json: Path) -> list[tuple[str, str]]:
    """The summary's figures that are not in the metrics table (share error, count accuracy,
    recall of touching vs isolated cells)."""
    if not metrics_json.is_file():
        return []
    summary = json.loads(metrics_json.read_text()).get("summary", {})
    return [(key, cell_text("" if value is None else str(value))) for key, value in summary.items()
            if not TABLE_SUMMARY_KEY.match(key)]


def figure(path: Path, page_dir: Path, title: str) -> dict | None:
    return {"src": url(path, page_dir), "title": title} if path.is_file() else None


def gallery_table(gallery_dir: Path, page_dir: Path) -> dict | None:
    header, rows = read_csv(gallery_dir / GALLERY_CSV)
    if not header:
        return None
    columns = [{"key": "image", "label": "image", "kind": "text"},
               {"key": "true_count", "label": "true cells", "kind": "number"},
               {"key": "predicted_count", "label": "predicted", "kind": "number"},
               {"key": "count_error", "label": "count error", "kind": "number"},
               {"key": "abs_error", "label": "|count error|", "kind": "number"},
               {"key": "n_fp", "label": "FP", "kind": "number"}, {"key": "n_fn", "label": "FN", "kind": "number"},
               {"key": "picture", "label": "ground truth | predictions", "kind": "picture"}]
    data = [[r["image"], number(r["true_count"]), number(r["predicted_count"]), number(r["count_error"]),
             abs(number(r["count_error"]) or 0), number(r["n_fp"]), number(r["n_fn"]),
             quote(Path(r["thumbnail"]).name) if r["thumbnail"] else None] for r in rows]
    base = url(gallery_dir, page_dir)
    return {"columns": columns, "rows": data, "page_size": PAGE_SIZE, "sort": "abs_error", "descending": True,
            "thumb_prefix": f"{base}/thumbs/", "full_prefix": f"{base}/full/", "filter": None,
            "csv": url(gallery_dir / GALLERY_CSV, page_dir)}


def headline(config: dict) -> list[tuple[str, str]]:
    """The settings one reads first: data, classes, preprocessing chain, model, schedule."""
    data, model, train = config.get("data", {}), config.get("model", {}), config.get("train", {})
    steps = [step.get("name", "?") for step in config.get("preprocess", {}).get("steps", [])]
    return [("data", f"{data.get('name', '?')} ({data.get('root', '?')})"),
            ("classes", ", ".join(data.get("prepare", {}).get("classes") or [])),
            ("preprocessing", " -> ".join(steps) or "-"),
            ("model", f"{model.get('name', '?')}, weights {model.get('weights', '?')}"),
            ("training", (f"{train.get('max_steps', '?')} steps of batch {train.get('batch_size', '?')}, "
                          f"lr {train.get('lr', '?')}"))]


def write_run_report(run_dir: str | os.PathLike, split: str = "test", eval_dir: str | os.PathLike | None = None,
                     point: OperatingPoint | None = None) -> Path:
    """``report.html`` for a training run: its settings, curves, the ``split``'s metrics, figures,
    count errors, sweep heatmaps and gallery. ``run_dir`` holds config.yaml, logs/ and checkpoints/;
    the evaluation files (``<split>_metrics.csv``, ``<split>_gallery/``, ``sweep_<split>_*``) are
    read from ``eval_dir`` (default: ``run_dir``, where training evaluates), and the page is
    written there. ``point``: the ``OperatingPoint`` the split was scored at, to show it with its
    source (else it is read from the settings). Returns its path."""
    run_dir = Path(run_dir)
    page_dir = Path(eval_dir) if eval_dir is not None else run_dir
    config = load_yaml(run_dir / "config.yaml")
    eval_settings = eval_settings_of(config, page_dir)
    _, gallery_rows = read_csv(page_dir / f"{split}_gallery" / GALLERY_CSV)
    table = metrics_table(page_dir / f"{split}_metrics.csv")
    figures = [figure(run_dir / "loss_curves.png", page_dir, "losses and validation metrics"),
               figure(page_dir / f"{split}_confusion.png", page_dir, "confusion matrix"),
               figure(page_dir / f"{split}_pr_curves.png", page_dir, "precision-recall curves")]
    # a sweep writes into its own command's folder: look there and in the run (training's sweep is on val)
    heatmaps = {p.name: p for folder in (run_dir, page_dir) for p in sorted(folder.glob("sweep_*_*.png"))}
    sweeps = [figure(p, page_dir, f"threshold sweep on {p.stem.removeprefix('sweep_').replace('_', ': ', 1)}")
              for p in heatmaps.values()]
    sweep_tables = sorted({*run_dir.glob("sweep_*.csv"), *page_dir.glob("sweep_*.csv")})
    files = [{"name": p.name, "href": url(p, page_dir)} for p in
             (page_dir / f"{split}_metrics.csv", page_dir / f"{split}_metrics.json",
              page_dir / f"{split}_counts_per_image.csv", *sweep_tables,
              run_dir / "logs" / "metrics.csv") if p.is_file()]
    return render("run.html.j2", page_dir / REPORT_NAME, run_dir=str(run_dir.resolve()), split=split,
                  headline=headline(config) if config else [],
                  settings=[(s, flatten(config[s])) for s in SETTINGS_SECTIONS if s in config],
                  operating_point=operating_point(eval_settings, gallery_rows, point),
                  sweep_choice=sweep_choice(run_dir),
                  metrics=table, count_errors=count_errors(table),
                  other_figures=other_figures(page_dir / f"{split}_metrics.json"),
                  figures=[f for f in figures if f], sweeps=[f for f in sweeps if f],
                  gallery=gallery_table(page_dir / f"{split}_gallery", page_dir), files=files)


# ---------------------------------------------------------------- folder inference


def ensure_thumbnail(source: Path, thumbnail: Path, width: int = THUMBNAIL_WIDTH) -> bool:
    """Write a ``width``-pixel-wide JPEG of ``source`` unless an up-to-date one exists; False when
    ``source`` cannot be read."""
    if thumbnail.is_file() and thumbnail.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return True
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        logger.warning("cannot read %s for a thumbnail", source)
        return False
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) if image.shape[1] > width else image
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        return False
    atomic_write_bytes(thumbnail, encoded.tobytes())
    return True


def overlay_of(out_dir: Path, image: str) -> str | None:
    """The overlay's path under overlays/ (a JPEG input keeps its name, others get .jpg
    appended), or None when overlays were not written."""
    for name in (image, f"{image}.jpg"):
        if (out_dir / "overlays" / name).is_file():
            return name
    return None


SECONDS = re.compile(rb'"seconds":\s*([0-9.eE+-]+)')


def record_seconds(path: Path) -> float | None:
    """The model time stored in one per-image record. Records also hold every mask, so only their
    head is read (whole records of 10,000 images take ~30 s to parse); a record laid out otherwise
    is parsed whole."""
    with path.open("rb") as handle:
        found = SECONDS.search(handle.read(4096))
    if found:
        return float(found.group(1))
    return json.loads(path.read_text()).get("seconds")


def timing(out_dir: Path) -> dict:
    seconds = [s for s in (record_seconds(p) for p in (out_dir / "records").rglob("*.json")) if s is not None]
    counts = out_dir / "counts.csv"
    finished = dt.datetime.fromtimestamp(counts.stat().st_mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    total = sum(seconds)
    return {"finished": finished, "model_seconds": f"{total:.1f}",
            "per_image": f"{total / len(seconds):.3f}" if seconds else "-",
            "images_per_second": f"{len(seconds) / total:.2f}" if total else "-"}


def flag_column(header: Sequence[str]) -> str | None:
    return next((c for c in header if c.startswith("share_above_")), None)


def folder_table(header: list[str], rows: list[dict]) -> dict:
    """folders.csv for the page: its columns, and which folders carry the flag."""
    flag = flag_column(header)
    shown = [c for c in header if c not in (flag, "note")]
    share = next((c for c in header if c.endswith("_share")), "share")
    return {"columns": shown, "flag_column": flag, "share_name": share.replace("_", " "),
            "threshold": flag.removeprefix("share_above_") if flag else None,
            "rows": [{"cells": [cell_text(r[c]) if c != "folder" else r[c] for c in shown],
                      "flagged": bool(flag) and r[flag] == "yes", "note": r.get("note", "")} for r in rows]}


def image_table(out_dir: Path, header: list[str], rows: Iterable[dict], flagged_folders: set[str],
                with_flag: bool) -> dict:
    """counts.csv for the page's paginated table; thumbnails of the overlays made as needed."""
    count_columns = [c for c in header if c.startswith("count_") or c == "total" or c.endswith("_share")]
    columns = [{"key": "image", "label": "image", "kind": "text"},
               *([{"key": "flagged", "label": "folder flag", "kind": "flag"}] if with_flag else []),
               *({"key": c, "label": c.removeprefix("count_"), "kind": "number"} for c in count_columns),
               {"key": "picture", "label": "overlay", "kind": "picture"}]
    data = []
    for row in rows:
        overlay = overlay_of(out_dir, row["image"])
        if overlay and not ensure_thumbnail(out_dir / "overlays" / overlay, out_dir / THUMBS_DIR / overlay):
            overlay = None
        folder = Path(row["image"]).parent.as_posix()
        data.append([row["image"], *([folder in flagged_folders] if with_flag else []),
                     *(number(row[c]) for c in count_columns), quote(overlay) if overlay else None])
    return {"columns": columns, "rows": data, "page_size": PAGE_SIZE, "sort": None, "descending": False,
            "thumb_prefix": f"{THUMBS_DIR}/", "full_prefix": "overlays/",
            "filter": {"key": "flagged", "label": "folder flag"} if with_flag else None, "csv": "counts.csv"}


def write_inference_report(out_dir: str | os.PathLike) -> Path:
    """``report.html`` in a tools/infer.py output folder: summary, per-folder table with the share
    flag, a sortable and filterable table of images with thumbnails linking to the overlays, and
    the errors. Returns its path."""
    out_dir = Path(out_dir)
    settings = json.loads((out_dir / "run.json").read_text())
    counts_header, counts = read_csv(out_dir / "counts.csv")
    folders_header, folders = read_csv(out_dir / "folders.csv")
    _, errors = read_csv(out_dir / "errors.csv")
    folder_info = folder_table(folders_header, folders)
    flagged = {r["folder"] for r, shown in zip(folders, folder_info["rows"]) if shown["flagged"]}
    images = image_table(out_dir, counts_header, counts, flagged, with_flag=folder_info["flag_column"] is not None)
    summary = [("images", str(len(counts))), ("could not be processed", str(len(errors))),
               ("input", settings.get("input", "?")), ("model", settings.get("model", "?")),
               ("checkpoint", settings.get("checkpoint", "?")), ("classes", ", ".join(settings.get("classes", []))),
               ("scale", describe_tiling(settings.get("tiling")))]
    point = [("min confidence", str(settings.get("min_confidence"))), ("NMS", str(settings.get("nms"))),
             ("max detections", str(settings.get("max_detections"))),
             *([("class bias (logits)", str(settings["class_bias"]))] if settings.get("class_bias") else []),
             ("from", settings.get("thresholds_from", "?"))]
    return render("inference.html.j2", out_dir / REPORT_NAME, out_dir=str(out_dir.resolve()), summary=summary,
                  operating_point=point, timing=timing(out_dir), folders=folder_info, images=images,
                  errors=errors[:MAX_ERRORS_SHOWN], errors_total=len(errors), research_note=RESEARCH_NOTE,
                  files=[{"name": n, "href": n} for n in ("counts.csv", "detections.csv", "folders.csv", "errors.csv",
                                                          "via_project.json", "results_coco.json", "run.json")
                         if (out_dir / n).is_file()])
