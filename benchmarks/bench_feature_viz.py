"""Feature visualization (issue #24): warm start against cold, its cost per epoch, and Lucent side by side.

    DATA_DIR=/work/shared/datasets python benchmarks/bench_feature_viz.py [--part warm,lucent]
        [--epochs 10] [--train-batches 20] [--units 16] [--lucent-units 8] [--steps 64,256]
        [--lucent-path DIR] [--threads 2]

Part "warm": the CIFAR net (CifarConvNet 256/64, Adam 1e-3, batch 64) trained for --epochs epochs of
--train-batches batches (a subset: the machine is 2 shared cores) with `FeatureVisualization` on
conv1..conv4, --units units each, its default 32 warm-started steps per epoch. After the last epoch,
on the same net, the same units: a cold run of 512 steps (Lucent's budget) and a cold run of 32
steps. Figures per layer: the mean objective of each over the units, warm / cold-512 (target
>= 95%); the same for the gain over a mid-gray image, (warm - gray) / (cold 512 - gray), which does not
depend on the unit's bias (a pre-ReLU unit's objective is often negative, and a ratio of negative
values or one near 0 says little); and the callback's seconds per epoch as a share of the epoch without it, measured and
extrapolated to a full CIFAR-10 epoch (45,000 training images) from the measured seconds per batch
(target <= 3%).

Part "lucent": Lucent (`torch-lucent`, a port of Lucid; a benchmark-only dependency, never imported
by convlens) against `viz.feature_visualization.optimize_units` on the same units of LeNet (MNIST,
28x28 grayscale) and the CIFAR net, both briefly trained here (or the warm part's CIFAR net): the
objective (the mean of the unit's map, measured by `measure_units` on each tool's final image) at
equal steps, and seconds per step. Lucent runs as its users run it: `render_vis` with its standard
transforms (made for 224 px), its Fourier parameterization with ImageNet colour decorrelation (one
channel: `param.image(..., channels=1)`, no decorrelation), Adam at 0.05, our normalization as its
last transform (preprocess=False: its own is ImageNet's; MNIST's mean image resized to its canvas),
and its upsampling of images under 224 px to 224 ("Lucent", run on LeNet for the first budget
only: at 224 px a step takes seconds here, minutes on the CIFAR net); "Lucent at its size" adds
`fixed_image_size=<side>` (the images are seen at their own size), on both nets; its seconds per
step are those of that variant. Lucent runs the whole forward pass, so it gets the net cut after the
layer (our nets' heads want their input size). --lucent-path: a folder holding `lucent` (and
`kornia` <= 0.4.1, which it requires), e.g. from
`pip install --no-deps --target DIR torch-lucent kornia==0.4.1`. The LeNet grids (ours above,
Lucent at its size below, the largest budget) go to docs/img/feature_viz/.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import convlens.callbacks.feature_viz as feature_viz_module
from convlens.callbacks import FeatureVisualization
from convlens.datamodules.cifar10 import CIFAR10DataModule
from convlens.datamodules.mnist import MNISTDataModule
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule
from convlens.render import captioned_grid, stack_vertical
from convlens.viz.feature_visualization import color_sqrt, measure_units, optimize_units

from results_json import Report, json_dir

REPORT = Report("feature_viz")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "benchmarks" / "artifacts" / "feature_viz"
IMG = ROOT / "docs" / "img" / "feature_viz"
CIFAR_LAYERS = ["conv1", "conv2", "conv3", "conv4"]
LENET_LAYERS = ["conv1", "conv2", "conv3"]
FULL_EPOCH_BATCHES = 45_000 // 64 + 1


def data_root() -> str:
    return os.environ.get("DATA_DIR", str(ROOT.parent / "shared" / "datasets"))


# -- part 1: warm start against cold ---------------------------------------------------------------

class EpochClock(pl.Callback):
    """Wall time of each training epoch, validation and every callback's epoch end included."""

    def __init__(self):
        self.start, self.seconds = 0.0, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # last in the callback list: after feature_viz
        self.seconds.append(time.perf_counter() - self.start)


