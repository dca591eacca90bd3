"""Feature visualization by optimization: the image each unit wants to see.

Follows Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017
(doi:10.23915/distill.00007): start from noise and follow the gradient of a unit's activation with
respect to the input image, with the image parameterized so that the optimization does not end in
high-frequency noise, and under small random transformations, so that what survives is what the
unit responds to wherever it appears. The same recipe drives Lucid and its PyTorch port Lucent;
this is an independent implementation sized for small nets (28x28 grayscale, 32x32 colour).

Parameterization (`fourier_image`). Each image is a real spectrum, coefficients `[C, H, W//2+1, 2]`
(real and imaginary parts), scaled by `1 / max(f, 1/max(H, W)) ** decay_power` with f the
frequency in cycles per pixel, and turned into pixels by the inverse real FFT. Adam's steps are about
`lr` per coefficient, so the 1/f scale makes a step change low frequencies more than high ones: the
"decorrelated space" of the article, in which the natural images' 1/f spectrum is flat.
- 3-channel inputs: the three channels are decorrelated colours, mapped to RGB by a square root of
  the colour covariance (`color_sqrt`; by default Lucid's ImageNet matrix, `IMAGENET_COLOR_SQRT`;
  the callback uses its probe images' own statistics).
- 1-channel inputs (and any other channel count): plain Fourier, no mixing.
Then into [0, 1] (`squash`): by default mid-gray plus the value, clamped, with the gradient passed
wherever a step leads back into the range; Lucent's sigmoid (`squash="sigmoid"`) loses the gradient
of a pixel that saturated early on the wrong side for good, which on LeNet's linear conv1 left a
quarter of the image's border wrong and the objective below the best MNIST digit's.
The pixels are in display space ([0, 1]); `pixel_to_input` (the datamodule's normalization) maps them
to the model's input space, so the images are what the net sees from real, displayable pictures.

Transformation robustness (`Transforms`, `transforms_for`). Every step, each image is moved by a
random integer shift, scaled and rotated about its centre, and moved again, with mid-gray (display
space) wherever the moved image does not reach. Lucent's defaults are for 224-px images: a 12-px gray
pad, a jitter of 8 px (a random crop: shifts of up to +-4 px), scaling by 0.9..1.1, rotation by
-10..10 degrees, a jitter of 4 px (+-2). A 28-px image cannot take 12 and 8 px: the sizes in pixels
are scaled by side / 224 and rounded, with at least 1 px of shift each (`transforms_for`): shifts of
+-1 then +-1 px and a 2-px pad at 28 and 32 px, Lucent's own at 224. Scaling and rotation are
relative already (a 10% scale moves a border pixel by 5% of the side at any size) and are kept.
By default (`keep_size=True`) the net sees its own input size (nets whose head needs it, a mean-image
normalization, the neuron objective's centre): the pad then has no size of its own, as every pixel
brought in from outside the image is its gray. `keep_size=False` is Lucent's growing canvas: the
net sees side + 2 pad - (both shifts) pixels.

Objectives, on the layer's output (the module's own output, before any ReLU that follows it):
- "channel": the mean of the unit's map (Lucent's `channel`);
- "neuron": the unit's activation at the map's centre position (row h // 2, column w // 2);
- `diversity` (optional): for several images of the same unit in one batch (repeat the unit in
  `units`), minus `diversity` times the mean pairwise cosine similarity of their Gram matrices over
  the layer's units (Lucid's diversity term: the images differ in style, not only in position);
- `l2` (optional): minus `l2` times the squared distance of the image from mid-gray (display space,
  summed over pixels): a norm constraint in Lagrange form.
Optimizer: Adam, by default at lr 0.005, not Lucent's 0.05: on our 28- and 32-px nets 0.05 makes
the objective oscillate from step to step (on a briefly trained CIFAR net's conv4, 3 units of 8
beat their best validation image after 512 steps at 0.02, all 8 at 0.005; benchmarks/RESULTS.md).

All images of a request are optimized together, one forward pass up to the layer per step; in eval
mode, with Adam's per-coefficient steps and per-image random transforms, each image's result is the
one it would get alone (with the same seed).

The objective returned for each image is measured on the final image as the net receives it (no
random transform), as is the objective at the start.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import VizError, check_int, check_number, eval_mode, forward_until, frozen, gradients
from convlens.viz.layers import LayerError, get_layer

__all__ = ["FeatureVizError", "OBJECTIVES", "SQUASHES", "IMAGENET_COLOR_SQRT", "Transforms", "transforms_for",
           "fourier_scale", "fourier_image", "color_sqrt", "random_coefficients", "transform_images", "unit_objective",
           "FeatureVizResult", "optimize_units", "visualize_units", "measure_units"]

OBJECTIVES = ("channel", "neuron")
#: Lucid's square root of ImageNet's colour covariance (columns: luminance first, then two colour
#: opponent directions), used when no colour statistics are given
IMAGENET_COLOR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
#: Lucid's gain on the inverse FFT: with coefficients drawn at `INIT_STD` the first image is faint
#: noise around mid-gray
FOURIER_GAIN = 0.25
INIT_STD = 0.01
#: mid-gray in display space: the fill of everything the transforms bring in from outside the image
GRAY = 0.5
#: Lucent's pixel sizes are for this side
REFERENCE_SIDE = 224


class FeatureVizError(VizError):
    """Bad arguments to feature visualization (units, image shape, steps, a layer without maps, ...)."""


# --------------------------------------------------------------------------------------------
# Transformation robustness
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transforms:
    """The random transforms of each step (see the module docstring): shifts of up to `jitter` px,
    then scaling by a factor in [1 - scale, 1 + scale] and rotation by up to `angle` degrees about
    the centre, then shifts of up to `jitter2` px; `pad`: the gray margin (only `keep_size=False`
    shows it as a size)."""
    pad: int
    jitter: int
    scale: float
    angle: float
    jitter2: int


def transforms_for(height: int, width: int) -> Transforms:
    """Lucent's transforms sized to an image of this size: its pixel sizes at 224 px (pad 12,
    shifts +-4 and +-2) times side / 224 (the shorter side), rounded, shifts at least 1 px and the
    pad at least both shifts together; its relative ones (scale +-10%, rotation +-10 degrees) kept."""
    side = min(height, width)
    k = side / REFERENCE_SIDE
    jitter, jitter2 = max(1, round(4 * k)), max(1, round(2 * k))
    return Transforms(pad=max(jitter + jitter2, round(12 * k)), jitter=jitter, scale=0.1, angle=10.0,
                      jitter2=jitter2)


def _output_side(n: int, t: Transforms | None, keep_size: bool) -> int:
    if t is None or keep_size:
        return n
    return n + 2 * (t.pad - t.jitter - t.jitter2)


def transform_images(pixels: Tensor, t: Transforms, draws: Tensor, keep_size: bool = True) -> Tensor:
    """`pixels` [N, C, H, W] (display space) under the transforms `t`, one set per image from
    `draws` [N, 6] (uniform in [0, 1): two shifts, scale, angle, two shifts), by one bilinear
    resampling, mid-gray outside the image. The output is H x W (`keep_size`), else Lucent's
    growing canvas, H + 2 (pad - jitter - jitter2) on each axis."""
    n, _, h, w = pixels.shape
    device, dtype = pixels.device, pixels.dtype
    draws = draws.to(device=device, dtype=dtype)

    def shift(u, j):  # an integer in [-j, j], uniformly
        return (u * (2 * j + 1)).floor().clamp(max=2 * j) - j

    t1 = torch.stack([shift(draws[:, 0], t.jitter), shift(draws[:, 1], t.jitter)], 1)        # [N, 2] (x, y)
    t2 = torch.stack([shift(draws[:, 4], t.jitter2), shift(draws[:, 5], t.jitter2)], 1)
    s = 1 + t.scale * (2 * draws[:, 2] - 1)
    theta = math.radians(t.angle) * (2 * draws[:, 3] - 1)
    oh, ow = _output_side(h, t, keep_size), _output_side(w, t, keep_size)
    # output pixel u (centred coordinates, pixels) reads the image at z = A^-1 (u + t2) + t1, with
    # A the scaling and rotation: an image feature at z lands at A (z - t1) - t2
    ys = torch.arange(oh, device=device, dtype=dtype) - (oh - 1) / 2
    xs = torch.arange(ow, device=device, dtype=dtype) - (ow - 1) / 2
    u = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)                                 # [oh, ow, 2]
    v = u[None] + t2[:, None, None, :]                                                          # [N, oh, ow, 2]
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)           # A^-1, [N, 2, 2]
    z = torch.einsum("nij,nhwj->nhwi", inv, v) + t1[:, None, None, :]
    # grid_sample (align_corners=False) reads centred pixel coordinate c of a side of n at 2 c / n
    grid = z / torch.tensor([w / 2, h / 2], device=device, dtype=dtype)
    return F.grid_sample(pixels - GRAY, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + GRAY


# --------------------------------------------------------------------------------------------
# Parameterization
# --------------------------------------------------------------------------------------------

def fourier_scale(height: int, width: int, decay_power: float = 1.0, device=None) -> Tensor:
    """[H, W//2+1]: 1 / max(f, 1 / max(H, W)) ** decay_power, f the frequency of each coefficient of
    a real 2-D FFT in cycles per pixel (the lowest nonzero frequency's weight for the constant)."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    f = torch.sqrt(fx ** 2 + fy ** 2)
    return 1.0 / f.clamp_min(1.0 / max(height, width)) ** decay_power


def color_sqrt(pixels: Tensor | None = None) -> Tensor:
    """[3, 3]: a square root S (S S^T = the colour covariance) of the colours of `pixels` [N, 3, H, W]
    (display space), the symmetric one, scaled so that its largest column has norm 1 (as Lucid
    scales its matrix); None: Lucid's ImageNet matrix, scaled the same way."""
    if pixels is None:
        root = torch.tensor(IMAGENET_COLOR_SQRT, dtype=torch.float64)
    else:
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise FeatureVizError(f"colour statistics need RGB images [N, 3, H, W], got "
                                  f"{list(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__}")
        rows = pixels.detach().double().permute(1, 0, 2, 3).reshape(3, -1)
        rows = rows - rows.mean(1, keepdim=True)
        cov = rows @ rows.T / max(rows.shape[1] - 1, 1)
        values, vectors = torch.linalg.eigh(cov)
        root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    peak = root.norm(dim=0).max()
    if not torch.isfinite(peak) or peak <= 0:  # flat images: no colour statistics, plain RGB
        return torch.eye(3)
    return (root / peak).float()


class _ClipToBox(torch.autograd.Function):
    """x + gray clamped to [0, 1]; the gradient passes inside the box, and outside it only where a
    descent step moves the value back towards the box (a pixel stuck on the wrong side can leave it)."""

    @staticmethod
    def forward(ctx, x):
        y = x + GRAY
        # +1 above the range, -1 below it, 0 inside: all the backward pass needs, in one byte a value
        ctx.save_for_backward((y > 1).to(torch.int8) - (y < 0).to(torch.int8))
        return y.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (side,) = ctx.saved_tensors
        # outside the range, a descent step (-grad) must point back into it: side * grad >= 0
        return grad.masked_fill(side * grad < 0, 0)


SQUASHES = ("clip", "sigmoid")


def fourier_image(coefficients: Tensor, height: int, width: int, decay_power: float = 1.0,
                  color: Tensor | None = None, squash: str = "clip") -> Tensor:
    """Pixels [N, C, H, W] in [0, 1] from coefficients [N, C, H, W//2+1, 2] (see the module
    docstring): the inverse real FFT of the 1/f-scaled spectrum (orthonormal, times sqrt(H W), so a
    coefficient's wave has the same amplitude at every size, times `FOURIER_GAIN`); for C = 3
    mixed by `color` [3, 3] (decorrelated colours to RGB; None: no mixing); then into [0, 1] by
    `squash`: "clip" (mid-gray + x, clamped, with the gradient that leads back into the range) or
    "sigmoid" (Lucent's)."""
    scale = fourier_scale(height, width, decay_power, coefficients.device).to(coefficients.dtype)
    spectrum = torch.view_as_complex(coefficients.contiguous()) * scale
    x = torch.fft.irfft2(spectrum, s=(height, width), norm="ortho") * (math.sqrt(height * width) * FOURIER_GAIN)
    if color is not None:
        x = torch.einsum("ij,njhw->nihw", color.to(x), x)
    return torch.sigmoid(x) if squash == "sigmoid" else _ClipToBox.apply(x)


def random_coefficients(seeds: Sequence[int], channels: int, height: int, width: int) -> Tensor:
    """[N, C, H, W//2+1, 2] start coefficients, normal with std `INIT_STD`, image i from
    `seeds[i]` alone (so a batch starts as its images would alone)."""
    shape = (channels, height, width // 2 + 1, 2)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) * INIT_STD
                        for s in seeds])


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------

def unit_objective(maps: Tensor, units: Tensor, objective: str = "channel") -> Tensor:
    """[N]: image i's objective for unit units[i] on the layer's output `maps` [N, K, h, w]: the mean
    of its map ("channel") or its value at the centre position (h // 2, w // 2) ("neuron")."""
    own = maps[torch.arange(maps.shape[0], device=maps.device), units.to(maps.device)]   # [N, h, w]
    if objective == "channel":
        return own.flatten(1).mean(1)
    h, w = own.shape[-2:]
    return own[:, h // 2, w // 2]


def _gram_diversity(maps: Tensor, units: Tensor) -> Tensor:
    """[N]: each image's mean cosine similarity of its Gram matrix (over the layer's units) to those
    of the other images of the same unit (0 when it is the only one)."""
    flat = maps.flatten(2)                                                   # [N, K, hw]
    gram = torch.einsum("nkp,nlp->nkl", flat, flat).flatten(1)
    gram = F.normalize(gram, dim=1)
    sim = gram @ gram.T                                                      # [N, N]
    same = (units[:, None] == units[None, :]) & ~torch.eye(len(units), dtype=torch.bool, device=units.device)
    same = same.to(sim.device)
    count = same.sum(1).clamp_min(1)
    return (sim * same).sum(1) / count


# --------------------------------------------------------------------------------------------
# The optimization
# --------------------------------------------------------------------------------------------

class FeatureVizResult(NamedTuple):
    #: [N, C, H, W]: the final images in the model's input space (no random transform)
    images: Tensor
    #: [N]: each image's objective on `images`
    objectives: Tensor
    #: [N, C, H, W//2+1, 2]: the final coefficients (a warm start for the next call)
    coefficients: Tensor
    #: [N]: each image's objective on the start image
    start: Tensor
    #: [steps, N]: the objective of each step's transformed images, as optimized
    trace: Tensor
    #: Adam's state at the end, {"step": int, "exp_avg": Tensor, "exp_avg_sq": Tensor} (each [N, C, H,
    #: W//2+1, 2]): with `coefficients`, what the next call needs to go on as one optimization; None
    #: when no step was taken and none was given
    optimizer_state: dict | None = None


def _check_units(units, layer: str, k: int | None) -> Tensor:
    if torch.is_tensor(units):
        if units.dim() != 1 or units.is_floating_point() or units.dtype == torch.bool:
            raise FeatureVizError(f"units must be a list or 1-D integer tensor of unit indices, got {units.dtype} "
                                  f"{list(units.shape)}")
        units = units.tolist()
    if isinstance(units, numbers.Integral) and not isinstance(units, bool):
        units = [int(units)]
    if isinstance(units, (str, bytes)) or not isinstance(units, Sequence) or not len(units) \
            or any(isinstance(u, bool) or not isinstance(u, numbers.Integral) or u < 0 for u in units):
        raise FeatureVizError(f"units must be a non-empty list of unit indices (ints >= 0), got {units!r}")
    if k is not None and max(units) >= k:
        raise FeatureVizError(f"unit {max(units)} is out of range for layer {layer!r}, which has {k} units "
                              f"(0..{k - 1})")
    return torch.tensor([int(u) for u in units], dtype=torch.long)


def _check_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
                                               or s < 1 for s in shape):
        raise FeatureVizError(f"image_shape must be (C, H, W) of the model's input, e.g. (3, 32, 32), "
                              f"got {image_shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _device_dtype(model: nn.Module):
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


def _maps(model: nn.Module, x: Tensor, module: nn.Module, layer: str) -> Tensor:
    out = forward_until(model, x, module, repr(layer))
    if not torch.is_tensor(out) or out.dim() != 4:
        raise LayerError(f"layer {layer!r} outputs {list(out.shape) if torch.is_tensor(out) else type(out).__name__}, "
                         "not maps [N, K, h, w]; feature visualization needs a convolutional layer (or its "
                         "ReLU, pooling, a block)")
    return out


def measure_units(model: nn.Module, images: Tensor, layer: str, units, objective: str = "channel") -> Tensor:
    """[N]: each image's objective for its unit (`unit_objective`), model input space images, eval
    mode, no gradients, the forward pass stopped after the layer (e.g. the objective of real images)."""
    if objective not in OBJECTIVES:
        raise FeatureVizError(f"Unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    module = get_layer(model, layer)
    with torch.no_grad(), eval_mode(model):
        maps = _maps(model, images, module, layer)
        units = _check_units(units, layer, maps.shape[1])
        if len(units) == 1 and len(images) > 1:
            units = units.expand(len(images))
        if len(units) != len(images):
            raise FeatureVizError(f"units has {len(units)} entries for {len(images)} images; give one per image "
                                  "(or one for all)")
        return unit_objective(maps.float(), units, objective)


def _check_optimizer_state(state, init: Tensor | None) -> None:
    if init is None:
        raise FeatureVizError("optimizer_state goes with init (the same previous result's coefficients); pass both "
                              "or neither")
    keys = ("step", "exp_avg", "exp_avg_sq")
    if not isinstance(state, dict) or any(k not in state for k in keys) \
            or isinstance(state["step"], bool) or not isinstance(state["step"], numbers.Integral) \
            or state["step"] < 0 or any(not torch.is_tensor(state[k]) or state[k].shape != init.shape
                                        for k in keys[1:]):
        raise FeatureVizError(f"optimizer_state must be a previous result's optimizer_state ({{'step': int, "
                              f"'exp_avg', 'exp_avg_sq': tensors {list(init.shape)} like init}}), got "
                              f"{type(state).__name__} {sorted(state) if isinstance(state, dict) else ''}")


def optimize_units(model: nn.Module, layer: str, units, image_shape, steps: int = 512, lr: float = 0.005,
                   objective: str = "channel", diversity: float = 0.0, l2: float = 0.0,
                   transforms: Transforms | bool | None = True, keep_size: bool = True,
                   pixel_to_input: Callable[[Tensor], Tensor] | None = None, color: Tensor | str | None = "imagenet",
                   decay_power: float = 1.0, squash: str = "clip", init: Tensor | None = None,
                   optimizer_state: dict | None = None, seed: int | Sequence[int] = 0) -> FeatureVizResult:
    """Optimize one image per entry of `units` (unit indices of `layer`; repeat a unit for several
    images of it) for `steps` Adam steps at `lr`, all in one batch. See the module docstring.

    Args:
        image_shape: (C, H, W) of the model's input.
        objective: "channel" or "neuron". diversity, l2: the optional terms' weights (>= 0).
        transforms: True (`transforms_for` the image size), a `Transforms`, or None/False (none).
        keep_size: the net sees its own input size (False: Lucent's growing canvas).
        pixel_to_input: display-space pixels [N, C, H, W] -> model input (the datamodule's
            normalization); None: the pixels are the input.
        squash: "clip" or "sigmoid" (`fourier_image`).
        color: for C = 3, the colour mixing [3, 3] (`color_sqrt` of some images), "imagenet"
            (Lucid's matrix) or None (no decorrelation); ignored for other channel counts.
        init: start coefficients [N, C, H, W//2+1, 2] (a previous result's `coefficients`: a warm
            start); None: random (`random_coefficients`).
        optimizer_state: with `init`, the same result's `optimizer_state`: Adam goes on with its
            moments and step count, so that calls of k and then m steps make one optimization of
            k + m steps (on an unchanged model and without transforms, the same one); None: a fresh
            Adam, whose first steps are about `lr` on every coefficient whatever its gradient (with
            m = g and v = g^2 at step 1, the step is lr * sign(g)): restarted every few steps, that
            is a kick of noise each time (benchmarks/RESULTS.md, feature visualization).
        seed: an int (image i uses seed + i) or one seed per image, for the start coefficients and the
            transforms: the same seeds give the same images on the CPU.
    Modes, requires_grad flags and hooks are restored, also when the model raises.
    """
    if objective not in OBJECTIVES:
        raise FeatureVizError(f"Unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if squash not in SQUASHES:
        raise FeatureVizError(f"Unknown squash {squash!r}; use one of {', '.join(SQUASHES)}")
    steps = check_int("steps", steps, 0, FeatureVizError, " (optimization steps)")
    lr = check_number("lr", lr, 0, True, FeatureVizError, " (Adam's learning rate)")
    diversity = check_number("diversity", diversity, 0, False, FeatureVizError)
    l2 = check_number("l2", l2, 0, False, FeatureVizError)
    decay_power = check_number("decay_power", decay_power, 0, False, FeatureVizError)
    c, h, w = _check_shape(image_shape)
    module = get_layer(model, layer)
    k = getattr(module, "out_channels", None)
    units = _check_units(units, layer, k if isinstance(k, int) else None)
    n = len(units)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(n)]
    elif isinstance(seed, Sequence) and len(seed) == n and all(isinstance(s, numbers.Integral) for s in seed):
        seeds = [int(s) for s in seed]
    else:
        raise FeatureVizError(f"seed must be an int or one int per unit ({n}), got {seed!r}")
    if transforms is True:
        transforms = transforms_for(h, w)
    elif transforms is False:
        transforms = None
    if transforms is not None and not isinstance(transforms, Transforms):
        raise FeatureVizError(f"transforms must be True (sized to the image), False/None or a Transforms, "
                              f"got {transforms!r}")
    if isinstance(color, str):
        if color != "imagenet":
            raise FeatureVizError(f"color must be a [3, 3] matrix, 'imagenet' or None, got {color!r}")
        color = color_sqrt(None)
    if color is not None and c == 3 and (not torch.is_tensor(color) or color.shape != (3, 3)):
        raise FeatureVizError(f"color must be a [3, 3] colour matrix (color_sqrt), got {color!r}")
    color = color if c == 3 else None
    if init is not None:
        want = (n, c, h, w // 2 + 1, 2)
        if not torch.is_tensor(init) or tuple(init.shape) != want or not init.is_floating_point():
            raise FeatureVizError(f"init must be coefficients {list(want)} (a previous result's coefficients for "
                                  f"the same units and image shape), got "
                                  f"{list(init.shape) if torch.is_tensor(init) else type(init).__name__}")
    if optimizer_state is not None:
        _check_optimizer_state(optimizer_state, init)

    device, dtype = _device_dtype(model)
    to_input = pixel_to_input if pixel_to_input is not None else (lambda p: p)
    coefficients = (init.detach().clone() if init is not None else random_coefficients(seeds, c, h, w))
    coefficients = coefficients.to(device=device, dtype=torch.float32).requires_grad_(True)
    generators = [torch.Generator().manual_seed(s + 1) for s in seeds]  # transforms: not the start's stream
    units_dev = units.to(device)

    def render() -> Tensor:
        return fourier_image(coefficients, h, w, decay_power, color, squash)

    def measure(pixels: Tensor) -> Tensor:
        with torch.no_grad():
            maps = _maps(model, to_input(pixels).to(dtype), module, layer)
            return unit_objective(maps.float(), units_dev, objective)

    trace = torch.zeros(steps, n)
    with gradients(model), frozen(model):
        start = measure(render()).cpu()
        optimizer = torch.optim.Adam([coefficients], lr=lr)
        if optimizer_state is not None:  # the fresh optimizer's own settings (lr, betas), the given moments
            saved = optimizer.state_dict()
            saved["state"] = {0: {"step": torch.tensor(float(optimizer_state["step"])),
                                  "exp_avg": optimizer_state["exp_avg"].detach().clone(),
                                  "exp_avg_sq": optimizer_state["exp_avg_sq"].detach().clone()}}
            optimizer.load_state_dict(saved)
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            pixels = render()
            seen = pixels
            if transforms is not None:
                draws = torch.stack([torch.rand(6, generator=g) for g in generators])
                seen = transform_images(pixels, transforms, draws, keep_size)
            try:
                x = to_input(seen)
            except RuntimeError as e:
                raise FeatureVizError(f"keep_size=False shows the net a larger canvas, which pixel_to_input cannot "
                                      f"map ({e}); use keep_size=True with this normalization") from None
            maps = _maps(model, x.to(dtype), module, layer).float()
            value = unit_objective(maps, units_dev, objective)
            loss = -value.sum()
            if diversity:
                loss = loss + diversity * _gram_diversity(maps, units_dev).sum()
            if l2:
                loss = loss + l2 * ((pixels - GRAY) ** 2).sum()
            loss.backward()
            optimizer.step()
            trace[step] = value.detach().cpu()
        with torch.no_grad():
            pixels = render()
            images = to_input(pixels).detach()
        objectives = measure(pixels).cpu()
    state = optimizer.state.get(coefficients)
    state = {"step": int(state["step"]), "exp_avg": state["exp_avg"].detach().clone(),
             "exp_avg_sq": state["exp_avg_sq"].detach().clone()} if state else None
    return FeatureVizResult(images, objectives, coefficients.detach(), start, trace, state)


def visualize_units(model: nn.Module, layer: str, units, image_shape, steps: int = 512, **options
                    ) -> tuple[Tensor, Tensor]:
    """(images [len(units), C, H, W] in the model's input space, objectives [len(units)]): each unit's
    feature visualization (`optimize_units`, which documents the options)."""
    result = optimize_units(model, layer, units, image_shape, steps=steps, **options)
    return result.images, result.objectives
