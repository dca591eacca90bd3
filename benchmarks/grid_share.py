"""A finished grid sweep in numbers: per model its test accuracy against the report's Fig. 6 value,
its seconds per epoch, and the visualization callbacks' share of that time (the `viz_time/*`
scalars each callback logs, summed per epoch, over the run's seconds per epoch).

    python benchmarks/grid_share.py logs/cifar10_grid/sweep1 [--wall 540] [--json out.json]

Used by `gpu_grid.sh`; works on any sweep of `experiment=cifar10_grid`.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from convlens.events import _accumulators
from convlens.sweep_summary import collect

#: the report's Fig. 6 test accuracies (%), (c3, c4) -> value, read approximately from its scatter plot
REPORT_FIG6 = {(64, 32): 75.8, (64, 64): 78.1, (128, 32): 78.9, (256, 32): 79.4, (128, 64): 79.5,
               (64, 128): 80.6, (128, 128): 80.8, (64, 256): 81.6, (256, 64): 81.9, (256, 128): 82.9,
               (128, 256): 82.9, (256, 256): 82.8}


def callback_seconds_per_epoch(run_dir: Path) -> float | None:
    """Median over epochs of the summed `viz_time/*` seconds logged at one step."""
    per_step: dict[int, float] = defaultdict(float)
    for acc in _accumulators(run_dir):
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("viz_time/"):
                for e in acc.Scalars(tag):
                    per_step[e.step] += e.value
    return statistics.median(per_step.values()) if per_step else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--wall", type=float, default=None, help="the sweep's wall seconds")
    p.add_argument("--exit-code", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = []
    print("| c3 | c4 | status | test acc | report (Fig. 6) | diff (points) | s/epoch | callbacks s/epoch | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job in collect(a.sweep):
        spe = job.metrics.get("seconds_per_epoch")
        cb = callback_seconds_per_epoch(job.dir)
        report = REPORT_FIG6.get((job.row, job.col))
        acc = 100 * job.test_acc if job.test_acc is not None else None
        share = 100 * cb / spe if cb is not None and spe else None
        rows.append({"c3": job.row, "c4": job.col, "status": job.status, "test_acc": acc, "report": report,
                     "seconds_per_epoch": spe, "callback_seconds_per_epoch": cb, "callback_share_percent": share})

        def f(v, spec):
            return format(v, spec) if v is not None else "-"
        diff = acc - report if acc is not None and report is not None else None
        print(f"| {job.row} | {job.col} | {job.status} | {f(acc, '.1f')} | {f(report, '.1f')} | {f(diff, '+.1f')} "
              f"| {f(spe, '.1f')} | {f(cb, '.2f')} | {f(share, '.2f')}% |")
    shares = [r["callback_share_percent"] for r in rows if r["callback_share_percent"] is not None]
    if shares:
        print(f"\ncallbacks' share of an epoch: median {statistics.median(shares):.2f}%, max {max(shares):.2f}% "
              f"(target <= 3%)")
    if a.wall is not None:
        print(f"grid wall time: {a.wall:.0f} s ({a.wall / 60:.1f} min; target < 10 min)")
    if a.json:
        a.json.write_text(json.dumps({"wall_seconds": a.wall, "exit_code": a.exit_code, "jobs": rows}, indent=1))


if __name__ == "__main__":
    main()
