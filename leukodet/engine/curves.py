"""Loss curves from the loop's metrics CSV (train vs validation loss, as the seed compares them)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_loss_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Train loss per logged step and validation loss per validation, in one PNG."""
    # every attempt of a resumed run is in the file (engine.train.KeepingCsvWriter): plot by step
    table = pd.read_csv(metrics_csv).sort_values("step", kind="stable")
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for column, style in (("train/loss", "-"), ("val/loss", "o-")):
        if column in table:
            rows = table[["step", column]].dropna()
            loss_ax.plot(rows["step"], rows[column], style, label=column)
    loss_ax.set(xlabel="step", ylabel="loss", title="losses")
    loss_ax.legend()
    for column in [c for c in table.columns if c.startswith("val/") and c != "val/loss"]:
        rows = table[["step", column]].dropna()
        if len(rows) and column.split("/")[1] in ("ap50_segm", "ap50_bbox", "f1", "recall", "precision"):
            metric_ax.plot(rows["step"], rows[column], "o-", label=column)
    metric_ax.set(xlabel="step", ylim=(0, 1.02), title="validation metrics")
    metric_ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
