"""Occlusion sensitivity (Zeiler & Fergus, 2014, arXiv:1311.2901), as in section 3.5 of Berthier &
Mantoux's RecVis 2018 report: a gray square patch slides across the image and the
model predicts on every occluded copy; where the score of the true class drops, the patch covers
something the model uses (their Fig. 5: a 7x7 patch on 32x32 CIFAR-10 images, the predicted label
and the score of class *dog* at each patch position).

Every occluded copy is built at once per chunk with a mask (no Python loop over positions), and
the copies of all images and positions are forwarded in batches of at most `max_batch`. Where the
model starts with a plain chain of convolutions, pools and elementwise layers, those layers are
recomputed only on the part of their output the patch reaches (incremental inference after
Nakandala, Kumar & Papakonstantinou, SIGMOD 2019, DOI 10.1145/3299869.3319874; see
`viz.occlusion_incremental`), with the same maps up to floating-point rounding.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import nn

from convlens.viz import occlusion_incremental
from convlens.viz.common import eval_mode
from convlens.viz.occlusion_approximate import OcclusionResult, check_tau, drill_down, resolve
from convlens.viz.occlusion_incremental import OcclusionError

# With max_batch=None, a batch holds at most this many input elements, and at most
# MAX_BATCH_DEFAULT copies: the activations of a forward pass grow with the batch, so large images
# get smaller batches; small images get large ones, since every chunk costs a fixed number of
# small tensor ops (and thread synchronizations on a CPU) besides the forward pass.
BATCH_BUDGET_ELEMENTS = 2**22
MAX_BATCH_DEFAULT = 1024


def _fill_tensor(fill, pixel_to_input, shape, images) -> torch.Tensor:
    """The patch's content in the model's input space, as a (C, H, W) tensor."""
    if fill is None:
        gray = torch.full((1, *shape), 0.5, dtype=images.dtype, device=images.device)
        value = pixel_to_input(gray) if pixel_to_input is not None else gray
        source = "pixel_to_input(mid-gray image)"
        if torch.is_tensor(value) and value.ndim == 4 and value.shape[0] == 1:
            value = value[0]
    else:
        value, source = fill, "fill"
    # as_tensor(value, dtype=...) keeps a Python float exact in float64 (no float32 detour)
    value = torch.as_tensor(value, dtype=images.dtype, device=images.device)
    try:
        return torch.broadcast_to(value, shape).contiguous()
    except RuntimeError:
        raise OcclusionError(
            f"{source} has shape {tuple(value.shape)}, which does not broadcast to the images' "
            f"(C, H, W) = {tuple(shape)}. Pass a float, a per-channel tensor of shape (C, 1, 1), or "
            f"a full (C, H, W) tensor."
        ) from None


def default_max_batch(channels: int, height: int, width: int) -> int:
    """Occluded copies per forward pass when `max_batch` is None: as many (C, H, W) images as fit
    BATCH_BUDGET_ELEMENTS input elements, between 1 and MAX_BATCH_DEFAULT (1024 for CIFAR's
    3x32x32, 27 for 3x224x224)."""
    return max(1, min(MAX_BATCH_DEFAULT, BATCH_BUDGET_ELEMENTS // (channels * height * width)))


def occlusion_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None,
                   patch: int = 7, stride: int = 1, fill: float | torch.Tensor | None = None,
                   pixel_to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   max_batch: int | None = None, incremental: bool | None = None,
                   tau: float | None = None, approximate: str | None = None, coarse: int | None = None,
                   drill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion sensitivity maps of a classifier for `images` (N, C, H, W), in the model's input space.

    A `patch` x `patch` square, top-left corner at `(i * stride, j * stride)`, replaces the image
    there; `prob[n, i, j]` is then the softmax probability of class `targets[n]` and
    `label[n, i, j]` the predicted class (argmax, first on ties). Maps are
    `(H - patch) // stride + 1` by `(W - patch) // stride + 1` (only positions where the patch lies
    entirely inside the image).

    `targets`: N class indices, or None for the model's prediction on each unoccluded image.
    `fill`: the patch content in the model's input space, a float or a tensor broadcastable to
    (C, H, W) (a (C, H, W) fill is cut at the patch's position); `pixel_to_input` is not applied
    to it. None: mid-gray in pixel space, 0.5 everywhere, mapped through `pixel_to_input` (a
    callable from a [0, 1] pixel batch (1, C, H, W) to model input, e.g. the datamodule's
    normalization; identity when None), so the patch is gray whatever the preprocessing.
    `max_batch`: occluded copies per forward pass, across images and positions (None:
    `default_max_batch(C, H, W)`); memory grows with it, results do not depend on it beyond
    floating-point summation order.

    `incremental`: None (default) computes the maps incrementally where that is exact and
    estimated to be faster, else with one full forward per copy; True insists on the incremental
    path (an OcclusionError where the model has none), as far as it goes; False always runs the
    full forward. The incremental path (`viz.occlusion_incremental`, after Nakandala, Kumar &
    Papakonstantinou, SIGMOD 2019, DOI 10.1145/3299869.3319874) runs the unoccluded images once,
    keeps the activations of the model's leading plain chain of Conv2d, MaxPool2d, AvgPool2d,
    BatchNorm2d, activation, Dropout and Identity modules, and recomputes each of those layers only
    on the window of its output the patch can reach; the model's own forward runs the rest. Its
    maps equal the full forward's up to floating-point rounding.
    `tau`: None (exact), or a fraction in (0, 1] for Krypton's projective-field thresholding: in
    each layer computed incrementally (with incremental=True: the whole chain; automatically: up
    to where the full forward takes over) the changed region is cut to at most
    max(1, floor(tau * side)) outputs per axis around its center, and changes outside it are
    ignored. Faster, not exact; only on the incremental path (where the model has none and
    `incremental` is None, the maps are exact; 1 cuts nothing).
    `approximate`: None (exact maps, unless the knobs below ask otherwise) or "fast", the preset
    of `viz.occlusion_approximate.PRESETS`: Krypton's adaptive drill-down (a coarse stride first,
    then the fine `stride` only where the coarse map changes most, the rest interpolated) with its
    `tau`. The raw knobs, each overriding the preset's where not None: `coarse` (the coarse stride
    in strides; 1: no drill-down), `drill` (the fraction of the other positions computed at the
    fine stride; 1: all of them, exact) and `tau`. The maps keep the shape of the exact ones.

    Nothing inside the loop over positions waits for the device (no host synchronization), so on
    CUDA tensors the copies are queued back to back.

    The model runs in eval mode under torch.inference_mode; every submodule's mode is restored.
    The model must return logits (N, num_classes). Returns `prob` (N, H', W') in the logits' dtype
    and `label` (N, H', W') int64, on the images' device.
    """
    result = occlusion_result(model, images, targets, patch, stride, fill, pixel_to_input, max_batch, incremental,
                              tau, approximate, coarse, drill)
    return result.prob, result.label


