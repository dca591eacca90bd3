"""Nearest training images in a layer's feature space, and the bookkeeping of a classifier's mistakes.

Follows the "Data inspection" and "Explaining by case" entries of Vanrell & Arias's lecture
"Understanding and visualizing CNNs" (Master in Computer Vision, Barcelona): find the misclassified
test images, find the most similar training images, and check whether the error comes from wrongly
labelled training data, a similar class, or context over the object (the lecture cites Koh & Liang,
"Understanding black-box predictions via influence functions", ICML 2017, arXiv:1703.04730, for the
idea; here similarity is the nearest neighbours of the activations, as in its "explaining by case").

- `classifier_head`: the module whose output is the net's class scores (the last module with
  weights that runs, e.g. torchvision's `fc` / `classifier.6`, LeNet's 1x1 `conv4`).
- `layer_features`: [N, D] features of a batch: the head's input by default, or a named layer's
  output; maps are averaged over space (`pool="avg"`) or flattened (`pool="flatten"`).
- `knn`: exact k nearest neighbours by cosine or Euclidean distance against a feature bank, in
  blocks of bounded size (never a Q x N matrix for a large bank); ties go to the lower bank index.
- `confusion_matrix`, `class_accuracy`, `rank_mistakes`, `suspects`: the counts the `mistakes`
  callback draws.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.viz.common import VizError, check_images, check_int, eval_mode
from convlens.viz.layers import get_layer, trace_chain

__all__ = ["KnnError", "METRICS", "POOLS", "FeatureSource", "classifier_head", "feature_source", "pool_features",
           "layer_features", "knn", "confusion_matrix", "class_accuracy", "rank_mistakes", "suspects",
           "sprite_capacity", "SPRITE_LIMIT"]

METRICS = ("cosine", "euclidean")
POOLS = ("avg", "flatten")
#: TensorBoard's embedding projector refuses sprites larger than this many pixels a side
SPRITE_LIMIT = 8192


class KnnError(VizError):
    """A model, layer or argument the nearest-neighbour functions cannot use."""


class FeatureSource(NamedTuple):
    """Where features are read: `layer`'s input (`side="input"`, the head's input by default) or its
    output (`side="output"`, a named layer); `head` is the module whose output is the class scores."""
    head: str
    layer: str
    side: str


class _Stop(Exception):
    pass


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def classifier_head(net: nn.Module, image: Tensor) -> str:
    """The name of the net's classifier head: the last module with weights of its own that runs in
    the forward pass of `image` ([1, C, H, W] is enough), whose output holds as many values per image
    as the net's output (its class scores). A KnnError naming what was found otherwise."""
    check_images(image, KnnError)
    with torch.no_grad():
        steps = trace_chain(net, image[:1], None)
        with eval_mode(net):
            out = net(image[:1])
    if not torch.is_tensor(out) or out.dim() < 2:
        raise KnnError(f"the model's output is {type(out).__name__ if not torch.is_tensor(out) else list(out.shape)}, "
                       "not class scores [N, classes]; the mistakes of a classifier need its scores")
    classes = out[0].numel()
    weighted = [s for s in steps if _has_weights(s.module)]
    if not weighted:
        raise KnnError("the model has no module with weights, so no classifier head to read features from; "
                       "name the feature layer with layer=...")
    last = weighted[-1]
    per_image = math.prod(last.out_shape[1:]) if last.out_shape else 0
    if per_image != classes:
        raise KnnError(f"the last module with weights, {last.name!r}, outputs {per_image} values per image, but the "
                       f"model {classes} class scores: no classifier head found; the model must end with its "
                       "classifier (e.g. a Linear)")
    return last.name


def feature_source(net: nn.Module, image: Tensor, layer: str | None = None) -> FeatureSource:
    """Where `layer_features` reads: the head's input (`layer=None`) or `layer`'s output."""
    head = classifier_head(net, image)
    if layer is None:
        return FeatureSource(head, head, "input")
    get_layer(net, layer)  # LayerError with the valid names
    return FeatureSource(head, layer, "output")


