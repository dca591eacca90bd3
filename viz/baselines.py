"""The baselines of kernel interpretation by suppression, as estimated inputs X̂.

Follows Zhuang et al., "Understanding of Kernels in CNN Models by Suppressing Irrelevant Visual
Features in Images" (2021, arXiv:2108.11054), section 4.2 ("Effect of suppression"), Table 1
and Figs. 2, 4, 5: the deconvnet (Deconv, Zeiler & Fergus, ECCV 2014, arXiv:1311.2901), guided
backpropagation (GBP, Springenberg et al., 2015, arXiv:1412.6806) and layer-wise relevance
propagation (LRP, Bach/Binder et al.) each give, for kernel i of a layer and an image X, "the
estimated input" X̂, which is fed to the net and scored with the same metrics as the suppression
method (`viz.suppression.evaluate`: SSIM of the kernel's map, MSE of the
other kernels' maps).

Every method starts from the kernel's own map F_i (the layer's output, rectified as
`viz.suppression.feature_maps` says; every other map of the layer zero) and walks back to the input:
- "deconv": `viz.deconvnet.project` (ReLUs of the backward signal, unpooling by switches, transposed
  convolutions; biases ignored);
- "guided_backprop": `captum.attr.GuidedBackprop` on the gradient of 0.5 * sum(F_i ** 2), whose
  gradient at the layer is F_i itself (ReLUs pass only positive gradient where their input is positive);
- "lrp": `captum.attr.LRP` with captum's default rules (epsilon rule for Conv2d, pooling, BatchNorm2d;
  ReLU and Dropout pass the relevance unchanged) on the relevance of mean(F_i), which the average
  spreads over the map in proportion to F_i.

How an attribution A becomes an input. The paper shows the estimated inputs as images but does not
say how they are scaled before being fed back; here (`as_input`), for each image, A is scaled into
the value range of X (model input space):
- "minmax" (default, how such attributions are displayed): min A -> min X, max A -> max X;
- "symmetric": A * max|X| / max|A|, which keeps A = 0 at the input 0 (the dataset's mean color with
  our normalizations: no content, the value the suppression method's regularization pulls towards).
An all-zero attribution (a kernel silent on the image) becomes the constant mid-range input
("minmax") or the zero input ("symmetric").

The three methods walk back along the chain of leaf modules that runs up to `layer`
(`viz.layers.trace_chain`), rebuilt as an nn.Sequential sharing the model's modules; a model whose
forward does more than run that chain (a residual addition, a functional call) is refused with a
message. The model's train/eval mode, parameters' `requires_grad` flags and hooks are restored,
also on error; works under torch.no_grad() and torch.inference_mode().
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn

from convlens.viz.layers import eval_mode, get_layer, trace_chain
from convlens.viz.common import frozen, gradients
from convlens.viz.deconvnet import project
from convlens.viz.suppression import SuppressionError, _as_unit, _check_images, _resolve_rectify, feature_maps

__all__ = ["BASELINES", "SCALINGS", "BaselineError", "kernel_attribution", "as_input", "baseline_inputs"]

BASELINES = ("deconv", "guided_backprop", "lrp")
SCALINGS = ("minmax", "symmetric")


class BaselineError(SuppressionError):
    """Bad arguments, or a model a baseline cannot walk back."""


class _HalfEnergy(nn.Module):
    """[N, K, h, w] -> [N, K]: 0.5 * sum of squares per map; its gradient at a map is the map itself."""

    def forward(self, maps: Tensor) -> Tensor:
        return 0.5 * maps.pow(2).sum(dim=(2, 3))


def _chain(model: nn.Module, images: Tensor, layer: str, rectify: bool) -> nn.Sequential:
    """The leaf modules run up to `layer`, as an nn.Sequential sharing the model's modules (plus a
    fresh ReLU when the maps are rectified); checked to reproduce the layer's maps."""
    with torch.no_grad():
        trace = trace_chain(model, images, layer)
        if list(trace[-1].module.children()):  # a container layer: its leaves are the chain
            trace = trace[:-1]
        modules = [step.module for step in trace]
        if rectify:
            modules.append(nn.ReLU())
        chain = nn.Sequential(*modules)
        with eval_mode(model):
            rebuilt = chain(images)
    expected = feature_maps(model, images, layer, rectify)
    if rebuilt.shape != expected.shape or not torch.allclose(rebuilt, expected, rtol=1e-4, atol=1e-5):
        raise BaselineError(
            f"The model is not a plain chain of modules up to layer {layer!r}: running its leaf modules "
            f"({', '.join(step.name for step in trace)}) one after the other does not give the layer's "
            "output. Its forward applies operations that are not modules (a residual addition, F.relu, "
            "a reshape...), which the baselines cannot walk back. Make them modules, or pick an "
            "earlier layer")
    return chain


def check_method(method: str) -> None:
    if method not in BASELINES:
        raise BaselineError(f"Unknown baseline {method!r}; use one of {', '.join(BASELINES)}")