def occlusion_result(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None,
                     patch: int = 7, stride: int = 1, fill: float | torch.Tensor | None = None,
                     pixel_to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     max_batch: int | None = None, incremental: bool | None = None,
                     tau: float | None = None, approximate: str | None = None, coarse: int | None = None,
                     drill: float | None = None, previous: OcclusionResult | None = None,
                     reuse_tol: float | None = None, stop: Callable[[int], bool] | None = None) -> OcclusionResult:
    """`occlusion_maps` with what a later call can reuse: an `OcclusionResult` (prob, label, which
    positions are known rather than interpolated, the node probabilities they were computed with,
    the number of occluded copies forwarded). `previous`, `reuse_tol`: with a drill-down, positions
    `previous` knew keep their values while their cell's node probabilities moved less than
    `reuse_tol` since they were computed (`viz.occlusion_approximate.drill_down`); `previous` from
    other maps (another shape or targets) is ignored. `stop`: exact maps only (no drill-down), a
    predicate asked on the host before each chunk of `max_batch` copies but the first, with the
    number of copies forwarded so far (copies are ordered image by image, row-major); when it
    returns True the rest are not forwarded: their prob is NaN, their label -1, `known` False, and
    `copies` counts those forwarded (a caller with a deadline on CUDA synchronizes in it). The
    other arguments: `occlusion_maps`."""
    if not torch.is_tensor(images) or images.ndim != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise OcclusionError(f"images must be a (N, C, H, W) tensor, got {shape}")
    N, C, H, W = images.shape
    if N == 0:
        raise OcclusionError("images is empty; pass at least one image")
    for name, value in (("patch", patch), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OcclusionError(f"{name} must be a positive integer (pixels), got {value!r}")
    if patch > H or patch > W:
        raise OcclusionError(f"patch {patch} is larger than the images ({H}x{W}); use a patch of at most {min(H, W)}")
    if max_batch is None:
        max_batch = default_max_batch(C, H, W)
    elif isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise OcclusionError(f"max_batch must be a positive integer, got {max_batch!r}")
    if incremental is not None and not isinstance(incremental, bool):
        raise OcclusionError(f"incremental must be None (automatic), True or False, got {incremental!r}")
    if tau is not None and incremental is False:
        check_tau(tau)
        raise OcclusionError("tau approximates the incremental path only; pass incremental=None or True "
                             "with tau, or tau=None with incremental=False")
    approximation = resolve(approximate, coarse, drill, tau)
    # a preset's tau applies where there is an incremental path (none with incremental=False)
    tau = approximation.tau if incremental is not False else None
    if reuse_tol is not None and (isinstance(reuse_tol, bool) or not isinstance(reuse_tol, (int, float))
                                  or not reuse_tol >= 0):
        raise OcclusionError(f"reuse_tol must be a probability change >= 0, or None (no reuse); got {reuse_tol!r}")
    if stop is not None and approximation.coarse > 1 and approximation.drill < 1:
        raise OcclusionError("stop works with exact maps only; pass approximate=None, or coarse=1 or drill=1")
    fill = _fill_tensor(fill, pixel_to_input, (C, H, W), images)

    rows_out, cols_out = map_shape(H, W, patch, stride)
    positions = rows_out * cols_out
    # row_mask[i, y]: pixel row y is covered when the patch's top row is i * stride (same for columns)
    starts_y = torch.arange(rows_out, device=images.device)[:, None] * stride
    starts_x = torch.arange(cols_out, device=images.device)[:, None] * stride
    y = torch.arange(H, device=images.device)[None]
    x = torch.arange(W, device=images.device)[None]
    row_mask = (y >= starts_y) & (y < starts_y + patch)
    col_mask = (x >= starts_x) & (x < starts_x + patch)

    with eval_mode(model):
        if incremental is False:
            with torch.inference_mode():
                logits, recorded = model(images), None
        else:  # the same forward, recording which modules ran on which tensors
            recorded = occlusion_incremental.record_forward(model, images)
            logits = recorded.logits
        if logits.ndim != 2 or logits.shape[0] != N:
            raise OcclusionError(f"the model must return logits (N, num_classes); it returned {tuple(logits.shape)}")
        num_classes = logits.shape[1]
        if targets is None:
            targets = logits.argmax(dim=1)
        else:
            targets = torch.as_tensor(targets, device=images.device).reshape(-1)
            if targets.numel() != N:
                raise OcclusionError(f"targets has {targets.numel()} entries for {N} images; pass one class per image")
            if targets.is_floating_point() or targets.dtype == torch.bool:
                raise OcclusionError(f"targets must be integer class indices, got dtype {targets.dtype}")
            bad = targets[(targets < 0) | (targets >= num_classes)]
            if bad.numel():
                raise OcclusionError(f"targets must be class indices in [0, {num_classes}); "
                                     f"got out-of-range {bad.tolist()[:10]}")
            targets = targets.long()
        runner = None
        if recorded is not None:
            runner = occlusion_incremental.prepare(model, images, recorded, patch, stride, fill, tau,
                                                   force=incremental is True)
        base_prob = logits.softmax(dim=1).gather(1, targets[:, None])[:, 0]
        with runner if runner is not None else contextlib.nullcontext(), torch.inference_mode():
            evaluate = _Evaluate(model, runner, images, fill, targets, row_mask, col_mask, cols_out, max_batch,
                                 logits.dtype, stop)
            if approximation.coarse > 1 and approximation.drill < 1:
                result = drill_down(evaluate, base_prob, targets, rows_out, cols_out, approximation.coarse,
                                    approximation.drill, previous, reuse_tol)
            else:
                flat = torch.arange(N * positions, device=images.device)
                prob, label = evaluate(flat // positions, flat % positions)
                known = (torch.arange(N * positions, device=images.device) < evaluate.forwarded).view(
                    N, rows_out, cols_out)
                result = OcclusionResult(prob.view(N, rows_out, cols_out), label.view(N, rows_out, cols_out), known,
                                         None, targets, evaluate.forwarded)
    # clones made outside inference mode are ordinary tensors, usable with autograd afterwards
    result.prob, result.label, result.known, result.targets = (t.clone() for t in (
        result.prob, result.label, result.known, result.targets))
    if result.reference is not None:
        result.reference = result.reference.clone()
    return result


class _Evaluate:
    """p(target) and the predicted label of occluded copies: `(image, position)` index tensors [M]
    (positions flat, row-major over the map) -> prob [M] in the logits' dtype, label [M] int64,
    forwarded in chunks of `max_batch` copies. No host synchronization: the chunks are slices of
    the index tensors, the results written with index_put. `stop(copies forwarded)`, asked before
    each chunk but the first, ends it early: the rest get NaN and -1; `forwarded` counts the copies
    forwarded over all calls."""

    def __init__(self, model, runner, images, fill, targets, row_mask, col_mask, columns: int, max_batch: int,
                 dtype: torch.dtype, stop: Callable[[int], bool] | None = None):
        self.model, self.runner, self.images, self.fill, self.targets = model, runner, images, fill, targets
        self.row_mask, self.col_mask, self.columns, self.max_batch = row_mask, col_mask, columns, max_batch
        self.dtype, self.stop, self.forwarded = dtype, stop, 0

    def __call__(self, image: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = image.shape[0]
        prob = torch.empty(count, dtype=self.dtype, device=image.device)
        label = torch.empty(count, dtype=torch.long, device=image.device)
        for start in range(0, count, self.max_batch):
            if self.stop is not None and start and self.stop(start):
                prob[start:], label[start:] = float("nan"), -1
                break
            im, pos = image[start:start + self.max_batch], position[start:start + self.max_batch]
            mask = self.row_mask[pos // self.columns][:, :, None] & self.col_mask[pos % self.columns][:, None, :]
            occluded = torch.where(mask[:, None], self.fill, self.images[im])
            out = self.model(occluded) if self.runner is None else self.runner(occluded, im, pos)
            prob[start:start + self.max_batch] = out.softmax(dim=1).gather(1, self.targets[im][:, None])[:, 0]
            label[start:start + self.max_batch] = out.argmax(dim=1)
            self.forwarded += len(im)
        return prob, label


# --------------------------------------------------------------------------------------------
# Geometry: default patch and stride, and maps drawn on the image grid
# --------------------------------------------------------------------------------------------

def map_shape(height: int, width: int, patch: int, stride: int) -> tuple[int, int]:
    """The rows and columns of patch positions (the patch entirely inside the image)."""
    return (height - patch) // stride + 1, (width - patch) // stride + 1


def default_patch(side: int) -> int:
    """The largest odd integer <= side ** 0.6 (at least 1): 7 at 28 and 32, 25 at 224.

    Sub-linear on purpose: small images need a patch big enough to hide a part (the report's 7x7
    covers 5% of a 32x32 image), large ones a patch still small enough to localize. Odd, so the
    patch has a center pixel."""
    size = math.floor(side ** 0.6 + 1e-9)
    return max(1, size if size % 2 else size - 1)


def default_stride(side: int, patch: int) -> int:
    """(side - patch + 1) // 8, at least 1: 2 at 28/7, 3 at 32/7, 25 at 224/25.

    side - patch + 1 is the number of patch positions along a side at stride 1; dividing by 8
    keeps 8 to 15 positions per side whenever there are at least 8, so a map costs at most 225
    forward passes per image whatever the image size."""
    return max(1, (side - patch + 1) // 8)


def maps_to_pixels(maps: torch.Tensor, size: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """[N, h, w] maps over patch positions -> [N, H, W] over the image's pixels: pixel (y, x) takes
    the value of the position whose patch center, (i * stride + (patch - 1) / 2, same for j), is
    nearest to it (ties to the lower position), clamped to the valid positions."""
    def nearest(length: int, count: int) -> torch.Tensor:
        offset = torch.arange(length, dtype=torch.float64) - (patch - 1) / 2
        return torch.ceil(offset / stride - 0.5).long().clamp(0, count - 1)
    rows = nearest(size[0], maps.shape[-2]).to(maps.device)
    cols = nearest(size[1], maps.shape[-1]).to(maps.device)
    return maps[:, rows][:, :, cols]
