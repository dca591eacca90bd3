"""The cap of tiles per panel (issue #26 item 3): a grid taller than a TensorBoard card
(`render.CARD_HEIGHT`) keeps the rows that fit and says under them what it left out; a bank of units
is laid out as wide as a card first.

Oracles: `card_layout` on hand-computed cases; the capped grid against the uncapped grid of the
kept tiles (same layout) stacked over the note rendered on its own (the note's pixels, not OCR).
"""
from __future__ import annotations

import torch

from convlens.render import (CARD_HEIGHT, CARD_WIDTH, captioned_grid, card_layout, note_image, stack_vertical)

NOTE = "showing {shown} of {total} units of features.28; set max_units to choose"


def test_card_layout_hand_computed():
    # CARD_WIDTH 400: (400 - 2) // (90 + 2) = 4 columns of 90-px tiles fit, 370 px wide.
    # 100 tiles of 90 px, 4 a row, one caption line: a row is 90 + 2 + 12 px, so 25 rows are 2,602 px;
    # with a note of 60 characters (61 a line: 1 line, +1 for wrapping: 2 + 24 + 4 = 30 px) 9 rows
    # fit: 9 * 104 + 2 + 30 = 968
    assert card_layout(100, 4, (90, 90), caption_lines=1, note_chars=60) == (4, 9)
    assert card_layout(36, 4, (90, 90), caption_lines=1) == (4, 9)  # 938 px: all fit, nothing cut
    # 10 a row is wider than a card: 3 bands of 4, 4 and 2 columns, 6 px apart; 3 rows a band fit:
    # 3 * (3 * 104 + 2) + 2 * 6 + 30 = 984 (4 rows: 1,296)
    assert card_layout(100, 10, (90, 90), caption_lines=1, note_chars=60) == (10, 3)
    # a bank of 64 tiles of 53 px, 8 a row: 2 bands (7 + 1 columns) of 8 rows of 67 px are 1,082 px;
    # as wide as a card (7 columns) its 10 rows are 672 px: all fit
    assert card_layout(64, 8, (53, 53), caption_lines=1, flat=True) == (7, 10)
    # a bank of 256: 7 columns (387 px), 37 rows of 67 px are 2,481 px; a note of 80 characters (63 a
    # line: 2 lines, +1: 2 + 36 + 4 = 42 px): 14 rows fit: 14 * 67 + 2 + 42 = 982
    assert card_layout(256, 16, (53, 53), caption_lines=1, flat=True) == (7, 14)
    # rows of their own (no reflow), 16 a row: 3 bands; 4 rows a band: 3 * (4 * 67 + 2) + 12 + 42 = 864
    assert card_layout(256, 16, (53, 53), caption_lines=1) == (16, 4)


def test_a_tall_bank_keeps_the_rows_that_fit_and_says_what_it_left_out():
    tiles = torch.rand(512, 3, 212, 212)  # VGG16's features.28 decoded: 212 px tiles, 512 units
    captions = [str(i) for i in range(512)]
    grid = captioned_grid(tiles, nrow=23, captions=captions, tile_size=32, cap=NOTE, flat=True)
    assert grid.shape[-1] <= CARD_WIDTH and grid.shape[-2] <= CARD_HEIGHT
    columns, rows = card_layout(512, 23, (53, 53), caption_lines=1, flat=True, note_chars=len(NOTE) + 10)
    shown = columns * rows
    assert 0 < shown < 512 and columns == 7
    kept = captioned_grid(tiles[:shown], nrow=columns, captions=captions[:shown], tile_size=32)
    note = NOTE.format(shown=shown, total=512)
    assert note == f"showing {shown} of 512 units of features.28; set max_units to choose"
    assert torch.equal(grid, stack_vertical([kept, note_image(note, kept.shape[-1])]))
    assert (note_image(note, kept.shape[-1]) < 0.5).any()  # the note is drawn (black text)


def test_rows_of_a_probe_image_are_kept_whole():
    k = 4  # a probe image then its 4 projections a row
    tiles = torch.rand(20 * (k + 1), 3, 224, 224)
    captions = ["cat\nx"] + ["#1"] * k
    grid = captioned_grid(tiles, nrow=k + 1, captions=captions * 20, tile_size=64,
                          cap="showing {shown} of {total} probe images; set num_probe to choose", per=k + 1)
    assert grid.shape[-2] <= CARD_HEIGHT
    columns, rows = card_layout(20 * (k + 1), k + 1, (112, 112), caption_lines=2, note_chars=70)
    assert columns == k + 1 and 0 < rows < 20
    kept = captioned_grid(tiles[:rows * (k + 1)], nrow=k + 1, captions=captions * rows, tile_size=64)
    assert torch.equal(grid[:, :kept.shape[-2]], kept)
    note = f"showing {rows} of 20 probe images; set num_probe to choose"
    assert torch.equal(grid[:, kept.shape[-2] + 2:], note_image(note, kept.shape[-1]))


def test_a_grid_that_fits_is_unchanged():
    tiles = torch.rand(16, 1, 28, 28)
    captions = [f"#{i}" for i in range(16)]
    plain = captioned_grid(tiles, nrow=4, captions=captions, tile_size=56)
    assert torch.equal(captioned_grid(tiles, nrow=4, captions=captions, tile_size=56, cap=NOTE, flat=True), plain)


def test_the_default_callbacks_panels_fit_a_card():
    from convlens.callbacks import DecodedFilters
    from convlens.callbacks.deconv import max_images_grid, top_units_grid
    from convlens.callbacks.evolution import weights_grid

    bank = DecodedFilters(tile_size=32).render_bank(torch.randn(512, 3, 212, 212), range(512), "features.28")
    columns, rows = card_layout(512, 23, (53, 53), caption_lines=1, flat=True, note_chars=len(NOTE) + 10)
    note = note_image(NOTE.format(shown=columns * rows, total=512), columns * 55 + 2)
    assert torch.equal(bank[:, -note.shape[-2]:], note)
    pixels, projections = torch.rand(30, 3, 224, 224), torch.randn(30, 4, 3, 224, 224)
    panels = [bank, top_units_grid(pixels, projections, torch.randint(0, 512, (30, 4)), ["cat"] * 30),
              max_images_grid(pixels, projections[:, 0], torch.arange(30), ["cat"] * 30),
              weights_grid(torch.randn(512, 3, 3, 3)), weights_grid(torch.randn(64, 64, 3, 3))]
    from convlens.callbacks import OcclusionSensitivity

    # VGG's 224-px probe image, its p(target) and label maps (8 x 8 positions, patch 25, stride 25)
    occlusion = OcclusionSensitivity().render(torch.rand(3, 224, 224), torch.rand(8, 8), torch.randint(0, 4, (8, 8)),
                                              25, 25, 4, ["airplane", "p(airplane)", "predicted label"])
    assert occlusion.shape[-1] == 3 * (112 + 2) + 2  # side by side, each averaged down to 112 px
    panels.append(occlusion)
    for panel in panels:
        assert panel.shape[-2] <= CARD_HEIGHT and panel.shape[-1] <= CARD_WIDTH
