"""viz/dissection.py (streamed top-N, Neuron Features, selectivity indexes) and the UnitDissection
callback (callbacks/dissection.py), in one process and under DDP.

Oracles: a two-pass reference that keeps every map of every image, finds each map's maximum and
its first position with Python loops and sorts each unit's images with Python's `sorted` by
(-value, id); the NF as a naive loop of weighted crops cut by slicing the receptive-field boxes;
hand-computed class frequencies, class indexes, population codes and Morcos CSIs; nets built so
that a unit ignores colour (first layer summing the channels equally: colour index 0) or dies
when greyed (R - G: colour index 1); greying each entry's receptive field alone, one forward per
entry, for the one-forward-per-image shortcut; the class-conditional means computed directly; a
single-process run for the DDP run.
"""
from __future__ import annotations

import csv
import math
import textwrap
import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import NetModule, read_events, run_ddp_script
from convlens.callbacks.dissection import CSV_COLUMNS, UnitDissection, sort_order
from convlens.callbacks.display import Normalization
from convlens.errors import ConfigError
from convlens.viz.dissection import (DissectionError, UnitCollector, class_frequencies, class_selectivity,
                                     color_selectivity, dissect, grey_responses, morcos_csi, neuron_features,
                                     opponent_grey, population_code, top_class)
from convlens.viz.receptive_field import receptive_field
import convlens.viz.dissection as dissection_module
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.viz.dissection import _conv_at, _crop_chain, _neuron_features, _update_top, _valid_positions
from convlens.viz.receptive_field import crop_patches
from convlens.viz.top_activations import RunningTopK, content_ids, spatial_max


# -- nets and data ----------------------------------------------------------------------------------
def small_net(padding: int = 1, channels: int = 3, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 5, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(5, 6, 3, padding=padding), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, classes))


def data(n: int = 30, side: int = 12, channels: int = 3, classes: int = 3, seed: int = 0, repeat: int = 2):
    """Random images, labels by position; the first `repeat` images appear again at the end (a dataset
    with duplicates: each must count once)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, side, side, generator=g)
    y = torch.arange(n) % classes
    return torch.cat([x, x[:repeat]]), torch.cat([y, y[:repeat]])


def maps_of(net: nn.Module, images: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    out = {}
    hooks = [dict(net.named_modules())[layer].register_forward_hook(
        lambda _m, _a, o, layer=layer: out.__setitem__(layer, o.detach().clone())) for layer in layers]
    try:
        with torch.no_grad():
            net.eval()
            net(images)
    finally:
        for h in hooks:
            h.remove()
    return out


def collect(net, images, labels, layers, n, batch=8, flush_rows=None) -> UnitCollector:
    units = {layer: dict(net.named_modules())[layer].out_channels for layer in layers}
    c = UnitCollector(units, n)
    if flush_rows is not None:
        c.flush_rows = flush_rows
    for s in range(0, len(images), batch):
        maps = maps_of(net, images[s:s + batch], layers)
        c.update(images[s:s + batch], labels[s:s + batch], {k: spatial_max(v) for k, v in maps.items()})
    return c


def reference(net, images, labels, layer, n):
    """Two passes: every map kept, each map's max and first (row-major) position by loops, each
    unit's distinct images sorted by (-value, id)."""
    maps = maps_of(net, images, [layer])[layer]
    ids = content_ids(images).tolist()
    first = {}
    for m, i in enumerate(ids):
        first.setdefault(i, m)
    rows = sorted(first.values())
    units = maps.shape[1]
    top = []
    for u in range(units):
        entries = []
        for m in rows:
            flat = maps[m, u].flatten().tolist()
            best = max(flat)
            pos = flat.index(best)
            entries.append((-best, ids[m], m, divmod(pos, maps.shape[3])))
        top.append(sorted(entries)[:n])
    means = {}
    for c in sorted(set(labels.tolist())):
        members = [m for m in rows if int(labels[m]) == c]
        means[c] = [sum(max(0.0, max(maps[m, u].flatten().tolist())) for m in members) / len(members)
                    for u in range(units)]
    return top, means


# -- the streamed top-N and the class means equal the two-pass reference ----------------------------
@pytest.mark.parametrize("batch,flush_rows", [(1, None), (7, None), (64, None), (7, 1), (7, 20)])
def test_streaming_top_n_and_class_means_equal_the_two_pass_reference(batch, flush_rows):
    """Batches merged into the tops one by one (flush_rows=1), a few at a time, or all at the end
    (the default flush_rows, more rows than the data): each equal to the reference."""
    net = small_net()
    with torch.no_grad():
        net[3].weight[2] = 0  # a constant unit (its bias everywhere): ties, broken by image id
    images, labels = data()
    c = collect(net, images, labels, ["0", "3"], n=6, batch=batch, flush_rows=flush_rows)
    for layer in ("0", "3"):
        top, means = reference(net, images, labels, layer, 6)
        t = c.tops[layer]
        for u, entries in enumerate(top):
            assert t.image_ids[u].tolist() == [e[1] for e in entries]
            assert torch.allclose(t.values[u], torch.tensor([-e[0] for e in entries]), atol=1e-6)
            assert [tuple(p) for p in t.positions[u].tolist()] == [e[3] for e in entries]
            assert t.payload[u].tolist() == [int(labels[e[2]]) for e in entries]
        counts = c.class_counts.tolist()
        assert counts == [10, 10, 10]  # the two repeated images counted once
        for cls, row in means.items():
            assert torch.allclose(c.class_sums[layer][cls] / counts[cls], torch.tensor(row, dtype=torch.float64),
                                  atol=1e-6)
    # the pool holds exactly the images the top entries refer to
    assert set(c.pool) == c.referenced_ids()
    for i, image in c.pool.items():
        assert content_ids(image[None]).item() == i


