"""Cost of the training loss's finiteness check per step, in one run (`ClassifierModule`: a NaN or
infinite loss stops the run; the check reads the loss on the host every step on a CPU, and only at
the logging interval on a GPU, where reading it every step would make the host wait for the
device). Three variants of the same short fit, interleaved round by round:

- `no check`: the check patched out (the baseline);
- `default`: as the module runs it on this accelerator;
- `every step`: the check forced at every step (what the default avoids on a GPU).

    DATA_DIR=../shared/datasets python benchmarks/bench_nan_check.py experiment=cifar10_convnet
    DATA_DIR=../shared/datasets python benchmarks/bench_nan_check.py --accelerator gpu experiment=cifar10_convnet

Prints ms per step and each variant's cost per step against `no check`; writes nan_check.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench_precision import time_batches
from results_json import Report

from convlens.config import compose_config


def no_check(model) -> None:
    model._check_finite = lambda batch_idx: None


def every_step(model) -> None:
    model._check_every_step = lambda loss: True


VARIANTS = {"no check": no_check, "default": None, "every step": every_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=100, help="timed batches per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    p.add_argument("overrides", nargs="*", default=["experiment=cifar10_convnet"])
    a = p.parse_args()
    report = Report("nan_check")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*a.overrides, f"trainer.accelerator={a.accelerator}"], tmp)
        precision, channels_last = str(cfg.trainer.precision), bool(cfg.model.get("channels_last", False))
        for _ in range(a.rounds):
            for name, patch in VARIANTS.items():
                times[name] += time_batches(a.overrides, precision, channels_last, a.batches, Path(tmp),
                                            a.accelerator, module_patch=patch)
    base = statistics.median(times["no check"])
    report.print(f"{' '.join(a.overrides)} on {a.accelerator}, precision {precision}, "
                 f"{a.rounds} x {a.batches} batches per variant\n")
    report.print("| finiteness check | ms/step (median) | cost per step vs no check | % of a step |")
    report.print("|---|---|---|---|")
    for name, t in times.items():
        median = statistics.median(t)
        report.print(f"| {name} | {1e3 * median:.3f} | {1e6 * (median - base):+.0f} us "
                     f"| {100 * (median - base) / base:+.2f}% |")
    report.save(extra={"overrides": a.overrides, "accelerator": a.accelerator, "precision": precision})


if __name__ == "__main__":
    main()