def pool_features(x: Tensor, pool: str = "avg") -> Tensor:
    """[N, D] float32 features of a captured tensor [N, ...]: maps [N, C, h, w] averaged over space
    (`pool="avg"`: D = C) or flattened (`"flatten"`: D = C*h*w); other shapes flattened."""
    if pool not in POOLS:
        raise KnnError(f"Unknown pool={pool!r}; use one of {', '.join(POOLS)}")
    if not torch.is_tensor(x) or x.dim() < 2:
        raise KnnError(f"features must be a batch tensor [N, ...], got "
                       f"{list(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    x = x.detach()
    if pool == "avg" and x.dim() > 2:
        x = x.float().mean(dim=tuple(range(2, x.dim())))
    return x.reshape(x.shape[0], -1).float()


def layer_features(net: nn.Module, images: Tensor, layer: str | None = None, pool: str = "avg",
                   source: FeatureSource | None = None) -> Tensor:
    """[N, D] features of `images` (model input space): the input of the classifier head by default,
    else the output of `layer`, pooled by `pool_features`. Eval mode, no gradients; the forward pass
    stops at the feature layer. `source`: a `feature_source` found before (saves a trace)."""
    check_images(images, KnnError)
    if pool not in POOLS:
        raise KnnError(f"Unknown pool={pool!r}; use one of {', '.join(POOLS)}")
    if source is None:
        source = feature_source(net, images[:1], layer)
    module = get_layer(net, source.layer)
    captured: list[Tensor] = []

    def hook(_module, args, out):
        captured.append(pool_features(args[0] if source.side == "input" else out, pool))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), eval_mode(net):
            net(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise KnnError(f"layer {source.layer!r} was not run by the model's forward pass")
    return captured[0]


def _scores(q: Tensor, b: Tensor, metric: str, b_sq: Tensor | None) -> Tensor:
    """A [q, b] block of scores that order the bank rows as the distance does, in one matrix
    product: cosine -q.b (unit rows; `q` comes negated), Euclidean |b|^2 - 2 q.b (|q|^2, the same for
    the whole row, is added to the k chosen ones only)."""
    if metric == "cosine":
        return q @ b.T
    return torch.addmm(b_sq[None], q, b.T, alpha=-2)


def _sorted_by_value_then_index(values: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of (values, index) ordered by value, ties by the lower index."""
    by_index = index.argsort(dim=1, stable=True)
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    by_value = values.argsort(dim=1, stable=True)
    return values.gather(1, by_value), index.gather(1, by_value)


def knn(queries: Tensor, bank: Tensor, k: int, metric: str = "cosine",
        block_elements: int = 2**22) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of each query row among the bank's rows.

    `queries` [Q, D], `bank` [N, D] (any float dtype; computed in float32, on the bank's device).
    `metric`: "cosine" (1 - cosine similarity; a zero vector is at distance 1 from everything) or
    "euclidean". Returns (distances [Q, k'], indices [Q, k']) with k' = min(k, N), nearest first;
    equal distances are ordered by the lower bank index, so the result is deterministic. Memory: at
    most about `block_elements` distances at once (queries and bank are cut into blocks), whatever N.
    """
    if metric not in METRICS:
        raise KnnError(f"Unknown metric={metric!r}; use one of {', '.join(METRICS)}")
    check_int("k", k, 1, KnnError)
    check_int("block_elements", block_elements, 1, KnnError)
    for name, t in (("queries", queries), ("bank", bank)):
        if not torch.is_tensor(t) or t.dim() != 2 or not t.is_floating_point():
            raise KnnError(f"{name} must be a float tensor [rows, D], got "
                           f"{t.dtype if torch.is_tensor(t) else type(t).__name__} "
                           f"{list(t.shape) if torch.is_tensor(t) else ''}".rstrip())
    if queries.shape[1] != bank.shape[1]:
        raise KnnError(f"queries have {queries.shape[1]} features and the bank {bank.shape[1]}; compute both "
                       "from the same layer")
    if bank.shape[0] == 0:
        raise KnnError("the bank is empty; give it at least one row")
    device = bank.device
    bank = bank.detach().float()
    queries = queries.detach().to(device).float()
    if metric == "cosine":
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    b_sq = (bank * bank).sum(1) if metric == "euclidean" else None
    n, kk = bank.shape[0], min(k, bank.shape[0])
    q_rows = max(1, min(queries.shape[0], int(math.sqrt(block_elements))))
    b_rows = max(kk, block_elements // q_rows)
    out_d, out_i = [], []
    for qs in range(0, queries.shape[0], q_rows):
        q = queries[qs:qs + q_rows]
        q = -q if metric == "cosine" else q
        best_d = torch.empty(q.shape[0], 0, device=device)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for bs in range(0, n, b_rows):
            d = _scores(q, bank[bs:bs + b_rows], metric, b_sq[bs:bs + b_rows] if b_sq is not None else None)
            take = min(kk + 8, d.shape[1])  # a few extra, so that ties at the k-th place are all seen
            vals, idx = d.topk(take, dim=1, largest=False, sorted=True)
            if take < d.shape[1] and bool((vals[:, kk - 1] == vals[:, -1]).any()):
                # more ties at the k-th distance than fetched: order the whole block
                idx = d.argsort(dim=1, stable=True)[:, :kk]
                vals = d.gather(1, idx)
            vals, idx = _sorted_by_value_then_index(vals, idx + bs)
            # best holds lower indices than this block: a stable sort by value keeps ties by index
            cand_d, cand_i = torch.cat([best_d, vals], 1), torch.cat([best_i, idx], 1)
            order = cand_d.argsort(dim=1, stable=True)[:, :kk]
            best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
        if metric == "cosine":
            best_d = 1 + best_d
        else:
            best_d = ((q * q).sum(1, keepdim=True) + best_d).clamp_min(0).sqrt()
        out_d.append(best_d)
        out_i.append(best_i)
    if not out_d:
        return torch.empty(0, kk, device=device), torch.empty(0, kk, dtype=torch.long, device=device)
    return torch.cat(out_d), torch.cat(out_i)


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """[C, C] int64 counts: row = true class, column = predicted class."""
    check_int("num_classes", num_classes, 1, KnnError)
    preds, labels = preds.long().flatten().cpu(), labels.long().flatten().cpu()
    if preds.shape != labels.shape:
        raise KnnError(f"preds {list(preds.shape)} and labels {list(labels.shape)} must have one entry per image")
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise KnnError(f"{name} hold classes outside 0..{num_classes - 1} (min {int(t.min())}, max "
                           f"{int(t.max())}); give num_classes as the model's number of outputs")
    return torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).view(
        num_classes, num_classes)


def class_accuracy(matrix: Tensor) -> Tensor:
    """[C] float accuracy per true class from a confusion matrix (NaN for a class with no image)."""
    totals = matrix.sum(1).double()
    return (matrix.diagonal().double() / totals).masked_fill(totals == 0, math.nan).float()


def rank_mistakes(preds: Tensor, labels: Tensor, confidence: Tensor) -> Tensor:
    """Indices of the misclassified images (pred != label), most confident wrong prediction first
    (ties: the earlier image first)."""
    wrong = (preds != labels).nonzero().flatten()
    order = confidence[wrong].float().argsort(descending=True, stable=True)
    return wrong[order]


def suspects(neighbours: Tensor, disagree: Tensor, top: int | None = None) -> tuple[Tensor, Tensor]:
    """Bank rows that are most often a neighbour whose label differs from the query's true label:
    (rows, counts), most counted first (ties: the lower row), rows counted at least once, at most `top`.

    `neighbours` [Q, k] bank rows of each query's neighbours, `disagree` [Q, k] bool."""
    if neighbours.shape != disagree.shape:
        raise KnnError(f"neighbours {list(neighbours.shape)} and disagree {list(disagree.shape)} must match")
    rows = neighbours[disagree.bool()].long().cpu()
    if not rows.numel():
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    counts = torch.bincount(rows)
    seen = counts.nonzero().flatten()
    order = counts[seen].argsort(descending=True, stable=True)
    seen = seen[order][:top] if top is not None else seen[order]
    return seen, counts[seen]


def sprite_capacity(side: int, limit: int = SPRITE_LIMIT) -> int:
    """How many square thumbnails `side` pixels wide fit in a square sprite of at most `limit` pixels
    a side (the projector lays N images out ceil(sqrt(N)) to a row)."""
    check_int("side", side, 1, KnnError)
    per_row = limit // side
    if per_row < 1:
        raise KnnError(f"thumbnails of {side} px do not fit in the projector's {limit} px sprite; use a smaller size")
    return per_row * per_row
