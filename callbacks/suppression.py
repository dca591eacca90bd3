"""KernelSuppression: what in a probe image a kernel responds to, by suppressing every other kernel.

Follows Zhuang et al., "Understanding of Kernels in CNN Models by Suppressing Irrelevant Visual
Features in Images" (2021, arXiv:2108.11054; section 3, and Figs. 2 and 5 for the
layout: the original input beside the optimized input, and the kernel's feature map for each). The
algorithm is `viz.suppression.interpret_kernel`; this callback only chooses inputs, renders and logs.

For each layer, for each probe image, its `top_k` most active kernels (highest maximum activation;
or the layer's configured `units`) are chosen at the first run and kept for the rest of the fit (and in
the checkpoint), so that later runs show the same kernels. Each (image, kernel) pair gets its X̂, all
pairs of a layer in one batched call. Logged per layer at the step of the epoch's validation
scalars (`callbacks.lightning_compat.log_step`):
- `suppression/<layer>`: one row per (image, kernel): X (captioned with its class), X̂ (captioned
  with R., the fraction of the other kernels' mean square activation left), the kernel's map
  F_i(X) (captioned with the kernel index) and F_i(X̂) (captioned with S., the SSIM to F_i(X));
- scalars `suppression_ssim/<layer>` (mean S.), `suppression_mse/<layer>` (mean R., the other
  kernels' maps' mean square for X̂, in the layer's units: the paper's MSE against the zero map) and
  `suppression_mse_relative/<layer>` (mean of R. / R. of X: 1 = nothing suppressed).

Normalization: X and X̂ in true colors (the datamodule's normalization undone; X̂ may leave the
pixel range and is clipped to it for display only). The two maps of a row share one color scale
(jet): 0 .. max F_i(X) for rectified maps, -m .. m with m = max |F_i(X)| for signed (linear) maps, so
a kept map looks the same and a weakened one looks darker. Maps are upscaled (nearest) to the image
size.

Cost: `steps` forward/backward passes up to the layer for num_probe * top_k images per layer (a few
seconds for the defaults), so the default is to run once, at fit end (`every_n_epochs=0`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.options import check_int, check_units
from convlens.render import captioned_grid, class_caption, fit_caption, heatmap, tile_width, to_pixels
from convlens.viz.layers import LayerError, default_conv_layers, get_layer, rank_units, spatial_problems
from convlens.viz.suppression import check_arguments, feature_maps, follows_relu, interpret_kernel, kernel_maps


def suppression_grid(pixels: torch.Tensor, pixels_hat: torch.Tensor, maps: torch.Tensor,
                     maps_hat: torch.Tensor, rectified: bool, captions: Sequence[str],
                     tile_size: int = 64) -> torch.Tensor:
    """Rows of (X, X̂, F_i(X), F_i(X̂)): images [M, C, H, W] in [0, 1], maps [M, h, w]; each row's
    two maps on one color scale set by F_i(X) (see the module docstring). `captions`: 4 per row."""
    h, w = pixels.shape[-2:]
    peak = maps.flatten(1).abs().amax(1).clamp_min(torch.finfo(maps.dtype).tiny)
    colored = []
    for m, m_hat, p in zip(maps.float().cpu(), maps_hat.float().cpu(), peak.tolist()):
        lo = 0.0 if rectified else -p
        colored.append(heatmap(torch.stack([m, m_hat]), lo=lo, hi=p))
    colored = F.interpolate(torch.stack(colored).flatten(0, 1), size=(h, w), mode="nearest")
    colored = colored.view(len(maps), 2, 3, h, w)
    rgb = [x.float().cpu().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float().cpu()
           for x in (pixels, pixels_hat)]
    tiles = torch.cat([rgb[0][:, None], rgb[1][:, None], colored], dim=1).flatten(0, 1)
    return captioned_grid(tiles, nrow=4, captions=list(captions), tile_size=tile_size,
                          col_titles=["X", "X_hat", "F_i(X)", "F_i(X_hat)"])


class KernelSuppression(VisualizationCallback):
    """Suppression-based kernel interpretation (`suppression/<layer>` and its metrics as scalars).

    Args:
        layers: Conv2d names of the net (None: `viz.layers.default_conv_layers`).
        units: the units (kernels) per layer interpreted for every probe image, e.g. {conv3: [0, 7]}
            (layers left out: each image's `top_k` most active kernels, chosen at the first run).
            `filters`, the earlier name, works until the next release.
        top_k: kernels per probe image for the layers `units` does not name.
        alpha, beta, steps, lr: `viz.suppression.interpret_kernel`'s options (weights of the
            suppression and regularization terms, the step budget, Adam's initial learning rate).
        rectify: None (auto: the maps after the ReLU that follows the layer, if any), True or False.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: 0 (default) = only at the end of fit; n = every n epochs.
        num_probe and the other probe options (probe, probe_per_class, probe_seed, mean, std,
            batch_keys): see `ProbeSpec` (default: 2 probe images).
    """

    name = "suppression"
    layer_kind = nn.Conv2d

    def __init__(self, layers: Sequence[str] | None = None, units: Mapping[str, Sequence[int]] | None = None,
                 top_k: int = 1, alpha: float = 0.5, beta: float = 0.25, steps: int = 300,
                 lr: float = 0.05, rectify: bool | None = None, tile_size: int = 64,
                 every_n_epochs: int = 0, num_probe: int | None = 2, **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, num_probe=num_probe, **probe_options)
        self.units = check_units(units)
        check_int("top_k", top_k, 1, " (kernels per probe image)")
        check_int("tile_size", tile_size, 1, " (pixels)")
        check_arguments(alpha=alpha, beta=beta, steps=steps, lr=lr, rectify=rectify)  # a VizError
        self.top_k = top_k
        self.alpha, self.beta, self.steps, self.lr, self.rectify = alpha, beta, steps, lr, rectify
        self.tile_size = tile_size
        #: layer -> [num_probe, k] kernel indices, chosen at the first run
        self.chosen: dict[str, torch.Tensor] = {}

    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        return default_conv_layers(net, image)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        return spatial_problems(net, image, layers)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._check_units(self.net(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.probe_images is not None and not self.declined:
            self._check_units(self.net(pl_module))

    def _check_units(self, net: nn.Module) -> None:
        for layer, kernels in self.units.items():
            if not self.layers_provisional and layer not in self.layers:
                raise LayerError(f"units names layer {layer!r}, which is not drawn; the layers are "
                                 f"{', '.join(self.layers)} (add it to `layers`)")
            count = get_layer(net, layer).out_channels
            bad = [k for k in kernels if k >= count]
            if bad:
                raise LayerError(f"{type(self).__name__}: units {bad} are out of range for layer {layer!r}, "
                                 f"which has {count} units (valid: 0..{count - 1}); fix `units` or `layers`")

    # -- drawing -------------------------------------------------------------------------------
    def _kernels_for(self, layer: str, maps: torch.Tensor) -> torch.Tensor:
        """[P, k] kernel indices for the P probe images: as chosen at the first run."""
        if layer not in self.chosen:
            if layer in self.units:
                chosen = torch.tensor(self.units[layer], dtype=torch.long).expand(maps.shape[0], -1)
            else:
                chosen = rank_units(maps.amax(dim=(2, 3)), self.top_k, per_image=True)
            self.chosen[layer] = chosen.detach().cpu().clone()
        return self.chosen[layer]

    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        normalization, names = self.normalization(trainer), self.class_names(trainer)
        for layer in self.layers:
            rectified = follows_relu(net, images, layer) if self.rectify is None else self.rectify
            maps = feature_maps(net, images, layer, rectified)
            chosen = self._kernels_for(layer, maps).to(images.device)
            per_image = chosen.shape[1]
            which = torch.arange(len(images), device=images.device).repeat_interleave(per_image)
            channel = chosen.flatten()
            x = images[which]
            x_hat, metrics = interpret_kernel(net, x, layer, channel, alpha=self.alpha, beta=self.beta,
                                              steps=self.steps, lr=self.lr, rectify=rectified)
            f = maps[which, channel]
            f_hat = kernel_maps(net, x_hat, layer, channel, rectified)
            width = tile_width(x, self.tile_size)
            captions = []
            for j in range(len(which)):
                captions += [fit_caption(class_caption(labels[which[j]], names), width, lines=2),
                             fit_caption(f"R={metrics['mse_relative'][j].item():.2f}", width),
                             fit_caption(f"#{int(channel[j])}", width),
                             fit_caption(f"S={metrics['ssim'][j].item():.2f}", width)]
            grid = suppression_grid(to_pixels(x, normalization), to_pixels(x_hat, normalization), f, f_hat,
                                    rectified, captions, self.tile_size)
            self.log_image(trainer, f"suppression/{layer}", grid)
            self.log_scalars(trainer, {
                f"suppression_ssim/{layer}": metrics["ssim"].mean().item(),
                f"suppression_mse/{layer}": metrics["mse"].mean().item(),
                f"suppression_mse_relative/{layer}": metrics["mse_relative"].mean().item(),
            })

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        # at fit end the loggers are already finalized: TensorBoard reopens its writer for what was
        # logged here, which nothing would flush when the caller does not finalize the logger again
        if self._due(trainer, at_fit_end=True) and trainer.is_global_zero:
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.flush()

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["chosen"] = {layer: t.clone() for layer, t in self.chosen.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.chosen = {layer: t.clone() for layer, t in (state_dict.get("chosen") or {}).items()}
