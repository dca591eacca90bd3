"""Train a CNN and watch its filters in TensorBoard: `python train.py [experiment=...] [overrides]`.

`train(cfg)` is the plain, testable function; `main` is the thin Hydra entry point around it.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("convlens")

# errors whose message already says what was wrong and what to do: shown without a traceback
from datamodules.base import DataError  # noqa: E402
from models.module import NonFiniteLossError  # noqa: E402
from models.vgg import WeightsError  # noqa: E402
from viz.layers import LayerError  # noqa: E402

USER_ERRORS = (DataError, WeightsError, NonFiniteLossError, LayerError)


def instantiate_dict(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group dict (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def _scalar(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the configured model; returns the final metrics, also written to
    `<output_dir>/metrics.json`."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.datamodule)
    model = instantiate(cfg.model)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.perf_counter() - start
    metrics = {k: v for k, v in ((k, _scalar(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
    metrics["params"] = model.num_parameters()
    metrics["epochs"] = trainer.current_epoch
    metrics["seconds_per_epoch"] = fit_seconds / max(trainer.current_epoch, 1)

    if cfg.get("test"):
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False) if best \
            else trainer.test(model, datamodule=datamodule)
        for r in results:
            metrics.update({k: v for k, v in ((k, _scalar(v)) for k, v in r.items()) if v is not None})

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except USER_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        print(f"\nconvlens: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    return metrics.get("val/acc_best")  # what a sweeper optimizes


if __name__ == "__main__":
    main()
