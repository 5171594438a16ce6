"""Dataset preparation: read sources -> clean -> grouped stratified split -> train-only flips and
class balancing -> optional rescale -> one COCO JSON per split, with a summary and a skip report.

The split is hand-written (about 30 lines) because it must be grouped (a slide or patient never
spans two splits), stratified by class presence and split by ratios at once; scikit-learn's
StratifiedGroupKFold does k equal folds only, which is what a cross-validation fold
(``prepare.fold``) takes for its test split (``fold_split``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from leukodet.data.coco import load_dataset_dicts, write_coco
from leukodet.data.records import POINT, ImageRecord, Region, Skip
from leukodet.data.scale import check_um_per_px, scale_summary
from leukodet.data.sizes import SizeRule, assign_size_classes
from leukodet.data.via import AnnotationError, LabelPolicy, ParseResult, UnmappedLabelError
from leukodet.io import atomic_write_bytes, atomic_write_text
from leukodet.registry import DATASETS

logger = logging.getLogger(__name__)

FLIPS = {"x": 1, "y": 0, "xy": -1}  # cv2.flip codes: mirror on x (left-right), y (up-down), both


@dataclass
class Prepared:
    out_dir: Path
    split_files: dict[str, Path]
    summary: pd.DataFrame
    skips: list[Skip] = field(default_factory=list)


# ---------------------------------------------------------------- reading and cleaning


def read_sources(sources: Sequence[Mapping[str, Any]], labels: LabelPolicy,
                 min_area_inside: float | None = None) -> ParseResult:
    """Read every source (``{name: via|coco|<plugin>, path: ..., image_dir: ...}``, and its pixel
    size in micrometres, ``um_per_px``, where known: it goes with each of its records).

    A source file that cannot be read at all is reported as skipped and the others are still
    converted; only when no source can be read is that an error. ``min_area_inside`` (px²), when
    set, goes to every reader; unset, each keeps its default (a plugin need not take it).
    """
    result = ParseResult([], [])
    failures = []
    geometry = {} if min_area_inside is None else {"min_area_inside": min_area_inside}
    for source in sources:
        source = dict(source)
        um_per_px = check_um_per_px(source.pop("um_per_px", None), f"prepare source {source.get('path', '')}")
        try:
            parsed = DATASETS.build(source, labels=labels, **geometry)
        except UnmappedLabelError:
            raise
        except AnnotationError as err:
            failures.append(str(err))
            result.skips.append(Skip(str(source.get("path", "")), "", None, f"annotation file unreadable: {err}"))
            continue
        for record in parsed.records:
            record.um_per_px = um_per_px
        result.extend(parsed)
    if failures and len(failures) == len(sources):
        raise AnnotationError("no annotation file could be read:\n" + "\n".join(failures))
    for message in failures:
        logger.error("%s (skipped; the other files are converted)", message)
    return result


def file_hash(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def clean(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[Skip]]:
    """Drop images with no labelled region and exact duplicate images (same bytes), reporting each."""
    kept, skips, seen = [], [], {}
    for record in tqdm(records, desc="cleaning", unit="img", leave=False):
        if not record.regions:
            skips.append(Skip(record.source, record.file_name, None, "no labelled region", "clean"))
            continue
        digest = file_hash(record.file_name)
        if digest in seen:
            skips.append(Skip(record.source, record.file_name, None, "duplicate image (same content as a kept one)",
                              "clean", detail=f"same bytes as {seen[digest]}"))
            continue
        seen[digest] = record.file_name
        kept.append(record)
    return kept, skips


def assign_groups(records: Sequence[ImageRecord], group_regex: str | None) -> None:
    """Set each record's group from ``group_regex`` searched in its path (first capture group if
    any, else the whole match); no regex or no match: the image is its own group."""
    pattern = re.compile(group_regex) if group_regex else None
    unmatched = 0
    for record in records:
        match = pattern.search(Path(record.file_name).as_posix()) if pattern else None
        if match:
            record.group = match.group(1) if pattern.groups else match.group(0)
        else:
            record.group = record.file_name
            unmatched += pattern is not None
    if unmatched:
        logger.warning("group regex %r matched no group in %d of %d paths: each is its own group",
                       group_regex, unmatched, len(records))


# ---------------------------------------------------------------- split


def stratum(records: Sequence[ImageRecord], per_source: bool = False) -> tuple:
    """What a split is stratified by: the set of classes the records hold, and with ``per_source``
    the set of annotation files (acquisitions) they come from."""
    classes = tuple(sorted({r.label for rec in records for r in rec.regions}))
    return (tuple(sorted({rec.source for rec in records})), classes) if per_source else classes


def split_records(records: Sequence[ImageRecord], ratios: Mapping[str, float], seed: int = 0,
                  pinned: Mapping[str, str] | None = None, per_source: bool = False) -> dict[str, list[ImageRecord]]:
    """Seeded split by ``ratios`` (e.g. 0.7/0.2/0.1), grouped by ``record.group`` and stratified by
    the set of classes a group holds (``per_source``: and by its annotation file, so that every
    split, validation included, holds its share of each acquisition): within each stratum, each
    group goes to the split furthest below its share. ``pinned`` maps a split to a regex over the
    path: matching images go there first (e.g. hold out one scanner as the test set), the rest are
    split by ``ratios``."""
    pinned_out: dict[str, list[ImageRecord]] = {name: [] for name in (pinned or {})}
    rest = []
    for record in records:
        target = next((name for name, pattern in (pinned or {}).items()
                       if re.search(pattern, Path(record.file_name).as_posix())), None)
        (pinned_out[target] if target else rest).append(record)
    records = rest
    total = sum(ratios.values())
    shares = {name: ratios[name] / total for name in ratios}
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    strata: dict[tuple, list[str]] = {}
    for gid in sorted(groups):
        strata.setdefault(stratum(groups[gid], per_source), []).append(gid)
    rng = random.Random(seed)
    out: dict[str, list[ImageRecord]] = {name: [] for name in shares}
    for key in sorted(strata):
        gids = strata[key]
        rng.shuffle(gids)
        placed = Counter()
        for gid in gids:
            size = len(groups[gid])
            done = sum(placed.values()) + size
            target = max(shares, key=lambda s: shares[s] * done - placed[s])
            placed[target] += size
            out[target].extend(groups[gid])
    for name, part in pinned_out.items():
        out.setdefault(name, []).extend(part)
    for name, part in out.items():
        if not part and shares.get(name, 0) > 0:
            logger.warning("split %r is empty: too few groups (%d) for the ratios %s", name, len(groups), dict(ratios))
    return out


def fold_split(records: Sequence[ImageRecord], k: int | None, index: int, by: str = "group", seed: int = 0,
               per_source: bool = False) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(fold ``index``'s held-out records, the others) of a cross-validation. ``by="group"``: k folds
    by scikit-learn's StratifiedGroupKFold (seeded), grouped by ``record.group`` (no group in two
    folds) and stratified by each image's ``stratum``; ``by="source"``: leave one source out, fold
    ``index`` being the ``index``-th annotation file (k, when given, must be their number)."""
    if by == "source":
        sources = list(dict.fromkeys(rec.source for rec in records))
        if k is not None and k != len(sources):
            raise ValueError(f"prepare.fold.k={k} with by=source: the data has {len(sources)} sources "
                             f"({', '.join(sources)}); leave k null")
        if not 0 <= index < len(sources):
            raise ValueError(f"prepare.fold.index={index}: by=source has folds 0..{len(sources) - 1}")
        held_out = [rec.source == sources[index] for rec in records]
    elif by == "group":
        from sklearn.model_selection import StratifiedGroupKFold

        groups = [rec.group for rec in records]
        if not k or not 2 <= k <= len(set(groups)):
            raise ValueError(f"prepare.fold.k={k}: needs 2 <= k <= the number of groups ({len(set(groups))})")
        if not 0 <= index < k:
            raise ValueError(f"prepare.fold.index={index}: k={k} folds are 0..{k - 1}")
        labels = [repr(stratum([rec], per_source)) for rec in records]
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(records, labels, groups)
        test = set(list(folds)[index][1].tolist())
        held_out = [i in test for i in range(len(records))]
    else:
        raise ValueError(f"prepare.fold.by={by!r}: use group or source")
    pairs = list(zip(records, held_out))
    return [rec for rec, out in pairs if out], [rec for rec, out in pairs if not out]


