"""Train a CNN and watch its filters in TensorBoard: `convlens-train [experiment=...] [overrides]`
(or `python train.py ...` in a checkout).

`train(cfg)` is the plain, testable function; `run_job` is it with the run bookkeeping of
`convlens.jobs` (it returns the config's `optimized_metric`, what a sweeper optimizes); `main` is the
thin Hydra entry point around that, which first answers a mistyped key on the command line
(`convlens.config.check_override_keys`).
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
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from convlens import jobs
from convlens.config import CONFIG_PATH, check_override_keys, instantiate_checked, instantiate_dict
from convlens.run_status import is_rank_zero
from convlens.errors import ConfigError, one_line, user_error
from convlens.files import atomic_write_text
from convlens.terminal import ModelSummary, log_to_run_file, quiet_lightning

log = logging.getLogger("convlens")
quiet_lightning()


def _scalar(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class _FitStart(pl.Callback):
    """The epoch a fit starts from (after a resume, the restored one)."""

    start_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_epoch = trainer.current_epoch


def checked_seed(seed: Any) -> int | None:
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return seed
    raise ConfigError(f"seed must be an integer (or null for a random one), got {seed!r}")


def _on_cpu(trainer_cfg: DictConfig) -> bool:
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def _resume(cfg: DictConfig, out: Path) -> None:
    """Check the checkpoint to resume from (a clear error for a broken one, naming an intact one)
    and take out of the run dir what a killed run wrote after it."""
    from convlens.checkpoints import load_resume_checkpoint
    from convlens.resume import prepare_resume

    ckpt = load_resume_checkpoint(cfg.ckpt_path)
    log.info("Resuming from %s (epoch %s, step %s)", cfg.ckpt_path, ckpt.get("epoch"), ckpt.get("global_step"))
    if is_rank_zero():
        prepare_resume(out, cfg.ckpt_path, ckpt)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the configured model; returns the final metrics, also written to
    `<output_dir>/metrics.json`."""
    pl.seed_everything(checked_seed(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("ckpt_path") is not None:
        _resume(cfg, out)
    datamodule = instantiate_checked(cfg.datamodule, "datamodule")
    model = instantiate_checked(cfg.model, "model")
    callbacks = instantiate_dict(cfg.get("callbacks"))
    fit_start = _FitStart()
    callbacks.append(fit_start)
    if cfg.trainer.get("enable_model_summary", True) and not any(isinstance(c, pl.callbacks.ModelSummary)
                                                                  for c in callbacks):
        callbacks.append(ModelSummary())
    loggers = instantiate_dict(cfg.get("logger"))
    extra = {}
    if cfg.trainer.get("sync_batchnorm") and _on_cpu(cfg.trainer):
        log.warning("trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm layers only work on "
                    "GPU modules): set to false on the CPU, so each process normalizes its own batches")
        extra["sync_batchnorm"] = False
    trainer: pl.Trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                                              **extra)

    log.info("Training %s on %s for %s epochs; run dir %s", type(getattr(model, "net", model)).__name__,
             type(datamodule).__name__, cfg.trainer.get("max_epochs"), out)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_seconds = time.perf_counter() - start
    metrics = {k: v for k, v in ((k, _scalar(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
    metrics["params"] = model.num_parameters()
    metrics["epochs"] = trainer.current_epoch
    # the epochs this fit trained (a resumed fit starts at the restored epoch)
    metrics["seconds_per_epoch"] = fit_seconds / max(trainer.current_epoch - fit_start.start_epoch, 1)

    if cfg.get("test"):
        # the checkpoint of the best epoch: from the ModelCheckpoint that monitors a metric
        monitoring = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
        best = monitoring[0].best_model_path if monitoring and monitoring[0].best_model_path else None
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True) if best \
            else trainer.test(model, datamodule=datamodule)
        for r in results:
            metrics.update({k: v for k, v in ((k, _scalar(v)) for k, v in r.items()) if v is not None})

    log_hparams(trainer, flat_hparams(cfg, metrics), hparam_metrics(metrics))
    # written last and atomically: its presence means "finished" to a rerun of the sweep
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    log.info("Finished: %s; metrics in %s", ", ".join(f"{k}={metrics[k]:.4g}" for k in
                                                     ("val/acc_best", "test/acc") if k in metrics),
             out / "metrics.json")
    return metrics


def _short(target: str | None) -> str:
    return target.rsplit(".", 1)[-1] if target else "none"


def _scalars(node: Any) -> dict[str, Any]:
    if not isinstance(node, DictConfig):
        return {}
    plain = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in plain.items()
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}


def flat_hparams(cfg: DictConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """The flat hyperparameters of a run, the same keys for every run of a sweep (TensorBoard's
    HParams columns): the model's name and its scalar options and those of its net (e.g. c3, c4),
    optimizer, lr, scheduler, datamodule, batch_size, max_epochs, epochs trained, params, seed.
    None becomes the string "none" (TensorBoard has no null)."""
    model = cfg.model
    net = model.get("net")
    hp: dict[str, Any] = {"model": model.get("name") or _short(net.get("_target_") if net else model.get("_target_"))}
    skip = {"name", "num_classes", "scheduler_monitor"}
    for key, value in {**_scalars(net), **_scalars(model)}.items():
        if key not in skip:
            hp[key] = value
    optimizer, scheduler = model.get("optimizer"), model.get("scheduler")
    hp["optimizer"] = _short(optimizer.get("_target_")) if optimizer else "none"
    hp["lr"] = optimizer.get("lr") if optimizer else None
    hp["scheduler"] = _short(scheduler.get("_target_")) if scheduler else "none"
    hp["datamodule"] = _short(cfg.datamodule.get("_target_"))
    hp["batch_size"] = cfg.datamodule.get("batch_size")
    hp["max_epochs"] = cfg.trainer.get("max_epochs")
    hp["epochs"] = int(metrics["epochs"])
    hp["params"] = int(metrics["params"])
    hp["seed"] = cfg.get("seed")
    return {k: "none" if v is None else v for k, v in hp.items()}


def hparam_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The HParams table's metric columns: best val accuracy, test accuracy (of the best
    checkpoint), parameter count. A metric the run did not produce (test=false) is left out."""
    pairs = {"hp/val_acc": metrics.get("val/acc_best"), "hp/test_acc": metrics.get("test/acc"),
             "hp/params": metrics.get("params")}
    return {k: float(v) for k, v in pairs.items() if v is not None}


def log_hparams(trainer: pl.Trainer, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """One HParams session per run, written once the run's metrics are known (the logger's own
    `hp_metric` placeholder is off: `default_hp_metric: false`)."""
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.log_hyperparams(hparams, metrics=metrics, step=trainer.global_step)
        else:
            lg.log_hyperparams(hparams)
            lg.log_metrics(metrics, step=trainer.global_step)
        lg.finalize("success")  # flush the events and save hparams.yaml


#: `train` with the run bookkeeping (status.json, skip finished, retry, clashes); returns the
#: value of `cfg.optimized_metric`
run_job = jobs.job(train)


def exit_on_user_error(error: BaseException) -> None:
    """Print a user error (a ConvlensError, also wrapped) as one line and exit 1; else re-raise."""
    known = user_error(error)
    if known is None:
        raise error
    # once on the terminal (stderr), once in the run's train.log: not again through the console log
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (one_line(known),), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"\nconvlens: {one_line(known)}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    log_to_run_file()
    try:
        return run_job(cfg, multirun=multirun)
    except Exception as e:
        exit_on_user_error(e)


def check_command_line(argv: list[str]) -> None:
    """`check_override_keys` on the overrides of a `convlens-train` command line (Hydra's own flags
    parsed as Hydra does); skipped where Hydra is asked for something else (--help, --cfg, another
    config)."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # a malformed flag: Hydra says what is wrong
        return
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_path
            or args.config_name or args.config_dir or args.experimental_rerun):
        return
    check_override_keys(args.overrides)


def main() -> float | None:
    """`convlens-train`: a mistyped key is answered in one line (with the closest keys) before Hydra
    starts, so no run dir is made; then the Hydra app."""
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as e:
        print(f"convlens: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    return hydra_main()


if __name__ == "__main__":
    main()
