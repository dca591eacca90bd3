"""Deconvnet projection of one feature map back to pixel space.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014,
arXiv:1311.2901), as Berthier & Mantoux, "Visualizing and Understanding Convolutional Neural
Networks" (RecVis 2018 report), section 2 apply it ("Deconvolutional networks for convnet feature
visualization"): 2.1 builds the deconvnet layer by layer along the convnet, 2.2 projects a feature
map by feeding the layer's output back "except that all the feature maps but the one of interest
are set to zero". Each forward module is undone by its reverse:

- max pooling -> unpooling that puts each value back at the position of the maximum recorded on
  the forward pass (the "switches"); with ``unpool="fill"`` the cheaper variant of Frans,
  "Visualizing Features from a Convolutional Neural Network" (blog post, 2016) instead "set[s] the
  whole 2x2 square equal to the maximum activation";
- ReLU -> ReLU of the backward signal ("we just need to pass the data through a reLu again");
- convolution -> transposed convolution with the same weights. Biases are ignored on the way back
  (the report keeps them; the projection of Zeiler & Fergus, and our autograd oracle, do not).

Further modules, which the papers' nets do not have but our models do, are undone by their exact
linear adjoint: BatchNorm2d (eval mode) multiplies by its affine scale ``weight / sqrt(var + eps)``
(the mean shift and ``bias`` are biases, ignored); average pooling (plain and adaptive) spreads each
value evenly over its window; Dropout and Identity pass the signal unchanged (eval mode).

The result equals the gradient of ``sum(F_c * F_c.detach())`` with respect to the input, with every
ReLU's backward replaced by a ReLU of the incoming signal, for the model in eval mode.

Two paths compute it (`PATHS`, `record(..., path=)`):

- the chain path, for a plain chain of the modules above up to the layer: an explicit reverse pass
  (``F.conv_transpose2d``, ``max_unpool2d``/``scatter_add`` for unpooling, ...), not autograd, so it
  also runs inside ``torch.no_grad()`` and ``torch.inference_mode()`` without enabling gradients,
  and can run in reduced precision (``dtype=torch.bfloat16``): faster where the hardware has native
  bf16 (``fast_dtype``), within a fraction of a gray level of float32 (benchmarks/RESULTS.md);
- the general path (`viz.deconvnet_general`), for any other network (residual sums,
  concatenations, reused or functional ReLUs, squeeze-excitation, LayerNorm, ...): the same rules
  applied through autograd. Non-ReLU nonlinearities (GELU, SiLU, Hardswish, ...) and LayerNorm get
  their ordinary gradient there, as in Captum's `Deconvolution`; BatchNorm in eval mode is its
  scale, as above.
"auto" (the default) takes the chain path where the net is a chain and the general one elsewhere;
both give the same projections on a chain (tests/test_deconvnet.py).

Conventions: images are ``[N, C, H, W]``; a layer is a dotted name from ``model.named_modules()``
and its feature maps are that module's output ``[N, K, h, w]``; map ``c`` is channel ``c``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from convlens.viz.common import (VizError, adaptive_window_matrix, check_channels, check_images, window,
                                 window_matrix)
from convlens.viz.layers import ChainStep, LayerError, check_chain, layer_names, trace_chain

__all__ = [
    "DeconvnetError", "Recording", "record", "project", "project_many", "top_maps",
    "max_activating_images", "fast_dtype", "record_layers", "chain_problem", "layer_problems", "UNPOOL_MODES",
    "PATHS", "SUPPORTED_MODULES",
]

UNPOOL_MODES = ("switches", "fill")
#: "chain": the explicit reverse pass along a chain of modules (fast, refuses anything else);
#: "general": the rules through autograd (`viz.deconvnet_general`), any network;
#: "auto": the chain path where the net is a chain up to the layer, else the general one
PATHS = ("auto", "chain", "general")

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)
_MAX_POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
#: module types a deconvnet can walk back through (Flatten and Linear may follow the layer)
#: SyncBatchNorm (what DDP's sync_batchnorm makes of BatchNorm2d) acts as BatchNorm2d in eval mode
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
SUPPORTED_MODULES = (nn.Conv2d, nn.ReLU, *_MAX_POOLS, *_AVG_POOLS, *_BATCH_NORMS, *_DROPOUTS,
                     nn.Identity)


class DeconvnetError(VizError):
    """Bad arguments (channel, k, unpool mode, images) or a model the deconvnet cannot walk back."""


# --------------------------------------------------------------------------------------------
# Recording the forward pass
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Step:
    """One forward module, prepared for its reverse: what the reverse needs from the forward pass.

    `output` is kept so a recording can be cut at an earlier layer (`Recording.at`). The module's
    parameters are read when projecting, so project before the model's weights change.
    """
    name: str
    module: nn.Module
    in_hw: tuple[int, int]
    output: Tensor                      # [N, K, h, w], a copy taken when the module ran
    switches: Tensor | None = None      # max pools: flat argmax positions in the input, [N, K, h, w]
    pool_rows: Tensor | None = None     # pools: [h_out, H_in] window weights along rows
    pool_cols: Tensor | None = None     # pools: [w_out, W_in] window weights along columns
    fill_rows: Tensor | None = None     # max pools: 0/1 window membership, for unpool="fill"
    fill_cols: Tensor | None = None
    scale: Tensor | None = None         # BatchNorm2d: [K] = weight / sqrt(var + eps)


def _check_path(path) -> None:
    if path not in PATHS:
        raise DeconvnetError(f"Unknown path={path!r}: use 'auto' (the chain path where the net is a chain, else "
                             "the general one), 'chain' or 'general'")


def record(model: nn.Module, images: Tensor, layer: str, path: str = "auto") -> "Recording":
    """Run `images` through `model` (in eval mode) up to `layer` and keep what the deconvnet needs:
    the layer's feature maps and the pooling switches of every max pool on the way.

    One recording serves ranking (`top_maps`, `max_activating_images`) and any number of
    projections (`project`, `project_many`), and `Recording.at(name)` serves any earlier layer of
    the chain, without running the forward again. Mode, hooks and `requires_grad` flags of `model`
    are left as they were. A module that runs several times (a shared ReLU) is taken at its first run;
    a container `layer` stands for its leaf modules.

    `path` (see `PATHS`): "auto" checks on the first image whether the net is a plain chain of
    supported modules up to `layer` (`chain_problem`) and takes the chain path if so, else the
    general path of `viz.deconvnet_general` (residual sums, concatenations, reused or functional
    ReLUs, any other operation); the two give the same projections on a chain.
    """
    check_images(images, DeconvnetError)
    _check_path(path)
    if path == "general":
        return _record_general(model, images, [layer])[layer]
    if path == "auto":
        with torch.no_grad():
            trace = trace_chain(model, images[:1], layer, keep_tensors=True)
        if list(trace[-1].module.children()) or len(trace[-1].out_shape) == 4:
            if chain_problem(trace, images[:1], layer) is not None:
                return _record_general(model, images, [layer])[layer]
        else:
            _check_spatial(trace, layer, trace[-1])  # the chain path's message, with the spatial layers
    with torch.no_grad():
        trace = trace_chain(model, images, layer, keep_tensors=True)
    target = trace[-1]
    trace = _chain_of(trace, layer)
    _check_spatial(trace, layer, target)
    _check_chain(trace, images)
    steps = tuple(_prepare(step) for step in trace)
    return Recording(layer=layer, maps=steps[-1].output, image_shape=tuple(images.shape), _steps=steps)


def _chain_of(trace: list[ChainStep], layer: str) -> list[ChainStep]:
    """The trace without a container target (its leaves are the chain); DeconvnetError when the
    container computes its output with operations that are not modules."""
    target = trace[-1]
    if list(target.module.children()):
        trace = trace[:-1]
        if not trace or trace[-1].output is None or target.output is None \
                or not torch.equal(trace[-1].output, target.output):
            raise DeconvnetError(
                f"Layer {layer!r} ({type(target.module).__name__}) computes its output with operations "
                "that are not modules; name one of its leaf modules instead")
    return trace


def chain_problem(trace: list[ChainStep], images: Tensor, layer: str) -> str | None:
    """None when a `trace_chain(..., keep_tensors=True)` up to `layer` is a chain the chain path can
    walk back; else why not (the chain path's error message)."""
    try:
        chain = _chain_of(trace, layer)
        _check_spatial(chain, layer, chain[-1])
        _check_chain(chain, images)
    except (DeconvnetError, LayerError) as e:
        return str(e)
    return None


def _record_general(model: nn.Module, images: Tensor, layers) -> dict[str, "Recording"]:
    from convlens.viz.deconvnet_general import record_graph

    graph = record_graph(model, images, list(layers))
    return {layer: Recording(layer=layer, maps=graph.maps(layer), image_shape=tuple(images.shape), _steps=(),
                             _graph=graph) for layer in layers}


def _spatial_names(trace: list[ChainStep]) -> list[str]:
    names = []
    for step in trace:
        if len(step.out_shape) != 4:
            break
        names.append(step.name)
    return names


def _check_spatial(trace: list[ChainStep], layer: str, target: ChainStep) -> None:
    flat = next((s for s in trace if len(s.out_shape) != 4), None)
    if len(target.out_shape) == 4 and flat is None:
        return
    why = (f"its output has shape {list(target.out_shape)}" if len(target.out_shape) != 4
           else f"it comes after {flat.name!r} ({type(flat.module).__name__}), whose output has shape "
                f"{list(flat.out_shape)}")
    valid = _spatial_names(trace)
    raise LayerError(
        f"Layer {layer!r} has no spatial feature maps ({why}); a deconvnet projects maps of shape "
        f"[N, C, H, W] from layers before any Flatten/Linear. Layers with spatial maps: "
        f"{', '.join(valid) if valid else '(none before this layer)'}")


def _check_chain(trace: list[ChainStep], images: Tensor) -> None:
    """Every module must be of a supported type and take exactly the previous module's output."""
    supported = ", ".join(t.__name__ for t in SUPPORTED_MODULES)
    for step in trace:
        m = step.module
        if not isinstance(m, SUPPORTED_MODULES):
            raise DeconvnetError(
                f"Layer {step.name!r} is a {type(m).__name__}, which the deconvnet cannot undo. "
                f"The model must be a chain of {supported} up to the projected layer")
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            raise DeconvnetError(f"Layer {step.name!r}: MaxPool2d(return_indices=True) is not supported")
    check_chain(trace, images, DeconvnetError,
                "A deconvnet cannot undo it: make that operation a module, or project a layer before it.")


def _avg_pool_matrices(m: nn.AvgPool2d, in_hw, out_hw, device, dtype) -> tuple[Tensor, Tensor]:
    """Row and column matrices A, B with avg_pool2d(x) == A @ x @ B.T, as PyTorch divides:
    by the window clipped to the padded input (count_include_pad), to the input, or by
    divisor_override."""
    k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    mats = []
    for axis in range(2):
        a = window_matrix(in_hw[axis], out_hw[axis], k[axis], s[axis], p[axis], 1, device=device, dtype=dtype)
        if m.divisor_override is None:
            if m.count_include_pad:
                start = torch.arange(out_hw[axis], device=device) * s[axis] - p[axis]
                end = torch.clamp(start + k[axis], max=in_hw[axis] + p[axis])
                size = (end - start).to(dtype)
            else:
                size = a.sum(1).clamp(min=1)
            a = a / size[:, None]
        mats.append(a)
    if m.divisor_override is not None:
        mats[0] = mats[0] / m.divisor_override
    return mats[0], mats[1]


def _prepare(step: ChainStep) -> _Step:
    m, x, y = step.module, step.input, step.output
    in_hw, out_hw = tuple(x.shape[-2:]), tuple(y.shape[-2:])
    dev, dt = y.device, y.dtype
    extra = {}
    if isinstance(m, nn.MaxPool2d):
        k, s, p, d = window(m)
        # channels_last: same switches (same window scan order, first maximum wins), much faster on CPU
        _, extra["switches"] = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), k, s, p, d,
                                            m.ceil_mode, return_indices=True)
        extra["fill_rows"], extra["fill_cols"] = (
            window_matrix(in_hw[a], out_hw[a], k[a], s[a], p[a], d[a], device=dev, dtype=dt) for a in range(2))
    elif isinstance(m, nn.AdaptiveMaxPool2d):
        _, extra["switches"] = F.adaptive_max_pool2d(x, out_hw, return_indices=True)
        extra["fill_rows"], extra["fill_cols"] = (
            adaptive_window_matrix(in_hw[a], out_hw[a], device=dev, dtype=dt) for a in range(2))
    elif isinstance(m, nn.AvgPool2d):
        extra["pool_rows"], extra["pool_cols"] = _avg_pool_matrices(m, in_hw, out_hw, dev, dt)
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        rows, cols = (adaptive_window_matrix(in_hw[a], out_hw[a], device=dev, dtype=dt) for a in range(2))
        extra["pool_rows"], extra["pool_cols"] = rows / rows.sum(1, keepdim=True), cols / cols.sum(1, keepdim=True)
    elif isinstance(m, _BATCH_NORMS):
        if m.running_var is not None:
            var = m.running_var
        else:  # no running statistics: eval mode normalizes with the batch's own, taken as constants
            var = x.var(dim=(0, 2, 3), unbiased=False)
        scale = torch.rsqrt(var.to(dt) + m.eps)
        extra["scale"] = scale * m.weight.detach() if m.weight is not None else scale
    return _Step(step.name, m, in_hw, y, **extra)