# ---------------------------------------------------------------- geometry on disk


def _read_unchanged(path: str) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: cannot decode image")
    return image


def _write_like(source: str, image: np.ndarray, target: Path) -> None:
    suffix = Path(source).suffix.lower() or ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(suffix, image, params)
    if not ok:
        raise ValueError(f"{target}: cannot encode image as {suffix}")
    atomic_write_bytes(target, encoded.tobytes())


def flip_record(record: ImageRecord, flip: str, out_path: Path) -> ImageRecord:
    """Write the mirrored image and return its record with every shape mirrored the same way.

    Pixel i spans [i, i+1), so a mirrored coordinate is ``W - x`` (and ``H - y``).
    """
    _write_like(record.file_name, cv2.flip(_read_unchanged(record.file_name), FLIPS[flip]), out_path)
    size = np.array([record.width, record.height], float)
    axes = {"x": [True, False], "y": [False, True], "xy": [True, True]}[flip]
    regions = [Region(r.label, r.kind, np.where(axes, size - r.points, r.points)) for r in record.regions]
    return replace(record, file_name=str(out_path.resolve()), regions=regions)


def rescale_record(record: ImageRecord, factor: float, out_path: Path) -> ImageRecord:
    """Write the image scaled by ``factor`` (INTER_AREA) and scale its shapes to match."""
    width, height = max(1, round(record.width * factor)), max(1, round(record.height * factor))
    image = cv2.resize(_read_unchanged(record.file_name), (width, height), interpolation=cv2.INTER_AREA)
    _write_like(record.file_name, image, out_path)
    ratio = np.array([width / record.width, height / record.height])
    regions = [Region(r.label, r.kind, r.points * ratio) for r in record.regions]
    um_per_px = None if record.um_per_px is None else record.um_per_px * record.width / width
    return replace(record, file_name=str(out_path.resolve()), regions=regions, width=width, height=height,
                   um_per_px=um_per_px)


