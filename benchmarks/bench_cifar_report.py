"""The report's CIFAR-10 results from real training (Berthier & Mantoux, RecVis 2018 report, Fig. 4):
one run of `experiment=cifar10_report` (or any overrides), with the test accuracy of the current
weights after chosen epochs, the seconds each training epoch took, and the run's TensorBoard
images (evolution/summary is the report's Fig. 4) exported as PNGs.

    DATA_DIR=../shared/datasets python benchmarks/bench_cifar_report.py --out benchmarks/artifacts/report_bf16
    DATA_DIR=../shared/datasets python benchmarks/bench_cifar_report.py --out benchmarks/artifacts/report_fp32 \\
        --epochs 5 trainer.precision=32-true

Writes `<out>/epochs.json` ({"epochs": [{"epoch", "train_seconds", "val_acc", "test_acc"}], "config": ...})
and merges a summary into `benchmarks/cifar_report.json` under `--name` (default: the out dir's name).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from convlens.config import compose_config, instantiate_dict
from convlens.events import export_pngs

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "benchmarks" / "cifar_report.json"


class EpochStats(pl.Callback):
    """Seconds of each training epoch (without validation) and the test accuracy of the current
    weights after the epochs in `test_at` (evaluated in eval mode, under the run's precision)."""

    def __init__(self, test_at, out: Path, rows=()):
        self.test_at, self.out, self.rows, self._t0 = set(test_at), out, list(rows), None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._t1 = time.perf_counter()  # the epoch's last batch: the end of its training part

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        row = {"epoch": epoch, "train_seconds": self._t1 - self._t0,
               "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan")))}
        if epoch in self.test_at:
            row["test_acc"] = self.test_accuracy(trainer, pl_module)
        self.rows.append(row)
        self.out.joinpath("epochs.json").write_text(json.dumps({"epochs": self.rows}, indent=1))
        print(json.dumps(row), flush=True)

    @staticmethod
    def test_accuracy(trainer, pl_module) -> float:
        dm = trainer.datamodule
        dm.setup("test")
        correct = total = 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch in dm.test_dataloader():
                    images, labels = dm.on_after_batch_transfer(
                        [t.to(pl_module.device) for t in batch], 0)
                    correct += int((pl_module(images).argmax(1) == labels).sum())
                    total += len(labels)
        finally:
            pl_module.train(was_training)
        return correct / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run dir (event files, checkpoints, epochs.json)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--test-at", type=int, nargs="*", default=[5, 10, 20, 40])
    p.add_argument("--name", default=None, help="key in benchmarks/cifar_report.json (default: the out dir's name)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>/checkpoints/last.ckpt, keeping its epochs.json rows")
    p.add_argument("overrides", nargs="*", help="config overrides (default experiment: cifar10_report)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    overrides = ["experiment=cifar10_report", f"trainer.max_epochs={a.epochs}", *a.overrides]
    cfg = compose_config(overrides, a.out)
    ckpt_path, rows = None, []
    if a.resume:
        ckpt_path = a.out / "checkpoints" / "last.ckpt"
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: {ckpt_path} does not exist; run without --resume")
        epoch = torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"] + 1
        rows = [r for r in json.loads((a.out / "epochs.json").read_text())["epochs"] if r["epoch"] <= epoch]
    else:
        OmegaConf.save(cfg, a.out / "config.yaml", resolve=False)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, model = instantiate(cfg.datamodule), instantiate(cfg.model)
    stats = EpochStats([e for e in a.test_at if e <= a.epochs], a.out, rows)
    callbacks = instantiate_dict(cfg.callbacks) + [stats]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_dict(cfg.logger) or False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    wall = time.perf_counter() - start
    for lg in trainer.loggers:
        lg.finalize("success")
    export_pngs(a.out / "tensorboard", a.out / "png")
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {}
    seconds = [r["train_seconds"] for r in stats.rows]
    summary[a.name or a.out.name] = {
        "date": time.strftime("%Y-%m-%d"), "overrides": overrides, "precision": str(cfg.trainer.precision),
        "epochs": stats.rows, "median_train_seconds_per_epoch": sorted(seconds)[len(seconds) // 2],
        "fit_wall_seconds": wall, "torch_threads": torch.get_num_threads(),
        "resumed_after_epoch": rows[-1]["epoch"] if rows else None,
    }
    SUMMARY.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary[a.name or a.out.name], indent=1))


if __name__ == "__main__":
    main()
