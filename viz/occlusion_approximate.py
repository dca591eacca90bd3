"""Approximate occlusion maps: Krypton's adaptive drill-down, and reuse across epochs.

After Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations" (SIGMOD 2019, DOI 10.1145/3299869.3319874; their tool
Krypton), section 4.2. The map is first computed at a coarse stride, then at the fine stride only
where the coarse map changes most; everywhere else it is interpolated from the coarse map.

On the grid of fine patch positions (the map `occlusion_maps` returns at `stride`):

* the **nodes** are every `coarse`-th position along each axis, plus the last one (so every fine
  position lies inside a cell of nodes, and a node's value is exact);
* the coarse pass computes every node;
* each other position scores the largest change, |p(node) - p(unoccluded image)|, over the four
  nodes of its cell; the `drill` fraction of them (per image, rounded up) with the highest scores
  is computed at the fine stride;
* the rest take the bilinear interpolation of the nodes' probabilities and the nearest node's
  label (ties to the lower node).

With `drill=1.0` every position is computed and the map is exact. Everything above runs on the
images' device without a host synchronization: the number of positions computed is fixed by the
shapes and `drill`, and the positions are chosen with `topk`.

**Reuse across epochs** (`previous`, `reuse_tol`): a position computed at the fine stride in an
earlier call keeps its value while none of its cell's four node probabilities has moved by
`reuse_tol` or more since that value was computed (not merely since the previous call, so slow
drift does not accumulate). Reused positions are not computed again; choosing what is left costs
one host synchronization (to count it), before the loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from convlens.viz.occlusion_incremental import OcclusionError

__all__ = ["Approximation", "PRESETS", "OcclusionResult", "resolve", "drill_down", "node_indices", "check_tau"]


@dataclass(frozen=True)
class Approximation:
    """`coarse`: the coarse stride in fine strides (1: no drill-down); `drill`: the fraction of the
    positions off the coarse grid computed at the fine stride; `tau`: Krypton's projective-field
    threshold of the incremental path (None: none)."""
    coarse: int = 1
    drill: float = 1.0
    tau: float | None = None

    @property
    def exact(self) -> bool:
        return (self.coarse == 1 or self.drill >= 1.0) and (self.tau is None or self.tau >= 1.0)


#: the named presets of `approximate=`. "fast": a coarse stride of 2 fine strides (a quarter of the
#: positions, plus the last row and column) and a tenth of the others at the fine stride, about a
#: third of the copies; no projective-field threshold, which cost far more quality than it saved
#: time on a trained net (benchmarks/RESULTS.md, "Approximate occlusion")
PRESETS: dict[str, Approximation] = {"fast": Approximation(coarse=2, drill=0.1, tau=None)}


def check_tau(tau) -> float | None:
    if tau is None:
        return None
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise OcclusionError(f"tau must be a fraction in (0, 1] (1: no thresholding), or None for exact maps; "
                             f"got {tau!r}")
    return float(tau)


def resolve(approximate: str | None = None, coarse: int | None = None, drill: float | None = None,
            tau: float | None = None) -> Approximation:
    """The approximation asked for: the preset named by `approximate` (None: none), with the raw
    knobs that are not None in its place. An OcclusionError names what is wrong."""
    if approximate is None:
        base = Approximation()
    elif isinstance(approximate, str) and approximate in PRESETS:
        base = PRESETS[approximate]
    else:
        raise OcclusionError(f"approximate must be None (exact maps) or one of {sorted(PRESETS)}, got {approximate!r}")
    if coarse is not None and (isinstance(coarse, bool) or not isinstance(coarse, int) or coarse < 1):
        raise OcclusionError(f"coarse must be an int >= 1 (the coarse stride in fine strides; 1: no drill-down), "
                             f"got {coarse!r}")
    if drill is not None and (isinstance(drill, bool) or not isinstance(drill, (int, float)) or not 0 <= drill <= 1):
        raise OcclusionError(f"drill must be a fraction in [0, 1] (of the positions off the coarse grid computed "
                             f"at the fine stride), got {drill!r}")
    tau = check_tau(tau)
    result = Approximation(base.coarse if coarse is None else coarse, base.drill if drill is None else float(drill),
                           base.tau if tau is None else tau)
    if drill is not None and result.coarse == 1 and drill < 1:
        raise OcclusionError(f"drill={drill} needs a coarse grid: pass coarse >= 2 as well (e.g. coarse=4), or "
                             f"approximate='fast'")
    return result


@dataclass
class OcclusionResult:
    """Occlusion maps and what reuse in a later call needs. `prob`, `label` [N, h, w] over the fine
    positions; `known` [N, h, w]: computed (at a node or at the fine stride) or reused, not
    interpolated; `reference` [N, h, w, 4]: for a known position, its cell's node probabilities
    when it was computed (None for exact maps); `targets` [N]; `copies`: occluded copies forwarded."""
    prob: Tensor
    label: Tensor
    known: Tensor
    reference: Tensor | None
    targets: Tensor
    copies: int

    def compatible(self, prob_shape: torch.Size, targets: Tensor) -> bool:
        """Reusable for maps of this shape and these targets (the same probe images are the caller's)."""
        return (self.reference is not None and self.prob.shape == prob_shape and self.targets.shape == targets.shape
                and self.targets.device == targets.device and bool(torch.equal(self.targets, targets)))


def node_indices(count: int, coarse: int) -> list[int]:
    """The coarse grid along an axis of `count` fine positions: every `coarse`-th, and the last."""
    nodes = list(range(0, count, coarse))
    return nodes if nodes[-1] == count - 1 else nodes + [count - 1]


def _cells(count: int, nodes: list[int]) -> tuple[list[int], list[float], list[int]]:
    """Per fine position: the index of its cell's lower node, its fraction of the way to the upper
    node, and its nearest node (ties to the lower)."""
    lower, frac, nearest = [], [], []
    for i in range(count):
        a = max(k for k, n in enumerate(nodes) if n <= i)
        a = min(a, max(len(nodes) - 2, 0))
        span = nodes[a + 1] - nodes[a] if len(nodes) > 1 else 1
        t = (i - nodes[a]) / span
        lower.append(a)
        frac.append(t)
        nearest.append(a + 1 if t > 0.5 else a)
    return lower, frac, nearest


def drill_down(evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], base_prob: Tensor, targets: Tensor,
               rows: int, cols: int, coarse: int, drill: float, previous: OcclusionResult | None = None,
               reuse_tol: float | None = None) -> OcclusionResult:
    """Adaptive drill-down over a `rows` x `cols` grid of fine positions (see the module's docstring).

    `evaluate(image, position)`: the probability of the target and the predicted label [M] of the
    occluded copies of images `image` [M] with the patch at fine positions `position` [M] (flat,
    row-major). `base_prob` [N]: p(target) on the unoccluded images. `previous`, `reuse_tol`: reuse
    the known positions of an earlier result whose cell nodes moved less than `reuse_tol`."""
    device, N = base_prob.device, base_prob.shape[0]
    ny, nx = node_indices(rows, coarse), node_indices(cols, coarse)
    ly, fy, ey = (torch.tensor(v, device=device) for v in _cells(rows, ny))
    lx, fx, ex = (torch.tensor(v, device=device) for v in _cells(cols, nx))
    uy, ux = (ly + 1).clamp(max=len(ny) - 1), (lx + 1).clamp(max=len(nx) - 1)
    node_flat = (torch.tensor(ny, device=device)[:, None] * cols + torch.tensor(nx, device=device)[None]).flatten()
    images = torch.arange(N, device=device)

    # the coarse pass
    p_node, l_node = evaluate(images.repeat_interleave(node_flat.numel()), node_flat.repeat(N))
    p_node, l_node = p_node.view(N, len(ny), len(nx)), l_node.view(N, len(ny), len(nx))

    # interpolation from the nodes: the four corners of every fine position's cell
    corners = torch.stack([p_node[:, ly][:, :, lx], p_node[:, ly][:, :, ux],
                           p_node[:, uy][:, :, lx], p_node[:, uy][:, :, ux]], dim=-1)      # [N, h, w, 4]
    wy, wx = fy.to(p_node.dtype)[:, None], fx.to(p_node.dtype)[None]
    weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], dim=-1)
    prob = (corners * weights).sum(-1)
    label = l_node[:, ey][:, :, ex]
    is_node = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    is_node[node_flat] = True
    is_node = is_node.view(rows, cols).expand(N, rows, cols)
    # the nodes are exact (interpolation with integer weights may round): paste them
    prob = prob.flatten(1).scatter(1, node_flat.expand(N, -1), p_node.flatten(1)).view(N, rows, cols)

    # where to drill down: the largest change among a cell's nodes, nodes excluded
    score = (corners - base_prob.to(corners.dtype)[:, None, None, None]).abs().amax(-1)
    score = score.masked_fill(is_node, float("-inf")).flatten(1)
    off_grid = rows * cols - node_flat.numel()
    chosen = torch.topk(score, math.ceil(drill * off_grid), dim=1).indices if off_grid else score[:, :0].long()
    selected = torch.zeros(N, rows * cols, dtype=torch.bool, device=device).scatter(1, chosen, True)
    selected = selected.view(N, rows, cols)

    reused = torch.zeros_like(selected)
    reference = corners
    if previous is not None and reuse_tol is not None and previous.compatible(prob.shape, targets):
        moved = (corners - previous.reference.to(corners.dtype)).abs().amax(-1)
        reused = previous.known & ~is_node & (moved < reuse_tol)
        prob = torch.where(reused, previous.prob.to(prob.dtype), prob)
        label = torch.where(reused, previous.label, label)
        reference = torch.where(reused[..., None], previous.reference.to(corners.dtype), corners)
        image_idx, position = (selected & ~reused).flatten(1).nonzero(as_tuple=True)  # the one host sync
    else:
        image_idx, position = images.repeat_interleave(chosen.shape[1]), chosen.flatten()
    p_fine, l_fine = evaluate(image_idx, position)
    flat = image_idx * (rows * cols) + position
    prob, label = prob.flatten().index_put((flat,), p_fine).view(N, rows, cols), \
        label.flatten().index_put((flat,), l_fine).view(N, rows, cols)
    known = is_node | selected | reused
    return OcclusionResult(prob, label, known, reference, targets, N * node_flat.numel() + position.numel())
