"""Incremental occlusion inference: exact occlusion maps that recompute, in every layer, only the
part of its output the patch can reach.

After Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations" (SIGMOD 2019, DOI 10.1145/3299869.3319874; their tool
Krypton). An occluding patch changes only its own pixels, so a convolution or pooling layer changes
only the outputs whose window reads a changed input (the patch's projective field in that layer),
and an elementwise layer (BatchNorm in eval mode, ReLU and other activations, Dropout in eval mode,
Identity) only the positions it is given.

`occlusion_maps` (viz.occlusion) uses this module when the model starts with a plain chain of such
modules; the chain is found by recording one forward pass with hooks, as `viz.layers.trace_chain`
does, but stricter than `check_chain`: every module of the chain must consume the very tensor the
previous one returned (the same storage and in-place version), so no functional operation runs in
between. The unoccluded images run once, and the input of every window layer of the chain is kept,
pre-padded by the layer's own padding (zeros for convolutions and average pools; -inf for max
pools, also over the overhang of ceil_mode). For a chunk of patch positions, layer by layer:

* a fixed-size window of the layer's output covers every output that reads a changed input (its
  start clamped so that the window fits the map; recomputing a few unchanged positions is exact);
* the input that window reads is cut from the padded cache and the changed values (the previous
  layer's window) are pasted into it; the layer runs on that crop without padding;
* elementwise layers run on the window as it is.

Once a window stops paying (the estimate below) or the chain ends, every copy's full map is the
cached map with its window pasted in, and the model's own forward runs on from there: the chain's
modules are swapped out for that call (the first returns the patched maps, the others pass them
through) and the model is called on the batch of occluded images, so anything the forward does
past the chain (functional ops, residual additions, the classifier) runs unchanged. Before it is
used, the swap is checked once on the unoccluded images: the same modules must run in the same
order and the logits must come out the same; a forward that reads an intermediate map of the chain
elsewhere (a skip connection) fails that check, and the batched forward is used instead.

Where the incremental path pays is estimated per copy in multiply-accumulate equivalents: every
layer's cost over its full output (convolutions and linear layers by their MACs, pools by their
taps, elementwise layers and copies by elements, with the constants below), against the windowed
cost plus the copies into and out of the caches, for every possible switch layer; the cheapest is
taken when it saves at least `1 - MIN_SAVING_RATIO` of the batched cost, else the batched forward.

Approximation (off by default): Krypton's projective-field thresholding. With `tau` in (0, 1), a
layer's changed region is cut, per axis, to at most max(1, floor(tau * side)) outputs around its
center; changes outside it are ignored (those outputs keep their unoccluded values). The maps are
then no longer exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import VizError, window
from convlens.viz.layers import _identity

__all__ = ["OcclusionError", "RecordedForward", "IncrementalRunner", "record_forward", "prepare", "MIN_SAVING_RATIO"]


class OcclusionError(VizError):
    """An argument occlusion_maps cannot use; the message says what to pass instead. Defined here,
    under `viz.occlusion` which imports this module, and exported by both."""


# Per-copy cost constants, in multiply-accumulate equivalents: on a CPU a convolution runs many
# MACs in the time a gather, paste or elementwise op touches one element (gathers of large chunks
# are memory-bound, hence the high copy cost).
COPY_COST = 30.0
ELEMENTWISE_COST = 6.0
POOL_TAP_COST = 4.0
#: use the incremental path only when its estimated cost is at most this fraction of the batched one
MIN_SAVING_RATIO = 0.7

# Elementwise modules: in eval mode each output element depends on its own input element only
# (PReLU and BatchNorm on its channel's parameters), so they run on a window as on the full map.
_ELEMENTWISE = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
                nn.Softplus, nn.Threshold)


def _base_class(m: nn.Module, classes: tuple[type, ...]) -> type | None:
    """The class of `classes` `m` is an instance of, when its forward is that class's own (a
    subclass that overrides forward, or a forward set on the instance, may compute anything)."""
    if "forward" in m.__dict__:
        return None
    for cls in classes:
        if isinstance(m, cls):
            return cls if type(m).forward is cls.forward else None
    return None


def _kind(m: nn.Module) -> str | None:
    """'conv', 'max', 'avg' or 'elementwise' for a module the incremental path computes exactly
    on a window of its input; None otherwise."""
    if m._forward_hooks or m._forward_pre_hooks:  # a hook may change what the module returns
        return None
    if _base_class(m, (nn.Conv2d,)) is not None:
        return "conv" if m.padding_mode == "zeros" else None  # other modes pad with data
    if _base_class(m, (nn.MaxPool2d,)) is not None:
        return None if m.return_indices else "max"
    if _base_class(m, (nn.AvgPool2d,)) is not None:
        return "avg"
    if _base_class(m, (nn.BatchNorm2d,)) is not None:
        # in eval mode, with running statistics, BatchNorm is a per-channel affine map
        return "elementwise" if m.running_mean is not None and m.running_var is not None else None
    if _base_class(m, _ELEMENTWISE) is not None:
        return "elementwise"
    return None


# --------------------------------------------------------------------------------------------
# The recorded forward pass
# --------------------------------------------------------------------------------------------

@dataclass
class _Call:
    module: nn.Module
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None = None
    input_id: tuple | None = None
    output_id: tuple | None = None


@dataclass
class RecordedForward:
    """One forward pass on the unoccluded images: the logits, and every leaf module call in order."""
    logits: Tensor
    calls: list[_Call]
    images_id: tuple | None


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())] or [model]


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_lib
    return bool(module_lib._global_forward_hooks or module_lib._global_forward_pre_hooks)


def record_forward(model: nn.Module, images: Tensor) -> RecordedForward:
    """`model(images)` without gradients (not in inference mode: the identities of the tensors that
    flow between modules are recorded, which inference tensors do not have). Hooks removed, also on
    error; modes are the caller's."""
    calls: list[_Call] = []
    open_calls: list[_Call] = []

    def pre_hook(module, args):
        x = args[0] if args else None
        call = _Call(module, tuple(x.shape) if torch.is_tensor(x) else None, input_id=_identity(x))
        calls.append(call)
        open_calls.append(call)

    def post_hook(module, args, out):
        call = open_calls.pop()
        if torch.is_tensor(out):
            call.out_shape, call.output_id = tuple(out.shape), _identity(out)

    handles = []
    try:
        for m in _leaves(model):
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        with torch.inference_mode(False), torch.no_grad():
            x = images.clone()  # an ordinary tensor, whose identity the first module must receive
            images_id = _identity(x)
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return RecordedForward(logits, calls, images_id)