# --------------------------------------------------------------------------------------------
# The reverse pass
# --------------------------------------------------------------------------------------------

def _conv_pads(m: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) zero/reflect/... padding of rows and columns, as Conv2d.forward pads."""
    k, d = m.kernel_size, m.dilation
    if m.padding == "same":
        totals = [d[a] * (k[a] - 1) for a in range(2)]
        return tuple((t // 2, t - t // 2) for t in totals)  # PyTorch puts the odd pixel after
    p = (0, 0) if m.padding == "valid" else _pair(m.padding)
    return (p[0], p[0]), (p[1], p[1])


def _reverse_conv(step: _Step, g: Tensor, channel: Tensor | None) -> Tensor:
    """Transposed convolution with the forward weights (no bias), back onto the unpadded input."""
    m = step.module
    w = m.weight.detach().to(g.dtype)
    n = g.shape[0]
    one_map = channel is not None and m.groups == 1
    if one_map:
        # one nonzero map per sample: a grouped transposed conv with that map's filter per sample
        # costs 1/K of the dense one (channels_last: PyTorch's CPU kernel for this is much faster)
        g = g.reshape(1, n, *g.shape[-2:]).contiguous(memory_format=torch.channels_last)
        w, groups = w[channel], n
    else:
        if channel is not None:
            g = _densify(g, channel, m.out_channels)
        groups = m.groups

    def conv_t(padding, output_padding):
        out = F.conv_transpose2d(g, w, None, m.stride, padding, output_padding, groups, m.dilation)
        if one_map:
            # [1, n*C, h, w] in channels_last memory is oddly strided as [n, C, h, w], which makes
            # the next convolution slow: copy it to proper channels_last
            out = out.reshape(n, -1, *out.shape[-2:]).contiguous(memory_format=torch.channels_last)
        return out

    (top, bottom), (left, right) = _conv_pads(m)
    h, wd = step.in_hw
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


def _densify(g: Tensor, channel: Tensor, channels: int) -> Tensor:
    dense = g.new_zeros(g.shape[0], channels, *g.shape[-2:])
    dense[torch.arange(g.shape[0], device=g.device), channel] = g[:, 0]
    return dense


def _separable(g: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """rows.T @ g @ cols: the adjoint of x -> rows @ x @ cols.T, per map."""
    return torch.matmul(torch.matmul(rows.t().to(g.dtype), g), cols.to(g.dtype))


def _unpool(step: _Step, g: Tensor, channel: Tensor | None, sample: Tensor) -> Tensor:
    """Each value back at its switch, zeros elsewhere. scatter_add, not a plain scatter: with
    overlapping windows one input position can be the maximum of several windows."""
    (h, w), n, c = step.in_hw, g.shape[0], g.shape[1]
    if channel is not None:
        index = step.switches[sample, channel].reshape(n, -1)
        return g.new_zeros(n, h * w).scatter_add_(1, index, g.reshape(n, -1)).reshape(n, 1, h, w)
    m = step.module
    if isinstance(m, nn.MaxPool2d):
        k, st, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.dilation)
        if all(st[a] >= d[a] * (k[a] - 1) + 1 for a in range(2)):
            # windows do not overlap, so no position receives two values: max_unpool2d places them
            # (in bfloat16 faster than a scatter_add, which accumulates in float32)
            return F.max_unpool2d(g, step.switches[sample], k, st, _pair(m.padding), output_size=(h, w))
    if c > 1 and g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous():
        # keep channels_last (the transposed convolutions are faster on it): scatter in [h, w, C] order
        index = step.switches[sample] * c + torch.arange(c, device=g.device).reshape(1, c, 1, 1)
        out = g.new_zeros(n, h * w * c).scatter_add_(1, index.permute(0, 2, 3, 1).reshape(n, -1),
                                                      g.permute(0, 2, 3, 1).reshape(n, -1))
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)
    out = g.new_zeros(n, c, h * w).scatter_add_(2, step.switches[sample].flatten(2), g.flatten(2))
    return out.reshape(n, c, h, w)


def _reverse_step(step: _Step, g: Tensor, channel: Tensor | None, sample: Tensor,
                  unpool: str) -> tuple[Tensor, Tensor | None]:
    """Undo one module. `g` is [M, K, h, w], or [M, 1, h, w] while only map `channel[i]` of sample i
    is nonzero (`channel` is None once the signal spans all maps). `sample[i]` is the recorded image
    of sample i (its switches). Returns the signal at the module's input, and the new `channel`."""
    m = step.module
    if isinstance(m, nn.ReLU):
        # in place (g is always this pass's own tensor); clamp_min_, as relu_ is slower in bfloat16
        return g.clamp_min_(0), channel
    if isinstance(m, nn.Conv2d):
        return _reverse_conv(step, g, channel), None
    if isinstance(m, _MAX_POOLS):
        if unpool == "fill":
            return _separable(g, step.fill_rows, step.fill_cols), channel
        return _unpool(step, g, channel, sample), channel
    if isinstance(m, _AVG_POOLS):
        return _separable(g, step.pool_rows, step.pool_cols), channel
    if isinstance(m, _BATCH_NORMS):
        scale = step.scale.reshape(1, -1, 1, 1) if channel is None else step.scale[channel].reshape(-1, 1, 1, 1)
        return g * scale.to(g.dtype), channel
    return g, channel  # Dropout, Identity: identity in eval mode


