"""The shared plumbing of every visualization callback.

A subclass only chooses inputs, calls a `viz` function, renders and logs, in `visualize(...)`.
This base does the rest, as Lightning's own callbacks do:
- runs every `every_n_epochs` epochs at the end of the training epoch (after validation, so this
  epoch's `val/acc` is known; outside inference mode, so methods that need gradients work), or only
  at fit end with `every_n_epochs=0`; on rank zero only; never in the sanity check or `fast_dev_run`;
- a fixed probe set chosen at fit start, kept in `state_dict` so a resumed run shows the same
  images, from the first of: the `probe=` argument (images, (images, labels), or a Dataset); the
  datamodule's `probe_batch` (then a seeded subset of `num_probe`); the trainer's validation
  dataloader (one image per class: the first `probe_per_class` of each class in dataset order,
  read directly when the dataset lists its labels as `targets`/`labels` (ImageFolder, CIFAR10),
  else in loader order from its first batches; at most `num_probe` (default 10) classes; collated
  and passed through the module's batch transfer hooks, so in model input space). Batches are
  `(images, labels, ...)` tuples/lists, dicts (`batch_keys`), or bare image tensors; anything else
  is a ConfigError at fit start naming what was found;
- the display normalization (undone to show true colors): `mean`/`std` when given, else the
  datamodule's `normalization`, else a torchvision `Normalize` found in the validation dataset's
  transforms, else none (images shown as they are, said once); class names from the datamodule,
  else the validation dataset's `classes`, else the label indices;
- the network: `pl_module.net` when there is one, else the LightningModule itself (layer names as
  `print(model)` shows them, e.g. `model.layer3.1.conv2`); it must define `forward`;
- layers: configured names are validated in `setup` (with the valid names in the error); default
  layers are chosen at fit start from one probe image, keeping only those the method can use
  (a warning names the others). A configured layer the method cannot use is an error that lists
  the usable ones; a default visualization that cannot run on the model at all is switched off
  with a warning, never failing `fit`;
- a per-instance `state_key` (the class and the options that decide its state, as Lightning's
  `ModelCheckpoint` does), so two instances of one class keep separate state in a checkpoint;
- its own wall time logged as the scalar `viz_time/<name>`;
- images and scalars logged at the step of the epoch's validation scalars (`log_step`: Lightning
  logs epoch-end metrics at global_step - 1, so each tag's step slider is the epoch axis), to
  TensorBoard, or as PNG files under `<run dir>/viz/<tag>/` when the logger is not TensorBoard (or
  there is none).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torch.utils.data import Dataset

from convlens.errors import ConfigError, ConvlensError, one_line
from convlens.callbacks import sink
from convlens.render import class_caption
from convlens.viz.common import eval_mode
from convlens.viz.layers import LayerError, get_layer, layer_names

#: target values every callback that explains a class accepts
TARGETS = ("true", "predicted")
#: probe images drawn from a dataloader or Dataset when `num_probe` is None
DEFAULT_NUM_PROBE = 10
#: at most this many images are scanned for one image per class
PROBE_SCAN_LIMIT = 2048
#: dict batches: the keys tried for the images and the labels when `batch_keys` is None
IMAGE_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class")


def log_step(trainer) -> int:
    """The step images and scalars of this epoch are logged at: the step of its validation
    scalars. Lightning logs epoch-end metrics at `_batches_that_stepped - 1` during fit (its loop
    counter has moved on by then); offline runs (`trainer.validate`) log at the counter itself."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    if not isinstance(step, int):
        return int(trainer.global_step)
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return step - 1 if fn == "fit" and step > 0 else step


def split_batch(batch: Any, keys: Sequence[str] | None = None, what: str = "a batch") -> tuple[torch.Tensor, Any]:
    """(images, labels or None) of a batch: `(images, labels, ...)` tuple/list, a dict (images and
    labels under `keys`, or under the usual names), or a bare image tensor. ConfigError otherwise,
    naming what was found and what to pass."""
    images, labels = None, None
    if torch.is_tensor(batch):
        images = batch
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
    elif isinstance(batch, Mapping):
        image_keys = (keys[0],) if keys else IMAGE_KEYS
        label_keys = (keys[1],) if keys and len(keys) > 1 else (() if keys else LABEL_KEYS)
        found = [k for k in image_keys if k in batch]
        if not found:
            raise ConfigError(f"{what} is a dict with keys {sorted(map(str, batch))}, none of which holds the "
                              f"images (tried {', '.join(image_keys)}); pass batch_keys=(image_key, label_key)")
        images = batch[found[0]]
        labels = next((batch[k] for k in label_keys if k in batch), None)
    else:
        raise ConfigError(f"{what} is a {type(batch).__name__}; the callbacks read (images, labels) tuples or "
                          "lists, dicts (with batch_keys=(image_key, label_key)) or image tensors [N, C, H, W]")
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        shape = f"{images.dtype} {list(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"the images of {what} must be a float tensor [N, C, H, W] in model input space, got "
                          f"{shape}; pass probe=<images> or make the loader yield float image batches")
    if labels is not None:
        if isinstance(labels, (list, tuple)) and labels and all(isinstance(v, int) for v in labels):
            labels = torch.tensor(labels)
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point() \
                or len(labels) != len(images):
            labels = None  # not one class index per image (e.g. masks, boxes): no labels
    return images, labels


