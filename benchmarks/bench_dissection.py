"""UnitDissection (callbacks/dissection.py): its cost per epoch, its bookkeeping against a two-pass
reference at VGG16 scale, and a short study of selectivity over training.

    DATA_DIR=../shared/datasets python benchmarks/bench_dissection.py share [--batches N] [--epochs 4] [--threads 1]
    python benchmarks/bench_dissection.py vgg [--images 500] [--forward-images 4]
    DATA_DIR=../shared/datasets python benchmarks/bench_dissection.py study [--epochs 10] [--batches 150]

- `share`: LeNet/MNIST and the CIFAR grid net CifarConvNet(256, 64) with each experiment's own
  datamodule, every conv layer dissected (LeNet 20+50+500+10 units, CIFAR 32+64+256+64), N = 100.
  One Lightning fit of `--epochs` short epochs (`--batches` training batches each) with the whole
  validation split, in one process: the dissection's cost per epoch = its collection during the
  validation loop (`collect_seconds`: hooks, top-N updates, pool, merging) + its drawing
  (`visualize`: the measures, the colour index's extra forward, rendering, logging, the CSV);
  an epoch = the median training batch x batches per full epoch + the validation loop without the
  dissection's part. Both clocks are the process's CPU time (`--threads 1`), which the machine's
  load hardly changes. The share is the median over the epochs after the first (the range beside
  it: the same seconds varied by a third from run to run). Target: <= 2% on the CIFAR net (colour
  index included), <= 3% on LeNet.
- `vgg`: every unit of VGG16's `features.28` (512 units, 14x14 maps) at 224 px over `--images`
  images: the streaming collector (`UnitCollector`, batch by batch, memory bounded by units x N)
  against a two-pass reference that keeps every map of every image and sorts each unit's images
  (`reference_top`): seconds and peak memory (each in its own subprocess, peak RSS above the
  subprocess's baseline). The maps are synthetic (rectified Gaussian, seeded per batch): VGG16's
  forward, the same for both, costs minutes per hundred images on a loaded 2-core CPU, so it is
  timed on `--forward-images` real images (random weights) and reported per image, and the colour
  index's extra forward is that time x the distinct images the top-N refers to.
- `study`: the CIFAR net trained `--epochs` short epochs (`--batches` batches of 64, validation on
  `--val-batches` batches), the dissection every epoch; from `units.csv`, each layer's mean class
  selectivity, colour selectivity and CSI per epoch (a table, and `docs/img/dissection_study.png`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

import convlens.callbacks.collect as collect_module
import convlens.callbacks.dissection as dissection_module
from convlens.callbacks.dissection import UnitDissection
from convlens.config import compose_config as compose_cfg
from convlens.viz.dissection import UnitCollector
from convlens.viz.top_activations import content_ids, spatial_max

from results_json import Report

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {  # name: (experiment overrides, training images per epoch)
    "LeNet / MNIST": (["experiment=lenet_mnist"], 55_000),
    "CifarConvNet(256,64) / CIFAR-10 32x32": (["experiment=cifar10_convnet", "model.c3=256", "model.c4=64"], 45_000),
}
clock = time.process_time


class Timer(pl.Callback):
    """CPU seconds of every training batch and of each validation loop."""

    def __init__(self):
        self.batches: list[float] = []
        self.validation: list[float] = []

    def on_train_batch_start(self, *args):
        self.t = clock()

    def on_train_batch_end(self, *args):
        self.batches.append(clock() - self.t)

    def on_validation_epoch_start(self, trainer, *args):
        self.v = clock()

    def on_validation_epoch_end(self, trainer, *args):
        if not trainer.sanity_checking:
            self.validation.append(clock() - self.v)


def share(a, report: Report) -> None:
    # the callback times itself with perf_counter (its collection in callbacks/collect.py): use this
    # process's CPU clock instead
    dissection_module.time = collect_module.time = SimpleNamespace(perf_counter=clock)
    report.print(f"torch threads: {torch.get_num_threads()}, clock: process CPU time, load average: "
                 f"{os.getloadavg()[0]:.1f} (1 min)\n")
    report.print("| setup | units | val images | epoch s (train + val) | collect s | draw s | dissection % of epoch "
                 "| target |")
    report.print("|---|---|---|---|---|---|---|---|")
    for setup, (overrides, train_images) in SETUPS.items():
        if a.only and a.only not in setup:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_cfg(overrides + ["callbacks=none", "trainer.accelerator=cpu"], tmp)
            pl.seed_everything(0, verbose=False)
            dm, model = instantiate(cfg.datamodule), instantiate(cfg.model)
            cb, timer = UnitDissection(budget=None, strip_units=0), Timer()
            draws: list[float] = []
            visualize = cb.visualize

            def timed(trainer, pl_module, visualize=visualize, draws=draws):
                start = clock()
                visualize(trainer, pl_module)
                draws.append(clock() - start)

            cb.visualize = timed
            collects: list[float] = []
            epoch_end = cb.on_train_epoch_end

            def keep_collect(trainer, pl_module, epoch_end=epoch_end, collects=collects, cb=cb):
                collects.append(cb.collect_seconds)
                epoch_end(trainer, pl_module)

            cb.on_train_epoch_end = keep_collect
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=a.epochs, limit_train_batches=a.batches,
                                 num_sanity_val_steps=0, logger=TensorBoardLogger(tmp, name="tb"),
                                 callbacks=[timer, cb], enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, log_every_n_steps=10_000)
            trainer.fit(model, datamodule=dm)
            batch_s = statistics.median(timer.batches[len(timer.batches) // 5:])
            per_epoch = -(-train_images // cfg.datamodule.batch_size)
            later = range(1, len(draws)) if len(draws) > 1 else range(len(draws))   # the first epoch left out
            shares = [(collects[e] + draws[e]) / (batch_s * per_epoch + timer.validation[e] - collects[e])
                      for e in later]
            median = statistics.median(shares)
            e = min(later, key=lambda i: abs(shares[i - later[0]] - median))   # the epoch at the median
            val_s = timer.validation[e] - collects[e]
            epoch_s = batch_s * per_epoch + val_s
            units = sum(cb.tables[layer].num_units for layer in cb.layers)
            target = 0.02 if "Cifar" in setup else 0.03
            verdict = "met" if median <= target else "MISSED"
            val_images = len(dm.val_dataloader().dataset)
            report.print(f"| {setup} | {units} ({', '.join(cb.layers)}) | {val_images} | {epoch_s:.1f} "
                         f"({batch_s * 1000:.1f} ms x {per_epoch} + {val_s:.1f}) | {collects[e]:.2f} | "
                         f"{draws[e]:.2f} | **{100 * median:.2f}%** ({100 * min(shares):.2f}-{100 * max(shares):.2f}%, "
                         f"{len(shares)} epochs) | <= {target:.0%}: {verdict} |")


# -- VGG16 features.28: streaming vs two-pass ----------------------------------------------------------
UNITS, SIDE, MAP = 512, 224, 14


def batch_maps(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and features.28-shaped maps of images start..start+count, seeded by position."""
    g = torch.Generator().manual_seed(start)
    images = torch.rand(count, 3, SIDE, SIDE, generator=g)
    labels = torch.randint(0, 10, (count,), generator=g)
    maps = torch.randn(count, UNITS, MAP, MAP, generator=g).clamp_min(0)
    return images, labels, maps


