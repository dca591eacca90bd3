"""Run any visualization on a saved checkpoint without training:

    convlens-visualize ckpt_path=<run>/checkpoints/last.ckpt method=deconv [experiment=...] [overrides]

(`python visualize.py ...` in a checkout.) `method` is a name of `convlens.methods.METHODS`. Uses the
same config groups as training (model, datamodule, trainer, logger, callbacks): the method's callback
comes from `callbacks.<method>` when the composed config has it (so `callbacks.deconv.k=8` works),
else from the packaged `conf/callbacks/<method>.yaml`. Images are written to TensorBoard
(`<run dir>/tensorboard`) and, with `png=true`, as PNG files under `<run dir>/png/`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from convlens.checkpoints import load_state_checked, load_weight_file
from convlens.config import CONFIG_PATH, callback_config, instantiate_dict
from convlens.errors import ConfigError
from convlens.events import export_pngs
from convlens.methods import method
from convlens.train import checked_seed, exit_on_user_error

log = logging.getLogger("convlens")


def method_callback(cfg: DictConfig) -> pl.Callback:
    name = method(cfg.method).name
    node = cfg.callbacks.get(name) if cfg.get("callbacks") else None
    if node is None:
        node = callback_config(name)
    return instantiate(node)


def visualize(cfg: DictConfig) -> list[Path]:
    """Load `cfg.ckpt_path` into the configured model and run the method's callback once over the
    validation data; returns the PNG files written (empty with png=false)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") is None:
        raise ConfigError("convlens-visualize needs the checkpoint to visualize: pass "
                          "ckpt_path=<run dir>/checkpoints/last.ckpt (or the run's best epoch*.ckpt), "
                          "with the run's experiment=... and model options")
    pl.seed_everything(checked_seed(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    callback = method_callback(cfg)
    datamodule = instantiate(cfg.datamodule)
    model = instantiate(cfg.model)
    load_state_checked(model.net, load_weight_file(cfg.ckpt_path), str(cfg.ckpt_path))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[callback], logger=loggers or False,
                                      limit_val_batches=cfg.limit_val_batches or 1.0,
                                      enable_checkpointing=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    if getattr(callback, "declined", False):  # asked for by name: a method that cannot draw is an error here
        raise ConfigError(f"convlens-visualize method={cfg.method}: {callback.declined_reason}")
    return export_pngs(out, out / "png") if cfg.png and loggers else []


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="visualize")
def main(cfg: DictConfig) -> None:
    try:
        written = visualize(cfg)
    except Exception as e:
        exit_on_user_error(e)
    for f in written:
        log.info("wrote %s", f)


if __name__ == "__main__":
    main()