def _pick_per_class(images: torch.Tensor, labels: torch.Tensor | None, per_class: int,
                    limit: int, order: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `per_class` images of each class (classes in order of first appearance, at most
    `limit` of them), sorted by class; without labels, the first `limit` images."""
    if labels is None:
        return images[:limit], None
    chosen: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        if y not in chosen:
            if len(chosen) == limit:
                continue
            chosen[y] = []
        if len(chosen[y]) < per_class:
            chosen[y].append(i)
    index = torch.tensor([i for y in sorted(chosen) for i in chosen[y]], dtype=torch.long)
    if order is not None:
        order.extend(chosen)  # the classes in order of first appearance
    return images[index], labels[index]


def find_normalize(dataset: Any):
    """(mean, std) of a torchvision `Normalize` among a dataset's transforms (through Subset/Compose/
    nn.Sequential wrappers), or None."""
    from torchvision import transforms as T

    normalize_types = (T.Normalize,)
    try:
        from torchvision.transforms import v2

        normalize_types += (v2.Normalize,)
    except ImportError:  # pragma: no cover
        pass
    seen: set[int] = set()
    todo = [dataset]
    while todo:
        obj = todo.pop(0)
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
            continue
        seen.add(id(obj))
        if isinstance(obj, normalize_types):
            return obj.mean, obj.std
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
            continue
        if isinstance(obj, nn.Module):
            todo.extend(obj.children())
        for attr in ("transforms", "transform", "dataset", "datasets"):
            value = getattr(obj, attr, None)
            if value is not None:
                todo.append(value)
    return None


def dataset_classes(dataset: Any) -> list[str] | None:
    """The `classes` names of a dataset (through Subset-like `.dataset` wrappers), or None."""
    for _ in range(8):
        if dataset is None:
            return None
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) and all(isinstance(c, str) for c in classes):
            return list(classes)
        dataset = getattr(dataset, "dataset", None)
    return None


class _Normalization(nn.Module):
    """`(x - mean) / std` and its inverse, per channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)


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


#: the Lightning hooks a visualization callback may implement: each runs under `_guarded`, so
#: that no exception of a visualization reaches Lightning (see `VisualizationCallback._guard_failed`)
GUARDED_HOOKS = (
    "setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end",
    "on_validation_start", "on_validation_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_validation_batch_start", "on_validation_batch_end", "on_test_start", "on_test_end",
    "on_test_epoch_start", "on_test_epoch_end", "on_test_batch_start", "on_test_batch_end",
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_exception", "load_state_dict",
)
#: hooks that check what the user asked for (named layers, filters, an explicit probe): a
#: ConvlensError about such a choice is raised there, before any batch trains
CHECK_HOOKS = ("setup", "on_fit_start", "on_validation_start")
#: hooks that still run once a callback is switched off (cleanup and checkpoint state)
HOOKS_WHEN_DECLINED = ("teardown", "on_exception", "load_state_dict")
#: leaf modules whose output is never a stack of maps (not offered as layers of spatial methods)
NOT_SPATIAL = (nn.Linear, nn.Flatten, nn.Unflatten, nn.BatchNorm1d, nn.LayerNorm, nn.Dropout1d, nn.Embedding,
               nn.Softmax, nn.LogSoftmax, nn.Bilinear)
#: set to 1 to let a visualization's exception through (with its traceback), to debug it
STRICT_ENV = "CONVLENS_STRICT"
#: probe images shared by the callbacks of one trainer that draw from the same source, so a
#: checkpoint stores them once (torch.save writes a storage shared by several tensors once)
_SHARED_PROBES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class UserChoiceError(ConvlensError):
    """A ConvlensError about something the user asked for (a named layer, an explicit probe):
    raised into Lightning at setup / fit start instead of switching the callback off."""