@pytest.mark.parametrize("seed", range(6))
def test_fast_top_n_update_equals_running_top_k_update(seed):
    """`_update_top` (one topk, `_select` only where ties leave the choice open) against
    `RunningTopK.update` with the labels as payload: bitwise the same state, batch after batch, with
    many tied values (a coarse grid of values), batches smaller and larger than N, batches where
    each unit's candidates are a few of its rows (its m best rows taken first), and repeated images."""
    g = torch.Generator().manual_seed(seed)
    units, k = 9, 5
    fast, slow = RunningTopK(k, units), RunningTopK(k, units)
    seen: set[int] = set()
    reduced = 0
    for step in range(16):
        b = int(torch.randint(1, 25, (1,), generator=g))
        values = (torch.randint(-3, 4 + step // 4, (b, units), generator=g) / 2).float()
        reduced += int((values >= fast.threshold).sum(0).max()) < b
        if step % 3 == 2:   # repeats, inside the batch and of earlier batches
            ids = torch.randint(0, 40, (b,), generator=g)
        else:               # new images
            ids = 100 + 10 * step + torch.randperm(b, generator=g)
        positions = torch.randint(0, 4, (b, units, 2), generator=g)
        labels = torch.randint(0, 3, (b,), generator=g)
        fresh = len(set(ids.tolist())) == b and not seen & set(ids.tolist())
        seen |= set(ids.tolist())
        rows = _update_top(fast, values, ids, positions, labels, fresh)
        slow.update(values, ids, positions, payload=lambda r, _p: labels[r])
        for name in ("values", "image_ids", "positions", "payload"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), (step, name)
        assert set(ids[rows].tolist()) == set(ids.tolist()) & set(slow.image_ids.flatten().tolist())
    assert reduced >= 3   # the path that merges only each unit's m best rows ran


@pytest.mark.parametrize("seed", range(4))
def test_positions_found_only_above_the_thresholds_give_the_same_collector(seed):
    """`spatial_max` with the collector's `thresholds` (positions only for the maxima that may enter
    a top; read before each batch, as the hooks do) against `spatial_max` with every position: the
    same state bit for bit, batch after batch, with tied values inside maps and between images, new
    and repeated images, batches smaller than N, two forwards of a batch read against the thresholds
    before either, and maps of float64 (compared in float32)."""
    g = torch.Generator().manual_seed(seed)
    units, n = {"a": 6, "b": 3}, 5
    lazy, full = UnitCollector(units, n), UnitCollector(units, n)
    bank = torch.randn(30, 3, 4, 4, generator=g)
    read = 0
    for step in range(14):
        b = int(torch.randint(1, 9, (1,), generator=g))
        rows = torch.randint(0, 30, (b,), generator=g) if step % 4 == 3 else torch.randperm(30, generator=g)[:b]
        images, labels = bank[rows], rows % 3
        maps = {layer: torch.randint(-3, 4, (b, u, 3, 5), generator=g).double() / 2 for layer, u in units.items()}
        thresholds = {layer: lazy.thresholds(layer) for layer in units}
        if step % 5 == 4:   # a second forward of the batch, its thresholds read before the first update
            lazy.update(images, labels, {k: spatial_max(v, thresholds=thresholds[k]) for k, v in maps.items()})
            full.update(images, labels, {k: spatial_max(v) for k, v in maps.items()})
        got = {k: spatial_max(v, thresholds=thresholds[k]) for k, v in maps.items()}
        read += sum(int((p[..., 0] < 0).sum()) for _, p in got.values())
        lazy.update(images, labels, got)
        full.update(images, labels, {k: spatial_max(v) for k, v in maps.items()})
        for layer in units:
            for name in ("values", "image_ids", "positions", "payload"):
                assert torch.equal(getattr(lazy.tops[layer], name), getattr(full.tops[layer], name)), (step, name)
            assert torch.equal(lazy.class_sums[layer], full.class_sums[layer])
            assert torch.equal(lazy.tail["values"][layer], full.tail["values"][layer])
        assert torch.equal(lazy.class_counts, full.class_counts) and set(lazy.pool) == set(full.pool)
    assert read > 0   # some positions were indeed left out
    # a position left out where the collector needs it is an error, not a silent (-1, -1) entry
    fresh = UnitCollector({"a": 2}, 2)
    with pytest.raises(DissectionError, match="no position"):
        fresh.update(bank[:2], None, {"a": (torch.ones(2, 2), torch.full((2, 2, 2), -1))})


def test_merge_of_overlapping_shares_equals_one_pass():
    """Shares as DDP's sampler makes them: each rank every other image, the last rank's share padded
    with a repeat of the first image (in its last batch)."""
    net = small_net()
    images, labels = data(n=25, repeat=0)
    whole = collect(net, images, labels, ["0", "3"], n=5)
    index = list(range(25)) + [0]
    shares = [index[r::2] for r in range(2)]
    states = [collect(net, images[s], labels[s], ["0", "3"], n=5, batch=4).state_dict() for s in shares]
    merged = UnitCollector.merge(states)
    assert merged.unresolved == 0
    for layer in ("0", "3"):
        assert torch.equal(merged.tops[layer].image_ids, whole.tops[layer].image_ids)
        assert torch.allclose(merged.tops[layer].values, whole.tops[layer].values)
        assert torch.equal(merged.tops[layer].payload, whole.tops[layer].payload)
        assert torch.allclose(merged.class_sums[layer], whole.class_sums[layer], atol=1e-9)
    assert torch.equal(merged.class_counts, whole.class_counts)
    assert set(merged.pool) == set(whole.pool)
    # a repeat in no share's last batch cannot be taken back: counted, and said
    early = [[0, 1, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10, 11, 12, 13]]
    states = [collect(net, images[s], labels[s], ["0"], n=3, batch=3).state_dict() for s in early]
    assert UnitCollector.merge(states).unresolved == 1


def test_collector_errors():
    with pytest.raises(DissectionError, match="n must be"):
        UnitCollector({"0": 3}, 0)
    c = UnitCollector({"0": 3}, 2)
    with pytest.raises(DissectionError, match="every layer"):
        c.update(torch.zeros(2, 3, 4, 4), None, {})
    with pytest.raises(DissectionError, match=r"\[B, U\]"):
        c.update(torch.zeros(2, 3, 4, 4), None, {"0": (torch.zeros(2, 4), torch.zeros(2, 4, 2, dtype=torch.long))})
    with pytest.raises(DissectionError, match="different layers"):
        UnitCollector.merge([c.state_dict(), UnitCollector({"1": 3}, 2).state_dict()])
    # a merged state whose pool lacks images its entries refer to (pools left out): said, with the count
    net = small_net()
    images, labels = data()
    full = collect(net, images, labels, ["3"], n=4)
    for keep in (0.5, 0.0):
        state = full.state_dict()
        ids = sorted(state["pool"])
        state["pool"] = {i: state["pool"][i] for i in ids[:int(keep * len(ids))]}
        lacking = len(full.referenced_ids() - set(state["pool"]))
        with pytest.raises(DissectionError, match=f"the pool lacks {lacking} image"):
            dissect(UnitCollector.from_state_dict(state))
    assert dissect(UnitCollector.from_state_dict(full.state_dict()))["3"].num_units == 6


# -- Neuron Features ----------------------------------------------------------------------------------
def test_nf_equals_the_naive_weighted_mean_of_the_crops():
    net = small_net(padding=0)  # no padding: every box is the full field, cut by plain slicing
    images, labels = data(side=14)
    c = collect(net, images, labels, ["3"], n=5)
    field = receptive_field(net, images[:1], "3")
    tables = dissect(c, {"3": field})
    t = tables["3"]
    for u in range(t.num_units):
        a = t.values[u].clamp_min(0).double()
        if a.max() <= 0:
            assert torch.isnan(t.neuron_features[u]).all()
            continue
        w = a / a.max()
        acc = torch.zeros(3, *field.patch_size, dtype=torch.float64)
        for s in range(5):
            image = c.pool[int(t.image_ids[u, s])]
            y0, x0, y1, x1 = field.box(*t.positions[u, s].tolist())
            acc += w[s] * image[:, y0:y1, x0:x1].double().clamp(0, 1)
        assert torch.allclose(t.neuron_features[u].double(), acc / w.sum(), atol=1e-6), u


@pytest.mark.parametrize("crop_elements", [1, 2**25])
def test_nf_from_distinct_crops_equals_one_crop_per_entry(crop_elements):
    """The NF from each distinct (image, position) crop and a sparse product against the NF of one
    crop per entry (`crop_patches` + `neuron_features`): padded layers (boxes clipped at the border,
    NaN outside), a unit with 40 slots for 32 images (empty slots), chunks of one unit."""
    net = small_net(padding=1)
    images, labels = data(side=12)
    c = collect(net, images, labels, ["0", "3"], n=40)
    ids = sorted(c.pool)
    pixels = torch.stack([c.pool[i] for i in ids]).clamp(0, 1)
    for layer in ("0", "3"):
        t = c.tops[layer]
        index = torch.tensor([[ids.index(i) if i >= 0 else -1 for i in row] for row in t.image_ids.tolist()])
        field = receptive_field(net, images[:1], layer)
        filled = index >= 0
        crops = torch.full((*index.shape, 3, *field.patch_size), math.nan)
        crops[filled] = crop_patches(pixels[index[filled]], field, t.positions[filled][:, 0],
                                     t.positions[filled][:, 1])
        expected = neuron_features(crops, t.values, filled)
        got = _neuron_features(pixels, index, t.positions, t.values, filled, field, crop_elements)
        assert (~filled).any() and torch.isnan(crops[filled]).any()   # empty slots, clipped boxes
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), layer
        assert torch.allclose(got.nan_to_num(0), expected.nan_to_num(0), atol=1e-6), layer
    # a chunk with no positive entry (dead units): NaN everywhere
    dead = _neuron_features(pixels, index[:2], t.positions[:2], -t.values[:2].abs(), filled[:2], field, crop_elements)
    assert torch.isnan(dead).all()


def test_crop_patches_by_index_equal_crops_of_copied_images():
    """`crop_patches(..., index=)` (one image, several patches, no copy per patch) against the patches
    of `images[index]`, bit for bit, borders (NaN outside the box) included."""
    net = small_net()
    images = torch.randn(5, 3, 12, 12)
    field = receptive_field(net, images[:1], "3")
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 5, (40,), generator=g)
    i, j = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 6, (40,), generator=g)
    got = crop_patches(images, field, i, j, index=index)
    assert torch.equal(got.isnan(), crop_patches(images[index], field, i, j).isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(7), crop_patches(images[index], field, i, j).nan_to_num(7))


