"""Speed of occlusion sensitivity (viz/occlusion.py). Prints a markdown table.

    python benchmarks/bench_occlusion.py [--images 16] [--repeats 2] [--max-batch N] [--threads N]

16 CIFAR-size images (random, 3x32x32) through CifarConvNet(256, 64) (random weights, eval mode),
patch 7, stride 1: 26 x 26 = 676 positions per image, 10,816 occluded forward passes in all.

* limit: the same number of forward passes with no occlusion work, all in one batch, under
  torch.inference_mode (the inputs are built before the clock starts). Also shown: the same
  forward passes in batches of --max-batch, the batch size occlusion_maps uses.
  Target: limit time / occlusion time >= 0.9.
* captum.attr.Occlusion on the same inputs and targets (sliding window 3x7x7, strides 3x1x1,
  the same fill, forward = softmax of the logits): the same number of forward passes (plus one
  unoccluded). captum puts perturbations_per_eval occlusions of every image in one forward pass,
  so perturbations_per_eval = --max-batch // --images gives it the same batch size as ours.

* occlusion work alone: occlusion_maps with a near-free model (per-channel means times a fixed
  3x10 matrix), i.e. building the masked copies, softmax and bookkeeping. On a shared, loaded CPU
  the forward timings above swing by 10-20% between runs; this one says how far the occlusion
  work itself is from the limit: limit / (limit + this).

Each case runs --repeats times, interleaved; the best time is reported.
"""
from __future__ import annotations

import argparse
import os
import time


import torch
from captum.attr import Occlusion

from convlens.models.cifar import CifarConvNet
from convlens.viz.occlusion import default_max_batch, occlusion_maps

RATIO_TARGET = 0.9


class ChannelMeans(torch.nn.Module):
    """Logits = per-channel means times a fixed matrix: a classifier that costs almost nothing."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.register_buffer("mixing", torch.randn(channels, classes))

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.mixing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="occluded copies per forward pass (default: occlusion_maps' own, default_max_batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.max_batch is None:
        args.max_batch = default_max_batch(3, 32, 32)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = CifarConvNet(c3=256, c4=64).eval()
    images = torch.randn(args.images, 3, 32, 32)
    patch, stride, fill = 7, 1, 0.0
    with torch.inference_mode():
        targets = model(images).argmax(1)
    positions = ((32 - patch) // stride + 1) ** 2
    passes = args.images * positions
    plain = images.repeat_interleave(positions, dim=0)  # same count and size, no occlusion work

    def forward_one_batch():
        with torch.inference_mode():
            model(plain)

    def forward_chunks():
        with torch.inference_mode():
            for start in range(0, passes, args.max_batch):
                model(plain[start:start + args.max_batch])

    def ours():
        occlusion_maps(model, images, targets, patch=patch, stride=stride, fill=fill, max_batch=args.max_batch)

    captum_occlusion = Occlusion(lambda x: model(x).softmax(dim=1))
    per_eval = max(1, args.max_batch // args.images)  # captum's batch: per_eval x images

    def captum():
        with torch.no_grad():
            captum_occlusion.attribute(images, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                                       baselines=fill, target=targets, perturbations_per_eval=per_eval)

    near_free_model = ChannelMeans(3, 10)

    def occlusion_work_alone():
        occlusion_maps(near_free_model, images, targets, patch=patch, stride=stride, fill=fill,
                       max_batch=args.max_batch)

    cases = {"forward, one batch (limit)": forward_one_batch,
             f"forward, batches of {args.max_batch}": forward_chunks,
             f"occlusion_maps, max_batch={args.max_batch}": ours,
             f"captum Occlusion, perturbations_per_eval={per_eval} (batch {per_eval * args.images})": captum,
             "occlusion work alone (near-free model)": occlusion_work_alone}
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)

    limit = best["forward, one batch (limit)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.images} images x {positions} positions = {passes} forward passes; best of {args.repeats}\n")
    print("| case | time (s) | passes/s | limit time / this time |")
    print("|---|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {passes / seconds:.0f} | {limit / seconds:.2f} |")
    ratio = limit / best[f"occlusion_maps, max_batch={args.max_batch}"]
    print(f"\ntarget limit/occlusion >= {RATIO_TARGET}: {ratio:.2f} -> {'met' if ratio >= RATIO_TARGET else 'NOT met'}")
    alone = best["occlusion work alone (near-free model)"]
    print(f"occlusion work alone: {alone:.2f} s; limit / (limit + occlusion work) = {limit / (limit + alone):.3f}")


if __name__ == "__main__":
    main()
