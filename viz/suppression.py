"""Kernel interpretation by suppression (Zhuang et al., "Understanding of Kernels in CNN Models by
Suppressing Irrelevant Visual Features in Images", 2021, arXiv:2108.11054).

Follows its section 3 and section 4.1. For an image X and
kernel i of a layer with N kernels, find by gradient descent on X̂, starting from X, an input that
keeps kernel i's feature map F_i and suppresses every other kernel's map F_j (j != i):

    L = Lp + alpha * Ls + beta * Lr                                                    (Eq. 4)
    Lp = ||F̂_i - F_i||_2 / (W H ||F_i||_2)              preservation (Eq. 1), L2, not squared
    Ls = sum_j ||F̂_j||_1 / (W H sum_j ||F_j||_1)        suppression  (Eq. 2), L1
    Lr = ||X̂||_1 / (W0 H0)                              regularization (Eq. 3), L1

with F = maps of X, F̂ = maps of X̂, W x H the map size and W0 x H0 the image size.

The balance of the terms (`loss_scale`). Taken literally (`loss_scale="paper"`) the three terms live
on very different scales: at X̂ = X, Ls = 1/(W H) (1/169 at our CIFAR net's conv3) while
Lr = mean |X̂| summed over channels (about 2.5 for a normalized CIFAR-10 image), so with the
paper's alpha = beta = 1 the input term swamps the other two and the optimization mostly shrinks the
image. The default `loss_scale="relative"` measures each term relative to the original image:

    Lp = ||F̂_i - F_i||_2 / ||F_i||_2     (the relative error of the kernel's map; 0 at X)
    Ls = sum_j ||F̂_j||_1 / sum_j ||F_j||_1   (the fraction of the other kernels' activation left; 1 at X)
    Lr = ||X̂||_1 / ||X||_1               (the fraction of the image left; 1 at X)

i.e. the paper's Lp and Ls multiplied by W H and its Lr by W0 H0 / ||X||_1, so that alpha and beta mean
the same at every layer and for every image. `alpha` then says how much of the kernel's map may be
traded for suppressing the others, `beta` how strongly X̂ is pulled towards the zero input. Zero is
the zero of the model's input space: with our datamodules' normalizations, the mean color (or the
mean image, for LeNet), so "removed" content fades to the dataset mean, not to black.

Defaults (alpha = 0.5, beta = 0.25, Adam at lr 0.05, at most 300 steps): chosen on our nets (a small
ReLU net on synthetic shapes, CifarConvNet on CIFAR-10; benchmarks/RESULTS.md, section 5). Because
Lp is a norm (not squared), its pull does not fade near F̂_i = F_i: below some alpha the kernel's map is
kept almost exactly (SSIM ~ 1) and the others are suppressed as far as that allows; above it the
map is traded away quickly (on the shapes net, SSIM at conv1 fell from 0.99 at alpha = 0.5 to 0.72 at
alpha = 1 and 0.30 at alpha = 1, beta = 0.5). alpha = 0.5 stays on the safe side on every layer we
tried; raise it for more suppression where the kernel's map survives it (CIFAR net conv3: alpha = 1
left 3% of the other kernels' mean square activation instead of 12%, at a mean SSIM of 0.96 instead
of 0.996).

Optimizer (section 4.1: "gradient descent ... initial learning rate 10 and decayed by 0.5 after
training loss stops falling for about 50 iterations ... convergent within 10,000 iterations"). The
paper's plain gradient descent is `optimizer="gd"`; its learning rate depends on `loss_scale`. The
default is Adam (`optimizer="adam"`, per-pixel steps of about `lr` in input units whatever the
loss scale), which reaches in a few hundred steps what plain gradient descent reaches in thousands.
The paper's decay on a plateau is kept for both: for each image separately, the learning rate is
halved once its loss has not fallen (by a relative 1e-4) for `patience` steps, and an image stops
(early stop) once its learning rate has been halved `max_decays` times; every image stops after at
most `steps` updates. Each image of a batch has its own learning rate, plateau and Adam moments, so
a batch gives what each image would give alone. The best X̂ seen (lowest loss) is returned.

Feature maps (`rectify`). A kernel's "activation" is the map the net passes on: the layer's output,
rectified when the net applies a ReLU right after it. `rectify=None` (auto) rectifies when the next
module the forward pass runs after `layer` is an `nn.ReLU` (our CIFAR net's and VGG16's convs, LeNet's
conv3), and not otherwise (LeNet's conv1 and conv2, which have no ReLU: their maps are linear in X
and signed, and "suppressed" means driven to zero from both sides). A ReLU applied as a function
(`F.relu`) is not seen: pass `rectify=True`.

Metrics, per image, as in the paper's Table 1 (section 4.1):
- `ssim` ("S.", higher is better): SSIM between F̂_i and F_i (Wang et al. 2004, `ssim` below), on the
  maps as they are, with the data range of the original map (max F_i - min F_i). SSIM is invariant to
  scaling both maps by the same factor when the data range scales with them, so no other
  normalization is needed and the values compare across layers.
- `mse` ("R.", lower is better): the mean square of the other kernels' maps F̂_j, i.e. their MSE
  against the zero map, in the layer's own units (the paper's definition, scale dependent);
  `mse_original` is the same for X, and `mse_relative` = mse / mse_original (the fraction of the
  other kernels' mean square activation left; 1 = nothing suppressed).

Conventions: images are [N, C, H, W] in the model's input space; `layer` is a dotted name from
`model.named_modules()` whose output is [N, K, h, w]; `unit` is an int (the same kernel for every
image) or an integer tensor [N] (one kernel per image: to interpret several kernels of one image,
repeat the image). The model runs in eval mode (BatchNorm with running statistics, no dropout) and
only up to `layer`. Biases are part of the model and kept (nothing is ignored).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import (VizError, check_units, check_images, check_int, check_number, eval_mode,
                                 forward_until, frozen, gradients)
from convlens.viz.layers import LayerError, get_layer

__all__ = [
    "SuppressionError", "interpret_kernel", "check_arguments", "feature_maps", "kernel_maps", "follows_relu",
    "suppression_metrics", "evaluate", "ssim", "OPTIMIZERS", "LOSS_SCALES",
]

OPTIMIZERS = ("adam", "gd")
LOSS_SCALES = ("relative", "paper")

#: SSIM constants of Wang et al. (2004)
SSIM_K1, SSIM_K2 = 0.01, 0.03
#: relative improvement below which a step does not count as the loss falling (as ReduceLROnPlateau)
PLATEAU_THRESHOLD = 1e-4


class SuppressionError(VizError):
    """Bad arguments to the suppression method (images, unit, alpha, beta, steps, ...)."""


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

def _check_images(images, name: str = "images") -> None:
    check_images(images, SuppressionError, name)


def _check_number(name: str, value, minimum: float, strict: bool = False, what: str = "") -> float:
    return check_number(name, value, minimum, strict, SuppressionError, what)


def _check_int(name: str, value, minimum: int, what: str = "") -> int:
    return check_int(name, value, minimum, SuppressionError, what)


def _check_rectify(rectify) -> None:
    if rectify not in (None, True, False):
        raise SuppressionError(f"rectify must be None (auto: rectify when an nn.ReLU follows the layer), "
                               f"True or False, got {rectify!r}")


def check_arguments(alpha: float = 0.5, beta: float = 0.25, steps: int = 300, lr: float = 0.05,
                    optimizer: str = "adam", patience: int = 20, max_decays: int = 4, decay: float = 0.5,
                    loss_scale: str = "relative", rectify: bool | None = None) -> None:
    """Raise a SuppressionError (a ValueError) saying what is wrong with any of `interpret_kernel`'s
    options; callers (a callback's constructor) can check them before running anything."""
    _check_number("alpha", alpha, 0.0, what=" (weight of the suppression term)")
    _check_number("beta", beta, 0.0, what=" (weight of the regularization term)")
    _check_int("steps", steps, 1, " (the most gradient steps per image)")
    _check_number("lr", lr, 0.0, strict=True, what=" (initial learning rate)")
    _check_int("patience", patience, 1, " (steps without improvement before the learning rate decays)")
    _check_int("max_decays", max_decays, 1, " (an image stops at this learning-rate decay)")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise SuppressionError(f"decay must be a number in (0, 1) (learning-rate factor on a plateau), got {decay!r}")
    if optimizer not in OPTIMIZERS:
        raise SuppressionError(f"Unknown optimizer {optimizer!r}; use 'adam' (default) or 'gd' "
                               "(the paper's plain gradient descent)")
    if loss_scale not in LOSS_SCALES:
        raise SuppressionError(f"Unknown loss_scale {loss_scale!r}; use 'relative' (each term relative "
                               "to its value at X, default) or 'paper' (Eqs. 1-3 literally)")
    _check_rectify(rectify)


def _as_unit(unit, n: int, num_units: int, layer: str, device) -> Tensor:
    """A validated LongTensor [n] of kernel indices (an int is broadcast)."""
    return check_units(unit, n, num_units, layer, SuppressionError, what="units (kernels)").to(device)


# --------------------------------------------------------------------------------------------
# Running the model up to the layer
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _run_to(model: nn.Module, x: Tensor, layer: str, target: nn.Module) -> Tensor:
    """The output of `target` (the module called `layer`) for `x`; nothing past it is computed."""
    out = forward_until(model, x, target, repr(layer))
    if not torch.is_tensor(out):
        raise LayerError(f"Layer {layer!r} returns a {type(out).__name__}, not a tensor")
    if out.dim() != 4:
        raise LayerError(f"Layer {layer!r} has output shape {list(out.shape)}; the suppression method "
                         "needs spatial feature maps [N, K, h, w] (a convolutional layer or one of its "
                         "activations, before any Flatten/Linear)")
    return out


def follows_relu(model: nn.Module, images: Tensor, layer: str) -> bool:
    """Whether the next module the forward pass runs after `layer` is an `nn.ReLU` (what
    `rectify=None` uses). Runs the first image only, in eval mode, without gradients."""
    target = get_layer(model, layer)
    _check_images(images)
    leaves = [m for m in model.modules() if not list(m.children()) and m is not target]
    state = {"seen": False, "next": None}

    def after_target(_m, _a, _o):
        state["seen"] = True

    def before_leaf(module, _args):
        if state["seen"]:
            state["next"] = module
            raise _Stop

    handles = [target.register_forward_hook(after_target)]
    try:
        handles += [m.register_forward_pre_hook(before_leaf) for m in leaves]
        with torch.no_grad(), eval_mode(model):
            try:
                model(images[:1])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if not state["seen"]:
        raise LayerError(f"Layer {layer!r} was not run by the model's forward pass")
    return isinstance(state["next"], nn.ReLU)


def _resolve_rectify(model: nn.Module, images: Tensor, layer: str, rectify: bool | None) -> bool:
    _check_rectify(rectify)
    return follows_relu(model, images, layer) if rectify is None else bool(rectify)


def feature_maps(model: nn.Module, images: Tensor, layer: str, rectify: bool | None = None) -> Tensor:
    """[N, K, h, w]: the feature maps of `layer` for `images` (rectified as `rectify` says; see the
    module docstring), in eval mode, without gradients. The model's modes, flags and hooks are left
    as they were."""
    _check_images(images)
    target = get_layer(model, layer)
    rectify = _resolve_rectify(model, images, layer, rectify)
    with torch.no_grad(), eval_mode(model):
        maps = _run_to(model, images, layer, target)
    maps = maps.detach().clone()
    return maps.relu() if rectify else maps


def kernel_maps(model: nn.Module, images: Tensor, layer: str, unit: int | Tensor,
                rectify: bool | None = None) -> Tensor:
    """[N, h, w]: the map of kernel `unit` (an int, or an integer tensor [N]) for each image."""
    maps = feature_maps(model, images, layer, rectify)
    c = _as_unit(unit, maps.shape[0], maps.shape[1], layer, maps.device)
    return maps[torch.arange(maps.shape[0], device=maps.device), c]


# --------------------------------------------------------------------------------------------
# SSIM and the paper's metrics
# --------------------------------------------------------------------------------------------

def _gaussian_window(size: int, sigma: float, dtype, device) -> Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float | Tensor, window_size: int = 11,
         sigma: float = 1.5) -> Tensor:
    """[N]: the mean SSIM (Wang et al., IEEE TIP 2004) of each pair of maps x[n], y[n].

    x, y: [N, h, w] or [N, C, h, w] (then the mean over channels too). `data_range`: the dynamic range
    L of the values (a number or a tensor [N]); C1 = (0.01 L)^2, C2 = (0.03 L)^2. Local statistics are
    weighted by a gaussian window of `window_size` (odd) and `sigma`, over every position where the
    window fits in the map (no padding), with population (not sample) variances: what
    `skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)`
    computes. Maps smaller than the window get the largest odd window that fits, with sigma scaled
    by the same factor (a 4x4 map: a 3x3 window, sigma 1.5 * 3/11; a 1x1 map: only the luminance term).
    Computed in float64; returned in x's dtype.
    """
    if x.shape != y.shape or x.dim() not in (3, 4):
        raise SuppressionError(f"ssim needs two tensors of the same shape [N, h, w] or [N, C, h, w], "
                               f"got {list(x.shape)} and {list(y.shape)}")
    if window_size < 1 or window_size % 2 == 0:
        raise SuppressionError(f"ssim window_size must be a positive odd int, got {window_size}")
    out_dtype = x.dtype
    x = x.double() if x.dim() == 4 else x.double().unsqueeze(1)
    y = y.double() if y.dim() == 4 else y.double().unsqueeze(1)
    n, c, h, w = x.shape
    size = min(window_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    win = _gaussian_window(size, sigma * size / window_size, x.dtype, x.device)
    win = win.expand(c, 1, size, size)

    def blur(t):
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    L = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * L) ** 2, (SSIM_K2 * L) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).to(out_dtype)


