"""Run any visualization on a saved checkpoint without training:

    python visualize.py ckpt_path=<run>/checkpoints/last.ckpt method=deconv [experiment=...] [overrides]

Uses the same config groups as train.py (model, datamodule, trainer, logger, callbacks): the method's
callback comes from `callbacks.<name>` when the composed config has it (so
`callbacks.deconv_projection.k=8` works), else from `conf/callbacks/<name>.yaml`. Images are written
to TensorBoard (`<run dir>/tensorboard`) and, with `png=true`, as PNG files under `<run dir>/png/`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from models.vgg import load_state_checked, load_weight_file
from train import USER_ERRORS, instantiate_dict

log = logging.getLogger("convlens")
ROOT = Path(__file__).resolve().parent

#: method name -> its callback's config name (conf/callbacks/<name>.yaml)
METHODS = {
    "deconv": "deconv_projection",
    "decoded": "decoded_filters",
    "occlusion": "occlusion_sensitivity",
    "suppression": "kernel_suppression",
    "top_activations": "top_activations",
    "gradcam": "saliency",
}


def method_callback(cfg: DictConfig) -> pl.Callback:
    if cfg.method not in METHODS:
        raise ValueError(f"Unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    name = METHODS[cfg.method]
    node = cfg.callbacks.get(name) if cfg.get("callbacks") else None
    if node is None:
        path = ROOT / "conf" / "callbacks" / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"method={cfg.method} needs {path}, which this install does not have")
        node = OmegaConf.load(path)[name]
    return instantiate(node)


def export_pngs(event_dir: Path, out_dir: Path) -> list[Path]:
    """Every image in the event files under `event_dir`, latest step per tag, as `<out_dir>/<tag>.png`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = []
    for f in sorted(event_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            path = out_dir / f"{tag}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(acc.Images(tag)[-1].encoded_image_string)
            written.append(path)
    return written


def visualize(cfg: DictConfig) -> list[Path]:
    """Load `cfg.ckpt_path` into the configured model and run the method's callback once over the
    validation data; returns the PNG files written (empty with png=false)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
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
    return export_pngs(out, out / "png") if cfg.png and loggers else []


@hydra.main(version_base="1.3", config_path="conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    try:
        files = visualize(cfg)
    except (*USER_ERRORS, ValueError) as e:
        print(f"\nconvlens: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    for f in files:
        log.info("wrote %s", f)


if __name__ == "__main__":
    main()
