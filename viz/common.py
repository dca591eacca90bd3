"""What every method checks and needs, in one place: argument checks, the error base, running a
forward pass only up to a layer, gradients on for a block, and the geometry of window modules.

Every `viz` function raises a subclass of `VizError` (itself a `ValueError` and a
`convlens.errors.ConvlensError`) for an argument or model it cannot use, with a message that says
what to pass instead; the command lines print those as one line.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from convlens.errors import ConvlensError

__all__ = ["VizError", "LayerError", "check_images", "check_int", "check_number", "check_units", "class_targets",
           "eval_mode", "frozen", "gradients", "forward_until", "Window", "window", "window_matrix",
           "adaptive_window_matrix"]


class VizError(ConvlensError, ValueError):
    """The base of every error a `viz` function raises for an argument or a model it cannot use."""


class LayerError(VizError):
    """An unknown layer name, or a layer a method cannot use; the message lists what can be used."""


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

def check_images(images, error: type[Exception] = VizError, name: str = "images") -> None:
    """A non-empty floating point batch [N, C, H, W], else `error` saying what to pass."""
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = list(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise error(f"{name} must be a batch tensor [N, C, H, W], got {shape}; "
                    "for a single image pass image.unsqueeze(0)")
    if images.shape[0] == 0:
        raise error(f"{name} is an empty batch (N = 0); pass at least one image")
    if not images.is_floating_point():
        raise error(f"{name} must be a floating point tensor (model input space), got dtype {images.dtype}")


def check_int(name: str, value, minimum: int, error: type[Exception] = VizError, what: str = "") -> int:
    """An int (not a bool) >= `minimum`, else `error` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise error(f"{name} must be an int >= {minimum}{what}, got {value!r}")
    return int(value)


def check_number(name: str, value, minimum: float, strict: bool = False,
                 error: type[Exception] = VizError, what: str = "") -> float:
    """A finite number >= `minimum` (> with `strict`), else `error` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise error(f"{name} must be a finite number {bound}{what}, got {value!r}")
    return float(value)


def check_units(units, n: int, num_units: int, layer: str, error: type[Exception] = VizError,
                matrix: bool = False, what: str = "units") -> Tensor:
    """Validated LongTensor of unit (output channel) indices into a layer with `num_units` units:
    [n] (an int or a 0-d tensor is broadcast), or [n, k] with `matrix`. A normal tensor (cloned),
    also when the caller's is an inference tensor."""
    want = f"[N, k] = [{n}, k]" if matrix else f"[N] = [{n}]"
    if isinstance(units, bool) or not (isinstance(units, numbers.Integral) or torch.is_tensor(units)):
        raise error(f"unit must be an int or an integer tensor {want}, got {type(units).__name__}")
    if isinstance(units, numbers.Integral):
        if matrix:
            raise error(f"units must be an integer tensor {want}, got an int")
        t = torch.full((n,), int(units), dtype=torch.long)
    else:
        if units.is_floating_point() or units.is_complex() or units.dtype == torch.bool:
            raise error(f"unit indices must be an integer tensor, got dtype {units.dtype}")
        if units.dim() == 0 and not matrix:
            units = units.expand(n)
        if units.dim() != (2 if matrix else 1) or units.shape[0] != n:
            raise error(f"unit tensor must have shape {want} (one row per image), got {list(units.shape)}")
        t = units.long().clone()
    if t.numel() and (t.min() < 0 or t.max() >= num_units):
        bad = t[(t < 0) | (t >= num_units)][0].item()
        raise error(f"unit {bad} is out of range for layer {layer!r}, which has {num_units} {what}: "
                    f"valid units are 0..{num_units - 1}")
    return t


#: the earlier name of `check_units`
check_channels = check_units


def class_targets(target, scores: Tensor, error: type[Exception] = VizError) -> Tensor:
    """[N] long class indices from `target` for class scores [N, num_classes]: None (each image's
    predicted class, the argmax, first on ties), an int (one class for all), or an integer
    sequence/tensor with one class per image."""
    if not torch.is_tensor(scores) or scores.dim() != 2:
        raise error(f"the model must return class scores [N, num_classes], got "
                    f"{list(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}")
    n, num_classes = scores.shape
    if target is None:
        return scores.detach().argmax(1)
    if isinstance(target, bool) or not isinstance(target, (numbers.Integral, Tensor, list, tuple)):
        raise error(f"target must be None (predicted class), an int or an integer tensor [N], "
                    f"got {type(target).__name__}")
    if isinstance(target, numbers.Integral):
        t = torch.full((n,), int(target), dtype=torch.long, device=scores.device)
    else:
        target = torch.as_tensor(target)
        if target.is_floating_point() or target.dtype == torch.bool or target.reshape(-1).shape != (n,):
            raise error(f"a target tensor must hold one integer class per image, shape [{n}], "
                        f"got {target.dtype} {list(target.shape)}")
        t = target.reshape(-1).to(device=scores.device, dtype=torch.long)
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise error(f"target class {bad} is out of range: the model has {num_classes} classes "
                    f"(0..{num_classes - 1})")
    return t


