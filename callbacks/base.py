"""The thin base of every visualization callback: hooks, schedule, rank zero, state, and
switching itself off with one warning.

A subclass only chooses inputs, calls a `viz` function, renders and logs, in `visualize(...)`.
The rooms around this base, each one job:
- `options`: the option checks (one family, one error type) and `ProbeSpec`, the probe options
  every callback takes;
- `probe`: where the probe images come from (the probe option, the datamodule, the validation
  loader), batch formats, and the pools callbacks share;
- `display`: the normalization undone for true colors, class names, the class explained;
- `sink`: images, scalars, text and histograms into every logger the trainer has;
- `lightning_compat`: every private Lightning internal used, pinned by tests.

This base, as Lightning's own callbacks do:
- runs every `every_n_epochs` epochs at the end of the training epoch (after validation, so this
  epoch's `val/acc` is known; outside inference mode, so methods that need gradients work), or only
  at fit end with `every_n_epochs=0`; on rank zero only; never in the sanity check or `fast_dev_run`;
- chooses the probe images at fit start and keeps them in `state_dict`, so a resumed run shows
  the same images;
- the network: `pl_module.net` when there is one, else the LightningModule itself (layer names as
  `print(model)` shows them, e.g. `model.layer3.1.conv2`); it must define `forward`;
- layers: configured names are validated in `setup` (with the valid names in the error); default
  layers are chosen at fit start from one probe image, keeping only those the method can use
  (a warning names the others). A configured layer the method cannot use is an error that lists
  the usable ones;
- never stops the user's training: every Lightning hook of a visualization runs guarded
  (`_guarded`); an exception switches the callback off for the run with one warning naming it,
  the cause and the fix, and the switched-off state is kept in the checkpoint. What the user
  asked for explicitly (named layers, units, `probe=`, `batch_keys=`) is checked at setup / fit
  start (the probe with one forward) and fails there, before any batch trains;
- a per-instance `state_key` (the class and the options that decide its state, as Lightning's
  `ModelCheckpoint` does), so two instances of one class keep separate state in a checkpoint;
- its own wall time logged as the scalar `viz_time/<name>`;
- images and scalars logged at the step of the epoch's validation scalars (`log_step`), to every
  logger (`sink`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from convlens.callbacks import sink
from convlens.callbacks.budget import (DEFAULT_BUDGET, Drawing, PieceTimer, check_budget, epoch_seconds,
                                       epoch_started, first_part, pieces_within, spacing, spent)
from convlens.callbacks.display import Display
from convlens.callbacks.lightning_compat import log_step, state_key
from convlens.callbacks.options import ProbeSpec, accept_renamed, check_int, check_layers
from convlens.callbacks.probe import choose_probe
from convlens.errors import ConfigError, ConvlensError, one_line
from convlens.viz.common import eval_mode
from convlens.viz.layers import LayerError, get_layer, layer_names

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
#: hooks that check what the user asked for (named layers, units, an explicit probe): a
#: ConvlensError about such a choice is raised there, before any batch trains
CHECK_HOOKS = ("setup", "on_fit_start", "on_validation_start")
#: hooks that still run once a callback is switched off (cleanup and checkpoint state)
HOOKS_WHEN_DECLINED = ("teardown", "on_exception", "load_state_dict")
#: leaf modules whose output is never a stack of maps (not offered as layers of spatial methods)
NOT_SPATIAL = (nn.Linear, nn.Flatten, nn.Unflatten, nn.BatchNorm1d, nn.LayerNorm, nn.Dropout1d, nn.Embedding,
               nn.Softmax, nn.LogSoftmax, nn.Bilinear)
#: set to 1 to let a visualization's exception through (with its traceback), to debug it
STRICT_ENV = "CONVLENS_STRICT"


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
    #: True for a method of convolutional layers: on a model with no nn.Conv2d it is switched off
    #: (default layers) or refused at setup (named layers)
    needs_conv: bool = True
    #: the options (attributes, as set by the constructor) that tell two instances of a class
    #: apart in a checkpoint: they make up its `state_key`. Not the probe options: a resumed run
    #: keeps its probe images even when those change.
    state_key_options: tuple[str, ...] = ("layers",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _guard_hooks(cls)
        if "__init__" in cls.__dict__:  # the earlier names of its renamed options, for one release
            cls.__init__ = accept_renamed(cls.__init__)

    def __init__(self, layers: Sequence[str] | None = None, every_n_epochs: int | None = None, probe: Any = None,
                 budget: float | None = DEFAULT_BUDGET, **probe_options):
        """`layers`: layer names (None: the method's defaults). `every_n_epochs`: how often it draws
        (0: only at fit end; None: every epoch, spaced out when over the time `budget`, see
        `callbacks.budget`). `probe` and `probe_options` (num_probe, probe_per_class, probe_seed,
        mean, std, batch_keys): see `ProbeSpec`; `probe` may also be a `ProbeSpec`."""
        if every_n_epochs is not None:
            check_int("every_n_epochs", every_n_epochs, 0, " (0: only at fit end; null: every epoch, within budget)")
        layers = check_layers(layers)
        self.layers: list[str] | None = layers
        self._configured_layers = None if layers is None else tuple(layers)
        #: the epochs it draws: as configured, or spaced out by the budget (`every_n_epochs=None`)
        self.every_n_epochs = 1 if every_n_epochs is None else every_n_epochs
        self.every_n_epochs_given = every_n_epochs is not None
        self.budget = check_budget(budget)
        self._budget_said = False
        #: the current drawing's deadline and pieces (`within_budget`); whether a whole drawing has
        #: been timed; the estimated seconds of a whole drawing, from one stopped at its deadline
        self._drawing = Drawing()
        self._measured = False
        self._estimate: float | None = None
        own = [n for n in inspect.signature(type(self).__init__).parameters if n not in ('self', 'probe_options')]
        self.probe_spec = ProbeSpec.from_options(type(self).__name__, probe, own_options=own, **probe_options)
        self.probe_images: torch.Tensor | None = None
        self.probe_labels: torch.Tensor | None = None
        self.display = Display(self.probe_spec.mean_std, self._warn_once)
        #: True once the callback is switched off for the run (warned once; kept in its checkpoint
        #: state, so a resumed run stays off); `declined_reason` says why
        self.declined = False
        self.declined_reason: str | None = None
        self._hook_depth = 0
        #: the shared probe images this callback's come from (see `_SHARED_PROBES`) and its rows
        self._probe_pool: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._probe_index: torch.Tensor | None = None
        self._probe_derived: torch.Tensor | None = None
        self._warned: set[str] = set()
        #: default layers chosen at setup without an image: chosen again at fit start with one
        self._tentative = False

    @property
    def state_key(self) -> str:
        options = {k: getattr(self, k, None) for k in self.state_key_options}
        options["layers"] = self._configured_layers  # as configured, not as chosen at setup
        return state_key(self, **options)

    # the probe options, as the constructor took them
    num_probe = property(lambda self: self.probe_spec.num_probe)
    probe_per_class = property(lambda self: self.probe_spec.probe_per_class)
    probe_seed = property(lambda self: self.probe_spec.probe_seed)
    batch_keys = property(lambda self: self.probe_spec.batch_keys)

    # -- what subclasses implement -------------------------------------------------------------
    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        """Layers used when none are configured (`image`: one probe image; None at setup, where
        the choice is provisional): every layer of `layer_kind`."""
        return layer_names(net, self.layer_kind)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers: Sequence[str]) -> dict[str, str]:
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
    def layers_provisional(self) -> bool:
        """True while the default layers are a guess made at setup without an image (chosen again
        at fit start, with one probe image)."""
        return self._tentative

    @property
    def uses_defaults(self) -> bool:
        """No layers configured: the callback's choice, so it declines rather than fails."""
        return self._configured_layers is None

    def normalization(self, trainer: pl.Trainer):
        """The normalization undone for display (`display.Display`), or None."""
        return self.display.normalization(trainer)

    def class_names(self, trainer: pl.Trainer) -> Sequence[str]:
        return self.display.class_names(trainer)

    def captions(self, trainer: pl.Trainer, labels) -> list[str]:
        """The class name of each label (its index where there is no name)."""
        return self.display.captions(trainer, labels)

    def log_image(self, trainer: pl.Trainer, tag: str, image: torch.Tensor, caption: str | None = None) -> None:
        """Log a [3|1, H, W] image in [0, 1] under `tag` at `log_step(trainer)` to every logger
        (`callbacks.sink`), upscaled (nearest, integer factor) to be readable at TensorBoard's card
        width (`render.readable`); `caption` goes to the loggers that show one (W&B)."""
        sink.log_image(trainer, tag, image, log_step(trainer), caption=caption)

    def within_budget(self, pieces, what: str, explicit: bool = False, label=str):
        """Iterate over this drawing's `pieces` (layers, probe images, in order of importance) as its
        time budget allows: on the first drawing, until its part of the budget would pass (at least
        one piece; see `callbacks.budget`); on later ones, all. `what` names them ("layers") in the
        warning and the `budget/<name>` text; `explicit`: the user chose them, so none is left out."""
        return pieces_within(self._drawing, pieces, what, explicit, label)

    def piece_timer(self, what: str, explicit: bool = False, chosen: str | None = None) -> PieceTimer | None:
        """A `PieceTimer` for pieces a `viz` function asks about as it goes (a stop predicate), or
        None when this drawing has no deadline (draw everything at once). `chosen`: what the user
        chose when `explicit` (default: the pieces themselves)."""
        return None if self._drawing.deadline is None else PieceTimer(self._drawing, what, explicit, chosen)

    def log_scalars(self, trainer: pl.Trainer, scalars: dict[str, float]) -> None:
        """Log `{tag: value}` at `log_step(trainer)` to every logger (`callbacks.sink`)."""
        sink.log_scalars(trainer, scalars, log_step(trainer))

    def log_text(self, trainer: pl.Trainer, tag: str, text: str) -> None:
        """Log `text` under `tag` at `log_step(trainer)` to every logger (`callbacks.sink`)."""
        sink.log_text(trainer, tag, text, log_step(trainer))

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
        if self.needs_conv and not any(isinstance(m, nn.Conv2d) for m in net.modules()):
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
        with _from_defaults(self.probe_spec.explicit is None and self.batch_keys is None):
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
            explicit = self.probe_spec.explicit is not None
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
                if self.needs_conv and not any(isinstance(m, nn.Conv2d) for m in net.modules()):
                    raise LayerError("there is no nn.Conv2d in the model, and this method draws convolutional "
                                     "layers; use it on a CNN")
                candidates = list(self.default_layers(net, image))
                problems = self.unusable_layers(net, image, candidates)
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
            problems.update(self.unusable_layers(net, image, [x for x in self.layers if x not in unknown]))
            if problems:
                layer, why = next(iter(problems.items()))
                usable = self.usable_layer_names(net, image)
                raise LayerError(f"{type(self).__name__}: layer {layer!r} cannot be used: {' '.join(why.split())}. "
                                 f"Usable layers: {', '.join(usable[:40]) or 'none'}"
                                 f"{' ...' if len(usable) > 40 else ''}")

    def usable_layer_names(self, net: nn.Module, image: torch.Tensor) -> list[str]:
        """The layers of the net this method can draw (for messages): the layers of `layer_kind`
        (every leaf module when it has none) that `unusable_layers` accepts."""
        kinds = layer_names(net, self.layer_kind)
        problems = self.unusable_layers(net, image, kinds)
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
        chosen = choose_probe(self.probe_spec, trainer, pl_module, type(self).__name__)
        if chosen is None:
            rank_zero_warn(f"{type(self).__name__}: no probe images: pass probe=<images or Dataset>, give the "
                           "datamodule a probe_batch(), or give the trainer a validation dataloader; "
                           "nothing will be drawn")
            return
        self._set_probe(*chosen)

    def _due(self, trainer: pl.Trainer, at_fit_end: bool = False) -> bool:
        if trainer.sanity_checking or trainer.fast_dev_run or self.probe_images is None or self.declined:
            return False
        if at_fit_end:
            return self.every_n_epochs == 0
        return self.every_n_epochs > 0 and self.due_epoch(trainer)

    def collects_validation(self, trainer: pl.Trainer) -> bool:
        """Whether a callback that collects during the validation loop (top_activations, dissection)
        collects this one: an offline `validate` run; in a fit, the validation of each epoch it draws
        (with every_n_epochs=0, the last epoch's, or every epoch's when max_epochs is unlimited);
        never the sanity check or fast_dev_run."""
        if trainer.sanity_checking or trainer.fast_dev_run or self.probe_images is None:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        if trainer.state.fn != TrainerFn.FITTING:
            return False
        if self.every_n_epochs == 0:
            last = trainer.max_epochs is None or trainer.max_epochs < 0
            return last or trainer.current_epoch + 1 >= trainer.max_epochs
        return self.due_epoch(trainer)

    def due_epoch(self, trainer: pl.Trainer) -> bool:
        """Whether this epoch is one it draws: every `every_n_epochs`-th, and, once the budget has
        spaced it out, the last epoch of the run too (so the trained net is drawn)."""
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0:
            return True
        spaced = self.every_n_epochs > 1 and not self.every_n_epochs_given
        last = trainer.max_epochs if isinstance(trainer.max_epochs, int) and trainer.max_epochs > 0 else None
        return spaced and epoch == last

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer, at_fit_end=True):
            self._run(trainer, pl_module)

    @rank_zero_only
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        epoch_time = epoch_seconds(trainer, start)
        part = None
        if not self._measured and self.every_n_epochs > 0:  # a whole drawing's cost is not known yet
            part = first_part(epoch_time, self.budget, len(self._visualizations(trainer)))
            if part is not None and self._estimate is not None:
                # after a stopped drawing: the budget of the epochs since, or twice the estimated
                # whole drawing (pieces can cost more than the first ones said)
                part = max(part * self.every_n_epochs, 2 * self._estimate)
        self._drawing = Drawing(deadline=None if part is None else start + part, allowed=part)
        try:
            # offline runs (trainer.validate) call this inside inference mode; methods that need
            # gradients (saliency, suppression) must see ordinary tensors
            with torch.inference_mode(False):
                self.visualize(trainer, pl_module)
        finally:
            self._drawing.deadline = None
        seconds = time.perf_counter() - start
        spent(trainer, seconds)
        self._measured = self._measured or (epoch_time is not None and not self._drawing.stopped)
        self.log_scalars(trainer, {f"viz_time/{self.name}": seconds})
        if epoch_time is not None and self.every_n_epochs > 0:
            self._keep_within_budget(trainer, seconds, epoch_time)

    def _visualizations(self, trainer: pl.Trainer) -> list["VisualizationCallback"]:
        return [cb for cb in trainer.callbacks if isinstance(cb, VisualizationCallback) and not cb.declined]

    def _keep_within_budget(self, trainer: pl.Trainer, seconds: float, epoch_time: float) -> None:
        """Space the drawings out when this one took (or, stopped at its deadline, would have taken)
        more than its part of the budget (see `budget`); say once what a first drawing left out."""
        count = len(self._visualizations(trainer))
        drawing = self._drawing
        full = drawing.full_cost(seconds)
        k = spacing(full, epoch_time, self.budget, count)
        if k <= self.every_n_epochs and not drawing.stopped:
            return
        budget = f"(the budget: {self.budget:.0%} of an epoch for {count} visualization(s))"
        if drawing.stopped:
            which = "first drawing" if self._estimate is None else "drawing"
            self._estimate = full
            what = (f"{type(self).__name__}'s {which} had {_secs(drawing.allowed)}, "
                    f"its part of the time budget of the epoch's {_secs(epoch_time)} {budget}: "
                    f"{'; '.join(c.describe() for c in drawing.cuts if c.left or c.over)}; it took {_secs(seconds)}"
                    + (f", a full drawing about {_secs(full)}" if full > seconds else ""))
            self.log_text(trainer, f"budget/{self.name}", what)
        else:
            what = (f"{type(self).__name__} took {_secs(seconds)}, {seconds / epoch_time:.0%} of the epoch's "
                    f"{_secs(epoch_time)} {budget}")
        if k <= self.every_n_epochs:  # a stopped first drawing: said once
            if not self._budget_said:
                self._budget_said = True
                self._warn_once(f"{what}; later drawings are full (name what to draw, or callbacks.budget=null "
                                "for no budget)")
            return
        if self.every_n_epochs_given:
            if not self._budget_said:
                self._budget_said = True
                self._warn_once(f"{what}; every_n_epochs={self.every_n_epochs} was set, so it is kept; "
                                f"every_n_epochs={k} would keep it within budget")
            return
        self.every_n_epochs = k
        if not self._budget_said:  # said once; a later, wider spacing shows in the viz_time scalars
            self._budget_said = True
            full_drawings = " in full" if drawing.stopped else ""
            self._warn_once(f"{what}: it now draws{full_drawings} every {k} epochs and at the last one (set "
                            "every_n_epochs to choose, or callbacks.budget=null for no budget)")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch_started(trainer)
        if trainer.world_size > 1 and not self.every_n_epochs_given:  # every rank draws (collects) alike
            self.every_n_epochs = trainer.strategy.broadcast(self.every_n_epochs, src=0)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # the probe as the shared pool and this callback's rows of it: callbacks that draw from one
        # source hold the same pool tensors, which the checkpoint stores once
        pool, index = self._probe_pool, self._probe_index
        if self.probe_images is not self._probe_derived:  # set by hand: it is its own pool
            pool = (self.probe_images, self.probe_labels) if self.probe_images is not None else None
            index = None
        return {"probe_pool": pool, "probe_index": index, "layers": self.layers,
                "declined": self.declined, "declined_reason": self.declined_reason,
                "every_n_epochs": self.every_n_epochs, "budget_measured": self._measured,
                "budget_estimate": self._estimate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pool = state_dict.get("probe_pool")
        if pool is not None:
            self._set_probe(tuple(pool), state_dict.get("probe_index"))
        elif state_dict.get("probe_images") is not None:  # a checkpoint of convlens <= 0.2
            self._set_probe((state_dict["probe_images"], state_dict.get("probe_labels")), None)
        if state_dict.get("layers") is not None:
            self.layers, self._tentative = list(state_dict["layers"]), False
        if not self.every_n_epochs_given and isinstance(state_dict.get("every_n_epochs"), int):
            self.every_n_epochs = state_dict["every_n_epochs"]  # as spaced out by the budget
        self._measured = bool(state_dict.get("budget_measured", False))
        self._estimate = state_dict.get("budget_estimate")
        if state_dict.get("declined"):  # switched off in the run this one resumes: off again, said once
            self._decline(state_dict.get("declined_reason") or "it was switched off in the run this one resumes")

    def _set_probe(self, pool: tuple[torch.Tensor, torch.Tensor | None], index: torch.Tensor | None) -> None:
        self._probe_pool, self._probe_index = pool, index
        images, labels = pool
        self.probe_images = images[index] if index is not None else images
        self.probe_labels = (labels[index] if index is not None else labels) if labels is not None else None
        self._probe_derived = self.probe_images




_guard_hooks(VisualizationCallback)


def _secs(seconds: float) -> str:
    """Seconds as said in the budget's messages: 0.04 s, 2.3 s, 143 s."""
    return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"
