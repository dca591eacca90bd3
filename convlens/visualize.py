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
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from convlens.checkpoints import load_state_checked, load_weight_file
from convlens.config import CONFIG_PATH, callback_config, instantiate_dict
from convlens.errors import ConfigError
from convlens.events import export_pngs
from convlens.callbacks.options import PROBE_OPTIONS
from convlens.datamodules.images import read_image_files
from convlens.methods import ALIASES, METHODS, method
from convlens.train import checked_seed, exit_on_user_error

log = logging.getLogger("convlens")


def method_callback(cfg: DictConfig, **options) -> pl.Callback:
    name = method(cfg.method).name
    node = cfg.callbacks.get(name) if cfg.get("callbacks") else None
    if node is None:
        node = callback_config(name)
    return instantiate(node, **options)


def user_images(cfg: DictConfig, datamodule) -> torch.Tensor:
    """The images of `image=` (a file or a folder) in model input space: decoded at the
    datamodule's image size and channels, then its normalization applied (from its training split,
    as in training)."""
    pixels, files = read_image_files(cfg.image, int(cfg.datamodule.image_size), int(cfg.datamodule.channels))
    log.info("explaining %d image(s) from %s (resized to %d px, %d channel(s); the class each is explained "
             "for is the model's prediction)", len(files), cfg.image, cfg.datamodule.image_size,
             cfg.datamodule.channels)
    normalization = getattr(datamodule, "normalization", None)
    if normalization is None and hasattr(datamodule, "setup"):
        datamodule.setup("fit")
        normalization = getattr(datamodule, "normalization", None)
    return normalization(pixels) if normalization is not None else pixels.float() / 255


def visualize(cfg: DictConfig) -> list[Path]:
    """Load `cfg.ckpt_path` into the configured model and run the method's callback once over the
    validation data; returns the PNG files written (empty with png=false)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") is None:
        raise ConfigError("convlens-visualize needs the checkpoint to visualize: pass "
                          "ckpt_path=<run dir>/checkpoints/last.ckpt (or the run's best epoch*.ckpt), "
                          "with the run's experiment=... and model options")
    pl.seed_everything(checked_seed(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.datamodule)
    if cfg.get("image"):
        callback = method_callback(cfg, probe=user_images(cfg, datamodule), num_probe=None)
    else:
        callback = method_callback(cfg)
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


def help_text() -> str:
    """`convlens-visualize help`: the command, the methods and their main options (from the
    registry and each method's packaged config)."""
    lines = ["convlens-visualize: run one visualization method on a saved checkpoint, without training.", "",
             "  convlens-visualize ckpt_path=<run>/checkpoints/last.ckpt method=<method> [image=<file or folder>]",
             "                     [experiment=... and the model/datamodule options the run was trained with]",
             "                     [callbacks.<method>.<option>=<value> ...]", "",
             "  ckpt_path   the checkpoint to explain; output goes beside it: <run>/visualize/<method>_<time>/",
             "              (TensorBoard event files, and PNG files under png/)",
             "  image       your own image file or folder (default: the validation split's probe images)",
             "  method      one of the methods below; aliases: "
             + ", ".join(f"{a} ({n})" for a, n in ALIASES.items()), "", "Methods and their options:"]
    for name, m in METHODS.items():
        node = callback_config(name)
        options = [k for k in node if k != "_target_" and k not in PROBE_OPTIONS]
        lines.append(f"  {name:<16} {m.summary}")
        lines.append(f"  {'':<16} options: {', '.join(options)}")
    lines += ["", "Probe options of every method: " + ", ".join(PROBE_OPTIONS),
              "Hydra's own flags: convlens-visualize --hydra-help"]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="visualize")
def hydra_main(cfg: DictConfig) -> None:
    try:
        written = visualize(cfg)
    except Exception as e:
        exit_on_user_error(e)
    for f in written:
        log.info("wrote %s", f)


def main() -> None:
    """`convlens-visualize`: `help` (or --help, -h) lists the methods; else the Hydra app."""
    if sys.argv[1:2] in (["help"], ["--help"], ["-h"]):
        print(help_text())
        return
    hydra_main()


if __name__ == "__main__":
    main()
