"""The visualizations' time budget (issue #26): the share of an epoch each default callback takes
(deconv, evolution, decoded, occlusion, with their config's options and `budget: 0.05`), on the
first epoch (a first drawing stops at its deadline, `callbacks/budget.py`) and on the next ones (spaced
out by the cost the first one measured: a callback whose full drawing is over its part does not
draw then), and over the run.

    flock /tmp/bench.lock python benchmarks/bench_budget.py            # VGG16, ResNet-18, CIFAR net, LeNet
    flock /tmp/bench.lock python benchmarks/bench_budget.py --nets lenet --batches-scale 0.5

Random weights and synthetic data (Gaussian images in model input space, labels cycling over the
classes), short epochs (stated in the table): the epoch's own seconds are what the budget is a share
of, so a short epoch is the hard case (its 5% is small, and a first drawing always draws one piece).
Each run stops after `--epochs` epochs (default 4; a run that reaches its `max_epochs` would also
draw its last epoch in full, which this leaves out). The epoch
time is training and validation, as the budget measures it; each callback's seconds are its
`visualize` (as `viz_time/<name>`, without the logging of the scalar).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.vgg import VGG16

from results_json import Report

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = ("deconv", "evolution", "decoded", "occlusion")
#: net, its input [C, side], classes, batch size, training batches an epoch, validation batches
NETS = {
    "vgg16": (lambda c: VGG16(num_classes=c), (3, 224), 4, 8, 2, 1),
    "resnet18": (lambda c: torchvision.models.resnet18(num_classes=c), (3, 224), 4, 16, 4, 1),
    "cifar_convnet": (lambda c: CifarConvNet(num_classes=c), (3, 32), 10, 64, 100, 2),
    "lenet": (lambda c: LeNet(num_classes=c), (1, 28), 10, 64, 100, 2),
}


class Classifier(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class Clock(pl.Callback):
    """First in the callback list: each epoch's own seconds (training and validation), measured when
    the epoch ends, before the visualizations draw; stops the run after `epochs` epochs."""

    def __init__(self, epochs: int):
        self.epochs, self.start, self.seconds = epochs, 0.0, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self.start)
        if len(self.seconds) >= self.epochs:
            trainer.should_stop = True


def default_callbacks(budget: float):
    """The four default callbacks with their config's options (conf/callbacks/<name>.yaml)."""
    out = []
    for name in CALLBACKS:
        node = OmegaConf.load(ROOT / "conf" / "callbacks" / f"{name}.yaml")[name]
        node.budget = budget
        out.append(instantiate(node))
    return out


def timed(callback, record: list):
    visualize = callback.visualize

    def run(trainer, pl_module):
        start = time.perf_counter()
        visualize(trainer, pl_module)
        record.append((trainer.current_epoch, time.perf_counter() - start))
    callback.visualize = run


def run_net(name: str, scale: float, budget: float, epochs: int = 2):
    make, (channels, side), classes, batch, train_batches, val_batches = NETS[name]
    train_batches = max(1, round(train_batches * scale))
    torch.manual_seed(0)
    n_train, n_val = train_batches * batch, val_batches * batch
    train = TensorDataset(torch.randn(n_train, channels, side, side), torch.arange(n_train) % classes)
    val = TensorDataset(torch.randn(n_val, channels, side, side), torch.arange(n_val) % classes)
    clock = Clock(epochs)
    callbacks = default_callbacks(budget)
    times = {cb.name: [] for cb in callbacks}
    for cb in callbacks:
        timed(cb, times[cb.name])
    root = tempfile.mkdtemp()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        pl.Trainer(default_root_dir=root, max_epochs=100, accelerator="cpu", callbacks=[clock, *callbacks],
                   logger=TensorBoardLogger(root, name="tb", version=""), enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   limit_val_batches=val_batches).fit(
            Classifier(make(classes)), DataLoader(train, batch_size=batch, shuffle=True),
            DataLoader(val, batch_size=batch))
    notes = [str(w.message) for w in said if "budget" in str(w.message)]
    return dict(net=name, size=f"{channels}x{side}x{side}", batch=batch, train_batches=train_batches,
                val_batches=val_batches, epochs=clock.seconds, times=times,
                spacing={cb.name: cb.every_n_epochs for cb in callbacks}, notes=notes)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nets", nargs="*", default=list(NETS))
    p.add_argument("--batches-scale", type=float, default=1.0, help="scale the training batches an epoch")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run")
    a = p.parse_args()
    os.environ.pop("CONVLENS_BUDGET", None)
    report = Report("budget")
    rows = []
    report.print(f"load average before: {os.getloadavg()[0]:.2f}")
    heads = " | ".join(f"epoch {e + 1} s (share)" for e in range(a.epochs))
    report.print(f"| net | epoch (train x batch + val) | callback | {heads} | all epochs (share) "
                 "| every k epochs after |\n|---|---|---|" + "---:|" * (a.epochs + 2))
    for name in a.nets:
        r = run_net(name, a.batches_scale, a.budget, a.epochs)
        rows.append(r)
        epochs = r["epochs"]
        size = f"{r['size']}, {r['train_batches']} x {r['batch']} + {r['val_batches']} x {r['batch']}"
        report.print(f"| {name} | {size} | (epoch s) | " + " | ".join(f"{e:.1f}" for e in epochs)
                     + f" | {sum(epochs):.1f} | |")
        total = [0.0] * len(epochs)
        for cb, record in r["times"].items():
            per = {epoch: s for epoch, s in record}
            seconds = [per.get(e, 0.0) for e in range(len(epochs))]
            total = [t + s for t, s in zip(total, seconds)]
            report.print(f"| {name} | | {cb} | " + " | ".join(f"{s:.2f} ({s / e:.1%})" for s, e in zip(seconds, epochs))
                         + f" | {sum(seconds):.2f} ({sum(seconds) / sum(epochs):.1%}) | {r['spacing'][cb]} |")
        shares = " | ".join(f"**{s:.2f} ({s / e:.1%})**" for s, e in zip(total, epochs))
        run = f"**{sum(total):.2f} ({sum(total) / sum(epochs):.1%})**"
        report.print(f"| {name} | | **all four** | {shares} | {run} | |")
        for note in r["notes"]:
            report.print(f"    {name}: {note}")
    report.print(f"load average after: {os.getloadavg()[0]:.2f}")
    report.save(extra={"runs": rows})


if __name__ == "__main__":
    main()
