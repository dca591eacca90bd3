"""Layer lookup and module-chain tracing shared by every visualization method.

Methods take a layer as a dotted name from `model.named_modules()` (`conv3`, `net.conv3`,
`features.28`). A "chain" is the sequence of leaf modules a forward pass runs through, in order,
which is what deconvnet projection and filter decoding walk back along.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


class LayerError(ValueError):
    """An unknown layer name, or a layer a method cannot use; the message lists what can be used."""


def _show(names: list[str], limit: int = 40) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def layer_names(model: nn.Module, kind: type | tuple[type, ...] | None = None) -> list[str]:
    """Dotted names of the leaf modules of `model` (of type `kind` when given), in definition order."""
    return [n for n, m in model.named_modules()
            if n and not list(m.children()) and (kind is None or isinstance(m, kind))]


def get_layer(model: nn.Module, name: str, kind: type | tuple[type, ...] | None = None) -> nn.Module:
    """The module called `name`; a LayerError naming the valid choices when there is none."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise LayerError(f"Unknown layer {name!r}. Valid layer names: {_show(layer_names(model, kind) or layer_names(model))}")
    module = modules[name]
    if kind is not None and not isinstance(module, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise LayerError(
            f"Layer {name!r} is a {type(module).__name__}, not a {' or '.join(k.__name__ for k in kinds)}. "
            f"Valid choices: {_show(layer_names(model, kind))}"
        )
    return module


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass
class ChainStep:
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input: torch.Tensor | None = field(default=None, repr=False)
    output: torch.Tensor | None = field(default=None, repr=False)
    #: which tensor the module received / returned, as it was then (see `_identity`)
    input_id: tuple | None = field(default=None, repr=False)
    output_id: tuple | None = field(default=None, repr=False)


def _identity(x) -> tuple | None:
    """Memory, layout and in-place version counter of a tensor: equal identities mean the same
    tensor, not written to in between (every in-place op bumps `_version`)."""
    if not torch.is_tensor(x) or x.is_inference():  # inference tensors have no version counter
        return None
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype,
            x._version)


class _StopForward(Exception):
    pass


def trace_chain(model: nn.Module, images: torch.Tensor, layer: str,
                keep_tensors: bool = False) -> list[ChainStep]:
    """Run `images` through `model` in eval mode up to and including `layer`, recording every leaf
    module executed, in order. The forward pass stops right after `layer` (nothing past it runs).

    With `keep_tensors`, each step keeps a copy of its input and output (copies, because an
    in-place ReLU would otherwise overwrite them); an input that is the previous step's output,
    unchanged, shares that copy. Hooks are removed and every submodule's mode is restored, also on
    error. Raises LayerError when `layer` is unknown or is never reached.
    """
    target = get_layer(model, layer)
    steps: list[ChainStep] = []
    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not list(m.children())]
    if target not in leaves:
        leaves.append(target)  # a container (e.g. a block) may be the target too

    def pre_hook(module, args):
        if module is target and list(module.children()):
            return  # a container target: its leaves record themselves
        x = args[0] if args else None
        x_id = _identity(x)
        kept = None
        if keep_tensors and torch.is_tensor(x):
            same = steps and x_id is not None and steps[-1].output_id == x_id
            kept = steps[-1].output if same else x.detach().clone()
        steps.append(ChainStep(names[module], module, tuple(x.shape) if torch.is_tensor(x) else (), (),
                               kept, input_id=x_id))

    def post_hook(module, args, out):
        if module is target and list(module.children()):
            x = args[0]
            steps.append(ChainStep(names[module], module, tuple(x.shape), tuple(out.shape),
                                   x.detach().clone() if keep_tensors else None,
                                   out.detach().clone() if keep_tensors else None))
            raise _StopForward
        step = steps[-1]
        step.out_shape = tuple(out.shape) if torch.is_tensor(out) else ()
        step.output_id = _identity(out)
        if keep_tensors and torch.is_tensor(out):
            step.output = out.detach().clone()
        if module is target:
            raise _StopForward

    handles = []
    try:
        for m in leaves:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        with eval_mode(model):
            try:
                model(images)
            except _StopForward:
                pass
            else:
                raise LayerError(f"Layer {layer!r} was not run by the model's forward pass")
    finally:
        for h in handles:
            h.remove()
    return steps


def layer_output(model: nn.Module, images: torch.Tensor, layer: str | nn.Module) -> torch.Tensor:
    """The output of `layer` (a dotted name or the module itself) for `images`, in eval mode without
    gradients; the forward pass stops right after it. A copy (an in-place ReLU would overwrite it).
    Modes and hooks are restored, also on error."""
    module = get_layer(model, layer) if isinstance(layer, str) else layer
    captured: list[torch.Tensor] = []

    def hook(_module, _args, out):
        captured.append(out.detach().clone())
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model):
            try:
                model(images)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise LayerError(f"Layer {layer if isinstance(layer, str) else type(layer).__name__} "
                         "was not run by the model's forward pass")
    return captured[0]


def check_chain(steps: list[ChainStep], images: torch.Tensor, error: type[Exception], remedy: str,
                allow_functional_relu: bool = False) -> None:
    """Raise `error` unless every step of a `trace_chain(..., keep_tensors=True)` consumes exactly the
    previous step's output (the first one: `images`), i.e. the model is a plain chain of modules up
    to there. `allow_functional_relu` accepts a functional ReLU between two modules (methods that
    pass ReLUs through). `remedy` ends the message: what the method needs and what to do."""
    previous, previous_id, previous_name = images, _identity(images), "the input images"
    for step in steps:
        x = step.input
        # the very tensor the previous module returned, untouched: no need to compare values
        same = step.input_id is not None and step.input_id == previous_id
        ok = same or x is not None and x.shape == previous.shape and (
            torch.equal(x, previous) or (allow_functional_relu and torch.equal(x, previous.clamp_min(0))))
        if not ok:
            raise error(
                f"The model is not a plain chain of modules: the input of layer {step.name!r} is not the "
                f"output of {previous_name}; an operation that is not a module (a residual addition, a "
                f"branch, a functional call such as F.relu or F.max_pool2d) runs in between. {remedy}")
        previous, previous_id, previous_name = step.output, step.output_id, repr(step.name)