@contextlib.contextmanager
def _lrp_attributes_restored(modules: list[nn.Module]) -> Iterator[None]:
    """captum's LRP sets `rule` and `activations` on each module and does not remove `activations`
    (which holds the layer inputs): put both back as they were."""
    missing = object()
    saved = [(m, getattr(m, "rule", missing), getattr(m, "activations", missing)) for m in modules]
    try:
        yield
    finally:
        for m, rule, activations in saved:
            for name, value in (("rule", rule), ("activations", activations)):
                if value is missing:
                    if name in m.__dict__:
                        delattr(m, name)
                else:
                    setattr(m, name, value)


def _lrp(chain: nn.Sequential, x: Tensor, unit: Tensor) -> Tensor:
    from captum.attr import LRP
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS

    supported = tuple(SUPPORTED_LAYERS_WITH_RULES) + tuple(SUPPORTED_NON_LINEAR_LAYERS)
    for i, m in enumerate(chain):
        if type(m) not in supported:
            raise BaselineError(
                f"LRP: module {i} of the chain ({type(m).__name__}) has no LRP rule in captum; "
                f"supported: {', '.join(t.__name__ for t in supported)}")
    if len({id(m) for m in chain}) != len(chain):
        raise BaselineError("LRP: a module runs more than once up to the layer (a shared module), "
                            "which captum's LRP does not support")
    head = nn.Sequential(*chain, nn.AdaptiveAvgPool2d(1))
    with _lrp_attributes_restored(list(head)):
        return LRP(head).attribute(x, target=[(int(c), 0, 0) for c in unit])


def _guided_backprop(chain: nn.Sequential, x: Tensor, unit: Tensor) -> Tensor:
    from captum.attr import GuidedBackprop

    head = nn.Sequential(*chain, _HalfEnergy())
    return GuidedBackprop(head).attribute(x, target=unit.tolist())


def kernel_attribution(model: nn.Module, images: Tensor, layer: str, unit: int | Tensor,
                       method: str, rectify: bool | None = None) -> Tensor:
    """[N, C, H, W]: the raw attribution of kernel `unit`'s map of `layer` to each image's
    pixels by `method` ("deconv", "guided_backprop" or "lrp"; see the module docstring).

    `unit`: an int (the same kernel for every image) or an integer tensor [N]. `rectify`: as in
    `viz.suppression.feature_maps` (None: auto)."""
    check_method(method)
    _check_images(images)
    get_layer(model, layer)  # LayerError naming the valid layers
    with gradients():
        x = images.detach().clone()  # a normal tensor, also under inference_mode
        x.requires_grad_(method != "deconv")
        rectify = _resolve_rectify(model, x, layer, rectify)
        with eval_mode(model), frozen(model), warnings.catch_warnings():
            # captum announces the hooks it sets and removes on ReLUs: expected here
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU", category=UserWarning)
            chain = _chain(model, x, layer, rectify)
            k = feature_maps(model, x[:1], layer, rectify).shape[1]
            c = _as_unit(unit, x.shape[0], k, layer, x.device)
            if method == "deconv":
                out = project(chain, x, str(len(chain) - 1), c)
            elif method == "guided_backprop":
                out = _guided_backprop(chain, x, c)
            else:
                out = _lrp(chain, x, c)
    return out.detach().to(images.dtype)


def as_input(attribution: Tensor, images: Tensor, scaling: str = "minmax") -> Tensor:
    """The attribution as an input X̂ in each image's value range (see the module docstring):
    "minmax" maps [min A, max A] onto [min X, max X] per image, "symmetric" scales A by
    max|X| / max|A| (zero stays zero)."""
    if scaling not in SCALINGS:
        raise BaselineError(f"Unknown scaling {scaling!r}; use 'minmax' or 'symmetric'")
    if attribution.shape != images.shape:
        raise BaselineError(f"attribution {list(attribution.shape)} and images {list(images.shape)} "
                            "must have the same shape")
    n = images.shape[0]
    a, x = attribution.reshape(n, -1), images.reshape(n, -1)
    tiny = torch.finfo(a.dtype).tiny
    if scaling == "symmetric":
        peak = a.abs().amax(1, keepdim=True)
        out = torch.where(peak > 0, a * x.abs().amax(1, keepdim=True) / peak.clamp_min(tiny), torch.zeros_like(a))
    else:
        lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
        x_lo, x_hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        spread = hi - lo
        out = torch.where(spread > 0, x_lo + (a - lo) / spread.clamp_min(tiny) * (x_hi - x_lo),
                          ((x_lo + x_hi) / 2).expand_as(a))
    return out.reshape(images.shape)


def baseline_inputs(model: nn.Module, images: Tensor, layer: str, unit: int | Tensor, method: str,
                    scaling: str = "minmax", rectify: bool | None = None) -> Tensor:
    """[N, C, H, W]: the estimated input X̂ of `method` for kernel `unit` of `layer`: its
    attribution (`kernel_attribution`) scaled into each image's range (`as_input`)."""
    if scaling not in SCALINGS:
        raise BaselineError(f"Unknown scaling {scaling!r}; use 'minmax' or 'symmetric'")
    return as_input(kernel_attribution(model, images, layer, unit, method, rectify), images, scaling)
