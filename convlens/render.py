"""Turning tensors into images for TensorBoard, each with a deliberate normalization.

- `to_pixels`: model-input images back to pixels with the datamodule's normalization (true colors).
- `scale_each`: per-tile min-max to [0, 1] (deconv projections: only the pattern matters).
- `scale_symmetric`: per-tile, 0 -> mid-gray and +-max|x| -> white/black (filters, whose sign matters).
- `heatmap`: a [0, 1] map through a matplotlib colormap.
Grids are [3, H, W] float tensors in [0, 1]; captions are drawn with PIL's built-in bitmap font,
`CHAR_WIDTH` pixels a character (`fit_caption` cuts a caption to a tile's width, `tile_width` is a
tile's width once upscaled, `class_caption` names a label).
"""
from __future__ import annotations

import functools

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


def to_pixels(images: torch.Tensor, normalization=None) -> torch.Tensor:
    x = normalization.inverse(images) if normalization is not None else images
    return x.float().clamp(0, 1).cpu()


def scale_each(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-tile (first dim) min-max scaling to [0, 1]."""
    flat = x.detach().float().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(x).cpu()


def scale_symmetric(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-tile scaling with zero at 0.5: 0.5 + x / (2 max|x|)."""
    flat = x.detach().float().flatten(1)
    m = flat.abs().max(1, keepdim=True).values.clamp_min(eps)
    return (0.5 + flat / (2 * m)).view_as(x).cpu()


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """[N, 1|3, H, W] -> [N, 3, H, W]; other channel counts: their mean as gray."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return x.expand(-1, 3, -1, -1)


def heatmap(maps: torch.Tensor, cmap: str = "jet", lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """[N, h, w] values in [lo, hi] -> [N, 3, h, w] colors."""
    import matplotlib

    v = ((maps.detach().float().cpu() - lo) / max(hi - lo, 1e-12)).clamp(0, 1).numpy()
    rgb = matplotlib.colormaps[cmap](v)[..., :3]
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def label_colors(labels: torch.Tensor, num_classes: int, cmap: str = "tab10") -> torch.Tensor:
    """[N, h, w] integer labels -> [N, 3, h, w] colors (one color per class)."""
    import matplotlib

    table = torch.tensor(matplotlib.colormaps[cmap](np.linspace(0, 1, max(num_classes, 2)) if num_classes > 10
                                                    else np.arange(num_classes))[:, :3], dtype=torch.float)
    return table[labels.long().cpu()].permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=1)
def caption_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font: 6 px a character (captions are laid out on that), and much faster
    to draw than the FreeType font `ImageFont.load_default()` returns since Pillow 10.1
    (benchmarks/RESULTS.md, the callbacks' cost)."""
    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    return bitmap() if bitmap is not None else ImageFont.load_default()


#: pixels a character of `caption_font` takes, and the height of a caption line
CHAR_WIDTH = 6
CAPTION_LINE_H = 12
#: about the widest image a TensorBoard card shows legibly. TensorBoard 2.21's Images dashboard draws
#: every image 343 CSS pixels wide, whatever the window (measured in Chromium, 2026-12-03): a wider
#: image is shrunk, so a grid wider than this is laid out again in bands of columns, one under the
#: other, and strips wrap onto new rows (400 px is shown at 0.86, where 6-px captions stay readable;
#: the 1,000-px panels of convlens <= 0.3 were shrunk 2.9x and their captions were not)
CARD_WIDTH = 400
#: logged images narrower than this (the card's width) are upscaled (nearest, integer factor) to at
#: least this wide: TensorBoard stretches a small image to its card's width, smoothly, which blurs
#: the pixels
MIN_LOGGED_WIDTH = 343
#: grids that lay out tiles in a strip wrap onto new rows beyond this width
MAX_GRID_WIDTH = CARD_WIDTH
#: about the tallest image a card shows whole on a screen: a captioned grid given a `cap` note that
#: would be taller keeps the rows that fit and says what it left out (the height of the grid itself:
#: `readable`'s nearest-neighbour upscaling of a narrow image adds pixels, not content)
CARD_HEIGHT = 1000


def downscale_factor(h: int, w: int, size: int, columns: int | None = None, padding: int = 2) -> int:
    """The integer factor that brings tiles much larger than `size` (over twice) down to at most
    twice it (VGG's 224-px images at tile_size 64: 2), so a strip of them fits a card; 1 otherwise.
    With `columns`: tiles larger than `size` are brought down further, while they stay at least
    `size`, until `columns` of them fit `CARD_WIDTH` (occlusion's three 224-px panels at 112: 2)."""
    factor = max(1, -(-max(h, w) // (2 * size)))
    if columns:
        while (columns * (-(-w // factor) + padding) + padding > CARD_WIDTH
               and -(-max(h, w) // (factor + 1)) >= size):
            factor += 1
    return factor


def upscale_factor(h: int, w: int, size: int) -> int:
    """The integer nearest-neighbour factor that brings the longer side of an h x w tile to about `size`."""
    return max(1, round(size / max(h, w)))


def upscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of [N, C, h, w] so the longer side is about `size` (pixels stay crisp)."""
    f = upscale_factor(*x.shape[-2:], size)
    return F.interpolate(x, scale_factor=f, mode="nearest") if f > 1 else x


def tile_width(images: torch.Tensor, tile_size: int, columns: int | None = None) -> int:
    """The width in pixels of a tile of `images` ([..., h, w]) once `upscale`d to `tile_size` (or
    averaged down, `downscale_factor` with `columns`)."""
    h, w = images.shape[-2:]
    shrink = downscale_factor(h, w, tile_size, columns)
    return -(-w // shrink) if shrink > 1 else w * upscale_factor(h, w, tile_size)


def fit_caption(text: str, width_px: int, lines: int = 1) -> str:
    """`text` on at most `lines` lines of a tile `width_px` wide: wrapped at a space, `_`, `-` or
    `/` where it can be (else within a word), and cut with a trailing ~ where it still does not fit."""
    chars = max(1, width_px // CHAR_WIDTH)
    out, rest = [], text
    while rest and len(out) < lines:
        if len(rest) <= chars:
            out.append(rest)
            rest = ""
            break
        if len(out) == lines - 1:  # the last line: cut
            out.append(rest[: chars - 1] + "~")
            rest = ""
            break
        cut = max((rest.rfind(c, 1, chars + 1) for c in " _-/"), default=-1)
        cut = cut + 1 if cut > 0 else chars
        out.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return "\n".join(out)


def class_caption(label, names: Sequence[str]) -> str:
    """The class name of `label` (an int or a 0-d tensor), or its index when `names` has none for it."""
    label = int(label)
    return names[label] if 0 <= label < len(names) else str(label)


def captioned_grid(tiles: torch.Tensor, nrow: int, captions: Sequence[str] | None = None,
                   row_titles: Sequence[str] | None = None, col_titles: Sequence[str] | None = None,
                   tile_size: int = 64, padding: int = 2, cap: str | None = None, per: int = 1,
                   flat: bool = False, shrink_to_fit: bool = False) -> torch.Tensor:
    """Tiles [N, 1|3, h, w] in [0, 1] as one [3, H, W] grid, upscaled to ~`tile_size` (tiles over
    twice that are averaged down, `downscale_factor`; with `shrink_to_fit`, tiles larger than
    `tile_size` are averaged down until a row of `nrow` fits a card, not below `tile_size`), with
    an optional caption under each tile, a title left of each row and above each column. A grid
    wider than a TensorBoard card (`CARD_WIDTH`) is laid out in bands of columns, one under the
    other, so that TensorBoard does not shrink it and its captions stay readable (with or without
    captions).

    `cap`: a note for a grid too tall for a card: when the grid would be taller than `CARD_HEIGHT`
    (before `readable`'s upscaling), a `flat` grid (tiles in no particular rows, e.g. a bank of units) is first
    laid out as wide as a card, then only its first rows that fit are kept, and under them `cap`
    says what was left out, formatted with `shown` and `total` counted in items of `per` tiles
    (`per`: the tiles of one probe image's row, 2 for pairs), e.g. "showing {shown} of {total}
    units of features.28; set max_units to choose" (`card_layout` gives the same numbers)."""
    tiles = as_rgb(tiles.float().cpu().clamp(0, 1))
    shrink = downscale_factor(*tiles.shape[-2:], tile_size, nrow if shrink_to_fit else None, padding)

    def resized(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, shrink, ceil_mode=True) if shrink > 1 else upscale(t, tile_size)

    note = None
    if cap is not None:   # the tiles that fit are chosen first: only they are resized
        nrow, rows, note = _cap(tiles.shape[0], tuple(resized(tiles[:1]).shape[-2:]), nrow, captions, row_titles,
                                col_titles, padding, cap, per, flat)
        tiles = tiles[:rows * nrow]
        captions = list(captions)[:rows * nrow] if captions else captions
        row_titles = list(row_titles)[:rows] if row_titles else row_titles
    grid = _laid_out(resized(tiles), nrow, captions, row_titles, col_titles, padding)
    return stack_vertical([grid, note_image(note, grid.shape[-1])]) if note else grid


def card_layout(n: int, nrow: int, tile_hw: tuple[int, int], caption_lines: int = 0, left: int = 0,
                col_titles: bool = False, padding: int = 2, flat: bool = False,
                note_chars: int = 80) -> tuple[int, int]:
    """(columns, rows kept) of a grid of `n` tiles `tile_hw` (after resizing), `nrow` a row, so that
    it is (with a note of `note_chars` characters under it when rows are cut) at most `CARD_HEIGHT`
    tall: all rows when they fit; a `flat` grid first takes as many columns as fit
    `CARD_WIDTH`; at least one row."""
    th, tw = tile_hw
    fit = max(1, (CARD_WIDTH - left - padding) // (tw + padding))

    def logged_height(columns: int, rows: int, note: bool) -> int:
        bands = -(-min(columns, n) // fit) if min(columns, n) > fit else 1
        width = left + min(columns, n, fit) * (tw + padding) + padding
        band = (14 if col_titles else 0) + rows * (th + padding + CAPTION_LINE_H * caption_lines) + padding
        lines = -(-note_chars // max(1, (width - 4) // CHAR_WIDTH)) + 1  # wrapped at spaces: a line more
        height = bands * band + 6 * (bands - 1) + (2 + lines * CAPTION_LINE_H + 4 if note else 0)
        return height

    rows = -(-n // nrow)
    if logged_height(nrow, rows, False) <= CARD_HEIGHT:
        return nrow, rows
    if flat and nrow != min(fit, n):  # a bank: as wide as a card, not in bands
        nrow, rows = min(fit, n), -(-n // min(fit, n))
        if logged_height(nrow, rows, False) <= CARD_HEIGHT:
            return nrow, rows
    while rows > 1 and logged_height(nrow, rows, True) > CARD_HEIGHT:
        rows -= 1
    return nrow, rows


def _cap(n, tile_hw, nrow, captions, row_titles, col_titles, padding, cap, per, flat):
    """`captioned_grid`'s cap for `n` tiles of `tile_hw` (resized): (columns, rows kept, the note or None)."""
    lines = max((str(c).count("\n") + 1 for c in captions), default=1) if captions else 0
    left = 8 + 6 * max((len(t) for t in row_titles), default=0) if row_titles else 0
    nrow, rows = card_layout(n, nrow, tile_hw, lines, left, bool(col_titles), padding, flat,
                             len(cap) + 10)
    if rows * nrow >= n:
        return nrow, rows, None
    return nrow, rows, cap.format(shown=rows * nrow // per, total=-(-n // per))


def note_image(text: str, width: int) -> torch.Tensor:
    """`text` as a [3, h, width] image in [0, 1]: black on white, wrapped at spaces to `width`."""
    lines = fit_caption(text, max(width - 4, CHAR_WIDTH), lines=100).split("\n")
    canvas = Image.new("RGB", (max(width, 1), 4 + CAPTION_LINE_H * len(lines)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, 2 + CAPTION_LINE_H * i), line, fill="black", font=caption_font())
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def _laid_out(tiles, nrow, captions, row_titles, col_titles, padding):
    """The grid of resized tiles: plain, captioned, or in bands of columns when wider than a card."""
    left = 8 + 6 * max((len(t) for t in row_titles), default=0) if row_titles else 0
    tw = tiles.shape[-1]
    fit = max(1, (CARD_WIDTH - left - padding) // (tw + padding))
    if min(nrow, tiles.shape[0]) > fit:
        return _in_bands(tiles, nrow, fit, captions, row_titles, col_titles, padding)
    if not (captions or row_titles or col_titles):
        return make_grid(tiles, nrow=nrow, padding=padding, pad_value=1.0)
    return _grid(tiles, nrow, captions, row_titles, col_titles, padding)


def _in_bands(tiles, nrow, fit, captions, row_titles, col_titles, padding):
    """The grid cut into bands of at most `fit` columns (each with the row titles and its columns'
    titles), stacked; missing tiles of a last, short row are left blank."""
    n = tiles.shape[0]
    blank = torch.ones_like(tiles[0])
    bands = []
    for first in range(0, nrow, fit):
        cols = range(first, min(first + fit, nrow))
        index = [r * nrow + c for r in range(-(-n // nrow)) for c in cols]
        band = torch.stack([tiles[i] if i < n else blank for i in index])
        band_captions = [(captions[i] if i < len(captions) else "") for i in index] if captions else None
        band_cols = [col_titles[c] for c in cols if c < len(col_titles)] if col_titles else None
        bands.append(_grid(band, len(cols), band_captions, row_titles, band_cols, padding))
    return stack_vertical(bands, gap=6)


def _grid(tiles, nrow, captions, row_titles, col_titles, padding):
    font = caption_font()
    th, tw = tiles.shape[-2:]
    # one caption line is 12 px; captions made by fit_caption(..., lines=2) may take two
    lines = max((str(c).count("\n") + 1 for c in captions), default=1) if captions else 0
    cap_h = CAPTION_LINE_H * lines
    left = 8 + 6 * max((len(t) for t in row_titles), default=0) if row_titles else 0
    top = 14 if col_titles else 0
    n = tiles.shape[0]
    ncol = min(nrow, n)
    nrows = (n + nrow - 1) // nrow
    W = left + ncol * (tw + padding) + padding
    H = top + nrows * (th + padding + cap_h) + padding
    # tiles are placed by tensor slicing, then the canvas goes to PIL once, for the text
    pixels = torch.ones(3, H, W)
    for i in range(n):
        r, c = divmod(i, nrow)
        y = top + padding + r * (th + padding + cap_h)
        x = left + padding + c * (tw + padding)
        pixels[:, y:y + th, x:x + tw] = tiles[i]
    canvas = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if captions:
        for i, text in enumerate(captions[:n]):
            r, c = divmod(i, nrow)
            x, y = left + padding + c * (tw + padding), top + padding + r * (th + padding + cap_h) + th
            for n_line, line in enumerate(str(text).split("\n")):
                draw.text((x, y + CAPTION_LINE_H * n_line), line, fill="black", font=font)
    if row_titles:
        for r, text in enumerate(row_titles[:nrows]):
            draw.text((2, top + padding + r * (th + padding + cap_h) + th // 2 - 5), str(text), fill="black", font=font)
    if col_titles:
        for c, text in enumerate(col_titles[:ncol]):
            draw.text((left + padding + c * (tw + padding), 1), str(text), fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def readable(image: torch.Tensor, min_width: int = MIN_LOGGED_WIDTH,
             max_width: int = 2 * MIN_LOGGED_WIDTH) -> torch.Tensor:
    """[C, H, W] upscaled by the integer factor (nearest neighbour: pixels and text stay crisp) that
    brings its width to at least `min_width`, without passing `max_width`; unchanged when it is wide
    enough already."""
    factor = readable_factor(image.shape[-1], min_width, max_width)
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) if factor > 1 else image


def readable_factor(width: int, min_width: int = MIN_LOGGED_WIDTH, max_width: int = 2 * MIN_LOGGED_WIDTH) -> int:
    """The integer factor `readable` scales an image `width` pixels wide by (1: wide enough)."""
    if width >= min_width:
        return 1
    return min(-(-min_width // width), max(1, max_width // width))


def columns_that_fit(tile_w: int, columns: int, group: int = 1, max_width: int = MAX_GRID_WIDTH,
                     padding: int = 2) -> int:
    """How many of `columns` tiles `tile_w` wide fit in `max_width`, a multiple of `group` (tiles
    that belong together, e.g. an image and its projection), at least one group."""
    fit = max(1, (max_width - padding) // (tile_w + padding))
    return max(group, min(columns, fit - fit % group))


def colorbar(cmap: str, lo: float, hi: float, width: int, label: str = "", height: int = 10) -> torch.Tensor:
    """A horizontal colour scale as a [3, h, width] image in [0, 1]: the colormap from `lo` (left) to
    `hi` (right), with both values and `label` written under it."""
    bar_w = max(width - 4, 8)
    ramp = torch.linspace(lo, hi, bar_w).view(1, 1, bar_w).expand(1, height, bar_w)
    colors = heatmap(ramp, cmap, lo, hi)[0]
    canvas = torch.ones(3, height + 3 + CAPTION_LINE_H, max(width, bar_w + 4))
    canvas[:, 1:1 + height, 2:2 + bar_w] = colors
    image = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = caption_font()
    low, high = f"{lo:g}", f"{hi:g}"
    draw.text((2, height + 2), low, fill="black", font=font)
    draw.text((2 + bar_w - CHAR_WIDTH * len(high), height + 2), high, fill="black", font=font)
    if label:
        middle = 2 + (bar_w - CHAR_WIDTH * len(label)) // 2
        if middle > 2 + CHAR_WIDTH * (len(low) + 1):
            draw.text((middle, height + 2), label, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def legend(names: Sequence[str], colors: torch.Tensor, width: int, swatch: int = 10) -> torch.Tensor:
    """A class legend as a [3, h, width] image in [0, 1]: a color swatch then the name, for each of
    `names` (colors [K, 3] in [0, 1]), left to right, wrapping onto a new row when `width` is used up."""
    font = caption_font()
    entries = [(str(n), tuple(int(round(float(v) * 255)) for v in c)) for n, c in zip(names, colors.cpu())]
    row_h, gap = max(swatch, 11) + 3, 8
    spots, x, y = [], 2, 2
    for text, color in entries:
        w = swatch + 3 + 6 * len(text)
        if x > 2 and x + w > width:
            x, y = 2, y + row_h
        spots.append((x, y, text, color))
        x += w + gap
    canvas = Image.new("RGB", (max(width, 1), y + row_h + 1), "white")
    draw = ImageDraw.Draw(canvas)
    for x, y, text, color in spots:
        draw.rectangle([x, y + 1, x + swatch - 1, y + swatch], fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + 3, y), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def stack_vertical(images: Sequence[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """[3, h_i, w_i] images one above the other, left-aligned on a white background."""
    width = max(im.shape[-1] for im in images)
    height = sum(im.shape[-2] for im in images) + gap * (len(images) - 1)
    out = torch.ones(3, height, width)
    y = 0
    for im in images:
        out[:, y:y + im.shape[-2], :im.shape[-1]] = im.float().cpu()
        y += im.shape[-2] + gap
    return out
