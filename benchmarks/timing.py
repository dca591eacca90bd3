"""The clock of the benchmarks that time training (bench_callbacks, bench_faithfulness), chosen on
their command line (`--clock wall|process`), and a callback timing every training batch with it.
"""
from __future__ import annotations

import time

import lightning.pytorch as pl

#: wall time, or this process's CPU seconds (steadier on a shared, loaded machine with one thread)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """Time with `CLOCKS[name]` from now on."""
    global _clock
    _clock = CLOCKS[name]


def now() -> float:
    return _clock()


class BatchTimer(pl.Callback):
    """The time of every training batch (forward, backward, optimizer step) on the chosen clock."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(now() - self.start)
