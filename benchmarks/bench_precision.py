"""Training speed by precision and memory format, in one run: seconds per epoch of an experiment's
net in float32 and bf16-mixed, each with contiguous and channels-last tensors, through Lightning
(batches timed from start to end, the first few skipped; the configurations interleaved, so a
change in the machine's load hits all of them alike).

    DATA_DIR=../shared/datasets python benchmarks/bench_precision.py experiment=cifar10_report
    DATA_DIR=../shared/datasets python benchmarks/bench_precision.py experiment=lenet_mnist --batches 100
    DATA_DIR=../shared/datasets python benchmarks/bench_precision.py --accelerator gpu experiment=cifar10_convnet

On a GPU the batch timer synchronizes the device at the start and end of each batch, so a batch's
time is its kernels' time, not the time to queue them.

Prints a table and merges it into benchmarks/precision.json (or $BENCH_JSON_DIR/precision.json)
under the experiment's name.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate

from convlens.config import compose_config
from results_json import json_dir

CONFIGS = [("32-true", False), ("32-true", True), ("bf16-mixed", False), ("bf16-mixed", True)]


class BatchTimer(pl.Callback):
    """Seconds of each training batch (forward, backward, optimizer step) after the first `skip`."""

    def __init__(self, skip: int = 5):
        self.skip, self.times, self._t0 = skip, [], None

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(self._now(pl_module) - self._t0)


def time_batches(overrides, precision: str, channels_last: bool, batches: int, out: Path,
                 accelerator: str = "cpu", module_patch=None) -> list[float]:
    """Batch times of one short fit of `overrides` (no callbacks, no logger) on `accelerator`;
    `module_patch(model)` may change the LightningModule before the fit."""
    cfg = compose_config([*overrides, "callbacks=none", f"trainer.accelerator={accelerator}",
                          f"trainer.precision={precision}", f"model.channels_last={str(channels_last).lower()}"], out)
    pl.seed_everything(0, verbose=False)
    dm, model = instantiate(cfg.datamodule), instantiate(cfg.model)
    if module_patch is not None:
        module_patch(model)
    timer = BatchTimer()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=1,
                         limit_train_batches=batches + timer.skip, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=60, help="timed batches per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configurations")
    p.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    p.add_argument("overrides", nargs="*", default=["experiment=cifar10_report"])
    a = p.parse_args()
    times: dict[tuple[str, bool], list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(a.overrides, tmp)
        dm = instantiate(cfg.datamodule)
        dm.setup("fit")
        per_epoch = math.ceil(len(dm.train_set) / dm.batch_size)
        for _ in range(a.rounds):
            for precision, channels_last in CONFIGS:
                times[(precision, channels_last)] += time_batches(a.overrides, precision, channels_last, a.batches,
                                                                   Path(tmp), a.accelerator)
    base = statistics.median(times[("32-true", False)])
    rows = []
    print(f"{' '.join(a.overrides)} on {a.accelerator}: {per_epoch} batches per epoch, "
          f"{a.rounds} x {a.batches} batches each")
    print("| precision | memory format | ms/batch (median) | s/epoch | speed-up vs float32 contiguous |")
    print("|---|---|---|---|---|")
    for (precision, channels_last), t in times.items():
        median = statistics.median(t)
        row = {"precision": precision, "channels_last": channels_last, "ms_per_batch": 1e3 * median,
               "seconds_per_epoch": median * per_epoch, "speedup": base / median}
        rows.append(row)
        print(f"| {precision} | {'channels_last' if channels_last else 'contiguous'} | {row['ms_per_batch']:.1f} "
              f"| {row['seconds_per_epoch']:.1f} | {row['speedup']:.2f}x |")
    out = json_dir() / "precision.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    key = " ".join(a.overrides) + ("" if a.accelerator == "cpu" else f" ({a.accelerator})")
    results[key] = {"date": time.strftime("%Y-%m-%d"), "accelerator": a.accelerator, "batches_per_epoch": per_epoch,
                    "threads": torch.get_num_threads(), "rows": rows}
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
