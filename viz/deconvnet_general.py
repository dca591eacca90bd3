"""The deconvnet on any network: Zeiler & Fergus's rules applied through autograd.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014,
arXiv:1311.2901) define the deconvnet layer by layer along a chain. Its three rules are local, so
they hold on any graph of operations: the projection of map c of a layer is the backward pass of
``sum(F_c * F_c.detach())`` (the map's own activations sent back, every other map zero), with

- every ReLU's backward replaced by a ReLU of the backward signal (the forward's mask is ignored);
- max pooling undone by its switches (the gradient of a max pool goes to the recorded argmax;
  overlapping windows add up), or, with ``unpool="fill"``, by spreading each value over its whole
  window (the cheaper variant of Frans's blog post "Visualizing Features from a Convolutional
  Neural Network", 2016);
- convolutions undone by transposed convolutions with the same weights (their gradient), biases
  ignored.

What autograd does everywhere else is exactly the deconvnet's reading of those operations: a
residual sum copies the signal to both branches, a concatenation splits it, average and adaptive
pooling spread it over their windows, a BatchNorm in eval mode multiplies it by its scale
``weight / sqrt(running_var + eps)`` (its mean and ``bias`` are biases, ignored), Dropout and
stochastic depth in eval mode pass it unchanged, depthwise and grouped convolutions are transposed
group by group. Non-ReLU nonlinearities (GELU, SiLU, Hardswish, Hardsigmoid, ReLU6, LeakyReLU, ...)
and LayerNorm get their ordinary gradient, as Captum's `Deconvolution` does (it rewrites only
`nn.ReLU` modules); so does a multiplicative gate such as squeeze-excitation.

How: the forward pass runs once under a `torch.overrides.TorchFunctionMode` that swaps every ReLU
(`nn.ReLU` modules, reused ones included, and functional `F.relu`/`torch.relu`/`Tensor.relu`, in
place or not) for an autograd Function with the deconvnet's backward, and every 2-d max pool
(`nn.MaxPool2d`, `nn.AdaptiveMaxPool2d`, `F.max_pool2d`, ...) for one whose backward unpools by
switches or fills, as chosen when projecting. Forward hooks keep each requested layer's output
(the rest of the net continues on a copy, so no later in-place operation touches it) and stop the
forward once every layer has run. Parameters are frozen for the pass (no weight gradient is ever
computed). A projection then is `torch.autograd.grad` from the layer, batched over the images
(one backward per rank of map, every image at once); the first step, the layer's own transposed
convolution, is done by hand from the one map (a grouped transposed convolution: 1/K of the dense
one). Every hook is removed and every mode and flag restored in `finally`.

The result equals the chain path of `viz.deconvnet` on a chain (tests/test_deconvnet.py) and
Captum's `NeuronDeconvolution` with the activation-weighted selector on ResNet and DenseNet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from convlens.viz.common import adaptive_window_matrix, frozen, gradients, window_matrix
from convlens.viz.layers import LayerError, get_layer

__all__ = ["Graph", "record_graph", "reverse_pairs", "deconvnet_mode"]


class _Unpooling:
    """How the max pools of a recorded graph unpool on the way back; read by their backward, so
    one recording serves both modes."""

    def __init__(self, mode: str = "switches"):
        self.mode = mode


# --------------------------------------------------------------------------------------------
# The deconvnet's rules as autograd Functions
# --------------------------------------------------------------------------------------------

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
    """F.max_pool2d forward; backward by switches or fill, as `unpooling.mode` says then."""

    @staticmethod
    def forward(ctx, x, unpooling, kernel, stride, padding, dilation, ceil_mode):
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.save_for_backward(index)
        ctx.unpooling, ctx.in_hw = unpooling, tuple(x.shape[-2:])
        ctx.window = (_pair(kernel), _pair(stride if stride not in (None, []) else kernel), _pair(padding),
                      _pair(dilation))
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.unpooling.mode == "fill":
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
    def forward(ctx, x, unpooling, output_size):
        out, index = F.adaptive_max_pool2d(x, output_size, return_indices=True)
        ctx.save_for_backward(index)
        ctx.unpooling, ctx.in_hw = unpooling, tuple(x.shape[-2:])
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.unpooling.mode == "fill":
            out_hw = grad.shape[-2:]
            rows, cols = (adaptive_window_matrix(ctx.in_hw[a], out_hw[a], device=grad.device, dtype=grad.dtype)
                          for a in range(2))
            g = _fill(grad, rows, cols)
        else:
            g = _unpool_switches(grad, index, ctx.in_hw)
        return g, None, None


_RELUS = (F.relu, torch.relu, torch.Tensor.relu)
_RELUS_INPLACE = (torch.relu_, torch.Tensor.relu_)          # F.relu_ is torch.relu_
_MAX_POOLS = (F.max_pool2d, torch.max_pool2d) + ((F._max_pool2d,) if hasattr(F, "_max_pool2d") else ())
_ADAPTIVE_MAX_POOLS = (F.adaptive_max_pool2d,) + (
    (F._adaptive_max_pool2d,) if hasattr(F, "_adaptive_max_pool2d") else ())
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class deconvnet_mode(TorchFunctionMode):
    """While active, ReLUs and 2-d max pools run as the deconvnet's autograd Functions (see the
    module docstring); everything else runs unchanged. `unpooling.mode` ("switches" or "fill") is
    read by the pools' backward, whenever it runs."""

    def __init__(self, unpooling: _Unpooling | None = None):
        super().__init__()
        self.unpooling = unpooling if unpooling is not None else _Unpooling()

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
                return _MaxPool.apply(x, self.unpooling, a["kernel_size"],
                                      a["kernel_size"] if stride in (None, []) else stride, a.get("padding", 0),
                                      a.get("dilation", 1), bool(a.get("ceil_mode", False)))
        elif func in _ADAPTIVE_MAX_POOLS:
            a = _bind(("input", "output_size", "return_indices"), args, kwargs)
            x = a["input"]
            if not a.get("return_indices", False) and torch.is_tensor(x) and x.dim() in (3, 4) \
                    and x.is_floating_point():
                return _AdaptiveMaxPool.apply(x, self.unpooling, a["output_size"])
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
class Graph:
    """One forward pass of `images` under `deconvnet_mode`, kept for projections: the input leaf
    `x`, each recorded layer's output (and a conv layer's input). It holds the autograd graph, so
    it refers to the model's parameters: project before they change."""
    model: nn.Module
    images: Tensor
    x: Tensor
    layers: dict[str, _Captured]
    unpooling: _Unpooling

    def maps(self, layer: str) -> Tensor:
        return self.layers[layer].output.detach()