def derived_name(record: ImageRecord, tag: str) -> str:
    """A file name for a derived image that never collides: the same name can sit in two folders."""
    path = Path(record.file_name)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{path.stem}_{digest}{tag}{path.suffix}"


def _instance_counts(items: Sequence[ImageRecord]) -> Counter:
    return Counter(r.label for rec in items for r in rec.regions)


def balance_with_flips(train: Sequence[ImageRecord], flips: Sequence[str], balance: bool,
                       target_ratio: float, seed: int = 0) -> list[tuple[ImageRecord, str | None]]:
    """Choose (image, flip) pairs for the training set; flip None is the original.

    Without balancing every image gets every flip. With balancing, flips are spent on images
    holding the rarest class (most of it first) until rarest/commonest instances reach
    ``target_ratio``; if flips run out, images without the rarest class are dropped at random
    (seeded) until the ratio is reached.
    """
    chosen: list[tuple[ImageRecord, str | None]] = [(rec, None) for rec in train]
    if not balance:
        return chosen + [(rec, flip) for flip in flips for rec in train]
    counts = _instance_counts(train)
    if len(counts) < 2:
        return chosen
    (common, _), (rare, _) = counts.most_common()[0], counts.most_common()[-1]

    def ratio() -> float:
        return counts[rare] / max(counts[common], 1)

    holders = sorted((rec for rec in train if any(r.label == rare for r in rec.regions)),
                     key=lambda rec: -sum(r.label == rare for r in rec.regions))
    for flip in flips:
        for rec in holders:
            if ratio() >= target_ratio:
                return chosen
            chosen.append((rec, flip))
            counts.update(r.label for r in rec.regions)
    droppable = [i for i, (rec, _) in enumerate(chosen) if all(r.label != rare for r in rec.regions)]
    random.Random(seed).shuffle(droppable)
    dropped = set()
    for index in droppable:
        if ratio() >= target_ratio:
            break
        dropped.add(index)
        counts.subtract(r.label for r in chosen[index][0].regions)
    return [pair for i, pair in enumerate(chosen) if i not in dropped]


def source_groups(records: Sequence[ImageRecord]) -> list[list[ImageRecord]]:
    """``records`` grouped by annotation file, in first-seen order."""
    groups: dict[str, list[ImageRecord]] = {}
    for rec in records:
        groups.setdefault(rec.source, []).append(rec)
    return list(groups.values())


# ---------------------------------------------------------------- the whole preparation


def summarize(splits: Mapping[str, Sequence[ImageRecord]], classes: Sequence[str], stage: str) -> pd.DataFrame:
    rows = []
    for name, items in splits.items():
        counts = _instance_counts(items)
        rows.append({"split": name, "stage": stage, "images": len(items),
                     **{c: counts.get(c, 0) for c in classes}})
    return pd.DataFrame(rows)


def skips_table(skips: Sequence[Skip]) -> pd.DataFrame:
    return pd.DataFrame([vars(s) for s in skips], columns=["stage", "source", "file_name", "region", "reason", "detail"])


def log_skip_summary(skips: Sequence[Skip], csv_path: Path) -> None:
    if not skips:
        logger.info("nothing skipped")
        return
    table = skips_table(skips).groupby(["stage", "reason"]).size().rename("count").reset_index()
    logger.info("%d regions/images skipped (every one listed in %s):\n%s", len(skips), csv_path,
                table.to_string(index=False))


def write_scale(path: Path, split_files: Mapping[str, Path]) -> dict:
    """``scale.json``: each split's cell size per source (``leukodet.data.scale.scale_summary``), logged
    as a line per source of the training split (the scale a model trained on it learns)."""
    scale = {name: scale_summary(load_dataset_dicts(file)[0]) for name, file in split_files.items()}
    atomic_write_text(path, json.dumps(scale, indent=1))
    for source, row in scale.get("train", {}).items():
        size = "" if row["cell_um"] is None else f", {row['cell_um']:.1f} um at {row['um_per_px']:g} um/px"
        logger.info("cells of %s: median diameter %s px%s (%d cells; %s)", source or "the training split",
                    row["cell_px"], size, row["cells"], path.name)
    return scale


