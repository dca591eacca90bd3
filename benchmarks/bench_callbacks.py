"""Overhead of the default visualization callbacks per epoch, as a fraction of one training epoch.

For LeNet/MNIST (batch 100, 55,000 training images: 550 batches an epoch) and the CIFAR grid net
CifarConvNet(256, 64) at 32x32 (batch 64, 45,000 images: 704 batches), with each experiment's own
datamodule (real probe images from DATA_DIR when present), optimizer and normalization:

- one Lightning fit of `--epochs` short epochs (`--batches` training batches each, 2 validation
  batches) with every default visualization callback that exists (`deconv`,
  `evolution`, `decoded`, `occlusion`, each built from its
  conf/callbacks/<name>.yaml) and a TensorBoard logger, so rendering, PNG encoding and event
  writing are included;
- a full epoch's training time = median time of a training batch (forward, backward, optimizer
  step, from `on_train_batch_start` to `on_train_batch_end`) x batches per epoch; validation is
  left out, which makes the fraction an upper bound;
- each callback's cost per epoch = the median of its `visualize` times after the first epoch (the
  first also pays one-time choices, e.g. which filters to draw: shown separately);
  `evolution`'s summary at fit end is a one-time cost, shown apart.

Batches and callbacks run in the same process, interleaved epoch by epoch, so machine load affects
both alike. On a machine shared with other jobs, two torch threads per process oversubscribe the
cores and wall times swing wildly; `--threads 1 --clock process` then measures CPU seconds of one
thread, which load hardly changes (a second thread speeds training up by at most 2x, so the
fraction at 2 threads is at most twice that). Target: all default callbacks together <= 3% of an
epoch.

    DATA_DIR=../shared/datasets python benchmarks/bench_callbacks.py [--batches N] [--epochs E]
        [--threads T] [--clock wall|process]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch


import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from convlens.config import callback_config, compose_config as compose_cfg
from convlens.methods import METHODS

from results_json import Report
from timing import CLOCKS, BatchTimer, now, use_clock

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CALLBACKS = [m.name for m in METHODS.values() if m.default]
SETUPS = {  # name: (experiment overrides, training images per epoch)
    "LeNet / MNIST": (["experiment=lenet_mnist"], 55_000),
    "CifarConvNet(256,64) / CIFAR-10 32x32": (["experiment=cifar10_convnet", "model.c3=256", "model.c4=64"], 45_000),
}


def timed(callback, store: dict[str, list[float]], name: str):
    """Record the wall time of every `visualize` and `on_fit_end` call of `callback`."""
    visualize, fit_end = callback.visualize, callback.on_fit_end

    def timed_visualize(trainer, pl_module):
        start = now()
        visualize(trainer, pl_module)
        store.setdefault(name, []).append(now() - start)

    def timed_fit_end(trainer, pl_module):
        start = now()
        fit_end(trainer, pl_module)
        store.setdefault(name + "@fit_end", []).append(now() - start)

    callback.visualize, callback.on_fit_end = timed_visualize, timed_fit_end
    return callback


def measure(overrides: list[str], batches: int, epochs: int, out: Path):
    cfg = compose_cfg(overrides + ["callbacks=none", "trainer.accelerator=cpu"], out)
    pl.seed_everything(0, verbose=False)
    dm = instantiate(cfg.datamodule)
    model = instantiate(cfg.model)
    present = DEFAULT_CALLBACKS
    times: dict[str, list[float]] = {}
    callbacks = [timed(instantiate(callback_config(n)), times, n) for n in present]
    timer = BatchTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=batches,
                         limit_val_batches=2, num_sanity_val_steps=0, logger=TensorBoardLogger(str(out), name="tb"),
                         callbacks=[timer, *callbacks], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=10_000)
    trainer.fit(model, datamodule=dm)
    steady = timer.seconds[len(timer.seconds) // 5:]  # drop warm-up batches (allocator, thread pools)
    return statistics.median(steady), present, times, cfg.datamodule.batch_size


def main():
    report = Report("callbacks")
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=30, help="training batches per short epoch")
    p.add_argument("--epochs", type=int, default=4, help="short epochs (callbacks run after each)")
    p.add_argument("--only", choices=list(SETUPS), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: elapsed time; process: CPU time of this process (use with --threads 1)")
    a = p.parse_args()
    use_clock(a.clock)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for setup, (overrides, train_images) in SETUPS.items():
        if a.only and setup != a.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            batch_s, present, times, batch_size = measure(overrides, a.batches, a.epochs, Path(tmp))
        per_epoch = -(-train_images // batch_size)
        epoch_s = batch_s * per_epoch
        rows.append((setup, batch_s, per_epoch, epoch_s, present, times))

    report.print(f"torch threads: {torch.get_num_threads()}, clock: {a.clock}, "
                 f"load average: {os.getloadavg()[0]:.1f} (1 min)\n")
    report.print("| setup | callback | first epoch s | per epoch s (median of later epochs) | % of epoch | fit end s |")
    report.print("|---|---|---|---|---|---|")
    for setup, batch_s, per_epoch, epoch_s, present, times in rows:
        total = 0.0
        for name in present:
            calls = times.get(name, [])
            last = statistics.median(calls[1:]) if len(calls) > 1 else float("nan")
            total += last
            fit_end = times.get(name + "@fit_end", [0.0])[-1]
            report.print(f"| {setup} | {name} | {calls[0]:.3f} | {last:.3f} | {100 * last / epoch_s:.2f}% "
                         f"| {fit_end:.3f} |")
        verdict = "met" if total <= 0.03 * epoch_s else "MISSED"
        report.print(f"| {setup} | **all ({len(present)})** | | **{total:.3f}** | **{100 * total / epoch_s:.2f}%** "
                     f"(target <= 3%: {verdict}) | |")
        report.print(f"| {setup} | epoch = {batch_s * 1000:.1f} ms/batch x {per_epoch} batches | | {epoch_s:.1f} "
                     "| 100% | |")
    missing = [n for n in DEFAULT_CALLBACKS if all(n not in r[4] for r in rows)]
    if missing:
        report.print(f"\nnot measured (no conf/callbacks/<name>.yaml yet): {', '.join(missing)}")
    report.save()


if __name__ == "__main__":
    main()
