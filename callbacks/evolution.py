"""FilterEvolution: one fixed unit per layer, tracked through training (Fig. 4 of the report).

Follows Berthier & Mantoux's RecVis 2018 report, section 3.4 and Fig. 4 ("we display the evolution
of one fixed chosen filter at each layer, for a fixed input image, during training ... On top is the
accuracy achieved after a given number of epochs"; the report's "filter" is the unit), itself
after Zeiler & Fergus (ECCV 2014, arXiv:1311.2901).
The projection is `viz.deconvnet` (biases ignored, BatchNorm/Dropout as in eval mode; its general
path on nets that are not a chain of modules).

Logged every `every_n_epochs` epochs, at the step of the epoch's validation scalars
(`callbacks.lightning_compat.log_step`, so TensorBoard's step slider is the epoch axis of each tag):
- `evolution/<layer>`: the fixed probe image (the `probe_index`-th probe image) beside the deconv
  projection of its map of the layer's fixed unit, min-max scaled on its own (`scale_each`);
- `evolution/weights_<layer>`: the filters of `weights_layer` (default: the net's first Conv2d),
  each tile scaled symmetrically on its own (0 is mid-gray, its largest magnitude white/black; the
  channels of a color filter share the scale);
- `evolution_weight_change/<layer>` (scalar): the relative L2 change of the layer's weight (bias ignored)
  since the previous time the callback ran: ||W_t - W_{t-1}|| / ||W_{t-1}||; the weights are
  recorded at fit start, so the first epoch has a value too (after a resume: since the checkpoint).
At fit end, `evolution/summary`: rows = layers (titled with the unit's index), columns = the probe
image then the epochs (at most `summary_max_epochs`, evenly spaced, first and last kept), each
column headed by that epoch's val accuracy (the latest `val/acc` when the callback ran).

The unit of each layer is `units[layer]` when configured, else the unit most activated (highest
maximum activation of its map) by the probe image the first time the callback runs (the end of the
first epoch). The choice and the per-epoch projections (uint8, small) are kept in `state_dict`, so a
resumed run tracks the same units and its summary includes the epochs before the resume.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_only
from torch import nn

from convlens.callbacks.projection import ProjectionCallback
from convlens.callbacks.summary import FitSummaryCallback
from convlens.callbacks.lightning_compat import log_step
from convlens.callbacks.options import check_int, check_unit_range, check_units
from convlens.errors import ConfigError
from convlens.render import (as_rgb, captioned_grid, class_caption, fit_caption, scale_each, scale_symmetric,
                             tile_width, to_pixels)
from convlens.viz.deconvnet import DECONV_UNPOOL_MODES
from convlens.viz.layers import LayerError, get_layer, layer_names, rank_units


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """||current - previous|| / ||previous|| (Frobenius norms, in float64)."""
    previous = previous.detach().double()
    return float((current.detach().double() - previous).norm() / previous.norm().clamp_min(1e-12))


def weights_grid(weight: torch.Tensor, tile_size: int = 40) -> torch.Tensor:
    """A conv weight [out, in, kh, kw] as a grid: one tile per filter (color when in == 3, gray
    when in == 1; otherwise one row per filter, one gray tile per input channel), each tile scaled
    symmetrically on its own, captioned with the filter index."""
    w = weight.detach().float().cpu()
    out, cin = w.shape[:2]
    if cin in (1, 3):
        tiles, nrow = w, math.ceil(math.sqrt(out))
        width = w.shape[-1] * max(1, round(tile_size / max(w.shape[-2:])))
        captions = [fit_caption(f"#{i}", width) for i in range(out)]
    else:
        tiles, nrow, captions = w.reshape(out * cin, 1, *w.shape[-2:]), cin, None
    # as many filters as a card shows (`render.CARD_HEIGHT`), the others named in a note
    return captioned_grid(scale_symmetric(tiles), nrow=nrow, captions=captions, tile_size=tile_size,
                          flat=cin in (1, 3), per=1 if cin in (1, 3) else cin,
                          cap="showing {shown} of {total} filters; set weights_layer to choose another layer")


class FilterEvolution(ProjectionCallback, FitSummaryCallback):
    """One fixed unit per layer projected for one fixed probe image every epoch, the first layer's
    weights, the relative weight change per layer, and a layers x epochs summary at fit end.

    Args:
        layers: Conv2d names of the net (None: `viz.layers.default_conv_layers`).
        units: the unit to track per layer, e.g. {"conv3": [17]} (or {"conv3": 17}); layers left
            out get the unit most activated by the probe image at the first run. `filters`, the
            earlier name, works until the next release.
        probe_index: which probe image is projected (0: the first).
        unpool: "switches" (Zeiler & Fergus) or "fill" (the blog's cheaper unpooling).
        weights_layer: the Conv2d whose weights are drawn (None: the net's first Conv2d).
        summary: log `evolution/summary` at fit end.
        summary_max_epochs: at most this many epoch columns in the summary.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec`.
    """

    name = "evolution"
    layer_kind = nn.Conv2d

    def __init__(self, layers: Sequence[str] | None = None, units: Mapping[str, Sequence[int] | int] | None = None,
                 probe_index: int = 0, unpool: str = "switches", weights_layer: str | None = None,
                 summary: bool = True, summary_max_epochs: int = 20, tile_size: int = 64,
                 every_n_epochs: int | None = None, **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, **probe_options)
        units = {layer: indices[0] for layer, indices in check_units(units, one_per_layer=True).items()}
        check_int("probe_index (0: the first probe image)", probe_index, 0)
        if unpool not in DECONV_UNPOOL_MODES:
            raise ConfigError(f"Unknown unpool={unpool!r}; use one of {', '.join(DECONV_UNPOOL_MODES)} "
                             "('switches': Zeiler & Fergus, 'fill': the blog's cheaper unpooling)")
        if weights_layer is not None and not isinstance(weights_layer, str):
            raise ConfigError(f"weights_layer must be a Conv2d name or None (the first one), got {weights_layer!r}")
        if not isinstance(summary, bool):
            raise ConfigError(f"summary must be true or false, got {summary!r}")
        check_int("summary_max_epochs", summary_max_epochs, 1)
        check_int("tile_size (pixels)", tile_size, 1)
        #: the unit tracked per layer, as configured
        self.units: dict[str, int] = {str(k): int(v) for k, v in units.items()}
        self.probe_index, self.unpool, self.weights_layer = probe_index, unpool, weights_layer
        self.summary, self.summary_max_epochs, self.tile_size = summary, summary_max_epochs, tile_size
        #: the unit tracked per layer: configured or chosen at the first run (kept in state_dict)
        self.chosen: dict[str, int] = {}
        #: one entry per run: {"epoch", "step", "val_acc", "tiles": {layer: uint8 [C, H, W]}}
        self.history: list[dict[str, Any]] = []
        self._previous_weights: dict[str, torch.Tensor] = {}
        self._epochs_done = 0
        self._path = "auto"

    def _check_units(self, net: nn.Module) -> None:
        """The tracked units: in range, and of tracked layers (once the layers are final)."""
        for layer, index in self.units.items():
            if layer not in self.layers and (not self.layers_provisional or layer not in layer_names(net, nn.Conv2d)):
                raise LayerError(f"units names layer {layer!r}, which is not tracked. Tracked layers: "
                                 f"{', '.join(self.layers)} (add it to `layers`, or fix the name)")
            count = get_layer(net, layer, nn.Conv2d).out_channels
            check_unit_range(type(self).__name__, {layer: [index]}, layer, count)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        net = self.net(pl_module)
        self._check_units(net)
        if self.weights_layer is None:
            convs = layer_names(net, nn.Conv2d)
            self.weights_layer = convs[0] if convs else None
        if self.weights_layer is not None:
            get_layer(net, self.weights_layer, nn.Conv2d)  # LayerError with the valid names

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.probe_images is None or self.declined:
            return
        if self.probe_index >= len(self.probe_images):
            raise ConfigError(f"probe_index={self.probe_index}, but there are only {len(self.probe_images)} "
                             f"probe images (num_probe={self.num_probe}, probe_per_class="
                             f"{self.probe_per_class}); use a probe_index below {len(self.probe_images)}")
        net = self.net(pl_module)
        self._check_units(net)
        # weights as training starts (or as restored from a checkpoint): the first change's reference
        self._previous_weights = {layer: get_layer(net, layer).weight.detach().clone()
                                  for layer in self.layers}

    # -- drawing -------------------------------------------------------------------------------
    def tracked_unit(self, layer: str) -> int | None:
        """The unit tracked in `layer`: configured, else chosen at the first run (None before it)."""
        return self.units.get(layer, self.chosen.get(layer))

    def tracked_map(self, layer: str) -> int | None:
        """Deprecated: the earlier name of `tracked_unit` (until the next release)."""
        rank_zero_deprecation("FilterEvolution.tracked_map is now called tracked_unit")
        return self.tracked_unit(layer)

    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        image = images[self.probe_index:self.probe_index + 1]
        pixels = to_pixels(image, self.normalization(trainer))
        caption = class_caption(labels[self.probe_index], self.class_names(trainer))
        width = tile_width(image, self.tile_size)
        tiles: dict[str, torch.Tensor] = {}
        explicit = not self.uses_defaults or bool(self.units)
        for layer, rec in self.recordings_within_budget(net, image, explicit=explicit):
            unit = self.tracked_unit(layer)
            if unit is None:  # first run: the unit the probe image activates most
                unit = int(rank_units(rec.map_maxima(), 1)[0])
            self.chosen[layer] = unit
            tile = scale_each(rec.project(unit, self.unpool))
            tiles[layer] = (tile[0] * 255).round().to(torch.uint8)
            self.log_image(trainer, f"evolution/{layer}",
                           captioned_grid(torch.cat([pixels, tile]), nrow=2, tile_size=self.tile_size,
                                          captions=[fit_caption(caption, width, lines=2),
                                                    fit_caption(f"#{unit}", width)]))
        if self.weights_layer is not None:
            self.log_image(trainer, f"evolution/weights_{self.weights_layer}",
                           weights_grid(get_layer(net, self.weights_layer).weight))
        self.log_scalars(trainer, self._weight_changes(net))
        acc = trainer.callback_metrics.get("val/acc")
        self.history.append({"epoch": self._epochs_done, "step": log_step(trainer),
                             "val_acc": float(acc) if acc is not None else None, "tiles": tiles})

    def _weight_changes(self, net: nn.Module) -> dict[str, float]:
        changes = {}
        for layer in self.layers:
            weight = get_layer(net, layer).weight.detach()
            previous = self._previous_weights.get(layer)
            if previous is not None and previous.shape == weight.shape:
                changes[f"evolution_weight_change/{layer}"] = relative_change(weight, previous.to(weight.device))
            self._previous_weights[layer] = weight.clone()
        return changes

    def summary_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rows = layers, columns = the probe image (`pixels` [1, C, H, W]) then the recorded epochs
        (at most `summary_max_epochs`, evenly spaced), headed by epoch and val accuracy."""
        history = self.history
        if len(history) > self.summary_max_epochs:
            keep = torch.linspace(0, len(history) - 1, self.summary_max_epochs).round().long().unique()
            history = [history[i] for i in keep.tolist()]
        pixel_tile = as_rgb(pixels.float().cpu())[0]
        blank = torch.ones_like(pixel_tile)  # a layer not tracked at that epoch
        tiles = []
        for layer in self.layers:
            tiles.append(pixel_tile)
            for entry in history:
                t = entry["tiles"].get(layer)
                tiles.append(as_rgb(t[None].float() / 255)[0] if t is not None else blank)
        # "<epoch>: <val acc>", short enough to sit above a 56-pixel tile
        col_titles = ["input"] + [f"{e['epoch']}: " + (f"{e['val_acc']:.1%}" if e["val_acc"] is not None
                                                       else "n/a") for e in history]
        row_titles = [f"{layer} #{self.tracked_unit(layer)}" for layer in self.layers]
        return captioned_grid(torch.stack(tiles), nrow=len(history) + 1, row_titles=row_titles,
                              col_titles=col_titles, tile_size=self.tile_size)

    @rank_zero_only
    def _log_summary(self, trainer: pl.Trainer) -> None:
        index = min(self.probe_index, len(self.probe_images) - 1)
        pixels = to_pixels(self.probe_images[index:index + 1], self.normalization(trainer))
        self.log_image(trainer, "evolution/summary", self.summary_image(pixels))

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["tracked_units"] = dict(self.chosen)  # layer -> the one unit tracked
        state["history"] = [dict(e, tiles=dict(e["tiles"])) for e in self.history]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        tracked = state_dict.get("tracked_units", state_dict.get("filters"))  # "filters": convlens <= 0.2
        self.chosen = {str(k): int(v) for k, v in (tracked or {}).items()}
        self.history = list(state_dict.get("history") or [])
