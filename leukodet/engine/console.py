"""What a training prints: a progress line every N steps when the output is not a terminal (a log
file, CI, nohup: a redrawn bar shows nothing there), and none of the third-party notices that tell
a user nothing (Lightning's litlogger advert, a torch pytree deprecation inside Lightning)."""

from __future__ import annotations

import logging
import sys
import time
import warnings

import lightning as L

logger = logging.getLogger(__name__)


class DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_third_party_noise() -> None:
    """Drop notices about other packages' products and internals (idempotent)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessages) for f in rank_zero.filters):
        # an advert, and a note that the config's own limit_val_batches=1.0 was configured
        rank_zero.addFilter(DropMessages("litlogger", "was configured so 100% of the batches"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def output_is_terminal() -> bool:
    return sys.stderr.isatty()


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class LogProgress(L.Callback):
    """One log line every ``every_n_steps`` steps and at the last: step, loss, steps/s, ETA."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = max(1, every_n_steps)
        self.start: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, last = trainer.global_step, trainer.max_steps
        if step % self.every_n_steps and step != last:
            return
        seconds, first = time.perf_counter() - self.start[0], self.start[1]
        rate = (step - first) / seconds if seconds > 0 else 0.0
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        eta = f", ETA {format_seconds((last - step) / rate)}" if rate > 0 and last > 0 else ""
        logger.info("step %d/%d, loss %.4f, %.2f steps/s%s", step, last, float(loss), rate, eta)