def prepare_dataset(sources: Sequence[Mapping[str, Any]], out_dir: str | Path, classes: Sequence[str] | None = None,
                    class_attribute: str = "class", class_map: Mapping[str, str | None] | None = None,
                    unmapped: str = "error", group_regex: str | None = None,
                    split: Mapping[str, float] | None = None, pinned: Mapping[str, str] | None = None,
                    seed: int = 0, split_per_source: bool = False, fold: Mapping[str, Any] | None = None,
                    flips: Sequence[str] = ("x", "y", "xy"), balance: bool | str = False, target_ratio: float = 1.0,
                    scale: float = 1.0, size_classes: Mapping[str, Any] | None = None,
                    min_area_inside: float | None = None) -> Prepared:
    """Run the whole preparation and write ``out_dir/{train,val,test}.json``, ``summary.csv``,
    ``scale.json`` and ``skipped.csv``. Returns the written paths and the summary table.

    ``size_classes`` (a ``SizeRule`` mapping, see ``leukodet.data.sizes``) relabels every cell by its
    area after the class map, in source pixels; ``classes`` then defaults to the rule's classes.
    Shapes are clipped to their image; ``min_area_inside`` (px², reader default 1) is the least area
    inside the image for a shape to be kept. ``fold`` (``{k, index, by}``, see ``fold_split``) makes
    the test split one cross-validation fold and splits the rest into the other splits' ratios."""
    if balance not in (True, False, "per_source"):
        raise ValueError(f"prepare.balance={balance!r}: use true, false or per_source")
    out_dir = Path(out_dir)
    labels = LabelPolicy(class_attribute, dict(class_map or {}), unmapped)
    size_rule = SizeRule.from_config(size_classes)
    parsed = read_sources(sources, labels, min_area_inside)
    box_only = parsed.box_only
    records, skips = clean(parsed.records)
    skips = parsed.skips + skips
    if size_rule:
        records = assign_size_classes(records, size_rule)
        classes = classes or size_rule.classes
    classes = list(classes) if classes else sorted({r.label for rec in records for r in rec.regions})
    unknown = {r.label for rec in records for r in rec.regions} - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in classes {classes}: add them to 'classes' "
                         "or map them in 'class_map'")
    assign_groups(records, group_regex)
    ratios = dict(split or {"train": 0.7, "val": 0.2, "test": 0.1})
    if fold:
        if pinned:
            raise ValueError("prepare.fold and prepare.pinned together: a fold is the test split; drop one")
        test, records_left = fold_split(records, fold.get("k"), fold["index"], fold.get("by", "group"), seed,
                                        split_per_source)
        parts = {**split_records(records_left, {s: r for s, r in ratios.items() if s != "test"}, seed,
                                 per_source=split_per_source), "test": test}
    else:
        parts = split_records(records, ratios, seed, pinned, split_per_source)
    summary = [summarize(parts, classes, "split")]

    image_dir = out_dir / "images"
    if scale != 1.0:
        parts = {name: [rescale_record(rec, scale, image_dir / name / derived_name(rec, ""))
                        for rec in tqdm(items, desc=f"rescaling {name}", unit="img")]
                 for name, items in parts.items()}
    if "train" in parts and (flips or balance):
        # per_source: balance each annotation file (an acquisition: scanner, stain) on its own, so
        # no acquisition's own class mix becomes a cue the model can learn
        groups = source_groups(parts["train"]) if balance == "per_source" else [parts["train"]]
        pairs = [pair for group in groups
                 for pair in balance_with_flips(group, list(flips), bool(balance), target_ratio, seed)]
        parts["train"] = [rec if flip is None else flip_record(
            rec, flip, image_dir / "train" / derived_name(rec, f"_flip{flip}"))
            for rec, flip in tqdm(pairs, desc="train flips", unit="img")]
        summary.append(summarize({"train": parts["train"]}, classes, "augmented"))

    split_files = {name: write_coco(out_dir / f"{name}.json", items, classes, box_only)
                   for name, items in parts.items()}
    table = pd.concat(summary, ignore_index=True)
    atomic_write_text(out_dir / "summary.csv", table.to_csv(index=False))
    write_scale(out_dir / "scale.json", split_files)
    atomic_write_text(out_dir / "skipped.csv", skips_table(skips).to_csv(index=False))
    point_note = " (count-only points)" if all(r.kind == POINT for rec in records for r in rec.regions) else ""
    logger.info("prepared %d images%s, classes %s, box_only=%s\n%s", len(records), point_note, classes, box_only,
                table.to_string(index=False))
    log_skip_summary(skips, out_dir / "skipped.csv")
    logger.info(parsed.describe_changes())
    return Prepared(out_dir, split_files, table, skips)
