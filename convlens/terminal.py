"""What a run prints, and where: quiet on a normal run, progress in a log file, the run in train.log.

- `quiet_lightning()`: drops Lightning's "litlogger" tip and torch's `LeafSpec` FutureWarning
  (raised inside Lightning, nothing a user can act on);
- `progress_bar(...)`: the `callbacks.rich_progress_bar` entry: Rich's live bar when stdout is a
  terminal, else `LogProgress`, periodic log lines that a log file or `nohup` keeps;
- `ModelSummary`: Lightning's model summary without its FLOPs column (always 0: it needs an
  `example_input_array`), as log lines;
- `log_to_run_file()`: Lightning's own messages go to the run's `train.log` too (Lightning gives its
  logger a console handler of its own and stops it from reaching Hydra's file handler).
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar

log = logging.getLogger("convlens")

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


#: Lightning info lines that say nothing about the run: the "litlogger" advertisement, and the note
#: that our own ModelSummary (without the empty FLOPs column) replaces Lightning's default one
_NOISE = ("litlogger", "Skipping setting a default `ModelSummary`")


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in _NOISE)


def quiet_lightning() -> None:
    """Silence the messages of a normal run that say nothing about it (idempotent)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # resuming in place is guarded by convlens.jobs (a finished run is never overwritten by accident)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropTip())


def log_to_run_file() -> None:
    """Send Lightning's log records to the file handlers of the root logger (Hydra's `train.log`)
    as well as to Lightning's own console handler."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for h in files:
            if h not in logger.handlers:
                logger.addHandler(h)


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt_metrics(metrics: dict[str, Any], prefixes: tuple[str, ...]) -> str:
    items = []
    for k in sorted(metrics):
        if k.startswith(prefixes) and not k.endswith("_step"):
            try:
                items.append(f"{k}={float(metrics[k]):.4g}")
            except (TypeError, ValueError):
                continue
    return " ".join(items)


class LogProgress(ProgressBar):
    """Training progress as log lines (`convlens` logger: the console and train.log), for a stdout
    that is not a terminal: a line every `interval_s` seconds within an epoch (batches done, rate,
    time left in the epoch, the loss), and one at the end of each epoch with its validation
    metrics. It is a Lightning ProgressBar, so Lightning adds no bar of its own."""

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = float(interval_s)
        self._enabled = True
        self._epoch_start = self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _epochs(self, trainer: pl.Trainer) -> str:
        return f"{trainer.current_epoch + 1}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 \
            else str(trainer.current_epoch + 1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._last < self.interval_s:
            return
        self._last = now
        done, total = batch_idx + 1, self.total_train_batches
        rate = done / max(now - self._epoch_start, 1e-9)
        left = f", {_hms((total - done) / rate)} left in the epoch" if total not in (None, float("inf")) else ""
        pct = f" ({100 * done / total:.0f}%)" if total not in (None, 0, float("inf")) else ""
        loss = _fmt_metrics(trainer.progress_bar_metrics, ("train/",))
        log.info("Epoch %s: batch %d/%s%s, %.1f it/s%s%s", self._epochs(trainer), done,
                 total if total != float("inf") else "?", pct, rate, left, f", {loss}" if loss else "")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        took = time.monotonic() - self._epoch_start
        metrics = _fmt_metrics(trainer.callback_metrics, ("val/", "train/"))
        log.info("Epoch %s done in %s%s", self._epochs(trainer), _hms(took), f": {metrics}" if metrics else "")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            metrics = _fmt_metrics(trainer.callback_metrics, ("test/",))
            log.info("Test done%s", f": {metrics}" if metrics else "")


def progress_bar(refresh_rate: int = 10, log_interval_s: float = 30.0, leave: bool = False) -> ProgressBar:
    """The progress callback of `conf/callbacks/rich_progress_bar.yaml`: Rich's bar on a terminal,
    `LogProgress` lines otherwise."""
    if stdout_is_terminal():
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(refresh_rate=refresh_rate, leave=leave)
    return LogProgress(interval_s=log_interval_s)


class ModelSummary(_LightningModelSummary):
    """Lightning's model summary (name, type, parameters, mode per layer, then the totals) without
    the FLOPs column and total, as log lines."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int = 0, **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size, get_human_readable_count)

        cols = [(name, [str(v) for v in values]) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name)] + [len(v) for v in values]) for name, values in cols]
        rows = [" | ".join(name.ljust(w) for (name, _), w in zip(cols, widths))]
        rows.append("-" * len(rows[0]))
        for i in range(len(cols[0][1]) if cols else 0):
            rows.append(" | ".join(values[i].ljust(w) for (_, values), w in zip(cols, widths)))
        rows.append("-" * len(rows[0]))
        rows.append(f"{get_human_readable_count(trainable_parameters):<10} Trainable params")
        rows.append(f"{get_human_readable_count(total_parameters - trainable_parameters):<10} Non-trainable params")
        rows.append(f"{get_human_readable_count(total_parameters):<10} Total params")
        rows.append(f"{get_formatted_model_size(model_size):<10} Total estimated model params size (MB)")
        log.info("Model summary:\n%s", "\n".join(rows))