class BatchClock(pl.Callback):
    def __init__(self):
        self.seconds, self._t = [], 0.0

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.seconds.append(time.perf_counter() - self._t)


def warm_part(args) -> dict:
    torch.manual_seed(0)
    dm = CIFAR10DataModule(root=data_root(), download=False, batch_size=64, val_size=5000)
    net = CifarConvNet(c3=256, c4=64)
    module = ClassifierModule(net, functools.partial(torch.optim.Adam, lr=1e-3))
    callback = FeatureVisualization(layers=CIFAR_LAYERS, max_units=args.units, steps=32, summary=False)
    viz_seconds, last = [], {}
    real = feature_viz_module.optimize_units

    def recording(*a, **k):
        result = real(*a, **k)
        last[a[1]] = {"units": list(a[2]), "objectives": result.objectives.clone(), "color": k.get("color")}
        return result

    feature_viz_module.optimize_units = recording
    visualize = callback.visualize

    def timed(*a, **k):
        t0 = time.perf_counter()
        visualize(*a, **k)
        viz_seconds.append(time.perf_counter() - t0)

    callback.visualize = timed
    clock, batches = EpochClock(), BatchClock()
    trainer = pl.Trainer(max_epochs=args.epochs, limit_train_batches=args.train_batches, limit_val_batches=4,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[batches, callback, clock])
    trainer.fit(module, datamodule=dm)
    feature_viz_module.optimize_units = real
    net.eval()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ARTIFACTS / "cifar_convnet_256_64.pt")
    acc = trainer.callback_metrics.get("val/acc")

    shape = tuple(callback.probe_images.shape[1:])
    REPORT.print(f"\nCIFAR net (256/64) after {args.epochs} epochs of {args.train_batches} batches of 64 "
                 f"(val acc {float(acc):.3f} on 4 val batches); {args.units} units per layer\n")
    REPORT.print("| layer | warm, 32 steps/epoch x {0} | cold 512 | warm / cold 512 | cold 32 | units warm >= 95% "
                 "of cold 512 | gray image | gain over gray, warm / cold 512 |".format(args.epochs))
    REPORT.print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for layer in CIFAR_LAYERS:
        units, warm = last[layer]["units"], last[layer]["objectives"]
        common = dict(pixel_to_input=dm.normalization, color=last[layer]["color"], seed=12345)
        cold = optimize_units(net, layer, units, shape, steps=512, **common).objectives
        cold32 = optimize_units(net, layer, units, shape, steps=32, **common).objectives
        gray = measure_units(net, dm.normalization(torch.full((len(units),) + shape, 0.5)), layer, units)
        ratio = float(warm.mean() / cold.mean())
        gain = float((warm - gray).mean() / (cold - gray).mean())
        share_units = int((warm >= 0.95 * cold).sum())
        rows[layer] = {"warm": float(warm.mean()), "cold512": float(cold.mean()), "ratio": ratio,
                       "cold32": float(cold32.mean()), "units_95": share_units, "gray": float(gray.mean()),
                       "gain_ratio": gain, "per_unit": {"warm": warm.tolist(), "cold512": cold.tolist(),
                                                        "gray": gray.tolist()}}
        REPORT.print(f"| {layer} | {warm.mean():.3f} | {cold.mean():.3f} | {ratio:.1%} "
                     f"{'met' if ratio >= 0.95 else 'MISSED'} | {cold32.mean():.3f} | {share_units}/{len(units)} | "
                     f"{gray.mean():.3f} | {gain:.1%} {'met' if gain >= 0.95 else 'MISSED'} |")

    epochs = np.array(clock.seconds)
    viz = np.array(viz_seconds)
    per_batch = float(np.median(batches.seconds))
    without = epochs - viz
    share = float(np.median(viz / without))
    full = float(np.median(viz)) / (FULL_EPOCH_BATCHES * per_batch + float(np.median(without))
                                    - args.train_batches * per_batch)
    REPORT.print(f"\nfeature_viz per epoch (4 layers x {args.units} units x 32 steps): median "
                 f"{np.median(viz):.2f} s; epoch without it: median {np.median(without):.1f} s "
                 f"({args.train_batches} batches, {per_batch:.3f} s per batch); share of this short epoch "
                 f"{share:.1%}; extrapolated to a full CIFAR-10 epoch ({FULL_EPOCH_BATCHES} batches): {full:.2%} "
                 f"({'met' if full <= 0.03 else 'MISSED'}, target <= 3%)")
    return {"warm": rows, "viz_seconds": viz.tolist(), "epoch_seconds": epochs.tolist(),
            "seconds_per_batch": per_batch, "share_short_epoch": share, "share_full_epoch": full}


