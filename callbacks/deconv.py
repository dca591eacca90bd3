"""DeconvProjection: every n epochs, Zeiler & Fergus deconvnet projections of the top units' maps.

Follows Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014,
arXiv:1311.2901) as Berthier & Mantoux's RecVis 2018 report applies it (section 2.2 and Fig. 1: the
units of a layer ranked by the maximum activation of their maps, a few of the highest projected
back to the input), and Frans, "Visualizing Features from a Convolutional Neural Network" (blog post, 2016: "I
passed in a whole batch of images and saved the maximum activations": for each unit, the image of
the batch that activates it most, and its projection). The algorithm is `viz.deconvnet` (its chain
path on a plain chain of modules, its general path, `viz.deconvnet_general`, on any other net:
ResNet, DenseNet, MobileNet, ConvNeXt); this callback only chooses inputs, renders and logs.

Logged per layer, at the step of the epoch's validation scalars (`callbacks.lightning_compat.log_step`):
- `deconv/<layer>`: one row per probe image: the image, then the projections of its maps of the `k`
  units of highest maximum activation, best first, each captioned with its unit index (`#12`);
- `deconv_max/<layer>` (with `deconv_max=True`): over one validation batch (the `val_batch_index`-th
  batch of the first val loader, its first `val_images` images, captured as validation runs), for
  each of `max_units` units: the image that activates it most, captioned with its class, beside the
  projection of its map of that unit, captioned with the unit index. Units are the `max_units` most
  active ones over the batch, most active first (`max_units_by="most_active"`), or units
  0..max_units-1 (`max_units_by="first"`, the blog's "features 1-32").

Normalization: the input images are shown in their true colors (the datamodule's normalization
undone); each projection is min-max scaled on its own over all its channels (`scale_each`): only
its pattern matters, and a color projection keeps its hue. Conventions of the projection (biases
ignored, BatchNorm/Dropout as in eval mode, unpooling by switches or "fill") are those of
`viz.deconvnet.project`.

Default layers: `viz.layers.default_conv_layers` (every Conv2d of a net with at most six, else one
conv per stage: the last of each output resolution, found with one probe image).
"""
from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from convlens.callbacks.projection import ProjectionCallback
from convlens.callbacks.options import UNIT_SELECTIONS, check_int
from convlens.callbacks.probe import split_batch
from convlens.errors import ConfigError
from convlens.render import (captioned_grid, class_caption, columns_that_fit, fit_caption, scale_each, tile_width,
                             to_pixels)
from convlens.viz.deconvnet import DECONV_UNPOOL_MODES, fast_dtype, record_layers

#: the earlier names of `max_units_by`'s choices (UNIT_SELECTIONS), still accepted
SELECTION_ALIASES = {"activation": "most_active", "index": "first"}
PRECISIONS = ("auto", "float32", "bfloat16")


