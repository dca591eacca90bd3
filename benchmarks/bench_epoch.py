"""Seconds per training epoch of an experiment on this machine (callbacks off, validation off),
from the first `--batches` batches, scaled to the full epoch.

    DATA_DIR=../shared/datasets python benchmarks/bench_epoch.py experiment=cifar10_convnet --batches 200
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


import lightning.pytorch as pl
from hydra.utils import instantiate

from convlens.config import compose_config as compose_cfg

from results_json import Report

ROOT = Path(__file__).resolve().parents[1]


class BatchTimer(pl.Callback):
    def __init__(self, skip: int = 5):
        self.skip, self.times, self.t0 = skip, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self.t0)


def main():
    report = Report("epoch")
    p = argparse.ArgumentParser()
    p.add_argument("overrides", nargs="*", default=["experiment=cifar10_convnet"])
    p.add_argument("--batches", type=int, default=200)
    a = p.parse_args()
    cfg = compose_cfg(a.overrides + ["callbacks=none", "trainer.max_epochs=1", "logger=none",
                                     f"++trainer.limit_train_batches={a.batches}", "++trainer.limit_val_batches=0",
                                     "~callbacks.rich_progress_bar", "++trainer.enable_progress_bar=false",
                                     "++trainer.enable_model_summary=false", "++trainer.num_sanity_val_steps=0"],
                      tempfile.mkdtemp())
    dm = instantiate(cfg.datamodule)
    dm.setup("fit")
    timer = BatchTimer()
    trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False, enable_checkpointing=False)
    trainer.fit(instantiate(cfg.model), datamodule=dm)
    per_batch = sorted(timer.times)[len(timer.times) // 2]
    batches = -(-len(dm.train_set) // dm.batch_size)
    report.print("| overrides | accelerator | step | batches | epoch |\n|---|---|---|---|---|")
    report.print(f"| {' '.join(a.overrides)} | {trainer.accelerator.__class__.__name__} | "
                 f"{per_batch * 1e3:.1f} ms/batch "
                 f"(median of {len(timer.times)}) | {batches} batches | {per_batch * batches:.1f} s/epoch |")
    report.save()


if __name__ == "__main__":
    main()