# --------------------------------------------------------------------------------------------
# The recording and its uses
# --------------------------------------------------------------------------------------------

def _check_options(unpool, max_batch, dtype=None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DeconvnetError(f"dtype must be a floating point torch.dtype (e.g. torch.bfloat16) or None, "
                             f"got {dtype!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise DeconvnetError(f"max_batch must be a positive int or None (one pass), got {max_batch!r}")
    if unpool not in UNPOOL_MODES:
        raise DeconvnetError(
            f"Unknown unpool={unpool!r}: use 'switches' (put each value back where the forward max "
            "was, Zeiler & Fergus) or 'fill' (fill the whole pooling window with it, the blog's variant)")


def _as_channels(channels, n: int, k_maps: int, layer: str, matrix: bool) -> Tensor:
    return check_channels(channels, n, k_maps, layer, DeconvnetError, matrix=matrix)


@dataclass(frozen=True, eq=False)
class Recording:
    """The forward pass of a batch up to `layer`, ready to rank and project its feature maps.

    `maps` is the layer's output [N, K, h, w] (eval mode). Made by `record(model, images, layer)`.
    It refers to the model's parameters rather than copying them: project before they change.
    `path` is "chain" (the explicit reverse pass) or "general" (autograd, `viz.deconvnet_general`;
    the recording then holds the forward's autograd graph).
    """
    layer: str
    maps: Tensor = field(repr=False)
    image_shape: tuple[int, ...]
    _steps: tuple[_Step, ...] = field(repr=False)
    _graph: object | None = field(default=None, repr=False)

    @property
    def num_maps(self) -> int:
        return self.maps.shape[1]

    @property
    def path(self) -> str:
        return "general" if self._graph is not None else "chain"

    def at(self, layer: str) -> "Recording":
        """The recording cut at an earlier `layer` of the recorded chain (its first run), no forward;
        on the general path, any other layer recorded in the same pass."""
        if self._graph is not None:
            if layer in self._graph.layers:
                return Recording(layer, self._graph.maps(layer), self.image_shape, (), self._graph)
            raise LayerError(f"Layer {layer!r} is not in this recording. Recorded layers: "
                             f"{', '.join(self._graph.layers)}")
        for i, step in enumerate(self._steps):
            if step.name == layer:
                return Recording(layer, step.output, self.image_shape, self._steps[:i + 1])
        raise LayerError(f"Layer {layer!r} is not in this recording (up to {self.layer!r}). "
                         f"Recorded layers: {', '.join(dict.fromkeys(s.name for s in self._steps))}")

    def map_maxima(self) -> Tensor:
        """[N, K]: each map's maximum activation, the score by which maps are ranked."""
        return self.maps.amax(dim=(2, 3))

    def top_maps(self, k: int) -> tuple[Tensor, Tensor]:
        """(values [N, k], indices [N, k]): each image's k maps of highest maximum activation,
        best first."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= self.num_maps:
            raise DeconvnetError(f"k must be an int in 1..{self.num_maps} (layer {self.layer!r} has "
                                 f"{self.num_maps} maps), got {k!r}")
        return self.map_maxima().topk(int(k), dim=1)

    def max_activating_images(self) -> tuple[Tensor, Tensor]:
        """(values [K], image_index [K]): for each map, the highest maximum activation over the
        batch and the image it comes from."""
        return self.map_maxima().max(dim=0)

    def project(self, channel: int | Tensor, unpool: str = "switches", max_batch: int | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        """[N, C, H, W] like the images: for each image, the projection of map `channel` (an int for
        all images, or an integer tensor [N], one map per image). See `project_many`."""
        channel = _as_channels(channel, self.maps.shape[0], self.num_maps, self.layer, matrix=False)
        return self.project_many(channel[:, None], unpool, max_batch, dtype)[:, 0]

    def project_many(self, channels: Tensor, unpool: str = "switches", max_batch: int | None = None,
                     dtype: torch.dtype | None = None) -> Tensor:
        """[N, k, C, H, W]: the projection of map `channels[n, j]` of image n, for all n, j.

        All N*k projections run as one reverse pass over an N*k pseudo-batch, each sample reusing
        its image's switches. Memory: about three N*k-sample copies of the largest feature map on
        the way; `max_batch` caps the pseudo-batch (more, smaller passes; same result).
        `dtype` (e.g. `torch.bfloat16`): run the reverse pass in that precision (the forward pass,
        switches and ranking stay as recorded); the result is returned in the maps' dtype. See
        `fast_dtype` for when that pays off.
        """
        _check_options(unpool, max_batch, dtype)
        n = self.maps.shape[0]
        channels = _as_channels(channels, n, self.num_maps, self.layer, matrix=True).to(self.maps.device)
        k = channels.shape[1]
        samples = torch.arange(n, device=self.maps.device).repeat_interleave(k)
        out = self._reverse_pairs(samples, channels.reshape(-1), unpool, max_batch, dtype)
        return out.reshape(n, k, *out.shape[1:])

    def project_pairs(self, images: Tensor, channels: Tensor, unpool: str = "switches",
                      max_batch: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """[M, C, H, W]: the projection of map `channels[i]` of recorded image `images[i]`, for M
        (image index, map) pairs given as two integer tensors [M], e.g. each map's most activating
        image of the batch (`max_activating_images`). One reverse pass, as `project_many`."""
        _check_options(unpool, max_batch, dtype)
        n = self.maps.shape[0]
        if not torch.is_tensor(images) or images.dim() != 1 or images.is_floating_point() \
                or images.dtype == torch.bool:
            raise DeconvnetError(f"images must be an integer tensor [M] of recorded image indices, got "
                                 f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if images.numel() and (images.min() < 0 or images.max() >= n):
            raise DeconvnetError(f"image index out of range: the recording holds {n} images (0..{n - 1})")
        channels = _as_channels(channels, images.numel(), self.num_maps, self.layer, matrix=False)
        device = self.maps.device
        return self._reverse_pairs(images.long().to(device), channels.to(device), unpool, max_batch, dtype)

    def _reverse_pairs(self, samples: Tensor, channels: Tensor, unpool: str, max_batch: int | None,
                       dtype: torch.dtype | None) -> Tensor:
        if samples.numel() == 0:
            return self.maps.new_zeros((0, *self.image_shape[1:]))
        if self._graph is not None:  # reduced precision is the chain path's: the general one keeps the maps' dtype
            from convlens.viz.deconvnet_general import reverse_pairs

            return reverse_pairs(self._graph, self.layer, samples, channels, unpool, max_batch).detach()
        chunk = max_batch or samples.numel()
        parts = [self._reverse(samples[i:i + chunk], channels[i:i + chunk], unpool, dtype)
                 for i in range(0, samples.numel(), chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _reverse(self, sample: Tensor, channel: Tensor, unpool: str, dtype: torch.dtype | None = None) -> Tensor:
        """The deconvnet pass for the pseudo-batch of (image `sample[i]`, map `channel[i]`) pairs."""
        with torch.no_grad():
            # the deconvnet's input: the map itself, every other map of the layer zero
            g = self.maps[sample, channel].unsqueeze(1).to(dtype or self.maps.dtype)
            for step in reversed(self._steps):
                g, channel = _reverse_step(step, g, channel, sample, unpool)
            if channel is not None:  # no convolution on the way: the input channel is the map's own
                g = _densify(g, channel, self.image_shape[1])
        return g.to(self.maps.dtype).contiguous()


def project(model: nn.Module, images: Tensor, layer: str, channel: int | Tensor,
            unpool: str = "switches", max_batch: int | None = None, dtype: torch.dtype | None = None,
            path: str = "auto") -> Tensor:
    """Deconvnet projection of feature map `channel` of `layer`, for each image: a tensor shaped
    like `images` [N, C, H, W].

    `channel`: an int (the same map for every image) or an integer tensor [N] (one map per image).
    The map keeps its activation values; every other map of the layer is zero. Biases are ignored
    on the way back; BatchNorm2d and Dropout act as in eval mode, BatchNorm's affine scale is
    applied. `unpool`: "switches" (default, Zeiler & Fergus) or "fill" (the blog's cheaper variant:
    each value fills its whole pooling window). `max_batch`, `dtype`: see `Recording.project_many`
    (`dtype` applies to the chain path). `path`: see `record`.
    The model's train/eval modes, `requires_grad` flags and hooks are restored; works under
    `torch.no_grad()` and `torch.inference_mode()`. The result is detached.
    """
    _check_options(unpool, max_batch, dtype)
    return record(model, images, layer, path).project(channel, unpool, max_batch, dtype)


def project_many(model: nn.Module, images: Tensor, layer: str, channels: Tensor,
                 unpool: str = "switches", max_batch: int | None = None, dtype: torch.dtype | None = None,
                 path: str = "auto") -> Tensor:
    """[N, k, C, H, W]: the projection of map `channels[n, j]` of `layer` for image n (`channels` an
    integer tensor [N, k], e.g. the indices of `top_maps`), in one reverse pass over an N*k
    pseudo-batch (passes of at most `max_batch` pairs when given; on the general path, k backward
    passes over the N images). See `project`."""
    _check_options(unpool, max_batch, dtype)
    return record(model, images, layer, path).project_many(channels, unpool, max_batch, dtype)


def fast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The reduced precision in which a reverse pass on `device` runs much faster than in float32,
    or None where there is none: `torch.bfloat16` on CUDA GPUs with native bf16 (Ampere and later)
    and on CPUs with AMX tiles (Intel Sapphire Rapids and later: bf16 convolutions much faster than
    float32 there, see benchmarks/RESULTS.md); elsewhere bf16 is emulated and slower.

    bfloat16 keeps about 3 significant digits: a projection differs from the float32 one by a small
    fraction of its range (benchmarks/RESULTS.md), below the 1/255 step of the rendered image."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
        return torch.bfloat16 if amx is not None and amx() else None
    return None


def top_maps(model: nn.Module, images: Tensor, layer: str, k: int, path: str = "auto") -> tuple[Tensor, Tensor]:
    """(values [N, k], indices [N, k]): each image's k maps of `layer` with the highest maximum
    activation, best first (how the report picks maps to show)."""
    return record(model, images, layer, path).top_maps(k)


def max_activating_images(model: nn.Module, images: Tensor, layer: str,
                          path: str = "auto") -> tuple[Tensor, Tensor]:
    """(values [K], image_index [K]): for each map of `layer`, the image of the batch that activates
    it most (highest maximum activation) and that activation (the blog's "maximum activations")."""
    return record(model, images, layer, path).max_activating_images()


def record_layers(model: nn.Module, images: Tensor, layers, path: str = "auto") -> dict[str, "Recording"]:
    """One `Recording` per layer, from as few forward passes as possible. Chain path: one pass up to
    the layer defined last serves every layer it runs through (`Recording.at`); a layer it does not
    run through (a net whose execution order differs from its definition order) gets its own.
    General path (also "auto" when the net is not a chain up to that deepest layer): one pass
    records every layer."""
    check_images(images, DeconvnetError)
    _check_path(path)
    layers = list(layers)
    order = {name: i for i, name in enumerate(layer_names(model))}
    deepest = max(layers, key=lambda name: order.get(name, -1))
    if path == "general":
        return _record_general(model, images, layers)
    full = record(model, images, deepest, path)
    if full.path == "general":
        return _record_general(model, images, layers) if len(layers) > 1 else {deepest: full}
    recordings: dict[str, Recording] = {}
    for layer in layers:
        try:
            recordings[layer] = full.at(layer)
        except LayerError:  # not on the recorded chain
            recordings[layer] = record(model, images, layer, path)
    return recordings


def layer_problems(model: nn.Module, image: Tensor, layers, path: str = "auto") -> tuple[str, dict[str, str]]:
    """(path, {layer: why not}): which of `layers` the deconvnet can record for `image` (one image
    is enough), and the path `record_layers` takes for them (pass it on to skip the check)."""
    layers = list(layers)
    try:
        recordings = record_layers(model, image, layers, path)
        return next(iter(recordings.values())).path, {}
    except VizError:
        pass
    problems, paths = {}, set()
    for layer in layers:
        try:
            paths.add(record(model, image, layer, path).path)
        except VizError as e:
            problems[layer] = " ".join(str(e).split())
    return ("general" if "general" in paths else "chain" if paths else path), problems
