"""OcclusionSensitivity: every n epochs, what a gray square hides from the classifier.

Follows section 3.5 and Fig. 5 of Berthier & Mantoux's RecVis 2018 report, after Zeiler & Fergus
(ECCV 2014, arXiv:1311.2901, section 4.2): a gray patch slides across the image, the model predicts
on every occluded copy, and the score of the class of interest and the predicted label are drawn at
each patch position. The maps
come from `viz.occlusion.occlusion_maps`.

Logged per probe image i, at the trainer's global step, as `occlusion/<i>`: three panels side by
side, then a legend (a color swatch and the name of every class):
- the image, in true colors (the datamodule's normalization undone);
- the probability of the target class (the true class, or the predicted one with
  `target="predicted"`) as a heat map on a fixed 0..1 scale (so epochs compare), low where the
  patch hides what the model needs;
- the predicted label as one color per class (the legend's).
Each map is drawn over the image's own pixel grid: a pixel shows the value for the patch position
whose center is nearest to it (`maps_to_pixels`), so the panels line up with the image; pixels
closer to the border than half a patch show the outermost positions.

Patch and stride default to values from the image side (`default_patch`, `default_stride`):
7/2 at 28x28, 7/3 at 32x32 (the report's 7x7 patch), 25/25 at 224x224; explicit values override.
The patch is mid-gray in pixel space, mapped through the datamodule's normalization.

Approximate maps (`approximate="fast"`, or the raw knobs `coarse`, `drill`, `tau`; see
`viz.occlusion.occlusion_maps`): Krypton's adaptive drill-down and projective-field thresholding
(Nakandala, Kumar & Papakonstantinou, SIGMOD 2019, DOI 10.1145/3299869.3319874). What they cost
is measured, not assumed: on their first drawing and every `check_every` epochs after it, the
exact maps are computed as well, and per probe image i the SSIM (scikit-image's default window,
data range 1, the heat map's fixed scale) and the largest |p - p_exact| are logged as
`occlusion_ssim/<i>` and `occlusion_max_abs_diff/<i>`; the heat map's caption shows the latest
SSIM. `occlusion_copies/fraction` is the share of the exact map's occluded copies forwarded.
With `reuse_tol`, positions computed in an earlier epoch keep their value while the coarse map
around them moved less than `reuse_tol` (`viz.occlusion_result`).
"""
from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl
import torch

from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.display import resolve_targets
from convlens.callbacks.options import TARGETS, check_choice, check_int
from convlens.errors import ConfigError
from convlens.render import (as_rgb, captioned_grid, class_caption, colorbar, fit_caption, heatmap, label_colors,
                             legend, stack_vertical, tile_width, to_pixels)
from convlens.viz.faithfulness import ssim
from convlens.viz.occlusion import (OcclusionError, OcclusionResult, default_patch, default_stride, map_shape,
                                    maps_to_pixels, occlusion_maps, occlusion_result)
from convlens.viz.occlusion_approximate import PRESETS, resolve


#: how many probe images num_probe="auto" (the default) draws; fewer when a first drawing has a
#: deadline (see `callbacks.budget`). A number, even 4, is the user's choice: never cut
DEFAULT_NUM_PROBE = 4