def _chain_length(calls: list[_Call], images_id) -> int:
    """How many leading calls form a plain chain of supported modules on [N, C, H, W] maps."""
    previous = images_id
    length = 0
    for call in calls:
        if (previous is None or call.input_id != previous or _kind(call.module) is None
                or call.in_shape is None or len(call.in_shape) != 4
                or call.out_shape is None or len(call.out_shape) != 4):
            break
        previous, length = call.output_id, length + 1
    return length


def _swappable(calls: list[_Call], switch: int) -> bool:
    """The first `switch` calls can be swapped out: their modules run nowhere else in the forward
    (the first one exactly once, the others maybe again inside the chain, all passed through)."""
    modules = [id(c.module) for c in calls]
    if modules.count(modules[0]) != 1:
        return False
    inside = set(modules[:switch])
    return not any(m in inside for m in modules[switch:])


# --------------------------------------------------------------------------------------------
# Geometry, one axis at a time
# --------------------------------------------------------------------------------------------

@dataclass
class _Axis:
    """Along one axis of one layer's input, for every patch index along that axis: the window of
    the layer's output that is recomputed (`start`, `size`), the input window that holds the
    changed values (`src_start`, `src_size`: the previous layer's output window), and the changed
    inputs `changed` [a, b) and outputs `out_changed`."""
    n_in: int
    n_out: int
    kernel: int
    stride: int
    pad: int           # padding before the first input
    pad_after: int     # what the cache carries after the last input (padding, ceil_mode overhang)
    dilation: int
    start: list[int]
    size: int
    src_start: list[int]
    src_size: int
    changed: list[tuple[int, int]]
    out_changed: list[tuple[int, int]]

    @property
    def crop(self) -> int:
        """How many (padded) inputs the output window reads."""
        return (self.size - 1) * self.stride + (self.kernel - 1) * self.dilation + 1

    def contained(self) -> bool:
        """The input window lies inside the crop at every position (pasted by plain indexing)."""
        return all(s * self.stride <= r + self.pad and r + self.pad + self.src_size <= s * self.stride + self.crop
                   for s, r in zip(self.start, self.src_start))


