"""Deconvnet projection speed on the CIFAR grid net: `python benchmarks/bench_deconv.py`.

Task: the top-9 maps of 16 probe images (32x32) at every conv layer of CifarConvNet(256, 64),
i.e. 4 layers x 16 images x 9 maps = 576 projections.
Targets: the whole task within 3x the time of one forward+backward of the 16 images (a training
step without the optimizer: train mode, cross-entropy, backward); and a speed-up over projecting one
map at a time (one `project` call per image and map).

The reverse pass is timed in float32 and with its convolutions in bfloat16 (`project_many(...,
dtype=torch.bfloat16)`, what DeconvProjection's precision="auto" picks where
`viz.deconvnet.fast_dtype` finds native bf16: AMX CPUs, recent GPUs); the reference forward+backward
is float32 training, and is also timed under bf16 autocast for comparison.

Prints a markdown table. Options: --repeats R (best of R runs), --threads T (torch threads).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


from convlens.models.cifar import CifarConvNet
from convlens.viz.deconvnet import fast_dtype, project, record, record_layers

from results_json import Report

LAYERS = ["conv1", "conv2", "conv3", "conv4"]
N_IMAGES, TOP_K = 16, 9
SINGLE_IMAGES = 4  # one-map-at-a-time is timed on this many images and scaled to N_IMAGES


def timed(fn, repeats: int) -> float:
    """Best wall time of `fn()` over `repeats` runs, in seconds, after one warm-up call (the minimum:
    on a shared machine, other processes only ever add time)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    report = Report("deconv")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CifarConvNet(c3=256, c4=64)
    images = torch.randn(N_IMAGES, 3, 32, 32)
    labels = torch.randint(0, 10, (N_IMAGES,))

    def forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    def forward_backward_bf16_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forward_backward()

    def deconv_one_record(dtype=None):
        # one forward up to the deepest layer serves ranking and projection at every layer
        for rec in record_layers(model, images, LAYERS).values():
            _, top = rec.top_units(TOP_K)
            rec.project_many(top, dtype=dtype)

    def deconv_record_per_layer():
        for layer in LAYERS:
            rec = record(model, images, layer)
            _, top = rec.top_units(TOP_K)
            rec.project_many(top)

    per_layer = {}
    for layer, rec in record_layers(model, images, LAYERS).items():
        _, top = rec.top_units(TOP_K)
        per_layer[layer] = (timed(lambda: rec.project_many(top), args.repeats), top,
                            timed(lambda: rec.project_many(top, dtype=torch.bfloat16), args.repeats))

    def one_map_at_a_time():
        # the first SINGLE_IMAGES images only (each call costs the same); scaled up below
        for layer in LAYERS:
            top = per_layer[layer][1]
            for n in range(SINGLE_IMAGES):
                for j in range(TOP_K):
                    project(model, images[n:n + 1], layer, int(top[n, j]))

    base = timed(forward_backward, args.repeats)
    base_bf16 = timed(forward_backward_bf16_autocast, args.repeats)
    one_rec = timed(deconv_one_record, args.repeats)
    one_rec_bf16 = timed(lambda: deconv_one_record(torch.bfloat16), args.repeats)
    per_rec = timed(deconv_record_per_layer, args.repeats)
    single = timed(one_map_at_a_time, max(1, args.repeats // 2)) * N_IMAGES / SINGLE_IMAGES

    report.print(f"CifarConvNet(256, 64), {N_IMAGES} images 32x32, top-{TOP_K} maps at {', '.join(LAYERS)}; "
                 f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
                 f"{os.getloadavg()[0]:.1f}, best of {args.repeats}; fast_dtype(cpu) = {fast_dtype('cpu')}\n")
    report.print("| what | time (ms) | x fwd+bwd | target |")
    report.print("|---|---:|---:|---|")
    report.print(f"| one forward+backward, 16 images (reference: float32 training) | {base * 1e3:.1f} | 1.00 | |")
    report.print(f"| one forward+backward under bf16 autocast (for comparison) | {base_bf16 * 1e3:.1f} | "
                 f"{base_bf16 / base:.2f} | |")
    for layer in LAYERS:
        t, _, t16 = per_layer[layer]
        report.print(f"| project_many {layer}: {N_IMAGES * TOP_K} maps, reverse pass only, float32 / bfloat16 | "
                     f"{t * 1e3:.1f} / {t16 * 1e3:.1f} | {t / base:.2f} / {t16 / base:.2f} | |")
    met = "met" if one_rec <= 3 * base else "MISSED"
    report.print(f"| all 4 layers: 1 record + rank + project_many per layer, float32 | {one_rec * 1e3:.1f} | "
                 f"{one_rec / base:.2f} | <= 3x: {met} |")
    met = "met" if one_rec_bf16 <= 3 * base else "MISSED"
    report.print(f"| all 4 layers: 1 record + rank + project_many per layer, bfloat16 reverse pass | "
                 f"{one_rec_bf16 * 1e3:.1f} | {one_rec_bf16 / base:.2f} | <= 3x: {met} |")
    report.print(f"| the same, bfloat16, against the bf16-autocast forward+backward | {one_rec_bf16 * 1e3:.1f} | "
                 f"{one_rec_bf16 / base_bf16:.2f} (x autocast fwd+bwd) | |")
    met = "met" if per_rec <= 3 * base else "MISSED"
    report.print(f"| all 4 layers: record + rank + project_many per layer | {per_rec * 1e3:.1f} | {per_rec / base:.2f} "
                 f"| <= 3x: {met} |")
    report.print(f"| all 4 layers: one `project` call per map ({len(LAYERS) * N_IMAGES * TOP_K} calls; timed on "
                 f"{SINGLE_IMAGES} images, scaled) | {single * 1e3:.1f} | {single / base:.2f} | |")
    report.print(f"\nspeed-up of batched (1 record) over one map at a time: {single / one_rec:.1f}x")
    report.save()


if __name__ == "__main__":
    main()
