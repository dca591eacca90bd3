"""Per-epoch cost of the neuron-analysis callbacks at their defaults: TopActivations (collected during
validation, drawn after it) and Saliency (drawn after validation).

    DATA_DIR=../shared/datasets python benchmarks/bench_neurons.py [--repeats R] [--threads T]

Setups: LeNet on MNIST (28x28, 5000 validation images, eval batches of 256) and
CifarConvNet(c3=256, c4=64) on CIFAR-10 (32x32, 5000 validation images); the real datasets when
DATA_DIR has them, else synthetic shapes of the same size and count (the cost does not depend on
the content, except for how often the top k changes). Each run is `Trainer.fit` over 1 epoch
with `limit_train_batches` small and the full validation split.

Measured per callback (best of R runs; on a shared machine other processes only ever add time):
- collect: the seconds TopActivations spends in its hooks and updates during validation (it times
  itself: `viz_time/top_activations_collect`), and, as a check, validation time with the callback
  minus validation time without it;
- draw: the seconds of `visualize` (the base's `viz_time/<name>`), images encoded for TensorBoard.
The epoch time they are compared with: `TRAIN_STEPS` training steps timed and scaled to a whole
epoch (MNIST: 55000 images in batches of 100; CIFAR-10: 45000 in batches of 64), plus the
validation loop. Target: each callback <= 1% of an epoch (3% for all default callbacks together).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from convlens.callbacks.saliency import Saliency
from convlens.callbacks.top_activations import TopActivations
from convlens.datamodules.shapes import ShapesDataModule
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule

from results_json import Report

ROOT = Path(__file__).resolve().parents[1]

TRAIN_STEPS = 20
TARGET_FRACTION = 0.01


class Timer(pl.Callback):
    def __init__(self):
        self.val = 0.0
        self.train_steps: list[float] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self._v = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val = time.perf_counter() - self._v

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_steps.append(time.perf_counter() - self._t)


def datamodule(kind: str):
    data = Path(os.environ.get("DATA_DIR", ROOT.parent / "shared" / "datasets"))
    if kind == "mnist":
        if (data / "MNIST" / "raw").is_dir():
            from convlens.datamodules.mnist import MNISTDataModule
            return MNISTDataModule(root=str(data), download=False), "MNIST", 55000, 100
        return ShapesDataModule(n_train=10000, val_size=5000, batch_size=100), "shapes 28x28 (synthetic)", 55000, 100
    if (data / "cifar10-jpg").is_dir():
        from convlens.datamodules.cifar10 import CIFAR10DataModule
        return CIFAR10DataModule(root=str(data), download=False, batch_size=64), "CIFAR-10", 45000, 64
    return (ShapesDataModule(n_train=10000, val_size=5000, batch_size=64, channels=3, image_size=32,
                             normalization="channel"), "shapes 32x32x3 (synthetic)", 45000, 64)


def run(net_factory, dm, callback, out: Path):
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(net_factory(), optimizer=partial(torch.optim.Adam, lr=1e-3))
    timer = Timer()
    draw = {}
    if callback is not None:
        visualize = callback.visualize

        def timed_visualize(trainer, pl_module):
            t0 = time.perf_counter()
            visualize(trainer, pl_module)
            draw["s"] = time.perf_counter() - t0
        callback.visualize = timed_visualize
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=TRAIN_STEPS + 2,
                         num_sanity_val_steps=0, callbacks=[c for c in (callback, timer) if c is not None],
                         logger=TensorBoardLogger(str(out), name="tb"), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(out))
    trainer.fit(module, datamodule=dm)
    step = sorted(timer.train_steps[2:])[len(timer.train_steps[2:]) // 2]  # median, after warm-up
    collect = getattr(callback, "collect_seconds", 0.0) if callback is not None else 0.0
    return {"val": timer.val, "step": step, "collect": collect, "draw": draw.get("s", 0.0)}


def main() -> None:
    report = Report("neurons")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = [("LeNet", LeNet, "mnist"), ("CifarConvNet(256, 64)", partial(CifarConvNet, c3=256, c4=64), "cifar")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net_name, factory, kind in setups:
            dm, data_name, n_train, batch = datamodule(kind)
            dm.setup("fit")
            best: dict[str, dict[str, float]] = {}
            for r in range(args.repeats):  # interleaved, so machine load hits all alike
                for name, make in (("none", lambda: None), ("top_activations", TopActivations),
                                   ("saliency", Saliency)):
                    res = run(factory, dm, make(), Path(tmp) / f"{kind}-{name}-{r}")
                    cur = best.setdefault(name, res)
                    for key in res:
                        cur[key] = min(cur[key], res[key])
            base = best["none"]
            epoch = base["step"] * (n_train // batch) + base["val"]
            for name in ("top_activations", "saliency"):
                b = best[name]
                total = b["collect"] + b["draw"]
                rows.append((net_name, data_name, name, epoch, base["val"], b["val"] - base["val"], b["collect"],
                             b["draw"], total, total / epoch))
    report.print(f"torch threads: {torch.get_num_threads()}, best of {args.repeats}\n")
    report.print("| net | data | callback | epoch (s, est.) | val loop (s) | val loop delta (s) | collect (s) "
                 "| draw (s) | cost/epoch (s) | share | target <= 1% |")
    report.print("|---|---|---|---|---|---|---|---|---|---|---|")
    for net, data, name, epoch, val, delta, collect, draw, total, share in rows:
        report.print(f"| {net} | {data} | {name} | {epoch:.1f} | {val:.2f} | {delta:+.2f} | {collect:.3f} | {draw:.3f} "
                     f"| {total:.3f} | {share:.2%} | {'met' if share <= TARGET_FRACTION else 'MISSED'} |")
    report.save()


if __name__ == "__main__":
    main()
