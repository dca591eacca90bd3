"""Unit dissection: every unit of a layer characterized from one pass over a dataset, by its Neuron
Feature and selectivity indexes.

Follows Rafegas, Vanrell, Alexandre & Arias, "Understanding trained CNNs by indexing neuron
selectivity", Pattern Recognition Letters 136:318-325, 2020 (doi 10.1016/j.patrec.2019.10.013;
arXiv:1702.00382), pointed to by Vanrell & Arias's lecture ("Neuron Analysis", activation
maximization), and Morcos et al., "On the importance of single directions for generalization",
ICLR 2018 (arXiv:1803.06959) for the class selectivity over the whole dataset. Every measure is on
rectified responses: an activation below zero counts as zero, whether or not the layer is followed
by a ReLU.

Per unit, with its top-N images (N = 100 in the paper; the highest spatial maxima of its map over
the dataset, each at its argmax position, `RunningTopK`) and `a_i` their rectified activations:

- **Neuron Feature** (NF): the activation-weighted mean of the top-N receptive-field crops, weights
  `w_i = a_i / a_max`, normalized by their sum so that the NF is an image in the crops' range:
  `NF = sum_i w_i crop_i / sum_i w_i` (a_max cancels). Per pixel, crops that do not reach it (a
  field clipped at the image border) are left out of the sum and of the weights.
- **Class selectivity index** (the paper's): the activation-weighted relative frequency of each
  class among the top N, `f_c = sum_{i: label_i = c} a_i / sum_i a_i`, sorted descending; `M` = the
  fewest classes whose frequencies sum to at least `threshold`; index `(N - M) / (N - 1)`, N the
  number of top images (1: all of one class; 0: N different classes). The lecture does not give
  the threshold; the authors' released tool (nefesi, github.com/CVC-CIC/nefesi) defaults to 1.0,
  the whole weighted activity, which is `CLASS_THRESHOLD` here. With few classes this index is
  squeezed near 1 (10 classes and N = 100: at least (100 - 10) / 99 = 0.909), hence Morcos's
  index beside it.
- **Population code**: the number of classes whose relative frequency is at least a threshold
  (nefesi's default 0.1, `POPULATION_THRESHOLD`), and which; the top class is the most frequent
  (ties: the lower class index).
- **Colour selectivity index**: `1 - sum_i a'_i / sum_i a_i`, with `a'_i` the unit's rectified
  activation at the same position once the receptive field of image i is made grey (0: the unit
  ignores colour; 1: greying kills its response; below 0: greying makes it respond more).
  The grey is the opponent colour space's achromatic axis: O1 = (R - G)/sqrt 2 and
  O2 = (R + G - 2B)/sqrt 6 set to zero, keeping O3 = (R + G + B)/sqrt 3, i.e. each pixel replaced
  by the mean of its R, G, B (in display space: the normalization undone, greyed, applied again).
  nefesi instead projects the field's opponent-space pixels on their first principal component,
  rescaled to 0..255, which also changes the field's intensity and contrast; the achromatic axis
  changes only colour. It is pointwise, so greying the whole image leaves the unit's activation at
  its position exactly as greying only its receptive field would (the activation depends on no
  pixel outside the field): one forward of each distinct greyed image serves every unit and
  position of every layer (`grey_responses`; each image runs only as far as the deepest layer
  that refers to it, a plain conv there is evaluated at its entries only, and on a plain chain each
  image is cropped to its entries' receptive fields). Undefined on images that are not 3-channel RGB.
- **Morcos et al.'s class selectivity** (CSI): `(mu_max - mu_-max) / (mu_max + mu_-max)`, from the
  class-conditional means of the unit's rectified spatial maximum over the whole dataset, mu_max the
  largest, mu_-max the mean of the other classes' (0: no preference; 1: responds to one class only).
- **Dead** units: never positive over the dataset (their top activation <= 0). Every index of a
  dead unit is undefined (NaN).

`UnitCollector` streams a dataset batch by batch (the spatial maxima of every unit and the argmax
positions of those that may enter a top, `spatial_max` with the collector's `thresholds`): per layer
a `RunningTopK` of N entries per unit with the image's label as payload (updated by one `topk` per
layer over a few batches together, `_update_top` and `flush`; the tie rule of `RunningTopK` kept
exactly), and per class the sum of each unit's rectified maximum and the image count. Images are
told apart by content (`content_ids`): an image seen twice counts once. The images the top-N
entries refer to are kept (a pool shared by every unit and layer, for the NF crops and the grey
re-run; the images no entry refers to any more are evicted whenever the pool has doubled since the
last eviction, and before `pool` is read). Memory: per layer units x N (value, id, position,
label), per class one sum per unit, 8 bytes per distinct image seen (its id), the batches waiting
for their top-N update (their images and maxima, `flush_rows` rows or `flush_bytes` of images at
most), and the pool: at most min(distinct images, 2 x sum of units x N + the waiting rows) images.
`merge` combines collectors of disjoint or overlapping shares (DDP ranks) into what one collector
over their union would hold.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import VizError, check_int, eval_mode, window, window_matrix
from convlens.viz.layers import get_layer
from convlens.viz.receptive_field import ELEMENTWISE_MODULES, ReceptiveField, _bounds, _chain, crop_patches
from convlens.viz.top_activations import RunningTopK, _select, content_ids

__all__ = ["DissectionError", "UnitCollector", "UnitTable", "dissect", "neuron_features", "class_frequencies",
           "class_selectivity", "population_code", "top_class", "color_selectivity", "morcos_csi",
           "opponent_grey", "grey_responses", "DEFAULT_N", "CLASS_THRESHOLD", "POPULATION_THRESHOLD"]

#: top images per unit (the paper's N)
DEFAULT_N = 100
#: the class selectivity index's coverage threshold (nefesi's default: the whole weighted activity)
CLASS_THRESHOLD = 1.0
#: the population code's threshold on a class's relative frequency (nefesi's default)
POPULATION_THRESHOLD = 0.1


class DissectionError(VizError):
    """Bad arguments to a dissection function or state."""


# --------------------------------------------------------------------------------------------
# The measures, on tensors
# --------------------------------------------------------------------------------------------

def _check_top(values: Tensor, filled: Tensor | None) -> tuple[Tensor, Tensor]:
    if not torch.is_tensor(values) or values.dim() != 2:
        raise DissectionError(f"values must be [U, N] (units x top entries), got "
                              f"{list(values.shape) if torch.is_tensor(values) else type(values).__name__}")
    filled = torch.ones_like(values, dtype=torch.bool) if filled is None else filled.bool()
    if filled.shape != values.shape:
        raise DissectionError(f"filled must be [U, N] = {list(values.shape)}, got {list(filled.shape)}")
    return values.double().clamp_min(0).masked_fill(~filled, 0), filled


def neuron_features(crops: Tensor, values: Tensor, filled: Tensor | None = None) -> Tensor:
    """[U, C, Ph, Pw]: each unit's Neuron Feature, the mean of its crops [U, N, C, Ph, Pw] (NaN where
    a crop has no pixel, the same in every channel) weighted by w_i = a_i / a_max, a = `values`
    [U, N] rectified (empty slots, `filled` False, weigh nothing). NaN where no crop with a positive
    weight has a pixel (a dead unit: everywhere). Sums in float32 (the crops' precision)."""
    a, filled = _check_top(values, filled)
    if not torch.is_tensor(crops) or crops.dim() != 5 or crops.shape[:2] != values.shape:
        raise DissectionError(f"crops must be [U, N, C, Ph, Pw] with [U, N] = {list(values.shape)}, got "
                              f"{list(crops.shape) if torch.is_tensor(crops) else type(crops).__name__}")
    a_max = a.amax(1, keepdim=True)
    w = torch.where(a_max > 0, a / a_max.clamp_min(torch.finfo(a.dtype).tiny), 0.0).float().to(crops.device)
    present = (~torch.isnan(crops[:, :, 0])).float()                               # [U, N, Ph, Pw]
    num = torch.einsum("un,unchw->uchw", w, crops.float().nan_to_num(0))
    den = torch.einsum("un,unhw->uhw", w, present)[:, None]
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), math.nan).to(crops.dtype)