def suppression_metrics(maps_hat: Tensor, maps: Tensor, unit: Tensor) -> dict[str, Tensor]:
    """The paper's Table 1 metrics from the layer's maps for X̂ and X ([N, K, h, w] each) and the
    kernel of interest of each image (`unit` [N]): {"ssim", "mse", "mse_original", "mse_relative"},
    each [N] (see the module docstring)."""
    n, k = maps.shape[:2]
    rows = torch.arange(n, device=maps.device)
    f_i, f_hat_i = maps[rows, unit], maps_hat[rows, unit]
    flat = f_i.flatten(1)
    data_range = (flat.amax(1) - flat.amin(1)).clamp_min(torch.finfo(flat.dtype).tiny)
    others = torch.ones(n, k, dtype=torch.bool, device=maps.device)
    others[rows, unit] = False
    count = max((k - 1) * maps.shape[2] * maps.shape[3], 1)

    def mean_square_of_others(m):
        return (m.pow(2).sum(dim=(2, 3)) * others).sum(1) / count

    mse, mse_original = mean_square_of_others(maps_hat), mean_square_of_others(maps)
    return {
        "ssim": ssim(f_hat_i, f_i, data_range),
        "mse": mse,
        "mse_original": mse_original,
        "mse_relative": mse / mse_original.clamp_min(torch.finfo(mse.dtype).tiny),
    }


