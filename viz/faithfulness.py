"""Can an explanation map be trusted? Faithfulness measures and sanity checks of explanation maps.

Three families, all pure functions over a model and tensors:

- **Deletion / insertion** (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation
  of Black-box Models", BMVC 2018, arXiv:1806.07421, section 4.1): the pixels of an image are removed
  (deletion: set to a baseline) or inserted (insertion: copied into a baseline image) from the most to
  the least relevant according to the map, and the probability of the explained class is read after
  each step. A faithful map makes the deletion curve fall fast (low area under it) and the insertion
  curve rise fast (high area). `deletion_insertion` computes both curves for every image with
  batched forwards: the perturbed copies of all images, steps and maps are built with masks and
  forwarded in chunks of `max_batch`, never one perturbation per forward.
- **ROAD**, RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and
  Efficient Evaluation Strategy for Attribution Methods", ICML 2022, arXiv:2202.00449): a percentile
  of the pixels is removed, most relevant first (MoRF) or least relevant first (LeRF), and filled by
  their *noisy linear imputation*: each removed pixel becomes the weighted mean of its 8 neighbours
  (weight 1/6 for the 4 direct ones, 1/12 for the diagonal ones, the paper's kernel), a sparse linear
  system over all removed pixels at once, plus Gaussian noise. The imputation hides the shape of the
  removed region, which deletion's flat baseline gives away to the model. Here the system is solved
  by conjugate gradients, batched over images and channels (`noisy_linear_imputation`); the paper's
  code solves the same system with a sparse direct solver (tests/test_faithfulness.py compares both).
- **Model randomization** (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for
  Saliency Maps", NeurIPS 2018, arXiv:1810.03292): a map that hardly changes when the model's weights
  are randomized cannot explain what the model learned. `randomization_similarity` gives the paper's
  similarity measures between two maps of the same images: Spearman rank correlation with and
  without absolute values, and SSIM; `randomized_copy` and `cascading_randomization` re-initialize the
  weights of a *copy* of the model (all at once, or layer by layer from the top), never the model given.

`explanation_maps` computes the maps these measures judge with the project's own methods (Grad-CAM,
guided backpropagation, guided Grad-CAM, occlusion, the deconvnet's projection of the top map);
`reference_maps` gives a random map and a centre-bias map, the rows any real explanation should beat.

Conventions: images [N, C, H, W] in model input space; the model returns logits [N, num_classes];
probabilities are the softmax of the logits. `target`: None (each image's predicted class on the
unperturbed image), an int, or an integer tensor [N]. A map is [N, H, W] (a pixel relevance, e.g.
Grad-CAM upsampled; a map at a lower resolution is upsampled bilinearly) or [N, C, H, W] (e.g. a
gradient), whose pixel relevance is the sum of absolute values over channels (`pixel_relevance`).
Pixels of equal relevance are taken in raster order. Every function runs the model in eval mode and
restores each submodule's mode, also on error; none attaches a hook to the model it is given.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import VizError, check_images, class_targets, eval_mode
from convlens.viz.deconvnet import record
from convlens.viz.occlusion import default_patch, default_stride, maps_to_pixels, occlusion_maps
from convlens.viz.saliency import default_saliency_layer, grad_cam, guided_backprop, upsample

__all__ = ["FaithfulnessError", "EXPLANATIONS", "REFERENCES", "Curves", "RoadCurves", "Similarity",
           "pixel_relevance", "relevance_ranks", "default_batch", "pixel_counts", "gray_fill", "gaussian_blur",
           "deletion_insertion", "deletion_insertion_many", "noisy_linear_imputation", "road", "road_many",
           "spearman", "ssim", "randomization_similarity", "reference_maps", "explanation_maps",
           "randomizable_layers", "randomized_copy", "cascading_randomization", "NEIGHBOUR_WEIGHTS"]

#: the explanation methods `explanation_maps` computes, by their names in the `faithfulness` callback
EXPLANATIONS = ("gradcam", "guided_backprop", "guided_gradcam", "occlusion", "deconv")
#: the reference maps `reference_maps` gives: uniform noise, and a Gaussian bump on the image centre
REFERENCES = ("random", "centre")
#: Rong et al.'s imputation kernel: direct neighbours 1/6, diagonal ones 1/12 (they sum to 1)
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


class FaithfulnessError(VizError):
    """Bad images, maps, targets or options for a faithfulness measure."""


# --------------------------------------------------------------------------------------------
# Maps to pixel relevance, and the order in which pixels are perturbed
# --------------------------------------------------------------------------------------------

def _shape(x) -> str:
    return str(list(x.shape)) if torch.is_tensor(x) else type(x).__name__


def pixel_relevance(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[N, H, W] relevance of each pixel: a [N, H, W] map as it is (a [N, h, w] one upsampled
    bilinearly to `size`), a [N, C, H, W] map summed over channels in absolute value."""
    if not torch.is_tensor(maps) or maps.dim() not in (3, 4) or not maps.is_floating_point():
        raise FaithfulnessError(f"a map must be a float tensor [N, H, W] or [N, C, H, W], got {_shape(maps)}"
                                + (f" {maps.dtype}" if torch.is_tensor(maps) else ""))
    size = tuple(int(s) for s in size)
    if maps.dim() == 4:
        if tuple(maps.shape[-2:]) != size:
            raise FaithfulnessError(f"a [N, C, H, W] map must have the images' size {list(size)}, got "
                                    f"{list(maps.shape)}; pass [N, h, w] maps to have them upsampled")
        return maps.abs().sum(1)
    if tuple(maps.shape[-2:]) != size:
        return upsample(maps, size, "bilinear")
    return maps


