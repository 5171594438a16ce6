"""Evaluation outputs: the printed table, CSV/JSON files and a confusion-matrix PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from leukodet.evaluation.metrics import EvaluationResult  # noqa: E402
from leukodet.io import atomic_write_text  # noqa: E402

TABLE_COLUMNS = ["tp", "fp", "fn", "precision", "recall", "f1", "accuracy", "count_mae", "count_bias",
                 "ap50_bbox", "ap50_segm", "ap_bbox", "ap_segm"]


def format_table(result: EvaluationResult) -> str:
    columns = [c for c in TABLE_COLUMNS if c in result.table]
    return result.table[columns].to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")


def plot_confusion(result: EvaluationResult, path: Path) -> Path:
    names = [*result.class_names, "background"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(result.confusion, cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=f"confusion ({result.iou_type} IoU >= 0.5)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    high = result.confusion.max() / 2 if result.confusion.size else 0
    for (i, j), value in np.ndenumerate(result.confusion):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > high else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pr_curves(result: EvaluationResult, path: Path) -> Path:
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
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_report(result: EvaluationResult, out_dir: str | Path, prefix: str = "") -> Path:
    """Write ``metrics.csv``, ``metrics.json`` (table + summary), ``counts_per_image.csv``,
    ``confusion.png`` and ``pr_curves.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / f"{prefix}metrics.csv", result.table.to_csv())
    payload = {"iou_type": result.iou_type, "summary": result.summary(),
               "table": json.loads(result.table.to_json(orient="index"))}
    atomic_write_text(out_dir / f"{prefix}metrics.json", json.dumps(payload, indent=2))
    atomic_write_text(out_dir / f"{prefix}counts_per_image.csv", result.per_image.to_csv(index=False))
    plot_confusion(result, out_dir / f"{prefix}confusion.png")
    plot_pr_curves(result, out_dir / f"{prefix}pr_curves.png")
    return out_dir
