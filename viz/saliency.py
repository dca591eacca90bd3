"""Saliency maps for a class: Grad-CAM, guided backpropagation and guided Grad-CAM.

Follows Vanrell & Arias, "Understanding and visualizing CNNs" (lecture, Master in Computer Vision
Barcelona), "Saliency based" ("Visualize the attributes of input data
being more relevant to a prediction ... Class Activation Maps (CAM): for each possible class
prediction, highlights the regions of the image that contributed the most"), which cites Selvaraju
et al., "Grad-CAM: Visual explanations from deep networks via gradient-based localization" (ICCV
2017, arXiv:1610.02391).
Written independently of captum (and tested against captum's `LayerGradCam`, `GuidedBackprop`,
`GuidedGradCam`):

- Grad-CAM of a layer with maps A^k [h, w] for class c: weights alpha_k = mean over (i, j) of
  d y^c / d A^k_ij (the gradient of the class score, a logit, spatially averaged), and
  L^c = ReLU(sum_k alpha_k A^k), at the layer's resolution (`upsample` brings it to the image's).
- Guided backpropagation (Springenberg et al., "Striving for Simplicity: The All Convolutional
  Net", 2015, arXiv:1412.6806; used by Grad-CAM's "guided Grad-CAM"): the gradient of
  y^c with respect to the input, where every ReLU module passes back only positive gradients at
  positions where its input was positive: g_in = ReLU(g_out) * [x > 0].
- Guided Grad-CAM: guided backpropagation times the Grad-CAM map upsampled to the image.

Conventions: images [N, C, H, W] in the model's input space; the model maps them to class scores
[N, num_classes] (the logits, before softmax). `target`: None (each image's predicted class, the
argmax of the scores, first on ties), an int (one class for all), or an integer tensor [N]. The
model runs in eval mode. Only `nn.ReLU` modules are guided; a ReLU applied as a function
(`F.relu`) in a forward is not (as in captum). In-place ReLUs (torchvision's VGG) are handled: the
maps and the ReLU outputs are taken before any later in-place operation changes them.

Every function works with gradients disabled or inside `torch.inference_mode()` (it computes on a
clone of the images with gradients enabled locally), never accumulates into `.grad` of the
parameters, leaves the `requires_grad` flags, the train/eval mode of every submodule, and the hooks
of the model as they were, also on error.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import VizError, check_images, class_targets, eval_mode, gradients
from convlens.viz.layers import LayerError, get_layer, layer_names, trace_chain

__all__ = ["SaliencyError", "grad_cam", "guided_backprop", "guided_grad_cam", "upsample",
           "resolve_targets", "default_saliency_layer"]


class SaliencyError(VizError):
    """Bad images, targets or model output for a saliency method."""


def _gradients(model: nn.Module):
    """Gradients on (also inside inference_mode / no_grad), model in eval mode."""
    return gradients(model)


def _input(images: Tensor) -> Tensor:
    check_images(images, SaliencyError)
    # a clone made here is an ordinary tensor even if `images` is an inference tensor
    return images.detach().clone().requires_grad_(True)


def resolve_targets(target, scores: Tensor) -> Tensor:
    """[N] long class indices from `target` (None: argmax of `scores` [N, num_classes])."""
    return class_targets(target, scores, SaliencyError)


def _class_score(scores: Tensor, target) -> tuple[Tensor, Tensor]:
    t = resolve_targets(target, scores)
    return scores.gather(1, t[:, None]).sum(), t


def grad_cam(model: nn.Module, images: Tensor, layer: str, target: int | Tensor | None = None,
             relu: bool = True) -> Tensor:
    """[N, h, w]: the Grad-CAM map of each image for its target class, at the resolution of
    `layer`'s output maps [N, K, h, w] (`relu=False`: before the final ReLU). Equal to captum's
    `LayerGradCam(model, layer).attribute(images, target, relu_attributions=relu)[:, 0]`.
    A module run several times is taken at its first run."""
    module = get_layer(model, layer)
    _input(images)  # checks before any forward
    captured: list[Tensor] = []

    def keep_maps(_module, _args, out):
        if captured:
            return None
        if not torch.is_tensor(out) or out.dim() != 4:
            raise LayerError(f"Grad-CAM needs spatial maps [N, K, h, w] from layer {layer!r}, which "
                             f"outputs {list(out.shape) if torch.is_tensor(out) else type(out).__name__}; "
                             "choose a convolutional layer (or its ReLU / pooling)")
        captured.append(out)
        # the rest of the net gets a copy: an in-place op after the layer (ReLU(inplace=True))
        # must not change the maps we keep, nor the graph from them to the score
        return out.clone()

    with _gradients(model):
        x = _input(images)  # inside inference_mode(False): a clone that autograd can use
        handle = module.register_forward_hook(keep_maps)
        try:
            scores = model(x)
        finally:
            handle.remove()
        if not captured:
            raise LayerError(f"Layer {layer!r} was not run by the model's forward pass")
        score, _ = _class_score(scores, target)
        maps = captured[0]
        (grads,) = torch.autograd.grad(score, maps)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = (weights * maps).sum(dim=1)
        if relu:
            cam = cam.relu()
    return cam.detach()


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


def _guide(_module, _args, out):
    # after the ReLU's own backward (grad * [x > 0]) this gives ReLU(grad) * [x > 0]
    return _PositiveGradient.apply(out)


def guided_backprop(model: nn.Module, images: Tensor, target: int | Tensor | None = None) -> Tensor:
    """[N, C, H, W]: guided backpropagation of each image's target class score to its pixels.
    Equal to captum's `GuidedBackprop(model).attribute(images, target)`."""
    _input(images)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    with _gradients(model):
        x = _input(images)
        handles = []
        try:
            handles = [m.register_forward_hook(_guide) for m in relus]
            scores = model(x)
        finally:
            for h in handles:
                h.remove()
        score, _ = _class_score(scores, target)
        (grads,) = torch.autograd.grad(score, x)
    return grads.detach()


