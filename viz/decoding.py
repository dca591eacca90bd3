"""Filter decoding by substitution (Rafegas & Vanrell, "Understanding learned CNN features through
Filter Decoding with Substitution", 2015, arXiv:1511.05084).

A filter of conv layer L is brought to image space one layer at a time (section 3, Eq. 1-2 and
the `filter_decoding` algorithm):

* convolutional layer l: every position of the (partially) decoded filter is replaced by layer
  l's filter of that channel, scaled by the value at the position; overlapping substitutions add
  up (Fig. 2c). That is exactly a transposed convolution with layer l's weights at layer l's
  stride, so a whole bank of filters decodes in one call: `F.conv_transpose2d(df, W_l, stride)`.
* pooling layer (max or average): `unpool`, a plain upsampling by the pool's stride, with
  nearest, bilinear or bicubic interpolation (Fig. 2b; Table 1 compares the three).
* the paper treats the method as linear (section 5 leaves non-linearities to future work), so
  ReLU-like activations, Dropout and Identity are passed through unchanged; a BatchNorm layer in
  eval mode is the per-channel affine map `x * s + t` with `s = weight / sqrt(running_var + eps)`,
  so its scale `s` is folded in and its shift dropped.

Conventions:

* Biases (of convs and of BatchNorm) are ignored: a decoded filter is a shape, not an offset.
* A decoded filter is the full substituted kernel: LeNet's conv1 5x5, conv2 14x14, conv3 and
  conv4 28x28 (Fig. 4). Paddings do not change it; they only say where the kernel sits when it
  is correlated with an image: output position (i, j) of layer L covers the input window whose
  top-left corner is `(i * stride - padding, j * stride - padding)`, with `stride` the product of
  all conv and pool strides up to L and `padding` the accumulated padding
  `sum_l p_l * (product of the strides below l)`, in input pixels (`decoded_geometry`).
  Correlating with zero padding at the image is what a padded network does at its first layer
  only; padded inner layers make the two differ near the border.
* An overlapping pool (kernel > stride, e.g. 3x3 stride 2) is still undone by upsampling by its
  stride, as the paper's unpool does, so the decoded filter is then smaller than the true
  receptive field.

Implementation note: with nearest unpooling, "unpool, then substitute" is computed as one
strided substitution with a precomposed kernel (`_fuse_unpooling`), the same numbers with fewer
operations; bilinear and bicubic unpooling run as separate steps.

`reconstruction_error` is the paper's Eq. 3 (Table 1); `class_max_responses` is Fig. 1;
`threshold_decoded` is the thresholded rendering of Fig. 1 and Fig. 4a,e.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convlens.viz.common import VizError, window
from convlens.viz.layers import LayerError, chain_prefix, check_chain, get_layer, layer_names, layer_output, trace_chain

#: how the decoding undoes pooling (the deconvnet has its own: `viz.deconvnet.DECONV_UNPOOL_MODES`)
DECODING_UNPOOL_MODES = ("nearest", "bilinear", "bicubic")

# Modules the decoding passes through unchanged: pointwise non-linearities (the paper decodes as
# if the network were linear), regularizers that are the identity at inference, and Identity.
PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)

# Intermediate tensors of one chunk of filters stay under this many bytes (the convolution's own
# workspace comes on top); the chunk size is derived from it when `chunk_size` is None.
CHUNK_BUDGET_BYTES = 256 * 2**20

# Square sizes tried for the dummy input that traces the modules below a layer: the first one
# for which the forward pass reaches the layer is used.
_TRACE_SIZES = (32, 64, 128, 256, 512)


class DecodingError(VizError):
    """A model, argument or input that filter decoding cannot use; the message says what to do."""


class DecodedGeometry(NamedTuple):
    """Where a decoded filter bank sits in image space, all as (height, width) in input pixels."""
    size: tuple[int, int]     # spatial size of each decoded filter
    stride: tuple[int, int]   # product of every conv and pool stride up to and including the layer
    padding: tuple[int, int]  # accumulated padding: sum of p_l * (product of the strides below l)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _decoding_chain(model: nn.Module, layer: str) -> tuple[nn.Conv2d, list[nn.Module]]:
    """The conv called `layer` and the leaf modules executed before it, in forward order.

    The chain is recorded by `trace_chain` on a random dummy input (batch 1, the input channels of
    the model's first conv, the first size of `_TRACE_SIZES` that reaches the layer), so it follows
    the model's real forward rather than its definition order. Every step must consume exactly the
    previous step's output (or its ReLU, for a functional `F.relu` in forward), otherwise the
    model is not a plain chain (a skip connection, a branch, a functional pool) and is refused.
    """
    conv = get_layer(model, layer, nn.Conv2d)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    weight = conv.weight
    failures = []
    steps = None
    for size in _TRACE_SIZES:
        dummy = torch.randn(1, first_conv.in_channels, size, size, dtype=weight.dtype,
                            generator=torch.Generator().manual_seed(0)).to(weight.device)
        try:
            with torch.no_grad():
                steps = trace_chain(model, dummy, layer, keep_tensors=True)
            break
        except LayerError:
            raise
        except RuntimeError as e:  # typically: the input is too small for the layers below
            failures.append(f"{size}x{size}: {str(e).splitlines()[0]}")
    if steps is None:
        raise DecodingError(
            f"Could not run the model up to {layer!r} on a dummy input with "
            f"{first_conv.in_channels} channels at any of the sizes {_TRACE_SIZES}: " + "; ".join(failures)
        )
    check_chain(steps, dummy, DecodingError, "Filter decoding needs a sequence of modules, each "
                "consuming the previous one's output (a functional ReLU is passed through).",
                allow_functional_relu=True)
    return conv, [s.module for s in steps[:-1]]


def decodable_layers(model: nn.Module, image: torch.Tensor | None = None) -> list[str]:
    """The Conv2d layers `decode_filters` can decode, in execution order: those reached through a
    plain chain of supported modules from the input (on a ResNet, its stem: conv1, layer1.0.conv1,
    layer1.0.conv2; on a chain, every conv). One forward pass of `image` ([1, C, H, W], model input;
    None: a random dummy as `decode_filters` uses), stopped at nothing; an error past the chain
    prefix (a head wanting another size) is ignored."""
    convs = layer_names(model, nn.Conv2d)
    if not convs:
        return []
    if image is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        images = [torch.randn(1, first.in_channels, size, size, dtype=first.weight.dtype,
                              generator=torch.Generator().manual_seed(0)).to(first.weight.device)
                  for size in _TRACE_SIZES]
    else:
        images = [image[:1]]
    steps = None
    for x in images:
        with torch.no_grad():
            steps = trace_chain(model, x, None, keep_tensors=True)
        if steps:
            break
    if not steps:
        return []
    steps = steps[:chain_prefix(steps, x, allow_functional_relu=True)]
    out, below = [], []
    for step in steps:
        if isinstance(step.module, nn.Conv2d):
            try:
                _check_supported(below, step.name)
            except DecodingError:
                break
            if step.name not in out:
                out.append(step.name)
        below.append(step.module)
    return out


def _check_supported(below: list[nn.Module], layer: str) -> None:
    for m in below:
        if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != (1, 1):
            raise DecodingError(f"Cannot decode {layer!r}: dilated max pooling ({m}) has no unpooling here.")
        if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.running_var is None:
            raise DecodingError(
                f"Cannot decode {layer!r}: {m} has no running statistics (track_running_stats=False), "
                "so its scale depends on the batch and cannot be folded into a filter."
            )
        if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm) + POOLS + PASS_THROUGH):
            raise DecodingError(
                f"Cannot decode {layer!r}: {type(m).__name__} ({m}) lies below it. Decoding handles "
                f"Conv2d, MaxPool2d/AvgPool2d (unpooled), BatchNorm2d (scale folded in) and "
                f"pointwise activations/Dropout/Identity (passed through)."
            )


def _step_down(size: tuple[int, int], m: nn.Module) -> tuple[int, int]:
    """Spatial size of a decoded filter after decoding it through module `m` (a conv or a pool)."""
    if isinstance(m, nn.Conv2d):  # transposed conv: (n - 1) * stride + dilated kernel extent
        s, d, k = _pair(m.stride), _pair(m.dilation), _pair(m.kernel_size)
        return tuple((size[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 for i in range(2))
    if isinstance(m, POOLS):
        return tuple(size[i] * _pair(m.stride)[i] for i in range(2))
    return size


def _geometry(conv: nn.Conv2d, below: list[nn.Module]) -> DecodedGeometry:
    stride, padding = [1, 1], [0, 0]
    for m in below + [conv]:
        if isinstance(m, (nn.Conv2d,) + POOLS):
            s, p = window(m).stride, window(m).pad_before
            for d in range(2):
                padding[d] += p[d] * stride[d]
                stride[d] *= s[d]
    k, dil = _pair(conv.kernel_size), _pair(conv.dilation)
    size = ((k[0] - 1) * dil[0] + 1, (k[1] - 1) * dil[1] + 1)
    for m in reversed(below):
        size = _step_down(size, m)
    return DecodedGeometry(size, tuple(stride), tuple(padding))


def decoded_geometry(model: nn.Module, layer: str) -> DecodedGeometry:
    """Size, effective stride and accumulated padding of the decoded filters of conv `layer`.

    Correlating an image with the decoded bank, `F.conv2d(image, decoded, stride=g.stride,
    padding=g.padding)`, puts each output position over the same input window as the layer's own
    output position.
    """
    conv, below = _decoding_chain(model, layer)
    _check_supported(below, layer)
    return _geometry(conv, below)


def decoded_stride(model: nn.Module, layer: str) -> tuple[int, int]:
    """Effective (height, width) stride of conv `layer` w.r.t. the input: the product of every conv
    and pool stride up to and including it (LeNet: conv1 1, conv2 2, conv3 and conv4 4)."""
    return decoded_geometry(model, layer).stride


def _unpool(df: torch.Tensor, stride: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "nearest":  # exact replication (F.interpolate's float index rounding is avoided)
        k, c, h, w = df.shape
        return df[:, :, :, None, :, None].expand(k, c, h, stride[0], w, stride[1]).reshape(
            k, c, h * stride[0], w * stride[1])
    size = (df.shape[2] * stride[0], df.shape[3] * stride[1])
    return F.interpolate(df, size=size, mode=mode, align_corners=False)


def _substitution_plan(below: list[nn.Module], unpool: str) -> list[tuple]:
    """The decoding steps for the modules `below` a layer, top to bottom:
    ("conv", weight, stride, dilation, groups): substitution, a transposed convolution;
    ("unpool", stride): upsampling; ("scale", per-channel factors): a folded BatchNorm.
    Pass-through modules contribute no step. With nearest unpooling, an unpool followed by a
    substitution is fused into one substitution (`_fuse_unpooling`)."""
    plan = []
    for m in reversed(below):
        if isinstance(m, nn.Conv2d):
            plan.append(("conv", m.weight.detach(), _pair(m.stride), _pair(m.dilation), m.groups))
        elif isinstance(m, POOLS):
            plan.append(("unpool", _pair(m.stride)))
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight.detach()
            plan.append(("scale", scale))
    return _fuse_unpooling(plan) if unpool == "nearest" else plan


def _run_plan(df: torch.Tensor, plan: list[tuple], unpool: str) -> torch.Tensor:
    """Decode `df` (filters, channels, h, w) through the steps of `plan`."""
    for step in plan:
        if step[0] == "conv":
            _, weight, stride, dilation, groups = step
            df = F.conv_transpose2d(df, weight, stride=stride, dilation=dilation, groups=groups)
        elif step[0] == "unpool":
            df = _unpool(df, step[1], unpool)
        else:
            df = df * step[1].to(df.dtype)[None, :, None, None]
    return df


def _fuse_unpooling(plan: list[tuple]) -> list[tuple]:
    """Nearest unpooling by s, then substitution with W at stride t, equals one substitution at
    stride s*t with a kernel W' of size (s - 1) * t + (dilated extent of W): both are linear and
    commute with shifts by s*t, so W' is what the two steps make of a single pixel of each channel.
    Same result, without the upsampled tensor and with fewer multiply-adds; used where W' has at
    most s^2 times W's taps (and never for grouped convs, whose W' would be dense)."""
    fused, i = [], 0
    while i < len(plan):
        if plan[i][0] == "unpool" and i + 1 < len(plan) and plan[i + 1][0] == "conv" and plan[i + 1][4] == 1:
            (_, s), (_, weight, t, d, _) = plan[i], plan[i + 1]
            extent = [(s[j] - 1) * t[j] + d[j] * (weight.shape[2 + j] - 1) + 1 for j in range(2)]
            if extent[0] * extent[1] <= s[0] * s[1] * weight.shape[2] * weight.shape[3]:
                channels = weight.shape[0]
                one_pixel = torch.eye(channels, dtype=weight.dtype, device=weight.device).view(channels, channels, 1, 1)
                kernel = _run_plan(one_pixel, plan[i:i + 2], "nearest")
                fused.append(("conv", kernel, (s[0] * t[0], s[1] * t[1]), (1, 1), 1))
                i += 2
                continue
        fused.append(plan[i])
        i += 1
    return fused


def _top_filters(conv: nn.Conv2d, index: torch.Tensor) -> torch.Tensor:
    """Filters `index` of `conv` as (len(index), in_channels, h, w), the starting point of decoding:
    a grouped conv's filter sees only its group's input channels (the others are zero) and a
    dilated conv's taps are spread `dilation` apart (zeros between)."""
    w = conv.weight[index]
    (dh, dw), (kh, kw) = _pair(conv.dilation), _pair(conv.kernel_size)
    if conv.groups == 1 and (dh, dw) == (1, 1):
        return w
    out_per_group = conv.out_channels // conv.groups
    in_per_group = conv.in_channels // conv.groups
    full = w.new_zeros(len(index), conv.in_channels, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    for row, k in enumerate(index.tolist()):
        g = k // out_per_group
        full[row, g * in_per_group:(g + 1) * in_per_group, ::dh, ::dw] = w[row]
    return full


def _elements_per_filter(conv: nn.Conv2d, below: list[nn.Module]) -> int:
    """Largest (input + output) element count of one decoding step, for one filter."""
    k, dil = _pair(conv.kernel_size), _pair(conv.dilation)
    channels, size = conv.in_channels, ((k[0] - 1) * dil[0] + 1, (k[1] - 1) * dil[1] + 1)
    largest = channels * math.prod(size)
    for m in reversed(below):
        new_channels = m.in_channels if isinstance(m, nn.Conv2d) else channels
        new_size = _step_down(size, m)
        largest = max(largest, channels * math.prod(size) + new_channels * math.prod(new_size))
        channels, size = new_channels, new_size
    return largest


def decode_filters(model: nn.Module, layer: str, unpool: str = "nearest",
                   filters: Sequence[int] | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Decoded filters of conv `layer`, in image space: a tensor (K, C_in, h, w).

    K is the number of filters (`filters`, in that order, or all of them), C_in the model's input
    channels, (h, w) = `decoded_geometry(model, layer).size`. `unpool` is "nearest", "bilinear" or
    "bicubic". Filters are decoded `chunk_size` at a time (None: as many as keep the intermediate
    tensors under `CHUNK_BUDGET_BYTES`), which bounds memory. Biases are ignored (module
    docstring). The result is detached, in the layer's dtype and device; the model (its modes,
    parameters and `requires_grad` flags) is left as it was.
    """
    if unpool not in DECODING_UNPOOL_MODES:
        raise DecodingError(f"Unknown unpool mode {unpool!r}. Valid modes: {', '.join(DECODING_UNPOOL_MODES)}")
    conv, below = _decoding_chain(model, layer)
    _check_supported(below, layer)
    return _decode_bank(conv, below, layer, unpool, filters, chunk_size)


def _decode_bank(conv: nn.Conv2d, below: list[nn.Module], layer: str, unpool: str,
                 filters: Sequence[int] | None, chunk_size: int | None) -> torch.Tensor:
    if filters is None:
        index = torch.arange(conv.out_channels)
    else:
        index = torch.as_tensor(list(filters), dtype=torch.long).reshape(-1)
        bad = [int(k) for k in index if not 0 <= k < conv.out_channels]
        if bad:
            raise DecodingError(
                f"filters must be indices in [0, {conv.out_channels}) for {layer!r} "
                f"({conv.out_channels} filters); got out-of-range {bad}"
            )
    if chunk_size is None:
        per_filter = _elements_per_filter(conv, below) * conv.weight.element_size()
        chunk_size = max(1, CHUNK_BUDGET_BYTES // per_filter)
    elif chunk_size < 1:
        raise DecodingError(f"chunk_size must be at least 1, got {chunk_size}")
    in_channels = next(m for m in below + [conv] if isinstance(m, nn.Conv2d)).in_channels
    out = conv.weight.new_empty(len(index), in_channels, *_geometry(conv, below).size)
    with torch.no_grad():  # only weights and running statistics are read; nothing runs the model
        plan = _substitution_plan(below, unpool)
        for start in range(0, len(index), chunk_size):
            part = index[start:start + chunk_size]
            out[start:start + len(part)] = _run_plan(_top_filters(conv, part), plan, unpool)
    return out


def _layer_response(model: nn.Module, conv: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output of `conv` on `images` (the forward pass stops right after it), in eval mode."""
    return layer_output(model, images, conv)


def _contrast_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) per image over all its channels and positions; a constant map -> 0."""
    flat = x.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    return ((flat - low) / torch.where(span > 0, span, torch.ones_like(span))).view_as(x)


def _batches(images) -> Iterable[torch.Tensor]:
    if torch.is_tensor(images):
        yield images
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def reconstruction_error(model: nn.Module, layer: str, images, unpool: str = "nearest",
                         chunk_size: int | None = None) -> tuple[float, float]:
    """The paper's Eq. 3 (Table 1): how well the images correlated with the decoded filter bank of
    conv `layer` reproduce the layer's response. Returns (mean, std) over images.

    `images` is a tensor (N, C, H, W) in the model's input space, or an iterable of such batches
    (a batch may be a tuple/list whose first item is the images, as a DataLoader yields).

    Per image: the layer's response R is the conv module's output as the network computes it
    (pre-activation, every bias of the layers below and of the layer included); the estimate is
    `F.conv2d(image, decoded, stride=g.stride, padding=g.padding)` with g = `decoded_geometry`, so
    each position covers the same input window as in the network. Both maps start at the same
    window, so they are cropped to their common top-left (rows, columns): extra bottom/right
    positions come from pooling's floor/ceil rounding or overlapping pools. Each map is contrast
    range normalized over all its channels and positions, `(x - min) / (max - min)` (so the decoded
    filters' constant scale, e.g. 1/4 per unpooled average pool, does not matter), and the error
    is the mean squared difference over channels and positions. `std` is the population standard
    deviation over images.

    Biases stay in R because Eq. 3 compares against CNN(I, l, k), the network's own response, as
    MatConvNet computes it with biases; the decoded filters have none, so per-channel bias offsets
    count as reconstruction error (normalization removes only one constant per image).
    """
    if unpool not in DECODING_UNPOOL_MODES:
        raise DecodingError(f"Unknown unpool mode {unpool!r}. Valid modes: {', '.join(DECODING_UNPOOL_MODES)}")
    conv, below = _decoding_chain(model, layer)
    _check_supported(below, layer)
    decoded = _decode_bank(conv, below, layer, unpool, None, chunk_size)
    geometry = _geometry(conv, below)
    errors = []
    for x in _batches(images):
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != decoded.shape[1]:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise DecodingError(
                f"images must be (N, {decoded.shape[1]}, H, W) tensors in the model's input space, got {shape}"
            )
        if any(x.shape[2 + d] + 2 * geometry.padding[d] < geometry.size[d] for d in range(2)):
            raise DecodingError(
                f"images of {x.shape[2]}x{x.shape[3]} are smaller than the decoded filters of {layer!r} "
                f"({geometry.size[0]}x{geometry.size[1]}, with padding {geometry.padding}); use larger images"
            )
        x = x.to(device=decoded.device, dtype=decoded.dtype)
        response = _layer_response(model, conv, x)
        estimate = F.conv2d(x, decoded, stride=geometry.stride, padding=geometry.padding)
        h = min(response.shape[2], estimate.shape[2])
        w = min(response.shape[3], estimate.shape[3])
        diff = _contrast_normalize(response[:, :, :h, :w]) - _contrast_normalize(estimate[:, :, :h, :w])
        errors.append(diff.double().pow(2).flatten(1).mean(dim=1))
    if not errors:
        raise DecodingError("images is empty: reconstruction_error needs at least one image")
    errors = torch.cat(errors)
    return float(errors.mean()), float(errors.std(correction=0))


def class_max_responses(decoded: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                        num_classes: int, running: tuple[torch.Tensor, torch.Tensor] | None = None,
                        index_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 1: for each decoded filter k and class c, the highest response of filter k over the
    images of class c, and which image attains it.

    `decoded` (K, C, H, W) and `images` (N, C, H, W) have the same size, so each response is one
    scalar, `sum(decoded[k] * image)` (a correlation without padding). Returns `values`
    (K, num_classes) and `index` (K, num_classes), the image's position in the stream: index_offset
    + its row in `images`; a class with no image so far has value -inf and index -1. Ties go to the
    first image.

    Streaming over a dataset: pass the previous result as `running` and the number of images
    already seen as `index_offset`:

        best, seen = None, 0
        for x, y in loader:
            best = class_max_responses(decoded, x, y, 10, running=best, index_offset=seen)
            seen += len(x)
    """
    if decoded.ndim != 4 or images.ndim != 4 or decoded.shape[1:] != images.shape[1:]:
        raise DecodingError(
            f"decoded filters {tuple(decoded.shape)} and images {tuple(images.shape)} must be "
            "(K, C, H, W) and (N, C, H, W) with the same C, H, W (the paper's top-layer filters have "
            "the images' size); crop or pad the images to the decoded size."
        )
    labels = torch.as_tensor(labels, device=images.device).long().reshape(-1)
    if labels.numel() != images.shape[0]:
        raise DecodingError(f"labels has {labels.numel()} entries for {images.shape[0]} images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DecodingError(f"labels must lie in [0, {num_classes}), got values in "
                            f"[{int(labels.min())}, {int(labels.max())}]")
    K = decoded.shape[0]
    scores = decoded.flatten(1) @ images.to(decoded.dtype).flatten(1).T  # (K, N)
    values = scores.new_full((K, num_classes), -math.inf)
    index = torch.full((K, num_classes), -1, dtype=torch.long, device=scores.device)
    for c in range(num_classes):
        rows = (labels == c).nonzero().flatten().to(scores.device)
        if len(rows):
            best, where = scores[:, rows].max(dim=1)
            values[:, c], index[:, c] = best, rows[where] + index_offset
    if running is not None:
        old_values, old_index = running
        if old_values.shape != values.shape or old_index.shape != index.shape:
            raise DecodingError(f"running must be a previous result of shape {tuple(values.shape)}, "
                                f"got {tuple(old_values.shape)} and {tuple(old_index.shape)}")
        take_new = values > old_values  # strict: on ties the earlier image stays
        values = torch.where(take_new, values, old_values.to(values))
        index = torch.where(take_new, index, old_index.to(index))
    return values, index


def threshold_decoded(decoded: torch.Tensor, q: float = 0.5) -> torch.Tensor:
    """Thresholded rendering of decoded filters (Fig. 1, Fig. 4a,e): +1 where a filter is strongly
    positive, -1 where strongly negative, 0 elsewhere.

    "Strong" means `|value| >= q * max|value|` with the max taken per filter over all its channels
    and positions, so every filter keeps at least its extreme value whatever its scale (deep
    decoded filters are orders of magnitude larger than shallow ones). `decoded` is (K, ...), the
    result has its shape and dtype; an all-zero filter stays zero.
    """
    if not 0 < q <= 1:
        raise DecodingError(f"q must be a fraction of the largest magnitude in (0, 1], got {q}")
    if decoded.ndim < 2:
        raise DecodingError(f"decoded must be (K, ...) filters, got shape {tuple(decoded.shape)}")
    magnitude = decoded.abs()
    limit = q * magnitude.flatten(1).max(dim=1).values.view(-1, *[1] * (decoded.ndim - 1))
    return torch.where(magnitude >= limit, torch.sign(decoded), torch.zeros_like(decoded))
