"""Synthetic `shapes` images: ten simple stroke shapes on textured backgrounds.

Follows the supplementary part of Rafegas & Vanrell (2015, arXiv:1511.05084; "6. Filter Decoding on a
simpler case"), which decodes filters of a small hand-built net on simple synthetic characters made
of bars, corners and arcs (its C and D share a bottom-left corner sub-shape). Here the same kind of
shapes are drawn at random position, size, stroke width and colour so that a CNN can be trained on
them and its learned filters compared with those intrinsic sub-shapes.

Pure torch/numpy, no files and no Lightning; the `shapes` datamodule wraps `make_shapes`.

Conventions
- Coordinates are pixel indices: x is the column, y the row, pixel centres at integer positions.
- A shape is a union of strokes: capsules (segments with round ends) and circular arcs, each
  `width` pixels wide; a pixel belongs to the object when its centre is within `width / 2` of one.
  The object mask is exactly the set of pixels that carry the object colour; every other pixel is
  background.
- `boxes` are the tight bounding box of the mask, (x0, y0, x1, y1) with x1 and y1 exclusive.
- Background: per image and channel a level plus smooth low-frequency noise (a random 4x4 grid,
  bilinearly upsampled) plus fine per-pixel noise. Object: one flat level (a grey or an RGB colour),
  brighter or darker than the background (chosen at random per channel). Levels are picked so that
  every object pixel differs from every background pixel of its image, in every channel, by at
  least `MIN_CONTRAST_LEVELS` grey levels (of 255).
- Labels are balanced: each consecutive block of 10 images holds every class once, in random order.
- Every random draw is one array with the image index as its leading axis, so for a fixed seed
  `make_shapes(m, seed=s)` equals the first m images of `make_shapes(n, seed=s)` for m <= n.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from convlens.errors import ConfigError

CLASSES: tuple[str, ...] = (
    "horizontal_bar",   # -
    "vertical_bar",     # |
    "diagonal_bar",     # /  (bottom-left to top-right)
    "corner",           # L  (left side + bottom side)
    "plus",             # +
    "x",                # X  (both diagonals)
    "ring",             # O
    "letter_c",         # C  (ring open on the right, a 90 degree wedge removed)
    "letter_t",         # T
    "letter_d",         # D  (left side, top/bottom half-sides, right half-circle)
)

MIN_SIZE = 16

# Appearance ranges, as fractions of the full intensity range [0, 1].
_LOWFREQ_AMP_MAX = 0.12     # smooth background noise amplitude
_FINE_AMP_MAX = 0.06        # per-pixel background noise amplitude
_GAP_MIN, _GAP_MAX = 0.20, 0.40   # object level beyond the background's extreme values
_LOWFREQ_GRID = 4           # control points per side of the smooth background noise

# Guaranteed |object pixel - background pixel| in uint8 levels: the gap, less one level for the
# two roundings to integers.
MIN_CONTRAST_LEVELS: int = math.floor(_GAP_MIN * 255 - 1)

# Geometry ranges. `half` is the half-side of the square the shape's stroke centre-lines span; the
# drawn extent is 2*half + width, about 27-50% of the image side.
_HALF_MIN, _HALF_MAX = 0.11, 0.21   # fractions of the image side
_WIDTH_MIN = 1.5                    # pixels; thinner diagonal strokes would break into dots
_WIDTH_PER_HALF = 0.2               # width drawn from [_WIDTH_MIN, _WIDTH_MIN + 0.2 * half]

# Independent random streams, so the background alone can be re-rendered for a seed.
_STREAM_LABELS, _STREAM_GEOMETRY, _STREAM_APPEARANCE, _STREAM_LOWFREQ, _STREAM_FINE = range(5)


class ShapesData(NamedTuple):
    """images uint8 [n, C, size, size]; labels int64 [n] (indices into CLASSES); boxes int64 [n, 4]
    as (x0, y0, x1, y1), x1/y1 exclusive; masks bool [n, size, size] or None if not requested."""
    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor | None = None


class _Geometry(NamedTuple):
    """Per-image float64 [n] centre (cx, cy), half-side and stroke width in pixels; labels int64."""
    labels: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    half: torch.Tensor
    width: torch.Tensor


class _Appearance(NamedTuple):
    """Per-image, per-channel float64 [n, C] levels and noise amplitudes in [0, 1] units."""
    background: torch.Tensor
    lowfreq_amp: torch.Tensor
    fine_amp: torch.Tensor
    object_level: torch.Tensor


def make_shapes(n: int, size: int = 28, channels: int = 1, seed: int = 0,
                return_masks: bool = False) -> ShapesData:
    """`n` images of the 10 CLASSES, `size` x `size`, 1 (grey) or 3 (colour) channels.

    Deterministic for a given `seed` (a non-negative int); different seeds give different data.
    Set `return_masks` to also get the boolean object masks [n, size, size].
    """
    _check_args(n, size, channels, seed)
    geometry = _sample_geometry(n, size, seed)
    masks = _render_masks(geometry, size)
    appearance = _sample_appearance(n, channels, seed)
    background = _background(appearance, size, seed)
    objects = appearance.object_level.float()[:, :, None, None]
    images = _to_uint8(torch.where(masks[:, None], objects, background))
    return ShapesData(images, geometry.labels, _mask_boxes(masks), masks if return_masks else None)


def _check_args(n, size, channels, seed) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not is_int(n) or n < 1:
        raise ConfigError(f"make_shapes: n must be an int >= 1 (number of images), got {n!r}; in a run, set "
                          f"datamodule.n_train and datamodule.n_test to image counts")
    if not is_int(size) or size < MIN_SIZE:
        raise ConfigError(f"make_shapes: size must be an int >= {MIN_SIZE} (shapes are unreadable "
                          f"below that), got {size!r}; use e.g. 28 (grey) or 32 (colour): datamodule.image_size=28")
    if not is_int(channels) or channels not in (1, 3):
        raise ConfigError(f"make_shapes: channels must be 1 (grey) or 3 (RGB), got {channels!r}; set "
                          f"datamodule.channels=1 or 3")
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"make_shapes: seed must be a non-negative int, got {seed!r}; set e.g. "
                          f"datamodule.seed=0")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream])


def _sample_geometry(n: int, size: int, seed: int) -> _Geometry:
    """Balanced labels; half-side, stroke width and a centre keeping the object `margin` px inside."""
    blocks = -(-n // len(CLASSES))
    labels = _rng(seed, _STREAM_LABELS).random((blocks, len(CLASSES))).argsort(axis=1).reshape(-1)[:n]
    u = torch.from_numpy(_rng(seed, _STREAM_GEOMETRY).random((n, 4)))
    half = size * (_HALF_MIN + (_HALF_MAX - _HALF_MIN) * u[:, 0])
    width = _WIDTH_MIN + _WIDTH_PER_HALF * half * u[:, 1]
    margin = max(2, size // 14)
    # The stroke's half-width stays below the half-side (1.5 + 0.2 * half < 2 * half for half >= 1.76
    # px, the smallest at size 16), so rings keep a hole and _shape_mask may square |dist - half|.
    # Every mask pixel lies within half + width/2 of the centre along x and along y.
    reach = half + width / 2
    lo, hi = margin + reach, (size - 1 - margin) - reach
    cx = lo + (hi - lo) * u[:, 2]
    cy = lo + (hi - lo) * u[:, 3]
    return _Geometry(torch.from_numpy(labels).long(), cx, cy, half, width)


def _render_masks(g: _Geometry, size: int) -> torch.Tensor:
    """Boolean object masks [n, size, size], rendered class by class over all images of a class."""
    n = g.labels.shape[0]
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    coords = torch.arange(size, dtype=torch.float32)
    for label in range(len(CLASSES)):
        idx = (g.labels == label).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        # Pixel offsets from the shape centre, [m, 1, W] and [m, H, 1], in float32 for speed.
        cx, cy = g.cx[idx].float()[:, None, None], g.cy[idx].float()[:, None, None]
        dx, dy = coords[None, None, :] - cx, coords[None, :, None] - cy
        h = g.half[idx].float()[:, None, None]
        radius = g.width[idx].float()[:, None, None] / 2
        masks[idx] = _shape_mask(CLASSES[label], dx, dy, h, radius)
    return masks


def _shape_mask(name: str, dx, dy, h, radius) -> torch.Tensor:
    """Pixels within `radius` of the shape's centre-lines, [m, H, W]; dx [m, 1, W] and dy [m, H, 1]
    are pixel offsets from the centre, h [m, 1, 1] the half-side. Segment endpoints are given in
    units of h, y pointing down."""
    r2 = radius * radius

    def seg(x0, y0, x1, y1):
        # Axis-aligned segments keep the per-axis terms at [m, 1, W] / [m, H, 1] size, so only the
        # final sum and comparison run over all pixels (the general formula needs about 15 passes).
        if y0 == y1:
            ex, ey = dx - dx.clamp(min(x0, x1) * h, max(x0, x1) * h), dy - y0 * h
            return ex * ex + ey * ey <= r2
        if x0 == x1:
            ex, ey = dx - x0 * h, dy - dy.clamp(min(y0, y1) * h, max(y0, y1) * h)
            return ex * ex + ey * ey <= r2
        return _segment_dist2(dx, dy, x0 * h, y0 * h, x1 * h, y1 * h) <= r2

    def circle():
        # | |(dx, dy)| - h | <= radius, squared on both sides (h > radius, see _sample_geometry).
        d2 = dx * dx + dy * dy
        return (d2 >= (h - radius) ** 2) & (d2 <= (h + radius) ** 2)

    if name == "horizontal_bar":
        return seg(-1, 0, 1, 0)
    if name == "vertical_bar":
        return seg(0, -1, 0, 1)
    if name == "diagonal_bar":
        return seg(-1, 1, 1, -1)
    if name == "corner":
        return seg(-1, -1, -1, 1) | seg(-1, 1, 1, 1)
    if name == "plus":
        return seg(-1, 0, 1, 0) | seg(0, -1, 0, 1)
    if name == "x":
        return seg(-1, -1, 1, 1) | seg(-1, 1, 1, -1)
    if name == "ring":
        return circle()
    if name == "letter_c":
        opening = dx > dy.abs()   # the 90 degree wedge facing right
        return circle() & ~opening
    if name == "letter_t":
        return seg(-1, -1, 1, -1) | seg(0, -1, 0, 1)
    if name == "letter_d":
        right_half_circle = circle() & (dx >= 0)
        return seg(-1, -1, -1, 1) | seg(-1, -1, 0, -1) | seg(-1, 1, 0, 1) | right_half_circle
    raise AssertionError(f"no drawing for class {name!r}")


def _segment_dist2(px, py, ax, ay, bx, by) -> torch.Tensor:
    """Squared distance from points (px, py) to the segments a-b (all broadcastable)."""
    vx, vy = bx - ax, by - ay
    wx, wy = px - ax, py - ay
    t = ((wx * vx + wy * vy) / (vx * vx + vy * vy)).clamp(0, 1)
    ex, ey = wx - t * vx, wy - t * vy
    return ex * ex + ey * ey


def _sample_appearance(n: int, channels: int, seed: int) -> _Appearance:
    """Levels per image and channel such that object and background pixels never get closer than
    the gap, and nothing leaves [0, 1]."""
    u = torch.from_numpy(_rng(seed, _STREAM_APPEARANCE).random((n, channels, 5)))
    lowfreq = _LOWFREQ_AMP_MAX * u[..., 0]
    fine = _FINE_AMP_MAX * u[..., 1]
    gap = _GAP_MIN + (_GAP_MAX - _GAP_MIN) * u[..., 2]
    bright = u[..., 3] < 0.5
    spread = lowfreq + fine      # background pixels lie within level +- spread
    delta = spread + gap         # object level sits delta from the background level
    # Feasible background levels; never empty since 2*spread + gap <= 0.76.
    lo = torch.where(bright, spread, delta)
    hi = torch.where(bright, 1 - delta, 1 - spread)
    background = lo + (hi - lo) * u[..., 4]
    object_level = torch.where(bright, background + delta, background - delta)
    return _Appearance(background, lowfreq, fine, object_level)


def _background(a: _Appearance, size: int, seed: int) -> torch.Tensor:
    """Float32 [n, C, size, size] background in [0, 1]: level + lowfreq_amp * smooth + fine_amp * fine
    with smooth and fine noise in [-1, 1]."""
    n, channels = a.background.shape
    grid_shape = (n, channels, _LOWFREQ_GRID * _LOWFREQ_GRID)
    grid = torch.from_numpy(_rng(seed, _STREAM_LOWFREQ).random(grid_shape, dtype=np.float32)) * 2 - 1
    # Bilinear upsampling as one matrix product with the Kronecker product of the 1-D weights (far
    # faster than F.interpolate on many small maps); the weights are convex, so [-1, 1] is kept.
    interp = _linear_interpolation_matrix(_LOWFREQ_GRID, size)
    smooth = (grid @ torch.kron(interp, interp).T).view(n, channels, size, size)
    uniform = _rng(seed, _STREAM_FINE).random((n, channels, size, size), dtype=np.float32)
    uniform = torch.from_numpy(uniform)

    def per_image(v):
        return v.float()[:, :, None, None]
    # level + lowfreq * smooth + fine * (2 * uniform - 1), fused into two in-place passes.
    out = torch.addcmul(per_image(a.background - a.fine_amp), per_image(a.lowfreq_amp), smooth)
    return out.addcmul_(per_image(2 * a.fine_amp), uniform)


def _linear_interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D linear interpolation with end points aligned
    (F.interpolate's align_corners=True)."""
    pos = torch.linspace(0, n_in - 1, n_out)
    left = pos.floor().clamp(max=n_in - 2).long()
    frac = pos - left
    weights = torch.zeros(n_out, n_in)
    weights[torch.arange(n_out), left] = 1 - frac
    weights[torch.arange(n_out), left + 1] = frac
    return weights


def _render_background(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """The uint8 background alone, exactly as under the objects of `make_shapes` with the same args."""
    _check_args(n, size, channels, seed)
    return _to_uint8(_background(_sample_appearance(n, channels, seed), size, seed))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) boxes of non-empty masks [n, H, W], x1/y1 exclusive."""
    n, height, width = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)       # [n, W], [n, H]
    xs, ys = torch.arange(width), torch.arange(height)
    x0 = torch.where(cols, xs, width).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, height).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1).long()