def run_streaming(images: int, n: int, batch: int) -> dict:
    collector = UnitCollector({"features.28": UNITS}, n)
    start = time.perf_counter()
    for s in range(0, images, batch):
        x, y, maps = batch_maps(s, min(batch, images - s))
        collector.update(x, y, {"features.28": spatial_max(maps)})
    top = collector.tops["features.28"]
    return {"seconds": time.perf_counter() - start, "pool": len(collector.pool),
            "ids": top.image_ids.tolist(), "values": top.values.tolist()}


def reference_top(images: int, n: int, batch: int) -> dict:
    """Pass 1 keeps every map; pass 2 sorts each unit's images by (-max, id) and keeps n."""
    start = time.perf_counter()
    maps, ids = [], []
    for s in range(0, images, batch):
        x, _, m = batch_maps(s, min(batch, images - s))
        maps.append(m)
        ids.append(content_ids(x))
    maps, ids = torch.cat(maps), torch.cat(ids)
    values = maps.flatten(2).amax(2)                                    # [images, units]
    by_id = ids.argsort(stable=True)                                    # ties: lower id first
    order = by_id[values[by_id].argsort(dim=0, descending=True, stable=True)[:n]].t()   # [units, n]
    return {"seconds": time.perf_counter() - start, "ids": ids[order].tolist(),
            "values": values.t().gather(1, order).tolist()}