def record_graph(model: nn.Module, images: Tensor, layers: Sequence[str]) -> Graph:
    """Run `images` through `model` (eval mode, parameters frozen, gradients on also under
    no_grad/inference_mode) under `deconvnet_mode`, up to the last of `layers` to run, keeping each
    layer's output (its first run). A LayerError for a layer that is unknown, that does not run or
    whose output is not [N, K, h, w] maps. Hooks, modes and flags are restored, also on error."""
    modules = {layer: get_layer(model, layer) for layer in layers}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

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
                shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise LayerError(f"Layer {layer!r} outputs {shape}, not feature maps [N, K, h, w]; a deconvnet "
                                 "projects the maps of a layer with spatial output (a Conv2d, its ReLU, a pool)")
            outputs[layer] = out
            if len(outputs) == len(modules):
                raise _Stop
            return out.clone()  # the rest of the net works on a copy: no in-place op reaches `out`
        return hook

    unpooling = _Unpooling()
    handles = []
    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_pre_hook(pre_hook(layer)))
            handles.append(module.register_forward_hook(post_hook(layer)))
        with gradients(model), frozen(model):
            x = images.detach().clone().requires_grad_(True)
            with deconvnet_mode(unpooling):
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
    return Graph(model, images.detach(), x, captured, unpooling)


# --------------------------------------------------------------------------------------------
# Projecting
# --------------------------------------------------------------------------------------------

def _round(graph: Graph, layer: str, sample: Tensor, channel: Tensor, unpool: str) -> Tensor:
    """One backward pass: the projections of map `channel[i]` of image `sample[i]` (each image at
    most once), [M, C, H, W]."""
    from convlens.viz.deconvnet import _reverse_conv, _Step

    cap = graph.layers[layer]
    maps = cap.output.detach()
    signal = maps[sample, channel].unsqueeze(1)                      # [M, 1, h, w]
    if cap.input is not None:
        # the layer's own transposed convolution, from the one map (1/K of the dense one)
        step = _Step(layer, cap.module, tuple(cap.input.shape[-2:]), maps)
        seed = cap.input.new_zeros(cap.input.shape)
        seed[sample] = _reverse_conv(step, signal, channel).to(seed.dtype)
        start = cap.input
    else:
        seed = torch.zeros_like(maps)
        seed[sample, channel] = signal[:, 0]
        start = cap.output
    if not start.requires_grad:  # the layer does not depend on the images
        return graph.x.new_zeros(len(sample), *graph.x.shape[1:])
    previous, graph.unpooling.mode = graph.unpooling.mode, unpool
    try:
        with torch.inference_mode(False), torch.enable_grad():
            (grad,) = torch.autograd.grad(start, graph.x, seed, retain_graph=True, allow_unused=True)
    finally:
        graph.unpooling.mode = previous
    if grad is None:
        return graph.x.new_zeros(len(sample), *graph.x.shape[1:])
    return grad[sample]


def reverse_pairs(graph: Graph, layer: str, sample: Tensor, channel: Tensor, unpool: str,
                  max_batch: int | None = None) -> Tensor:
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
            sub = record_graph(graph.model, graph.images[sample[part]], [layer])
            out[part] = _round(sub, layer, torch.arange(sub.x.shape[0], device=sample.device), channel[part], unpool)
        return out
    # occurrence number of each pair among the pairs of its image: its round
    order = torch.argsort(sample, stable=True)
    sorted_samples = sample[order]
    first = torch.searchsorted(sorted_samples, sorted_samples, right=False)
    occurrence = torch.empty_like(sample)
    occurrence[order] = torch.arange(m, device=sample.device) - first
    for r in range(rounds):
        which = (occurrence == r).nonzero().flatten()
        out[which] = _round(graph, layer, sample[which], channel[which], unpool)
    return out
