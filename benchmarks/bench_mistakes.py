"""Cost of the `mistakes` callback per epoch on the CIFAR net, and the kNN for a 50,000-image bank.

1. CifarConvNet(256, 64) on CIFAR-10 32x32 (experiment=cifar10_convnet: batch 64, 45,000 training
   images = 704 batches an epoch, 5,000 validation images), `Mistakes(every_n_epochs=1)` with its
   defaults (a 5,000-image bank, k=5, cosine), a TensorBoard logger. One Lightning fit of `--epochs`
   short epochs: `--batches` training batches each, the whole validation set each (the callback
   collects during it). In the same run:
   - a full epoch = median training-batch time (forward, backward, optimizer step) x 704 + the
     median validation pass less the callback's collection time;
   - the callback's cost = its collection time during validation (hooks and per-batch bookkeeping)
     + its drawing time (`visualize`: the bank's 5,000 forward passes in eval mode, the kNN of every
     misclassified validation image, rendering and logging), median over the epochs after the first.
   Target: <= 3% of an epoch. The share depends on how many validation images are misclassified
   (each is a kNN query): the count is printed; `--checkpoint` starts from trained weights.
2. `viz.knn.knn` alone: Q queries against a 50,000 x 1,024 bank (the CIFAR net's head input), both
   metrics, median of `--repeats`.

    DATA_DIR=/work/shared/datasets python benchmarks/bench_mistakes.py [--batches N] [--epochs E]
        [--checkpoint ckpt] [--queries Q ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from convlens.callbacks.mistakes import Mistakes
from convlens.config import callback_config, compose_config as compose_cfg
from convlens.viz.knn import knn

from results_json import Report

TRAIN_IMAGES, BATCH = 45_000, 64


class Timer(pl.Callback):
    """Wall time of every training batch and of every validation pass."""

    def __init__(self):
        self.batches: list[float] = []
        self.validation: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(time.perf_counter() - self.t)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.v = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validation.append(time.perf_counter() - self.v)


def measure_epoch(batches: int, epochs: int, checkpoint: str | None, out: Path) -> dict:
    cfg = compose_cfg(["experiment=cifar10_convnet", "model.c3=256", "model.c4=64", "callbacks=none",
                       "trainer.accelerator=cpu"], out)
    pl.seed_everything(0, verbose=False)
    dm, model = instantiate(cfg.datamodule), instantiate(cfg.model)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    callback: Mistakes = instantiate(callback_config("mistakes"))
    parts: list[dict] = []
    visualize = callback.visualize

    def timed(trainer, pl_module):
        t0 = time.perf_counter()
        visualize(trainer, pl_module)
        parts.append({"visualize": time.perf_counter() - t0, **callback.timings,
                      "mistakes": len(callback.result["mistake_order"]) if callback.result else 0})

    callback.visualize = timed
    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=batches,
                         num_sanity_val_steps=0, logger=TensorBoardLogger(str(out), name="tb"),
                         callbacks=[timer, callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=10_000)
    trainer.fit(model, datamodule=dm)
    steady = timer.batches[len(timer.batches) // 5:]
    later = parts[1:] or parts
    median = {key: statistics.median(p[key] for p in later) for key in later[0] if key in later[-1]}
    validation = statistics.median(v - p["collect"] for v, p in zip(timer.validation[1:] or timer.validation,
                                                                    later))
    return {"batch_s": statistics.median(steady), "validation_s": validation, "parts": median,
            "val_images": len(dm.val_set), "bank": callback.bank_size, "reference": callback.result["reference"]}


def measure_knn(queries: list[int], repeats: int, dim: int = 1024, bank_rows: int = 50_000) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(bank_rows, dim, generator=g)
    rows = []
    for q in queries:
        x = torch.randn(q, dim, generator=g)
        for metric in ("cosine", "euclidean"):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                knn(x, bank, 5, metric)
                times.append(time.perf_counter() - t0)
            rows.append((q, metric, statistics.median(times)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=30, help="training batches per short epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--checkpoint", default=None, help="start from these weights (fewer mistakes, fewer queries)")
    p.add_argument("--queries", type=int, nargs="+", default=[500, 1500, 4500])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-epoch", action="store_true")
    a = p.parse_args()
    report = Report("mistakes")
    report.print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f} (1 min)\n")
    extra = {}
    if not a.skip_epoch:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure_epoch(a.batches, a.epochs, a.checkpoint, Path(tmp))
        per_epoch = -(-TRAIN_IMAGES // BATCH)
        epoch = r["batch_s"] * per_epoch + r["validation_s"]
        parts = r["parts"]
        cost = parts["collect"] + parts["visualize"]
        verdict = "met" if cost <= 0.03 * epoch else "MISSED"
        report.print(f"reference bank: {r['bank']} images ({r['reference']}); {r['val_images']} validation images; "
                     f"misclassified (kNN queries): {parts['mistakes']:.0f}\n")
        report.print("| part | seconds per epoch | % of epoch |")
        report.print("|---|---|---|")
        for key, what in (("collect", "collect during validation"), ("bank", "bank: 5,000 forward passes"),
                          ("knn", "kNN of every mistake"), ("draw", "render and log")):
            if key in parts:
                report.print(f"| {what} | {parts[key]:.3f} | {100 * parts[key] / epoch:.2f}% |")
        report.print(f"| **mistakes, all** (collect + visualize) | **{cost:.3f}** | **{100 * cost / epoch:.2f}%** "
                     f"(target <= 3%: {verdict}) |")
        report.print(f"| epoch = {r['batch_s'] * 1000:.1f} ms/batch x {per_epoch} + validation "
                     f"{r['validation_s']:.1f} s | {epoch:.1f} | 100% |")
        extra["epoch"] = r
    report.print("\nkNN against a 50,000 x 1,024 bank (k=5):\n")
    report.print("| queries | metric | seconds |")
    report.print("|---|---|---|")
    for q, metric, s in measure_knn(a.queries, a.repeats):
        report.print(f"| {q} | {metric} | {s:.3f} |")
    report.save(extra=extra)


if __name__ == "__main__":
    main()