def child(kind: str, images: int, n: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = (run_streaming if kind == "streaming" else reference_top)(images, n, batch)
    result["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    Path(out).write_text(json.dumps(result))


def vgg(a, report: Report) -> None:
    import torchvision

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("streaming", "reference"):
            out = Path(tmp) / f"{kind}.json"
            subprocess.run([sys.executable, __file__, "child", kind, str(a.images), str(a.n), str(a.batch), str(out)],
                           check=True)
            results[kind] = json.loads(out.read_text())
    same_ids = results["streaming"]["ids"] == results["reference"]["ids"]
    same_values = torch.allclose(torch.tensor(results["streaming"]["values"]).float(),
                                 torch.tensor(results["reference"]["values"]).float())
    torch.set_num_threads(a.threads or torch.get_num_threads())
    net = torchvision.models.vgg16().features[:29].eval()
    x = torch.rand(a.forward_images, 3, SIDE, SIDE)
    with torch.no_grad():
        net(x[:1])
        start = time.perf_counter()
        net(x)
        per_image = (time.perf_counter() - start) / a.forward_images
    pool = results["streaming"]["pool"]
    report.print(f"VGG16 features.28, {UNITS} units, {a.images} images at {SIDE} px, N = {a.n}, batches of "
                 f"{a.batch}; synthetic maps (see the docstring); load average {os.getloadavg()[0]:.1f}\n")
    report.print("| implementation | seconds (bookkeeping, 1 thread) | peak memory above baseline, MB | same top-N |")
    report.print("|---|---|---|---|")
    for kind in ("streaming", "reference"):
        r = results[kind]
        report.print(f"| {kind} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                     f"{'yes' if same_ids and same_values else 'NO'} |")
    report.print(f"\nVGG16 forward to features.28 ({torch.get_num_threads()} threads, random weights): "
                 f"{per_image:.2f} s per image, so {a.images * per_image:.0f} s for the pass both need; the colour "
                 f"index's extra forward: {pool} distinct images in the top-{a.n} of the 512 units = "
                 f"{pool * per_image:.0f} s.")


# -- the study ----------------------------------------------------------------------------------------
def study(a, report: Report) -> None:
    out = Path(a.out or tempfile.mkdtemp(prefix="dissection_study_"))
    cfg = compose_cfg(["experiment=cifar10_convnet", "callbacks=none", "trainer.accelerator=cpu"], out)
    pl.seed_everything(0, verbose=False)
    dm, model = instantiate(cfg.datamodule), instantiate(cfg.model)
    cb = UnitDissection(budget=None, n=a.n)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=a.epochs, limit_train_batches=a.batches,
                         limit_val_batches=a.val_batches, num_sanity_val_steps=0,
                         logger=TensorBoardLogger(str(out), name="tb", version=""), callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    rows = list(csv.DictReader((out / "tb" / "dissection" / "units.csv").open()))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    epochs = sorted({int(r["epoch"]) for r in rows})

    def mean(layer, epoch, key):
        values = [float(r[key]) for r in rows if r["layer"] == layer and int(r["epoch"]) == epoch and r[key]]
        return sum(values) / len(values) if values else float("nan")

    accuracy = trainer.callback_metrics.get("val/acc")
    report.print(f"CifarConvNet(256,64), {a.epochs} epochs of {a.batches} batches of 64, validation on "
                 f"{a.val_batches} batches, N = {a.n}; {time.perf_counter() - start:.0f} s; final val/acc "
                 f"{float(accuracy) if accuracy is not None else float('nan'):.3f}\n")
    report.print("| epoch | " + " | ".join(f"{layer} class / colour / CSI / dead" for layer in layers) + " |")
    report.print("|---|" + "---|" * len(layers))
    for e in epochs:
        cells = []
        for layer in layers:
            dead = sum(int(r["dead"]) for r in rows if r["layer"] == layer and int(r["epoch"]) == e)
            cells.append(f"{mean(layer, e, 'class_selectivity'):.3f} / {mean(layer, e, 'color_selectivity'):.3f} / "
                         f"{mean(layer, e, 'csi'):.3f} / {dead}")
        report.print(f"| {e} | " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, (("class_selectivity", "class selectivity (Rafegas et al.)"),
                                       ("color_selectivity", "colour selectivity"), ("csi", "CSI (Morcos et al.)"))):
        for layer in layers:
            ax.plot(epochs, [mean(layer, e, key) for e in epochs], marker="o", label=layer)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CifarConvNet(256,64) on CIFAR-10: mean index per layer ({a.batches} batches/epoch)", fontsize=10)
    fig.tight_layout()
    figure = ROOT / "docs" / "img" / "dissection_study.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    report.print(f"\nfigure: {figure.relative_to(ROOT)}; run dir: {out}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=["share", "vgg", "study"])
    p.add_argument("--batches", type=int, default=30, help="training batches per epoch (share, study)")
    p.add_argument("--only", default=None, help="share: a setup whose name contains this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=500, help="vgg: images")
    p.add_argument("--n", type=int, default=100, help="top images per unit")
    p.add_argument("--batch", type=int, default=25, help="vgg: images per batch")
    p.add_argument("--forward-images", type=int, default=4, help="vgg: real forwards timed")
    p.add_argument("--epochs", type=int, default=None, help="share: epochs (4), study: epochs (10)")
    p.add_argument("--val-batches", type=int, default=16, help="study: validation batches")
    p.add_argument("--out", default=None, help="study: run dir")
    a = p.parse_args()
    if a.epochs is None:
        a.epochs = 10 if a.part == "study" else 4
    if a.threads:
        torch.set_num_threads(a.threads)
    report = Report(f"dissection_{a.part}")
    {"share": share, "vgg": vgg, "study": study}[a.part](a, report)
    report.save()


if __name__ == "__main__":
    main()
