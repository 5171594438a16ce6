"""Evaluation outputs: the printed table, CSV/JSON files, confusion-matrix and PR-curve PNGs, all
written atomically (temp file + rename)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from leukodet.evaluation.metrics import EvaluationResult  # noqa: E402
from leukodet.io import atomic_write_bytes, atomic_write_text  # noqa: E402


def format_table(result: EvaluationResult) -> str:
    """The metrics table as text, 4 decimals, "-" where a figure is undefined or not computed."""
    return result.table.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")


def format_touching(result: EvaluationResult) -> str:
    """One line: detection recall of the cells that touch or overlap another vs the isolated ones."""
    extras = result.extras

    def part(name: str) -> str:
        recall = extras[f"detection_recall_{name}"]
        return f"{name} {extras[f'{name}_cells']} cells, found {'-' if math.isnan(recall) else f'{recall:.4f}'}"

    return f"recall by contact (class-agnostic): {part('touching')}; {part('isolated')}"


def save_figure(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_grid(values: np.ndarray, row_labels: Sequence, column_labels: Sequence, path: str | Path, *, title: str,
              xlabel: str, ylabel: str, cmap: str, number_format: str) -> Path:
    """A matrix as an annotated heatmap PNG (confusion matrix, sweep table)."""
    values = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.2 * len(column_labels) + 2.5, 0.9 * len(row_labels) + 1.8))
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set(xticks=range(len(column_labels)), yticks=range(len(row_labels)), xticklabels=list(column_labels),
           yticklabels=list(row_labels), xlabel=xlabel, ylabel=ylabel, title=title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, "-" if np.isnan(value) else number_format.format(value), ha="center", va="center",
                color="white" if value > middle else "black", fontsize=8)
    fig.colorbar(image)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(result: EvaluationResult, path: str | Path) -> Path:
    names = [*result.class_names, "background"]
    return plot_grid(result.confusion, names, names, path, title=f"confusion ({result.iou_type} matching)",
                     xlabel="predicted", ylabel="true", cmap="Blues", number_format="{:.0f}")


def plot_pr_curves(result: EvaluationResult, path: str | Path) -> Path:
    """Precision-recall per class at IoU 0.5 (COCO's 101 recall points), one panel per IoU type."""
    kinds = list(result.pr_curves)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    recall = np.linspace(0, 1, 101)
    for ax, kind in zip(axes[0], kinds):
        for name, precision in zip(result.class_names, result.pr_curves[kind]):
            valid = precision > -1
            if valid.any():
                ax.plot(recall[valid], precision[valid], label=name)
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"{kind} PR at IoU 0.5")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def json_safe(value):
    """NaN -> None, numpy scalars -> Python, so the JSON is valid (json.dumps would write NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and math.isnan(value) else value


def save_report(result: EvaluationResult, out_dir: str | Path, prefix: str = "") -> Path:
    """Write ``metrics.csv``, ``metrics.json`` (table + summary), ``counts_per_image.csv``,
    ``confusion.png`` and ``pr_curves.png`` into ``out_dir``, each name after ``prefix``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / f"{prefix}metrics.csv", result.table.to_csv())
    payload = {"iou_type": result.iou_type, "summary": result.summary(),
               "table": result.table.to_dict(orient="index"), "confusion": result.confusion.tolist(),
               "confusion_labels": [*result.class_names, "background"]}
    atomic_write_text(out_dir / f"{prefix}metrics.json", json.dumps(json_safe(payload), indent=2))
    atomic_write_text(out_dir / f"{prefix}counts_per_image.csv", result.per_image.to_csv(index=False))
    plot_confusion(result, out_dir / f"{prefix}confusion.png")
    plot_pr_curves(result, out_dir / f"{prefix}pr_curves.png")
    return out_dir
