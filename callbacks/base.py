"""The shared plumbing of every visualization callback.

A subclass only chooses inputs, calls a `viz` function, renders and logs, in `visualize(...)`.
This base does the rest, as Lightning's own callbacks do:
- runs every `every_n_epochs` epochs at the end of the training epoch (after validation, so this
  epoch's `val/acc` is known; outside inference mode, so methods that need gradients work), or only
  at fit end with `every_n_epochs=0`; on rank zero only; never in the sanity check or `fast_dev_run`;
- a fixed probe set chosen at fit start (the datamodule's `probe_batch`, then a seeded subset),
  kept in `state_dict` so a resumed run shows the same images;
- layer names validated in `setup`, with the valid names in the error;
- a per-instance `state_key` (the class and the options that decide its state, as Lightning's
  `ModelCheckpoint` does), so two instances of one class keep separate state in a checkpoint;
- its own wall time logged as the scalar `viz_time/<name>`;
- images logged with the trainer's `global_step` to TensorBoard, or as PNG files under
  `<run dir>/viz/<tag>/` when the logger is not TensorBoard (or there is none).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torchvision.utils import save_image

from convlens.errors import ConfigError
from convlens.events import image_summary
from convlens.render import class_caption
from convlens.viz.layers import LayerError, get_layer, layer_names

#: target values every callback that explains a class accepts
TARGETS = ("true", "predicted")


def check_int(name: str, value: Any, minimum: int, what: str = "") -> int:
    """A callback option that must be an int >= `minimum`: a ConfigError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}{what}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str], what: str = "") -> str:
    if value not in choices:
        raise ConfigError(f"Unknown {name}={value!r}; use one of {', '.join(choices)}{what}")
    return value


def check_filters(filters: Any, one_per_layer: bool = False) -> dict[str, list[int]]:
    """Filter choices, the same type in every callback: a mapping layer name -> list of filter
    indices (an int stands for a one-element list), e.g. {conv3: [0, 7, 42]}; None is {}.
    `one_per_layer`: exactly one index per layer (a tracked map)."""
    if filters is None:
        return {}
    example = "{conv3: 17}" if one_per_layer else "{conv3: [0, 7, 42]}"
    if not isinstance(filters, Mapping):
        raise ConfigError(f"filters must map layer names to lists of filter indices, e.g. {example}, "
                          f"got {type(filters).__name__}")
    out: dict[str, list[int]] = {}
    for layer, indices in filters.items():
        if not isinstance(layer, str):
            raise ConfigError(f"filters keys must be layer names (str), got {layer!r}")
        if isinstance(indices, int) and not isinstance(indices, bool):
            indices = [indices]
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not len(indices):
            raise ConfigError(f"filters[{layer!r}] must be a non-empty list of filter indices, got {indices!r}")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ConfigError(f"filters[{layer!r}] must hold filter indices (ints >= 0), got {bad}")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"filters[{layer!r}] lists a filter twice: {list(indices)}")
        if one_per_layer and len(indices) != 1:
            raise ConfigError(f"filters[{layer!r}] must name one map to track, e.g. {example}, got {list(indices)}")
        out[layer] = [int(i) for i in indices]
    return out


class VisualizationCallback(pl.Callback):
    #: used in `viz_time/<name>`; subclasses set it
    name: str = "viz"
    #: the module type(s) `layers` must name (None: any module)
    layer_kind: type | tuple[type, ...] | None = nn.Conv2d
    #: False for a callback that works on the whole model (e.g. occlusion): `setup` then skips
    #: choosing and validating layers
    needs_layers: bool = True
    #: the options (attributes, as set by the constructor) that tell two instances of a class
    #: apart in a checkpoint: they make up its `state_key`. Not the probe options: a resumed run
    #: keeps its probe images even when those change.
    state_key_options: tuple[str, ...] = ("layers",)

    def __init__(self, layers: Sequence[str] | None = None, every_n_epochs: int = 1,
                 num_probe: int | None = None, probe_per_class: int = 1, probe_seed: int = 0):
        check_int("every_n_epochs", every_n_epochs, 0, " (0: only at fit end)")
        if num_probe is not None:
            check_int("num_probe", num_probe, 1, " (or null: all probe images)")
        check_int("probe_per_class", probe_per_class, 1)
        check_int("probe_seed", probe_seed, 0)
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (not all(isinstance(x, str) and x for x in layers)):
            raise ConfigError(f"layers must be a list of layer names (or null for the defaults), got {layers!r}")
        self.layers: list[str] | None = list(layers) if layers is not None else None
        self._configured_layers = None if layers is None else tuple(layers)
        self.every_n_epochs, self.num_probe = every_n_epochs, num_probe
        self.probe_per_class, self.probe_seed = probe_per_class, probe_seed
        self.probe_images: torch.Tensor | None = None
        self.probe_labels: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        options = {k: getattr(self, k, None) for k in self.state_key_options}
        options["layers"] = self._configured_layers  # as configured, not as chosen at setup
        return self._generate_state_key(**options)

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

    def captions(self, trainer: pl.Trainer, labels) -> list[str]:
        """The class name of each label (its index where there is no name)."""
        names = self.class_names(trainer)
        return [class_caption(y, names) for y in labels]

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
