"""FeatureVisualization: every n epochs, the image each selected unit wants to see, warm-started.

Follows Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017
(doi:10.23915/distill.00007), and the inverting-based family of Vanrell & Arias's lecture
("Neuron Analysis": generate the image that produces a specific activation). The algorithm is
`viz.feature_visualization.optimize_units` (Fourier parameterization with decorrelated colour,
transformation robustness sized to the image, all units of a layer in one batch); this callback
chooses the units, keeps each unit's Fourier coefficients from one epoch to the next, renders and logs.

Warm start: the coefficients of every unit and Adam's state for them (its moments and step count)
are kept (in `state_dict` too, so a resumed run goes on from them) and each due epoch optimizes
`steps` more from there, as one optimization interrupted by training, so a short budget per epoch
(default 32 steps) follows each unit as the net trains. Restarting Adam every epoch instead costs
about a tenth of the objective on the CIFAR net's conv4 (benchmarks/RESULTS.md, feature
visualization): a fresh Adam's first steps are `lr` on every coefficient, noise or not.
`warm_start=False` starts every epoch from the same random coefficients (then give it Lucent's
budget: `steps=512`). With no coefficients to continue from (the first epoch, a changed unit), the
start is random; offline (`convlens-visualize method=feature_viz`, a checkpoint's weights only) `offline_steps` are run.

Units per layer: `units[layer]` when given; else the units the trainer's other convlens
callbacks name for that layer in their own `units` (so that the pictures of a unit sit beside
its top activations or its suppression); else `max_units` chosen by `selection`: "first" (units
0..max_units-1) or "most_active" (the highest mean over the probe images of each map's maximum),
chosen at the first run and kept, so the warm start follows the same units.

Colour (3-channel inputs): `color="probe"` decorrelates with the colour covariance of the probe
images (display space), the data's own statistics; "imagenet" uses Lucid's ImageNet matrix; "none"
optimizes RGB directly. Images are shown in display space (the input normalization undone).

Logged at the step of the epoch's validation scalars (`callbacks.lightning_compat.log_step`):
- `feature_viz/<layer>`: one tile per unit, captioned with its index and final objective value;
- `feature_viz_objective/<layer>/unit<u>` (scalar): that objective (the mean of the unit's map, or
  its centre value with `objective="neuron"`) on the image as the net receives it;
- at fit end, `feature_viz_summary/<layer>`: rows = epochs (at most `summary_max_epochs`, spread
  out, first and last kept), columns = the units.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.summary import FitSummaryCallback
from convlens.callbacks.lightning_compat import log_step
from convlens.callbacks.options import UNIT_SELECTIONS, check_choice, check_int, check_units
from convlens.errors import ConfigError
from convlens.render import as_rgb, captioned_grid, fit_caption, tile_width, to_pixels
from convlens.viz.feature_visualization import OBJECTIVES, SQUASHES, color_sqrt, optimize_units
from convlens.viz.layers import LayerError, default_conv_layers, layer_maxima, layer_output, rank_units

COLORS = ("probe", "imagenet", "none")
#: images kept for the summary are shrunk to at most this side (a checkpoint stays small on 224-px nets)
SUMMARY_SIDE = 64


def _number(name: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _on_cpu(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of an optimizer state (`FeatureVizResult.optimizer_state`) with its tensors on the CPU."""
    if state is None:
        return None
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _thin(history: list[dict], keep: int) -> list[dict]:
    """At most `keep` entries: drop, one at a time, the inner entry whose neighbours are closest in
    epochs (the first and the last stay), so that the kept epochs stay spread over the run."""
    history = list(history)
    while len(history) > max(keep, 2):
        gaps = [history[i + 1]["epoch"] - history[i - 1]["epoch"] for i in range(1, len(history) - 1)]
        del history[1 + gaps.index(min(gaps))]
    return history


