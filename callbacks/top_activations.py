"""TopActivations: for selected units, the validation images' receptive-field patches that
activate them most.

Follows Vanrell & Arias, "Understanding and visualizing CNNs" (lecture, Master in Computer Vision
Barcelona; "Neuron Analysis": activation maximization, "find the images
that maximally activate a neuron"; "Building the Receptive field of a neuron": run each image, take
the unit's activation map, and cut out "the part of the image (with size of the receptive field)
that triggered the maximum activation"), over the whole validation set rather than one batch (as
Kevin Frans's 2016 blog post's "maximum activations" over a batch). The algorithms are
`viz.top_activations` (running top-k, per-map max and argmax) and `viz.receptive_field` (the box
and the patch); this callback chooses the units, collects, renders and logs.

Collection: during the validation loop of each due epoch (not the sanity check). Forward hooks are
added at validation epoch start (on the net, for its input images, and on each layer, for each
selected unit's per-image max and argmax) and removed at its end; each batch updates a running
top-k per layer in `on_validation_batch_end`, which crops only the patches of entries that enter
the top k. Nothing else is stored: memory is units x k patches per layer. Images are identified
by their content (`viz.top_activations.content_ids`), so an image seen twice (DDP pads the ranks'
shares with repeats) counts once. Under DDP every rank collects its share; the small states are
gathered (`torch.distributed.all_gather_object`) at validation epoch end and merged on rank zero,
which draws: the same result as one process over the whole validation set.

Logged at the step of the epoch's validation scalars (`callbacks.lightning_compat.log_step`; after validation,
in `on_train_epoch_end`):
- `top_activations/<layer>`: rows = the selected units (titled `#<index>`), columns = the k
  patches, best first, each captioned with its activation value. Patches are the image's pixels
  (the datamodule's normalization undone, true colors, no rescaling), all of the field's size: a
  unit near the border sees a clipped box, the rest of its tile is light blue. A row with fewer
  than k images (a tiny validation set) has blank tiles.
- `viz_time/top_activations_collect`: seconds this rank spent collecting during the validation
  loop (hooks and updates), beside the base's `viz_time/top_activations` (drawing).

Units per layer: `units[layer]` when given, else `max_units` chosen by `selection`: "first"
(units 0..max_units-1, the same rows every epoch) or "most_active" (the highest mean over the
probe images of each map's maximum, chosen at each due validation epoch start, most active first).
With `every_n_epochs=0` (only at fit end), the last epoch's validation is collected (every epoch's,
if `max_epochs` is unlimited).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from convlens.callbacks.collect import ValidationCollector
from convlens.callbacks.display import color_outside
from convlens.callbacks.options import UNIT_SELECTIONS, check_choice, check_int, check_unit_range, check_units
from convlens.render import as_rgb, captioned_grid
from convlens.viz.common import VizError
from convlens.viz.layers import (LayerError, default_conv_layers, get_layer, layer_maxima,
                                 rank_units)
from convlens.viz.receptive_field import ReceptiveField, crop_patches, receptive_field
from convlens.viz.top_activations import RunningTopK, content_ids

def top_activations_grid(patches: torch.Tensor, values: torch.Tensor, filled: torch.Tensor,
                         units: Sequence[int], tile_size: int = 64) -> torch.Tensor:
    """[3, H, W] grid: row r = unit `units[r]`, column s = its s-th best patch.

    `patches` [F, k, C, Ph, Pw] pixels in [0, 1], NaN outside the receptive field; `values` [F, k]
    captions; `filled` [F, k] bool (False: an empty slot, drawn blank)."""
    f, k = values.shape
    tiles = color_outside(as_rgb(patches.detach().float().cpu().flatten(0, 1)))   # [F*k, 3, Ph, Pw]
    empty = ~filled.cpu().flatten()
    tiles[empty] = 1.0
    captions = ["" if not ok else f"{float(v):.3g}" for v, ok in zip(values.cpu().flatten(), filled.cpu().flatten())]
    return captioned_grid(tiles, nrow=k, captions=captions, row_titles=[f"#{int(c)}" for c in units],
                          col_titles=[f"top {s + 1}" for s in range(k)], tile_size=tile_size)


def _as_index(units: Sequence[int], device) -> range | torch.Tensor:
    """Consecutive ascending units as a range (the maps are then sliced, not copied)."""
    if list(units) == list(range(units[0], units[0] + len(units))):
        return range(units[0], units[0] + len(units))
    return torch.tensor(list(units), device=device)


class TopActivations(ValidationCollector):
    """Top-k validation patches of selected units, one grid per layer (`top_activations/<layer>`).

    Args:
        layers: Conv2d names of the net (None: `viz.layers.default_conv_layers`, every conv of our
            LeNet and CIFAR nets, one conv per stage of larger nets).
        k: patches per unit (the k most activating validation images, best first).
        max_units: units drawn per layer when `units` does not name them (at most the layer's).
        selection: "first" (units 0..max_units-1) or "most_active" (on the probe images, each
            due epoch).
        units: explicit unit indices per layer, e.g. {conv3: [0, 7, 42]} (other layers use
            `selection`). `max_filters` and `filters`, the earlier names, work until the next release.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec` (the probe images serve
            "most_active" and, one of them, the receptive-field geometry).
    """

    name = "top_activations"
    layer_kind = nn.Conv2d

    def __init__(self, layers: Sequence[str] | None = None, k: int = 4, max_units: int = 8,
                 selection: str = "first", units: Mapping[str, Sequence[int]] | None = None,
                 tile_size: int = 64, every_n_epochs: int | None = None, **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, **probe_options)
        check_int("k (patches per unit)", k, 1)
        check_int("max_units (units per layer)", max_units, 1)
        check_int("tile_size (pixels)", tile_size, 1)
        check_choice("selection", selection, UNIT_SELECTIONS,
                     " ('first': units 0..max_units-1, 'most_active': the most active on the probe images)")
        self.k, self.max_units, self.selection, self.tile_size = k, max_units, selection, tile_size
        self.units: dict[str, list[int]] = check_units(units)
        self.fields: dict[str, ReceptiveField] = {}
        self.chosen: dict[str, list[int]] = {}          # the units of the current/last collection
        self.result: dict[str, RunningTopK] | None = None   # merged top-k of the last collection
        self.result_epoch: int | None = None
        self._tops: dict[str, RunningTopK] = {}
        self._normalization = None

    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        return default_conv_layers(net, image)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        problems = {}
        for layer in layers:
            try:
                field = self.fields.get(layer)
                if field is None or field.input_size != tuple(image.shape[-2:]):
                    self.fields[layer] = receptive_field(net, image, layer)
            except VizError as e:
                problems[layer] = " ".join(str(e).split())
        return problems

    # -- set up ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._check_units(self.net(pl_module))

    def _check_units(self, net: nn.Module) -> None:
        for layer in self.units:
            if not self.layers_provisional and layer not in self.layers:
                raise LayerError(f"units names layer {layer!r}, which is not drawn; the layers are "
                                 f"{', '.join(self.layers)} (add it to `layers`)")
            check_unit_range(type(self).__name__, self.units, layer, get_layer(net, layer).out_channels)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # the receptive fields: computed with the usable layers
        if self.probe_images is not None and not self.declined:
            self._check_units(self.net(pl_module))
            self._compute_fields(self.net(pl_module), self.probe_images[:1].to(pl_module.device))

    def _compute_fields(self, net: nn.Module, image: torch.Tensor) -> None:
        self.fields = {layer: field for layer, field in self.fields.items() if layer in self.layers}
        if set(self.fields) == set(self.layers) and \
                all(f.input_size == tuple(image.shape[-2:]) for f in self.fields.values()):
            return
        self.fields = {layer: receptive_field(net, image, layer) for layer in self.layers}

    # -- which epochs collect ----------------------------------------------------------------------
    def _choose_units(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[int]]:
        net = self.net(pl_module)
        chosen = {}
        need_activity = [layer for layer in self.layers
                         if layer not in self.units and self.selection == "most_active"]
        activity = layer_maxima(net, self.probe_images.to(pl_module.device), need_activity) if need_activity else {}
        for layer in self.layers:
            if layer in self.units:
                chosen[layer] = list(self.units[layer])
            elif layer in activity:
                chosen[layer] = rank_units(activity[layer], self.max_units).tolist()
            else:
                chosen[layer] = list(range(min(self.max_units, get_layer(net, layer).out_channels)))
        # every rank must track the same units: rank zero's choice wins
        return trainer.strategy.broadcast(chosen, src=0)

    # -- collecting during validation -----------------------------------------------------------
    def start_collecting(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: nn.Module) -> None:
        self._compute_fields(net, self.probe_images[:1].to(pl_module.device))
        self.chosen = self._choose_units(trainer, pl_module)
        self._tops = {layer: RunningTopK(self.k, len(self.chosen[layer])) for layer in self.layers}
        self._normalization = self.normalization(trainer)
        # only what the top-k needs: each selected unit's map maximum and its position
        self.attach_maxima_hooks(net, {layer: _as_index(self.chosen[layer], pl_module.device) for layer in self.layers})

    def take_records(self, records: list[dict], batch: Any) -> None:
        for record in records:
            images, maps = record["images"], record["maps"]
            # ids (a hash of every pixel) only for the images that can enter some top k; the
            # others are skipped by `update` whatever their id
            candidates = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
            for layer, (values, _) in maps.items():
                candidates |= self._tops[layer].may_enter(values)
            if not candidates.any():
                continue
            ids = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            ids[candidates] = content_ids(images[candidates])
            for layer, (values, positions) in maps.items():
                field = self.fields[layer]

                def patches(rows, pos, field=field, images=images):
                    x = images[rows]
                    if self._normalization is not None:
                        x = self._normalization.inverse(x)
                    return crop_patches(x.clamp(0, 1), field, pos[:, 0], pos[:, 1])

                self._tops[layer].update(values, ids, positions, payload=patches)

    def finish_collecting(self, trainer: pl.Trainer) -> dict[str, RunningTopK] | None:
        gathered = self.gather(trainer, {layer: top.state_dict() for layer, top in self._tops.items()})
        self._tops = {}
        if not trainer.is_global_zero:
            return None
        merged = {layer: RunningTopK.from_state_dict(gathered[0][layer]) for layer in self.layers}
        for other in gathered[1:]:
            for layer in self.layers:
                merged[layer].merge(RunningTopK.from_state_dict(other[layer]))
        return merged

    # -- drawing -------------------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is None or not self.collected_now(trainer, self.result_epoch, "top activations are drawn"):
            return
        for layer, top in self.result.items():
            filled = top.image_ids >= 0
            patches = top.payload
            if patches is None:  # nothing was seen at all: blank tiles of the field's size
                ph, pw = self.fields[layer].patch_size
                patches = torch.full((top.num_units, top.k, 1, ph, pw), math.nan)
            self.log_image(trainer, f"{self.name}/{layer}",
                           top_activations_grid(patches, top.values, filled, self.chosen[layer], self.tile_size))
        self.log_scalars(trainer, {f"viz_time/{self.name}_collect": self.collect_seconds})

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["units"] = self.units
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        units = state_dict.get("units", state_dict.get("filters"))  # "filters": convlens <= 0.2
        if units is not None:
            self.units = {k: list(v) for k, v in units.items()}
