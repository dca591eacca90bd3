"""DecodedFilters: every n epochs, the conv filters decoded to image space by substitution.

Follows Rafegas & Vanrell, "Understanding learned CNN features through Filter Decoding with
Substitution" (2015, arXiv:1511.05084): `viz.decoding.decode_filters`
brings each filter of a conv layer down to the input (Fig. 4), `threshold_decoded` gives the
paper's thresholded version that "enhances the positive and negative basic patterns" (Fig. 1,
Fig. 4a,e), and `reconstruction_error` is its Eq. 3 (Table 1), measured on the probe images.

Decoding is defined for a chain of modules: on other nets (ResNet, DenseNet, ...) it applies to the
convs reached through the chain prefix from the input (`viz.decoding.decodable_layers`, e.g. a
ResNet's stem). Default layers: every such Conv2d (a warning names the others, once); a configured
layer off the chain fails at setup with the list of decodable ones.

Logged per conv layer, at the step of the epoch's validation scalars (`callbacks.lightning_compat.log_step`):
- `decoded/<layer>`: the decoded filter bank as a grid, each tile scaled symmetrically on its own
  (zero is mid-gray, the tile's largest magnitude white or black; channels share the scale, so a
  colour filter keeps its hue), captioned with its unit's index in the layer;
- `decoded_threshold/<layer>`: the thresholded version: +1 white, -1 black, 0 gray;
- `decoded_error/<layer>` (scalar): the mean over the probe images of the Eq. 3 error.

Layers with more than `max_units` units show the filters of a subset: the `max_units` most active
units on the probe images (`selection="most_active"`: highest mean over the probe images of each
unit's map maximum, the conv's output, pre-activation, biases included), the first ones
(`selection="first"`), or an explicit list per layer (`units={layer: [indices]}`). The subset is
chosen once, the first time the callback draws, and then kept (also in `state_dict`, so a resumed
run shows the same units), so that TensorBoard's step slider follows the same units through
training. Most active units are shown most active first; every other order is the index order.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_deprecation
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.options import UNIT_SELECTIONS, check_unit_range, check_units
from convlens.errors import ConfigError
from convlens.render import captioned_grid, scale_symmetric
from convlens.viz.decoding import (DECODING_UNPOOL_MODES, decodable_layers, decode_filters, reconstruction_error,
                                   threshold_decoded)
from convlens.viz.layers import (ALL_CONVS_UP_TO, LayerError, default_conv_layers, get_layer, layer_maxima,
                                 layer_names, rank_units)



class DecodedFilters(VisualizationCallback):
    """Decoded filter banks (images), their thresholded versions (images) and the Eq. 3 error
    (scalars) of conv layers, every `every_n_epochs` epochs.

    Args:
        layers: conv layer names of `pl_module.net` (None: every Conv2d).
        unpool: how pooling layers are undone: "nearest", "bilinear" or "bicubic".
        max_units: the filters of at most this many units per layer are drawn (None: all of them).
        selection: which units of a layer with more than `max_units`: "most_active" or "first".
        units: explicit unit indices per layer, e.g. {"conv3": [0, 7, 42]}; they override
            `selection` and `max_units` for those layers. `max_filters` and `filters`, the earlier
            names, work until the next release.
        threshold: a decoded value counts as strongly positive/negative when its magnitude is at
            least this fraction of its filter's largest magnitude (`threshold_decoded`'s q).
        compute_error: log the Eq. 3 error on the probe images (`decoded_error/<layer>`).
        tile_size: each tile is upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec`; the probe images are what
            `most_active` and the Eq. 3 error are measured on.
    """

    name = "decoded"
    layer_kind = nn.Conv2d

    def __init__(self, layers: Sequence[str] | None = None, every_n_epochs: int | None = None,
                 unpool: str = "nearest", max_units: int | None = 64, selection: str = "most_active",
                 units: Mapping[str, Sequence[int]] | None = None, threshold: float = 0.5,
                 compute_error: bool = True, tile_size: int = 32, **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, **probe_options)
        if unpool not in DECODING_UNPOOL_MODES:
            raise ConfigError(f"Unknown unpool mode {unpool!r}. Valid modes: {', '.join(DECODING_UNPOOL_MODES)}")
        if max_units is not None and (isinstance(max_units, bool) or not isinstance(max_units, int)
                                      or max_units < 1):
            raise ConfigError(f"max_units must be an int >= 1 or None (all units), got {max_units!r}")
        if selection not in UNIT_SELECTIONS:
            raise ConfigError(f"Unknown selection {selection!r}. Use one of {', '.join(UNIT_SELECTIONS)}, "
                             f"or give explicit indices per layer with units={{layer: [indices]}}")
        if not 0 < threshold <= 1:
            raise ConfigError(f"threshold must be a fraction of the largest magnitude in (0, 1], got {threshold}")
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ConfigError(f"tile_size must be an int >= 1 (pixels), got {tile_size!r}")
        self.unpool, self.max_units, self.selection = unpool, max_units, selection
        self.threshold, self.compute_error, self.tile_size = threshold, compute_error, tile_size
        #: the units configured per layer
        self.units = check_units(units)
        #: the units whose filters are drawn per layer (None: all), fixed the first time it draws
        self.chosen_units: dict[str, list[int] | None] = {}

    # -- layers: decodable convs only ------------------------------------------------------------
    _WHY = ("not reached through a plain chain of modules from the input (filter decoding substitutes "
            "filters layer by layer along a chain: on a ResNet, only its stem)")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # Conv2d names, with the valid ones in the error
        self._check_units(self.net(pl_module))

    def _check_units(self, net: nn.Module) -> None:
        """Explicit units: in range now; among the drawn layers once those are known."""
        for layer in self.units:
            conv = get_layer(net, layer, nn.Conv2d)
            if self.layers is not None and not self.layers_provisional and layer not in self.layers:
                raise LayerError(f"units names layer {layer!r}, which is not among the drawn layers "
                                 f"{self.layers}; add it to `layers` or remove it from `units`")
            check_unit_range(type(self).__name__, self.units, layer, conv.out_channels)

    def setup_layers(self, net: nn.Module) -> None:
        # configured layers: DecodingError-free now, not epochs later (the geometry needs no image)
        usable = decodable_layers(net)
        bad = [layer for layer in self.layers if layer not in usable]
        if bad:
            raise LayerError(f"{type(self).__name__}: layer {bad[0]!r} cannot be decoded: it is {self._WHY}. "
                             f"Decodable layers: {', '.join(usable) or 'none'}")

    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        # every conv; one per stage when more than ALL_CONVS_UP_TO of them can be decoded (VGG16:
        # 5 of 13; each decoded layer costs a pass per filter)
        convs = layer_names(net, nn.Conv2d)
        if image is None or len(decodable_layers(net, image)) <= ALL_CONVS_UP_TO:
            return convs
        return default_conv_layers(net, image)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        usable = set(decodable_layers(net, image))
        return {layer: self._WHY for layer in layers if layer not in usable}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.probe_images is not None and not self.declined:
            self._check_units(self.net(pl_module))

    # -- choosing units --------------------------------------------------------------------------
    def units_for(self, net: nn.Module, layer: str, images: torch.Tensor) -> list[int] | None:
        """The units of `layer` whose filters are drawn (None: all), chosen on first use and then kept."""
        if layer not in self.chosen_units:
            count = get_layer(net, layer, nn.Conv2d).out_channels
            if layer in self.units:
                chosen = self.units[layer]
            elif self.max_units is None or count <= self.max_units:
                chosen = None
            elif self.selection == "first":
                chosen = list(range(self.max_units))
            else:
                chosen = rank_units(layer_maxima(net, images, [layer])[layer], self.max_units).tolist()
            self.chosen_units[layer] = chosen
        return self.chosen_units[layer]

    def filters_for(self, net: nn.Module, layer: str, images: torch.Tensor) -> list[int] | None:
        """Deprecated: the earlier name of `units_for` (until the next release)."""
        rank_zero_deprecation("DecodedFilters.filters_for is now called units_for")
        return self.units_for(net, layer, images)

    # -- rendering -------------------------------------------------------------------------------
    def render_bank(self, tiles: torch.Tensor, indices: Sequence[int], layer: str = "the layer") -> torch.Tensor:
        """[K, C, h, w] filters (any sign) -> one [3, H, W] grid, each tile symmetric around gray,
        captioned with its unit's index; as many as a card shows (`render.CARD_HEIGHT`), the others
        named in a note."""
        nrow = math.ceil(math.sqrt(tiles.shape[0]))
        return captioned_grid(scale_symmetric(tiles), nrow=nrow, captions=[str(i) for i in indices],
                              tile_size=self.tile_size, flat=True,
                              cap=f"showing {{shown}} of {{total}} units of {layer}; set max_units to choose")

    # -- the callback ----------------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, _ = self.probe(pl_module)
        errors = {}
        # the layers in order, as the time budget allows (a first drawing stops at its deadline)
        explicit = not self.uses_defaults or bool(self.units)
        for layer in self.within_budget(self.layers, "layers", explicit=explicit):
            chosen = self.units_for(net, layer, images)
            decoded = decode_filters(net, layer, unpool=self.unpool, filters=chosen)
            indices = chosen if chosen is not None else range(decoded.shape[0])
            self.log_image(trainer, f"decoded/{layer}", self.render_bank(decoded, indices, layer))
            thresholded = threshold_decoded(decoded, q=self.threshold)
            self.log_image(trainer, f"decoded_threshold/{layer}", self.render_bank(thresholded, indices, layer))
            if self.compute_error:
                errors[f"decoded_error/{layer}"] = reconstruction_error(net, layer, images, unpool=self.unpool)[0]
        if errors:
            self.log_scalars(trainer, errors)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "chosen_units": dict(self.chosen_units)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        chosen = state_dict.get("chosen_units", state_dict.get("chosen_filters"))  # convlens <= 0.2
        self.chosen_units = dict(chosen or {})

