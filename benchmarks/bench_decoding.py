"""Speed and memory of filter decoding (viz/decoding.py). Prints a markdown table.

    python benchmarks/bench_decoding.py [--repeats 5] [--vgg-filters 512] [--chunk-size N] [--threads N]
    python benchmarks/bench_decoding.py --lenet-checkpoint CKPT [--mnist-images 2000]

* LeNet: every filter of every conv layer (conv1..conv4, 580 filters), nearest unpooling, the
  whole call (chain tracing included). Target: < 0.2 s.
* VGG16 features.28 (random weights; the speed does not depend on their values): all 512 filters
  decoded to 196x196 (the substituted kernel, see viz/decoding.py), in a fresh subprocess so that
  its peak resident set size (getrusage ru_maxrss, the kernel's high-water mark of the process)
  is its own. Reported: peak RSS of the process, and its increase over the RSS right before the
  call (model loaded, one warm-up filter decoded). Target: peak under 4 GB.

With --lenet-checkpoint (a LeNet state dict or Lightning checkpoint, e.g. one trained by
`train.py experiment=lenet_mnist`), it prints instead the paper's Table 1 on that net: Eq. 3's
error (mean +- std) for L3, L5, L7 (conv2, conv3, conv4) and the three unpooling modes, over the
first --mnist-images MNIST test images (DATA_DIR or ../shared/datasets, mean training image
subtracted as the datamodule does), and the Fig. 1 diagonal: for each decoded conv4 filter, the
class whose images give its highest response.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path


import torch

from convlens.models.lenet import LeNet
from convlens.models.vgg import VGG16
from convlens.viz.decoding import CHUNK_BUDGET_BYTES, decode_filters

from results_json import Report

LENET_TARGET_S = 0.2
VGG_MEMORY_TARGET_BYTES = 4 * 2**30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_lenet(repeats: int) -> list[float]:
    torch.manual_seed(0)
    net = LeNet()
    layers = ["conv1", "conv2", "conv3", "conv4"]
    for layer in layers:  # warm-up
        decode_filters(net, layer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            decode_filters(net, layer)
        times.append(time.perf_counter() - start)
    return times


def _vgg_worker(filters: int, chunk_size: int | None, threads: int | None, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = VGG16()
    decode_filters(net, "features.28", filters=[0], chunk_size=1)  # warm-up, allocator settled
    before, peak_before = _rss_bytes(), _peak_rss_bytes()
    start = time.perf_counter()
    decoded = decode_filters(net, "features.28", filters=range(filters), chunk_size=chunk_size)
    elapsed = time.perf_counter() - start
    queue.put(dict(seconds=elapsed, shape=tuple(decoded.shape), peak=_peak_rss_bytes(), before=before,
                   peak_before=peak_before, threads=torch.get_num_threads()))


def bench_vgg(filters: int, chunk_size: int | None, threads: int | None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_vgg_worker, args=(filters, chunk_size, threads, queue))
    worker.start()
    result = queue.get()
    worker.join()
    return result


def _run_normalization(checkpoint: str) -> str:
    """The datamodule normalization of the train.py run that wrote `checkpoint` (its
    .hydra/config.yaml), or mean_image when the checkpoint is not in a run dir."""
    from omegaconf import OmegaConf

    for parent in Path(checkpoint).resolve().parents:
        config = parent / ".hydra" / "config.yaml"
        if config.is_file():
            return OmegaConf.load(config).datamodule.get("normalization", "mean_image")
    return "mean_image"


def table1(checkpoint: str, count: int, normalization: str | None = None) -> None:
    from torchvision.datasets import MNIST

    from convlens.datamodules.base import make_normalization

    from convlens.checkpoints import load_weight_file
    from convlens.viz.decoding import class_max_responses, reconstruction_error

    state = load_weight_file(checkpoint)  # strips a "net."/"model." prefix
    net = LeNet()
    net.load_state_dict(state)
    root = os.environ.get("DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    normalization = normalization or _run_normalization(checkpoint)
    # the datamodule's preprocessing: the mean training image subtracted (from 0..1 or 0..255 pixels)
    normalize = make_normalization(normalization, MNIST(root, train=True).data[:, None])
    test = MNIST(root, train=False)
    images = normalize(test.data[:count, None])
    labels = test.targets[:count]
    with torch.no_grad():
        accuracy = (net.eval()(images).argmax(1) == labels).float().mean().item()
    print(f"{checkpoint}: accuracy {accuracy:.4f} on the first {count} MNIST test images "
          f"(normalization {normalization})\n")
    modes = ("bicubic", "nearest", "bilinear")  # the paper's column order
    print("| layer | " + " | ".join(modes) + " |")
    print("|---|---|---|---|")
    for layer, name in (("conv2", "L3"), ("conv3", "L5"), ("conv4", "L7")):
        cells = [reconstruction_error(net, layer, images, unpool=mode) for mode in modes]
        print(f"| {name} ({layer}) | " + " | ".join(f"{m:.5f} +- {s:.4f}" for m, s in cells) + " |")
    values, _ = class_max_responses(decode_filters(net, "conv4"), images, labels, 10)
    best = values.argmax(dim=1).tolist()
    print(f"\nFig. 1: class of the highest response per decoded conv4 filter: {best} "
          f"({sum(b == k for k, b in enumerate(best))}/10 on the diagonal)")


def main() -> None:
    report = Report("decoding")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of the LeNet decode")
    parser.add_argument("--vgg-filters", type=int, default=512, help="filters of features.28 to decode (all: 512)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help=f"filters per chunk for VGG16 (default: derived from {CHUNK_BUDGET_BYTES >> 20} MiB)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--lenet-checkpoint", default=None, help="print Table 1 for this trained LeNet instead")
    parser.add_argument("--mnist-images", type=int, default=2000, help="test images for --lenet-checkpoint")
    parser.add_argument("--normalization", default=None, choices=["mean_image", "mean_image_255"],
                        help="the checkpoint's input preprocessing (default: read from its run's "
                             ".hydra/config.yaml, else mean_image)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lenet_checkpoint:
        table1(args.lenet_checkpoint, args.mnist_images, args.normalization)
        return

    lenet = bench_lenet(args.repeats)
    vgg = bench_vgg(args.vgg_filters, args.chunk_size, args.threads)
    gib = 2**30
    best = min(lenet)
    report.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    report.print("| case | time | memory | target | met |")
    report.print("|---|---|---|---|---|")
    report.print(f"| LeNet, all filters of conv1-conv4 (580), nearest | best {best * 1e3:.1f} ms, "
                 f"median {statistics.median(lenet) * 1e3:.1f} ms of {args.repeats} | - "
                 f"| < {LENET_TARGET_S * 1e3:.0f} ms | "
                 f"{'yes' if best < LENET_TARGET_S else 'NO'} |")
    report.print(f"| VGG16 features.28, {args.vgg_filters} filters -> {vgg['shape']}, chunk "
                 f"{args.chunk_size or 'auto'} | {vgg['seconds']:.1f} s "
                 f"({vgg['seconds'] / args.vgg_filters * 1e3:.0f} ms/filter) | "
                 f"peak RSS {vgg['peak'] / gib:.2f} GiB (+{(vgg['peak'] - vgg['before']) / gib:.2f} GiB over "
                 f"{vgg['before'] / gib:.2f} GiB before the call; peak before it {vgg['peak_before'] / gib:.2f} GiB) "
                 f"| peak < 4 GiB | "
                 f"{'yes' if vgg['peak'] < VGG_MEMORY_TARGET_BYTES else 'NO'} |")
    report.save()


if __name__ == "__main__":
    main()