@contextlib.contextmanager
def _from_defaults(applies: bool = True):
    """Marks a ConvlensError raised inside as coming from the callback's own (default) choices, so
    that it switches the callback off instead of failing fast (see `_guard_failed`)."""
    try:
        yield
    except ConvlensError as error:
        if applies and not isinstance(error, UserChoiceError):
            error._convlens_default = True
        raise


def _guard_hooks(cls: type) -> None:
    """Wrap the Lightning hooks `cls` itself defines (not inherited ones) in `_guarded`."""
    for name in GUARDED_HOOKS:
        hook = cls.__dict__.get(name)
        if callable(hook) and not getattr(hook, "_convlens_guarded", False):
            setattr(cls, name, _guarded(name, hook))


def _guarded(name: str, hook):
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        if self.declined and name not in HOOKS_WHEN_DECLINED:
            return None
        if self._hook_depth:  # a subclass hook calling super(): the outermost guard decides
            return hook(self, *args, **kwargs)
        self._hook_depth += 1
        try:
            return hook(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001  no visualization may stop the user's training
            self._guard_failed(name, error)
            return None
        finally:
            self._hook_depth -= 1
    guarded._convlens_guarded = True
    return guarded


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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _guard_hooks(cls)

    def __init__(self, layers: Sequence[str] | None = None, every_n_epochs: int = 1,
                 num_probe: int | None = None, probe_per_class: int = 1, probe_seed: int = 0,
                 probe: Any = None, mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None, batch_keys: Sequence[str] | None = None):
        """`probe`: the probe images: a float tensor [N, C, H, W] in model input space, a pair
        (images, labels), or a `Dataset` of (image, label) items (one image per class is taken, as
        from the validation loader). `mean`, `std`: the per-channel normalization of the model's
        input, undone for display. `batch_keys`: (image_key, label_key) of dict batches."""
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
        self._probe_arg = self._check_probe(probe)
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std (the per-channel normalization of the model input), or neither")
        self._mean_std = None
        if mean is not None:
            try:
                m, sd = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"mean and std must be numbers or per-channel lists, e.g. mean=[0.485, 0.456, "
                                  f"0.406], std=[0.229, 0.224, 0.225]: {e}") from None
            if m.dim() > 1 or sd.dim() > 1 or (sd <= 0).any():
                raise ConfigError(f"mean and std must be per-channel lists (std > 0), got {mean!r}, {std!r}")
            self._mean_std = (m, sd)
        if batch_keys is not None and (isinstance(batch_keys, str) or len(batch_keys) not in (1, 2)
                                       or not all(isinstance(k, str) for k in batch_keys)):
            raise ConfigError(f"batch_keys must be (image_key, label_key), e.g. ('image', 'label'), got {batch_keys!r}")
        self.batch_keys = tuple(batch_keys) if batch_keys is not None else None
        self._normalization_resolved = False
        self._normalization = None
        self._class_names: list[str] | None = None
        #: True once the callback is switched off for the run (warned once; kept in its checkpoint
        #: state, so a resumed run stays off); `declined_reason` says why
        self.declined = False
        self.declined_reason: str | None = None
        self._hook_depth = 0
        #: the shared probe images this callback's come from (see `_SHARED_PROBES`) and its rows
        self._probe_pool: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._probe_index: torch.Tensor | None = None
        self._probe_derived: torch.Tensor | None = None
        #: the classes of the probe pool last read from a loader, in order of first appearance
        self._class_order: list[int] = []
        self._warned: set[str] = set()
        #: default layers chosen at setup without an image: chosen again at fit start with one
        self._tentative = False

    @staticmethod
    def _check_probe(probe):
        if probe is None or isinstance(probe, Dataset):
            return probe
        if torch.is_tensor(probe):
            probe = (probe, None)
        if isinstance(probe, (tuple, list)) and len(probe) == 2 and torch.is_tensor(probe[0]):
            images, labels = probe
            if images.dim() != 4 or not images.is_floating_point() or not len(images):
                raise ConfigError(f"probe images must be a non-empty float tensor [N, C, H, W] in model input "
                                  f"space, got {images.dtype} {list(images.shape)}")
            if labels is not None:
                labels = torch.as_tensor(labels)
                if labels.shape != (len(images),) or labels.is_floating_point():
                    raise ConfigError(f"probe labels must be one class index per image, shape [{len(images)}], "
                                      f"got {labels.dtype} {list(labels.shape)}")
            return images.detach().cpu().clone(), labels.long().cpu().clone() if labels is not None else None
        raise ConfigError(f"probe must be an image tensor [N, C, H, W], a pair (images, labels) or a Dataset, got "
                          f"{type(probe).__name__}")

    @property
    def state_key(self) -> str:
        options = {k: getattr(self, k, None) for k in self.state_key_options}
        options["layers"] = self._configured_layers  # as configured, not as chosen at setup
        return self._generate_state_key(**options)

    # -- what subclasses implement -------------------------------------------------------------
    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        """Layers used when none are configured (`image`: one probe image; None at setup, where
        the choice is provisional): every layer of `layer_kind`."""
        return layer_names(net, self.layer_kind)

    def usable_layers(self, net: nn.Module, image: torch.Tensor, layers: Sequence[str]) -> dict[str, str]:
        """{layer: why not} for the layers of `layers` the method cannot use on this net (none by
        default). Called at fit start with one probe image."""
        return {}

    def setup_layers(self, net: nn.Module) -> None:
        """Checks of configured layers that need no image, at setup (after the name checks)."""

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What a subclass checks or computes once the probe images and layers are known (fit start).
        A ConvlensError here switches a default visualization off with a warning."""

    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    # -- helpers for subclasses ----------------------------------------------------------------
    @staticmethod
    def net(pl_module: pl.LightningModule) -> nn.Module:
        """The plain network (`pl_module.net`, else the LightningModule), which layer names refer to."""
        net = getattr(pl_module, "net", None)
        return net if isinstance(net, nn.Module) else pl_module

    def probe(self, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed probe images (model input space) and labels, on the module's device. Probe
        images without labels are labelled with the net's current predictions."""
        images = self.probe_images.to(pl_module.device)
        if self.probe_labels is not None:
            return images, self.probe_labels.to(pl_module.device)
        net = self.net(pl_module)
        with torch.no_grad(), eval_mode(net):
            return images, net(images).argmax(1)

    @property
    def uses_defaults(self) -> bool:
        """No layers configured: the callback's choice, so it declines rather than fails."""
        return self._configured_layers is None

    def normalization(self, trainer: pl.Trainer):
        """The normalization undone for display (see the module docstring), or None."""
        if not self._normalization_resolved:
            self._normalization = self._find_normalization(trainer)
            self._normalization_resolved = True
        return self._normalization

    def _find_normalization(self, trainer):
        if self._mean_std is not None:
            return _Normalization(*self._mean_std)
        dm = getattr(trainer, "datamodule", None)
        found = getattr(dm, "normalization", None) if dm is not None else None
        if found is not None:
            return found
        dataset = _val_dataset(trainer)
        mean_std = find_normalize(dataset) if dataset is not None else None
        if mean_std is not None:
            return _Normalization(*mean_std)
        if dm is None or not hasattr(dm, "normalization"):
            # one message for every callback: Python's warning filter shows it once a run
            self._warn_once("convlens callbacks: no normalization found (no mean/std argument, no datamodule "
                            "normalization, no torchvision Normalize in the validation dataset's transforms): images "
                            "are shown as they are; pass mean=[...], std=[...] for true colors")
        return None

    def class_names(self, trainer: pl.Trainer) -> Sequence[str]:
        dm = getattr(trainer, "datamodule", None)
        names = getattr(dm, "class_names", None) if dm is not None else None
        if names:
            return list(names)
        if self._class_names is None:
            self._class_names = dataset_classes(_val_dataset(trainer)) or []
        if self._class_names:
            return self._class_names
        if dm is not None:
            return [str(i) for i in range(getattr(dm, "num_classes", 10))]
        return []  # class_caption shows the index

    def captions(self, trainer: pl.Trainer, labels) -> list[str]:
        """The class name of each label (its index where there is no name)."""
        names = self.class_names(trainer)
        return [class_caption(y, names) for y in labels]

    def log_image(self, trainer: pl.Trainer, tag: str, image: torch.Tensor, caption: str | None = None) -> None:
        """Log a [3|1, H, W] image in [0, 1] under `tag` at `log_step(trainer)` to every logger
        (`callbacks.sink`), upscaled (nearest, integer factor) to be readable at TensorBoard's card
        width (`render.readable`); `caption` goes to the loggers that show one (W&B)."""
        sink.log_image(trainer, tag, image, log_step(trainer), caption=caption)

    def log_scalars(self, trainer: pl.Trainer, scalars: dict[str, float]) -> None:
        """Log `{tag: value}` at `log_step(trainer)` to every logger (`callbacks.sink`)."""
        sink.log_scalars(trainer, scalars, log_step(trainer))

    @staticmethod
    def _png_dir(trainer: pl.Trainer) -> Path:
        """Where the files go when no logger takes images: `<default_root_dir>/viz`."""
        return sink.fallback_dir(trainer)

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.needs_layers:
            return
        net = self.net(pl_module)
        if self._configured_layers is None:
            if self.layers is None or self._tentative:  # provisional: chosen again at fit start
                self.layers, self._tentative = list(self.default_layers(net, None)), True
            return
        kind_names = layer_names(net, self.layer_kind) if self.layer_kind is not None else None
        if not self.layers:
            raise LayerError(f"{type(self).__name__}: layers is an empty list; name layers to draw, or null for "
                             f"the defaults (layers of the kind it draws: {', '.join(kind_names or []) or 'none'})")
        if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
            raise LayerError(f"{type(self).__name__}: layers={self.layers} cannot be drawn: there is no nn.Conv2d in "
                             "the model")
        if kind_names is not None:
            for layer in self.layers:
                get_layer(net, layer, self.layer_kind)  # LayerError with the valid names
        else:  # any module with spatial maps; which ones exactly is known at fit start, with an image
            modules = dict(net.named_modules())
            for layer in self.layers:
                if layer not in modules or not layer:
                    choices = [n for n in layer_names(net) if not isinstance(modules[n], NOT_SPATIAL)]
                    raise LayerError(f"{type(self).__name__}: unknown layer {layer!r}. Valid layer names: "
                                     f"{', '.join(choices[:40])}{' ...' if len(choices) > 40 else ''}")
        self.setup_layers(net)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with _from_defaults(True):
            self._check_forward(pl_module)
        with _from_defaults(self._probe_arg is None and self.batch_keys is None):
            self._choose_probe(trainer, pl_module)
        self.normalization(trainer)  # found (and its warning given) now, not mid-training
        if self.probe_images is None:
            return
        self._check_probe_forward(pl_module)
        if self.needs_layers:
            self._resolve_layers(pl_module)
        with _from_defaults(self.uses_defaults):
            self.prepare(trainer, pl_module)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)

    def _decline(self, why: str) -> None:
        """Switch the callback off for the rest of the run, with one warning naming it, the cause
        and what to do (`why` says both)."""
        why = " ".join(str(why).split())
        name = f"{type(self).__name__}: "
        self.declined, self.declined_reason = True, why[len(name):] if why.startswith(name) else why
        try:
            self.release()
        finally:
                self._warn_once(f"{type(self).__name__} is switched off for this model: {self.declined_reason} "
                            "(training goes on without it)")

    def _guard_failed(self, hook: str, error: Exception) -> None:
        """An exception in hook `hook` (see `_guarded`): raised into Lightning only when it is about
        what the user asked for and found where such choices are checked (setup / fit start), or
        with CONVLENS_STRICT=1; otherwise the callback is switched off for the run."""
        if os.environ.get(STRICT_ENV, "") not in ("", "0"):
            raise error
        if hook in CHECK_HOOKS and isinstance(error, ConvlensError) and not getattr(error, "_convlens_default", False):
            raise error
        if isinstance(error, ConvlensError):  # its message names the problem and the remedy
            why = " ".join(str(error).split())
        else:
            why = (f"{one_line(error)} (in {hook}); set {STRICT_ENV}=1 to see the traceback, and please report it "
                   "with the model's print-out")
        self._decline(why)

    def release(self) -> None:
        """Remove what the callback attached to the model (hooks); called when it is switched off.
        Subclasses that attach hooks override it."""

    def _check_forward(self, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        if net is pl_module and type(pl_module).forward is pl.LightningModule.forward:
            raise ConfigError(f"{type(pl_module).__name__} defines no forward(): the callbacks run the network "
                              "as model(images); define forward(x) returning class scores, or keep the network "
                              "in an attribute named `net`")

    def _check_probe_forward(self, pl_module: pl.LightningModule) -> None:
        """One forward of the first probe image through the net: a probe of the wrong shape,
        channels, dtype or device is named now, before any batch trains (a UserChoiceError for an
        explicit `probe=`; probe images from the data switch the callback off)."""
        net = self.net(pl_module)
        images = self.probe_images[:1]
        try:
            with torch.no_grad(), eval_mode(net):
                net(images.to(pl_module.device))
        except Exception as e:  # noqa: BLE001  whatever the net raises: the probe does not fit it
            explicit = self._probe_arg is not None
            where = "probe=" if explicit else "the probe images taken from the data"
            error = (UserChoiceError if explicit else ConfigError)(
                f"{type(self).__name__}: {where} ({images.dtype} {list(images.shape)}, one image shown) does not fit "
                f"the model: {one_line(e)}; pass probe images shaped like a batch the model trains on "
                f"[N, C, H, W], float, in model input space")
            error._convlens_default = not explicit
            raise error from None

    def _resolve_layers(self, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        image = self.probe_images[:1].to(pl_module.device)
        if self.layers is None or self._tentative or (not self.layers and self.uses_defaults):
            # default layers: the usable ones, the others named once
            self._tentative = False
            with _from_defaults(True):
                if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
                    raise LayerError("there is no nn.Conv2d in the model, and this method draws convolutional "
                                     "layers; use it on a CNN")
                candidates = list(self.default_layers(net, image))
                problems = self.usable_layers(net, image, candidates)
                usable = [layer for layer in candidates if layer not in problems]
                if not usable:
                    why = next(iter(problems.values()), "the model has no layer this method can draw")
                    raise LayerError(f"none of its default layers can be used ({' '.join(why.split())}); name "
                                     "layers to draw with layers=[...]")
            if problems:
                names = list(problems)
                shown = ", ".join(names[:12]) + (f", ... (+{len(names) - 12} more)" if len(names) > 12 else "")
                self._warn_once(f"{type(self).__name__}: skipping default layers this method cannot use on this model: "
                           f"{shown} ({next(iter(problems.values()))}); drawing {', '.join(usable)}")
            self.layers = usable
        elif self._configured_layers is not None and list(self._configured_layers) == list(self.layers):
            modules = dict(net.named_modules())
            unknown = [layer for layer in self.layers if layer not in modules]
            problems = {layer: "there is no such layer" for layer in unknown}
            problems.update(self.usable_layers(net, image, [x for x in self.layers if x not in unknown]))
            if problems:
                layer, why = next(iter(problems.items()))
                usable = self.usable_layer_names(net, image)
                raise LayerError(f"{type(self).__name__}: layer {layer!r} cannot be used: {' '.join(why.split())}. "
                                 f"Usable layers: {', '.join(usable[:40]) or 'none'}"
                                 f"{' ...' if len(usable) > 40 else ''}")

    def usable_layer_names(self, net: nn.Module, image: torch.Tensor) -> list[str]:
        """The layers of the net this method can draw (for messages): the layers of `layer_kind`
        (every leaf module when it has none) that `usable_layers` accepts."""
        kinds = layer_names(net, self.layer_kind)
        problems = self.usable_layers(net, image, kinds)
        return [k for k in kinds if k not in problems]

    # offline use (visualize.py): `trainer.validate(...)` draws once, after the validation loop
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.on_fit_start(trainer, pl_module)  # what a subclass prepares at fit start, offline too

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking and self.probe_images is not None \
                and not self.declined:
            self._run(trainer, pl_module)

    def _choose_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None) -> None:
        if self.probe_images is not None:
            return  # restored from a checkpoint: keep the same images
        limit = self.num_probe or DEFAULT_NUM_PROBE
        dm = trainer.datamodule
        try:
            pools = _SHARED_PROBES.setdefault(trainer, {})
        except TypeError:  # a stand-in trainer that cannot be a weak key: nothing shared
            pools = {}
        index = None
        if isinstance(self._probe_arg, tuple):
            images, labels = self._probe_arg
            key = ("probe", tuple(images.shape), _digest(images), None if labels is None else _digest(labels))
            pool = pools.get(key, self._probe_arg)
            if self.num_probe is not None and self.num_probe < len(images):
                index = torch.arange(self.num_probe)
        elif self._probe_arg is not None:
            key = ("dataset", id(self._probe_arg), self.probe_per_class, limit, self.batch_keys)
            pool = pools.get(key) or self._probe_from_items(self._probe_arg, limit, "the probe Dataset")
        elif dm is not None and hasattr(dm, "probe_batch"):
            key = ("datamodule", id(dm), self.probe_per_class)
            pool = pools.get(key) or dm.probe_batch(per_class=self.probe_per_class)
            if self.num_probe is not None and self.num_probe < len(pool[1]):
                g = torch.Generator().manual_seed(self.probe_seed)
                index = torch.randperm(len(pool[1]), generator=g)[: self.num_probe].sort().values
        else:
            loader = _val_loader(trainer)
            if loader is None:
                rank_zero_warn(f"{type(self).__name__}: no probe images: pass probe=<images or Dataset>, give the "
                               "datamodule a probe_batch(), or give the trainer a validation dataloader; "
                               "nothing will be drawn")
                return
            # one pool of the first max(limit, DEFAULT_NUM_PROBE) classes for every callback of this
            # loader; a callback with fewer probes takes the rows of the first `num_probe` classes
            scan = max(limit, DEFAULT_NUM_PROBE)
            key = ("val", id(getattr(loader, "dataset", loader)), self.probe_per_class, scan, self.batch_keys)
            if key not in pools:
                self._class_order = []
            pool = pools.get(key) or self._probe_from_loader(loader, trainer, pl_module, scan)
            order = pools.setdefault(key + ("class order",), self._class_order)
            labels = pool[1]
            if self.num_probe is not None and labels is not None and self.num_probe < len(order):
                first = set(order[: self.num_probe])
                index = torch.tensor([i for i, y in enumerate(labels.tolist()) if y in first], dtype=torch.long)
            elif self.num_probe is not None and labels is None and self.num_probe < len(pool[0]):
                index = torch.arange(self.num_probe)
        if key not in pools:
            images, labels = pool
            with torch.inference_mode(False):  # offline runs choose inside inference mode: keep normal tensors
                pools[key] = (images.detach().cpu().clone(),
                              labels.detach().cpu().long().clone() if labels is not None else None)
        self._set_probe(pools[key], index)

    def _probe_from_loader(self, loader, trainer, pl_module, limit: int):
        picked = self._probe_by_targets(loader, pl_module, limit)
        if picked is not None:
            return picked
        seen_images, seen_labels, count = [], [], 0
        classes: set[int] = set()
        for batch_idx, batch in enumerate(loader):
            if pl_module is not None and getattr(pl_module, "_trainer", None) is not None:
                try:  # what validation_step would receive (the module's/datamodule's transfer hooks)
                    batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device)
                except Exception:  # noqa: BLE001  a hook that wants more context: the raw batch
                    pass
            images, labels = split_batch(batch, self.batch_keys, f"validation batch #{batch_idx}")
            seen_images.append(images.detach().cpu())
            if labels is not None:
                seen_labels.append(labels.detach().cpu())
                classes.update(labels.tolist())
            count += len(images)
            full = (labels is None and count >= limit) or (len(classes) >= limit and self._per_class_done(
                seen_labels, limit))
            if full or count >= PROBE_SCAN_LIMIT:
                break
        if not seen_images:
            raise ConfigError(f"{type(self).__name__}: the validation dataloader is empty; pass probe=<images>")
        images = torch.cat(seen_images)
        labels = torch.cat(seen_labels) if len(seen_labels) == len(seen_images) else None
        return _pick_per_class(images, labels, self.probe_per_class, limit, self._class_order)

    def _probe_by_targets(self, loader, pl_module, limit: int):
        """When the loader's dataset lists its labels (`targets`/`labels`, as torchvision's
        ImageFolder and CIFAR10 do, also through a Subset): the first images of each class in
        dataset order, read directly (an image folder is sorted by class: a scan of its first
        batches would see one class). None when it does not, or its items do not collate."""
        dataset = getattr(loader, "dataset", None)
        targets = _dataset_targets(dataset)
        if targets is None:
            return None
        chosen: dict[int, list[int]] = {}
        for i, y in enumerate(targets):
            if y not in chosen:
                if len(chosen) == limit:
                    continue
                chosen[y] = []
            if len(chosen[y]) < self.probe_per_class:
                chosen[y].append(i)
        index = [i for y in sorted(chosen) for i in chosen[y]]
        try:
            from torch.utils.data import default_collate

            collate = getattr(loader, "collate_fn", None) or default_collate
            batch = collate([dataset[i] for i in index])
        except Exception:  # noqa: BLE001  items this collate cannot batch: scan the loader instead
            return None
        if pl_module is not None and getattr(pl_module, "_trainer", None) is not None:
            try:
                batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device)
            except Exception:  # noqa: BLE001
                pass
        images, labels = split_batch(batch, self.batch_keys, "the validation dataset's items")
        self._class_order[:] = list(chosen)
        return images.detach().cpu(), labels.detach().cpu() if labels is not None else None

    def _per_class_done(self, seen_labels, limit: int) -> bool:
        counts = torch.bincount(torch.cat(seen_labels).clamp_min(0))
        return int((counts >= self.probe_per_class).sum()) >= limit

    def _probe_from_items(self, dataset, limit: int, what: str):
        images, labels = [], []
        for i in range(min(len(dataset), PROBE_SCAN_LIMIT)):
            item = dataset[i]
            x, y = split_batch(_as_batch(item), self.batch_keys, f"{what}[{i}]")
            images.append(x)
            labels.append(y)
            if y is None and len(images) >= limit:
                break
        if not images:
            raise ConfigError(f"{type(self).__name__}: {what} is empty")
        x = torch.cat(images)
        y = torch.cat(labels) if all(v is not None for v in labels) else None
        return _pick_per_class(x, y, self.probe_per_class, limit)

    def _due(self, trainer: pl.Trainer, at_fit_end: bool = False) -> bool:
        if trainer.sanity_checking or trainer.fast_dev_run or self.probe_images is None or self.declined:
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
        # the probe as the shared pool and this callback's rows of it: callbacks that draw from one
        # source hold the same pool tensors, which the checkpoint stores once
        pool, index = self._probe_pool, self._probe_index
        if self.probe_images is not self._probe_derived:  # set by hand: it is its own pool
            pool = (self.probe_images, self.probe_labels) if self.probe_images is not None else None
            index = None
        return {"probe_pool": pool, "probe_index": index, "layers": self.layers,
                "declined": self.declined, "declined_reason": self.declined_reason}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pool = state_dict.get("probe_pool")
        if pool is not None:
            self._set_probe(tuple(pool), state_dict.get("probe_index"))
        elif state_dict.get("probe_images") is not None:  # a checkpoint of convlens <= 0.2
            self._set_probe((state_dict["probe_images"], state_dict.get("probe_labels")), None)
        if state_dict.get("layers") is not None:
            self.layers, self._tentative = list(state_dict["layers"]), False
        if state_dict.get("declined"):  # switched off in the run this one resumes: off again, said once
            self._decline(state_dict.get("declined_reason") or "it was switched off in the run this one resumes")

    def _set_probe(self, pool: tuple[torch.Tensor, torch.Tensor | None], index: torch.Tensor | None) -> None:
        self._probe_pool, self._probe_index = pool, index
        images, labels = pool
        self.probe_images = images[index] if index is not None else images
        self.probe_labels = (labels[index] if index is not None else labels) if labels is not None else None
        self._probe_derived = self.probe_images


