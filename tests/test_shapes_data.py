"""Tests of the synthetic shapes generator (datamodules/shapes_data.py).

Oracles: boxes against bounding boxes found by scanning each mask with numpy; masks against the
background-only render of the same seed (the mask must be exactly the changed pixels) and against a
naive per-pixel float64 renderer written here from the shape descriptions (math.hypot, atan2).
"""
import math

import numpy as np
import pytest
import torch

from convlens.datamodules.shapes_data import (CLASSES, MIN_CONTRAST_LEVELS, MIN_SIZE, ShapesData,
                                     _render_background, _sample_geometry, _render_masks,
                                     make_shapes)

CASES = [(28, 1), (32, 3)]


@pytest.mark.parametrize("size,channels", CASES + [(MIN_SIZE, 1), (45, 3)])
def test_shapes_and_dtypes(size, channels):
    n = 23
    data = make_shapes(n, size=size, channels=channels, seed=3, return_masks=True)
    assert isinstance(data, ShapesData)
    assert data.images.shape == (n, channels, size, size) and data.images.dtype == torch.uint8
    assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
    assert data.boxes.shape == (n, 4) and data.boxes.dtype == torch.int64
    assert data.masks.shape == (n, size, size) and data.masks.dtype == torch.bool
    assert data.labels.min() >= 0 and data.labels.max() < len(CLASSES)
    assert make_shapes(n, size=size, channels=channels, seed=3).masks is None


def test_ten_distinct_class_names():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10


@pytest.mark.parametrize("size,channels", CASES)
def test_same_seed_same_data_other_seed_differs(size, channels):
    a = make_shapes(30, size, channels, seed=5, return_masks=True)
    b = make_shapes(30, size, channels, seed=5, return_masks=True)
    c = make_shapes(30, size, channels, seed=6, return_masks=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.boxes, c.boxes)
    assert not torch.equal(a.labels, c.labels)


def test_fewer_images_are_a_prefix_of_more():
    small, large = make_shapes(7, seed=2, return_masks=True), make_shapes(31, seed=2, return_masks=True)
    for x, y in zip(small, large):
        assert torch.equal(x, y[:7])


@pytest.mark.parametrize("size,channels", CASES)
def test_boxes_are_tight_boxes_of_masks(size, channels):
    data = make_shapes(60, size, channels, seed=1, return_masks=True)
    for mask, box in zip(data.masks.numpy(), data.boxes.tolist()):
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0, "every image must contain an object"
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("size,channels", CASES)
def test_mask_is_exactly_the_pixels_that_differ_from_the_background(size, channels):
    n = 200
    data = make_shapes(n, size, channels, seed=4, return_masks=True)
    background = _render_background(n, size, channels, seed=4)
    diff = (data.images.int() - background.int()).abs()          # [n, C, H, W]
    inside = data.masks[:, None].expand_as(diff)
    assert torch.all(diff[~inside] == 0), "pixels outside the mask must be background"
    assert diff[inside].min() >= MIN_CONTRAST_LEVELS, "object pixels must stand out in every channel"
    assert MIN_CONTRAST_LEVELS >= 40
    # The object is one flat colour: every mask pixel of an image carries the same value per channel.
    for image, mask in zip(data.images, data.masks):
        colours = image[:, mask]                                  # [C, pixels in mask]
        assert torch.all(colours == colours[:, :1])


@pytest.mark.parametrize("size,channels", CASES)
def test_backgrounds_are_textured_and_appearance_varies(size, channels):
    n = 100
    data = make_shapes(n, size, channels, seed=8, return_masks=True)
    background = _render_background(n, size, channels, seed=8).float()
    per_image_std = background.flatten(1).std(dim=1)
    assert (per_image_std > 2).float().mean() > 0.8
    object_colours = torch.stack([img[:, m][:, 0] for img, m in zip(data.images, data.masks)]).float()
    assert object_colours.std(dim=0).min() > 30, "object colours should vary between images"
    if channels == 3:
        # Colours, not greys: channels of the object colour usually differ.
        spread = object_colours.max(dim=1).values - object_colours.min(dim=1).values
        assert (spread > 30).float().mean() > 0.5