class OcclusionSensitivity(VisualizationCallback):
    """Occlusion maps (probability of the target class, predicted label) of the first
    `num_probe` probe images, every `every_n_epochs` epochs, as `occlusion/<i>`.

    Args:
        num_probe: how many probe images (a seeded subset of the one-per-class probe batch;
            None: all of them). Each costs about (side/stride)^2 forward passes. "auto" (default):
            4, of which a first drawing over its time budget draws fewer; a number is drawn in full.
        patch: side of the gray square in pixels (None: `default_patch` of the image side).
        stride: step between patch positions in pixels (None: `default_stride`).
        target: the class whose probability is drawn: "true" (each image's label, the default in
            every callback) or "predicted" (the model's prediction on the unoccluded image).
        cmap: matplotlib colormap of the probability heat map.
        max_batch: occluded copies per forward pass (None: `occlusion_maps`' memory budget).
        approximate: None (exact maps) or "fast" (Krypton's drill-down and thresholding, a preset);
            coarse, drill, tau: the raw knobs, overriding the preset's (`viz.occlusion.occlusion_maps`):
            coarse: the coarse stride in strides (1: no drill-down); drill: the fraction of the other
            positions computed at the fine stride; tau: None, or a fraction in (0, 1] for Krypton's
            projective-field thresholding.
        check_every: approximate maps are compared with exact ones on their first drawing and then
            every `check_every` epochs (0: only the first); logged as occlusion_ssim/<i> and
            occlusion_max_abs_diff/<i>.
        reuse_tol: None (default), or a probability change: positions computed in an earlier epoch
            are kept while the coarse map around them moved less than this (with a drill-down only).
        tile_size: each panel is upscaled (nearest, integer factor) to about this many pixels.
        every_n_epochs: see VisualizationCallback; the other probe options (probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec`.
    """

    name = "occlusion"
    needs_layers = False
    needs_conv = False  # any classifier: a patch over the input
    layer_kind = None

    def __init__(self, every_n_epochs: int | None = None, num_probe: int | str | None = "auto",
                 patch: int | None = None, stride: int | None = None, target: str = "true", cmap: str = "jet",
                 max_batch: int | None = None, tile_size: int = 112, tau: float | None = None,
                 approximate: str | None = None, coarse: int | None = None, drill: float | None = None,
                 check_every: int = 10, reuse_tol: float | None = None, **probe_options):
        if isinstance(num_probe, str) and num_probe != "auto":
            raise ConfigError(f"num_probe must be an int >= 1 (drawn in full), null (all probe images) or \"auto\" "
                              f"({DEFAULT_NUM_PROBE}, fewer when over the time budget), got {num_probe!r}")
        #: the number of probe images is the default's, so the time budget may draw fewer
        self.auto_probes = num_probe == "auto"
        super().__init__(layers=None, every_n_epochs=every_n_epochs,
                         num_probe=DEFAULT_NUM_PROBE if self.auto_probes else num_probe, **probe_options)
        for arg, value in (("patch", patch), ("stride", stride)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OcclusionError(f"{arg} must be an int >= 1 (pixels), or None to derive it from the "
                                     f"image size; got {value!r}")
        check_choice("target", target, TARGETS)
        if max_batch is not None:
            check_int("max_batch", max_batch, 1, " (or null: a memory budget)")
        check_int("tile_size", tile_size, 1, " (pixels)")
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise ConfigError(f"Unknown matplotlib colormap {cmap!r}; e.g. jet, viridis, inferno, gray")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1):
            raise ConfigError(f"tau must be a fraction in (0, 1] (Krypton's approximation) or null (exact maps), "
                              f"got {tau!r}")
        if approximate is not None and approximate not in PRESETS:
            raise ConfigError(f"approximate must be null (exact maps) or one of {', '.join(sorted(PRESETS))}, "
                              f"got {approximate!r}")
        try:
            self.approximation = resolve(approximate, coarse, drill, tau)
        except OcclusionError as e:
            raise ConfigError(str(e)) from None
        check_int("check_every", check_every, 0, " (epochs between exact checks; 0: only the first drawing)")
        if reuse_tol is not None and (isinstance(reuse_tol, bool) or not isinstance(reuse_tol, (int, float))
                                      or not reuse_tol >= 0):
            raise ConfigError(f"reuse_tol must be a probability change >= 0 (e.g. 0.01) or null (no reuse), "
                              f"got {reuse_tol!r}")
        self.patch, self.stride, self.target, self.tau = patch, stride, target, tau
        self.approximate, self.coarse, self.drill = approximate, coarse, drill
        self.check_every, self.reuse_tol = check_every, reuse_tol
        self.cmap, self.max_batch, self.tile_size = cmap, max_batch, tile_size
        self._previous: OcclusionResult | None = None  # the last approximate maps, for reuse
        self._checked_epoch: int | None = None          # the epoch of the last exact check
        self._ssim: torch.Tensor | None = None          # its SSIM per image, shown in the captions

    def patch_and_stride(self, height: int, width: int) -> tuple[int, int]:
        """The patch and stride used on images of this size (the configured ones, else the defaults
        from the shorter side); an OcclusionError when the patch does not fit."""
        side = min(height, width)
        patch = self.patch if self.patch is not None else default_patch(side)
        if patch > side:
            raise OcclusionError(f"{type(self).__name__}: patch={patch} is larger than the "
                                 f"{height}x{width} images; use patch <= {side}, or patch=null for "
                                 f"the default ({default_patch(side)} at this size)")
        stride = self.stride if self.stride is not None else default_stride(side, patch)
        return patch, stride

    # -- validation against the image size -------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        side = getattr(trainer.datamodule, "image_size", None) if trainer.datamodule is not None else None
        if isinstance(side, int):
            self.patch_and_stride(side, side)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.probe_images is not None:  # any datamodule: check the probe images' real size
            self.patch_and_stride(*self.probe_images.shape[-2:])

    # -- the callback ----------------------------------------------------------------------------
    def targets(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class whose probability is drawn, per image."""
        return resolve_targets(net, images, labels, self.target)

    def render(self, image_pixels: torch.Tensor, prob: torch.Tensor, label: torch.Tensor,
               patch: int, stride: int, num_classes: int, captions: Sequence[str]) -> torch.Tensor:
        """One probe's panels: image [C, H, W] in [0, 1], prob and label maps [h, w] -> [3, H', W']
        (without the legend). Positions not computed (NaN, -1: a drawing stopped by its deadline) are
        mid-gray in both maps."""
        size = tuple(image_pixels.shape[-2:])
        prob_px = maps_to_pixels(prob[None].float().cpu(), size, patch, stride)
        label_px = maps_to_pixels(label[None].cpu(), size, patch, stride)
        unknown = (label_px < 0)[:, None]
        maps = torch.cat([heatmap(prob_px.nan_to_num(0.0), self.cmap, 0.0, 1.0),
                          label_colors(label_px.clamp(min=0), num_classes)])
        panels = torch.cat([as_rgb(image_pixels[None].float().cpu()), maps.masked_fill(unknown, 0.5)])
        # large images (VGG's 224 px) are averaged down so the three panels fit a card side by side
        width = tile_width(image_pixels, self.tile_size, columns=3)
        captions = [fit_caption(c, width, lines=2) for c in captions]
        return captioned_grid(panels, nrow=3, captions=captions, tile_size=self.tile_size, shrink_to_fit=True)

    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        patch, stride = self.patch_and_stride(*images.shape[-2:])
        normalization = self.normalization(trainer)
        targets = self.targets(net, images, labels)
        geometry = dict(patch=patch, stride=stride, pixel_to_input=normalization, max_batch=self.max_batch)
        approx = self.approximation
        # the probe images in order, as the time budget allows: all in one batch, or piece by piece when
        # a first drawing has a deadline (see `within_budget`): rows of occluded copies for exact maps,
        # whole images for a drill-down
        explicit = self.probe_spec.explicit is not None or not self.auto_probes
        rows_drawn = None  # per image, the map rows computed (None: all)
        if self._drawing.deadline is None:
            prob, label = self._maps(trainer, net, images, targets, geometry)
        elif approx.exact:
            prob, label, rows_drawn = self._maps_by_rows(net, images, targets, geometry, explicit)
            images, labels, targets = images[:len(prob)], labels[:len(prob)], targets[:len(prob)]
        else:
            maps = [self._maps(trainer, net, images[i:i + 1], targets[i:i + 1], geometry)
                    for i in self.within_budget(range(len(images)), "probe images", explicit=explicit)]
            images, labels, targets = images[:len(maps)], labels[:len(maps)], targets[:len(maps)]
            prob, label = torch.cat([p for p, _ in maps]), torch.cat([q for _, q in maps])
            self._previous = None  # computed image by image: nothing to reuse next time
        if not approx.exact:
            self._measure(trainer, net, images, targets, prob, geometry)
        names = self.class_names(trainer)
        num_classes = max(len(names), int(label.max()) + 1)
        names = list(names) + [str(c) for c in range(len(names), num_classes)]
        pixels = to_pixels(images, normalization)
        key = None
        for i in range(len(images)):
            p_caption = f"p({class_caption(targets[i], names)})"
            if self._ssim is not None and not self.approximation.exact:
                p_caption += f" ~ SSIM {float(self._ssim[i]):.2f}"
            label_caption = "predicted label"
            if rows_drawn is not None and rows_drawn[i] < prob.shape[1]:  # stopped by the time budget
                label_caption += f": rows 1-{rows_drawn[i]} of {prob.shape[1]}"
            captions = [class_caption(labels[i], names), p_caption, label_caption]
            panels = self.render(pixels[i], prob[i], label[i], patch, stride, num_classes, captions)
            if key is None:  # the same colour scale and legend under every probe
                colors = label_colors(torch.arange(num_classes)[:, None, None], num_classes)[:, :, 0, 0]
                scale = colorbar(self.cmap, 0, 1, min(panels.shape[-1], 240), "p(target)")
                key = stack_vertical([scale, legend(names, colors, panels.shape[-1])])
            self.log_image(trainer, f"occlusion/{i}", stack_vertical([panels, key]))

    def _maps(self, trainer: pl.Trainer, net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
              geometry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The probability and label maps of `images`, exact or approximate."""
        approx = self.approximation
        if approx.coarse > 1 and approx.drill < 1:  # a drill-down: what it computed is kept for reuse
            result = occlusion_result(net, images, targets, tau=self.tau, approximate=self.approximate,
                                      coarse=self.coarse, drill=self.drill, previous=self._previous,
                                      reuse_tol=self.reuse_tol, **geometry)
            self._previous = result if self.reuse_tol is not None else None
            self.log_scalars(trainer, {"occlusion_copies/fraction": result.copies / result.prob.numel()})
            return result.prob, result.label
        return occlusion_maps(net, images, targets, tau=approx.tau, **geometry)

    def _maps_by_rows(self, net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, geometry: dict,
                      explicit: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Exact maps image by image and row by row of patch positions until the first drawing's
        deadline would pass (each row of copies one piece of the budget); the images begun ->
        prob, label (NaN and -1 where not computed) and the rows computed per image."""
        timer = self.piece_timer("occlusion rows", explicit=explicit, chosen="probe images")
        rows, columns = map_shape(*images.shape[-2:], geometry["patch"], geometry["stride"])
        max_batch = geometry["max_batch"]
        chunk = columns if max_batch is None or max_batch >= columns else max_batch
        synchronize = torch.cuda.synchronize if images.is_cuda else (lambda: None)
        probs, labels, drawn = [], [], []
        for i in range(len(images)):
            if not timer.go(f"image {i} row 1"):
                timer.leave_out(f"image {j} row {r + 1}" for j in range(i, len(images)) for r in range(rows))
                break

            def stop(copies: int, i=i) -> bool:  # before each row after the first
                synchronize()
                return not timer.go(f"image {i} row {copies // columns + 1}")

            result = occlusion_result(net, images[i:i + 1], targets[i:i + 1], stop=stop,
                                      **{**geometry, "max_batch": chunk})
            synchronize()
            probs.append(result.prob)
            labels.append(result.label)
            drawn.append(-(-result.copies // columns))
            if result.copies < rows * columns:
                timer.leave_out([f"image {i} row {r + 1}" for r in range(drawn[-1], rows)]
                                + [f"image {j} row {r + 1}" for j in range(i + 1, len(images)) for r in range(rows)])
                break
        else:
            timer.done()
        return torch.cat(probs), torch.cat(labels), drawn

    def _measure(self, trainer: pl.Trainer, net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 prob: torch.Tensor, geometry: dict) -> None:
        """For approximate maps, when a check is due: the SSIM and the largest difference against
        the exact maps, per image."""
        epoch = getattr(trainer, "current_epoch", 0)  # stand-in trainers in tests have none
        due = self._checked_epoch is None or (self.check_every > 0 and epoch - self._checked_epoch >= self.check_every)
        if not due:
            return
        exact, _ = occlusion_maps(net, images, targets, **geometry)
        self._checked_epoch = epoch
        self._ssim = ssim(prob, exact, data_range=1.0).cpu()
        worst = (prob.double() - exact.double()).abs().flatten(1).amax(1).cpu()
        scalars = {}
        for i in range(len(images)):
            scalars[f"occlusion_ssim/{i}"] = float(self._ssim[i])
            scalars[f"occlusion_max_abs_diff/{i}"] = float(worst[i])
        self.log_scalars(trainer, scalars)