def test_nf_leaves_out_crops_that_do_not_reach_a_pixel():
    crops = torch.tensor([[[[[1.0, math.nan]]], [[[3.0, 5.0]]], [[[7.0, 7.0]]]]])  # [1 unit, 3, 1, 1, 2]
    nf = neuron_features(crops, torch.tensor([[4.0, 2.0, -1.0]]))                 # weights 1, 1/2, 0
    assert torch.allclose(nf.flatten(), torch.tensor([(1 + 1.5) / 1.5, 5.0]))
    dead = neuron_features(crops, torch.tensor([[-1.0, 0.0, -2.0]]))
    assert torch.isnan(dead).all()


# -- class selectivity, population code, Morcos ---------------------------------------------------------
def test_class_frequencies_and_index_by_hand():
    labels = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 1], [2, 0, 1, 1]])
    values = torch.tensor([[4.0, 3.0, 2.0, 1.0], [5.0, 1.0, 1.0, 1.0], [0.0, 0.0, -3.0, 0.0]])
    f = class_frequencies(labels, values, num_classes=3)
    assert torch.allclose(f[0], torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    assert torch.allclose(f[1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert f[2].sum() == 0
    for threshold, expected in ((1.0, 1 / 3), (0.95, 1 / 3), (0.9, 2 / 3), (0.7, 1.0)):
        index, m = class_selectivity(f, 4, threshold)
        assert index[0].item() == pytest.approx(expected), threshold
        assert index[1].item() == 1.0  # one class only: 1, whatever the threshold
        assert math.isnan(index[2].item()) and m[2] == 0
    count, classes = population_code(f, 0.1)
    assert count.tolist() == [3, 1, 0] and classes == [[0, 1, 2], [1], []]
    assert population_code(f, 0.15)[0].tolist() == [2, 1, 0]
    assert top_class(f).tolist() == [0, 1, -1]
    # N different classes among N images: 0
    spread = class_frequencies(torch.tensor([[0, 1, 2]]), torch.ones(1, 3), num_classes=3)
    assert class_selectivity(spread, 3)[0].item() == 0.0


def test_morcos_csi_by_hand_and_against_direct_class_means():
    means = torch.tensor([[2.0, 1.0, 3.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    csi = morcos_csi(means)
    assert csi[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(csi[3])
    assert morcos_csi(means[:1]).isnan().all()  # one class: undefined
    # on a collector: the class means of the reference, through the formula written out
    net = small_net()
    images, labels = data()
    c = collect(net, images, labels, ["3"], n=4)
    t = dissect(c)["3"]
    _, ref = reference(net, images, labels, "3", 4)
    for u in range(t.num_units):
        mu = [ref[cls][u] for cls in sorted(ref)]
        best = max(mu)
        rest = (sum(mu) - best) / (len(mu) - 1)
        expected = (best - rest) / (best + rest) if best + rest > 0 else math.nan
        assert (math.isnan(expected) and math.isnan(t.csi[u])) or t.csi[u].item() == pytest.approx(expected, abs=1e-6)


def test_a_one_class_unit_has_class_index_one():
    """A unit that fires only on class-0 images (a bright red square only they carry)."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(24, 3, 10, 10, generator=g) * 0.2
    labels = torch.arange(24) % 3
    images[labels == 0, 0, 3:6, 3:6] = 1.0
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[0, 0] = 1.0            # unit 0: the red channel, 3x3 sum ...
        net[0].bias[0] = -5.0                # ... above 5: only the red square
        net[0].weight[1, 1] = 0.1            # unit 1: the green channel, random in every class
        net[0].bias[1] = 0.0
    c = collect(net, images, labels, ["0"], n=8)
    t = dissect(c, num_classes=3)["0"]
    assert t.class_selectivity[0].item() == 1.0 and t.top_class[0].item() == 0
    assert t.population_code[0].item() == 1 and t.csi[0].item() == pytest.approx(1.0)
    assert t.class_selectivity[1].item() < 1.0


# -- colour selectivity ----------------------------------------------------------------------------------
def test_opponent_grey_zeroes_the_chromatic_components():
    x = torch.rand(2, 3, 4, 4)
    g = opponent_grey(x)
    r, gr, b = g.unbind(1)
    assert torch.allclose(r - gr, torch.zeros_like(r), atol=1e-7)          # O1 = 0
    assert torch.allclose(r + gr - 2 * b, torch.zeros_like(r), atol=1e-6)  # O2 = 0
    assert torch.allclose(g.sum(1), x.sum(1), atol=1e-6)                    # O3 kept
    with pytest.raises(DissectionError, match="RGB"):
        opponent_grey(torch.rand(2, 1, 4, 4))


def test_colour_index_zero_for_a_colour_blind_unit_and_one_for_a_unit_greying_kills():
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
        net[0].weight[0] = torch.randn(1, 3, 3)          # unit 0: the same filter on R, G and B (sums them)
        net[0].weight[1, 0], net[0].weight[1, 1] = 1.0, -1.0  # unit 1: R - G, which grey pixels cancel
        net[2].weight.zero_()
        net[2].bias.zero_()
        net[2].weight[0, 0] = torch.randn(3, 3).abs()    # deeper, still colour-blind
        net[2].weight[1, 1] = torch.randn(3, 3).abs()    # deeper, still fed by R - G only
    images, labels = data(side=10)
    images = images.abs()
    c = collect(net, images, labels, ["0", "2"], n=6)
    tables = dissect(c, model=net)
    for layer in ("0", "2"):
        col = tables[layer].color_selectivity
        assert abs(col[0].item()) < 1e-5, layer
        assert col[1].item() == 1.0, layer


def test_greying_the_whole_image_equals_greying_each_receptive_field_alone():
    """The one-forward-per-image shortcut against one forward per entry with only its field greyed
    (display space through a per-channel normalization)."""
    net = small_net()
    norm = Normalization([0.2, 0.5, 0.7], [0.3, 0.2, 0.4])
    images, labels = data(side=12)
    c = collect(net, images, labels, ["0", "3"], n=4)
    ids = sorted(c.pool)
    pool = torch.stack([c.pool[i] for i in ids])
    for layer in ("0", "3"):
        t = c.tops[layer]
        index = torch.tensor([[ids.index(i) for i in row] for row in t.image_ids.tolist()])
        fast = grey_responses(net, pool, {layer: (index, t.positions)}, norm, batch_size=5)[layer]
        field = receptive_field(net, pool[:1], layer)
        for u in range(index.shape[0]):
            for s in range(index.shape[1]):
                x = norm.inverse(pool[index[u, s]][None]).clone()
                y0, x0, y1, x1 = field.box(*t.positions[u, s].tolist())
                x[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].mean(1, keepdim=True)
                i, j = t.positions[u, s].tolist()
                slow = maps_of(net, norm(x), [layer])[layer][0, u, i, j]
                assert fast[u, s].item() == pytest.approx(slow.item(), abs=1e-5), (layer, u, s)


@pytest.mark.parametrize("options", [dict(padding=1), dict(padding=2, stride=2, dilation=2),
                                     dict(padding="same", groups=2),
                                     dict(padding=1, padding_mode="reflect", bias=False),
                                     dict(padding=(0, 2), stride=(1, 3), padding_mode="circular")])
def test_conv_at_the_entries_equals_the_conv_map(options):
    """`_conv_at` (one dot product per entry) against the map of the conv itself."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **options)
    x = torch.randn(5, 4, 11, 9)
    maps = conv(x).detach()
    g = torch.Generator().manual_seed(1)
    e = 200
    rows, units = torch.randint(0, 5, (e,), generator=g), torch.randint(0, 6, (e,), generator=g)
    pos = torch.stack([torch.randint(0, maps.shape[2], (e,), generator=g),
                       torch.randint(0, maps.shape[3], (e,), generator=g)], 1)
    for chunk in (1, 2**22):
        got = _conv_at(conv, x, rows, units, pos, chunk_elements=chunk)
        assert torch.allclose(got, maps[rows, units, pos[:, 0], pos[:, 1]], atol=1e-5)
    # bit for bit the former gather (an index per input channel), on a channels-last input too
    padded = F.pad(x, conv._reversed_padding_repeated_twice,
                   mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    cin, cout = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    chans = (units // cout)[:, None] * cin + torch.arange(cin)
    ii = pos[:, 0, None] * conv.stride[0] + torch.arange(3) * conv.dilation[0]
    jj = pos[:, 1, None] * conv.stride[1] + torch.arange(3) * conv.dilation[1]
    window = padded[rows[:, None, None, None], chans[:, :, None, None], ii[:, None, :, None], jj[:, None, None, :]]
    former = (window * conv.weight.detach()[units]).flatten(1).sum(1)
    former = former + conv.bias.detach()[units] if conv.bias is not None else former
    assert torch.equal(_conv_at(conv, x, rows, units, pos), former)
    assert torch.equal(_conv_at(conv, x.contiguous(memory_format=torch.channels_last), rows, units, pos), former)


def test_grey_responses_equal_the_maps_of_a_full_forward_of_every_greyed_image():
    """Images grouped by their deepest layer, the forward stopped at its input and the conv there
    computed at the entries only, against the maps of a full forward of every greyed image; a net
    whose deepest layer is not a conv (an in-place ReLU there) and entries in every layer."""
    net = small_net()
    net[1] = nn.ReLU(inplace=True)
    norm = Normalization([0.2, 0.5, 0.7], [0.3, 0.2, 0.4])
    images, labels = data(side=12)
    layers = ["0", "1", "3", "5"]
    units = {"0": 5, "1": 5, "3": 6, "5": 6}
    g = torch.Generator().manual_seed(2)
    entries = {}
    for layer in layers:
        index = torch.randint(-1, len(images), (units[layer], 7), generator=g)
        side = {"0": 12, "1": 12, "3": 6, "5": 1}[layer]
        entries[layer] = (index, torch.randint(0, side, (units[layer], 7, 2), generator=g))
    entries["3"][0][:, :3] = torch.arange(3)   # images 0-2 reach layer 3 and stop there, never layer 5
    entries["5"][0][entries["5"][0] < 3] = -1
    grey = norm(opponent_grey(norm.inverse(images)))
    full = maps_of(net, grey, layers)
    for batch in (1, 4, 64):
        got = grey_responses(net, images, entries, norm, batch_size=batch)
        for layer, (index, pos) in entries.items():
            ok = index >= 0
            expected = torch.full(index.shape, math.nan)
            expected[ok] = full[layer][index[ok], torch.nonzero(ok)[:, 0], pos[ok][:, 0], pos[ok][:, 1]]
            assert torch.equal(torch.isnan(got[layer]), ~ok), layer
            assert torch.allclose(got[layer][ok], expected[ok], atol=1e-5), (layer, batch)


class _Residual(nn.Module):
    """conv, ReLU plus the block's input, conv: not a chain (the crops' fallback)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv2(self.relu(self.conv1(x)) + x))


def _strided_net() -> nn.Sequential:
    """Padding, strides, dilation, a padded max pool, BatchNorm (running statistics), an average pool
    whose count leaves the padding out, and an in-place ReLU as a layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                        nn.Conv2d(4, 5, 3, padding=2, dilation=2), nn.BatchNorm2d(5),
                        nn.AvgPool2d(2, stride=2, padding=1, count_include_pad=False),
                        nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU(inplace=True))
    net[4].running_mean.uniform_(-1, 1)
    net[4].running_var.uniform_(0.5, 2)
    return net


def _cifar_net() -> nn.Module:
    torch.manual_seed(0)
    net = CifarConvNet(c3=16, c4=8)
    net.bn2.running_mean.uniform_(-1, 1)
    net.bn2.running_var.uniform_(0.5, 2)
    return net


CROP_CASES = {  # net, image shape, layers, whether the crops apply
    "cifar": (_cifar_net, (3, 32, 32), ["conv1", "conv2", "conv3", "conv4"], True),
    "lenet": (lambda: (torch.manual_seed(0), LeNet())[1], (1, 28, 28), ["conv1", "conv2", "conv3", "conv4"], True),
    "strided": (_strided_net, (3, 29, 31), ["0", "3", "6", "7"], True),
    "residual": (_Residual, (3, 12, 12), ["conv1", "conv2"], False),
}


@pytest.mark.parametrize("case", sorted(CROP_CASES))
def test_cropped_grey_forward_equals_the_full_forward(case, monkeypatch):
    """Each image cropped to its entries' receptive fields (corner on the strides) against the maps of
    a full forward of every greyed image (as is, for the grayscale LeNet), within float32 rounding:
    random entries, some images referenced only by shallow layers (small crops), entries at every
    border. The crops are used on the chains and are smaller than the image there; the residual net
    runs whole images."""
    make, shape, layers, chain = CROP_CASES[case]
    net = make()
    net.train()   # grey_responses runs it in eval mode, and restores the mode
    g = torch.Generator().manual_seed(3)
    images = torch.randn(40, *shape, generator=g)
    rgb = shape[0] == 3
    norm = Normalization([0.2, 0.5, 0.7], [0.3, 0.2, 0.4]) if rgb else None
    full = maps_of(net, norm(opponent_grey(norm.inverse(images))) if rgb else images, layers)
    net.train()
    entries = {}
    for rank, layer in enumerate(layers):
        u, h, w = full[layer].shape[1:]
        index = torch.randint(-1, 40, (u, 6), generator=g)
        index[index >= 10 * (rank + 1)] = -1       # images 0-9 in every layer, 30-39 in the last only
        pos = torch.stack([torch.randint(0, h, (u, 6), generator=g), torch.randint(0, w, (u, 6), generator=g)], -1)
        pos[0, :4] = torch.tensor([[0, 0], [h - 1, w - 1], [0, w - 1], [h - 1, 0]])   # the corners
        entries[layer] = (index, pos)
    sizes = []
    grey_input = dissection_module._grey_model_input
    monkeypatch.setattr(dissection_module, "_grey_model_input",
                        lambda x, n: (sizes.append(tuple(x.shape[2:])), grey_input(x, n))[1])
    ran = []
    cropped = dissection_module._grey_cropped
    monkeypatch.setattr(dissection_module, "_grey_cropped", lambda *a: (ran.append(1), cropped(*a))[1])
    for batch in (3, 64):
        got = grey_responses(net, images, entries, norm, grey=rgb, batch_size=batch)
        for layer, (index, pos) in entries.items():
            ok = index >= 0
            expected = full[layer][index[ok], torch.nonzero(ok)[:, 0], pos[ok][:, 0], pos[ok][:, 1]]
            assert torch.equal(torch.isnan(got[layer]), ~ok), layer
            torch.testing.assert_close(got[layer][ok], expected, atol=1e-5, rtol=1e-5, msg=f"{case} {layer} {batch}")
    assert net.training
    assert bool(ran) == chain
    if chain and rgb:
        assert min(h * w for h, w in sizes) < shape[1] * shape[2]   # some images did run cropped


def test_dead_units_entries_do_not_run_and_the_colour_index_is_unchanged(monkeypatch):
    """The colour index of `dissect` (a dead unit's entries left out of the grey forward) against
    `color_selectivity` of every entry's grey response, one layer at a time (other crops: float32
    rounding): equal on the live units, NaN on the dead."""
    net = small_net()
    with torch.no_grad():
        net[3].bias[1] = -100.0   # unit 1 of layer 3: never positive
    images, labels = data(side=12)
    c = collect(net, images, labels, ["0", "3"], n=4)
    passed = []
    real = dissection_module.grey_responses
    monkeypatch.setattr(dissection_module, "grey_responses",
                        lambda m, x, e, *a, **k: (passed.append(e), real(m, x, e, *a, **k))[1])
    tables = dissect(c, model=net)
    assert (passed[0]["3"][0][1] == -1).all() and (passed[0]["3"][0][0] >= 0).all()   # unit 1's entries left out
    ids = sorted(c.pool)
    pool = torch.stack([c.pool[i] for i in ids])
    for layer in ("0", "3"):
        t = c.tops[layer]
        index = torch.tensor([[ids.index(i) for i in row] for row in t.image_ids.tolist()])
        grey = grey_responses(net, pool, {layer: (index, t.positions)})[layer]
        want = color_selectivity(t.values, grey)
        dead = tables[layer].dead
        assert dead.tolist() == ([False, True] + [False] * 4 if layer == "3" else [False] * 5)
        torch.testing.assert_close(tables[layer].color_selectivity[~dead], want[~dead], rtol=1e-5, atol=1e-6)
        assert tables[layer].color_selectivity[dead].isnan().all()


def test_valid_positions_by_hand():
    """A 3-tap conv with padding 1 on 8 positions: a crop computes the positions whose taps it holds
    (or that read the padding on the whole input too); a crop whose start is not on the strides of a
    pool after it is refused."""
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2))
    chain = _crop_chain(conv, torch.zeros(1, 1, 8, 8), {"0": conv[0], "1": conv[1]})
    assert [step.geometry[0] for step in chain] == [(3, 1, 1, 1), (2, 2, 0, 1)]
    conv_valid, pool_valid = _valid_positions(chain, 0, 0, 4)
    assert conv_valid.nonzero().flatten().tolist() == [0, 1, 2]        # 3 reads position 4, outside the crop
    assert pool_valid.nonzero().flatten().tolist() == [0]              # pool 1 reads conv 2 and 3
    conv_valid, pool_valid = _valid_positions(chain, 0, 2, 8)
    assert conv_valid.nonzero().flatten().tolist() == [3, 4, 5, 6, 7]  # 7 reads 8: padding on the whole input too
    assert pool_valid.nonzero().flatten().tolist() == [2, 3]
    assert _valid_positions(chain, 0, 1, 8) is None                    # the pool's windows would not line up
    assert _valid_positions(chain[:1], 0, 1, 8)[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]
    # what is not a chain of such modules runs whole images
    hooked = nn.Sequential(nn.Conv2d(1, 1, 3))
    hooked[0].register_forward_hook(lambda *a: None)
    assert _crop_chain(hooked, torch.zeros(1, 1, 8, 8), {"0": hooked[0]}) is None
    ceil = nn.Sequential(nn.Conv2d(1, 1, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(1, 1, 1))
    assert _crop_chain(ceil, torch.zeros(1, 1, 9, 9), {"2": ceil[2]}) is None
    assert _crop_chain(_Residual(), torch.zeros(1, 3, 8, 8), {"conv2": _Residual().conv2}) is None


def test_colour_index_by_hand_and_rectified():
    a = torch.tensor([[2.0, 2.0], [1.0, -1.0], [0.0, 0.0]])
    grey = torch.tensor([[1.0, 3.0], [-2.0, 5.0], [1.0, 1.0]])
    col = color_selectivity(a, grey)
    assert col[0].item() == 0.0          # 1 - 4/4
    assert col[1].item() == -4.0         # 1 - (0 + 5) / (1 + 0): both rectified; greying made it respond more
    assert color_selectivity(a[1:2], torch.tensor([[-2.0, 0.0]]))[0].item() == 1.0
    assert math.isnan(col[2].item())     # nothing to compare with


# -- the callback ----------------------------------------------------------------------------------------
Module = partial(NetModule, lr=0.0)  # lr 0: the fixed net stays as built


def fit(tmp_path, callbacks, images, labels, epochs=2, **kwargs):
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=epochs,
                         callbacks=callbacks, logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_train_batches=2, **kwargs)
    return trainer


def test_callback_dissects_every_unit_and_logs_grid_histograms_scalars_text_and_csv(tmp_path):
    net = small_net()
    images, labels = data(n=40)
    cb = UnitDissection(n=5, strip_units=2, budget=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [cb], images, labels).fit(Module(net), DataLoader(TensorDataset(images, labels), batch_size=8),
                                                DataLoader(TensorDataset(images, labels), batch_size=8))
    assert not cb.declined, cb.declined_reason
    assert cb.layers == ["0", "3"]  # a plain chain: every conv
    assert not [w for w in record if str(w.message).startswith("UnitDissection")]
    # the last epoch's tables are the reference's (lr = 0: the weights never change)
    for layer in cb.layers:
        top, _ = reference(net, images, labels, layer, 5)
        t = cb.tables[layer]
        assert t.num_units == dict(net.named_modules())[layer].out_channels
        assert [row for row in t.image_ids.tolist()] == [[e[1] for e in entries] for entries in top]
        # the positions, found during the loop only for the maxima that may enter a top (thresholds)
        assert [[tuple(p) for p in row] for row in t.positions.tolist()] == [[e[3] for e in entries]
                                                                             for entries in top]
    events = read_events(tmp_path / "tb")
    for layer in cb.layers:
        assert sorted(events["images"][f"dissection/{layer}"]) == sorted(events["scalars"]["val/acc"])
        assert f"dissection_strip/{layer}" in events["images"]
        for key in ("mean_class", "mean_color", "mean_csi", "dead"):
            assert f"dissection_{key}/{layer}" in events["scalars"]
    assert "viz_time/dissection" in events["scalars"] and "viz_time/dissection_collect" in events["scalars"]
    rows = list(csv.DictReader((tmp_path / "tb" / "dissection" / "units.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["epoch"], r["layer"]) for r in rows].count(("1", "3")) == 6
    assert {r["epoch"] for r in rows} == {"0", "1"}
    t = cb.tables["3"]
    for r in [r for r in rows if r["epoch"] == "1" and r["layer"] == "3"]:
        u = int(r["unit"])
        assert float(r["class_selectivity"]) == pytest.approx(t.class_selectivity[u].item())
        assert float(r["color_selectivity"]) == pytest.approx(t.color_selectivity[u].item())
        assert int(r["dead"]) == int(t.dead[u])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "tb").glob("events.out.tfevents.*"))), size_guidance={"tensors": 0})
    acc.Reload()
    tensors = acc.Tags()["tensors"]
    assert "dissection_table/3/text_summary" in tensors
    assert "dissection_class/0" in acc.Tags()["histograms"]


def test_dead_units_and_grayscale_images_skip_the_colour_index_with_one_warning(tmp_path):
    net = small_net(channels=1)
    with torch.no_grad():
        net[0].bias[1] = -100.0  # unit 1 of layer 0 never positive: dead
    images, labels = data(n=24, channels=1)
    cb = UnitDissection(n=4, budget=None)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [cb], images, labels).fit(Module(net), loader, loader)
    said = [str(w.message) for w in record if str(w.message).startswith("UnitDissection")]
    assert len(said) == 1 and "colour selectivity index is undefined on 1-channel images" in said[0]
    t = cb.tables["0"]
    assert t.color_selectivity.isnan().all() and not t.class_selectivity[~t.dead].isnan().any()
    assert t.dead.tolist() == [False, True, False, False, False]
    assert math.isnan(t.class_selectivity[1]) and t.top_class[1] == -1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "tb").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert acc.Scalars("dissection_dead/0")[-1].value == pytest.approx(0.2)  # 1 of 5 units
    assert "dissection_color/0" not in acc.Tags()["histograms"]             # nothing to show
    rows = list(csv.DictReader((tmp_path / "tb" / "dissection" / "units.csv").open()))
    assert all(r["color_selectivity"] == "" for r in rows)


def test_grid_is_sorted_by_the_chosen_index():
    net = small_net()
    images, labels = data()
    t = dissect(collect(net, images, labels, ["3"], n=5), model=net)["3"]
    order = sort_order(t, "class_selectivity")
    values = [t.class_selectivity[u].item() for u in order if math.isfinite(t.class_selectivity[u])]
    assert values == sorted(values, reverse=True)
    assert sort_order(t, "unit") == list(range(t.num_units))


def test_a_grid_of_many_units_keeps_the_most_selective_that_fit_a_card_and_says_how_many_are_left():
    """The oracle: `card_layout` of the tiles drawn (the NFs upscaled to tile_size, three caption
    lines) gives the number of units shown; the grid fits a card and ends with the note that says
    how many were left out (its pixels against the note drawn on its own)."""
    import dataclasses

    from convlens.render import CARD_HEIGHT, CARD_WIDTH, card_layout, note_image, upscale

    net = small_net()
    images, labels = data()
    t = dissect(collect(net, images, labels, ["3"], n=5), {"3": receptive_field(net, images[:1], "3")},
                model=net)["3"]
    many = 100  # the 6 units repeated: more than a card holds
    index = torch.arange(many) % t.num_units
    per_unit = {f.name: getattr(t, f.name)[index] for f in dataclasses.fields(t)
                if torch.is_tensor(getattr(t, f.name)) and getattr(t, f.name).shape[:1] == (t.num_units,)}
    big = dataclasses.replace(t, **per_unit, population_classes=[t.population_classes[int(u)] for u in index],
                              class_means=t.class_means[:, index])
    callback = UnitDissection(tile_size=48)
    names = ["a", "b", "c"]
    grid = callback.grid(big, names)
    assert grid.shape[-2] <= CARD_HEIGHT and grid.shape[-1] <= CARD_WIDTH
    tile = tuple(upscale(big.neuron_features[:1].float(), 48).shape[-2:])
    note = "showing {shown} of {total} units of 3, sorted by class_selectivity; every unit in units.csv and " \
           "dissection_table/3"
    columns, rows = card_layout(many, many, tile, caption_lines=3, flat=True, note_chars=len(note) + 10)
    shown = columns * rows
    assert 0 < shown < many
    text = note_image(note.format(shown=shown, total=many), columns * (tile[1] + 2) + 2)
    assert torch.equal(grid[:, -text.shape[-2]:], text)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="n \\(top images per unit\\)"):
        UnitDissection(n=0)
    with pytest.raises(ConfigError, match="sort_by"):
        UnitDissection(sort_by="colour")
    with pytest.raises(ConfigError, match="class_threshold"):
        UnitDissection(class_threshold=0)
    with pytest.raises(ConfigError, match="population_threshold"):
        UnitDissection(population_threshold=1.5)


def test_state_dict_keeps_the_nf_history():
    cb = UnitDissection()
    cb.history = {"0": [(0, torch.zeros(2, 3, 4, 4, dtype=torch.uint8)),
                        (1, torch.ones(2, 3, 4, 4, dtype=torch.uint8))]}
    other = UnitDissection()
    other.load_state_dict(cb.state_dict())
    assert [e for e, _ in other.history["0"]] == [0, 1] and torch.equal(other.history["0"][1][1], cb.history["0"][1][1])


# -- DDP: two CPU processes give the single-process result ----------------------------------------
DDP_SCRIPT = textwrap.dedent("""
    import sys

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from convlens.callbacks.dissection import UnitDissection

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])
        def validation_step(self, batch, batch_idx):
            self(batch[0])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    if __name__ == "__main__":
        out, devices = sys.argv[1], int(sys.argv[2])
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(45, 3, 12, 12, generator=g), torch.arange(45) % 3  # 45: DDP repeats an image
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        cb = UnitDissection(n=4, budget=None)
        trainer = pl.Trainer(strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices,
                             max_epochs=1, default_root_dir=out, logger=False, callbacks=[cb],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0)
        trainer.fit(Module(), loader, loader)
        if trainer.is_global_zero:
            keep = ("values", "image_ids", "positions", "labels", "neuron_features", "class_selectivity",
                    "color_selectivity", "csi", "class_means", "dead", "population_code")
            torch.save({{layer: {{k: getattr(t, k) for k in keep}} for layer, t in cb.tables.items()}},
                       out + f"/dissection{{devices}}.pt")
        print("RANK", trainer.global_rank, "DONE")
""")


@pytest.mark.slow  # three interpreters (2 DDP ranks, then 1 process)
def test_ddp_two_processes_equal_one_process(tmp_path):
    results = run_ddp_script(DDP_SCRIPT.format(), tmp_path, "dissection")
    ddp, single = results[2], results[1]
    assert set(ddp) == set(single) == {"0", "3"}
    for layer in single:
        for key, value in single[layer].items():
            other = ddp[layer][key]
            if value.is_floating_point():
                assert torch.allclose(other, value, atol=1e-6, equal_nan=True), (layer, key)
            else:
                assert torch.equal(other, value), (layer, key)