def evaluate(model: nn.Module, images: Tensor, x_hat: Tensor, layer: str, unit: int | Tensor,
             rectify: bool | None = None) -> dict[str, Tensor]:
    """The paper's metrics (`suppression_metrics`) of an input X̂ (`x_hat`, shaped like `images`) for
    kernel `unit` of `layer`: how well it keeps the kernel's map of `images` and suppresses the
    others. Works for any X̂: ours, or a baseline's estimated input."""
    _check_images(images)
    _check_images(x_hat, "x_hat")
    if x_hat.shape != images.shape:
        raise SuppressionError(f"x_hat must have the shape of images {list(images.shape)}, got {list(x_hat.shape)}")
    rectify = _resolve_rectify(model, images, layer, rectify)
    maps = feature_maps(model, images, layer, rectify)
    c = _as_unit(unit, maps.shape[0], maps.shape[1], layer, maps.device)
    return suppression_metrics(feature_maps(model, x_hat, layer, rectify), maps, c)


# --------------------------------------------------------------------------------------------
# The optimization
# --------------------------------------------------------------------------------------------

def _loss_terms(maps_hat: Tensor, f_i: Tensor, rows: Tensor, unit: Tensor, others: Tensor,
                x_hat: Tensor, denominators: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (Lp, Ls, Lr), each [N], with the scale-setting denominators precomputed."""
    d_p, d_s, d_r = denominators
    lp = (maps_hat[rows, unit] - f_i).flatten(1).norm(dim=1) / d_p
    ls = (maps_hat.abs().sum(dim=(2, 3)) * others).sum(1) / d_s
    lr = x_hat.abs().flatten(1).sum(1) / d_r
    return lp, ls, lr


def interpret_kernel(model: nn.Module, images: Tensor, layer: str, unit: int | Tensor,
                     alpha: float = 0.5, beta: float = 0.25, steps: int = 300, lr: float = 0.05,
                     optimizer: str = "adam", patience: int = 20, max_decays: int = 4,
                     decay: float = 0.5, loss_scale: str = "relative",
                     rectify: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """X̂ [N, C, H, W] that keeps kernel `unit`'s map of `layer` and suppresses the layer's other
    kernels, for each image, and its metrics.

    Args:
        model: any nn.Module; run in eval mode up to `layer` only.
        images: [N, C, H, W] in the model's input space (X; the optimization starts from it).
        layer: a dotted module name with spatial output [N, K, h, w].
        unit: the kernel to interpret: an int for every image, or an integer tensor [N].
        alpha, beta: weights of the suppression and regularization terms (Eq. 4); their meaning
            depends on `loss_scale` (see the module docstring).
        steps: the most updates per image (the step budget).
        lr: initial learning rate (Adam: about the per-pixel step in input units; "gd": the step
            is lr times the gradient).
        optimizer: "adam" (default) or "gd" (the paper's plain gradient descent).
        patience: steps without the loss falling after which an image's learning rate is multiplied
            by `decay` (the paper: about 50 steps, 0.5).
        max_decays: an image stops early once its learning rate has been decayed this many times
            (its loss has stopped falling at ever smaller steps).
        loss_scale: "relative" (default: each term relative to its value at X) or "paper" (Eqs. 1-3
            literally).
        rectify: None (auto), True or False: whether the maps are the layer's output after a ReLU.

    Returns:
        (x_hat, metrics): x_hat like `images` (detached, same dtype and device); metrics, each [N]:
        "ssim" (S.), "mse" (R.), "mse_original", "mse_relative" (see `suppression_metrics`), the
        loss terms at X̂ in the chosen scale "loss", "preservation", "suppression", "regularization",
        and "steps" (updates made before the early stop).

    The model's train/eval mode (of every submodule) and its parameters' requires_grad flags are
    restored and no hook is left, also on error; parameters get no gradient. Works under
    torch.no_grad() and torch.inference_mode() (the optimization itself runs with gradients on).
    """
    _check_images(images)
    target = get_layer(model, layer)  # LayerError naming the valid layers
    check_arguments(alpha=alpha, beta=beta, steps=steps, lr=lr, optimizer=optimizer, patience=patience,
                    max_decays=max_decays, decay=decay, loss_scale=loss_scale, rectify=rectify)

    with gradients():
        x0 = images.detach().clone()  # a normal tensor, also when `images` is an inference tensor
        rectify = follows_relu(model, x0, layer) if rectify is None else rectify
        with eval_mode(model), frozen(model):
            with torch.no_grad():
                maps0 = _run_to(model, x0, layer, target).detach().clone()
            maps0 = maps0.relu() if rectify else maps0
            n, k, h, w = maps0.shape
            rows = torch.arange(n, device=maps0.device)
            unit = _as_unit(unit, n, k, layer, maps0.device)
            others = torch.ones(n, k, dtype=torch.bool, device=maps0.device)
            others[rows, unit] = False
            f_i = maps0[rows, unit]
            denominators = _denominators(maps0, f_i, others, x0, loss_scale)

            def loss_at(x):
                maps = _run_to(model, x, layer, target)
                maps = maps.relu() if rectify else maps
                terms = _loss_terms(maps, f_i, rows, unit, others, x, denominators)
                return terms[0] + alpha * terms[1] + beta * terms[2], terms, maps

            x_hat, steps_done = _optimize(loss_at, x0, steps, lr, optimizer, patience, max_decays, decay)
            with torch.no_grad():
                total, terms, maps_hat = loss_at(x_hat)
    metrics = suppression_metrics(maps_hat.detach(), maps0, unit)
    metrics.update(loss=total.detach(), preservation=terms[0].detach(), suppression=terms[1].detach(),
                   regularization=terms[2].detach(), steps=steps_done)
    return x_hat.to(images.dtype), metrics


def _denominators(maps0: Tensor, f_i: Tensor, others: Tensor, x0: Tensor,
                  loss_scale: str) -> tuple[Tensor, Tensor, Tensor]:
    """The per-image denominators of Lp, Ls, Lr. A kernel silent on an image (F_i = 0) gets a floor
    relative to the whole layer's activation, so that its map is kept (near) silent instead of the
    loss dividing by zero; likewise when every other kernel is silent."""
    h, w = maps0.shape[-2:]
    tiny = torch.finfo(maps0.dtype).tiny
    layer_norm = maps0.flatten(1).norm(dim=1)
    d_p = torch.maximum(f_i.flatten(1).norm(dim=1), 1e-6 * layer_norm).clamp_min(tiny)
    d_s = torch.maximum((maps0.abs().sum(dim=(2, 3)) * others).sum(1),
                        1e-6 * maps0.abs().flatten(1).sum(1)).clamp_min(tiny)
    if loss_scale == "paper":
        d_p, d_s = d_p * (h * w), d_s * (h * w)
        d_r = torch.full_like(d_p, float(x0.shape[-2] * x0.shape[-1]))
    else:
        d_r = x0.abs().flatten(1).sum(1).clamp_min(tiny)
    return d_p, d_s, d_r


def _optimize(loss_at, x0: Tensor, steps: int, lr: float, optimizer: str, patience: int,
              max_decays: int, decay: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Per-image gradient descent (Adam or plain) from x0 with a per-image learning-rate decay on a
    plateau and early stop; returns (the lowest-loss x seen per image, updates made per image)."""
    n = x0.shape[0]
    view = (n,) + (1,) * (x0.dim() - 1)
    dev = x0.device
    x = x0.clone()
    best_x = x0.clone()
    best = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
    reference = best.clone()          # the plateau's reference loss (as ReduceLROnPlateau's `best`)
    bad_steps = torch.zeros(n, dtype=torch.long, device=dev)
    decays = torch.zeros(n, dtype=torch.long, device=dev)
    rate = torch.full((n,), lr, dtype=x0.dtype, device=dev)
    updates = torch.zeros(n, dtype=torch.long, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    m = torch.zeros_like(x0)
    v = torch.zeros_like(x0)
    for step in range(steps + 1):
        x.requires_grad_(True)
        total, _, _ = loss_at(x)
        if not torch.isfinite(total).all():
            bad = (~torch.isfinite(total)).nonzero().flatten()[:5].tolist()
            raise SuppressionError(f"The suppression loss became non-finite for images {bad} at step {step}; "
                                   "lower lr (or use optimizer='adam')")
        grad, = torch.autograd.grad(total.sum(), x)
        x = x.detach()
        with torch.no_grad():
            loss = total.detach().double()
            better = active & (loss < best)
            best = torch.where(better, loss, best)
            best_x[better] = x[better]
            # the plateau: the loss must fall by a relative PLATEAU_THRESHOLD to count
            fell = loss < reference * (1 - PLATEAU_THRESHOLD)
            reference = torch.where(active & fell, loss, reference)
            bad_steps = torch.where(active & ~fell, bad_steps + 1, torch.where(active, 0, bad_steps))
            plateau = active & (bad_steps > patience)
            rate = torch.where(plateau, rate * decay, rate)
            decays = decays + plateau.long()
            bad_steps = torch.where(plateau, 0, bad_steps)
            active = active & (decays < max_decays) & (updates < steps)
            if step == steps or not active.any():
                break
            a = active.view(view).to(x.dtype)
            updates = updates + active.long()
            if optimizer == "adam":
                m = torch.where(active.view(view), betas[0] * m + (1 - betas[0]) * grad, m)
                v = torch.where(active.view(view), betas[1] * v + (1 - betas[1]) * grad * grad, v)
                t = updates.clamp_min(1).to(x.dtype).view(view)
                m_hat = m / (1 - betas[0] ** t)
                v_hat = v / (1 - betas[1] ** t)
                x = x - a * rate.view(view) * m_hat / (v_hat.sqrt() + eps)
            else:
                x = x - a * rate.view(view) * grad
    return best_x, updates
