"""The faithfulness callback: its cost per epoch, the batched curves against one perturbation per
forward, and a study of the measures over training on the CIFAR net.

    DATA_DIR=../shared/datasets python benchmarks/bench_faithfulness.py cost [--batches N] [--threads T]
    DATA_DIR=../shared/datasets python benchmarks/bench_faithfulness.py study [--epochs E] [--batches N]

`cost`: CifarConvNet(256, 64) on CIFAR-10 32x32 (batch 64, 45,000 training images: 704 batches an
epoch), the `faithfulness` callback built from conf/callbacks/faithfulness.yaml (all five methods,
10 probe images, 20 steps, ROAD at 5 percentiles), in a Lightning fit of short epochs with a
TensorBoard logger (rendering and event writing included). A full epoch's training time = median
training batch (forward, backward, optimizer step) x 704; the callback's cost = the median of its
`visualize` times after the first epoch. Target: <= 3% of an epoch. Then the same deletion /
insertion curves (10 images, 20 steps, one map) computed batched, as `viz.faithfulness` does, and
one perturbed copy per forward (the default of Quantus and torch-cam), and ROAD likewise: target
>= 10x faster. `--threads 1 --clock process` measures the CPU seconds of one thread, which the
load of a shared machine hardly changes (see bench_callbacks.py).

`study`: the CIFAR net (the project's default recipe, `experiment=cifar10_convnet`) trained for
`--epochs` short epochs of `--batches` batches each, with the callback every epoch: per epoch the
validation accuracy, each method's deletion and insertion AUC, and its maps' similarity to its maps
of the initialised net (Spearman of |map|, SSIM), read back from the run's event files.
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

from convlens.config import callback_config, compose_config as compose_cfg
from convlens.viz.common import eval_mode
from convlens.viz.faithfulness import (EXPLANATIONS, deletion_insertion, explanation_maps, gaussian_blur, gray_fill,
                                       noisy_linear_imputation, pixel_relevance, relevance_ranks, road)

from results_json import Report
from timing import CLOCKS, BatchTimer, now, use_clock

CIFAR = ["experiment=cifar10_convnet", "model.c3=256", "model.c4=64"]
TRAIN_IMAGES = 45_000
def build(overrides: list[str], out: Path, batches: int, epochs: int, callback, timer=None):
    cfg = compose_cfg(overrides + ["callbacks=none", "trainer.accelerator=cpu"], out)
    pl.seed_everything(0, verbose=False)
    dm, model = instantiate(cfg.datamodule), instantiate(cfg.model)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=batches,
                         limit_val_batches=10, num_sanity_val_steps=0,
                         logger=TensorBoardLogger(str(out), name="tensorboard", version=""),
                         callbacks=[c for c in (timer, callback) if c is not None], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10_000)
    return cfg, dm, model, trainer


# -- cost ---------------------------------------------------------------------------------------------
def one_per_forward_curves(net, images, maps, targets, steps):
    """Deletion and insertion with one perturbed copy per forward (masks built per copy)."""
    n, _, h, w = images.shape
    ranks = relevance_ranks(pixel_relevance(maps, (h, w)))
    delete_to = gray_fill(images).expand_as(images)
    insert_into = gaussian_blur(images, max(1.0, min(h, w) / 16))
    out = torch.empty(n, 2, steps + 1, dtype=torch.float64)
    with eval_mode(net), torch.no_grad():
        for i in range(n):
            for k in range(steps + 1):
                mask = (ranks[i] < (k * h * w * 2 + steps) // (2 * steps)).view(1, 1, h, w)
                for j, copy in enumerate((torch.where(mask, delete_to[i], images[i]),
                                          torch.where(mask, images[i], insert_into[i]))):
                    out[i, j, k] = net(copy).softmax(1)[0, targets[i]].double()
    return out


def one_per_forward_road(net, images, maps, targets, percentiles):
    n, _, h, w = images.shape
    ranks = relevance_ranks(pixel_relevance(maps, (h, w)))
    out = torch.empty(n, 2, len(percentiles), dtype=torch.float64)
    with eval_mode(net), torch.no_grad():
        for i in range(n):
            for j, q in enumerate(percentiles):
                count = round(q * h * w)
                for o, removed in enumerate((ranks[i] < count, ranks[i] >= h * w - count)):
                    copy = noisy_linear_imputation(images[i:i + 1], removed.view(1, h, w), 0.0)
                    out[i, o, j] = net(copy).softmax(1)[0, targets[i]].double()
    return out


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = now()
        result = fn()
        times.append(now() - start)
    return statistics.median(times), result


def cost(a, report: Report) -> dict:
    times: list[float] = []
    callback = instantiate(callback_config("faithfulness"))
    visualize = callback.visualize

    def timed_visualize(trainer, pl_module):
        start = now()
        visualize(trainer, pl_module)
        times.append(now() - start)

    callback.visualize = timed_visualize
    timer = BatchTimer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, dm, model, trainer = build(CIFAR, Path(tmp), a.batches, a.epochs, callback, timer)
        trainer.fit(model, datamodule=dm)
    batch_s = statistics.median(timer.seconds[len(timer.seconds) // 5:])
    per_epoch = -(-TRAIN_IMAGES // cfg.datamodule.batch_size)
    epoch_s = batch_s * per_epoch
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    report.print(f"torch threads: {torch.get_num_threads()}, clock: {a.clock}, load average: "
                 f"{os.getloadavg()[0]:.1f} (1 min); probe images: {len(callback.probe_images)}, steps: "
                 f"{callback.steps}, ROAD percentiles: {list(callback.road_percentiles)}, methods: "
                 f"{', '.join(callback.methods)} (+ random, centre)\n")
    report.print("| what | seconds | % of a CIFAR epoch | target |")
    report.print("|---|---|---|---|")
    report.print(f"| epoch = {batch_s * 1000:.1f} ms/batch x {per_epoch} batches | {epoch_s:.1f} | 100% | |")
    report.print(f"| faithfulness callback, first epoch | {times[0]:.2f} | {100 * times[0] / epoch_s:.2f}% | |")
    verdict = "met" if steady <= 0.03 * epoch_s else "MISSED"
    report.print(f"| faithfulness callback, later epochs (median) | {steady:.2f} | {100 * steady / epoch_s:.2f}% "
                 f"| <= 3%: {verdict} |")

    # the batched curves against one perturbation per forward, on the trained net and the probe images
    net = model.net
    images, labels = callback.probe_images, callback.probe_labels
    maps = explanation_maps(net, images, labels, ["gradcam"], layer=callback.layer)["gradcam"]
    batched_s, curves = timed(lambda: deletion_insertion(net, images, maps, labels, steps=20))
    single_s, single = timed(lambda: one_per_forward_curves(net, images, maps, labels, 20), repeats=1)
    gap = max((curves.deletion - single[:, 0]).abs().max().item(), (curves.insertion - single[:, 1]).abs().max().item())
    qs = list(callback.road_percentiles)
    road_s, roads = timed(lambda: road(net, images, maps, labels, qs, noise=0.0))
    road_single_s, road_single = timed(lambda: one_per_forward_road(net, images, maps, labels, qs), repeats=1)
    road_gap = max((roads.morf - road_single[:, 0]).abs().max().item(),
                   (roads.lerf - road_single[:, 1]).abs().max().item())
    report.print("\n| computation (10 images, one map) | batched s | one perturbation per forward s | speed-up | "
                 "max difference | target |")
    report.print("|---|---|---|---|---|---|")
    speedup = single_s / batched_s
    report.print(f"| deletion + insertion, 20 steps | {batched_s:.3f} | {single_s:.3f} | {speedup:.1f}x | {gap:.1e} "
                 f"| >= 10x: {'met' if speedup >= 10 else 'MISSED'} |")
    report.print(f"| ROAD, {len(qs)} percentiles x MoRF/LeRF | {road_s:.3f} | {road_single_s:.3f} | "
                 f"{road_single_s / road_s:.1f}x | {road_gap:.1e} | |")
    # a net as small as LeNet, where a forward's fixed cost outweighs its arithmetic
    from convlens.models.lenet import LeNet

    torch.manual_seed(0)
    lenet, small = LeNet().eval(), torch.randn(10, 1, 28, 28)
    small_labels = torch.arange(10)
    small_maps = explanation_maps(lenet, small, small_labels, ["gradcam"])["gradcam"]
    lenet_s, _ = timed(lambda: deletion_insertion(lenet, small, small_maps, small_labels, steps=20))
    lenet_single_s, _ = timed(lambda: one_per_forward_curves(lenet, small, small_maps, small_labels, 20), repeats=1)
    report.print(f"| LeNet 28x28 (untrained), deletion + insertion, 20 steps | {lenet_s:.3f} | {lenet_single_s:.3f} "
                 f"| {lenet_single_s / lenet_s:.1f}x | | |")
    return {"epoch_s": epoch_s, "callback_s": steady, "callback_first_s": times[0], "batched_s": batched_s,
            "single_s": single_s, "road_batched_s": road_s, "road_single_s": road_single_s,
            "lenet_batched_s": lenet_s, "lenet_single_s": lenet_single_s}


# -- study --------------------------------------------------------------------------------------------
def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def study(a, report: Report) -> dict:
    callback = instantiate(callback_config("faithfulness"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg, dm, model, trainer = build(["experiment=cifar10_convnet"], Path(tmp), a.batches, a.epochs, callback)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - start
        logged = scalars(Path(tmp) / "tensorboard")
    steps = sorted(logged["val/acc"])
    report.print(f"CifarConvNet(c3={cfg.model.c3}, c4={cfg.model.c4}), experiment=cifar10_convnet, {a.epochs} epochs "
                 f"of {a.batches} batches of {cfg.datamodule.batch_size} ({a.batches * cfg.datamodule.batch_size} "
                 f"images an epoch), {len(callback.probe_images)} probe images, {seconds / 60:.1f} min in all; "
                 f"flagged: {', '.join(sorted(callback.flagged)) or 'none'}\n")
    names = list(EXPLANATIONS) + ["random", "centre"]
    report.print("| epoch | val acc | " + " | ".join(f"{n} del / ins" for n in names) + " |")
    report.print("|---|---|" + "---|" * len(names))
    rows = []
    for epoch, step in enumerate(steps, 1):
        cell = lambda n, s: logged.get(f"faithfulness/{n}/{s}", {}).get(step, float("nan"))  # noqa: E731
        report.print(f"| {epoch} | {100 * logged['val/acc'][step]:.1f}% | "
                     + " | ".join(f"{cell(n, 'deletion_auc'):.3f} / {cell(n, 'insertion_auc'):.3f}" for n in names)
                     + " |")
        rows.append({"epoch": epoch, "val_acc": logged["val/acc"][step],
                     **{f"{n}/{s}": cell(n, s) for n in names for s in ("deletion_auc", "insertion_auc", "road_morf",
                                                                      "road_lerf")}})
    report.print("\nsimilarity to the maps of the initialised net (Spearman of |map| / SSIM; 1: unchanged)\n")
    report.print("| epoch | " + " | ".join(EXPLANATIONS) + " |")
    report.print("|---|" + "---|" * len(EXPLANATIONS))
    for epoch, step in enumerate(steps, 1):
        sim = lambda m, s: logged.get(f"sanity/{m}/{s}", {}).get(step, float("nan"))  # noqa: E731
        report.print(f"| {epoch} | " + " | ".join(f"{sim(m, 'spearman_abs'):.2f} / {sim(m, 'ssim'):.2f}"
                                                  for m in EXPLANATIONS) + " |")
        rows[epoch - 1].update({f"{m}/{s}": sim(m, s) for m in EXPLANATIONS for s in ("spearman", "spearman_abs",
                                                                                     "ssim")})
    return {"study": rows, "flagged": sorted(callback.flagged)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["cost", "study"])
    p.add_argument("--batches", type=int, default=None, help="training batches per short epoch "
                   "(cost: 30, study: 100)")
    p.add_argument("--epochs", type=int, default=None, help="short epochs (cost: 3, study: 20)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall")
    a = p.parse_args()
    use_clock(a.clock)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.batches = a.batches or (30 if a.what == "cost" else 100)
    a.epochs = a.epochs or (3 if a.what == "cost" else 20)
    report = Report(f"faithfulness_{a.what}")
    extra = cost(a, report) if a.what == "cost" else study(a, report)
    report.save(extra)


if __name__ == "__main__":
    main()