def _window_axis(n_in: int, n_out: int, kernel: int, stride: int, pad: int, dilation: int, src_start: list[int],
                 src_size: int, changed: list[tuple[int, int]], tau: float | None) -> _Axis:
    """The output window of a window layer along one axis, from its changed input intervals."""
    reach = (kernel - 1) * dilation
    out_changed = []
    for a, b in changed:
        if a >= b:
            oa = ob = 0
        else:  # output o reads inputs o*stride - pad + t*dilation, t < kernel
            oa = min(n_out, max(0, -(-(a + pad - reach) // stride)))
            ob = max(oa, min(n_out, (b - 1 + pad) // stride + 1))
        if tau is not None:  # projective-field thresholding: keep the central `cap` outputs
            cap = max(1, math.floor(tau * n_out))
            if ob - oa > cap:
                oa += (ob - oa - cap) // 2
                ob = oa + cap
        out_changed.append((oa, ob))
    size = min(n_out, max([1] + [b - a for a, b in out_changed]))
    # a fixed size for every position: the start is clamped so that the window fits the map
    starts = [min(a, n_out - size) for a, _ in out_changed]
    needed = (n_out - 1) * stride + reach + 1
    return _Axis(n_in, n_out, kernel, stride, pad, max(0, needed - n_in - pad), dilation, starts, size,
                 list(src_start), src_size, list(changed), out_changed)


def _paste_axis(n: int, src_start: list[int], src_size: int, changed: list[tuple[int, int]]) -> _Axis:
    """The final paste of a window into the full map along one axis (a 1x1 'layer' over the map)."""
    return _Axis(n, n, 1, 1, 0, 0, 1, [0] * len(src_start), n, list(src_start), src_size, list(changed),
                 list(changed))


@dataclass
class _Layer:
    call: int
    module: nn.Module
    kind: str
    y: _Axis | None = None
    x: _Axis | None = None
    cache: Tensor | None = None               # a window layer's padded input, [N, H', W', C]
    tables: dict[str, Tensor] = field(default_factory=dict)
    indexing: bool = False                    # paste the whole input window by plain indexing
    crops: Tensor | None = None               # a view of `cache`: every crop, [N, H'', W'', h, w, C]
    weight: Tensor | None = None              # a conv's weight in the crops' (channels_last) layout


def _prod(shape) -> int:
    return int(math.prod(shape))


def _full_cost(call: _Call) -> float:
    """Estimated cost of one copy through this call, in MAC equivalents."""
    m, out = call.module, call.out_shape
    if out is None:
        return 0.0
    elements = _prod(out[1:])
    if isinstance(m, nn.modules.conv._ConvNd):
        return elements * m.weight.numel() / max(1, m.out_channels)
    if isinstance(m, nn.Linear):
        return elements * m.in_features
    w = window(m)
    if w is not None:
        return elements * w.kernel[0] * w.kernel[1] * POOL_TAP_COST
    return elements * ELEMENTWISE_COST


@dataclass
class Plan:
    """`switch` leading calls of a `chain` of supported calls run incrementally, the model's forward
    the rest; `estimated_ratio`: the estimated cost against the batched forward."""
    chain: int
    switch: int
    estimated_ratio: float
    layers: list[_Layer]
    final: tuple[_Axis, _Axis]
    exact: bool


def _plan(calls: list[_Call], chain: int, height: int, width: int, patch: int, stride: int,
          tau: float | None, force: bool) -> Plan | None:
    counts = ((height - patch) // stride + 1, (width - patch) // stride + 1)
    # along each axis: the window holding the changed values, and the changed interval
    src = [([i * stride for i in range(n)], patch) for n in counts]
    changed = [[(s, s + patch) for s in starts] for starts, _ in src]
    layers: list[_Layer] = []
    windowed: list[float] = []            # estimated incremental cost of each call
    finals: list[tuple[_Axis, _Axis]] = []  # the paste into the full maps after each call
    covered = None                         # the first window layer recomputing its whole map
    for j in range(chain):
        call = calls[j]
        kind = _kind(call.module)
        if kind == "elementwise":
            layers.append(_Layer(j, call.module, kind))
            windowed.append(ELEMENTWISE_COST * call.out_shape[1] * src[0][1] * src[1][1])
        else:
            w = window(call.module)
            ay, ax = (_window_axis(call.in_shape[2 + a], call.out_shape[2 + a], w.kernel[a], w.stride[a],
                                   w.pad_before[a], w.dilation[a], src[a][0], src[a][1], changed[a], tau)
                      for a in range(2))
            # exact maps may paste a whole window; thresholded ones only the kept changes
            layers.append(_Layer(j, call.module, kind, ay, ax, indexing=tau is None and ay.contained()
                                 and ax.contained()))
            per_output = (call.module.weight.numel() / call.module.out_channels if kind == "conv"
                          else w.kernel[0] * w.kernel[1] * POOL_TAP_COST)
            crop = ay.crop * ax.crop
            paste = src[0][1] * src[1][1] if layers[-1].indexing else 2 * crop
            windowed.append(call.out_shape[1] * ay.size * ax.size * per_output
                            + COPY_COST * call.in_shape[1] * (crop + paste))
            if covered is None and ay.size == ay.n_out and ax.size == ax.n_out:
                covered = j
            src = [(ay.start, ay.size), (ax.start, ax.size)]
            changed = [ay.out_changed, ax.out_changed]
        finals.append(tuple(_paste_axis(call.out_shape[2 + a], src[a][0], src[a][1], changed[a]) for a in range(2)))

    full = [_full_cost(c) for c in calls]
    batched = sum(full)

    def cost(switch: int) -> float:
        build = COPY_COST * 2 * _prod(calls[switch - 1].out_shape[1:])
        return sum(windowed[:switch]) + build + sum(full[switch:])

    if force:  # as far as the chain goes, until a window covers its whole map
        switch = covered if covered is not None else chain
        if switch == 0 or not _swappable(calls, switch):
            return None
    else:
        candidates = [s for s in range(1, chain + 1) if _swappable(calls, s)]
        if not candidates:
            return None
        switch = min(candidates, key=cost)
        if cost(switch) > MIN_SAVING_RATIO * batched:
            return None
    return Plan(chain, switch, cost(switch) / batched if batched else 1.0, layers[:switch], finals[switch - 1],
                tau is None)


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _pass_through(*args, **kwargs):
    return args[0]


class IncrementalRunner:
    """The prepared incremental path for one `occlusion_maps` call. `with runner:` swaps the chain's
    modules out (restored on exit, also on error); inside, `runner(occluded, image, position)`
    returns the logits of a chunk of occluded copies, `image` and `position` their image and
    patch-position indices (row-major over the map)."""

    def __init__(self, model: nn.Module, calls: list[_Call], plan: Plan, fill: Tensor, patch: int, stride: int,
                 columns: int, names: dict[nn.Module, str]):
        self.model, self.calls, self.plan = model, calls, plan
        self.patch, self.stride, self.columns = patch, stride, columns
        self.fill = fill.permute(1, 2, 0)              # [H, W, C], the patch is cut from it
        self.names = [names.get(calls[j].module, type(calls[j].module).__name__) for j in range(plan.switch)]
        self.last: Tensor | None = None                # the chain's last output, [N, H, W, C]
        self.channels_last = False
        self._next: Tensor | None = None
        self._swapped: list[nn.Module] = []
        device = fill.device
        for layer in plan.layers:
            if layer.kind == "elementwise":
                continue
            t = layer.tables
            if layer.kind == "conv":
                layer.weight = layer.module.weight.detach().contiguous(memory_format=torch.channels_last)
            for a, axis in (("y", layer.y), ("x", layer.x)):
                t[a + "crop"] = torch.tensor(axis.start, device=device) * axis.stride - axis.pad
                t[a + "out"] = torch.tensor(axis.start, device=device)
                self._paste_tables(t, a, axis, device)
            if layer.kind == "avg":
                t["ycount"], t["xcount"] = (self._avg_counts(axis, layer.module.count_include_pad, fill.dtype, device)
                                            for axis in (layer.y, layer.x))
        self.final_tables: dict[str, Tensor] = {}
        for a, axis in zip("yx", plan.final):
            self.final_tables[a + "crop"] = torch.zeros(len(axis.start), dtype=torch.long, device=device)
            self._paste_tables(self.final_tables, a, axis, device)

    @staticmethod
    def _paste_tables(t: dict, a: str, axis: _Axis, device) -> None:
        t[a + "src"] = torch.tensor(axis.src_start, device=device)
        t[a + "lo"] = torch.tensor([lo for lo, _ in axis.changed], device=device)
        t[a + "hi"] = torch.tensor([hi for _, hi in axis.changed], device=device)

    @staticmethod
    def _avg_counts(axis: _Axis, include_pad: bool, dtype, device) -> Tensor:
        """PyTorch's divisor of average pooling along one axis, per output."""
        start = torch.arange(axis.n_out, device=device) * axis.stride - axis.pad
        end = (start + axis.kernel).clamp(max=axis.n_in + axis.pad)
        if not include_pad:
            start, end = start.clamp(min=0), end.clamp(max=axis.n_in)
        return (end - start).to(dtype)

    # -- setup -------------------------------------------------------------------------------
    def fill_caches(self, images: Tensor) -> None:
        """Run the unoccluded images through the chain, keeping each window layer's padded input and
        the last call's output; the forward pass stops there."""
        wanted = {layer.call: layer for layer in self.plan.layers if layer.kind != "elementwise"}
        last = self.plan.switch - 1
        done = [0]

        def pre_hook(module, args):
            layer = wanted.get(done[0])
            if layer is not None:
                x = args[0].detach()
                value = float("-inf") if layer.kind == "max" else 0.0  # max pools pad with -inf
                padded = F.pad(x, (layer.x.pad, layer.x.pad_after, layer.y.pad, layer.y.pad_after), value=value)
                layer.cache = padded.permute(0, 2, 3, 1).contiguous()
                views = layer.cache.unfold(1, layer.y.crop, 1).unfold(2, layer.x.crop, 1)
                layer.crops = views.permute(0, 1, 2, 4, 5, 3)

        def post_hook(module, args, out):
            if done[0] == last:
                self.channels_last = (out.is_contiguous(memory_format=torch.channels_last)
                                      and not out.is_contiguous())
                self.last = out.detach().permute(0, 2, 3, 1).contiguous()
                raise _Stop
            done[0] += 1

        handles = []
        try:
            for m in {id(c.module): c.module for c in self.calls[:self.plan.switch]}.values():
                handles.append(m.register_forward_pre_hook(pre_hook))
                handles.append(m.register_forward_hook(post_hook))
            with torch.inference_mode():
                try:
                    self.model(images)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()

    def cache_bytes(self) -> int:
        """Bytes of the cached activations (the padded inputs of the window layers, the last map)."""
        tensors = [layer.cache for layer in self.plan.layers if layer.cache is not None] + [self.last]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def check(self, images: Tensor, logits: Tensor) -> bool:
        """The swapped forward, fed the cached maps of the unoccluded images, runs the same modules
        in the same order and returns the same logits as the model."""
        order: list[int] = []
        handles = [m.register_forward_pre_hook(lambda module, args: order.append(id(module)))
                   for m in _leaves(self.model)]
        try:
            with self, torch.inference_mode():
                self._next = self._to_maps(self.last.clone())
                out = self.model(images)
        except Exception:  # noqa: BLE001 - a forward that cannot take the swap: not a usable chain
            return False
        finally:
            for h in handles:
                h.remove()
            self._next = None
        if order != [id(c.module) for c in self.calls] or not torch.is_tensor(out) or out.shape != logits.shape:
            return False
        scale = float(logits.abs().max()) if logits.numel() else 1.0
        return bool(torch.allclose(out, logits, rtol=1e-5, atol=1e-6 * max(scale, 1e-30)))

    # -- swapping the chain out -------------------------------------------------------------
    def _first(self, *args, **kwargs):
        value, self._next = self._next, None
        if value is None:
            raise RuntimeError("incremental occlusion: the chain's first module ran without its maps")
        return value

    def __enter__(self) -> IncrementalRunner:
        first = self.calls[0].module
        for m in {id(c.module): c.module for c in self.calls[:self.plan.switch]}.values():
            m.__dict__["forward"] = self._first if m is first else _pass_through
            self._swapped.append(m)
        return self

    def __exit__(self, *exc) -> None:
        while self._swapped:
            self._swapped.pop().__dict__.pop("forward", None)

    # -- one chunk ---------------------------------------------------------------------------
    def _to_maps(self, nhwc: Tensor) -> Tensor:
        maps = nhwc.permute(0, 3, 1, 2)
        return maps if self.channels_last else maps.contiguous()

    @staticmethod
    def _paste(base: Tensor, window_: Tensor, t: dict, axes: tuple[_Axis, _Axis], pi: Tensor, pj: Tensor,
               indexing: bool) -> Tensor:
        """`base` [B, h, w, C]: the cached values of a crop whose rows are inputs t['ycrop'][pi] + r
        (columns likewise); paste the changed values of `window_` [B, h', w', C] (inputs
        t['ysrc'][pi] + r) into it. With `indexing`, the whole window, which lies inside the crop;
        otherwise, under a mask, the part inside the crop, only over the changed intervals (a new
        tensor is returned)."""
        ay, ax = axes
        b = torch.arange(base.shape[0], device=base.device)[:, None, None]
        hy, hx = window_.shape[1], window_.shape[2]
        if indexing:
            rows = (t["ysrc"][pi] - t["ycrop"][pi])[:, None] + torch.arange(hy, device=base.device)
            cols = (t["xsrc"][pj] - t["xcrop"][pj])[:, None] + torch.arange(hx, device=base.device)
            base[b, rows[:, :, None], cols[:, None, :]] = window_
            return base
        # every entry of the crop that holds a changed value of the window, chosen with a mask over
        # the crop (a gather and a where: no boolean indexing, which would wait for the device)
        rows = t["ycrop"][pi][:, None] + torch.arange(base.shape[1], device=base.device)   # input rows of the crop
        cols = t["xcrop"][pj][:, None] + torch.arange(base.shape[2], device=base.device)
        wy, wx = rows - t["ysrc"][pi][:, None], cols - t["xsrc"][pj][:, None]              # rows in the window
        keep_y = (wy >= 0) & (wy < hy) & (rows >= t["ylo"][pi][:, None]) & (rows < t["yhi"][pi][:, None])
        keep_x = (wx >= 0) & (wx < hx) & (cols >= t["xlo"][pj][:, None]) & (cols < t["xhi"][pj][:, None])
        values = window_[b, wy.clamp(0, hy - 1)[:, :, None], wx.clamp(0, hx - 1)[:, None, :]]
        return torch.where((keep_y[:, :, None] & keep_x[:, None, :])[..., None], values, base)

    def full_maps(self, image: Tensor, position: Tensor) -> Tensor:
        """The chain's last output for a chunk of occluded copies, [B, C, H, W]."""
        device = image.device
        pi, pj = position // self.columns, position % self.columns
        ramp = torch.arange(self.patch, device=device)
        rows, cols = pi[:, None] * self.stride + ramp, pj[:, None] * self.stride + ramp
        d = self.fill[rows[:, :, None], cols[:, None, :]]             # [B, patch, patch, C]
        for layer in self.plan.layers:
            m = layer.module
            if layer.kind == "elementwise":
                # the class's forward: the instance's is swapped out while the runner is active
                d = type(m).forward(m, d.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                continue
            t, ay, ax = layer.tables, layer.y, layer.x
            # every crop at once from a view of the cache over all crop positions: [N, H'', W'', h, w, C]
            crop = layer.crops[image, t["ycrop"][pi] + ay.pad, t["xcrop"][pj] + ax.pad]
            crop = self._paste(crop, d, t, (ay, ax), pi, pj, layer.indexing)
            x = crop.permute(0, 3, 1, 2)
            if layer.kind == "conv":
                out = F.conv2d(x, layer.weight, m.bias, m.stride, 0, m.dilation, m.groups)
            elif layer.kind == "max":
                out = F.max_pool2d(x, m.kernel_size, m.stride, 0, m.dilation, False)
            else:
                out = F.avg_pool2d(x, m.kernel_size, m.stride, 0, False, True, 1)  # window sums
                if m.divisor_override:
                    out = out / m.divisor_override
                else:
                    cy = t["ycount"][t["yout"][pi][:, None] + torch.arange(ay.size, device=device)]
                    cx = t["xcount"][t["xout"][pj][:, None] + torch.arange(ax.size, device=device)]
                    out = out / (cy[:, None, :, None] * cx[:, None, None, :])
            d = out.permute(0, 2, 3, 1)
        full = self.last[image]
        full = self._paste(full, d, self.final_tables, self.plan.final, pi, pj, self.plan.exact)
        return self._to_maps(full)

    def __call__(self, occluded: Tensor, image: Tensor, position: Tensor) -> Tensor:
        self._next = self.full_maps(image, position)
        try:
            return self.model(occluded)
        finally:
            self._next = None


def prepare(model: nn.Module, images: Tensor, recorded: RecordedForward, patch: int, stride: int, fill: Tensor,
            tau: float | None, force: bool) -> IncrementalRunner | None:
    """The incremental path for this model, images and patch geometry, or None where it is not
    exact or (unless `force`) not estimated to pay; with `force`, an OcclusionError instead of None.
    The model must be in eval mode (occlusion_maps sees to it)."""
    def no(reason: str) -> None:
        if force:
            raise OcclusionError(f"incremental occlusion cannot run on this model: {reason}; pass "
                                 f"incremental=None (automatic) or incremental=False (batched forward)")
        return None

    if _global_hooks():
        return no("global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook)")
    calls = recorded.calls
    chain = _chain_length(calls, recorded.images_id)
    if chain == 0:
        first = type(calls[0].module).__name__ if calls else "no module"
        return no(f"its forward does not start with a plain chain of Conv2d (zero padding), MaxPool2d, "
                  f"AvgPool2d, BatchNorm2d or elementwise modules without hooks, applied to the input "
                  f"itself (the first module run is {first})")
    N, C, H, W = images.shape
    plan = _plan(calls, chain, H, W, patch, stride, tau, force)
    if plan is None:
        return no("no leading part of the chain can be swapped out: its modules run again later, or the "
                  "first layer's window already covers its whole map")
    names = {m: n for n, m in model.named_modules()}
    runner = IncrementalRunner(model, calls, plan, fill, patch, stride, (W - patch) // stride + 1, names)
    runner.fill_caches(images)
    if runner.last is None or not runner.check(images, recorded.logits):
        return no("the forward reads the chain's intermediate maps elsewhere (e.g. a skip connection), or "
                  "runs differently when the chain's maps are substituted")
    return runner
