"""The paper's Table 1 on our nets: kernel interpretation by suppression vs its baselines.

    DATA_DIR=/work/shared/datasets python benchmarks/bench_suppression.py [--ckpt PATH] [--kernels 4]
        [--images 4] [--budgets 100,300] [--train-steps 800] [--lenet] [--lenet-ckpt PATH] [--threads 1]

Follows Zhuang et al. (2021, arXiv:2108.11054), section 4.2 and Table 1: for each layer, a few
kernels picked at random, for each kernel a few images; the metrics per (kernel, image): SSIM of the
kernel's map for X̂ against X ("S.", higher is better) and the mean square of every other kernel's map
for X̂ ("R.", the MSE against the zero map, lower is better); mean +- std over kernels and images.
Methods: ours (`viz.suppression.interpret_kernel`, defaults, budgets of --budgets updates), the same
with the paper's literal loss and optimizer (Eqs. 1-4 with alpha = beta = 1, plain gradient descent
at learning rate 10, the same budget), the baselines of `viz.baselines` (deconvnet, guided backprop,
LRP; each estimated input is the attribution min-max scaled into the image's value range), and X
itself (R. of the original image, the reference every method should go below).

Nets: CifarConvNet(256, 64) on CIFAR-10 at conv1..conv4; trained here briefly (Adam 1e-3, batch 64,
--train-steps steps) unless --ckpt gives weights, and saved under benchmarks/artifacts/ (git-ignored)
for the next run. With --lenet also LeNet on MNIST (trained the same way,
batch 100, --lenet-train-steps steps, unless --lenet-ckpt), whose conv1/conv2 are linear (no ReLU).
The images are test images on which the kernel is active (its map's maximum > 0; for LeNet's linear
conv1/conv2, any test image): the paper picks random training images, on which a ReLU kernel is
often silent, and a silent kernel's map is trivially "kept" by any input that keeps it silent.
VGG16 with ImageNet weights (the paper's net) cannot be run: the weights are not available offline.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


import torch
import torch.nn.functional as F

from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.checkpoints import load_weight_file
from convlens.viz.baselines import baseline_inputs
from convlens.viz.suppression import evaluate, feature_maps, interpret_kernel

from results_json import Report

REPORT = Report("suppression")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "benchmarks" / "artifacts" / "suppression"
CIFAR_WEIGHTS = ARTIFACTS / "cifar_convnet_256_64.pt"
LENET_WEIGHTS = ARTIFACTS / "lenet_mnist.pt"
CIFAR_LAYERS = ["conv1", "conv2", "conv3", "conv4"]
LENET_LAYERS = ["conv1", "conv2", "conv3"]

# the paper's Table 1 (VGG16 on ImageNet, last conv of each block): mean (std)
PAPER = {
    "GBP": [(0.21, 0.29, 0.67, 0.62), (0.14, 0.18, 1.51, 0.61), (0.22, 0.15, 2.88, 1.03),
            (0.19, 0.14, 1.67, 1.23), (0.14, 0.18, 0.39, 0.33)],
    "Deconv": [(0.58, 0.22, 0.54, 0.57), (0.54, 0.18, 2.24, 1.33), (0.45, 0.20, 4.25, 1.85),
               (0.20, 0.17, 2.10, 1.51), (0.11, 0.19, 0.39, 0.28)],
    "LRP": [(0.43, 0.22, 0.16, 0.16), (0.18, 0.14, 0.56, 0.37), (0.14, 0.11, 1.51, 0.96),
            (0.17, 0.14, 1.02, 0.96), (0.14, 0.18, 0.27, 0.32)],
    "Ours": [(0.90, 0.13, 0.25, 0.20), (0.92, 0.07, 0.55, 0.03), (0.83, 0.14, 0.34, 0.52),
             (0.77, 0.17, 0.07, 0.46), (0.79, 0.25, 0.07, 0.46)],
}


# -- nets and data ------------------------------------------------------------------------------

def cifar_data():
    from convlens.datamodules.cifar10 import CIFAR10DataModule

    dm = CIFAR10DataModule(root=os.environ.get("DATA_DIR", str(ROOT.parent / "shared" / "datasets")),
                           download=False, val_size=5000)
    dm.setup("fit")
    return dm


def train_net(net, dm, steps: int, batch: int = 64, seed: int = 0) -> float:
    """Train `net` from scratch on the datamodule's training split: Adam 1e-3, `batch` images a step,
    `steps` steps. Returns its accuracy on the validation split."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images, labels = dm.train_set.images, dm.train_set.labels
    g = torch.Generator().manual_seed(seed)
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(labels), (batch,), generator=g)
        loss = F.cross_entropy(net(dm.normalization(images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"  train step {step + 1}/{steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    net.eval()
    return accuracy(net, dm)


@torch.no_grad()
def accuracy(net, dm) -> float:
    net.eval()
    x, y = dm.val_set.images, dm.val_set.labels
    correct = sum((net(dm.normalization(x[i:i + 500])).argmax(1) == y[i:i + 500]).sum().item()
                  for i in range(0, len(y), 500))
    return correct / len(y)


def trained_net(make, dm, weights: Path, ckpt: str | None, train_steps: int, batch: int):
    """(net, how): the net from `ckpt`, else from `weights` saved by an earlier run, else trained
    here for `train_steps` steps and saved to `weights` (with a .json note of how)."""
    net = make()
    if ckpt or weights.is_file():
        path = Path(ckpt) if ckpt else weights
        net.load_state_dict(load_weight_file(path))
        net.eval()
        meta = path.with_suffix(".json")
        trained = f" ({json.loads(meta.read_text())['how']})" if not ckpt and meta.is_file() else ""
        return net, f"weights {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}{trained}, " \
                    f"val acc {accuracy(net, dm):.3f}"
    print(f"training {type(net).__name__} for {train_steps} steps ...", flush=True)
    start = time.perf_counter()
    acc = train_net(net, dm, train_steps, batch)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), weights)
    how = (f"trained by this script: {train_steps} steps of Adam 1e-3, batch {batch}, "
           f"{time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s)")
    weights.with_suffix(".json").write_text(json.dumps({"how": how, "val_acc": acc}))
    return net, f"{how}, val acc {acc:.3f}; saved to {weights.relative_to(ROOT)}"


# -- the comparison ------------------------------------------------------------------------------

def pick(net, images: torch.Tensor, layer: str, kernels: int, per_kernel: int,
         generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(images [M, C, H, W], kernel index [M], rectified): `kernels` random kernels of the layer among
    those active on at least `per_kernel` images, each with `per_kernel` random such images (any
    images for unrectified maps, whose values are signed)."""
    from convlens.viz.suppression import follows_relu

    rectified = follows_relu(net, images, layer)
    maps = feature_maps(net, images, layer, rectified)
    active = maps.flatten(2).amax(2) > 0 if rectified else torch.ones(maps.shape[:2], dtype=torch.bool)
    usable = (active.sum(0) >= per_kernel).nonzero().flatten()
    chosen = usable[torch.randperm(len(usable), generator=generator)[:kernels]]
    rows, channels = [], []
    for k in chosen.tolist():
        candidates = active[:, k].nonzero().flatten()
        rows.append(candidates[torch.randperm(len(candidates), generator=generator)[:per_kernel]])
        channels += [k] * per_kernel
    return images[torch.cat(rows)], torch.tensor(channels), rectified


def stats(values: torch.Tensor, digits: str = ".2f") -> str:
    values = values.double()
    std = values.std().item() if len(values) > 1 else 0.0
    return f"{values.mean().item():{digits}} ± {std:{digits}}"


def compare_layer(net, images, channel, layer, budgets, paper_steps) -> list[tuple[str, dict, float]]:
    """[(method, metrics, seconds)] for every method on these (image, kernel) pairs."""
    rows = []
    start = time.perf_counter()
    reference = evaluate(net, images, images, layer, channel)
    rows.append(("X itself (reference)", reference, time.perf_counter() - start))
    for steps in budgets:
        start = time.perf_counter()
        _, metrics = interpret_kernel(net, images, layer, channel, steps=steps)
        rows.append((f"ours, {steps} steps (defaults)", metrics, time.perf_counter() - start))
    if paper_steps:
        start = time.perf_counter()
        _, metrics = interpret_kernel(net, images, layer, channel, alpha=1.0, beta=1.0, steps=paper_steps,
                                      lr=10.0, optimizer="gd", patience=50, loss_scale="paper")
        rows.append((f"ours, paper's literal loss + GD lr 10, {paper_steps} steps", metrics,
                     time.perf_counter() - start))
    for method, label in (("deconv", "Deconv"), ("guided_backprop", "GBP"), ("lrp", "LRP")):
        for scaling in ("minmax", "symmetric"):
            start = time.perf_counter()
            x_hat = baseline_inputs(net, images, layer, channel, method, scaling)
            metrics = evaluate(net, images, x_hat, layer, channel)
            rows.append((f"{label} ({scaling})", metrics, time.perf_counter() - start))
    return rows


def print_net(title: str, net, images, layers, args, generator) -> None:
    REPORT.print(f"\n### {title}\n")
    for layer in layers:
        x, channel, rectified = pick(net, images, layer, args.kernels, args.images, generator)
        kernels = sorted(set(channel.tolist()))
        REPORT.print(f"**{layer}** ({'rectified' if rectified else 'linear, signed'} maps "
              f"{list(feature_maps(net, x[:1], layer).shape[-2:])}; kernels {kernels}, "
              f"{args.images} images each)\n")
        REPORT.print("| method | SSIM(S.) ↑ | MSE(R.) ↓ | R. / R. of X | time (s) |")
        REPORT.print("|---|---|---|---|---|")
        for name, m, seconds in compare_layer(net, x, channel, layer, args.budgets, args.paper_steps):
            REPORT.print(f"| {name} | {stats(m['ssim'])} | {stats(m['mse'], '.2g')} | {stats(m['mse_relative'])} "
                  f"| {seconds:.1f} |")
        REPORT.print("", flush=True)


def print_paper() -> None:
    REPORT.print("\n### The paper's Table 1 (VGG16, ImageNet; last conv of blocks 1-5; mean ± std)\n")
    REPORT.print("| method | " + " | ".join(f"block {b} S. | block {b} R." for b in range(1, 6)) + " |")
    REPORT.print("|---|" + "---|" * 10)
    for method, cells in PAPER.items():
        row = " | ".join(f"{s:.2f} ± {ss:.2f} | {r:.2f} ± {rs:.2f}" for s, ss, r, rs in cells)
        REPORT.print(f"| {method} | {row} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None,
                        help="CifarConvNet(256, 64) weights (.pt state dict or Lightning .ckpt)")
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--kernels", type=int, default=4, help="kernels per layer (the paper: 4)")
    parser.add_argument("--images", type=int, default=4, help="images per kernel (the paper: 180)")
    parser.add_argument("--pool", type=int, default=500, help="validation images the images are drawn from")
    parser.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=[100, 300],
                        help="step budgets of our method (comma separated)")
    parser.add_argument("--paper-steps", type=int, default=300,
                        help="budget of the paper's literal loss and optimizer (0: skip)")
    parser.add_argument("--lenet", action="store_true", help="also LeNet on MNIST (its linear conv1/conv2)")
    parser.add_argument("--lenet-ckpt", default=None, help="LeNet weights (.pt state dict or Lightning .ckpt)")
    parser.add_argument("--lenet-train-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded CPU two threads were several times slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    dm = cifar_data()
    net, how = trained_net(lambda: CifarConvNet(c3=256, c4=64), dm, CIFAR_WEIGHTS, args.ckpt,
                           args.train_steps, batch=64)
    REPORT.print(f"CifarConvNet(256, 64): {how}")
    images = dm.normalization(dm.val_set.images[:args.pool])
    print_net("CifarConvNet(256, 64) on CIFAR-10", net, images, CIFAR_LAYERS, args, generator)
    if args.lenet:
        from convlens.datamodules.mnist import MNISTDataModule

        mnist = MNISTDataModule(root=os.environ.get("DATA_DIR", str(ROOT.parent / "shared" / "datasets")),
                                download=False)
        mnist.setup("fit")
        lenet, how = trained_net(LeNet, mnist, LENET_WEIGHTS, args.lenet_ckpt, args.lenet_train_steps, batch=100)
        REPORT.print(f"\nLeNet: {how}")
        print_net("LeNet on MNIST", lenet, mnist.normalization(mnist.val_set.images[:args.pool]), LENET_LAYERS,
                  args, generator)
    print_paper()
    REPORT.save()


if __name__ == "__main__":
    main()