def test_classes_are_balanced():
    for n in (10, 100, 1000):
        counts = torch.bincount(make_shapes(n, seed=0).labels, minlength=10)
        assert torch.all(counts == n // 10)
    labels = make_shapes(95, seed=1).labels
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 95
    # Each block of 10 is a permutation of the classes, and not always the same one.
    blocks = make_shapes(200, seed=2).labels.view(20, 10)
    assert torch.all(blocks.sort(dim=1).values == torch.arange(10))
    assert len({tuple(b) for b in blocks.tolist()}) > 1


@pytest.mark.parametrize("size,channels", CASES + [(MIN_SIZE, 1), (64, 1)])
def test_boxes_inside_image_with_sensible_extent(size, channels):
    data = make_shapes(300, size, channels, seed=7)
    x0, y0, x1, y1 = data.boxes.unbind(1)
    margin = 2
    assert torch.all(x0 >= margin) and torch.all(y0 >= margin)
    assert torch.all(x1 <= size - margin) and torch.all(y1 <= size - margin)
    assert torch.all(x1 > x0) and torch.all(y1 > y0)
    if size >= 28:   # at 16 px the minimum stroke width (1.5 px) alone is ~10% of the side
        long_side = torch.maximum(x1 - x0, y1 - y0).float() / size
        assert long_side.min() >= 0.2 and long_side.max() <= 0.55
    # Random positions: the boxes do not all sit in the same place.
    assert len(set(x0.tolist())) > 5 and len(set(y0.tolist())) > 5


def _naive_shape_edge_distance(name, dx, dy, h, half_width):
    """Signed distance (px) from the pixel to the stroke edge, negative inside, written per class
    from its description; None where the pixel is at an angular cut (C opening, D half) tie."""
    def seg(ax, ay, bx, by):
        ax, ay, bx, by = ax * h, ay * h, bx * h, by * h
        length2 = (bx - ax) ** 2 + (by - ay) ** 2
        t = min(1.0, max(0.0, ((dx - ax) * (bx - ax) + (dy - ay) * (by - ay)) / length2))
        return math.hypot(dx - (ax + t * (bx - ax)), dy - (ay + t * (by - ay))) - half_width

    ring = abs(math.hypot(dx, dy) - h) - half_width
    angle = math.degrees(math.atan2(dy, dx))      # 0 = right, +90 = down (image rows grow down)
    strokes = {
        "horizontal_bar": [seg(-1, 0, 1, 0)],
        "vertical_bar": [seg(0, -1, 0, 1)],
        "diagonal_bar": [seg(-1, 1, 1, -1)],
        "corner": [seg(-1, -1, -1, 1), seg(-1, 1, 1, 1)],
        "plus": [seg(-1, 0, 1, 0), seg(0, -1, 0, 1)],
        "x": [seg(-1, -1, 1, 1), seg(-1, 1, 1, -1)],
        "ring": [ring],
        "letter_t": [seg(-1, -1, 1, -1), seg(0, -1, 0, 1)],
    }
    if name in strokes:
        return min(strokes[name])
    if name == "letter_c":
        if abs(abs(angle) - 45) < 1e-6:
            return None
        return ring if abs(angle) > 45 else math.inf
    if name == "letter_d":
        if abs(abs(angle) - 90) < 1e-6:
            return None
        arc = ring if abs(angle) < 90 else math.inf
        return min(seg(-1, -1, -1, 1), seg(-1, -1, 0, -1), seg(-1, 1, 0, 1), arc)
    raise AssertionError(name)


@pytest.mark.parametrize("size", [28, 32])
def test_masks_match_naive_per_pixel_renderer(size):
    n = 30                                        # three of each class
    geometry = _sample_geometry(n, size, seed=11)
    masks = _render_masks(geometry, size)
    assert torch.equal(masks, make_shapes(n, size, seed=11, return_masks=True).masks)
    checked = 0
    for i in range(n):
        name = CLASSES[geometry.labels[i]]
        cx, cy, h, w = (float(v[i]) for v in geometry[1:])
        for y in range(size):
            for x in range(size):
                d = _naive_shape_edge_distance(name, x - cx, y - cy, h, w / 2)
                if d is None or abs(d) < 1e-4:    # float32 rendering may round edge ties either way
                    continue
                assert bool(masks[i, y, x]) == (d < 0), (name, x, y, d)
                checked += 1
    assert checked > 0.99 * n * size * size


def test_class_shapes_have_their_characteristic_features():
    data = make_shapes(300, seed=9, return_masks=True)
    for label, mask, (x0, y0, x1, y1) in zip(data.labels.tolist(), data.masks, data.boxes.tolist()):
        name, bw, bh = CLASSES[label], x1 - x0, y1 - y0
        if name == "horizontal_bar":
            assert bw > 2 * bh
        elif name == "vertical_bar":
            assert bh > 2 * bw
        elif name in ("ring", "letter_c", "letter_d"):
            # A hole in the middle of the box.
            assert not mask[(y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2]
        elif name in ("plus", "letter_t", "x"):
            # Strokes through the middle of the box (within a pixel of it).
            yc, xc = (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
            assert mask[yc - 1:yc + 2, xc - 1:xc + 2].any()
        elif name == "corner":
            # The bottom-left corner is drawn, the top-right corner is not.
            assert mask[y1 - 1, x0] or mask[y1 - 2, x0 + 1]
            assert not mask[y0, x1 - 1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be an int >= 1"),
    (dict(n=2.5), "n must be an int >= 1"),
    (dict(n=4, size=MIN_SIZE - 1), f"size must be an int >= {MIN_SIZE}"),
    (dict(n=4, channels=2), "channels must be 1 .* or 3"),
    (dict(n=4, channels=1.0), "channels must be 1 .* or 3"),
    (dict(n=4, seed=-1), "seed must be a non-negative int"),
])
def test_invalid_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes(**kwargs)


@pytest.mark.slow
def test_lenet_learns_shapes_in_one_epoch():
    from convlens.models.lenet import LeNet

    torch.manual_seed(0)
    train, test = make_shapes(10000, seed=0), make_shapes(2000, seed=1)
    x = train.images.float() / 255
    mean, std = x.mean(dim=0, keepdim=True), x.std()
    x, x_test = (x - mean) / std, (test.images.float() / 255 - mean) / std
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in torch.randperm(len(x)).split(50):
        loss = torch.nn.functional.cross_entropy(model(x[batch]), train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == test.labels).float().mean().item()
    assert accuracy > 0.9
