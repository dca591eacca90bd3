"""Deconvnet projection of one feature map back to pixel space, on any network.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014,
arXiv:1311.2901), as Berthier & Mantoux, "Visualizing and Understanding Convolutional Neural
Networks" (RecVis 2018 report), section 2 apply it ("Deconvolutional networks for convnet feature
visualization"): 2.1 builds the deconvnet layer by layer along the convnet, 2.2 projects a feature
map by feeding the layer's output back "except that all the feature maps but the one of interest
are set to zero". Its three rules are local, so they hold on any graph of operations: the
projection of map c of a layer is the backward pass of ``sum(F_c * F_c.detach())`` (the map's own
activations sent back, every other map zero), with

- every ReLU's backward replaced by a ReLU of the backward signal ("we just need to pass the data
  through a reLu again"; the forward's mask is ignored);
- max pooling undone by its switches (each value back at the position of the maximum recorded on
  the forward pass; overlapping windows add up), or, with ``unpool="fill"``, by the cheaper variant
  of Frans, "Visualizing Features from a Convolutional Neural Network" (blog post, 2016), which
  "set[s] the whole 2x2 square equal to the maximum activation";
- convolutions undone by transposed convolutions with the same weights, biases ignored (the report
  keeps them; the projection of Zeiler & Fergus, and our autograd oracle, do not).

What autograd does everywhere else is exactly the deconvnet's reading of those operations: a
residual sum copies the signal to both branches, a concatenation splits it, average and adaptive
pooling spread it over their windows, a BatchNorm in eval mode multiplies it by its scale
``weight / sqrt(running_var + eps)`` (its mean and ``bias`` are biases, ignored; without running
statistics, the batch's own are taken as constants likewise, by the mode below), Dropout and
stochastic depth in eval mode pass it unchanged, depthwise and grouped convolutions are transposed
group by group. Non-ReLU nonlinearities (GELU, SiLU, Hardswish, Hardsigmoid, ReLU6, LeakyReLU, ...)
and LayerNorm get their ordinary gradient, as Captum's `Deconvolution` does (it rewrites only
`nn.ReLU` modules); so does a multiplicative gate such as squeeze-excitation.

How: the forward pass runs once under a `torch.overrides.TorchFunctionMode` that swaps every ReLU
(`nn.ReLU` modules, reused ones included, and functional `F.relu`/`torch.relu`/`Tensor.relu`, in
place or not), every 2-d max pool (`nn.MaxPool2d`, `nn.AdaptiveMaxPool2d`, `F.max_pool2d`, ...) and
every 2-d convolution for an autograd Function whose backward is the rule above; how the pools
unpool and in which dtype the transposed convolutions run are read when projecting, so one
recording serves every choice. Forward hooks keep each requested layer's output (the rest of the
net continues on a copy, so no later in-place operation touches it) and stop the forward once every
layer has run. Parameters are frozen for the pass (no weight gradient is ever computed). A
projection then is `torch.autograd.grad` from the layer, batched over the images (one backward per
rank of map, every image at once); the first step, the layer's own transposed convolution, is done
by hand from the one map (a grouped transposed convolution: 1/K of the dense one). Every hook is
removed and every mode and flag restored in `finally`; projections also run inside
``torch.no_grad()`` and ``torch.inference_mode()``.

Reduced precision (``dtype=torch.bfloat16``): the transposed convolutions, where the cost is, run in
that dtype; everything else, the forward pass, the switches and the ranking of maps stay as
recorded. `fast_dtype` says where the hardware runs it natively.

One implementation: a hand-written reverse pass for plain chains of modules used to sit beside this
one; it was no faster in float32 and was removed (benchmarks/RESULTS.md, section 2).

Conventions: images are ``[N, C, H, W]``; a layer is a dotted name from ``model.named_modules()``
and its feature maps are that module's output ``[N, K, h, w]``: map ``c`` of an image is unit ``c``'s.
The result equals the autograd oracle with the deconvnet's ReLU rule (tests/test_deconvnet.py) and
Captum's `NeuronDeconvolution` with the activation-weighted selector on ResNet and DenseNet.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from convlens.viz.common import (LayerError, VizError, adaptive_window_matrix, check_units, check_images, frozen,
                                 gradients, window_matrix)
from convlens.viz.layers import get_layer

__all__ = [
    "DeconvnetError", "Recording", "record", "record_layers", "project", "project_many", "top_units",
    "max_activating_images", "fast_dtype", "layer_problems", "DECONV_UNPOOL_MODES", "PATHS",
]

#: "switches": each value back where the forward maximum was (Zeiler & Fergus); "fill": over the
#: whole pooling window (Frans's blog)
DECONV_UNPOOL_MODES = ("switches", "fill")
#: accepted by `path=` so existing calls keep working; both take the one implementation
PATHS = ("auto", "general")


class DeconvnetError(VizError):
    """Bad arguments (unit, k, unpool mode, dtype, images) for a deconvnet projection."""


# --------------------------------------------------------------------------------------------
# The deconvnet's rules as autograd Functions
# --------------------------------------------------------------------------------------------

class _Rules:
    """How the backward of a recorded graph runs, read by the rules' backward when projecting."""

    def __init__(self):
        self.unpool = "switches"
        self.dtype: torch.dtype | None = None  # the transposed convolutions'; None: the signal's own


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward: a ReLU of the incoming signal (Zeiler & Fergus's rectification)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


class _DeconvReLUInplace(torch.autograd.Function):
    """The same, in place (an `nn.ReLU(inplace=True)` keeps writing to its input)."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.clamp_min_(0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


def _unpool_switches(grad: Tensor, index: Tensor, in_hw: tuple[int, int]) -> Tensor:
    """Each value back at its switch (scatter_add: with overlapping windows a position can be the
    maximum of several)."""
    lead = grad.shape[:-2]
    out = grad.new_zeros(*lead, in_hw[0] * in_hw[1])
    out.scatter_add_(-1, index.flatten(-2), grad.flatten(-2))
    return out.view(*lead, *in_hw)


def _fill(grad: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """rows.T @ g @ cols: each value spread over its whole window."""
    return torch.matmul(torch.matmul(rows.t().to(grad.dtype), grad), cols.to(grad.dtype))


class _MaxPool(torch.autograd.Function):
    """F.max_pool2d forward; backward by switches or fill, as `rules.unpool` says then."""

    @staticmethod
    def forward(ctx, x, rules, kernel, stride, padding, dilation, ceil_mode):
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.save_for_backward(index)
        ctx.rules, ctx.in_hw = rules, tuple(x.shape[-2:])
        ctx.window = (_pair(kernel), _pair(stride if stride not in (None, []) else kernel), _pair(padding),
                      _pair(dilation))
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.rules.unpool == "fill":
            k, s, p, d = ctx.window
            out_hw = grad.shape[-2:]
            rows, cols = (window_matrix(ctx.in_hw[a], out_hw[a], k[a], s[a], p[a], d[a], device=grad.device,
                                        dtype=grad.dtype) for a in range(2))
            g = _fill(grad, rows, cols)
        else:
            g = _unpool_switches(grad, index, ctx.in_hw)
        return g, None, None, None, None, None, None


class _AdaptiveMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rules, output_size):
        out, index = F.adaptive_max_pool2d(x, output_size, return_indices=True)
        ctx.save_for_backward(index)
        ctx.rules, ctx.in_hw = rules, tuple(x.shape[-2:])
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.rules.unpool == "fill":
            out_hw = grad.shape[-2:]
            rows, cols = (adaptive_window_matrix(ctx.in_hw[a], out_hw[a], device=grad.device, dtype=grad.dtype)
                          for a in range(2))
            g = _fill(grad, rows, cols)
        else:
            g = _unpool_switches(grad, index, ctx.in_hw)
        return g, None, None


class _Conv(torch.autograd.Function):
    """F.conv2d forward; backward: the transposed convolution with the same weights, no bias, in
    `rules.dtype` when set (autograd casts the result back to the input's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, rules):
        ctx.save_for_backward(weight)
        ctx.rules, ctx.in_shape, ctx.args = rules, x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dtype = ctx.rules.dtype or grad.dtype
        g = torch.nn.grad.conv2d_input(ctx.in_shape, weight.to(dtype), grad.to(dtype), *ctx.args)
        return g, None, None, None, None, None, None, None


_RELUS = (F.relu, torch.relu, torch.Tensor.relu)
_RELUS_INPLACE = (torch.relu_, torch.Tensor.relu_)          # F.relu_ is torch.relu_
_MAX_POOLS = (F.max_pool2d, torch.max_pool2d) + ((F._max_pool2d,) if hasattr(F, "_max_pool2d") else ())
_ADAPTIVE_MAX_POOLS = (F.adaptive_max_pool2d,) + (
    (F._adaptive_max_pool2d,) if hasattr(F, "_adaptive_max_pool2d") else ())
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _int_padding(padding, weight: Tensor, dilation) -> tuple[int, int] | None:
    """A conv's padding as (rows, cols), or None where it is not the same on both sides of an axis
    ('same' with an even reach): such a conv keeps its ordinary gradient."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        reach = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[-2:])]
        return None if any(r % 2 for r in reach) else (reach[0] // 2, reach[1] // 2)
    return _pair(padding)


class _DeconvnetMode(TorchFunctionMode):
    """While active, ReLUs, 2-d max pools and 2-d convolutions run as the deconvnet's autograd
    Functions (see the module docstring); everything else runs unchanged."""

    def __init__(self, rules: _Rules):
        super().__init__()
        self.rules = rules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            x = args[0] if args else kwargs["input"]
            inplace = func is F.relu and bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            if torch.is_tensor(x) and x.is_floating_point():
                return (_DeconvReLUInplace if inplace else _DeconvReLU).apply(x)
        elif func in _RELUS_INPLACE:
            if torch.is_tensor(args[0]) and args[0].is_floating_point():
                return _DeconvReLUInplace.apply(args[0])
        elif func in _MAX_POOLS:
            a = _bind(_POOL_ARGS, args, kwargs)
            x = a["input"]
            if not a.get("return_indices", False) and torch.is_tensor(x) and x.dim() in (3, 4) \
                    and x.is_floating_point():
                stride = a.get("stride")
                return _MaxPool.apply(x, self.rules, a["kernel_size"],
                                      a["kernel_size"] if stride in (None, []) else stride, a.get("padding", 0),
                                      a.get("dilation", 1), bool(a.get("ceil_mode", False)))
        elif func in _ADAPTIVE_MAX_POOLS:
            a = _bind(("input", "output_size", "return_indices"), args, kwargs)
            x = a["input"]
            if not a.get("return_indices", False) and torch.is_tensor(x) and x.dim() in (3, 4) \
                    and x.is_floating_point():
                return _AdaptiveMaxPool.apply(x, self.rules, a["output_size"])
        elif func is F.conv2d:
            a = _bind(_CONV_ARGS, args, kwargs)
            x, w, b = a["input"], a["weight"], a.get("bias")
            dilation = a.get("dilation", 1)
            padding = _int_padding(a.get("padding", 0), w, dilation) if torch.is_tensor(w) else None
            # a weight or bias that depends on the input (a dynamic filter) needs its ordinary gradient
            if padding is not None and torch.is_tensor(x) and x.is_floating_point() and not w.requires_grad \
                    and not (torch.is_tensor(b) and b.requires_grad):
                return _Conv.apply(x, w, b, _pair(a.get("stride", 1)), padding, _pair(dilation),
                                   a.get("groups", 1), self.rules)
        elif func is F.batch_norm:
            a = _bind(_BATCH_NORM_ARGS, args, kwargs)
            x = a["input"]
            if a.get("training", False) and torch.is_tensor(x) and x.dim() > 2:
                # no running statistics (eval mode normalizes by the batch's own): the statistics are
                # constants, as a bias is, so the signal is only scaled
                dims = [0, *range(2, x.dim())]
                mean, var = x.detach().mean(dims), x.detach().var(dims, unbiased=False)
                return F.batch_norm(x, mean, var, a.get("weight"), a.get("bias"), False, 0.0, a.get("eps", 1e-5))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@dataclass(eq=False)
class _Captured:
    module: nn.Module
    #: the layer's output, in the graph; nothing writes to it (the net continues on a copy)
    output: Tensor
    #: a Conv2d layer's input, a copy only the conv read: the reverse starts there, by hand
    input: Tensor | None


@dataclass(eq=False)
class _Graph:
    """One forward pass of `images` under `_DeconvnetMode`, kept for projections: the input leaf
    `x`, each recorded layer's output (and a conv layer's input), and the modules that ran up to
    there (`ran`, by name, in order). It holds the autograd graph, so it refers to the model's
    parameters: project before they change."""
    model: nn.Module
    images: Tensor
    x: Tensor
    layers: dict[str, _Captured]
    rules: _Rules
    ran: list[str]


def _not_spatial(layer: str, out, spatial: list[str]) -> LayerError:
    shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
    return LayerError(
        f"Layer {layer!r} has no spatial feature maps (its output is {shape}, not feature maps [N, K, h, w]); "
        f"a deconvnet projects the maps of a layer with spatial output (a Conv2d, its ReLU, a pool) before any "
        f"Flatten/Linear. Layers with spatial maps: {', '.join(spatial) if spatial else '(none before this layer)'}")


def _record_graph(model: nn.Module, images: Tensor, layers: Sequence[str]) -> _Graph:
    """Run `images` through `model` (eval mode, parameters frozen, gradients on also under
    no_grad/inference_mode) under `_DeconvnetMode`, up to the last of `layers` to run, keeping each
    layer's output (its first run). A LayerError for a layer that is unknown, that does not run or
    whose output is not [N, K, h, w] maps. Hooks, modes and flags are restored, also on error."""
    modules = {layer: get_layer(model, layer) for layer in layers}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    ran: dict[str, None] = {}          # every submodule that started, in order (an ordered set)
    spatial: dict[str, None] = {}      # leaves with [N, K, h, w] output, up to the first without
    flat: list[str] = []

    def pre_hook(layer):
        def hook(module, args):
            if layer in outputs or layer in inputs or not isinstance(module, nn.Conv2d):
                return None
            if args and torch.is_tensor(args[0]):
                inputs[layer] = args[0].clone()  # only the conv reads this copy
                return (inputs[layer],) + tuple(args[1:])
            return None
        return hook

    def post_hook(layer):
        def hook(module, args, out):
            if layer in outputs:
                return None
            if not torch.is_tensor(out) or out.dim() != 4:
                raise _not_spatial(layer, out, list(spatial))
            outputs[layer] = out
            if len(outputs) == len(modules):
                raise _Stop
            return out.clone()  # the rest of the net works on a copy: no in-place op reaches `out`
        return hook

    def note_start(name):
        def hook(module, args):
            ran.setdefault(name)
        return hook

    def note_shape(name):
        def hook(module, args, out):
            if flat:
                return
            if torch.is_tensor(out) and out.dim() == 4:
                spatial.setdefault(name)
            else:
                flat.append(name)
        return hook

    rules = _Rules()
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(note_start(name)))
                if not list(module.children()):
                    handles.append(module.register_forward_hook(note_shape(name)))
        for layer, module in modules.items():
            handles.append(module.register_forward_pre_hook(pre_hook(layer)))
            handles.append(module.register_forward_hook(post_hook(layer)))
        with gradients(model), frozen(model):
            x = images.detach().clone().requires_grad_(True)
            with _DeconvnetMode(rules):
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [layer for layer in layers if layer not in outputs]
    if missing:
        raise LayerError(f"Layer(s) {', '.join(map(repr, missing))} were not run by the model's forward pass")
    captured = {layer: _Captured(modules[layer], outputs[layer], inputs.get(layer)) for layer in layers}
    return _Graph(model, images.detach(), x, captured, rules, list(ran))


# --------------------------------------------------------------------------------------------
# Projecting
# --------------------------------------------------------------------------------------------

def _conv_pads(m: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) zero/reflect/... padding of rows and columns, as Conv2d.forward pads."""
    k, d = m.kernel_size, m.dilation
    if m.padding == "same":
        totals = [d[a] * (k[a] - 1) for a in range(2)]
        return tuple((t // 2, t - t // 2) for t in totals)  # PyTorch puts the odd pixel after
    p = (0, 0) if m.padding == "valid" else _pair(m.padding)
    return (p[0], p[0]), (p[1], p[1])


def _densify(g: Tensor, channel: Tensor, channels: int) -> Tensor:
    dense = g.new_zeros(g.shape[0], channels, *g.shape[-2:])
    dense[torch.arange(g.shape[0], device=g.device), channel] = g[:, 0]
    return dense


def _reverse_conv(m: nn.Conv2d, in_hw: tuple[int, int], g: Tensor, channel: Tensor) -> Tensor:
    """The transposed convolution of `m` (its weights, no bias) of one map per sample, `g`
    [M, 1, h, w] being map `channel[i]` of sample i, back onto the unpadded input [M, C, H, W]."""
    w = m.weight.detach().to(g.dtype)
    n = g.shape[0]
    if m.groups == 1:
        # a grouped transposed conv with each sample's own filter costs 1/K of the dense one
        # (channels_last: PyTorch's CPU kernel for this is much faster)
        g = g.reshape(1, n, *g.shape[-2:]).contiguous(memory_format=torch.channels_last)
        w, groups = w[channel], n
    else:
        g, groups = _densify(g, channel, m.out_channels), m.groups

    def conv_t(padding, output_padding):
        out = F.conv_transpose2d(g, w, None, m.stride, padding, output_padding, groups, m.dilation)
        return out.reshape(n, -1, *out.shape[-2:])

    (top, bottom), (left, right) = _conv_pads(m)
    h, wd = in_hw
    if m.padding_mode == "zeros" and top == bottom and left == right:
        # the usual case: conv_transpose2d drops the padding itself; output_padding restores the
        # last rows/cols that no window reached (always fewer than the stride)
        out_pad = [size - ((o - 1) * st - 2 * p + dl * (k - 1) + 1) for size, o, st, p, dl, k in
                   zip((h, wd), g.shape[-2:], m.stride, (top, left), m.dilation, m.kernel_size)]
        if all(0 <= op < max(st, dl) for op, st, dl in zip(out_pad, m.stride, m.dilation)):
            return conv_t((top, left), out_pad)
    full = conv_t(0, 0)
    # rows/cols at the end that no window reached get no signal: pad `full` to the padded input size
    full = F.pad(full, (0, wd + left + right - full.shape[-1], 0, h + top + bottom - full.shape[-2]))
    if m.padding_mode == "zeros":
        return full[..., top:top + h, left:left + wd]
    # reflect/replicate/circular padding copies input pixels: send each padded pixel's signal back
    # to the pixel it was copied from (F.pad applied to a map of pixel indices says which)
    index = torch.arange(h * wd, device=g.device, dtype=torch.float64).reshape(1, 1, h, wd)
    index = F.pad(index, (left, right, top, bottom), mode=m.padding_mode).long().flatten()
    out = torch.zeros(*full.shape[:2], h * wd, device=g.device, dtype=g.dtype)
    out.scatter_add_(2, index.expand(*full.shape[:2], -1), full.flatten(2))
    return out.reshape(*full.shape[:2], h, wd)


def _round(graph: _Graph, layer: str, sample: Tensor, channel: Tensor, unpool: str,
           dtype: torch.dtype | None) -> Tensor:
    """One backward pass: the projections of map `channel[i]` of image `sample[i]` (each image at
    most once), [M, C, H, W]."""
    cap = graph.layers[layer]
    maps = cap.output.detach()
    signal = maps[sample, channel].unsqueeze(1)                      # [M, 1, h, w]
    if cap.input is not None:
        # the layer's own transposed convolution, from the one map (1/K of the dense one)
        seed = cap.input.new_zeros(cap.input.shape)
        seed[sample] = _reverse_conv(cap.module, tuple(cap.input.shape[-2:]), signal.to(dtype or signal.dtype),
                                     channel).to(seed.dtype)
        start = cap.input
    else:
        seed = torch.zeros_like(maps)
        seed[sample, channel] = signal[:, 0]
        start = cap.output
    if not start.requires_grad:  # the layer does not depend on the images
        return graph.x.new_zeros(len(sample), *graph.x.shape[1:])
    previous = graph.rules.unpool, graph.rules.dtype
    graph.rules.unpool, graph.rules.dtype = unpool, dtype
    try:
        with torch.inference_mode(False), torch.enable_grad():
            (grad,) = torch.autograd.grad(start, graph.x, seed, retain_graph=True, allow_unused=True)
    finally:
        graph.rules.unpool, graph.rules.dtype = previous
    if grad is None:
        return graph.x.new_zeros(len(sample), *graph.x.shape[1:])
    return grad[sample]


def _reverse_pairs(graph: _Graph, layer: str, sample: Tensor, channel: Tensor, unpool: str,
                   dtype: torch.dtype | None, max_batch: int | None) -> Tensor:
    """[M, C, H, W]: the projection of map `channel[i]` of recorded image `sample[i]`, for M pairs.

    Pairs are sent back in rounds, each image at most once a round, every image of the recording
    in each backward pass (r rounds for an image that appears r times: `project_many`'s k maps per
    image are k rounds). When one image appears in many pairs and the recording holds many
    images (a map's most activating image of a validation batch), re-recording just the pairs'
    images as a pseudo-batch is cheaper: then one forward and one backward over the M pairs
    (`max_batch` caps that pseudo-batch)."""
    m = sample.numel()
    n = graph.x.shape[0]
    out = graph.x.new_zeros(m, *graph.x.shape[1:])
    if m == 0:
        return out
    counts = torch.bincount(sample, minlength=n)
    rounds = int(counts.max())
    if rounds * n > 2 * m:  # cheaper: a fresh forward over just these images
        chunk = max_batch or m
        for start in range(0, m, chunk):
            part = slice(start, start + chunk)
            sub = _record_graph(graph.model, graph.images[sample[part]], [layer])
            out[part] = _round(sub, layer, torch.arange(sub.x.shape[0], device=sample.device), channel[part],
                               unpool, dtype)
        return out
    # occurrence number of each pair among the pairs of its image: its round
    order = torch.argsort(sample, stable=True)
    sorted_samples = sample[order]
    first = torch.searchsorted(sorted_samples, sorted_samples, right=False)
    occurrence = torch.empty_like(sample)
    occurrence[order] = torch.arange(m, device=sample.device) - first
    for r in range(rounds):
        which = (occurrence == r).nonzero().flatten()
        out[which] = _round(graph, layer, sample[which], channel[which], unpool, dtype)
    return out


# --------------------------------------------------------------------------------------------
# The recording and its uses
# --------------------------------------------------------------------------------------------

def _check_path(path) -> None:
    if path not in PATHS:
        raise DeconvnetError(f"Unknown path={path!r}: the deconvnet has one implementation, for any network "
                             "(the chain path was merged into it); pass path='auto' or leave it out")


def _check_options(unpool, max_batch, dtype=None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DeconvnetError(f"dtype must be a floating point torch.dtype (e.g. torch.bfloat16) or None, "
                             f"got {dtype!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise DeconvnetError(f"max_batch must be a positive int or None (one pass), got {max_batch!r}")
    if unpool not in DECONV_UNPOOL_MODES:
        raise DeconvnetError(
            f"Unknown unpool={unpool!r}: use 'switches' (put each value back where the forward max "
            "was, Zeiler & Fergus) or 'fill' (fill the whole pooling window with it, the blog's variant)")


def _as_units(units, n: int, num_units: int, layer: str, matrix: bool) -> Tensor:
    return check_units(units, n, num_units, layer, DeconvnetError, matrix=matrix)


@dataclass(frozen=True, eq=False)
class Recording:
    """The forward pass of a batch up to `layer`, ready to rank and project its feature maps.

    `maps` is the layer's output [N, K, h, w] (eval mode). Made by `record(model, images, layer)`
    or `record_layers`. It holds the forward's autograd graph, which refers to the model's
    parameters rather than copying them: project before they change.
    """
    layer: str
    maps: Tensor = field(repr=False)
    image_shape: tuple[int, ...]
    _graph: _Graph = field(repr=False)

    @property
    def num_units(self) -> int:
        """The layer's unit count K (each image has one map per unit)."""
        return self.maps.shape[1]

    #: the earlier name of `num_units`
    num_maps = num_units

    def at(self, layer: str) -> "Recording":
        """The recording at another layer: one recorded in the same pass as it is, else one that ran
        before this recording's layer (one more forward of the same images, stopped there)."""
        graph = self._graph
        if layer in graph.layers:
            return Recording(layer, graph.layers[layer].output.detach(), self.image_shape, graph)
        if layer not in graph.ran:
            raise LayerError(f"Layer {layer!r} is not in this recording (up to {self.layer!r}). "
                             f"Recorded layers: {', '.join(graph.ran)}")
        return record(graph.model, graph.images, layer)

    def map_maxima(self) -> Tensor:
        """[N, K]: each map's maximum activation, the score by which maps are ranked."""
        return self.maps.amax(dim=(2, 3))

    def top_units(self, k: int) -> tuple[Tensor, Tensor]:
        """(values [N, k], indices [N, k]): each image's k units whose maps have the highest maximum
        activation, best first."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= self.num_units:
            raise DeconvnetError(f"k must be an int in 1..{self.num_units} (layer {self.layer!r} has "
                                 f"{self.num_units} units), got {k!r}")
        return self.map_maxima().topk(int(k), dim=1)

    #: the earlier name of `top_units`
    top_maps = top_units

    def max_activating_images(self) -> tuple[Tensor, Tensor]:
        """(values [K], image_index [K]): for each unit, the highest maximum activation of its maps
        over the batch and the image it comes from."""
        return self.map_maxima().max(dim=0)

    def project(self, unit: int | Tensor, unpool: str = "switches", max_batch: int | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        """[N, C, H, W] like the images: for each image, the projection of its map of `unit` (an int
        for all images, or an integer tensor [N], one unit per image). See `project_many`."""
        unit = _as_units(unit, self.maps.shape[0], self.num_units, self.layer, matrix=False)
        return self.project_many(unit[:, None], unpool, max_batch, dtype)[:, 0]

    def project_many(self, units: Tensor, unpool: str = "switches", max_batch: int | None = None,
                     dtype: torch.dtype | None = None) -> Tensor:
        """[N, k, C, H, W]: the projection of image n's map of unit `units[n, j]`, for all n, j: k
        backward passes, each over the N recorded images.

        `max_batch` caps the pseudo-batch where pairs are re-recorded (`project_pairs`). `dtype`
        (e.g. `torch.bfloat16`): run the transposed convolutions of the reverse pass in that
        precision (the forward pass, switches and ranking stay as recorded); the result is returned
        in the maps' dtype. See `fast_dtype` for where the hardware has it natively.
        """
        _check_options(unpool, max_batch, dtype)
        n = self.maps.shape[0]
        units = _as_units(units, n, self.num_units, self.layer, matrix=True).to(self.maps.device)
        k = units.shape[1]
        samples = torch.arange(n, device=self.maps.device).repeat_interleave(k)
        out = self._reverse(samples, units.reshape(-1), unpool, dtype, max_batch)
        return out.reshape(n, k, *out.shape[1:])

    def project_pairs(self, images: Tensor, units: Tensor, unpool: str = "switches",
                      max_batch: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """[M, C, H, W]: the projection of recorded image `images[i]`'s map of unit `units[i]`, for M
        (image index, unit) pairs given as two integer tensors [M], e.g. each unit's most activating
        image of the batch (`max_activating_images`). When one image is in many pairs, just the
        pairs' images are recorded again as one pseudo-batch (of at most `max_batch`)."""
        _check_options(unpool, max_batch, dtype)
        n = self.maps.shape[0]
        if not torch.is_tensor(images) or images.dim() != 1 or images.is_floating_point() \
                or images.dtype == torch.bool:
            raise DeconvnetError(f"images must be an integer tensor [M] of recorded image indices, got "
                                 f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if images.numel() and (images.min() < 0 or images.max() >= n):
            raise DeconvnetError(f"image index out of range: the recording holds {n} images (0..{n - 1})")
        units = _as_units(units, images.numel(), self.num_units, self.layer, matrix=False)
        device = self.maps.device
        return self._reverse(images.long().to(device), units.to(device), unpool, dtype, max_batch)

    def _reverse(self, sample: Tensor, channel: Tensor, unpool: str, dtype: torch.dtype | None = None,
                 max_batch: int | None = None) -> Tensor:
        """The deconvnet pass for the (image `sample[i]`, map `channel[i]`) pairs, detached."""
        if sample.numel() == 0:
            return self.maps.new_zeros((0, *self.image_shape[1:]))
        return _reverse_pairs(self._graph, self.layer, sample, channel, unpool, dtype, max_batch).detach()


def record(model: nn.Module, images: Tensor, layer: str, path: str = "auto") -> Recording:
    """Run `images` through `model` (in eval mode) up to `layer` and keep what the deconvnet needs:
    the layer's feature maps and the forward's graph (with the pooling switches).

    One recording serves ranking (`top_units`, `max_activating_images`) and any number of
    projections (`project`, `project_many`, `project_pairs`). Mode, hooks and `requires_grad` flags
    of `model` are left as they were. A module that runs several times (a shared ReLU) is taken at
    its first run. `path`: see `PATHS`.
    """
    return record_layers(model, images, [layer], path)[layer]


def record_layers(model: nn.Module, images: Tensor, layers, path: str = "auto") -> dict[str, Recording]:
    """One `Recording` per layer, all from one forward pass (stopped once every layer has run)."""
    check_images(images, DeconvnetError)
    _check_path(path)
    layers = list(dict.fromkeys(layers))
    graph = _record_graph(model, images, layers)
    return {layer: Recording(layer, graph.layers[layer].output.detach(), tuple(images.shape), graph)
            for layer in layers}


def project(model: nn.Module, images: Tensor, layer: str, unit: int | Tensor,
            unpool: str = "switches", max_batch: int | None = None, dtype: torch.dtype | None = None,
            path: str = "auto") -> Tensor:
    """Deconvnet projection of each image's map of unit `unit` of `layer`: a tensor shaped like
    `images` [N, C, H, W].

    `unit`: an int (the same unit for every image) or an integer tensor [N] (one unit per image).
    The map keeps its activation values; every other map of the layer is zero. Biases are ignored
    on the way back; BatchNorm2d and Dropout act as in eval mode, BatchNorm's affine scale is
    applied. `unpool`: "switches" (default, Zeiler & Fergus) or "fill" (the blog's cheaper variant:
    each value fills its whole pooling window). `max_batch`, `dtype`: see `Recording.project_many`.
    The model's train/eval modes, `requires_grad` flags and hooks are restored; works under
    `torch.no_grad()` and `torch.inference_mode()`. The result is detached.
    """
    _check_options(unpool, max_batch, dtype)
    return record(model, images, layer, path).project(unit, unpool, max_batch, dtype)


def project_many(model: nn.Module, images: Tensor, layer: str, units: Tensor,
                 unpool: str = "switches", max_batch: int | None = None, dtype: torch.dtype | None = None,
                 path: str = "auto") -> Tensor:
    """[N, k, C, H, W]: the projection of image n's map of unit `units[n, j]` of `layer` (`units` an
    integer tensor [N, k], e.g. the indices of `top_units`), in k backward passes over the N images.
    See `project`."""
    _check_options(unpool, max_batch, dtype)
    return record(model, images, layer, path).project_many(units, unpool, max_batch, dtype)


def fast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The reduced precision the hardware of `device` runs natively, for `dtype=`, or None where
    there is none: `torch.bfloat16` on CUDA GPUs with native bf16 (Ampere and later) and on CPUs
    with AMX tiles (Intel Sapphire Rapids and later); elsewhere bf16 is emulated and slower.

    bfloat16 keeps about 3 significant digits: a projection differs from the float32 one by a small
    fraction of its range, below the 1/255 step of the rendered image (tests/test_deconvnet.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
        return torch.bfloat16 if amx is not None and amx() else None
    return None


def top_units(model: nn.Module, images: Tensor, layer: str, k: int, path: str = "auto") -> tuple[Tensor, Tensor]:
    """(values [N, k], indices [N, k]): each image's k units of `layer` whose maps have the highest
    maximum activation, best first (how the report picks the maps to show)."""
    return record(model, images, layer, path).top_units(k)


#: the earlier name of `top_units`
top_maps = top_units


def max_activating_images(model: nn.Module, images: Tensor, layer: str,
                          path: str = "auto") -> tuple[Tensor, Tensor]:
    """(values [K], image_index [K]): for each unit of `layer`, the image of the batch that activates
    it most (highest maximum activation) and that activation (the blog's "maximum activations")."""
    return record(model, images, layer, path).max_activating_images()


def layer_problems(model: nn.Module, image: Tensor, layers, path: str = "auto") -> tuple[str, dict[str, str]]:
    """(path, {layer: why not}): which of `layers` the deconvnet can record for `image` (one image
    is enough); `path` comes back as given, for callers that pass it on to `record_layers`."""
    _check_path(path)
    layers = list(layers)
    try:
        record_layers(model, image, layers, path)
        return path, {}
    except VizError:
        pass
    problems = {}
    for layer in layers:
        try:
            record(model, image, layer, path)
        except VizError as e:
            problems[layer] = " ".join(str(e).split())
    return path, problems