def relevance_ranks(relevance: Tensor) -> Tensor:
    """[N, H*W] long: the rank of each pixel (0: the most relevant) of [N, H, W] relevance maps,
    ties in raster order (a stable sort)."""
    flat = relevance.flatten(1)
    if not torch.isfinite(flat).all():
        raise FaithfulnessError("a map holds NaN or infinite values; pass finite maps")
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def pixel_counts(steps: int, pixels: int) -> list[int]:
    """How many pixels are perturbed after step k = 0..steps: round(k * pixels / steps)."""
    return [(k * pixels * 2 + steps) // (2 * steps) for k in range(steps + 1)]


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------

def gray_fill(images: Tensor, pixel_to_input: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """[1, C, H, W]: mid-gray (0.5 in display space) in model input space, the patch occlusion
    fills with by default (`viz.occlusion.occlusion_maps`)."""
    gray = torch.full((1, *images.shape[1:]), 0.5, dtype=images.dtype, device=images.device)
    return pixel_to_input(gray) if pixel_to_input is not None else gray


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """`images` blurred by a Gaussian of standard deviation `sigma` pixels (separable, truncated at
    3 sigma and at the image's side, borders reflected)."""
    check_images(images, FaithfulnessError)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0:
        raise FaithfulnessError(f"blur sigma must be a number > 0 (pixels), got {sigma!r}")
    n, c, h, w = images.shape
    out = images
    for axis, side in ((2, h), (3, w)):
        radius = min(math.ceil(3 * sigma), side - 1)
        if radius < 1:
            continue
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(images.dtype).to(images.device)
        shape = (1, 1, 2 * radius + 1, 1) if axis == 2 else (1, 1, 1, 2 * radius + 1)
        pad = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
        weight = kernel.view(shape).expand(c, *shape[1:]).contiguous()
        out = F.conv2d(F.pad(out, pad, mode="reflect"), weight, groups=c)
    return out


def _baseline(value, images: Tensor, what: str) -> Tensor:
    value = torch.as_tensor(value, dtype=images.dtype, device=images.device)
    try:
        return torch.broadcast_to(value, images.shape).contiguous()
    except RuntimeError:
        raise FaithfulnessError(f"the {what} baseline has shape {list(value.shape)}, which does not broadcast to "
                                f"the images {list(images.shape)}; pass a float, a per-channel tensor [C, 1, 1], "
                                "or a tensor shaped like the images") from None


def default_blur_sigma(height: int, width: int) -> float:
    """The insertion baseline's blur: 1/16 of the shorter side (at least 1 pixel), enough to
    remove the objects' detail and keep the layout of colours."""
    return max(1.0, min(height, width) / 16)


# --------------------------------------------------------------------------------------------
# Batched forwards of perturbed copies
# --------------------------------------------------------------------------------------------

#: with max_batch=None, a forward holds at most this many input elements (and 256 images): mid-sized
#: batches run fastest on CPUs, where a large batch's activations no longer fit the caches (about
#: three times slower per image at 1024 CIFAR images than at 64, benchmarks/RESULTS.md)
BATCH_ELEMENTS = 2**18


def default_batch(channels: int, height: int, width: int) -> int:
    """Perturbed copies per forward when `max_batch` is None (85 for CIFAR's 3x32x32, 1 at 224x224)."""
    return max(1, min(256, BATCH_ELEMENTS // (channels * height * width)))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise FaithfulnessError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_maps(maps: Mapping[str, Tensor], images: Tensor) -> dict[str, Tensor]:
    if not isinstance(maps, Mapping) or not maps:
        raise FaithfulnessError(f"maps must be a non-empty mapping name -> map tensor, got {type(maps).__name__}")
    n, _, h, w = images.shape
    out = {}
    for name, m in maps.items():
        if torch.is_tensor(m) and m.shape[:1] != (n,):
            raise FaithfulnessError(f"map {name!r} has {m.shape[0] if m.dim() else 0} rows for {n} images "
                                    f"({list(m.shape)}); pass one map per image")
        out[name] = pixel_relevance(m, (h, w)).to(images.device)
    return out


def _target_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """[N] float64: softmax probability of each row's target class (in float32 at least, so a
    bfloat16 model's probabilities are not rounded to its few digits)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.softmax(1).gather(1, targets[:, None])[:, 0].double()


def _probabilities(model: nn.Module, total: int, make: Callable[[Tensor], tuple[Tensor, Tensor]],
                   max_batch: int, device) -> Tensor:
    """[total]: p(target) of perturbed copies 0..total-1, `make(indices)` building (copies, targets)
    for a chunk of at most `max_batch` of them."""
    out = torch.empty(total, dtype=torch.float64, device=device)
    for start in range(0, total, max_batch):
        flat = torch.arange(start, min(start + max_batch, total), device=device)
        copies, targets = make(flat)
        out[flat] = _target_probability(model(copies), targets)
    return out


def _prepare(model: nn.Module, images: Tensor, target, max_batch) -> tuple[Tensor, Tensor, int]:
    """(targets [N], p(target) of the images [N], max_batch); runs in the caller's eval/no_grad block."""
    n, c, h, w = images.shape
    max_batch = default_batch(c, h, w) if max_batch is None else _check_int("max_batch", max_batch, 1)
    logits = torch.cat([model(images[i:i + max_batch]) for i in range(0, n, max_batch)])
    targets = class_targets(target, logits, FaithfulnessError)
    return targets, _target_probability(logits, targets), max_batch


@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of one map per image, at `fractions` (0, 1/steps, ..., 1) of
    the pixels perturbed: p(target) [N, steps + 1] and the areas under them [N] (trapezoids)."""
    fractions: Tensor
    deletion: Tensor
    insertion: Tensor

    @property
    def deletion_auc(self) -> Tensor:
        return torch.trapezoid(self.deletion, self.fractions, dim=-1)

    @property
    def insertion_auc(self) -> Tensor:
        return torch.trapezoid(self.insertion, self.fractions, dim=-1)


def deletion_insertion_many(model: nn.Module, images: Tensor, maps: Mapping[str, Tensor], target=None,
                            steps: int = 20, deletion_baseline: float | Tensor | None = None,
                            insertion_baseline: float | Tensor | None = None,
                            pixel_to_input: Callable[[Tensor], Tensor] | None = None,
                            blur_sigma: float | None = None, max_batch: int | None = None) -> dict[str, Curves]:
    """`deletion_insertion` for several maps of the same images at once ({name: Curves}): the
    unperturbed images and the two baselines, shared by every map, are forwarded once."""
    check_images(images, FaithfulnessError)
    steps = _check_int("steps", steps, 1)
    n, c, h, w = images.shape
    relevance = _check_maps(maps, images)
    ranks = torch.stack([relevance_ranks(r) for r in relevance.values()])       # [M, N, HW]
    delete_to = _baseline(gray_fill(images, pixel_to_input) if deletion_baseline is None else deletion_baseline,
                          images, "deletion")
    if insertion_baseline is None:
        sigma = default_blur_sigma(h, w) if blur_sigma is None else blur_sigma
        insert_into = gaussian_blur(images, sigma)
    else:
        insert_into = _baseline(insertion_baseline, images, "insertion")
    counts = torch.tensor(pixel_counts(steps, h * w), device=images.device)
    inner = steps - 1  # steps 1..steps-1; steps 0 and `steps` are the images and the baselines
    per_map = 2 * inner * n

    def make(flat: Tensor) -> tuple[Tensor, Tensor]:
        m, rest = flat // per_map, flat % per_map
        deleting = rest < inner * n
        rest = rest % (inner * n)
        k, i = rest // n + 1, rest % n
        mask = (ranks[m, i] < counts[k][:, None]).view(-1, 1, h, w)              # True: perturbed
        deleted = torch.where(mask, delete_to[i], images[i])
        inserted = torch.where(mask, images[i], insert_into[i])
        return torch.where(deleting.view(-1, 1, 1, 1), deleted, inserted), targets[i]

    with eval_mode(model), torch.no_grad():
        targets, p_images, max_batch = _prepare(model, images, target, max_batch)
        p_ends = _probabilities(model, 2 * n, lambda f: (torch.cat([delete_to, insert_into])[f], targets[f % n]),
                                max_batch, images.device)
        p_inner = _probabilities(model, len(relevance) * per_map, make, max_batch, images.device)
    p_deleted, p_blurred = p_ends[:n], p_ends[n:]
    p_inner = p_inner.view(len(relevance), 2, inner, n)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=images.device)
    out = {}
    for j, name in enumerate(relevance):
        deletion = torch.cat([p_images[:, None], p_inner[j, 0].T, p_deleted[:, None]], 1)
        insertion = torch.cat([p_blurred[:, None], p_inner[j, 1].T, p_images[:, None]], 1)
        out[name] = Curves(fractions, deletion, insertion)
    return out


def deletion_insertion(model: nn.Module, images: Tensor, maps: Tensor, target=None, steps: int = 20,
                       deletion_baseline: float | Tensor | None = None,
                       insertion_baseline: float | Tensor | None = None,
                       pixel_to_input: Callable[[Tensor], Tensor] | None = None, blur_sigma: float | None = None,
                       max_batch: int | None = None) -> Curves:
    """Deletion and insertion curves (Petsiuk et al. 2018) of `maps` for `images`.

    After step k of `steps`, the round(k/steps * H*W) most relevant pixels (all channels) are
    replaced by `deletion_baseline` (deletion), or copied from the image into `insertion_baseline`
    (insertion); the curves are p(target) after each step, from step 0 (the image; the insertion
    baseline) to `steps` (the deletion baseline; the image). Defaults: deletion to mid-gray in
    display space mapped through `pixel_to_input` (occlusion's patch), insertion into the image
    blurred by a Gaussian of `blur_sigma` pixels (`default_blur_sigma`); a float or a tensor
    broadcastable to the images overrides either. `max_batch` copies per forward (None:
    `default_batch`). Curves in float64."""
    if not torch.is_tensor(maps):
        raise FaithfulnessError(f"maps must be a tensor [N, H, W] or [N, C, H, W], got {type(maps).__name__}")
    return deletion_insertion_many(model, images, {"map": maps}, target, steps, deletion_baseline,
                                   insertion_baseline, pixel_to_input, blur_sigma, max_batch)["map"]


# --------------------------------------------------------------------------------------------
# ROAD: remove and debias with noisy linear imputation
# --------------------------------------------------------------------------------------------

def noisy_linear_imputation(images: Tensor, removed: Tensor, noise: float = 0.01, seed: int | Sequence[int] = 0,
                            tol: float | None = None, max_iter: int | None = None) -> Tensor:
    """`images` [B, C, H, W] with the pixels where `removed` [B, H, W] is True replaced, in every
    channel, by Rong et al.'s noisy linear imputation: the values x solving, at every removed pixel
    i, d_i x_i = sum_j w_ij x_j over its in-image neighbours j (w of `NEIGHBOUR_WEIGHTS`, d_i their
    sum; known neighbours give their value), plus `noise` times standard normal noise.

    Solved by conjugate gradients (the system is symmetric positive definite wherever the removed
    region touches a kept pixel), batched over images and channels, each system until its residual
    is below `tol` times its right-hand side's norm (None: 1e-4 in float32, where the imputed values
    then differ from the exact solution by far less than Rong et al.'s noise, 1e-10 in float64) or
    after `max_iter` iterations (None: 10 (H + W)). A region with no kept neighbour at all (every
    pixel removed) is set to 0 before the noise. The noise of image b comes from a generator seeded
    with `seed` (an int, or one per image), on the CPU, so it does not depend on the device or on
    how images are batched."""
    check_images(images, FaithfulnessError)
    b, c, h, w = images.shape
    if not torch.is_tensor(removed) or removed.dtype != torch.bool or removed.shape != (b, h, w):
        raise FaithfulnessError(f"removed must be a bool tensor [B, H, W] = [{b}, {h}, {w}], got "
                                f"{_shape(removed)} {removed.dtype if torch.is_tensor(removed) else ''}".rstrip())
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not noise >= 0:
        raise FaithfulnessError(f"noise must be a number >= 0 (standard deviation, model input units), got {noise!r}")
    max_iter = 10 * (h + w) if max_iter is None else _check_int("max_iter", max_iter, 1)
    seeds = [int(seed)] * b if isinstance(seed, numbers.Integral) else [int(s) for s in seed]
    if len(seeds) != b:
        raise FaithfulnessError(f"seed must be an int or one int per image ({b}), got {len(seeds)}")
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    if tol is None:
        tol = 1e-4 if dtype == torch.float32 else 1e-10
    tiny = torch.finfo(dtype).tiny

    def neighbours(x: Tensor) -> Tensor:
        # sum_j w_ij x_j over in-image neighbours of [S, H, W]: the kernel is
        # (outer([1, 2, 1], [1, 2, 1]) - 4 delta) / 12, two [1, 2, 1] passes (cheaper than a 3x3 convolution)
        padded = F.pad(x, (1, 1, 1, 1))
        rows = padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]
        return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:] - 4 * x) / 12

    # one system per image and channel: [S = B * C, H, W]
    values = images.to(dtype).reshape(b * c, h, w)
    unknown = removed.repeat_interleave(c, 0).to(dtype)
    diag = neighbours(torch.ones(1, h, w, dtype=dtype, device=images.device))            # d_i
    rhs = neighbours(values * (1 - unknown)) * unknown
    solution = torch.zeros_like(rhs)
    active = torch.arange(b * c, device=images.device)
    x, r, p, u = torch.zeros_like(rhs), rhs, rhs.clone(), unknown
    rs = (r * r).sum((1, 2))
    bound = tol ** 2 * rs
    iteration = 0
    while True:
        if iteration % 8 == 0 or iteration >= max_iter:  # set converged systems aside: later iterations are cheaper
            done = (rs <= bound) | (iteration >= max_iter)
            if bool(done.any()):
                solution[active[done]] = x[done]
                keep = ~done
                active, x, r, p, u, rs, bound = (t[keep] for t in (active, x, r, p, u, rs, bound))
            if not active.numel():
                break
        ap = (diag * p - neighbours(p)) * u
        pap = (p * ap).sum((1, 2))
        alpha = torch.where(pap > 0, rs / pap.clamp_min(tiny), torch.zeros_like(pap))[:, None, None]
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum((1, 2))
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))[:, None, None]
        p = r + beta * p
        rs = rs_new
        iteration += 1
    solution = solution.view(b, c, h, w)
    if noise:
        draws = torch.stack([torch.randn((c, h, w), generator=torch.Generator().manual_seed(s), dtype=dtype)
                             for s in seeds]).to(images.device)
        solution = solution + noise * draws
    return torch.where(removed[:, None], solution, images.to(dtype)).to(images.dtype)


@dataclass(frozen=True)
class RoadCurves:
    """ROAD: p(target) [N, P] with the `percentiles` [P] of the pixels removed and imputed, most
    relevant first (`morf`: a faithful map makes it low) and least relevant first (`lerf`: high)."""
    percentiles: Tensor
    morf: Tensor
    lerf: Tensor


def _check_percentiles(percentiles) -> list[float]:
    if isinstance(percentiles, (str, bytes)) or not isinstance(percentiles, Sequence) or not percentiles \
            or not all(isinstance(q, numbers.Real) and not isinstance(q, bool) and 0 < q < 1 for q in percentiles):
        raise FaithfulnessError(f"percentiles must be a non-empty list of fractions in (0, 1), e.g. [0.1, 0.5, 0.9], "
                                f"got {percentiles!r}")
    return [float(q) for q in percentiles]


def road_many(model: nn.Module, images: Tensor, maps: Mapping[str, Tensor], target=None,
              percentiles: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), noise: float = 0.01, seed: int = 0,
              max_batch: int | None = None, tol: float | None = None) -> dict[str, RoadCurves]:
    """`road` for several maps of the same images at once ({name: RoadCurves})."""
    check_images(images, FaithfulnessError)
    qs = _check_percentiles(percentiles)
    n, c, h, w = images.shape
    relevance = _check_maps(maps, images)
    ranks = torch.stack([relevance_ranks(r) for r in relevance.values()])       # [M, N, HW]
    removed_counts = torch.tensor([round(q * h * w) for q in qs], device=images.device)
    per_map = 2 * len(qs) * n

    def make(flat: Tensor) -> tuple[Tensor, Tensor]:
        m, rest = flat // per_map, flat % per_map
        most_first = rest < len(qs) * n
        rest = rest % (len(qs) * n)
        q, i = rest // n, rest % n
        count = removed_counts[q][:, None]
        r = ranks[m, i]
        removed = torch.where(most_first[:, None], r < count, r >= h * w - count).view(-1, h, w)
        # one noise seed per (map, order, percentile, image), whatever the chunking
        seeds = (seed * 1_000_003 + flat).tolist()
        return noisy_linear_imputation(images[i], removed, noise, seeds, tol), targets[i]

    with eval_mode(model), torch.no_grad():
        targets, _, max_batch = _prepare(model, images, target, max_batch)
        p = _probabilities(model, len(relevance) * per_map, make, max_batch, images.device)
    p = p.view(len(relevance), 2, len(qs), n)
    qt = torch.tensor(qs, dtype=torch.float64, device=images.device)
    return {name: RoadCurves(qt, p[j, 0].T.contiguous(), p[j, 1].T.contiguous()) for j, name in enumerate(relevance)}


def road(model: nn.Module, images: Tensor, maps: Tensor, target=None,
         percentiles: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), noise: float = 0.01, seed: int = 0,
         max_batch: int | None = None, tol: float | None = None) -> RoadCurves:
    """ROAD (Rong et al. 2022) of `maps` for `images`: for each fraction q of `percentiles`, the
    round(q * H*W) most relevant pixels (MoRF), or the least relevant ones (LeRF), are removed and
    filled by `noisy_linear_imputation` (noise `noise`, seeded by `seed`), and p(target) is read,
    all perturbed copies forwarded in batches of `max_batch`. Rong et al. report accuracy over a
    test set; on a few probe images p(target) is the finer reading."""
    if not torch.is_tensor(maps):
        raise FaithfulnessError(f"maps must be a tensor [N, H, W] or [N, C, H, W], got {type(maps).__name__}")
    return road_many(model, images, {"map": maps}, target, percentiles, noise, seed, max_batch, tol)["map"]


# --------------------------------------------------------------------------------------------
# Similarity of two maps (Adebayo et al.)
# --------------------------------------------------------------------------------------------

def _average_ranks(x: Tensor) -> Tensor:
    """[N, D] ranks 1..D of each row's values, ties given their average rank (scipy's rankdata)."""
    n, d = x.shape
    values, order = torch.sort(x, dim=1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = torch.cumsum(new.long(), 1) - 1 + torch.arange(n, device=x.device)[:, None] * d
    positions = torch.arange(1, d + 1, dtype=torch.float64, device=x.device).expand(n, d)
    total = torch.zeros(n * d, dtype=torch.float64, device=x.device).index_add_(0, group.flatten(), positions.flatten())
    count = torch.zeros(n * d, dtype=torch.float64, device=x.device).index_add_(
        0, group.flatten(), torch.ones(n * d, dtype=torch.float64, device=x.device))
    ranks = torch.empty(n, d, dtype=torch.float64, device=x.device)
    ranks.scatter_(1, order, (total / count.clamp_min(1))[group])
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """[N]: Spearman's rank correlation of each row pair of `a`, `b` [N, ...] (flattened; ties
    ranked by their average, as scipy.stats.spearmanr); NaN where a row is constant."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dim() < 2:
        raise FaithfulnessError(f"spearman needs two tensors of one shape [N, ...], got {_shape(a)} and {_shape(b)}")
    ra, rb = _average_ranks(a.flatten(1).double()), _average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denominator = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(1) / denominator.clamp_min(1e-300),
                       torch.full_like(denominator, float("nan")))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, win_size: int = 7) -> Tensor:
    """[N]: the mean structural similarity (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004, DOI
    10.1109/TIP.2003.819861) of each pair of [N, H, W] maps, as scikit-image's
    `structural_similarity` computes it by default: a uniform `win_size` x `win_size` window, sample
    covariances, K1 = 0.01, K2 = 0.03, averaged over the window positions inside the image. Maps
    smaller than the window use the largest odd window that fits."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dim() != 3:
        raise FaithfulnessError(f"ssim needs two [N, H, W] tensors of one shape, got {_shape(a)} and {_shape(b)}")
    side = min(a.shape[-2:])
    win = min(win_size, side if side % 2 else side - 1)
    if win < 1:
        raise FaithfulnessError(f"ssim needs maps of at least 1x1 pixels, got {list(a.shape)}")
    x, y = a.double()[:, None], b.double()[:, None]

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, win, stride=1)

    cov_norm = win * win / (win * win - 1) if win > 1 else 1.0
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@dataclass(frozen=True)
class Similarity:
    """Adebayo et al.'s similarity of two maps of each image [N]: Spearman rank correlation of the
    signed maps (`spearman`) and of their absolute values (`spearman_abs`), and SSIM of the absolute
    maps, each scaled to [0, 1] (`ssim`)."""
    spearman: Tensor
    spearman_abs: Tensor
    ssim: Tensor


def _views(maps: Tensor) -> tuple[Tensor, Tensor]:
    """(signed, absolute) [N, H, W] views of a map: over channels the sum, and the sum of |.|."""
    if not torch.is_tensor(maps) or maps.dim() not in (3, 4) or not maps.is_floating_point():
        raise FaithfulnessError(f"a map must be a float tensor [N, H, W] or [N, C, H, W], got {_shape(maps)}")
    if maps.dim() == 3:
        return maps, maps.abs()
    return maps.sum(1), maps.abs().sum(1)


def _unit_range(x: Tensor) -> Tensor:
    lo = x.flatten(1).amin(1).view(-1, 1, 1)
    hi = x.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-300), torch.zeros_like(x))


def randomization_similarity(map_a: Tensor, map_b: Tensor) -> Similarity:
    """How alike two maps of the same images are (Adebayo et al. 2018, section 3): for maps of a
    trained and a randomized model, values near 1 mean the map does not depend on what was learned.
    [N, C, H, W] maps are summed over channels (signed, and in absolute value for the absolute
    measures, as the paper's grayscale visualizations). Spearman is NaN for a constant map."""
    if not (torch.is_tensor(map_a) and torch.is_tensor(map_b)) or map_a.shape != map_b.shape:
        raise FaithfulnessError(f"the two maps must have one shape, got {_shape(map_a)} and {_shape(map_b)}")
    (sa, aa), (sb, ab) = _views(map_a), _views(map_b)
    return Similarity(spearman(sa, sb), spearman(aa, ab), ssim(_unit_range(aa.double()), _unit_range(ab.double())))


# --------------------------------------------------------------------------------------------
# The maps judged, and the reference maps
# --------------------------------------------------------------------------------------------

def reference_maps(n: int, height: int, width: int, seed: int = 0, device=None,
                   dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """{"random": uniform noise [n, H, W] (seeded, on the CPU, so the same everywhere), "centre": a
    Gaussian bump of standard deviation 1/4 of each side on the image centre [n, H, W]}."""
    noise = torch.rand((n, height, width), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    yy = (torch.arange(height, dtype=torch.float64) - (height - 1) / 2) / (height / 4)
    xx = (torch.arange(width, dtype=torch.float64) - (width - 1) / 2) / (width / 4)
    bump = torch.exp(-0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2)).to(dtype).expand(n, height, width)
    return {"random": noise.to(device), "centre": bump.contiguous().to(device)}


def explanation_maps(model: nn.Module, images: Tensor, target=None, methods: Sequence[str] = EXPLANATIONS,
                     layer: str | None = None, patch: int | None = None, stride: int | None = None,
                     pixel_to_input: Callable[[Tensor], Tensor] | None = None,
                     unpool: str = "switches", max_batch: int | None = None) -> dict[str, Tensor]:
    """{method: map} of `images` by each of `methods` (names of `EXPLANATIONS`), from the project's
    own `viz` functions:

    - gradcam: `viz.saliency.grad_cam` of `layer` upsampled bilinearly to the image [N, H, W];
    - guided_backprop: `viz.saliency.guided_backprop` [N, C, H, W];
    - guided_gradcam: the two above multiplied [N, C, H, W];
    - occlusion: the drop of p(target) when `viz.occlusion.occlusion_maps`' gray patch (`patch`,
      `stride`; None: `default_patch`, `default_stride`) covers a pixel, drawn on the image grid by
      `maps_to_pixels` [N, H, W];
    - deconv: `viz.deconvnet`'s projection of each image's top map of `layer` (highest maximum
      activation), not specific to a class [N, C, H, W].

    `layer` (None: `default_saliency_layer`, the last Conv2d with maps larger than 1x1); `max_batch`:
    occluded copies per forward (None: `default_batch`)."""
    check_images(images, FaithfulnessError)
    unknown = [m for m in methods if m not in EXPLANATIONS]
    if unknown or not methods:
        raise FaithfulnessError(f"Unknown explanation method(s) {unknown or methods!r}; use some of "
                                f"{', '.join(EXPLANATIONS)}")
    n, _, h, w = images.shape
    with eval_mode(model), torch.no_grad():
        logits = model(images)
    with torch.inference_mode(False):  # a target made in inference mode cannot index a graph's scores
        targets = class_targets(target, logits, FaithfulnessError).clone()
    if layer is None and {"gradcam", "guided_gradcam", "deconv"} & set(methods):
        layer = default_saliency_layer(model, images[:1])
    out: dict[str, Tensor] = {}
    cam = guided = None
    for method in methods:
        if method in ("gradcam", "guided_gradcam") and cam is None:
            cam = upsample(grad_cam(model, images, layer, targets), (h, w), "bilinear")
        if method in ("guided_backprop", "guided_gradcam") and guided is None:
            guided = guided_backprop(model, images, targets)
        if method == "gradcam":
            out[method] = cam
        elif method == "guided_backprop":
            out[method] = guided
        elif method == "guided_gradcam":
            out[method] = guided * cam[:, None]
        elif method == "occlusion":
            side = min(h, w)
            p = patch if patch is not None else default_patch(side)
            s = stride if stride is not None else default_stride(side, p)
            prob, _ = occlusion_maps(model, images, targets, patch=p, stride=s, pixel_to_input=pixel_to_input,
                                     max_batch=default_batch(*images.shape[1:]) if max_batch is None else max_batch)
            p0 = _target_probability(logits, targets).to(prob.dtype)
            out[method] = maps_to_pixels(p0.view(-1, 1, 1) - prob, (h, w), p, s)
        elif method == "deconv":
            recording = record(model, images, layer)
            _, top = recording.top_units(1)
            out[method] = recording.project(top[:, 0], unpool)
    return out


# --------------------------------------------------------------------------------------------
# Model randomization on a copy
# --------------------------------------------------------------------------------------------

def randomizable_layers(model: nn.Module) -> list[str]:
    """Names of the modules with parameters of their own and a `reset_parameters` (convolutions,
    linear layers, normalizations), in definition order."""
    return [name for name, m in model.named_modules()
            if callable(getattr(m, "reset_parameters", None)) and next(m.parameters(recurse=False), None) is not None]


def _reinitialize(module: nn.Module, seed: int) -> None:
    """`module.reset_parameters()` drawn on the CPU from `seed` (the same weights on every device),
    copied into the module's own tensors in place."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(module).cpu()
        fresh.reset_parameters()
    with torch.inference_mode(False), torch.no_grad():
        for (_, mine), (_, new) in zip(module.named_parameters(recurse=False), fresh.named_parameters(recurse=False)):
            mine.copy_(new)
        for (_, mine), (_, new) in zip(module.named_buffers(recurse=False), fresh.named_buffers(recurse=False)):
            mine.copy_(new)


def _check_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    candidates = randomizable_layers(model)
    if layers is None:
        return candidates
    bad = [x for x in layers if x not in candidates]
    if bad:
        raise FaithfulnessError(f"cannot re-initialize layer(s) {', '.join(map(repr, bad))}; layers with weights "
                                f"and reset_parameters(): {', '.join(candidates[:40]) or 'none'}")
    return list(layers)


def randomized_copy(model: nn.Module, layers: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
    """A deep copy of `model` with the weights of `layers` (None: every `randomizable_layers` one)
    drawn again by each module's `reset_parameters` (seeded; layer i with `seed + i`): Adebayo et
    al.'s full model randomization. `model` itself is not changed."""
    layers = _check_layers(model, layers)
    with torch.inference_mode(False):  # a copy made in inference mode would hold inference tensors
        twin = copy.deepcopy(model)
    for i, name in enumerate(layers):
        _reinitialize(twin.get_submodule(name), seed + i)
    return twin


def _execution_order(model: nn.Module, images: Tensor, names: Sequence[str]) -> list[str]:
    """`names` in the order their modules first run on `images` (those that never run dropped)."""
    seen: list[str] = []
    handles = []
    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, _a, name=name: seen.append(name) if name not in seen else None))
        with eval_mode(model), torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def cascading_randomization(model: nn.Module, explain: Callable[[nn.Module], Mapping[str, Tensor]],
                            images: Tensor | None = None, layers: Sequence[str] | None = None,
                            seed: int = 0) -> Iterator[tuple[str, dict[str, Tensor]]]:
    """Adebayo et al.'s cascading randomization: on a deep copy of `model`, the weights of `layers`
    (None: every `randomizable_layers` one) are re-initialized one more at a time from the top (the
    last to run on `images`, when given; else the last defined) down, and after each the maps
    `explain(copy)` ({method: map}) are computed: yields (layer just re-initialized, maps). The
    given `model` is never changed, nor hooked; its copy is hooked once to read the order in which
    layers run."""
    layers = _check_layers(model, layers)
    with torch.inference_mode(False):  # a copy made in inference mode would hold inference tensors
        twin = copy.deepcopy(model)
    if images is not None:
        check_images(images, FaithfulnessError)
        layers = _execution_order(twin, images, layers)
    for i, name in enumerate(reversed(layers)):
        _reinitialize(twin.get_submodule(name), seed + i)
        yield name, dict(explain(twin))