def class_frequencies(labels: Tensor, values: Tensor, filled: Tensor | None = None,
                      num_classes: int | None = None) -> Tensor:
    """[U, K] float64: per unit, each class's activation-weighted relative frequency among its top
    entries, `f_c = sum_{label_i = c} a_i / sum_i a_i` (a rectified; entries with label < 0 are left
    out). A row is all zeros where no labelled entry is positive."""
    a, filled = _check_top(values, filled)
    if labels.shape != values.shape:
        raise DissectionError(f"labels must be [U, N] = {list(values.shape)}, got {list(labels.shape)}")
    labels = labels.long().to(a.device)
    known = filled & (labels >= 0)
    k = int(num_classes) if num_classes is not None else int(labels[known].max()) + 1 if known.any() else 1
    if known.any() and int(labels[known].max()) >= k:
        raise DissectionError(f"a label ({int(labels[known].max())}) is >= num_classes={k}")
    weights = torch.zeros(values.shape[0], k, dtype=torch.float64, device=a.device)
    weights.scatter_add_(1, labels.clamp_min(0), a.masked_fill(~known, 0))
    total = weights.sum(1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def class_selectivity(frequencies: Tensor, n: Tensor | int,
                      threshold: float = CLASS_THRESHOLD) -> tuple[Tensor, Tensor]:
    """(index [U] float64, M [U] long): the paper's class selectivity index `(N - M) / (N - 1)`, M the
    fewest classes whose sorted frequencies (`class_frequencies`) reach `threshold` (in (0, 1]), N =
    `n` the number of top images per unit (an int or [U]). N = 1 gives 1. NaN (and M = 0) where the
    frequencies are all zero (a dead unit, or no labels)."""
    if not 0 < float(threshold) <= 1:
        raise DissectionError(f"threshold must be in (0, 1] (the share of the weighted activity covered), got "
                              f"{threshold!r}")
    f = frequencies.double()
    ordered = f.sort(dim=1, descending=True).values
    cum = ordered.cumsum(1)
    total = cum[:, -1:]
    # rounding: a cumulative sum that should equal the threshold may miss it by an ulp
    reached = cum >= threshold * total - 1e-9 * total
    m = (~reached).sum(1) + 1
    m = torch.minimum(m, (ordered > 0).sum(1))     # never more classes than have any activity
    live = total[:, 0] > 0
    n = torch.as_tensor(n, dtype=torch.float64, device=f.device).expand(f.shape[0])
    index = torch.where(n > 1, (n - m) / (n - 1).clamp_min(1), 1.0)
    return index.masked_fill(~live, math.nan), m.masked_fill(~live, 0)


def population_code(frequencies: Tensor, threshold: float = POPULATION_THRESHOLD) -> tuple[Tensor, list[list[int]]]:
    """(count [U] long, classes): the classes whose relative frequency is at least `threshold`, per
    unit, most frequent first (ties: lower class first)."""
    f = frequencies.double()
    above = (f >= threshold) & (f > 0)
    order = f.argsort(dim=1, descending=True, stable=True)
    kept = above.gather(1, order)
    classes = [[c for c, k in zip(row, keep) if k] for row, keep in zip(order.tolist(), kept.tolist())]
    return above.sum(1), classes


def top_class(frequencies: Tensor) -> Tensor:
    """[U] long: each unit's most frequent class (ties: the lower index), -1 where there is none."""
    f = frequencies.double()
    best = f.argmax(1)  # the first maximum
    return best.masked_fill(f.amax(1) <= 0, -1)


def color_selectivity(values: Tensor, grey_values: Tensor, filled: Tensor | None = None) -> Tensor:
    """[U]: `1 - sum_i a'_i / sum_i a_i` over each unit's top entries, a = `values` and a' =
    `grey_values` ([U, N], the activations once greyed) both rectified; NaN where sum a = 0."""
    a, filled = _check_top(values, filled)
    if grey_values.shape != values.shape:
        raise DissectionError(f"grey_values must be [U, N] = {list(values.shape)}, got {list(grey_values.shape)}")
    g = grey_values.double().to(a.device).nan_to_num(0).clamp_min(0).masked_fill(~filled, 0)
    total = a.sum(1)
    return torch.where(total > 0, 1 - g.sum(1) / total.clamp_min(torch.finfo(torch.float64).tiny), math.nan)


def morcos_csi(class_means: Tensor) -> Tensor:
    """[U]: Morcos et al.'s class selectivity `(mu_max - mu_-max) / (mu_max + mu_-max)` from the
    class-conditional means [K, U] of the units' rectified responses (K >= 2 classes present);
    NaN where both are zero, or with fewer than 2 classes."""
    mu = class_means.double().clamp_min(0)
    if mu.dim() != 2:
        raise DissectionError(f"class_means must be [K, U], got {list(mu.shape)}")
    if mu.shape[0] < 2:
        return torch.full((mu.shape[1],), math.nan, dtype=torch.float64)
    top, best = mu.max(0)
    rest = (mu.sum(0) - top) / (mu.shape[0] - 1)
    den = top + rest
    return torch.where(den > 0, (top - rest) / den.clamp_min(torch.finfo(torch.float64).tiny), math.nan)


def opponent_grey(pixels: Tensor) -> Tensor:
    """[N, 3, H, W] display-space images with their opponent chromatic components (O1, O2) set to
    zero: each pixel's R, G and B replaced by their mean (O3, the intensity, kept)."""
    if not torch.is_tensor(pixels) or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise DissectionError(f"greying needs RGB images [N, 3, H, W], got "
                              f"{list(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__}")
    return pixels.mean(1, keepdim=True).expand_as(pixels).contiguous()


def _grey_model_input(images: Tensor, normalization: Any | None) -> Tensor:
    if normalization is None:
        return opponent_grey(images)
    return normalization(opponent_grey(normalization.inverse(images))).to(images.dtype)


class _AllSeen(Exception):
    pass


def _conv_at(conv: nn.Conv2d, x: Tensor, rows: Tensor, units: Tensor, positions: Tensor,
             chunk_elements: int = 2**22) -> Tensor:
    """[E] float32: `conv(x)[rows, units, i, j]` at the entries' positions (i, j) only, from the
    conv's input `x`: one dot product of each entry's unit's kernel with its input window (padding,
    stride, dilation and groups as the conv applies them); at most about `chunk_elements` window
    values at once."""
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    dev = x.device
    rows, units, positions = rows.to(dev), units.to(dev), positions.to(dev)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    cin, cout = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    weight = conv.weight.detach().float()
    bias = conv.bias.detach().float() if conv.bias is not None else None
    out = []
    step = max(1, chunk_elements // (cin * kh * kw))
    for s in range(0, len(rows), step):
        r, u, p = rows[s:s + step], units[s:s + step], positions[s:s + step]
        ii = p[:, 0, None] * sh + torch.arange(kh, device=dev) * dh                        # [E, kh]
        jj = p[:, 1, None] * sw + torch.arange(kw, device=dev) * dw                        # [E, kw]
        if conv.groups == 1:   # every input channel: a slice, not an index per channel
            window = x[r[:, None, None], :, ii[:, :, None], jj[:, None, :]].permute(0, 3, 1, 2)
        else:
            chans = (u // cout)[:, None] * cin + torch.arange(cin, device=dev)              # [E, cin]
            window = x[r[:, None, None, None], chans[:, :, None, None], ii[:, None, :, None], jj[:, None, None, :]]
        values = (window.float() * weight[u]).flatten(1).sum(1)
        out.append(values + bias[u] if bias is not None else values)
    return torch.cat(out) if out else torch.zeros(0, device=dev)


@dataclass
class _CropStep:
    """One module of a chain a crop can run through (`_crop_chain`): per axis (kernel, stride, padding,
    dilation), None for an element-wise module, and the sizes of its input and output on the whole image."""
    module: nn.Module
    geometry: tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None
    in_size: tuple[int, int]
    out_size: tuple[int, int]


def _crop_chain(model: nn.Module, image: Tensor, modules: Mapping[str, nn.Module]) -> list[_CropStep] | None:
    """The modules from the input to the deepest of `modules` ({layer: module}) when the net is, up to
    there, a plain chain (the receptive fields' closed form, `receptive_field._chain`, traced on
    `image` [1, C, H, W]) of `nn.Conv2d` with zero padding given as numbers, max and average pools
    without ceil_mode, and element-wise modules (BatchNorm with running statistics), none with
    hooks, each of `modules` once. Such a chain computes, from a crop of the image, the whole image's
    activations at every position whose inputs the crop holds (`_valid_positions`). None otherwise:
    the caller then runs whole images."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    trace: list = []
    for layer in modules:
        try:
            steps = _chain(model, image, layer)
        except VizError:
            return None
        if len(steps) > len(trace):
            trace = steps
    chain = []
    for step in trace:
        m = step.module
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        if isinstance(m, nn.BatchNorm2d) and (not m.track_running_stats or m.running_mean is None):
            return None   # batch statistics in eval mode: not element-wise
        if type(m) in ELEMENTWISE_MODULES:   # exactly these (a subclass may compute otherwise)
            geometry = None
        elif (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)) or \
                (type(m) in (nn.MaxPool2d, nn.AvgPool2d) and not m.ceil_mode and not getattr(m, "return_indices", 0)):
            k, s, p, d = window(m)
            geometry = tuple((k[a], s[a], p[a], d[a]) for a in range(2))
        else:
            return None
        chain.append(_CropStep(m, geometry, tuple(step.in_shape[2:]), tuple(step.out_shape[2:])))
    found = [sum(step.module is m for step in chain) for m in modules.values()]
    return chain if found and all(n == 1 for n in found) else None


def _valid_positions(chain: Sequence[_CropStep], axis: int, start: int, end: int) -> list[Tensor] | None:
    """For the crop [start, end) of the input along `axis` run through `chain`: per step, [n] bool
    over the positions of its output on the whole image, True where the crop's output is present and
    equal to the whole image's. A position is so when each of its taps reads an input position that
    is present and so, or lies outside the whole input too (then both read the same padding: zero,
    -inf for a max pool, left out of an average pool's count). The crop's output o' is the whole
    output `start / (strides so far) + o'`; None where `start` is not a multiple of every stride on
    the way (the windows would not line up)."""
    valid = torch.zeros(chain[0].in_size[axis], dtype=torch.bool) if chain else None
    valid[start:end] = True
    offset, length, out = start, end - start, []
    for step in chain:
        if step.geometry is None:
            out.append(valid)
            continue
        k, s, p, d = step.geometry[axis]
        if offset % s:
            return None
        n_in, n_out = step.in_size[axis], step.out_size[axis]
        offset, length = offset // s, max(0, (length + 2 * p - d * (k - 1) - 1) // s + 1)
        whole = offset + torch.arange(length)                                   # the crop's outputs
        taps = whole[:, None] * s - p + torch.arange(k)[None, :] * d           # whole input positions
        inside = (taps >= 0) & (taps < n_in)
        ok = (~inside | valid[taps.clamp(0, n_in - 1)]).all(1) & (whole < n_out)
        valid = torch.zeros(n_out, dtype=torch.bool)
        valid[whole[ok]] = True
        out.append(valid)
    return out


def _grey_cropped(chain: list[_CropStep], modules: Mapping[str, nn.Module], direct: set, images: Tensor,
                  plan: Mapping[str, tuple[Tensor, Tensor, Tensor, Tensor]], out: Mapping[str, Tensor],
                  prepare: Callable[[Tensor], Tensor], batch_size: int, device: torch.device,
                  context: Callable[[], ContextManager] | None) -> None:
    """`grey_responses` on a chain (`_crop_chain`), filling `out` in place. Each image runs as far as
    its deepest layer (a plain conv there at the entries only, `_conv_at`), cropped to a box that
    holds its entries' receptive fields (every layer's), the box's top-left corner moved up and left
    to a multiple of the strides on the way (so that the windows line up with the whole image's).
    Crops run in batches of one size: the images of a size that enough images share batch together,
    the others' sizes are rounded up to `n - m * stride` (n the image's side), so that each crop of
    a batch can grow to the batch's largest inside its image with its corner still on the strides.
    `_valid_positions` then checks that the crop computes every entry
    as the whole image does (an image where it would not runs whole)."""
    step_of = {layer: next(q for q, step in enumerate(chain) if step.module is m) for layer, m in modules.items()}
    order = sorted(plan, key=step_of.get)
    count, big = images.shape[0], torch.tensor(images.shape[2:])
    deepest = torch.full((count,), -1, dtype=torch.long)
    for rank, layer in enumerate(order):
        deepest[plan[layer][0]] = rank
    stop_step = [step_of[layer] for layer in order]
    # per axis: the bounds of every position's receptive field, and the strides up to each step
    bounds: dict[str, list[Tensor]] = {layer: [] for layer in order}
    jumps = torch.ones(len(chain), 2, dtype=torch.long)
    for a in range(2):
        support, jump = torch.eye(int(big[a])), 1
        for q, step in enumerate(chain):
            if step.geometry is not None:
                k, s, p, d = step.geometry[a]
                conn = window_matrix(step.in_size[a], step.out_size[a], k, s, p, d, dtype=torch.float32)
                support, jump = ((conn @ support) > 0).float(), jump * s
            jumps[q, a] = jump
            for layer in order:
                if step_of[layer] == q:
                    bounds[layer].append(_bounds(support > 0))
    # per image: the box of its entries' fields (a position that reads no pixel adds nothing)
    lo, hi = big.repeat(count, 1), torch.zeros(count, 2, dtype=torch.long)
    for layer in order:
        img, _, _, pos = plan[layer]
        for a in range(2):
            first, last = bounds[layer][a][pos[:, a]].unbind(1)
            some = last > first
            lo[:, a].scatter_reduce_(0, img[some], first[some], "amin")
            hi[:, a].scatter_reduce_(0, img[some], last[some], "amax")
    lo, hi = torch.minimum(lo, hi), torch.where(hi > lo, hi, big)
    jump = jumps[torch.tensor(stop_step)][deepest.clamp_min(0)]                 # [count, 2]
    cache: dict[tuple, list[Tensor] | None] = {}

    def failing(start: Tensor, end: Tensor) -> Tensor:
        """[count] bool: the images some entry of which the crop [start, end) does not compute exactly."""
        bad = torch.zeros(count, dtype=torch.bool)
        for a in range(2):
            keys = torch.stack([deepest.clamp_min(0), start[:, a], end[:, a]], 1)
            distinct, key_of = keys.unique(dim=0, return_inverse=True)
            valid = []
            for rank, s, e in distinct.tolist():
                if (a, rank, s, e) not in cache:
                    cache[a, rank, s, e] = _valid_positions(chain[:stop_step[rank] + 1], a, s, e)
                valid.append(cache[a, rank, s, e])
            for layer in order:
                img, _, _, pos = plan[layer]
                q, n_out = step_of[layer], chain[step_of[layer]].out_size[a]
                table = torch.stack([v[q] if v is not None and q < len(v) else torch.zeros(n_out, dtype=torch.bool)
                                     for v in valid])                       # [distinct crops, n_out]
                bad[img[~table[key_of[img], pos[:, a]]]] = True
        return bad

    # crops of one exact size batch together; the images of sizes fewer than `least` share take sizes
    # rounded up to n - m * stride, and each batch of those grows to its largest (its corner kept on
    # the strides by moving it up or left)
    least = min(8, batch_size)
    whole = deepest < 0
    while True:
        start = torch.where(whole[:, None], 0, (lo // jump) * jump)
        size = torch.where(whole[:, None], big, hi - start)
        batches = []
        for rank in range(len(order)):
            mine = (deepest == rank).nonzero().flatten()
            if not len(mine):
                continue
            shapes, shape_of, counts = size[mine].unique(dim=0, return_inverse=True, return_counts=True)
            for c in (counts >= least).nonzero().flatten().tolist():
                group = mine[shape_of == c]
                batches += [(rank, group[f:f + batch_size], *shapes[c].tolist())
                            for f in range(0, len(group), batch_size)]
            rest = mine[counts[shape_of] < least]
            size[rest] = big - ((big - size[rest]) // jump[rest]) * jump[rest]
            rest = rest[(size[rest, 0] * (int(big[1]) + 1) + size[rest, 1]).argsort(stable=True)]
            for first in range(0, len(rest), batch_size):
                slots = rest[first:first + batch_size]
                h, w = size[slots].amax(0)
                start[slots] = torch.minimum(start[slots], big - torch.stack([h, w]))   # both on the strides
                batches.append((rank, slots, int(h), int(w)))
                size[slots] = torch.stack([h, w])
        bad = failing(start, start + size) & ~whole
        if not bad.any():
            break
        whole |= bad
    row_of = torch.full((count,), -1, dtype=torch.long)
    for rank, slots, h, w in batches:
        last = order[rank]
        stop = step_of[last] + (last not in direct)        # run chain[:stop]; a direct conv is not run
        ys, xs = start[slots, 0, None] + torch.arange(h), start[slots, 1, None] + torch.arange(w)
        crop = images[slots][torch.arange(len(slots))[:, None, None], :, ys[:, :, None], xs[:, None, :]]
        # channels last: the layout mkldnn's convolutions and the pools are fastest in
        x = prepare(crop.permute(0, 3, 1, 2).to(device)).contiguous(memory_format=torch.channels_last)
        row_of[slots] = torch.arange(len(slots))
        wanted = {}     # per layer: the batch's entries (rows, units, the crop's positions; where they go)
        for layer in order[:rank + 1]:
            img, unit, slot, pos = plan[layer]
            rows = row_of[img]
            here = rows >= 0
            if here.any():
                shift = start[img[here]] // jumps[step_of[layer]]
                wanted[layer] = (rows[here], unit[here], pos[here] - shift, slot[here])
        row_of[slots] = -1

        def take(layer: str, maps: Tensor) -> None:
            rows, u, p, slot = wanted[layer]
            if layer == last and last in direct:     # the conv at the stop, at the entries, on its input
                values = _conv_at(modules[layer], maps, rows, u, p)
            else:
                dev = maps.device
                values = maps[rows.to(dev), u.to(dev), p[:, 0].to(dev), p[:, 1].to(dev)]
            out[layer][u, slot] = values.float().cpu()

        with context() if context is not None else contextlib.nullcontext():
            for q in range(stop):
                x = chain[q].module(x)
                for layer in wanted:
                    if step_of[layer] == q:
                        take(layer, x)               # read now: an in-place module may follow
        if last in direct and last in wanted:
            take(last, x)


def grey_responses(model: nn.Module, images: Tensor, entries: Mapping[str, tuple[Tensor, Tensor]],
                   normalization: Any | None = None, grey: bool = True, batch_size: int = 64,
                   context: Callable[[], ContextManager] | None = None) -> dict[str, Tensor]:
    """{layer: [U, N]}: the activation of unit u of `layer` at `positions[u, s]` on image
    `images[index[u, s]]` (model input [M, C, H, W]) greyed by `opponent_grey` (in display space,
    through `normalization`; `grey=False`: as it is), for `entries[layer] = (index [U, N] long, -1 for
    none, positions [U, N, 2])`; NaN where index < 0. `context()` wraps each forward (e.g. the
    trainer's autocast). Modes and hooks are restored.

    Each image runs once (eval mode, no gradients) in batches of `batch_size`, and only as far as
    the deepest layer some entry of it is in: images are grouped by that layer (in the order the
    forward reaches the layers), and the forward of a group stops at that layer's input; a plain
    `nn.Conv2d` there is not run, its activations at the group's entries are computed directly
    (`_conv_at`: one dot product per entry, not the whole map). Images no entry refers to do not
    run. Every other layer's activations are read from its output.

    On a plain chain of convs, max and average pools and element-wise modules up to the deepest
    layer (`_crop_chain`: the nets the receptive fields' closed form handles, e.g. LeNet, the CIFAR
    nets, VGG's features), each image also runs cropped to the box of its entries' receptive
    fields, the box's corner on the strides so that the windows line up, in channels-last layout
    (`_grey_cropped`); `_valid_positions` proves each entry computed as on the whole image (else
    the image runs whole). The values are the whole image's within float32 rounding (the
    convolutions sum in another order). Any other net runs whole images as above."""
    check_int("batch_size", batch_size, 1, DissectionError)
    modules = {layer: get_layer(model, layer) for layer in entries}
    direct = {layer for layer, m in modules.items()
              if type(m) is nn.Conv2d and not m._forward_hooks and not m._forward_pre_hooks}
    device = next((p.device for p in model.parameters()), images.device)
    out = {layer: torch.full(index.shape, math.nan) for layer, (index, _) in entries.items()}
    plan = {}
    for layer, (index, positions) in entries.items():
        unit, slot = (index >= 0).nonzero(as_tuple=True)
        plan[layer] = (index[unit, slot].cpu(), unit.cpu(), slot.cpu(), positions[unit, slot].cpu())
    used = torch.cat([img for img, *_ in plan.values()]).unique()
    if not len(used):
        return out
    with torch.no_grad():
        chain = _crop_chain(model, images[used[:1]].to(device), modules)
    if chain is not None:
        def prepare(x: Tensor) -> Tensor:
            return _grey_model_input(x, normalization) if grey else x

        with torch.no_grad(), eval_mode(model):
            _grey_cropped(chain, modules, direct, images, plan, out, prepare, batch_size, device, context)
        return out
    captured: dict[str, Tensor] = {}
    # the group's run: the layers whose output it needs, and the layer at whose input it stops
    run: dict[str, Any] = {"outputs": set(modules), "stop": None}

    def keep_output(layer):
        def hook(_module, _args, output):
            if layer not in captured and torch.is_tensor(output):
                captured[layer] = output.detach().clone()   # a copy: an in-place ReLU may follow
                if run["stop"] is None and run["outputs"] <= captured.keys():
                    raise _AllSeen
        return hook

    def keep_input(layer):
        def hook(_module, args):
            if layer == run["stop"] and args and torch.is_tensor(args[0]) and run["outputs"] <= captured.keys():
                captured[layer] = args[0].detach()
                raise _AllSeen
        return hook

    def forward(x: Tensor) -> None:
        captured.clear()
        try:
            if context is not None:
                with context():
                    model(x)
            else:
                model(x)
        except _AllSeen:
            pass

    handles = [m.register_forward_hook(keep_output(layer)) for layer, m in modules.items()]
    handles += [modules[layer].register_forward_pre_hook(keep_input(layer)) for layer in direct]
    try:
        with torch.no_grad(), eval_mode(model):
            # the order in which the forward reaches the layers, from one image
            forward(images[used[:1]].to(device))
            reached = list(captured)
            order = sorted(modules, key=lambda layer: reached.index(layer) if layer in reached else len(reached))
            deepest = torch.full((images.shape[0],), -1, dtype=torch.long)
            for rank, layer in enumerate(order):
                deepest[plan[layer][0]] = rank
            row_of = torch.full((images.shape[0],), -1, dtype=torch.long)
            for rank, last in enumerate(order):
                group = (deepest == rank).nonzero().flatten()
                stop = last if last in direct else None
                run["outputs"], run["stop"] = set(order[:rank + (stop is None)]), stop
                for start in range(0, len(group), batch_size):
                    slots = group[start:start + batch_size]
                    x = images[slots].to(device)
                    forward(_grey_model_input(x, normalization) if grey else x)
                    row_of[slots] = torch.arange(len(slots))
                    for layer in order[:rank + 1]:
                        img, unit, slot, pos = plan[layer]
                        rows = row_of[img]
                        here = rows >= 0
                        if not here.any():
                            continue
                        if layer not in captured:
                            raise DissectionError(f"the forward did not reach layer {layer!r} (a net whose "
                                                  "layers run in a different order for different images?)")
                        rows, u, p = rows[here], unit[here], pos[here]
                        if layer == stop:
                            values = _conv_at(modules[layer], captured[layer], rows, u, p)
                        else:
                            maps = captured[layer]
                            dev = maps.device
                            values = maps[rows.to(dev), u.to(dev), p[:, 0].to(dev), p[:, 1].to(dev)]
                        out[layer][unit[here], slot[here]] = values.float().cpu()
                    row_of[slots] = -1
    finally:
        for h in handles:
            h.remove()
    return out


# --------------------------------------------------------------------------------------------
# Streaming over a dataset
# --------------------------------------------------------------------------------------------

def _update_top(top: RunningTopK, values: Tensor, ids: Tensor, positions: Tensor, labels: Tensor,
                fresh: bool) -> Tensor:
    """`top.update(values, ids, positions, payload=labels)` with the same result, faster: per unit
    the batch's m best rows (m: the most batch values any one unit has at or above its k-th kept
    value, so every entry that may enter is among them), then one `topk` over each unit's k entries
    and those m, instead of four stable sorts over all k + n. The tie rule (value descending, then
    id ascending; an id once per unit) is applied by `top_activations._select` to the units whose
    choice or order `topk` leaves open (equal values among the chosen or at the k-th place, an empty
    slot chosen), and to all of them when `fresh` is False (a batch id may already be in a unit's
    top). Returns the batch rows [R] that entered some unit's top."""
    k = top.k
    if not fresh or values.dtype != top.values.dtype or (top.payload is None and bool((top.image_ids >= 0).any())):
        top.update(values, ids, positions, payload=lambda rows, _pos: labels[rows.to(labels.device)])
        return torch.isin(ids.to(top.image_ids.device), top.image_ids).nonzero().flatten().cpu()
    dev = values.device
    if top.values.device != dev:
        top.values, top.image_ids, top.positions = top.values.to(dev), top.image_ids.to(dev), top.positions.to(dev)
        top.payload = top.payload.to(dev) if top.payload is not None else None
    can_enter = values >= top.threshold.to(dev, values.dtype)[None, :]               # [n, U]
    per_unit = can_enter.sum(0)
    m = int(per_unit.max())
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    n, units = values.shape
    values_t = values.t()
    if m < n and not bool(torch.isnan(values).any()):   # topk ranks NaN first: a NaN batch takes the full path
        batch_values, batch_rows = values_t.topk(m, dim=1)                           # [U, m]
    else:
        batch_values, batch_rows = values_t, torch.arange(n, device=dev).expand(units, n)
    ids, labels = ids.to(dev), labels.to(dev)
    cand_values = torch.cat([top.values, batch_values], dim=1)                       # [U, k + m]
    best, pick = cand_values.topk(k, dim=1)                                          # sorted, descending
    kth = best[:, -1:]
    open_ = (cand_values >= kth).sum(1) > k                                          # a tie at the k-th place
    open_ |= (best[:, 1:] == best[:, :-1]).any(1) | torch.isinf(kth[:, 0])           # tied order, empty slot
    live = torch.ones_like(pick, dtype=torch.bool)
    if bool(open_.any()):
        cand_ids = torch.cat([top.image_ids[open_], ids[batch_rows[open_]]], dim=1)
        slow, slow_live = _select(cand_values[open_], cand_ids, k)
        pick[open_], live[open_] = slow, slow_live
    # gathered from the kept entries and from the batch apart (no [U, k + m] copies of ids and positions)
    stored = pick.clamp(max=k - 1)
    from_batch = pick >= k
    row = batch_rows.gather(1, (pick - k).clamp(min=0))                              # [U, k] rows of the batch
    entered = row[from_batch & live]
    new_ids = torch.where(from_batch, ids[row], top.image_ids.gather(1, stored))
    unit = torch.arange(units, device=dev)[:, None]
    new_pos = torch.where(from_batch[..., None], positions.to(dev)[row, unit],
                          top.positions.gather(1, stored[..., None].expand(-1, -1, 2)))
    # the payload as RunningTopK.update leaves it (also in empty slots)
    payload = top.payload if top.payload is not None else torch.zeros_like(top.image_ids)
    payload = payload.gather(1, stored)
    payload[from_batch & live] = labels[entered].to(payload.dtype)
    top.values = best if bool(live.all()) and not bool(open_.any()) else \
        cand_values.gather(1, pick).masked_fill(~live, -torch.inf)
    top.image_ids = new_ids.masked_fill(~live, -1)
    top.positions = new_pos.masked_fill(~live[..., None], 0)
    top.payload = payload
    return entered.unique().cpu()


class UnitCollector:
    """The streaming state of a dissection over a dataset, for every unit of `units` = {layer:
    unit count} (see the module docstring). `update` once per batch; `merge` to combine shares."""

    def __init__(self, units: Mapping[str, int], n: int = DEFAULT_N):
        check_int("n", n, 1, DissectionError, " (top images per unit)")
        if not units:
            raise DissectionError("units must name at least one layer: {layer: unit count}")
        self.n, self.units = n, {layer: int(u) for layer, u in units.items()}
        self._tops = {layer: RunningTopK(n, u) for layer, u in self.units.items()}
        # batches of new images whose top-N update waits (see `update`): merged into the tops
        # together, before anything reads them
        self._pending: list[tuple[Tensor, Tensor, list[int], Tensor, dict[str, tuple[Tensor, Tensor]], bool]] = []
        self._pending_rows = self._pending_bytes = 0
        #: per layer [K, U] float64: the sum over the distinct images of class k of each unit's rectified maximum
        self.class_sums = {layer: torch.zeros(0, u, dtype=torch.float64) for layer, u in self.units.items()}
        #: [K] long: distinct images per class
        self.class_counts = torch.zeros(0, dtype=torch.long)
        self.seen: set[int] = set()
        #: id -> image (model input, on the CPU) of every image some top entry refers to
        self._pool: dict[int, Tensor] = {}
        self._pool_limit, self._pool_stale = 64, False
        #: the images the last update counted: their ids, labels and rectified maxima per layer (what
        #: `merge` subtracts for an image two shares both counted: DDP pads the ranks' last batches)
        self.tail: dict[str, Any] = {"ids": torch.zeros(0, dtype=torch.long),
                                     "labels": torch.zeros(0, dtype=torch.long),
                                     "values": {layer: torch.zeros(0, u, dtype=torch.float64)
                                                for layer, u in self.units.items()}}
        #: copies of an image counted by two shares that `merge` could not take back (see `merge`)
        self.unresolved = 0

    #: a batch of new images waits for the next ones until this many rows (or this many bytes of
    #: images) are pending; one top-N update per layer over them all costs about half of one per
    #: batch on LeNet (RESULTS.md, section 10)
    flush_rows, flush_bytes = 1024, 2**26

    @property
    def tops(self) -> dict[str, RunningTopK]:
        """{layer: RunningTopK}: each unit's top-N, every update so far included."""
        self.flush()
        return self._tops

    @tops.setter
    def tops(self, tops: dict[str, RunningTopK]) -> None:
        self.flush()
        self._tops = tops

    @property
    def pool(self) -> dict[int, Tensor]:
        """id -> image (model input, on the CPU) of every image some top entry refers to."""
        self.flush()
        if self._pool_stale:
            self.trim_pool()
        return self._pool

    @pool.setter
    def pool(self, images: dict[int, Tensor]) -> None:
        self._pool, self._pool_stale = images, True

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    def _grow(self, k: int) -> None:
        if k > self.num_classes:
            extra = k - self.num_classes
            self.class_counts = torch.cat([self.class_counts, torch.zeros(extra, dtype=torch.long)])
            for layer, sums in self.class_sums.items():
                self.class_sums[layer] = torch.cat([sums, sums.new_zeros(extra, sums.shape[1])])

    def update(self, images: Tensor, labels: Tensor | None,
               maxima: Mapping[str, tuple[Tensor, Tensor]]) -> "UnitCollector":
        """Add a batch: `images` [B, C, H, W] (model input), `labels` [B] (class indices; None or
        < 0: unknown, left out of the class measures) and, per layer, `spatial_max` of its output
        (values [B, U], positions [B, U, 2]; a position may be (-1, -1) where the value is below its
        unit's `thresholds(layer)` at the time of this update: such an entry cannot enter the top, so
        its position is never read). Returns self."""
        if not torch.is_tensor(images) or images.dim() != 4:
            raise DissectionError("images must be a batch [B, C, H, W]")
        b = images.shape[0]
        if set(maxima) != set(self.units):
            raise DissectionError(f"maxima must hold every layer ({', '.join(self.units)}), got {', '.join(maxima)}")
        if labels is None:
            labels = torch.full((b,), -1, dtype=torch.long)
        labels = torch.as_tensor(labels).long()
        if labels.shape != (b,):
            raise DissectionError(f"labels must be [B] = [{b}], got {list(labels.shape)}")
        ids = content_ids(images)
        id_list = ids.tolist()
        fresh, batch_ids = [], set()
        for row, i in enumerate(id_list):
            if i not in self.seen and i not in batch_ids:
                fresh.append(row)
                batch_ids.add(i)
        self.seen |= batch_ids
        fresh_rows = torch.tensor(fresh, dtype=torch.long)
        fresh_labels = labels.cpu()[fresh_rows]
        known = fresh_labels >= 0
        if known.any():
            self._grow(int(fresh_labels[known].max()) + 1)
            self.class_counts += torch.bincount(fresh_labels[known], minlength=self.num_classes)
        tail_values, batch_maxima = {}, {}
        for layer, (values, positions) in maxima.items():
            if values.shape != (b, self.units[layer]):
                raise DissectionError(f"maxima[{layer!r}] must be [B, U] = [{b}, {self.units[layer]}], got "
                                      f"{list(values.shape)}")
            values = values.detach().float()
            if bool(((positions[..., 0] < 0) & (values >= self.thresholds(layer).to(values.device))).any()):
                raise DissectionError(f"maxima[{layer!r}] has no position for an activation that may enter the top; "
                                      "leave positions out only below the collector's thresholds(layer)")
            batch_maxima[layer] = (values, positions)
            rectified = values.cpu()[fresh_rows].double().clamp_min(0)
            if known.any():
                self.class_sums[layer].index_add_(0, fresh_labels[known], rectified[known])
            tail_values[layer] = rectified
        self.tail = {"ids": ids.cpu()[fresh_rows], "labels": fresh_labels, "values": tail_values}
        # A batch of new images (none seen before, none twice) waits for the next ones; any other
        # batch goes in at once, after those waiting, by the exact path for repeats.
        if len(fresh) != b:
            self.flush()
        self._pending.append((images, ids, id_list, labels, batch_maxima, len(fresh) == b))
        self._pending_rows += b
        self._pending_bytes += images.numel() * images.element_size()
        if (len(fresh) != b or self._pending_rows >= self.flush_rows or self._pending_bytes >= self.flush_bytes):
            self.flush()
        return self

    def flush(self) -> None:
        """Merge the batches waiting (see `update`) into the tops and keep their images that entered.
        Each waiting batch holds only images seen nowhere else (or it is alone), so one update over
        their rows together gives the tops of one update per batch."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._pending_rows = self._pending_bytes = 0
        fresh = all(p[5] for p in pending)
        if len(pending) == 1:
            images, ids, id_list, labels, maxima = pending[0][:5]
        else:
            images = [p[0] for p in pending]
            ids = torch.cat([p[1] for p in pending])
            id_list = [i for p in pending for i in p[2]]
            labels = torch.cat([p[3].to(ids.device) for p in pending])
            maxima = {layer: (torch.cat([p[4][layer][0].to(pending[0][4][layer][0].device) for p in pending]),
                              torch.cat([p[4][layer][1].to(pending[0][4][layer][1].device) for p in pending]))
                      for layer in pending[0][4]}
        payload_labels = labels.to(ids.device)
        entered = []
        for layer, (values, positions) in maxima.items():
            top = self._tops[layer]
            entered.append(_update_top(top, values, ids.to(values.device), positions, payload_labels,
                                       fresh=fresh))
            if bool((top.positions < 0).any()):
                raise DissectionError(f"maxima[{layer!r}] has no position for an activation that entered the top; "
                                      "leave positions out only below the collector's thresholds(layer)")
        rows = torch.cat(entered).unique().tolist()
        if len(pending) == 1:
            self._add_to_pool(images, id_list, rows)
        else:
            starts = [0]
            for p in pending:
                starts.append(starts[-1] + len(p[2]))
            for b, p in enumerate(pending):
                mine = [r - starts[b] for r in rows if starts[b] <= r < starts[b + 1]]
                self._add_to_pool(p[0], p[2], mine)

    def thresholds(self, layer: str) -> Tensor:
        """[U]: the value a unit's activation must reach to enter its top (its N-th kept value; -inf
        while its top has an empty slot), on the top's device. It only rises from one update to the
        next, so a `spatial_max(..., thresholds=...)` of a later batch with these thresholds finds
        every position `update` may read. While batches wait (see `update`) it is the value before
        them: lower or equal, so still a bound that finds every position read."""
        return self._tops[layer].threshold

    def referenced_ids(self) -> set[int]:
        """The ids of the images some top entry refers to."""
        ids = torch.cat([top.image_ids.flatten() for top in self.tops.values()])
        return set(ids[ids >= 0].unique().tolist())

    def _add_to_pool(self, images: Tensor, id_list: Sequence[int], rows: Sequence[int]) -> None:
        """Keep the images of batch `rows` (those that entered a top); evict the images no top entry
        refers to any more whenever the pool has doubled since the last eviction."""
        for row in rows:
            if id_list[row] not in self._pool:
                self._pool[id_list[row]] = images[row].detach().to("cpu", copy=True)
        self._pool_stale = True
        if len(self._pool) > self._pool_limit:
            self.trim_pool()

    def trim_pool(self) -> None:
        """Drop the pool's images that no top entry refers to."""
        referenced = self.referenced_ids()
        for i in [i for i in self._pool if i not in referenced]:
            del self._pool[i]
        self._pool_limit, self._pool_stale = max(2 * len(self._pool), 64), False

    # -- merging -----------------------------------------------------------------------------------
    def state_dict(self, pool: bool = True) -> dict[str, Any]:
        """Plain tensors (on the CPU), e.g. for `torch.distributed.all_gather_object`; `pool=False`
        leaves the images out (see `merge`)."""
        return {"n": self.n, "units": dict(self.units),
                "tops": {layer: top.state_dict() for layer, top in self.tops.items()},
                "class_sums": {k: v.clone() for k, v in self.class_sums.items()},
                "class_counts": self.class_counts.clone(),
                "seen": torch.tensor(sorted(self.seen), dtype=torch.long),
                "tail": self.tail, "unresolved": self.unresolved,
                "pool": dict(self.pool) if pool else None}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "UnitCollector":
        c = cls(state["units"], int(state["n"]))
        c.tops = {layer: RunningTopK.from_state_dict(s) for layer, s in state["tops"].items()}
        c.class_sums = {k: v.clone() for k, v in state["class_sums"].items()}
        c.class_counts = state["class_counts"].clone()
        c.seen = set(state["seen"].tolist())
        c.tail, c.unresolved = state["tail"], int(state.get("unresolved", 0))
        c.pool = dict(state["pool"] or {})
        return c

    @classmethod
    def merge(cls, states: Sequence[Mapping[str, Any]]) -> "UnitCollector":
        """One collector from the states of several (`state_dict`), as one collector over the union
        of their streams would be: top-N merged, class sums and counts added, and each image that
        more than one share counted taken back once per extra copy, from the share whose last batch
        holds it (`tail`; where DDP's sampler puts the repeats). A repeat found in no tail (an image
        present twice in the dataset, on two ranks) stays counted twice: `unresolved` counts them.
        Pools are joined; a state without one adds no images."""
        if not states:
            raise DissectionError("merge needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s["units"] != first["units"] or s["n"] != first["n"]:
                raise DissectionError("cannot merge dissections of different layers, units or N")
        merged = cls.from_state_dict({**first, "pool": None})
        for s in states[1:]:
            for layer in merged.tops:
                merged.tops[layer].merge(RunningTopK.from_state_dict(s["tops"][layer]))
            merged._grow(int(s["class_counts"].numel()))
            counts = s["class_counts"]
            merged.class_counts[:counts.numel()] += counts
            for layer, sums in s["class_sums"].items():
                merged.class_sums[layer][:sums.shape[0]] += sums
            merged.unresolved += int(s.get("unresolved", 0))
        seen = torch.cat([s["seen"] for s in states])
        ids, copies = seen.unique(return_counts=True)
        repeats = {int(i): int(c) - 1 for i, c in zip(ids.tolist(), copies.tolist()) if c > 1}
        tails: dict[int, tuple[int, dict[str, Tensor]]] = {}
        for s in states:
            for row, i in enumerate(s["tail"]["ids"].tolist()):
                tails.setdefault(i, (int(s["tail"]["labels"][row]), {layer: v[row] for layer, v in
                                                                     s["tail"]["values"].items()}))
        for i, extra in repeats.items():
            if i not in tails:
                merged.unresolved += extra
                continue
            label, values = tails[i]
            if label >= 0:
                merged.class_counts[label] -= extra
                for layer, v in values.items():
                    merged.class_sums[layer][label] -= extra * v
        merged.seen = set(ids.tolist())
        for s in states:
            for i, image in (s.get("pool") or {}).items():
                merged.pool.setdefault(i, image)
        merged.trim_pool()
        return merged


# --------------------------------------------------------------------------------------------
# The table of every unit
# --------------------------------------------------------------------------------------------

@dataclass
class UnitTable:
    """Every unit of one layer, dissected (see the module docstring); [U] tensors unless said."""
    layer: str
    values: Tensor                 # [U, N] the top-N activations (as the layer gave them), best first
    image_ids: Tensor              # [U, N] long, -1 in empty slots
    positions: Tensor              # [U, N, 2] long (i, j) of each activation in its map
    labels: Tensor                 # [U, N] long, the images' labels (-1: unknown)
    filled: Tensor                 # [U, N] bool
    neuron_features: Tensor | None  # [U, C, Ph, Pw] in display space, NaN where no crop reaches
    frequencies: Tensor            # [U, K] float64 weighted relative class frequencies
    class_selectivity: Tensor      # float64, NaN: dead or unlabelled
    top_class: Tensor              # long, -1: none
    population_code: Tensor        # long
    population_classes: list[list[int]]
    color_selectivity: Tensor      # float64, NaN: undefined (dead, or not RGB)
    csi: Tensor                    # float64, Morcos et al.
    dead: Tensor                   # bool
    class_means: Tensor            # [K, U] float64 (NaN for a class with no image)
    extra: dict = field(default_factory=dict)

    @property
    def num_units(self) -> int:
        return int(self.values.shape[0])


def dissect(collector: UnitCollector, fields: Mapping[str, ReceptiveField] | None = None,
            model: nn.Module | None = None,
            normalization: Any | None = None, num_classes: int | None = None,
            class_threshold: float = CLASS_THRESHOLD, population_threshold: float = POPULATION_THRESHOLD,
            color: bool = True, batch_size: int = 64, context: Callable[[], ContextManager] | None = None,
            crop_elements: int = 2**25) -> dict[str, UnitTable]:
    """{layer: UnitTable} from a finished (merged) collector. NFs need `fields` (per layer; none: no
    NF); the colour index needs `model` and RGB images (`color=False`, no model or other channel
    counts: NaN). Crops are cut from the pool's images in display space (`normalization.inverse`,
    clamped to [0, 1]) in chunks of units of about `crop_elements` values, each distinct (image,
    position) crop once. The colour index costs one forward of each distinct pool image, as far as
    the deepest layer that refers to it (`grey_responses`)."""
    if not 0 <= float(population_threshold) <= 1:
        raise DissectionError(f"population_threshold must be in [0, 1], got {population_threshold!r}")
    ids = sorted(collector.pool)
    sorted_ids = torch.tensor(ids, dtype=torch.long)
    images = torch.stack([collector.pool[i] for i in ids]) if ids else None
    k = max(1, collector.num_classes, int(num_classes or 0))
    for top in collector.tops.values():
        if top.payload is not None and (top.payload[top.image_ids >= 0] >= 0).any():
            k = max(k, int(top.payload[top.image_ids >= 0].max()) + 1)
    index = {}
    for layer, top in collector.tops.items():
        # each entry's slot in the sorted pool, -1 in empty slots
        image_ids = top.image_ids.cpu()
        slots = torch.searchsorted(sorted_ids, image_ids).clamp(max=max(len(ids) - 1, 0))
        found = (sorted_ids[slots] == image_ids) if ids else torch.zeros_like(image_ids, dtype=torch.bool)
        missing = (image_ids >= 0) & ~found
        if missing.any():
            raise DissectionError(f"the pool lacks {len(image_ids[missing].unique())} image(s) of layer {layer!r}'s "
                                  "top entries; merge the shares' pools (state_dict(pool=True))")
        index[layer] = slots.masked_fill(image_ids < 0, -1)
    rgb = images is not None and images.shape[1] == 3
    grey = {}
    if color and rgb and model is not None:
        live = {}   # a dead unit's colour index is undefined (NaN): its entries do not run
        for layer, top in collector.tops.items():
            filled = (top.image_ids >= 0).cpu()
            dead = ~(top.values.float().cpu().masked_fill(~filled, -math.inf).amax(1) > 0)
            live[layer] = index[layer].masked_fill(dead[:, None], -1)
        grey = grey_responses(model, images, {layer: (live[layer], top.positions)
                                              for layer, top in collector.tops.items()},
                              normalization, batch_size=batch_size, context=context)
    pixels = None
    if images is not None and fields:
        pixels = (normalization.inverse(images) if normalization is not None else images).float().clamp(0, 1)
    tables = {}
    for layer, top in collector.tops.items():
        values, filled = top.values.float().cpu(), (top.image_ids >= 0).cpu()
        labels = top.payload.cpu().long() if top.payload is not None else torch.full_like(top.image_ids, -1)
        labels = labels.masked_fill(~filled, -1)
        freqs = class_frequencies(labels, values, filled, k)
        n = filled.sum(1)
        cls_index, _ = class_selectivity(freqs, n, class_threshold)
        pc, pc_classes = population_code(freqs, population_threshold)
        dead = ~(values.masked_fill(~filled, -math.inf).amax(1) > 0)
        sums = collector.class_sums[layer]
        counts = collector.class_counts
        sums = torch.cat([sums, sums.new_zeros(max(0, k - sums.shape[0]), sums.shape[1])])
        counts = torch.cat([counts, counts.new_zeros(max(0, k - counts.numel()))])
        present = counts > 0
        means = torch.full_like(sums, math.nan)
        means[present] = sums[present] / counts[present, None]
        csi = morcos_csi(means[present])
        col = color_selectivity(values, grey[layer], filled) if layer in grey else \
            torch.full((values.shape[0],), math.nan, dtype=torch.float64)
        nf = None
        if pixels is not None and layer in fields:
            nf = _neuron_features(pixels, index[layer], top.positions.cpu(), values, filled, fields[layer],
                                  crop_elements)
        cls_index = cls_index.masked_fill(dead, math.nan)
        tables[layer] = UnitTable(
            layer=layer, values=values, image_ids=top.image_ids.cpu(), positions=top.positions.cpu(), labels=labels,
            filled=filled, neuron_features=nf, frequencies=freqs, class_selectivity=cls_index,
            top_class=top_class(freqs).masked_fill(dead, -1), population_code=pc.masked_fill(dead, 0),
            population_classes=[[] if d else c for d, c in zip(dead.tolist(), pc_classes)],
            color_selectivity=col.masked_fill(dead, math.nan), csi=csi.masked_fill(dead, math.nan), dead=dead,
            class_means=means)
    return tables


def _neuron_features(pixels: Tensor, index: Tensor, positions: Tensor, values: Tensor, filled: Tensor,
                     field_: ReceptiveField, crop_elements: int) -> Tensor:
    """`neuron_features` of the crops of `pixels[index[u, s]]` at `positions[u, s]`, without cutting a
    crop per entry: each distinct (image, position) pair of a chunk of units is cut once (a 1x1 map,
    e.g. LeNet's conv3, has one position: a crop per distinct image), and the weighted sums are one
    sparse [units, pairs] x [pairs, pixels] product. Entries of weight 0 are left out (they add
    nothing). Chunks of units of about `crop_elements` crop values at most, as before."""
    u_count, n = index.shape
    c = pixels.shape[1]
    ph, pw = field_.patch_size
    a, filled = _check_top(values, filled)
    a_max = a.amax(1, keepdim=True)
    weights = torch.where(a_max > 0, a / a_max.clamp_min(torch.finfo(a.dtype).tiny), 0.0).float()
    h, w = (int(positions[..., d].max()) + 1 if positions.numel() else 1 for d in (0, 1))
    tiny = torch.finfo(torch.float32).tiny
    chunk = max(1, crop_elements // max(1, n * c * ph * pw))
    out = []
    for s in range(0, u_count, chunk):
        idx, pos, wt = index[s:s + chunk], positions[s:s + chunk], weights[s:s + chunk]
        unit, slot = ((idx >= 0) & (wt > 0)).nonzero(as_tuple=True)
        key = (idx[unit, slot] * h + pos[unit, slot, 0]) * w + pos[unit, slot, 1]
        pairs, column = key.unique(return_inverse=True)
        crops = crop_patches(pixels, field_, (pairs // w) % h, pairs % w, index=pairs // (h * w)).float()
        present = (~torch.isnan(crops[:, 0])).float().reshape(len(pairs), ph * pw)         # [P, Ph * Pw]
        matrix = torch.sparse_coo_tensor(torch.stack([unit, column]), wt[unit, slot], (idx.shape[0], len(pairs)),
                                         check_invariants=False)
        num = torch.sparse.mm(matrix, crops.nan_to_num(0).reshape(len(pairs), c * ph * pw)).view(-1, c, ph, pw)
        den = torch.sparse.mm(matrix, present).view(-1, 1, ph, pw)
        out.append(torch.where(den > 0, num / den.clamp_min(tiny), math.nan))
    return torch.cat(out)