def _digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's values (telling apart explicit probes that are the same images)."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _dataset_targets(dataset) -> list[int] | None:
    """The label of every item of a map-style dataset, when it lists them (`targets` or `labels`, a
    sequence of ints as long as the dataset; through Subset-like `.indices`/`.dataset`)."""
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    indices = getattr(dataset, "indices", None)
    base = getattr(dataset, "dataset", None)
    if indices is not None and base is not None:
        inner = _dataset_targets(base)
        return [inner[int(i)] for i in indices] if inner is not None else None
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is None or isinstance(values, (str, bytes)):
            continue
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            continue
        if values.dim() == 1 and len(values) == len(dataset) and not values.is_floating_point() \
                and values.dtype != torch.bool:
            return values.tolist()
    return None


def _as_batch(item):
    """A Dataset item (image [C, H, W], label) as a batch of one."""
    if torch.is_tensor(item):
        return item.unsqueeze(0)
    if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
        label = item[1] if len(item) > 1 else None
        label = torch.as_tensor(label).reshape(1) if isinstance(label, (int, torch.Tensor)) and \
            torch.as_tensor(label).numel() == 1 else None
        return (item[0].unsqueeze(0), label) if label is not None else item[0].unsqueeze(0)
    if isinstance(item, Mapping):
        return {k: (v.unsqueeze(0) if torch.is_tensor(v) and v.dim() == 3 else
                    torch.as_tensor(v).reshape(1) if isinstance(v, int) or (torch.is_tensor(v) and v.numel() == 1)
                    else v) for k, v in item.items()}
    return item


def _first_loader(loaders):
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return _first_loader(next(iter(loaders.values()), None))
    if isinstance(loaders, (list, tuple)):
        return _first_loader(loaders[0]) if loaders else None
    return loaders


def _val_loader(trainer):
    """The first validation dataloader of the run (the same loader validation uses; requested from
    its source when the loop has not loaded it yet), or None."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is None:
        try:
            fn = getattr(getattr(trainer, "state", None), "fn", None)
            loop = trainer.validate_loop if fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
            source = loop._data_source
            if source.instance is None or not source.is_defined():
                return None
            loaders = source.dataloader()
        except (AttributeError, NotImplementedError):
            return None
    return _first_loader(loaders)


def _val_dataset(trainer):
    loader = _val_loader(trainer)
    return getattr(loader, "dataset", None)


_guard_hooks(VisualizationCallback)
