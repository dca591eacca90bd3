"""Saliency: every n epochs, where the probe images' class evidence is (Grad-CAM) and which pixels
drive it (guided backpropagation, guided Grad-CAM).

Follows Vanrell & Arias's lecture "Understanding and visualizing CNNs" (Master in Computer Vision,
Barcelona), "Saliency based" (class activation maps: "for each possible class prediction,
highlights the regions of the image that contributed the most"), after Selvaraju et al.'s Grad-CAM
(ICCV 2017, arXiv:1610.02391) and Springenberg et al.'s guided backpropagation (2015,
arXiv:1412.6806). The algorithms are `viz.saliency` (`grad_cam`, `guided_backprop`); this callback
chooses the images, renders and logs.

Logged at the step of the epoch's validation scalars (`callbacks.lightning_compat.log_step`), one column per
probe image:
- `saliency/gradcam`: row 1 the image (true colors, the datamodule's normalization undone),
  captioned with its true class; row 2 the Grad-CAM map of `layer` for the target class, upsampled
  bilinearly to the image (as in Grad-CAM), divided by its own maximum (so each map spans the
  colormap; the map of an image with no positive evidence is all 0) and blended over the image
  (`alpha`), captioned with the target class (the true one by default, as in every callback).
- `saliency/guided_backprop`: row 1 the image; row 2 guided backpropagation of the target class
  score; row 3 (`guided_gradcam=True`) guided Grad-CAM, i.e. row 2 times the upsampled Grad-CAM
  map. Gradients are drawn with 0 as mid-gray and +-max|value| of each tile as white/black
  (`scale_symmetric`): their sign matters, their scale differs from image to image.

Default layer: the last Conv2d whose output maps are larger than 1x1 on the probe images (Grad-CAM
needs a spatial map: LeNet's conv3 and conv4 are 1x1, so conv2; CifarConvNet's conv4; VGG16's
features.28), found with one probe image at fit start. Cost: two forward/backward passes over the
probe images per drawing.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.display import resolve_targets
from convlens.callbacks.options import TARGETS, check_choice, check_int
from convlens.errors import ConfigError
from convlens.render import (as_rgb, captioned_grid, class_caption, colorbar, fit_caption, heatmap, scale_symmetric,
                             stack_vertical, tile_width, to_pixels)
from convlens.viz.layers import layer_names, spatial_problems
from convlens.viz.saliency import default_saliency_layer, grad_cam, guided_backprop, upsample

class Saliency(VisualizationCallback):
    """Grad-CAM overlays (`saliency/gradcam`) and guided backpropagation / guided Grad-CAM
    (`saliency/guided_backprop`) of the probe images, every `every_n_epochs` epochs.

    Args:
        layer: the Grad-CAM layer of `pl_module.net`, any module with [N, K, h, w] output (None:
            `default_saliency_layer`).
        target: the class explained: "true" (each image's label, the default in every callback)
            or "predicted" (its prediction).
        guided_gradcam: also draw guided Grad-CAM (no extra forward pass).
        alpha: opacity of the heat map over the image, in [0, 1].
        cmap: matplotlib colormap of the Grad-CAM heat map.
        tile_size: tiles are upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec`.
    """

    name = "saliency"
    layer_kind = None  # Grad-CAM works on any layer with spatial maps (a conv, its ReLU, a pool)

    def __init__(self, layer: str | None = None, target: str = "true", guided_gradcam: bool = True,
                 alpha: float = 0.5, cmap: str = "jet", tile_size: int = 64, every_n_epochs: int | None = None,
                 **probe_options):
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"layer must be one layer name (a string) or None, got {layer!r}")
        super().__init__(layers=[layer] if layer is not None else None, every_n_epochs=every_n_epochs,
                         **probe_options)
        check_choice("target", target, TARGETS, " ('true': explain each image's label, 'predicted': its prediction)")
        if not isinstance(guided_gradcam, bool):
            raise ConfigError(f"guided_gradcam must be true or false, got {guided_gradcam!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"alpha (heat map opacity) must be a number in [0, 1], got {alpha!r}")
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise ConfigError(f"Unknown colormap cmap={cmap!r}; use a matplotlib colormap name such as "
                             "jet, viridis, inferno")
        check_int("tile_size", tile_size, 1, " (pixels)")
        self.layer_given = layer
        self.target, self.guided_gradcam = target, guided_gradcam
        self.alpha, self.cmap, self.tile_size = float(alpha), cmap, tile_size

    @property
    def layer(self) -> str | None:
        return self.layers[0] if self.layers else None

    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        if image is None:  # a placeholder until fit start, where one probe image tells which maps are spatial
            convs = layer_names(net, nn.Conv2d)
            return convs[-1:]
        return [default_saliency_layer(net, image)]

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        return spatial_problems(net, image, layers, "; Grad-CAM needs a convolutional layer (or its ReLU / pooling)")

    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        names = self.class_names(trainer)
        target = resolve_targets(net, images, labels, self.target)
        cam = grad_cam(net, images, self.layer, target)                       # [N, h, w]
        guided = guided_backprop(net, images, target)                         # [N, C, H, W]
        cam = upsample(cam, images.shape[-2:], "bilinear")
        pixels = as_rgb(to_pixels(images, self.normalization(trainer)))
        n = images.shape[0]

        width = tile_width(pixels, self.tile_size)
        true_captions = [fit_caption(class_caption(y, names), width, lines=2) for y in labels.cpu()]
        target_captions = [fit_caption(class_caption(t, names), width, lines=2) for t in target.cpu()]

        peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        colors = heatmap((cam / peak).cpu(), self.cmap)
        overlay = (1 - self.alpha) * pixels + self.alpha * colors
        grid = captioned_grid(torch.cat([pixels, overlay]), nrow=n, captions=true_captions + target_captions,
                              row_titles=["image", f"Grad-CAM {self.layer}"], tile_size=self.tile_size)
        scale = colorbar(self.cmap, 0, 1, min(grid.shape[-1], 240), "Grad-CAM / its max")
        self.log_image(trainer, f"{self.name}/gradcam", stack_vertical([grid, scale]))

        rows, titles, captions = [pixels, as_rgb(scale_symmetric(guided))], ["image", "guided BP"], \
            true_captions + target_captions
        if self.guided_gradcam:
            rows.append(as_rgb(scale_symmetric(guided * cam[:, None])))
            titles.append("guided Grad-CAM")
            captions = captions + target_captions
        self.log_image(trainer, f"{self.name}/guided_backprop", captioned_grid(
            torch.cat(rows), nrow=n, captions=captions, row_titles=titles, tile_size=self.tile_size))