# -- part 2: Lucent side by side -------------------------------------------------------------------

def train_briefly(net, dm, batches: int, lr: float = 1e-3) -> nn.Module:
    dm.setup("fit")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i >= batches:
            break
        loss = F.cross_entropy(net(dm.normalization(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def cut_after(net: nn.Sequential, layer: str) -> nn.Sequential:
    children = OrderedDict()
    for name, child in net.named_children():
        children[name] = child
        if name == layer:
            break
    return nn.Sequential(children)


def lucent_run(lucent, net, layer, units, side, channels, normalization, steps, fixed_size):
    """Lucent's render_vis on a batch of one image per unit; its images at each of `steps` ([N, C, H, W], [0, 1])."""
    from lucent.optvis import objectives, param, render, transform

    def param_f():
        if channels == 1:
            return param.image(side, batch=len(units), channels=1)
        return param.image(side, batch=len(units))

    objective = objectives.Objective.sum([objectives.channel(layer, u, batch=i) for i, u in enumerate(units)])
    def normalize(x):  # MNIST's mean image, resized to Lucent's canvas (which grows by its pad and jitter)
        mean, std = (t if t.shape[-1] == 1 or t.shape[-2:] == x.shape[-2:] else
                     F.interpolate(t[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
                     for t in (normalization.mean, normalization.std))
        return (x - mean) / std

    transforms = list(transform.standard_transforms) + [normalize]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        images = render.render_vis(cut_after(net, layer), objective, param_f, transforms=transforms,
                                   thresholds=tuple(steps), preprocess=False, progress=False, show_image=False,
                                   fixed_image_size=side if fixed_size else None)
    return [torch.from_numpy(np.ascontiguousarray(im)).permute(0, 3, 1, 2).float() for im in images]


def mean_objective(net, normalization, layer, units, pixels) -> float:
    if pixels is None:
        return float("nan")
    return float(measure_units(net, normalization(pixels), layer, units).mean())


def lucent_part(args, lucent) -> dict:
    steps = [int(s) for s in args.steps.split(",")]
    out = {}
    nets = []
    mnist = MNISTDataModule(root=data_root(), download=False, val_size=2000)
    torch.manual_seed(0)
    nets.append(("LeNet (MNIST, 28x28 gray)", train_briefly(LeNet(), mnist, args.lenet_batches), mnist,
                 LENET_LAYERS))
    cifar = CIFAR10DataModule(root=data_root(), download=False, val_size=2000)
    net = CifarConvNet(c3=256, c4=64)
    weights = ARTIFACTS / "cifar_convnet_256_64.pt"
    if weights.is_file():
        net.load_state_dict(torch.load(weights, weights_only=True))
        cifar.setup("fit")
        net.eval()
        how = f"the warm part's net ({weights.name})"
    else:
        torch.manual_seed(0)
        net = train_briefly(net, cifar, args.lenet_batches)
        how = f"trained {args.lenet_batches} batches"
    nets.append((f"CIFAR net 256/64 ({how})", net, cifar, CIFAR_LAYERS))

    for title, net, dm, layers in nets:
        norm = dm.normalization
        val = norm(dm.val_set.images[:1000])
        c, side = val.shape[1], val.shape[-1]
        color = color_sqrt(norm.inverse(val[:200]).clamp(0, 1)) if c == 3 else None
        units = list(range(args.lucent_units))
        REPORT.print(f"\n{title}: mean objective over units {units[0]}..{units[-1]} (the mean of the unit's map on "
                     f"each tool's final image; best validation image of 1000 for reference), seconds per step\n")
        REPORT.print("| layer | steps | convlens | Lucent | Lucent at its size | best val image | s/step convlens | "
                     "s/step Lucent |")
        REPORT.print("|---|---|---|---|---|---|---|---|")
        for layer in layers:
            best = torch.stack([measure_units(net, val, layer, [u]) for u in units]).amax(1).mean()
            ours = {}
            t0 = time.perf_counter()
            for s in steps:  # one run per budget (a run's trace is transformed images)
                result = optimize_units(net, layer, units, (c, side, side), steps=s, pixel_to_input=norm, color=color)
                ours[s] = result
            ours_seconds = (time.perf_counter() - t0) / sum(steps)
            theirs, theirs_fixed, lucent_seconds = {}, {}, float("nan")
            if lucent is not None:
                t0 = time.perf_counter()
                images = lucent_run(lucent, net, layer, units, side, c, norm, steps, True)
                lucent_seconds = (time.perf_counter() - t0) / max(steps)
                theirs_fixed = {s: im for s, im in zip(steps, images)}
                if title.startswith("LeNet"):  # at 224 px the CIFAR net's layers take minutes a step here
                    images = lucent_run(lucent, net, layer, units, side, c, norm, steps[:1], False)
                    theirs = {steps[0]: images[0]}
            for s in steps:
                row = {"convlens": float(ours[s].objectives.mean()),
                       "lucent": mean_objective(net, norm, layer, units, theirs.get(s)),
                       "lucent_fixed": mean_objective(net, norm, layer, units, theirs_fixed.get(s)),
                       "best_val": float(best)}
                out.setdefault(title, {}).setdefault(layer, {})[s] = row
                REPORT.print(f"| {layer} | {s} | {row['convlens']:.3f} | {row['lucent']:.3f} | "
                             f"{row['lucent_fixed']:.3f} | {row['best_val']:.3f} | {ours_seconds * 1000:.1f} ms | "
                             f"{lucent_seconds * 1000:.1f} ms |")
            if title.startswith("LeNet") and lucent is not None and layer in ("conv2", "conv3"):
                s = max(steps)
                ours_px = norm.inverse(ours[s].images).clamp(0, 1)
                rows = [captioned_grid(ours_px, nrow=len(units), row_titles=["convlens"], tile_size=40),
                        captioned_grid(theirs_fixed[s], nrow=len(units), row_titles=["Lucent"], tile_size=40)]
                IMG.mkdir(parents=True, exist_ok=True)
                grid = stack_vertical(rows)
                Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
                    IMG / f"lenet_{layer}_vs_lucent.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="warm,lucent")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-batches", type=int, default=20)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--lucent-units", type=int, default=8)
    parser.add_argument("--steps", default="64,256")
    parser.add_argument("--lenet-batches", type=int, default=200)
    parser.add_argument("--lucent-path", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    parts = args.part.split(",")
    if len(parts) == 1:  # a part alone keeps the other part's figures: feature_viz_<part>.json
        REPORT.path = json_dir() / f"feature_viz_{parts[0]}.json"
    if "warm" in parts:
        results["warm"] = warm_part(args)
    if "lucent" in parts:
        lucent = None
        if args.lucent_path:
            sys.path.insert(0, args.lucent_path)
        try:
            import lucent  # noqa: F401  a benchmark-only dependency
            from lucent.optvis import render  # noqa: F401  imports kornia
        except Exception as e:  # noqa: BLE001  report why, run our side alone
            REPORT.print(f"\nLucent could not be imported ({type(e).__name__}: {e}); convlens alone")
            lucent = None
        else:
            lucent = sys.modules["lucent"]
        results["lucent"] = lucent_part(args, lucent)
    REPORT.save(extra={"results": results})


if __name__ == "__main__":
    main()
