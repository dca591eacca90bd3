"""The shared plumbing of every visualization callback.

A subclass only chooses inputs, calls a `viz` function, renders and logs, in `visualize(...)`.
This base does the rest, as Lightning's own callbacks do:
- runs every `every_n_epochs` epochs at the end of the training epoch (after validation, so this
  epoch's `val/acc` is known; outside inference mode, so methods that need gradients work), or only
  at fit end with `every_n_epochs=0`; on rank zero only; never in the sanity check or `fast_dev_run`;
- a fixed probe set chosen at fit start (the datamodule's `probe_batch`, then a seeded subset),
  kept in `state_dict` so a resumed run shows the same images;
- layer names validated in `setup`, with the valid names in the error;
- its own wall time logged as the scalar `viz_time/<name>`;
- images logged with the trainer's `global_step` to TensorBoard, or as PNG files under
  `<run dir>/viz/<tag>/` when the logger is not TensorBoard (or there is none).
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import nn
from torchvision.utils import save_image

from viz.layers import LayerError, get_layer, layer_names


def image_summary(tag: str, image: torch.Tensor) -> Summary:
    """A TensorBoard image summary of a [1|3, H, W] image in [0, 1], as `SummaryWriter.add_image`
    writes it (values truncated to uint8) but PNG-compressed at level 1: about 3x faster to
    encode than add_image's default level 6, for ~15% larger files. PNG encoding was the largest
    single cost of the callbacks on LeNet (benchmarks/RESULTS.md, section 3)."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    channels = pixels.shape[2]
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buffer, format="PNG", compress_level=1)
    encoded = Summary.Image(height=pixels.shape[0], width=pixels.shape[1], colorspace=channels,
                            encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


class VisualizationCallback(pl.Callback):
    #: used in `viz_time/<name>`; subclasses set it
    name: str = "viz"
    #: the module type(s) `layers` must name (None: any module)
    layer_kind: type | tuple[type, ...] | None = nn.Conv2d
    #: False for a callback that works on the whole model (e.g. occlusion): `setup` then skips
    #: choosing and validating layers
    needs_layers: bool = True

    def __init__(self, layers: Sequence[str] | None = None, every_n_epochs: int = 1,
                 num_probe: int | None = None, probe_per_class: int = 1, probe_seed: int = 0):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be an int >= 0 (0: only at fit end), got {every_n_epochs!r}")
        if num_probe is not None and num_probe < 1:
            raise ValueError(f"num_probe must be >= 1 or None (all probe images), got {num_probe}")
        if probe_per_class < 1:
            raise ValueError(f"probe_per_class must be >= 1, got {probe_per_class}")
        if isinstance(layers, str):
            layers = [layers]
        self.layers: list[str] | None = list(layers) if layers is not None else None
        self.every_n_epochs, self.num_probe = every_n_epochs, num_probe
        self.probe_per_class, self.probe_seed = probe_per_class, probe_seed
        self.probe_images: torch.Tensor | None = None
        self.probe_labels: torch.Tensor | None = None

    # -- what subclasses implement -------------------------------------------------------------
    def default_layers(self, net: nn.Module) -> list[str]:
        """Layers used when none are configured: every layer of `layer_kind`."""
        return layer_names(net, self.layer_kind)

    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    # -- helpers for subclasses ----------------------------------------------------------------
    @staticmethod
    def net(pl_module: pl.LightningModule) -> nn.Module:
        """The plain network (`pl_module.net`), which layer names refer to."""
        return getattr(pl_module, "net", pl_module)

    def probe(self, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed probe images (model input space) and labels, on the module's device."""
        return self.probe_images.to(pl_module.device), self.probe_labels.to(pl_module.device)

    @staticmethod
    def normalization(trainer: pl.Trainer):
        return getattr(trainer.datamodule, "normalization", None) if trainer.datamodule is not None else None

    @staticmethod
    def class_names(trainer: pl.Trainer) -> Sequence[str]:
        dm = trainer.datamodule
        names = getattr(dm, "class_names", None) if dm is not None else None
        return list(names) if names else [str(i) for i in range(getattr(dm, "num_classes", 10))]

    def log_image(self, trainer: pl.Trainer, tag: str, image: torch.Tensor) -> None:
        """Log a [3|1, H, W] image in [0, 1] under `tag` at the trainer's global step."""
        image = image.detach().float().clamp(0, 1).cpu()
        tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if tb:
            summary = image_summary(tag, image)
            for lg in tb:
                lg.experiment._get_file_writer().add_summary(summary, trainer.global_step)
            return
        folder = self._png_dir(trainer) / tag
        folder.mkdir(parents=True, exist_ok=True)
        save_image(image, folder / f"step{trainer.global_step:07d}.png")

    def log_scalars(self, trainer: pl.Trainer, scalars: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        if trainer.loggers:
            for lg in trainer.loggers:
                lg.log_metrics(scalars, step=trainer.global_step)
            return
        path = self._png_dir(trainer) / "scalars.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "tag", "value"])
            for k, v in scalars.items():
                w.writerow([trainer.global_step, k, v])

    @staticmethod
    def _png_dir(trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "viz"

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.needs_layers:
            return
        net = self.net(pl_module)
        if self.layers is None:
            self.layers = self.default_layers(net)
        for layer in self.layers:
            get_layer(net, layer, self.layer_kind)  # LayerError with the valid names
        if not self.layers:
            raise LayerError(f"{type(self).__name__}: the model has no layer to visualize "
                             f"(valid layers: {', '.join(layer_names(net)) or 'none'})")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._choose_probe(trainer)

    # offline use (visualize.py): `trainer.validate(...)` draws once, after the validation loop
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.on_fit_start(trainer, pl_module)  # what a subclass prepares at fit start, offline too

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking and self.probe_images is not None:
            self._run(trainer, pl_module)

    def _choose_probe(self, trainer: pl.Trainer) -> None:
        if self.probe_images is not None:
            return  # restored from a checkpoint: keep the same images
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "probe_batch"):
            rank_zero_warn(f"{type(self).__name__}: the datamodule has no probe_batch(); nothing will be drawn")
            return
        images, labels = dm.probe_batch(per_class=self.probe_per_class)
        if self.num_probe is not None and self.num_probe < len(labels):
            g = torch.Generator().manual_seed(self.probe_seed)
            keep = torch.randperm(len(labels), generator=g)[: self.num_probe].sort().values
            images, labels = images[keep], labels[keep]
        with torch.inference_mode(False):  # offline runs choose inside inference mode: keep normal tensors
            self.probe_images, self.probe_labels = images.detach().cpu().clone(), labels.detach().cpu().clone()

    def _due(self, trainer: pl.Trainer, at_fit_end: bool = False) -> bool:
        if trainer.sanity_checking or trainer.fast_dev_run or self.probe_images is None:
            return False
        if at_fit_end:
            return self.every_n_epochs == 0
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer, at_fit_end=True):
            self._run(trainer, pl_module)

    @rank_zero_only
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        # offline runs (trainer.validate) call this inside inference mode; methods that need
        # gradients (saliency, suppression) must see ordinary tensors
        with torch.inference_mode(False):
            self.visualize(trainer, pl_module)
        self.log_scalars(trainer, {f"viz_time/{self.name}": time.perf_counter() - start})

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"probe_images": self.probe_images, "probe_labels": self.probe_labels, "layers": self.layers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_images = state_dict.get("probe_images")
        self.probe_labels = state_dict.get("probe_labels")
        if state_dict.get("layers") is not None:
            self.layers = list(state_dict["layers"])