def upsample(cam: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """[N, h, w] maps -> [N, H, W] (`F.interpolate`, as captum's `LayerAttribution.interpolate`)."""
    if not torch.is_tensor(cam) or cam.dim() != 3:
        raise SaliencyError(f"cam must be [N, h, w], got "
                            f"{list(cam.shape) if torch.is_tensor(cam) else type(cam).__name__}")
    return F.interpolate(cam[:, None], size=tuple(size), mode=mode)[:, 0]


def guided_grad_cam(model: nn.Module, images: Tensor, layer: str, target: int | Tensor | None = None,
                    interpolate_mode: str = "nearest") -> Tensor:
    """[N, C, H, W]: guided backpropagation times the Grad-CAM map of `layer` upsampled to the
    images (`interpolate_mode` as `F.interpolate`; "nearest" like captum's `GuidedGradCam`)."""
    if target is None:  # one forward fixes the predicted class for both parts
        _input(images)
        with torch.inference_mode(False), torch.no_grad(), eval_mode(model):
            target = resolve_targets(None, model(images.detach().clone()))
    cam = grad_cam(model, images, layer, target)
    return guided_backprop(model, images, target) * upsample(cam, images.shape[-2:], interpolate_mode)[:, None]


def default_saliency_layer(model: nn.Module, image: Tensor) -> str:
    """The last Conv2d (in execution order) whose output maps are larger than 1x1 for `image`
    [1, C, H, W] (Grad-CAM needs a spatial map); the last Conv2d run if none is."""
    convs = layer_names(model, nn.Conv2d)
    if not convs:
        raise LayerError(f"The model has no Conv2d layer for Grad-CAM; name a layer with spatial maps "
                         f"(valid layers: {', '.join(layer_names(model))})")
    steps = [s for s in trace_chain(model, image, convs[-1]) if isinstance(s.module, nn.Conv2d)]
    spatial = [s for s in steps if len(s.out_shape) == 4 and s.out_shape[2] * s.out_shape[3] > 1]
    return (spatial or steps)[-1].name
