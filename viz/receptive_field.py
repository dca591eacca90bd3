"""Receptive fields: the input region a position of a layer's maps sees, exact at padded borders and for strides.

Follows Vanrell & Arias, "Understanding and visualizing CNNs" (lecture, Master in Computer Vision
Barcelona), "Neuron Analysis / Receptive Field": the receptive field of a
neuron is the "image patch that provokes a specific activation of a neuron", and "Computing the
corresponding indexes from Layer L to Layer L-1" is

    Region(i, j) = (stride_h (i - 1) : stride_h (i - 1) + kernel_h - 1,
                    stride_w (j - 1) : stride_w (j - 1) + kernel_w - 1)

(1-based output index, inclusive input range). Applied from the layer back to the image, one module
at a time, it gives the position's receptive field. Here, with 0-based indices, a window module (conv,
max/avg/LP pool) connects output position ``o`` to input positions ``o * stride - pad + t * dilation``
for ``t = 0 .. kernel - 1``; the taps that fall into the padding read no input pixel (zero padding,
and pooling's implicit padding) and are dropped, or read the pixel the padding copies
(``padding_mode`` reflect / replicate / circular). Adaptive pools use PyTorch's windows
``[floor(o * in / out), ceil((o + 1) * in / out))``. Element-wise modules (ReLU and other
activations, BatchNorm2d in eval mode, Dropout in eval mode, Identity) pass positions through.

The connections are separable (a kernel tap links a row and a column independently), so the field
is a set of rows times a set of columns, and both are computed exactly by composing 0/1 connection
matrices per axis (`row_support`, `col_support`). This is the *structural* support: the pixels that
can affect the activation at the position for some weights. For one image, a max pool routes each output to one pixel
of its window, so the pixels that do affect it can be fewer; biases, weights that happen to be zero
and dead ReLUs are likewise ignored.

Conventions: the box of position (i, j) (0-based row i, column j of the layer's output) is
``(y0, x0, y1, x1)`` with exclusive ends, in input pixel coordinates, ``image[..., y0:y1, x0:x1]``.
It is clipped to the image: a window reaching into the padding yields a smaller box, and a position
of an intermediate map that lies in the padding contributes nothing (so the box can also be smaller
than a final clip of the unclipped window would give, e.g. for input rows no window of a strided
layer ever reached). With dilation or with a stride larger than the kernel the support has holes;
the box is then its bounding box (`support` gives the exact set). `size`, `jump` and `start` are
the classic unclipped closed form: along each axis the window of output index ``o`` is
``[start + o * jump, start + o * jump + size)`` (None past an adaptive pool, which has no constant
stride); away from the borders it equals the box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from convlens.viz.common import (VizError, adaptive_window_matrix, check_images, eval_mode, forward_until, frozen,
                                 gradients, window, window_matrix)
from convlens.viz.layers import ChainStep, LayerError, check_chain, get_layer, trace_chain

__all__ = ["ReceptiveField", "ReceptiveFieldError", "receptive_field", "gradient_support", "crop_patches",
           "WINDOW_MODULES", "ELEMENTWISE_MODULES"]

#: modules with a sliding window (kernel, stride, padding, dilation)
WINDOW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveAvgPool2d)
#: modules that act on each position on its own (in eval mode), which the field passes through
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
                       nn.Hardsigmoid, nn.Softplus, nn.BatchNorm2d, nn.Dropout, nn.Dropout1d,
                       nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                       nn.Identity)


class ReceptiveFieldError(VizError):
    """Bad arguments, or a model whose receptive fields cannot be derived module by module."""


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive fields of every position of `layer`'s maps (output `output_size` = (h, w)) on
    images of `input_size` = (H, W). `row_support[i]` ([h, H] bool) says which input rows map row i
    sees, `col_support[j]` ([w, W] bool) which columns; position (i, j) sees their product (every
    unit of the layer the same).

    `size`, `jump`, `start`: per axis (rows, columns), the unclipped closed-form geometry (see the
    module docstring); None when an adaptive pool is on the way.
    """
    layer: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    row_support: Tensor = field(repr=False)
    col_support: Tensor = field(repr=False)
    size: tuple[int, int] | None
    jump: tuple[int, int] | None
    start: tuple[int, int] | None
    #: [h, 2] long: (y0, y1) of each output row, exclusive end (the bounding rows of its support)
    row_bounds: Tensor = field(init=False, repr=False)
    #: [w, 2] long: (x0, x1) of each output column, exclusive end
    col_bounds: Tensor = field(init=False, repr=False)
    #: (Ph, Pw): the largest box height and width over all positions (the field's size, at most the
    #: image's); the size of the tiles `crop_patches` returns
    patch_size: tuple[int, int] = field(init=False)

    def __post_init__(self):
        rows, cols = _bounds(self.row_support), _bounds(self.col_support)
        object.__setattr__(self, "row_bounds", rows)
        object.__setattr__(self, "col_bounds", cols)
        object.__setattr__(self, "patch_size", (int((rows[:, 1] - rows[:, 0]).max()),
                                                int((cols[:, 1] - cols[:, 0]).max())))

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), exclusive ends, clipped to the image: the input box position (i, j) sees."""
        self._check_index(i, j)
        (y0, y1), (x0, x1) = self.row_bounds[i].tolist(), self.col_bounds[j].tolist()
        return y0, x0, y1, x1

    def boxes(self, i: Tensor | None = None, j: Tensor | None = None) -> Tensor:
        """Long tensor [..., 4] of (y0, x0, y1, x1) for positions (i[...], j[...]) (integer tensors of
        the same shape); with no arguments, every position: [h, w, 4]."""
        rows, cols = self.row_bounds, self.col_bounds
        if i is None and j is None:
            h, w = self.output_size
            i = torch.arange(h)[:, None].expand(h, w)
            j = torch.arange(w)[None, :].expand(h, w)
        elif i is None or j is None:
            raise ReceptiveFieldError("boxes(i, j) needs both i and j (or neither, for every position)")
        i, j = torch.as_tensor(i).long().cpu(), torch.as_tensor(j).long().cpu()
        if i.shape != j.shape:
            raise ReceptiveFieldError(f"i and j must have the same shape, got {list(i.shape)} and {list(j.shape)}")
        if i.numel():
            self._check_index(int(i.min()), int(j.min()))
            self._check_index(int(i.max()), int(j.max()))
        return torch.stack([rows[i, 0], cols[j, 0], rows[i, 1], cols[j, 1]], dim=-1)

    def support(self, i: int, j: int) -> Tensor:
        """[H, W] bool: exactly the input pixels position (i, j) is connected to."""
        self._check_index(i, j)
        return self.row_support[i][:, None] & self.col_support[j][None, :]

    def _check_index(self, i: int, j: int) -> None:
        h, w = self.output_size
        if not (0 <= i < h and 0 <= j < w):
            raise ReceptiveFieldError(f"Unit ({i}, {j}) is outside layer {self.layer!r}, whose output is "
                                      f"{h}x{w}: valid rows 0..{h - 1}, columns 0..{w - 1}")


def _bounds(support: Tensor) -> Tensor:
    """[n, L] bool -> [n, 2] long (first True, last True + 1); rows with no True give (0, 0)."""
    n, length = support.shape
    pos = torch.arange(length)
    first = torch.where(support, pos, length).amin(1)
    last = torch.where(support, pos, -1).amax(1) + 1
    empty = ~support.any(1)
    return torch.stack([first.masked_fill(empty, 0), last.masked_fill(empty, 0)], dim=1)


# --------------------------------------------------------------------------------------------
# Per module, per axis: which input positions each output position reads
# --------------------------------------------------------------------------------------------

def _connections(step: ChainStep, axis: int) -> Tensor | None:
    """[n_out, n_in] bool connections of one module along `axis` (0 rows, 1 columns); None for an
    element-wise module."""
    m = step.module
    n_in, n_out = step.in_shape[2 + axis], step.out_shape[2 + axis]
    if isinstance(m, ELEMENTWISE_MODULES):
        return None
    if isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
        return adaptive_window_matrix(n_in, n_out)
    k, s, p, d = window(m)
    mode = m.padding_mode if isinstance(m, nn.Conv2d) else "zeros"
    return window_matrix(n_in, n_out, k[axis], s[axis], p[axis], d[axis], mode)


# --------------------------------------------------------------------------------------------
# Tracing the chain
# --------------------------------------------------------------------------------------------

def _check_images(images) -> None:
    check_images(images, ReceptiveFieldError)


def _chain(model: nn.Module, images: Tensor, layer: str) -> list[ChainStep]:
    with torch.no_grad():
        trace = trace_chain(model, images[:1], layer, keep_tensors=True)
    target = trace[-1]
    if list(target.module.children()):  # a container: its leaves are the chain
        trace = trace[:-1]
        if not trace or trace[-1].output is None or not torch.equal(trace[-1].output, target.output):
            raise ReceptiveFieldError(
                f"Layer {layer!r} ({type(target.module).__name__}) computes its output with operations "
                "that are not modules; name one of its leaf modules instead")
    supported = ", ".join(t.__name__ for t in WINDOW_MODULES + ELEMENTWISE_MODULES)
    for index, step in enumerate(trace):
        if len(step.out_shape) != 4 or len(step.in_shape) != 4:
            spatial = [s.name for s in trace[:index]]
            raise LayerError(
                f"Layer {layer!r} has no receptive field on the image grid: {step.name!r} "
                f"({type(step.module).__name__}) maps {list(step.in_shape)} to {list(step.out_shape)}. "
                f"Name a layer with [N, C, H, W] maps before it: {', '.join(spatial) or '(none)'}")
        if not isinstance(step.module, WINDOW_MODULES + ELEMENTWISE_MODULES):
            raise ReceptiveFieldError(
                f"Layer {step.name!r} is a {type(step.module).__name__}, whose spatial connections are "
                f"unknown. Receptive fields are derived through {supported}")
    check_chain(trace, images[:1], ReceptiveFieldError, "Receptive fields are derived module by module: "
                "make that operation a module, or name a layer before it.")
    return trace


def receptive_field(model: nn.Module, images: Tensor, layer: str, path: str = "auto") -> ReceptiveField:
    """The receptive field of every position of `layer`'s maps on images shaped like `images` [N, C, H, W].

    One image is run through `model` (eval mode) up to `layer` to find the module chain and the map
    sizes; the answer depends only on the geometry (kernel, stride, padding, dilation, ceil_mode,
    padding_mode), not on the weights or the image's content. The model's modes, hooks and
    `requires_grad` flags are left as they were. Raises LayerError for an unknown layer or one
    without spatial maps.

    On a plain chain of window and element-wise modules the field is composed module by module
    (exact, with the closed form `size`/`jump`/`start`). Any other network (residual sums,
    concatenations, squeeze-excitation gates, functional pooling, Upsample, ...) gets the gradient
    support (`gradient_support`): the input pixels on which the gradient of the activation there is nonzero, in a
    linearized, all-positive reading of the forward that no weight or activation can cancel; the
    closed form is then None. Both give the same field on a chain. `path`: "auto" (the chain
    composition where it applies, else the gradient support), "chain" (a ReceptiveFieldError for
    any other net) or "general" (always the gradient support).
    """
    _check_images(images)
    if path not in ("auto", "chain", "general"):
        raise ReceptiveFieldError(f"Unknown path={path!r}: use 'auto', 'chain' or 'general'")
    if path == "general":
        return gradient_support(model, images, layer)
    try:
        trace = _chain(model, images, layer)
    except ReceptiveFieldError:
        if path == "chain":
            raise
        return gradient_support(model, images, layer)
    h, w = trace[-1].out_shape[2:]
    supports = []
    for axis, n_out in ((0, h), (1, w)):
        support = torch.eye(n_out, dtype=torch.bool)
        for step in reversed(trace):
            conn = _connections(step, axis)
            if conn is not None:
                # positions of the module's input connected to any position of the current support
                support = (support.float() @ conn.float()) > 0
        supports.append(support)
    size, jump, start = _closed_form(trace)
    return ReceptiveField(layer, tuple(images.shape[2:]), (h, w), supports[0], supports[1],
                          size, jump, start)


# --------------------------------------------------------------------------------------------
# Gradient support: any network
# --------------------------------------------------------------------------------------------

#: element-wise nonlinearities, read as the identity: no dead ReLU or saturation hides a connection
_ACTIVATIONS = tuple(f for f in (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.prelu, F.rrelu, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.Tensor.relu, torch.Tensor.sigmoid, torch.Tensor.tanh))
_ACTIVATIONS_INPLACE = (torch.relu_, torch.Tensor.relu_, torch.sigmoid_, torch.Tensor.sigmoid_, torch.tanh_,
                        torch.Tensor.tanh_, F.leaky_relu_, F.elu_, F.rrelu_, torch.Tensor.clamp_,
                        torch.Tensor.clamp_min_)
_WEIGHTED = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear)


class _WindowSum(torch.autograd.Function):
    """A max pool's forward; backward spreads each value over the pool's whole window (every pixel
    of the window is connected, whichever won)."""

    @staticmethod
    def forward(ctx, x, rows, cols, out):
        ctx.save_for_backward(rows, cols)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        return torch.matmul(torch.matmul(rows.t().to(grad.dtype), grad), cols.to(grad.dtype)), None, None, None


class _Structural(TorchFunctionMode):
    """The forward read for connectivity: every conv/linear weight as a positive averaging filter
    (1 / fan-in) and no bias, every element-wise activation, BatchNorm and channel-wise LayerNorm
    as the identity, max pools as their windows. With an all-positive input every value and every
    local derivative is then positive, so a pixel connected to a position has a nonzero gradient (in
    float64, which no depth underflows)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHTED:
            args = list(args)
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs.pop("weight")
            # an averaging filter: positive, and values stay of order 1 through any depth
            weight = torch.full(weight.shape, 1.0 / max(1, weight[0].numel()), dtype=x.dtype, device=x.device)
            if len(args) > 1:
                args[1] = weight
            else:
                kwargs["weight"] = weight
            if len(args) > 2:
                args[2] = None
            kwargs.pop("bias", None)
            return func(*args, **kwargs)
        if func in _ACTIVATIONS:
            x = args[0] if args else kwargs["input"]
            inplace = bool(kwargs.get("inplace", False)) or any(a is True for a in args[1:])
            return x if inplace else x.clone()
        if func in _ACTIVATIONS_INPLACE:
            return args[0]
        if func is F.batch_norm:
            return args[0].clone()
        if func is F.layer_norm:
            shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
            if len(tuple(shape)) == 1:  # over channels only (ConvNeXt's, channels last): per position
                return args[0].clone()
        if func in (F.group_norm, F.instance_norm, F.layer_norm):  # these connect positions: kept, in float64
            args = [a.to(args[0].dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            kwargs = {k: v.to(args[0].dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
            return func(*args, **kwargs)
        if func in (F.max_pool2d, torch.max_pool2d):
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            a = dict(zip(names, args), **kwargs)
            if not a.get("return_indices", False) and a["input"].dim() == 4:
                x = a["input"]
                with torch.no_grad():
                    out = func(*args, **kwargs)
                k = _pair_(a["kernel_size"])
                s = _pair_(a["kernel_size"] if a.get("stride") in (None, []) else a["stride"])
                p, d = _pair_(a.get("padding", 0)), _pair_(a.get("dilation", 1))
                mats = [window_matrix(x.shape[2 + i], out.shape[2 + i], k[i], s[i], p[i], d[i], device=x.device,
                                      dtype=x.dtype) for i in range(2)]
                return _WindowSum.apply(x, mats[0], mats[1], out)
        if func is F.adaptive_max_pool2d:
            a = dict(zip(("input", "output_size", "return_indices"), args), **kwargs)
            if not a.get("return_indices", False) and a["input"].dim() == 4:
                x = a["input"]
                with torch.no_grad():
                    out = func(*args, **kwargs)
                mats = [adaptive_window_matrix(x.shape[2 + i], out.shape[2 + i], device=x.device, dtype=x.dtype)
                        for i in range(2)]
                return _WindowSum.apply(x, mats[0], mats[1], out)
        return func(*args, **kwargs)


def _pair_(v) -> tuple[int, int]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def gradient_support(model: nn.Module, images: Tensor, layer: str) -> ReceptiveField:
    """The receptive field of every position of `layer`'s maps as a gradient support, for any network.

    The forward runs on one all-ones image shaped like `images[:1]` in float64, read for
    connectivity (`_Structural`: weights as positive averaging filters without biases, activations
    and normalizations as the identity,
    max pools as their windows, so nothing cancels or saturates). Row i of the layer connects to
    the input rows where the gradient of its activations (all units and columns) is nonzero, and
    likewise for column j; one batched backward computes all h + w of them (the images repeated
    h + w times, eval mode). Position (i, j) sees rows(i) x cols(j): on a residual or concatenating
    net, the bounding product of its branches' fields. `size`, `jump` and `start` are None."""
    module = get_layer(model, layer)
    with torch.no_grad(), eval_mode(model):
        out_shape = forward_until(model, images[:1], module, repr(layer)).shape
    if len(out_shape) != 4:
        raise LayerError(f"Layer {layer!r} has no receptive field on the image grid: it outputs "
                         f"{list(out_shape)}, not maps [N, C, h, w]; name a layer with spatial maps")
    _, k, h, w = out_shape
    big_h, big_w = images.shape[2:]
    with gradients(model), frozen(model):
        x = torch.ones(h + w, *images.shape[1:], dtype=torch.float64, device=images.device, requires_grad=True)
        with _Structural():
            out = forward_until(model, x, module, repr(layer))
        seed = torch.zeros(h + w, k, h, w, dtype=out.dtype, device=out.device)
        rows = torch.arange(h, device=out.device)
        cols = torch.arange(w, device=out.device)
        seed[rows, :, rows, :] = 1                       # sample i: every activation of row i
        seed[h + cols, :, :, cols] = 1                   # sample h + j: every activation of column j
        (grad,) = torch.autograd.grad(out, x, seed, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    nonzero = grad.detach().abs().sum(1) > 0             # [h + w, H, W]
    row_support = nonzero[:h].any(2).cpu()               # [h, H]
    col_support = nonzero[h:].any(1).cpu()               # [w, W]
    return ReceptiveField(layer, (big_h, big_w), (h, w), row_support, col_support, None, None, None)


def _closed_form(trace: list[ChainStep]):
    """size, jump, start per axis by the usual recursion (input side first):
    size += (dilation * (kernel - 1)) * jump, start -= pad * jump, jump *= stride."""
    size, jump, start = [1, 1], [1, 1], [0, 0]
    for step in trace:
        if isinstance(step.module, ELEMENTWISE_MODULES):
            continue
        geometry = window(step.module)
        if geometry is None:
            return None, None, None
        k, s, p, d = geometry
        for a in range(2):
            size[a] += d[a] * (k[a] - 1) * jump[a]
            start[a] -= p[a] * jump[a]
            jump[a] *= s[a]
    return tuple(size), tuple(jump), tuple(start)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------

def crop_patches(images: Tensor, field: ReceptiveField, i: Tensor, j: Tensor,
                 fill: float = math.nan, index: Tensor | None = None) -> Tensor:
    """[M, C, Ph, Pw]: the receptive-field patch of position (i[m], j[m]) in image `images[m]`
    ([M, C, H, W]), all of size `field.patch_size`; with `index` ([M] long), in image
    `images[index[m]]` (several patches of one image without a copy of it per patch).

    Each patch shows the position's box at the place it has in a full window: when the box is clipped
    at the top (left) image border it is aligned to the bottom (right) of the tile, otherwise to
    the top (left); pixels of the tile outside the box, and pixels inside it the position is not
    connected to (holes from dilation), are `fill` (NaN by default, so a renderer can color them).
    """
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ReceptiveFieldError("images must be a batch tensor [M, C, H, W]")
    if tuple(images.shape[2:]) != field.input_size:
        raise ReceptiveFieldError(f"images are {tuple(images.shape[2:])} but the receptive field was "
                                  f"computed for {field.input_size} inputs")
    i, j = torch.as_tensor(i).long().flatten().cpu(), torch.as_tensor(j).long().flatten().cpu()
    crops = images.shape[0] if index is None else len(index)
    if not len(i) == len(j) == crops:
        raise ReceptiveFieldError(f"need one (i, j) per image: got {len(i)} i, {len(j)} j for "
                                  f"{crops} {'images' if index is None else 'indexes'}")
    boxes = field.boxes(i, j)                                                 # [M, 4]
    ph, pw = field.patch_size
    rows = _tile_positions(boxes[:, 0], boxes[:, 2], ph, field.row_support[i])    # [M, Ph]
    cols = _tile_positions(boxes[:, 1], boxes[:, 3], pw, field.col_support[j])    # [M, Pw]
    dev = images.device
    rows, cols = rows.to(dev), cols.to(dev)
    m = torch.arange(crops, device=dev) if index is None else torch.as_tensor(index, device=dev).long()
    out = images[m[:, None, None], :, rows.clamp_min(0)[:, :, None], cols.clamp_min(0)[:, None, :]]
    out = out.permute(0, 3, 1, 2)                                             # [M, C, Ph, Pw]
    valid = (rows >= 0)[:, :, None] & (cols >= 0)[:, None, :]
    return out.masked_fill(~valid[:, None], fill)


def _tile_positions(lo: Tensor, hi: Tensor, tile: int, support: Tensor) -> Tensor:
    """[M, tile] input positions shown by each tile position, -1 where there is none."""
    length = hi - lo
    origin = torch.where((lo == 0) & (length < tile), hi - tile, lo)
    pos = origin[:, None] + torch.arange(tile)[None, :]
    inside = (pos >= lo[:, None]) & (pos < hi[:, None])
    connected = support.gather(1, pos.clamp(0, support.shape[1] - 1)) & inside
    return torch.where(connected, pos, -1)
