"""TensorBoard legibility: small images upscaled by an integer factor, strips wrapped into rows,
class names on two caption lines instead of cut, heat maps with a colour scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAST_SHAPES, compose_cfg
from convlens.callbacks.deconv import max_images_grid
from convlens.events import read_images
from convlens.render import (CAPTION_LINE_H, CHAR_WIDTH, MAX_GRID_WIDTH, MIN_LOGGED_WIDTH, captioned_grid,
                             colorbar, fit_caption, heatmap, readable)
from convlens.train import train


def test_readable_upscales_small_images_by_an_integer_factor_nearest():
    image = torch.rand(3, 30, 100)
    big = readable(image)
    factor = big.shape[-1] // 100
    assert big.shape == (3, 30 * factor, 100 * factor) and big.shape[-1] >= MIN_LOGGED_WIDTH
    expected = np.kron(image.numpy(), np.ones((1, factor, factor)))  # nearest neighbour: blocks
    assert np.array_equal(big.numpy(), expected)
    wide = torch.rand(3, 10, MIN_LOGGED_WIDTH + 7)
    assert readable(wide) is wide


@pytest.mark.parametrize("name, width, lines", [("T-shirt/top", 56, ["T-shirt/", "top"]),
                                                ("Ankle boot", 56, ["Ankle", "boot"]),
                                                ("automobile", 64, ["automobile"]),
                                                ("horizontal_bar", 56, ["horizonta", "l_bar"])])
def test_class_names_take_two_lines_rather_than_being_cut(name, width, lines):
    caption = fit_caption(name, width, lines=2)
    assert caption.split("\n") == lines
    assert all(len(line) * CHAR_WIDTH <= width for line in lines)
    assert "".join(lines).replace(" ", "") == name.replace(" ", "")  # nothing cut
    assert fit_caption("abcdefghijklmnopqrstuvwxyz", 56, lines=2) == "abcdefghi\njklmnopq~"


def test_a_grid_with_two_line_captions_is_laid_out_for_them():
    tiles = torch.rand(4, 3, 28, 28)
    one = captioned_grid(tiles, nrow=4, captions=["a", "b", "c", "d"], tile_size=56)
    two = captioned_grid(tiles, nrow=4, captions=["a", "T-shirt/\ntop", "c", "d"], tile_size=56)
    assert two.shape[-2] - one.shape[-2] == CAPTION_LINE_H
    # the tiles are where they were; the second line is drawn (dark pixels) below the first
    assert torch.equal(one[:, 2:58, :], two[:, 2:58, :])
    below = two[:, 58 + CAPTION_LINE_H:58 + 2 * CAPTION_LINE_H, 60:116]
    assert below.min() < 0.5


def test_deconv_max_pairs_wrap_into_rows_no_wider_than_the_card():
    pixels, projections = torch.rand(16, 1, 28, 28), torch.randn(16, 1, 28, 28)
    grid = max_images_grid(pixels, projections, torch.arange(16), [f"class {i}" for i in range(16)], tile_size=64)
    assert grid.shape[-1] <= MAX_GRID_WIDTH                    # the old layout was 930 x 142
    pair = 2 * (56 + 2)
    pairs_per_row = (grid.shape[-1] - 2) // pair
    rows = -(-16 // pairs_per_row)
    assert pairs_per_row >= 2 and rows >= 3 and grid.shape[-2] >= rows * 56  # rows, not a band


def test_colorbar_runs_through_the_colormap():
    bar = colorbar("jet", 0.0, 1.0, 200, "p(target)")
    assert bar.shape[0] == 3 and bar.shape[-1] == 200
    ramp = bar[:, 5, 2:198]
    expected = heatmap(torch.linspace(0, 1, 196).view(1, 1, 196), "jet")[0, :, 0]
    assert (ramp - expected).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_logged_images_are_readable_at_the_card_width(tmp_path):
    cfg = compose_cfg(FAST_SHAPES + ["trainer.max_epochs=1", "test=false", "callbacks=[none,deconv,decoded,occlusion]",
                                     "callbacks.deconv.max_units=16"], tmp_path)
    train(cfg)
    import io

    from PIL import Image

    logged = read_images(tmp_path / "tensorboard")
    images = {tag: Image.open(io.BytesIO(entries[-1][1])) for tag, entries in logged.items()}
    for tag, image in images.items():
        assert image.width >= MIN_LOGGED_WIDTH, (tag, image.size)
    # decoded conv1 filters are 5 x 5: the grid was upscaled, in whole multiples (crisp pixels)
    assert images["decoded/conv1"].width % 2 == 0


def test_gradcam_image_ends_with_its_colour_scale(tmp_path):
    """The Grad-CAM overlay's colour scale is drawn under it (occlusion's: tests/test_callbacks_occlusion.py)."""
    from types import SimpleNamespace

    from convlens.callbacks.saliency import Saliency
    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.lenet import LeNet

    dm = ShapesDataModule(n_train=64, n_test=16, val_size=32)
    dm.setup("fit")
    cb = Saliency(num_probe=3, layer="conv2")
    module = SimpleNamespace(net=LeNet(), device=torch.device("cpu"))
    trainer = SimpleNamespace(datamodule=dm, global_step=1, loggers=[], sanity_checking=False)
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)
    logged = {}
    cb.log_image = lambda trainer, tag, image: logged.__setitem__(tag, image)
    cb.visualize(trainer, module)
    image = logged["saliency/gradcam"]
    bar = colorbar("jet", 0, 1, min(image.shape[-1], 240), "Grad-CAM / its max")
    assert torch.equal(image[:, -bar.shape[1]:, :bar.shape[2]], bar)


@pytest.mark.parametrize("scale", [1, 3])
@pytest.mark.parametrize("shape", [(37, 50, 3), (20, 31), (1, 9, 3), (8, 1), (64, 64, 3)])
def test_encode_png_decodes_to_the_same_pixels_in_pil(shape, scale):
    # PIL's own PNG decoder is the oracle: every row "Up"-filtered, wrapping modulo 256, and the
    # enlargement is numpy's nearest-neighbour repeat
    import io

    from PIL import Image

    from convlens.events import encode_png

    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    pixels[1::2] = 255 - pixels[::2][: pixels[1::2].shape[0]]  # large row-to-row differences
    decoded = Image.open(io.BytesIO(encode_png(pixels, scale)))
    assert decoded.mode == ("L" if len(shape) == 2 else "RGB")
    assert np.array_equal(np.asarray(decoded), pixels.repeat(scale, axis=0).repeat(scale, axis=1))


def test_encode_png_refuses_what_it_cannot_store():
    from convlens.events import encode_png

    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        encode_png(np.zeros((4, 4, 4), np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
def test_image_summary_enlarges_like_pil_nearest(channels):
    import io

    from PIL import Image

    from convlens.events import image_summary

    torch.manual_seed(channels)
    image = torch.rand(channels, 7, 11)
    summary = image_summary("t", image, scale=3).value[0].image
    assert (summary.height, summary.width, summary.colorspace) == (21, 33, channels)
    pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    small = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    expected = np.asarray(small.resize((33, 21), Image.NEAREST))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(summary.encoded_image_string))), expected)


def test_large_tiles_are_averaged_down_so_a_strip_fits_a_card():
    """VGG's 224-px tiles at tile_size 64: averaged down by 2 (an oracle: avg_pool2d), so a strip of
    an image and two projections is 3 x 112 px, not 3 x 226, and tile_width agrees."""
    import torch.nn.functional as F

    from convlens.render import CARD_WIDTH, captioned_grid, tile_width

    tiles = torch.rand(3, 3, 224, 224)
    grid = captioned_grid(tiles, nrow=3, captions=["x"] * 3, tile_size=64, padding=2)
    assert grid.shape[-1] == 3 * (112 + 2) + 2 < CARD_WIDTH
    assert tile_width(tiles, 64) == 112
    first = grid[:, 2:2 + 112, 2:2 + 112]
    want = F.avg_pool2d(tiles[:1], 2)[0]
    assert (first - want).abs().max() <= 1 / 255 + 1e-6  # the PNG canvas's 8-bit rounding


def test_shrink_to_fit_averages_large_tiles_down_until_a_row_fits_a_card():
    """The oracle: the tiles averaged down by hand (avg_pool2d) and drawn without shrinking; tiles
    never go below tile_size, and small tiles are upscaled as before."""
    import torch.nn.functional as F

    from convlens.render import CARD_WIDTH, captioned_grid, downscale_factor, tile_width

    tiles = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    captions = ["image", "p(cat)", "predicted label"]
    fitted = captioned_grid(tiles, nrow=3, captions=captions, tile_size=112, shrink_to_fit=True)
    by_hand = captioned_grid(F.avg_pool2d(tiles, 2), nrow=3, captions=captions, tile_size=112)
    assert torch.equal(fitted, by_hand) and fitted.shape[-1] == 3 * 114 + 2 <= CARD_WIDTH
    assert tile_width(tiles, 112, columns=3) == 112 and tile_width(tiles, 112) == 224
    # without it, the same row is wider than a card (laid out in bands instead)
    assert captioned_grid(tiles, nrow=3, captions=captions, tile_size=112).shape[-1] < 3 * 226
    assert downscale_factor(500, 500, 112, columns=3) == 4  # 125 px: 383 wide; 3 would be 509
    assert downscale_factor(224, 224, 150, columns=3) == 1  # 112 px would be below tile_size
    small = torch.rand(3, 1, 28, 28)
    assert torch.equal(captioned_grid(small, nrow=3, tile_size=112, shrink_to_fit=True),
                       captioned_grid(small, nrow=3, tile_size=112))


def test_a_grid_wider_than_a_card_is_laid_out_in_bands():
    """The oracle: the same grid drawn band by band (the first `fit` columns, then the rest) and
    stacked; every tile and caption is kept, and the result fits a card."""
    from convlens.render import CARD_WIDTH, _grid, captioned_grid, stack_vertical

    g = torch.Generator().manual_seed(0)
    tiles = torch.rand(2 * 12, 3, 90, 90, generator=g)  # 2 rows x 12 columns of 90-px tiles: 1,106 px wide
    captions = [f"t{i}" for i in range(24)]
    titles = ["image", "map"]
    grid = captioned_grid(tiles, nrow=12, captions=captions, row_titles=titles, tile_size=90)
    assert grid.shape[-1] <= CARD_WIDTH
    left = 8 + 6 * len("image")
    fit = (CARD_WIDTH - left - 2) // 92
    bands = []
    assert 1 < fit < 12
    for cols in (range(start, min(start + fit, 12)) for start in range(0, 12, fit)):
        index = [r * 12 + c for r in range(2) for c in cols]
        bands.append(_grid(tiles[index], len(cols), [captions[i] for i in index], titles, None, 2))
    assert torch.equal(grid, stack_vertical(bands, gap=6))
