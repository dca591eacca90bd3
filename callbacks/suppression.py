"""KernelSuppression: what in a probe image a kernel responds to, by suppressing every other kernel.

Follows kernel-interpretation-by-suppression.txt (Zhuang et al.; section 3, and Figs. 2 and 5 for the
layout: the original input beside the optimized input, and the kernel's feature map for each). The
algorithm is `viz.suppression.interpret_kernel`; this callback only chooses inputs, renders and logs.

For each layer, for each probe image, its `top_k` most active kernels (highest maximum activation;
or the configured `kernels`) are chosen at the first run and kept for the rest of the fit (and in
the checkpoint), so that later runs show the same kernels. Each (image, kernel) pair gets its X̂, all
pairs of a layer in one batched call. Logged per layer at the trainer's global step:
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

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from callbacks.base import VisualizationCallback
from callbacks.deconv import default_conv_layers
from callbacks.render import captioned_grid, heatmap, to_pixels
from viz.layers import LayerError, get_layer
from viz.suppression import check_arguments, feature_maps, follows_relu, interpret_kernel, kernel_maps


def _fit(text: str, width_px: int) -> str:
    """Truncate a caption to what fits under a tile (PIL's default font is ~6 px per character)."""
    chars = max(1, width_px // 6)
    return text if len(text) <= chars else text[: chars - 1] + "~"


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
        layers: Conv2d names of `pl_module.net` (None: every conv of a net with at most 6, else each
            block's last conv; see `callbacks.deconv.default_conv_layers`).
        kernels: kernel indices interpreted for every probe image (None: each image's `top_k` most
            active kernels, chosen at the first run).
        top_k: kernels per probe image when `kernels` is None.
        alpha, beta, steps, lr: `viz.suppression.interpret_kernel`'s options (weights of the
            suppression and regularization terms, the step budget, Adam's initial learning rate).
        rectify: None (auto: the maps after the ReLU that follows the layer, if any), True or False.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: 0 (default) = only at the end of fit; n = every n epochs.
        num_probe, probe_per_class, probe_seed: see VisualizationCallback (default: 2 probe images).
    """

    name = "kernel_suppression"
    layer_kind = nn.Conv2d

    def __init__(self, layers: Sequence[str] | None = None, kernels: Sequence[int] | None = None,
                 top_k: int = 1, alpha: float = 0.5, beta: float = 0.25, steps: int = 300,
                 lr: float = 0.05, rectify: bool | None = None, tile_size: int = 64,
                 every_n_epochs: int = 0, num_probe: int | None = 2, probe_per_class: int = 1,
                 probe_seed: int = 0):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, num_probe=num_probe,
                         probe_per_class=probe_per_class, probe_seed=probe_seed)
        if kernels is not None:
            if isinstance(kernels, int) and not isinstance(kernels, bool):
                kernels = [kernels]
            kernels = list(kernels)
            if not kernels or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in kernels):
                raise ValueError(f"kernels must be a non-empty list of kernel indices (ints >= 0), or null "
                                 f"for each probe image's most active kernels; got {kernels!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1 (kernels per probe image), got {top_k!r}")
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be an int >= 1 (pixels), got {tile_size!r}")
        check_arguments(alpha=alpha, beta=beta, steps=steps, lr=lr, rectify=rectify)  # ValueError
        self.kernels, self.top_k = kernels, top_k
        self.alpha, self.beta, self.steps, self.lr, self.rectify = alpha, beta, steps, lr, rectify
        self.tile_size = tile_size
        #: layer -> [num_probe, k] kernel indices, chosen at the first run
        self.chosen: dict[str, torch.Tensor] = {}

    def default_layers(self, net: nn.Module) -> list[str]:
        return default_conv_layers(net)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.kernels is None:
            return
        net = self.net(pl_module)
        for layer in self.layers:
            count = get_layer(net, layer).out_channels
            bad = [k for k in self.kernels if k >= count]
            if bad:
                raise LayerError(f"{type(self).__name__}: kernels {bad} are out of range for layer {layer!r}, "
                                 f"which has {count} kernels (valid: 0..{count - 1}); fix `kernels` or `layers`")

    # -- drawing -------------------------------------------------------------------------------
    def _kernels_for(self, layer: str, maps: torch.Tensor) -> torch.Tensor:
        """[P, k] kernel indices for the P probe images: as chosen at the first run."""
        if layer not in self.chosen:
            if self.kernels is not None:
                chosen = torch.tensor(self.kernels, dtype=torch.long).expand(maps.shape[0], -1)
            else:
                k = min(self.top_k, maps.shape[1])
                chosen = maps.amax(dim=(2, 3)).topk(k, dim=1).indices
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
            width = x.shape[-1] * max(1, round(self.tile_size / max(x.shape[-2:])))
            captions = []
            for j in range(len(which)):
                label = int(labels[which[j]])
                captions += [_fit(names[label] if label < len(names) else str(label), width),
                             _fit(f"R={metrics['mse_relative'][j].item():.2f}", width),
                             _fit(f"#{int(channel[j])}", width),
                             _fit(f"S={metrics['ssim'][j].item():.2f}", width)]
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
