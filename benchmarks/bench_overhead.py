"""Framework overhead: training epochs of train.py's pipeline (LeNet/MNIST, callbacks=none) against a
plain PyTorch loop over the same uint8 tensors, model, batch size, optimizer and normalization.

Runs interleave (plain, framework, plain, framework, ...) so machine load affects both alike; the
ratio is plain time / framework time of the training epoch (target >= 0.95), reported as the ratio
of the median times and as the median of the per-pair ratios (on a VM whose neighbours come and
go, the pairs' ratios are the steadier figure).

With --near-free-model, LeNet is replaced (in both pipelines) by Flatten + Linear(784, 10), whose
step costs almost nothing: the difference of the two epochs is then the framework's own cost per
step, in milliseconds, with little noise from the model's compute.

    DATA_DIR=../shared/datasets python benchmarks/bench_overhead.py [--batches N] [--repeats R] [--threads T]
        [--near-free-model]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


import lightning.pytorch as pl
from hydra.utils import instantiate

from convlens.config import compose_config as compose_cfg
from convlens.config import instantiate_dict

from results_json import Report

ROOT = Path(__file__).resolve().parents[1]


class NearFreeNet(torch.nn.Sequential):
    """Stands in for LeNet (same constructor) when only the framework's own cost is measured."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **_):
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(in_channels * input_size ** 2, num_classes))


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def framework_epoch(batches: int | None, out: Path, progress_bar: bool) -> float:
    overrides = ["experiment=lenet_mnist", "callbacks=none", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                 "++trainer.limit_val_batches=0", "++trainer.num_sanity_val_steps=0",
                 "++trainer.enable_model_summary=false"]
    if batches:
        overrides.append(f"++trainer.limit_train_batches={batches}")
    if not progress_bar:
        overrides += ["~callbacks.rich_progress_bar", "++trainer.enable_progress_bar=false"]
    cfg = compose_cfg(overrides, out)
    pl.seed_everything(0, verbose=False)
    dm = instantiate(cfg.datamodule)
    model = instantiate(cfg.model)
    timer = EpochTimer()
    trainer = instantiate(cfg.trainer, callbacks=instantiate_dict(cfg.callbacks) + [timer],
                          logger=instantiate_dict(cfg.logger))
    trainer.fit(model, datamodule=dm)
    return timer.seconds


def plain_epoch(batches: int | None) -> tuple[float, int]:
    """(seconds, steps) of one plain training epoch."""
    cfg = compose_cfg(["experiment=lenet_mnist"], tempfile.mkdtemp())
    pl.seed_everything(0, verbose=False)
    dm = instantiate(cfg.datamodule)
    dm.setup("fit")
    net = instantiate(cfg.model.net)
    opt = instantiate(cfg.model.optimizer)(params=net.parameters())
    images, labels, norm = dm.train_set.images, dm.train_set.labels, dm.normalization
    bs = cfg.datamodule.batch_size
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    perm = torch.randperm(len(labels))
    n = len(labels) if not batches else min(len(labels), batches * bs)
    net.train()
    for i in range(0, n, bs):
        idx = perm[i:i + bs]
        x, y = norm(images[idx]), labels[idx]
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start, -(-n // bs)


def main():
    report = Report("overhead")
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=None, help="batches per epoch (default: the full epoch)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved pairs (the VM is noisy: use 5 or more)")
    p.add_argument("--progress-bar", action="store_true", help="keep the rich progress bar on")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--near-free-model", action="store_true",
                   help="replace LeNet by Flatten + Linear: measures the framework's cost per step")
    a = p.parse_args()
    if a.near_free_model:
        import convlens.models.lenet as lenet

        lenet.LeNet = NearFreeNet  # what conf/model/lenet.yaml's _target_ resolves to
    if a.threads:
        torch.set_num_threads(a.threads)
    plain, frame = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plain_epoch(20)  # warm-up (thread pools, allocator)
        for r in range(a.repeats):
            seconds, steps = plain_epoch(a.batches)
            plain.append(seconds)
            frame.append(framework_epoch(a.batches, Path(tmp) / f"r{r}", a.progress_bar))
    pm, fm = statistics.median(plain), statistics.median(frame)
    pairs = [p_ / f_ for p_, f_ in zip(plain, frame)]
    report.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                 f"{a.batches or 'all'} batches per epoch\n")
    report.print("| pipeline | epoch seconds (median of %d) |" % a.repeats)
    report.print("|---|---|")
    report.print(f"| plain PyTorch loop | {pm:.2f} |")
    report.print(f"| train.py (callbacks=none{', progress bar' if a.progress_bar else ''}) | {fm:.2f} |")
    if a.near_free_model:
        report.print(f"\nframework cost per step (near-free model): "
                     f"{statistics.median(f_ - p_ for p_, f_ in zip(plain, frame)) / steps * 1e3:.3f} ms "
                     "(median of pairs)")
    report.print(f"\nratio plain/framework = {pm / fm:.3f} (ratio of medians), median pair ratio "
                 f"{statistics.median(pairs):.3f} (target >= 0.95)")
    report.print("pairs: " + ", ".join(f"{p_:.2f}/{f_:.2f}={r:.3f}" for p_, f_, r in zip(plain, frame, pairs)))
    report.save()


if __name__ == "__main__":
    main()
