"""Layer lookup and module-chain tracing shared by every visualization method.

Methods take a layer as a dotted name from `model.named_modules()` (`conv3`, `net.conv3`,
`features.28`). A "chain" is the sequence of leaf modules a forward pass runs through, in order,
which is what filter decoding and the baselines walk back along.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from convlens.viz.common import LayerError, eval_mode, forward_until

__all__ = ["LayerError", "layer_names", "get_layer", "eval_mode", "trace_chain", "layer_output",
           "check_chain", "chain_prefix", "default_conv_layers", "layer_maxima", "rank_units", "ALL_CONVS_UP_TO",
           "input_module", "spatial_problems"]


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
        valid = layer_names(model, kind) or layer_names(model)
        raise LayerError(f"Unknown layer {name!r}. Valid layer names: {_show(valid)}")
    module = modules[name]
    if kind is not None and not isinstance(module, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise LayerError(
            f"Layer {name!r} is a {type(module).__name__}, not a {' or '.join(k.__name__ for k in kinds)}. "
            f"Valid choices: {_show(layer_names(model, kind))}"
        )
    return module


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


def trace_chain(model: nn.Module, images: torch.Tensor, layer: str | None,
                keep_tensors: bool = False) -> list[ChainStep]:
    """Run `images` through `model` in eval mode up to and including `layer`, recording every leaf
    module executed, in order. The forward pass stops right after `layer` (nothing past it runs).
    `layer=None`: the whole forward pass; an error raised by the model on the way (e.g. a head that
    wants another input size) ends the trace there instead of propagating.

    With `keep_tensors`, each step keeps a copy of its input and output (copies, because an
    in-place ReLU would otherwise overwrite them); an input that is the previous step's output,
    unchanged, shares that copy. Hooks are removed and every submodule's mode is restored, also on
    error. Raises LayerError when `layer` is unknown or is never reached.
    """
    target = get_layer(model, layer) if layer is not None else None
    steps: list[ChainStep] = []
    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not list(m.children())]
    if target is not None and target not in leaves:
        leaves.append(target)  # a container (e.g. a block) may be the target too

    def pre_hook(module, args):
        if target is not None and module is target and list(module.children()):
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
        if target is not None and module is target and list(module.children()):
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
            except Exception:
                if layer is not None:
                    raise
                # the whole-forward trace keeps what ran before the error (a prefix of the net)
                while steps and not steps[-1].out_shape:
                    steps.pop()
            else:
                if layer is not None:
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
    name = repr(layer) if isinstance(layer, str) else type(layer).__name__
    with torch.no_grad(), eval_mode(model):
        return forward_until(model, images, module, name, hook=lambda out: out.detach().clone())


def chain_prefix(steps: list[ChainStep], images: torch.Tensor, allow_functional_relu: bool = False) -> int:
    """How many leading steps of a `trace_chain(..., keep_tensors=True)` form a plain chain: each
    consumes exactly the previous step's output (the first one: `images`), or its ReLU with
    `allow_functional_relu`. len(steps) when the whole trace is a chain."""
    previous, previous_id = images, _identity(images)
    for index, step in enumerate(steps):
        x = step.input
        # the very tensor the previous module returned, untouched: no need to compare values
        same = step.input_id is not None and step.input_id == previous_id
        ok = same or x is not None and previous is not None and x.shape == previous.shape and (
            torch.equal(x, previous) or (allow_functional_relu and torch.equal(x, previous.clamp_min(0))))
        if not ok:
            return index
        previous, previous_id = step.output, step.output_id
    return len(steps)


def check_chain(steps: list[ChainStep], images: torch.Tensor, error: type[Exception], remedy: str,
                allow_functional_relu: bool = False) -> None:
    """Raise `error` unless every step of a `trace_chain(..., keep_tensors=True)` consumes exactly the
    previous step's output (the first one: `images`), i.e. the model is a plain chain of modules up
    to there. `allow_functional_relu` accepts a functional ReLU between two modules (methods that
    pass ReLUs through). `remedy` ends the message: what the method needs and what to do."""
    index = chain_prefix(steps, images, allow_functional_relu)
    if index < len(steps):
        previous_name = repr(steps[index - 1].name) if index else "the input images"
        raise error(
            f"The model is not a plain chain of modules: the input of layer {steps[index].name!r} is not the "
            f"output of {previous_name}; an operation that is not a module (a residual addition, a "
            f"branch, a functional call such as F.relu or F.max_pool2d) runs in between. {remedy}")


#: nets with at most this many Conv2d show every one by default
ALL_CONVS_UP_TO = 6
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.LPPool2d)


def default_conv_layers(net: nn.Module, image: torch.Tensor | None = None,
                        all_up_to: int = ALL_CONVS_UP_TO) -> list[str]:
    """Conv layers that stand for the net's stages: every Conv2d if there are at most `all_up_to`.

    Otherwise, with an `image` ([1, C, H, W], model input): one conv per output resolution, in
    execution order; of the convs whose maps have that size, the last one to run among those with
    the most channels (ResNet: conv1, layer1.1.conv2, ..., layer4.1.conv2 for ResNet-18,
    layer1.2.conv3, ... for ResNet-50; DenseNet: each transition's conv; VGG16: each block's last
    conv). Convs applied to 1x1 maps that larger maps follow (squeeze-excitation gates) are not
    candidates. Without an image (definition order): the last Conv2d before each pooling layer,
    plus the last Conv2d (VGG16: features.2, 7, 14, 21, 28)."""
    convs = layer_names(net, nn.Conv2d)
    if len(convs) <= all_up_to:
        return convs
    if image is not None:
        ran = _conv_shapes(net, image)
        if ran:
            stages: dict[tuple[int, int], list[tuple[int, str]]] = {}
            for order, (name, in_shape, out_shape) in enumerate(ran):
                if len(out_shape) != 4 or len(in_shape) != 4:
                    continue
                if in_shape[2] * in_shape[3] == 1 and any(
                        len(later[2]) == 4 and later[2][2] * later[2][3] > 1 for later in ran[order + 1:]):
                    continue  # a gate on pooled maps (squeeze-excitation): larger maps follow
                stages.setdefault(tuple(out_shape[2:]), []).append((order, name, out_shape[1]))
            picked = []
            for members in stages.values():
                most = max(c for _, _, c in members)
                picked.append(max((o, n) for o, n, c in members if c == most))
            return [n for _, n in sorted(picked)]
    picked: list[str] = []
    last_conv = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif isinstance(module, _POOLS) and last_conv is not None and last_conv not in picked:
            picked.append(last_conv)
    if convs[-1] not in picked:
        picked.append(convs[-1])
    return picked


def _conv_shapes(net: nn.Module, image: torch.Tensor) -> list[tuple[str, tuple, tuple]]:
    """(name, input shape, output shape) of every Conv2d at its first run, in execution order, from
    one forward pass of `image` in eval mode without gradients (an error past the convs is ignored)."""
    names = {m: n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    seen: dict[str, tuple] = {}

    def hook(module, args, out):
        name = names[module]
        if name not in seen and args and torch.is_tensor(args[0]) and torch.is_tensor(out):
            seen[name] = (name, tuple(args[0].shape), tuple(out.shape))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad(), eval_mode(net):
            try:
                net(image)
            except Exception:
                if not seen:
                    raise
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


def layer_maxima(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """{layer: [N, K]}: each map's spatial maximum (the activity by which maps are ranked) for every
    layer of `layers` (modules with [N, K, h, w] output), from one forward pass in eval mode
    without gradients, stopped once every layer has run. Modes and hooks are restored."""
    modules = {layer: get_layer(model, layer) for layer in layers}
    maxima: dict[str, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, _args, out):
            if layer not in maxima and torch.is_tensor(out):
                if out.dim() != 4:
                    raise LayerError(f"Layer {layer!r} outputs {list(out.shape)}, not feature maps [N, K, h, w]")
                maxima[layer] = out.detach().amax(dim=(2, 3)).float()
                if len(maxima) == len(modules):
                    raise _AllSeen
        return hook

    handles = [m.register_forward_hook(keep(layer)) for layer, m in modules.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            try:
                model(images)
            except _AllSeen:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [layer for layer in layers if layer not in maxima]
    if missing:
        raise LayerError(f"Layer(s) {', '.join(map(repr, missing))} were not run by the model's forward pass")
    return maxima


def spatial_problems(model: nn.Module, image: torch.Tensor, layers: Sequence[str], needs: str = "") -> dict[str, str]:
    """{layer: why not} for each of `layers` whose output for `image` is not a stack of maps
    [N, K, h, w] (a method of spatial maps cannot use it); `needs` ends the reason (what needs them)."""
    problems = {}
    for layer in layers:
        out = layer_output(model, image, layer)
        if not torch.is_tensor(out) or out.dim() != 4:
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            problems[layer] = f"it outputs {shape}, not spatial maps [N, K, h, w]{needs}"
    return problems


class _AllSeen(Exception):
    pass


def rank_units(activity: torch.Tensor, k: int | None = None, per_image: bool = False) -> torch.Tensor:
    """The most active units, most active first, from `activity` [N, K] (`layer_maxima`, or a
    deconvnet recording's `map_maxima`): with `per_image`, each image's own top k ([N, k]);
    otherwise the top k of the mean over the images ([k]). Ties keep the lower index. `k=None`:
    every unit."""
    if not torch.is_tensor(activity) or activity.dim() != 2:
        raise LayerError(f"activity must be [N, K] (per image, per unit), got "
                         f"{list(activity.shape) if torch.is_tensor(activity) else type(activity).__name__}")
    count = activity.shape[1] if k is None else min(int(k), activity.shape[1])
    if per_image:
        return activity.argsort(dim=1, descending=True, stable=True)[:, :count]
    return activity.float().mean(0).argsort(descending=True, stable=True)[:count]


#: the earlier name of `rank_units`
rank_filters = rank_units


def input_module(net: nn.Module, layers: Sequence[str]) -> nn.Module:
    """The module whose input is the images: the net, or, when every layer lies inside one
    container child of it (a LightningModule's `self.model`), that child, which also sees the images
    when validation_step calls it directly rather than through forward."""
    heads = {layer.split(".")[0] for layer in layers}
    if len(heads) == 1 and all("." in layer for layer in layers):
        child = getattr(net, next(iter(heads)), None)
        if isinstance(child, nn.Module) and list(child.children()):
            return child
    return net