def reverse_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the deconvnet's reverse pass: "auto" is bfloat16 where the device runs it
    natively (`viz.deconvnet.fast_dtype`), else float32 (None: the recording's own dtype)."""
    if precision == "auto":
        return fast_dtype(device)
    return torch.bfloat16 if precision == "bfloat16" else None


def top_units_grid(pixels: torch.Tensor, projections: torch.Tensor, indices: torch.Tensor,
                   image_captions: Sequence[str], tile_size: int = 64) -> torch.Tensor:
    """One row per image: the image ([N, C, H, W] pixels in [0, 1]) then its k projections
    ([N, k, C, H, W], each min-max scaled on its own), captioned with the unit indices [N, k]."""
    n, k = indices.shape
    scaled = scale_each(projections.flatten(0, 1)).view(n, k, *projections.shape[2:])
    tiles = torch.cat([pixels.float().cpu().unsqueeze(1), scaled], dim=1).flatten(0, 1)
    width = tile_width(pixels, tile_size)
    captions = []
    for i in range(n):
        captions.append(fit_caption(image_captions[i], width, lines=2))
        captions.extend(fit_caption(f"#{int(c)}", width) for c in indices[i])
    # as many probe images as a card shows (`render.CARD_HEIGHT`), the others named in a note
    return captioned_grid(tiles, nrow=k + 1, captions=captions, tile_size=tile_size, per=k + 1,
                          cap="showing {shown} of {total} probe images; set num_probe to choose")


def max_images_grid(pixels: torch.Tensor, projections: torch.Tensor, units: torch.Tensor,
                    image_captions: Sequence[str], pairs_per_row: int = 8,
                    tile_size: int = 64) -> torch.Tensor:
    """Pairs (image, the projection of its map of unit `units[j]`), `pairs_per_row` pairs a row:
    `pixels` and `projections` [M, C, H, W], the projections min-max scaled each on its own."""
    tiles = torch.stack([pixels.float().cpu(), scale_each(projections)], dim=1).flatten(0, 1)
    width = tile_width(pixels, tile_size)
    captions = []
    for j in range(len(units)):
        captions += [fit_caption(image_captions[j], width, lines=2), fit_caption(f"#{int(units[j])}", width)]
    # pairs wrap onto new rows rather than making a strip too wide to read in TensorBoard
    ncol = columns_that_fit(width, 2 * min(pairs_per_row, len(units)), group=2)
    return captioned_grid(tiles, nrow=ncol, captions=captions, tile_size=tile_size, per=2,
                          cap="showing {shown} of {total} units; set max_units to choose")


class DeconvProjection(ProjectionCallback):
    """Deconvnet projections of each probe image's maps of its top-k units (`deconv/<layer>`) and,
    over a validation batch, of each unit's most activating image (`deconv_max/<layer>`).

    Args:
        layers: Conv2d names of `pl_module.net` (None: `default_conv_layers`).
        k: the top-k units per probe image and layer whose maps are projected (at most the layer's
            unit count).
        unpool: "switches" (Zeiler & Fergus) or "fill" (the blog's cheaper unpooling).
        deconv_max: also draw `deconv_max/<layer>` from a validation batch.
        max_units: units drawn in `deconv_max/<layer>` (at most the layer's unit count).
        max_units_by: "most_active" (the most active units over the batch) or "first" (the first
            ones); the earlier names "activation" and "index" are accepted. `max_maps` and
            `max_maps_by`, the earlier names of these options, work until the next release.
        val_batch_index: which batch of the validation loader (0: the first) is searched.
        val_images: at most this many images of that batch are searched.
        precision: dtype of the chain path's reverse pass: "auto" (bfloat16 on GPUs and CPUs with
            native bf16, faster there and within about one gray level of float32, see
            benchmarks/RESULTS.md; else float32), "float32" or "bfloat16". The forward pass and the
            ranking of units stay in float32; the general path runs in the model's dtype.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec`.
    """

    name = "deconv"
    layer_kind = nn.Conv2d

    def __init__(self, layers: Sequence[str] | None = None, k: int = 4, unpool: str = "switches",
                 deconv_max: bool = True, max_units: int = 16, max_units_by: str = "most_active",
                 val_batch_index: int = 0, val_images: int = 64, precision: str = "auto",
                 tile_size: int = 64, every_n_epochs: int | None = None, **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, **probe_options)
        check_int("k (top units per probe image)", k, 1)
        if unpool not in DECONV_UNPOOL_MODES:
            raise ConfigError(f"Unknown unpool={unpool!r}; use one of {', '.join(DECONV_UNPOOL_MODES)} "
                             "('switches': Zeiler & Fergus, 'fill': the blog's cheaper unpooling)")
        if not isinstance(deconv_max, bool):
            raise ConfigError(f"deconv_max must be true or false, got {deconv_max!r}")
        check_int("max_units (units drawn in deconv_max)", max_units, 1)
        max_units_by = SELECTION_ALIASES.get(max_units_by, max_units_by)
        if max_units_by not in UNIT_SELECTIONS:
            raise ConfigError(f"Unknown max_units_by={max_units_by!r}; use 'most_active' (the most active "
                             "units over the batch) or 'first' (units 0..max_units-1); the earlier names "
                             "'activation' and 'index' still work")
        check_int("val_batch_index (0: the first validation batch)", val_batch_index, 0)
        check_int("val_images (images of the validation batch searched)", val_images, 1)
        check_int("tile_size (pixels)", tile_size, 1)
        if precision not in PRECISIONS:
            raise ConfigError(f"Unknown precision={precision!r} for the deconvnet's reverse pass; use one of "
                             f"{', '.join(PRECISIONS)} ('auto': bfloat16 where the hardware runs it natively)")
        self.precision = precision
        self.k, self.unpool, self.deconv_max = k, unpool, deconv_max
        self.max_units, self.max_units_by = max_units, max_units_by
        self.val_batch_index, self.val_images, self.tile_size = val_batch_index, val_images, tile_size
        self.val_batch: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._warned_no_val = False
        #: the deconvnet path for this net ("chain" or "general"), found at fit start
        self._path = "auto"

    # -- the validation batch searched by deconv_max ----------------------------------------------
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # the batch arrives here after the datamodule's transfer hook: normalized model input.
        # The val split is not shuffled, so the batch captured once is the same batch every epoch.
        if not self.deconv_max or self.val_batch is not None:
            return
        if batch_idx != self.val_batch_index or dataloader_idx != 0:
            return
        try:
            images, labels = split_batch(batch, self.batch_keys, "the validation batch")
        except ConfigError as e:
            rank_zero_warn(f"{type(self).__name__}: {e}; deconv_max is turned off")
            self.deconv_max = False
            return
        keep = slice(0, self.val_images)
        self.val_batch = (images[keep].detach().cpu().clone(),
                          labels[keep].detach().cpu().clone() if torch.is_tensor(labels) else None)

    # -- drawing -------------------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        normalization, names = self.normalization(trainer), self.class_names(trainer)
        pixels = to_pixels(images, normalization)
        captions = self.captions(trainer, labels)
        dtype = reverse_dtype(self.precision, pl_module.device)
        # all tensor work first, then all rendering: on CPU, torch's worker threads fall asleep
        # during the (single-threaded) drawing and each first op after it pays for waking them
        drawn = []
        for layer, rec in self.recordings_within_budget(net, images, explicit=not self.uses_defaults):
            _, indices = rec.top_units(min(self.k, rec.num_units))
            drawn.append((layer, indices.cpu(), rec.project_many(indices, self.unpool, dtype=dtype).cpu()))
        maxima = self._max_activating(net, pl_module.device, dtype) if self.deconv_max else []
        for layer, indices, projections in drawn:
            self.log_image(trainer, f"deconv/{layer}",
                           top_units_grid(pixels, projections, indices, captions, self.tile_size))
        for layer, images_of_units, labels_of_units, units, projections in maxima:
            captions_of_units = [class_caption(y, names) if y is not None else f"val {int(i)}"
                                 for i, y in zip(images_of_units[0], labels_of_units)]
            self.log_image(trainer, f"deconv_max/{layer}",
                           max_images_grid(to_pixels(images_of_units[1], normalization), projections, units,
                                           captions_of_units, tile_size=self.tile_size))

    def _max_activating(self, net: nn.Module, device: torch.device, dtype: torch.dtype | None) -> list[tuple]:
        """Per layer, for `deconv_max/<layer>`: ((indices, images) of the chosen validation images,
        their labels, the units, the projections), all on the CPU."""
        if self.val_batch is None:
            if not self._warned_no_val:
                rank_zero_warn(f"{type(self).__name__}: no validation batch #{self.val_batch_index} was "
                               "seen (validation did not run, or its loader has fewer batches); "
                               "deconv_max images are skipped. Lower val_batch_index or set deconv_max=false")
                self._warned_no_val = True
            return []
        images, labels = self.val_batch
        out, recordings = [], None
        for layer in self.within_budget(self.layers, "deconv_max layers", explicit=not self.uses_defaults):
            if recordings is None:  # one forward of the batch, once a first layer is due
                recordings = record_layers(net, images.to(device), self.layers, self._path)
            rec = recordings[layer]
            values, which = rec.max_activating_images()
            count = min(self.max_units, rec.num_units)
            if self.max_units_by == "most_active":
                units = values.argsort(descending=True, stable=True)[:count]
            else:
                units = torch.arange(count, device=values.device)
            chosen = which[units]
            # each pair (image, unit) projected in one reverse pass over the batch's recording
            projections = rec.project_pairs(chosen, units, self.unpool, dtype=dtype).cpu()
            chosen = chosen.cpu()
            chosen_labels = [labels[i] for i in chosen] if labels is not None else [None] * len(chosen)
            out.append((layer, (chosen, images[chosen]), chosen_labels, units.cpu(), projections))
        return out