# --------------------------------------------------------------------------------------------
# Model state: modes, gradients, parameters
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode for the block, then each one's own flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters with requires_grad=False for the block (no parameter gradient is computed or
    accumulated), each flag restored afterwards, also on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def gradients(model: nn.Module | None = None) -> Iterator[None]:
    """Gradients on for the block, also when the caller is under no_grad() or inference_mode(),
    and `model` (when given) in eval mode."""
    with torch.inference_mode(False), torch.enable_grad():
        if model is None:
            yield
        else:
            with eval_mode(model):
                yield


class _StopForward(Exception):
    pass


def forward_until(model: nn.Module, images: Tensor, module: nn.Module, name: str = "the layer",
                  hook=None) -> Tensor:
    """Run `model(images)` only up to `module`: the forward pass stops right after its first run
    and its output is returned as it is (not detached; `hook(output)`, when given, may replace
    it first, e.g. with a copy). Modes, gradients and no_grad are the caller's; the hook is
    removed, also on error. A LayerError when `module` does not run."""
    captured: list = []

    def stop(_module, _args, out):
        captured.append(hook(out) if hook is not None else out)
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise LayerError(f"Layer {name} was not run by the model's forward pass")
    return captured[0]


# --------------------------------------------------------------------------------------------
# Geometry of window modules (convolutions and pools)
# --------------------------------------------------------------------------------------------

class Window(NamedTuple):
    """Per axis (rows, columns): kernel, stride, padding before the first position, dilation."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_before: tuple[int, int]
    dilation: tuple[int, int]


def _conv_pad_before(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "same":  # PyTorch pads total // 2 before, the odd pixel after
        return tuple(m.dilation[a] * (m.kernel_size[a] - 1) // 2 for a in range(2))
    if m.padding == "valid":
        return 0, 0
    return _pair(m.padding)


def window(m: nn.Module) -> Window | None:
    """The sliding window of a conv, max/avg/LP pool; None for other modules (adaptive pools
    included, which have no fixed window)."""
    if isinstance(m, nn.Conv2d):
        return Window(_pair(m.kernel_size), _pair(m.stride), _conv_pad_before(m), _pair(m.dilation))
    if isinstance(m, nn.MaxPool2d):
        k = _pair(m.kernel_size)
        return Window(k, _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(m.dilation))
    if isinstance(m, nn.AvgPool2d):
        k = _pair(m.kernel_size)
        return Window(k, _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding), (1, 1))
    if isinstance(m, nn.LPPool2d):
        k = _pair(m.kernel_size)
        return Window(k, _pair(m.stride if m.stride is not None else m.kernel_size), (0, 0), (1, 1))
    return None


def _padded_source(q: Tensor, n: int, mode: str) -> Tensor:
    """The input position a (padded) tap position reads, or -1 for zero padding."""
    if mode == "zeros":
        return torch.where((q >= 0) & (q < n), q, -1)
    if mode == "replicate":
        return q.clamp(0, n - 1)
    if mode == "circular":
        return q.remainder(n)
    if mode == "reflect":  # -1 -> 1, n -> n - 2 (the edge is not repeated)
        period = 2 * (n - 1) if n > 1 else 1
        r = q.abs().remainder(period)
        return torch.where(r < n, r, period - r)
    raise VizError(f"Unknown padding_mode {mode!r}")


def window_matrix(n_in: int, n_out: int, kernel: int, stride: int, pad_before: int, dilation: int = 1,
                  padding_mode: str = "zeros", device=None, dtype=torch.bool) -> Tensor:
    """[n_out, n_in] 0/1 matrix along one axis: output o reads the inputs o*stride - pad_before +
    t*dilation, t < kernel (taps in zero padding read nothing; other padding modes read the pixel
    they copy)."""
    taps = (torch.arange(n_out, device=device)[:, None] * stride - pad_before
            + torch.arange(kernel, device=device)[None, :] * dilation)          # [n_out, kernel]
    source = _padded_source(taps, n_in, padding_mode)
    m = torch.zeros(n_out, n_in + 1, dtype=torch.bool, device=device)        # last column: padding
    m[torch.arange(n_out, device=device)[:, None].expand_as(source), torch.where(source >= 0, source, n_in)] = True
    return m[:, :n_in].to(dtype)


def adaptive_window_matrix(n_in: int, n_out: int, device=None, dtype=torch.bool) -> Tensor:
    """[n_out, n_in] 0/1 matrix of adaptive pooling windows: [floor(o*in/out), ceil((o+1)*in/out))."""
    o = torch.arange(n_out, device=device)
    start = (o * n_in) // n_out
    end = ((o + 1) * n_in + n_out - 1) // n_out
    i = torch.arange(n_in, device=device)
    return ((i[None, :] >= start[:, None]) & (i[None, :] < end[:, None])).to(dtype)
