"""The default callbacks' cost per epoch on the example project (examples/resnet_cifar10.py).

The user project as it is: its own LightningModule around torchvision's ResNet-18, plain DataLoaders
over CIFAR-10 from `$DATA_DIR/cifar10-jpg` (ToTensor + Normalize, batch 128; FakeData of the same
shape with `--fake`), a TensorBoardLogger, and the four default callbacks with their default
options, as the example adds them. Methodology of bench_callbacks.py: one fit of `--epochs` short
epochs of `--batches` training batches (and 2 validation batches: the probe images and
`deconv_max`'s batch come from the validation loader); epoch = median training-batch time
(forward, backward, optimizer step) x 391 batches (50,000 / 128), validation left out (so the
fraction is an upper bound); a callback's cost per epoch = the median of its `visualize` times
after the first epoch; fit-start work (probe scan, layer checks) and the fit-end summary are
one-time costs, shown apart. Writes `bench_example.json` next to RESULTS.md.

    DATA_DIR=../shared/datasets python benchmarks/bench_example.py [--batches 20] [--epochs 4]
        [--threads 1 --clock process] [--fake]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

import bench_callbacks
from bench_callbacks import BatchTimer, timed
from bench_deconv_general import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BATCHES_PER_EPOCH = -(-50_000 // 128)


def load_example():
    spec = importlib.util.spec_from_file_location("resnet_cifar10", ROOT / "examples" / "resnet_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FitStart(pl.Callback):
    """Seconds from setup to the first training batch (the callbacks' fit-start work included)."""

    def setup(self, trainer, pl_module, stage):
        self.start = bench_callbacks.clock()

    def on_train_start(self, trainer, pl_module):
        self.seconds = bench_callbacks.clock() - self.start


def fit(example, args, out: Path, with_callbacks: bool):
    from convlens.callbacks import DecodedFilters, DeconvProjection, FilterEvolution, OcclusionSensitivity

    pl.seed_everything(0, verbose=False)
    train_set, val_set = example.datasets(args.data_dir, args.fake, fake_size=max(4096, 128 * args.batches))
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True, num_workers=args.workers,
                              persistent_workers=args.workers > 0)
    val_loader = DataLoader(val_set, batch_size=128, num_workers=args.workers, persistent_workers=args.workers > 0)
    times: dict[str, list[float]] = {}
    callbacks = [timed(cb, times, cb.name) for cb in
                 (DeconvProjection(), FilterEvolution(), DecodedFilters(), OcclusionSensitivity())] \
        if with_callbacks else []
    timer, start = BatchTimer(), FitStart()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, limit_train_batches=args.batches,
                         limit_val_batches=2, num_sanity_val_steps=0,
                         logger=TensorBoardLogger(str(out), name="tb"), callbacks=[start, timer, *callbacks],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(example.LitResNet(), train_loader, val_loader)
    steady = timer.seconds[len(timer.seconds) // 5:]
    return statistics.median(steady), times, start.seconds, [cb.name for cb in callbacks]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=list(bench_callbacks.CLOCKS), default="wall")
    p.add_argument("--fake", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", default=str(Path(__file__).with_name("bench_example.json")))
    a = p.parse_args()
    bench_callbacks.clock = bench_callbacks.CLOCKS[a.clock]
    if a.threads:
        torch.set_num_threads(a.threads)
    example = load_example()
    with tempfile.TemporaryDirectory() as tmp:
        batch_s, times, fit_start_s, names = fit(example, a, Path(tmp) / "with", True)
        _, _, fit_start_plain_s, _ = fit(example, a, Path(tmp) / "without", False)
    epoch_s = batch_s * BATCHES_PER_EPOCH
    rows, total = [], 0.0
    print(f"torch threads: {torch.get_num_threads()}, clock: {a.clock}, load average {os.getloadavg()[0]:.1f}\n")
    print("| callback | first epoch s | per epoch s (median of later epochs) | % of epoch | fit end s |")
    print("|---|---|---|---|---|")
    for name in names:
        calls = times.get(name, [])
        later = statistics.median(calls[1:]) if len(calls) > 1 else float("nan")
        fit_end = times.get(name + "@fit_end", [0.0])[-1]
        total += later
        rows.append({"callback": name, "first_epoch_s": calls[0], "per_epoch_s": later,
                     "percent_of_epoch": 100 * later / epoch_s, "fit_end_s": fit_end})
        print(f"| {name} | {calls[0]:.3f} | {later:.3f} | {100 * later / epoch_s:.2f}% | {fit_end:.3f} |")
    verdict = "met" if total <= 0.03 * epoch_s else "MISSED"
    print(f"| **all ({len(names)})** | | **{total:.3f}** | **{100 * total / epoch_s:.2f}%** "
          f"(target <= 3%: {verdict}) | |")
    print(f"| epoch = {1000 * batch_s:.1f} ms/batch x {BATCHES_PER_EPOCH} batches | | {epoch_s:.1f} | 100% | |")
    print(f"\nfit start (setup to first batch): {fit_start_s:.2f} s with the callbacks, "
          f"{fit_start_plain_s:.2f} s without")
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "clock": a.clock, "load_average_1min": os.getloadavg()[0],
            "data": "FakeData" if a.fake else "CIFAR-10 image folder", "batches_timed_per_epoch": a.batches,
            "epochs": a.epochs, "batch_size": 128, "batches_per_full_epoch": BATCHES_PER_EPOCH}
    Path(a.json).write_text(json.dumps({"meta": meta, "batch_s": batch_s, "epoch_s": epoch_s, "callbacks": rows,
                                        "total_per_epoch_s": total, "percent_of_epoch": 100 * total / epoch_s,
                                        "fit_start_s": {"with": fit_start_s, "without": fit_start_plain_s}},
                                       indent=2))


if __name__ == "__main__":
    main()
