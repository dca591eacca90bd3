"""The deconvnet (viz.deconvnet) on a torchvision ResNet-18, against Captum.

Top-9 projections (each image's 9 maps of highest maximum activation, each projected as the ZF
deconvnet does: the map's own activations sent back) of 16 images at 64x64, at one layer of a
random-init ResNet-18 (eval mode), timed three ways in one run, interleaved, best of `--repeats`:

- ours: `record(net, images, layer)` (one forward pass, stopped at the layer) then
  `project_many(top_units(9))` (9 backward passes over the 16 images, the first step by hand);
- Captum pair by pair: `NeuronDeconvolution(net, layer).attribute(image, neuron_selector=
  sum(F_c * F_c.detach()))`, one call per projection (16 x 9 calls of one image);
- Captum map by map: the same, once per distinct map c among the 16 x 9 selected pairs, on all the
  images that selected it;
- Captum rank by rank (the cleverest batching of Captum, for reference): 9 calls, each on all 16
  images with a selector that picks every image's j-th map;
- and, as the unit, one forward + backward of the 16 images through the whole net (a training
  step's compute, parameter gradients included).
All three attribution results are checked equal (max relative difference printed). Writes the
numbers as JSON next to RESULTS.md (`bench_deconv_general.json`).

With `--chain-nets`, instead: the same top-9 task at every conv layer of the chain nets
(CifarConvNet(256, 64) on 32x32x3, LeNet on 28x28x1; 16 images), one `record_layers` + `top_units` +
`project_many` per layer, timed in float32 and with the reverse pass's convolutions in each
`--dtypes` (e.g. bfloat16), interleaved, best of `--repeats`; the reduced-precision projections'
largest error is given as a fraction of each projection's range (JSON: `bench_deconv_paths.json`).
At commit 82fb48f this mode was `--paths chain general`, timing the hand-written chain path (since
removed) against this one (benchmarks/RESULTS.md, section 2).

    python benchmarks/bench_deconv_general.py [--layer layer2.1.conv2] [--threads 1] [--repeats 5]
    python benchmarks/bench_deconv_general.py --chain-nets [--dtypes bfloat16] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torchvision

from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.viz import deconvnet
from convlens.viz.deconvnet import record


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", nargs="+", default=["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2"])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--chain-nets", action="store_true", help="time the CIFAR net and LeNet instead (see above)")
    p.add_argument("--dtypes", nargs="*", default=["bfloat16"], help="reduced precisions to time with --chain-nets")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.chain_nets:
        return chain_nets(a)
    a.json = a.json or str(Path(__file__).with_name("bench_deconv_general.json"))
    from captum.attr import NeuronDeconvolution

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(a.images, 3, a.size, a.size)
    rows = torch.arange(a.images)
    results = []
    for layer in a.layers:
        module = dict(net.named_modules())[layer]
        captum = NeuronDeconvolution(net, module)

        def ours():
            rec = record(net, images, layer)
            _, top = rec.top_units(a.k)
            return top, rec.project_many(top)

        top, reference = ours()

        def captum_map_by_map():
            out = torch.zeros_like(reference)
            for c in top.unique().tolist():
                where = (top == c).nonzero()                     # (image, rank) pairs selecting map c
                sel = lambda o, c=c: (o[:, c] * o[:, c].detach()).sum((1, 2))  # noqa: E731
                got = captum.attribute(images[where[:, 0]].clone(), neuron_selector=sel)
                out[where[:, 0], where[:, 1]] = got
            return out

        def captum_pair_by_pair():
            out = torch.zeros_like(reference)
            for n in range(a.images):
                for j in range(a.k):
                    c = int(top[n, j])
                    sel = lambda o, c=c: (o[:, c] * o[:, c].detach()).sum((1, 2))  # noqa: E731
                    out[n, j] = captum.attribute(images[n:n + 1].clone(), neuron_selector=sel)[0]
            return out

        def captum_rank_by_rank():
            out = torch.zeros_like(reference)
            for j in range(a.k):
                c = top[:, j]
                sel = lambda o, c=c: (o[rows, c] * o[rows, c].detach()).sum((1, 2))  # noqa: E731
                out[:, j] = captum.attribute(images.clone(), neuron_selector=sel)
            return out

        def forward_backward():
            x = images.clone().requires_grad_(True)
            net(x).sum().backward()
            net.zero_grad(set_to_none=True)

        runs = {"ours": ours, "captum_pair_by_pair": captum_pair_by_pair, "captum_map_by_map": captum_map_by_map,
                "captum_rank_by_rank": captum_rank_by_rank, "forward_backward": forward_backward}
        scale = reference.abs().max()
        errors = {name: float((runs[name]() - reference).abs().max() / scale)
                  for name in ("captum_pair_by_pair", "captum_map_by_map", "captum_rank_by_rank")}
        seconds = {name: [] for name in runs}
        for _ in range(a.repeats):
            for name, f in runs.items():
                start = time.perf_counter()
                f()
                seconds[name].append(time.perf_counter() - start)
        best = {name: min(v) for name, v in seconds.items()}
        row = {"layer": layer, "maps_distinct": int(top.unique().numel()), "seconds": best,
               "ours_vs_forward_backward": best["ours"] / best["forward_backward"],
               "speedup_vs_captum_pair_by_pair": best["captum_pair_by_pair"] / best["ours"],
               "speedup_vs_captum_map_by_map": best["captum_map_by_map"] / best["ours"],
               "speedup_vs_captum_rank_by_rank": best["captum_rank_by_rank"] / best["ours"],
               "max_relative_difference": errors}
        results.append(row)
        print(f"{layer}: ours {best['ours']:.3f} s = {row['ours_vs_forward_backward']:.2f} x forward+backward "
              f"({best['forward_backward']:.3f} s); Captum pair by pair ({a.images * a.k} calls) "
              f"{best['captum_pair_by_pair']:.3f} s -> {row['speedup_vs_captum_pair_by_pair']:.1f}x; "
              f"Captum map by map ({row['maps_distinct']} calls) "
              f"{best['captum_map_by_map']:.3f} s -> {row['speedup_vs_captum_map_by_map']:.1f}x faster; Captum rank "
              f"by rank ({a.k} calls) {best['captum_rank_by_rank']:.3f} s -> "
              f"{row['speedup_vs_captum_rank_by_rank']:.1f}x; max rel. diff {errors}")
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
            "torch": torch.__version__, "images": a.images, "k": a.k, "size": a.size, "repeats": a.repeats}
    Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))


def chain_nets(a) -> None:
    """The top-`k` task at every conv of the chain nets, in float32 and in each of `a.dtypes`."""
    torch.manual_seed(0)
    nets = {"CifarConvNet(256, 64)": (CifarConvNet(256, 64).eval(), (3, 32, 32)),
            "LeNet": (LeNet().eval(), (1, 28, 28))}
    layers = ["conv1", "conv2", "conv3", "conv4"]
    dtypes = {"float32": None, **{name: getattr(torch, name) for name in a.dtypes}}
    results = []
    for name, (net, shape) in nets.items():
        images = torch.randn(a.images, *shape)

        def task(dtype, net=net, images=images):
            out = []
            for rec in deconvnet.record_layers(net, images, layers).values():
                _, top = rec.top_units(a.k)
                out.append(rec.project_many(top, dtype=dtype))
            return out

        reference = task(None)
        errors = {}
        for label, dtype in dtypes.items():
            worst = 0.0
            for got, want in zip(task(dtype), reference):
                want, got = want.flatten(2), got.flatten(2)
                span = (want.amax(2) - want.amin(2)).clamp(min=1e-30)
                worst = max(worst, float(((got - want).abs().amax(2) / span).max()))
            errors[label] = worst
        seconds = {label: [] for label in dtypes}
        for _ in range(a.repeats):
            for label, dtype in dtypes.items():
                start = time.perf_counter()
                task(dtype)
                seconds[label].append(time.perf_counter() - start)
        best = {label: min(v) for label, v in seconds.items()}
        results.append({"net": name, "seconds": best, "max_error_of_range": errors})
        print(f"{name}: " + "; ".join(f"{label} {best[label] * 1e3:.0f} ms" for label in dtypes)
              + f"; largest error / range vs float32 {errors}")
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
            "torch": torch.__version__, "fast_dtype_cpu": str(deconvnet.fast_dtype("cpu")), "images": a.images,
            "k": a.k, "layers": layers, "repeats": a.repeats}
    Path(a.json or Path(__file__).with_name("bench_deconv_paths.json")).write_text(
        json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