class FeatureVisualization(FitSummaryCallback):
    """Feature visualization by optimization of selected units, one grid per layer
    (`feature_viz/<layer>`), warm-started from epoch to epoch.

    Args:
        layers: layer names of the net, any module with [N, K, h, w] output (None:
            `viz.layers.default_conv_layers`).
        units: unit indices per layer, e.g. {conv3: [0, 7, 42]} (layers left out: the other
            callbacks' `units` for that layer, else `selection`).
        max_units: units per layer when nothing names them.
        selection: "first" (units 0..max_units-1) or "most_active" (on the probe images, at the first run).
        steps: optimization steps per due epoch (Adam). offline_steps: steps when there is nothing to
            continue from outside training (`convlens-visualize`).
        lr: Adam's learning rate on the Fourier coefficients.
        objective: "channel" (the mean of the unit's map) or "neuron" (its centre position).
        warm_start: continue from the previous epoch's coefficients (False: the same random start
            every epoch).
        transforms: random shifts, scaling and rotation sized to the image (False: none).
        color: "probe", "imagenet" or "none" (see the module docstring).
        decay_power: the exponent of the 1/frequency scale of the Fourier coefficients.
        squash: "clip" or "sigmoid" (Lucent's): how values are brought into the pixel range
            (`viz.feature_visualization.fourier_image`).
        seed: seeds the start coefficients and the transforms.
        summary: log `feature_viz_summary/<layer>` at fit end. summary_max_epochs: its rows, at most.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec` (the probe images give the colour
            statistics, "most_active" and the input shape).
    """

    name = "feature_viz"
    layer_kind = None  # any module with spatial maps: a conv, its ReLU, a pool, a residual block

    def __init__(self, layers: Sequence[str] | None = None, units: Mapping[str, Sequence[int]] | None = None,
                 max_units: int = 16, selection: str = "first", steps: int = 32, offline_steps: int = 512,
                 lr: float = 0.005, objective: str = "channel", warm_start: bool = True, transforms: bool = True,
                 color: str = "probe", decay_power: float = 1.0, squash: str = "clip", seed: int = 0,
                 summary: bool = True, summary_max_epochs: int = 10, tile_size: int = 48, every_n_epochs: int = 1,
                 **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, **probe_options)
        self.units: dict[str, list[int]] = check_units(units)
        check_int("max_units (units per layer)", max_units, 1)
        check_choice("selection", selection, UNIT_SELECTIONS,
                     " ('first': units 0..max_units-1, 'most_active': the most active on the probe images)")
        check_int("steps (optimization steps per epoch)", steps, 1)
        check_int("offline_steps", offline_steps, 1)
        check_choice("objective", objective, OBJECTIVES, " (the mean of the unit's map, or its centre position)")
        check_choice("color", color, COLORS, " (decorrelate colours with the probe images' statistics, "
                                             "ImageNet's, or not at all)")
        for flag, value in (("warm_start", warm_start), ("transforms", transforms), ("summary", summary)):
            if not isinstance(value, bool):
                raise ConfigError(f"{flag} must be true or false, got {value!r}")
        check_choice("squash", squash, SQUASHES, " (how values are brought into the pixel range)")
        check_int("seed", seed, 0)
        check_int("summary_max_epochs", summary_max_epochs, 2)
        check_int("tile_size (pixels)", tile_size, 1)
        self.max_units, self.selection, self.steps, self.offline_steps = max_units, selection, steps, offline_steps
        self.lr = _number("lr", lr, positive=True)
        self.decay_power = _number("decay_power", decay_power)
        self.squash = squash
        self.objective, self.warm_start, self.transforms, self.color = objective, warm_start, transforms, color
        self.seed, self.summary, self.summary_max_epochs, self.tile_size = seed, summary, summary_max_epochs, tile_size
        #: layer -> the units drawn (configured, borrowed or chosen at the first run; kept in state_dict)
        self.chosen: dict[str, list[int]] = {}
        #: layer -> [U, C, H, W//2+1, 2] Fourier coefficients of the last run (the warm start)
        self.coefficients: dict[str, torch.Tensor] = {}
        #: layer -> Adam's state after the last run ({"step", "exp_avg", "exp_avg_sq"}), continued with it
        self.optimizer_states: dict[str, dict[str, Any]] = {}
        #: runs so far (varies the transforms of a warm start from one epoch to the next)
        self.runs = 0
        #: one entry per run, thinned to summary_max_epochs: {"epoch", "step", "images": {layer: uint8}}
        self.history: list[dict[str, Any]] = []
        self._channels: dict[str, int] = {}
        self._color_matrix: torch.Tensor | None = None
        self._epochs_done = 0

    # -- layers and units ------------------------------------------------------------------------
    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        return default_conv_layers(net, image)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        problems = {}
        for layer in layers:
            out = layer_output(net, image, layer)
            if not torch.is_tensor(out) or out.dim() != 4:
                problems[layer] = (f"it outputs {list(out.shape) if torch.is_tensor(out) else type(out).__name__}, "
                                   "not maps [N, K, h, w]; feature visualization needs a layer with units")
            else:
                self._channels[layer] = out.shape[1]
        return problems

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._check_filters()

    def _check_filters(self) -> None:
        for layer, units in self.units.items():
            if not self.layers_provisional and layer not in self.layers:
                raise LayerError(f"units names layer {layer!r}, which is not drawn; the layers are "
                                 f"{', '.join(self.layers)} (add it to `layers`)")
            count = self._channels.get(layer)
            if count is not None and max(units) >= count:
                raise ConfigError(f"units[{layer!r}] has unit {max(units)}, but {layer} has {count} units "
                                  f"(0..{count - 1})")

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        image = self.probe_images[:1].to(pl_module.device)
        missing = [layer for layer in self.layers if layer not in self._channels]
        if missing:
            problems = self.unusable_layers(net, image, missing)
            if problems:
                layer, why = next(iter(problems.items()))
                raise LayerError(f"{type(self).__name__}: layer {layer!r} cannot be used: {why}")
        self._check_filters()
        self._color_matrix = None
        if self.probe_images.shape[1] == 3 and self.color == "probe":
            self._color_matrix = color_sqrt(to_pixels(self.probe_images, self.normalization(trainer)))
        elif self.probe_images.shape[1] == 3 and self.color == "imagenet":
            self._color_matrix = color_sqrt(None)

    def _borrowed(self, trainer: pl.Trainer, layer: str) -> list[int] | None:
        """The units another convlens callback of the trainer names for `layer` in its `units`."""
        for callback in trainer.callbacks:
            if callback is self or not isinstance(callback, VisualizationCallback):
                continue
            named = getattr(callback, "units", None)
            if isinstance(named, Mapping) and layer in named:
                units = named[layer]
                units = [units] if isinstance(units, int) else list(units)
                if units and all(isinstance(u, int) and 0 <= u < self._channels.get(layer, u + 1) for u in units):
                    return units
        return None

    def units_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer: str) -> list[int]:
        """The units drawn in `layer` (see the module docstring), chosen at the first run and kept."""
        if layer in self.units and self.chosen.get(layer) != self.units[layer]:
            self.chosen.pop(layer, None)  # configured otherwise than in the run this one resumes
        if layer not in self.chosen:
            self.coefficients.pop(layer, None)  # coefficients belong to the units they were made for
            self.optimizer_states.pop(layer, None)
            units = self.units.get(layer) or self._borrowed(trainer, layer)
            if units is None and self.selection == "most_active":
                activity = layer_maxima(self.net(pl_module), self.probe_images.to(pl_module.device), [layer])[layer]
                units = rank_units(activity, self.max_units).tolist()
            if units is None:
                units = list(range(min(self.max_units, self._channels[layer])))
            self.chosen[layer] = [int(u) for u in units]
        return self.chosen[layer]

    # -- drawing -------------------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        shape = tuple(self.probe_images.shape[1:])
        normalization = self.normalization(trainer)
        offline = trainer.state.fn == "validate"
        images_by_layer: dict[str, torch.Tensor] = {}
        scalars: dict[str, float] = {}
        for index, layer in enumerate(self.layers):
            units = self.units_for(trainer, pl_module, layer)
            previous = self.coefficients.get(layer) if self.warm_start else None
            if previous is not None and tuple(previous.shape[:2]) != (len(units), shape[0]) \
                    or previous is not None and tuple(previous.shape[2:4]) != (shape[1], shape[2] // 2 + 1):
                previous = None  # other units or another image size: start afresh
            state = self.optimizer_states.get(layer) if previous is not None else None
            steps = self.steps if previous is not None or not offline else self.offline_steps
            # a cold start is the same every epoch (only the net changes); a warm one varies its transforms
            base = self.seed * 1_000_003 + 10_007 * index + (7_919 * self.runs if previous is not None else 0)
            result = optimize_units(net, layer, units, shape, steps=steps, lr=self.lr, objective=self.objective,
                                    transforms=self.transforms, pixel_to_input=normalization,
                                    color=self._color_matrix, decay_power=self.decay_power, squash=self.squash,
                                    init=previous.to(pl_module.device) if previous is not None else None,
                                    optimizer_state=state, seed=base)
            if self.warm_start:
                self.coefficients[layer] = result.coefficients.detach().cpu().clone()
                self.optimizer_states[layer] = _on_cpu(result.optimizer_state)
            pixels = as_rgb(to_pixels(result.images, normalization)) if shape[0] in (1, 3) \
                else to_pixels(result.images, normalization)
            images_by_layer[layer] = pixels
            width = tile_width(pixels, self.tile_size)
            captions = [fit_caption(f"#{u} {float(v):.3g}", width) for u, v in zip(units, result.objectives)]
            nrow = min(len(units), max(4, math.ceil(math.sqrt(len(units)))))
            self.log_image(trainer, f"{self.name}/{layer}",
                           captioned_grid(pixels, nrow=nrow, captions=captions, tile_size=self.tile_size))
            scalars.update({f"{self.name}_objective/{layer}/unit{u}": float(v)
                            for u, v in zip(units, result.objectives)})
        self.log_scalars(trainer, scalars)
        self.runs += 1
        if self.summary and not offline:
            self._remember(trainer, images_by_layer)

    def _remember(self, trainer: pl.Trainer, images: dict[str, torch.Tensor]) -> None:
        kept = {}
        for layer, pixels in images.items():
            shrink = max(1, -(-max(pixels.shape[-2:]) // SUMMARY_SIDE))
            small = F.avg_pool2d(pixels, shrink, ceil_mode=True) if shrink > 1 else pixels
            kept[layer] = (small.clamp(0, 1) * 255).round().to(torch.uint8)
        self.history.append({"epoch": self._epochs_done, "step": log_step(trainer), "images": kept})
        self.history = _thin(self.history, self.summary_max_epochs)

    def summary_image(self, layer: str) -> torch.Tensor | None:
        """Rows = the remembered epochs, columns = the layer's units ([3, H, W]); None when no
        epoch drew it."""
        rows = [e for e in self.history if layer in e["images"]]
        if not rows:
            return None
        units = self.chosen.get(layer, list(range(rows[0]["images"][layer].shape[0])))
        width = max(len(units), max(e["images"][layer].shape[0] for e in rows))
        tiles = []
        for entry in rows:
            t = entry["images"][layer].float() / 255
            blank = torch.ones((width - t.shape[0],) + tuple(t.shape[1:]))
            tiles.append(torch.cat([t, blank]))
        return captioned_grid(torch.cat(tiles), nrow=width, row_titles=[f"epoch {e['epoch']}" for e in rows],
                              col_titles=[f"#{u}" for u in units], tile_size=self.tile_size)

    @rank_zero_only
    def _log_summary(self, trainer: pl.Trainer) -> None:
        for layer in self.layers:
            image = self.summary_image(layer)
            if image is not None:
                self.log_image(trainer, f"{self.name}_summary/{layer}", image)
        # at fit end the loggers are already finalized: TensorBoard reopens its writer for what was
        # logged here, which nothing would flush when the caller does not finalize the logger again
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.flush()

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["units"] = {layer: list(units) for layer, units in self.chosen.items()}
        state["coefficients"] = {layer: t.clone() for layer, t in self.coefficients.items()}
        state["optimizer_states"] = {layer: _on_cpu(s) for layer, s in self.optimizer_states.items()}
        state["runs"] = self.runs
        state["history"] = [dict(e, images=dict(e["images"])) for e in self.history]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.chosen = {str(k): [int(u) for u in v] for k, v in (state_dict.get("units") or {}).items()}
        self.coefficients = {str(k): t.clone() for k, t in (state_dict.get("coefficients") or {}).items()}
        # checkpoints from before the optimizer state was kept: the coefficients go on with a fresh Adam
        self.optimizer_states = {str(k): _on_cpu(s) for k, s in (state_dict.get("optimizer_states") or {}).items()}
        self.runs = int(state_dict.get("runs") or 0)
        self.history = list(state_dict.get("history") or [])
