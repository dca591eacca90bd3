"""viz/top_activations.py (running top-k, per-map maxima, content ids) and the TopActivations
callback (callbacks/top_activations.py), in one process and under DDP.

Oracles: a brute-force pass over the whole data (every value kept, each channel sorted by
(-value, id) with Python's `sorted`), naive Python loops for the per-map maximum and its first
position, an independent forward (the net cut with plain slicing) for the layer's maps, the patches
cropped from the raw uint8 validation images with the receptive-field boxes, and a single-process
run for the DDP run.
"""
from __future__ import annotations

import math
import textwrap
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from convlens.render import upscale
from convlens.callbacks.display import OUTSIDE_COLOR
from convlens.callbacks.top_activations import TopActivations, top_activations_grid
from conftest import FAST_SHAPES, compose_cfg, read_events, run_ddp_script
from convlens.datamodules.shapes import ShapesDataModule
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule
from convlens.train import train
from convlens.viz.layers import LayerError
from convlens.viz.receptive_field import crop_patches, receptive_field
from convlens.viz.top_activations import (RunningTopK, TopActivationsError, content_ids, max_activations,
                                 spatial_max)

LENET_CONVS = ["conv1", "conv2", "conv3", "conv4"]


# -- brute force --------------------------------------------------------------------------------

def brute_force(values: torch.Tensor, ids: torch.Tensor, k: int) -> list[list[int]]:
    """Per channel, the rows of the k best distinct ids by (-value, id); a repeated id keeps its
    first row among its highest values."""
    out = []
    for c in range(values.shape[1]):
        best: dict[int, int] = {}
        for n in range(values.shape[0]):
            i = int(ids[n])
            if i not in best or values[n, c] > values[best[i], c]:
                best[i] = n
        rows = sorted(best.values(), key=lambda n: (-float(values[n, c]), int(ids[n])))
        out.append(rows[:k])
    return out


def stream(values, ids, positions, sizes, k, with_payload=True):
    top = RunningTopK(k, values.shape[1])
    calls = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)

        def payload(r, pos, rows=rows):
            calls.append(len(r))
            # a payload that identifies the entry: its id and its position
            return torch.stack([ids[rows][r].double(), pos[:, 0].double(), pos[:, 1].double()], dim=1)

        top.update(values[rows], ids[rows], positions[rows], payload=payload if with_payload else None)
        start += size
    return top, calls


def random_data(n=157, c=5, seed=0, levels=6):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (n, c), generator=g).double()   # many ties on purpose
    ids = torch.randperm(10 * n, generator=g)[:n]
    positions = torch.randint(0, 4, (n, c, 2), generator=g)
    return values, ids, positions


def batch_sizes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(torch.randint(1, 40, (1,), generator=g)), n - sum(sizes)))
    return sizes


def assert_matches(top, values, ids, positions, k):
    expected = brute_force(values, ids, k)
    for c, rows in enumerate(expected):
        filled = len(rows)
        assert top.counts[c] == filled
        assert top.image_ids[c, :filled].tolist() == [int(ids[n]) for n in rows], c
        assert top.values[c, :filled].tolist() == [float(values[n, c]) for n in rows], c
        assert top.positions[c, :filled].tolist() == [positions[n, c].tolist() for n in rows], c
        if top.payload is not None:
            want = [[float(ids[n]), *map(float, positions[n, c])] for n in rows]
            assert top.payload[c, :filled].tolist() == want, c
        assert (top.image_ids[c, filled:] == -1).all() and torch.isinf(top.values[c, filled:]).all()


# -- RunningTopK ----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_running_topk_equals_brute_force(k, seed):
    values, ids, positions = random_data(seed=seed)
    top, calls = stream(values, ids, positions, batch_sizes(len(ids), seed), k)
    assert_matches(top, values, ids, positions, k)
    # the payload is asked only for entries entering the top k, never for all N * C
    assert all(m <= values.shape[1] * k for m in calls)
    assert sum(calls) < values.numel()


def test_running_topk_one_big_batch_equals_many_small():
    values, ids, positions = random_data(seed=3)
    big, _ = stream(values, ids, positions, [len(ids)], 4)
    small, _ = stream(values, ids, positions, [1] * len(ids), 4)
    for name in ("values", "image_ids", "positions", "payload"):
        assert torch.equal(getattr(big, name), getattr(small, name)), name


def test_repeated_images_count_once():
    # DDP's sampler repeats images to even out the ranks: a repeated id must not take two slots
    values, ids, positions = random_data(n=60, seed=4)
    repeat = torch.arange(20)
    values2 = torch.cat([values, values[repeat]])
    ids2 = torch.cat([ids, ids[repeat]])
    positions2 = torch.cat([positions, positions[repeat]])
    top, _ = stream(values2, ids2, positions2, batch_sizes(len(ids2), 4), 5)
    assert_matches(top, values, ids, positions, 5)
    for c in range(values.shape[1]):
        live = top.image_ids[c][top.image_ids[c] >= 0]
        assert len(set(live.tolist())) == len(live)


def test_fewer_images_than_k_leaves_empty_slots():
    values, ids, positions = random_data(n=3, seed=5)
    top, _ = stream(values, ids, positions, [2, 1], 6)
    assert top.counts.tolist() == [3] * values.shape[1]
    assert_matches(top, values, ids, positions, 6)


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_equals_one_pass(parts):
    values, ids, positions = random_data(n=120, seed=6)
    # overlapping shares, as DDP ranks with padded samplers see them
    bounds = torch.linspace(0, 120, parts + 1).long().tolist()
    shares = [torch.arange(max(0, a - 5), b) for a, b in zip(bounds[:-1], bounds[1:])]
    tops = [stream(values[s], ids[s], positions[s], batch_sizes(len(s), i), 4)[0] for i, s in enumerate(shares)]
    merged = tops[0]
    for other in tops[1:]:
        merged.merge(RunningTopK.from_state_dict(other.state_dict()))
    assert_matches(merged, values, ids, positions, 4)
    # merging an empty state changes nothing, from either side
    empty = RunningTopK(4, values.shape[1])
    before = merged.state_dict()
    merged.merge(empty)
    assert torch.equal(merged.values, before["values"]) and torch.equal(merged.payload, before["payload"])
    empty.merge(merged)
    assert torch.equal(empty.image_ids, merged.image_ids) and torch.equal(empty.payload, merged.payload)


def test_running_topk_errors():
    with pytest.raises(TopActivationsError, match="k must be an int >= 1"):
        RunningTopK(0, 3)
    with pytest.raises(TopActivationsError, match="num_units"):
        RunningTopK(2, 0)
    top = RunningTopK(2, 3)
    with pytest.raises(TopActivationsError, match=r"\[N, C\] = \[N, 3\]"):
        top.update(torch.zeros(4, 2), torch.arange(4))
    with pytest.raises(TopActivationsError, match="image_ids must be an integer tensor"):
        top.update(torch.zeros(4, 3), torch.arange(3))
    with pytest.raises(TopActivationsError, match=">= 0"):
        top.update(torch.zeros(2, 3), torch.tensor([0, -5]))
    with pytest.raises(TopActivationsError, match="positions must be"):
        top.update(torch.zeros(2, 3), torch.arange(2), torch.zeros(2, 3))
    with pytest.raises(TopActivationsError, match="cannot merge"):
        top.merge(RunningTopK(3, 3))


# -- per-map maxima -------------------------------------------------------------------------------

def naive_max(maps: torch.Tensor):
    n, k, h, w = maps.shape
    values = torch.empty(n, k, dtype=maps.dtype)
    positions = torch.empty(n, k, 2, dtype=torch.long)
    for a in range(n):
        for c in range(k):
            best, where = None, None
            for i in range(h):
                for j in range(w):
                    if best is None or maps[a, c, i, j] > best:   # strict: the first maximum wins
                        best, where = maps[a, c, i, j], (i, j)
            values[a, c], positions[a, c] = best, torch.tensor(where)
    return values, positions


def test_spatial_max_equals_a_loop_with_first_maximum_on_ties():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 3, (3, 4, 5, 6), generator=g).float()  # ties everywhere
    values, positions = spatial_max(maps)
    want_v, want_p = naive_max(maps)
    assert torch.equal(values, want_v) and torch.equal(positions, want_p)
    for channels in (torch.tensor([3, 1]), range(1, 3), [0, 2]):
        v, p = spatial_max(maps, channels)
        idx = list(channels)
        assert torch.equal(v, want_v[:, idx]) and torch.equal(p, want_p[:, idx])


def test_spatial_max_with_thresholds_finds_the_positions_it_must_and_the_same_values():
    """Positions only where the maximum reaches its unit's threshold: there (and every value) bit for
    bit what `spatial_max` without thresholds gives (ties: the first maximum), (-1, -1) elsewhere;
    the comparison made in the thresholds' dtype (float64 maps, float32 thresholds)."""
    g = torch.Generator().manual_seed(1)
    maps = torch.randint(-2, 3, (5, 4, 3, 6), generator=g).double() / 3  # ties everywhere
    maps = maps * torch.arange(1, 6, dtype=torch.float64)[:, None, None, None]  # maxima that differ by image
    want_v, want_p = naive_max(maps)
    channels_last = maps.contiguous(memory_format=torch.channels_last)   # its maxima come from a max pool
    assert not channels_last.is_contiguous()
    for layout in (maps, channels_last, channels_last.float()):
        for thresholds in (torch.tensor([2 / 3, -torch.inf, 0.0, 1.0]), torch.full((4,), -torch.inf),
                           torch.full((4,), 9.0)):
            values, positions = spatial_max(layout, thresholds=thresholds.float())
            need = want_v.float() >= thresholds.float()
            assert values.dtype == layout.dtype and torch.equal(values, want_v.to(layout.dtype))
            assert torch.equal(positions[need], want_p[need])
            assert (positions[~need] == -1).all()
    assert 0 < int((want_v.float() >= torch.tensor([2 / 3, -torch.inf, 0.0, 1.0]).float()).sum()) < want_v.numel()
    # a float64 maximum just below a float32 threshold that it rounds to: found, as the top-k compares in float32
    near = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    near[0, 0, 1, 0] = 0.1
    thr = torch.tensor([0.1], dtype=torch.float32)
    assert near.max().item() < thr.double().item() or near.max().float() == thr
    assert spatial_max(near, thresholds=thr)[1].tolist() == [[[1, 0]]]
    for one in (torch.randn(3, 4, 1, 1, generator=g), torch.randn(3, 4, 1, 1, generator=g).double()):   # 1x1 maps
        for thresholds in (None, torch.zeros(4)):
            v, p = spatial_max(one, thresholds=thresholds)
            assert torch.equal(v, one[:, :, 0, 0]) and not p.any() and v.data_ptr() != one.data_ptr()
    for units in ([2, 0], range(1, 3)):   # a copy of the chosen maps, and a view of them
        idx = list(units)
        thresholds = want_v[2, idx].float()   # the third image's maxima
        v, p = spatial_max(maps, units, thresholds=thresholds)
        need = want_v[:, idx].float() >= thresholds
        assert torch.equal(v, want_v[:, idx]) and torch.equal(p[need], want_p[:, idx][need])
        assert (p[~need] == -1).all() and need.any() and not need.all()


@pytest.mark.parametrize("net,shape,layer,cut", [
    (LeNet(), (1, 28, 28), "conv2", 3),
    (CifarConvNet(c3=16, c4=8), (3, 32, 32), "conv3", 8),
])
def test_max_activations_equals_an_independent_forward(net, shape, layer, cut):
    torch.manual_seed(0)
    net.train()
    images = torch.randn(4, *shape)
    values, positions = max_activations(net, images, layer)
    trunk = nn.Sequential(*list(net.children())[:cut]).eval()   # the net up to `layer`, by slicing
    assert list(dict(net.named_children()))[cut - 1] == layer
    with torch.no_grad():
        maps = trunk(images)
    net.train()
    want_v, want_p = naive_max(maps)
    assert torch.equal(values, want_v) and torch.equal(positions, want_p)
    v, p = max_activations(net, images, layer, units=torch.tensor([2, 0]))
    assert torch.equal(v, want_v[:, [2, 0]]) and torch.equal(p, want_p[:, [2, 0]])
    assert all(m.training for m in net.modules())
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(LayerError, match="Valid layer names"):
        max_activations(net, images, "nope")


def test_content_ids_follow_the_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(50, 3, 8, 8, generator=g)
    ids = content_ids(images)
    assert len(set(ids.tolist())) == 50 and (ids >= 0).all()
    # the same image gets the same id in any batch, whatever the chunking
    assert torch.equal(content_ids(images[[7, 3]]), ids[[7, 3]])
    assert torch.equal(content_ids(images, chunk_elements=1), ids)
    # one bit of one pixel changes the id; float64 images work too
    changed = images[:1].clone()
    changed.view(torch.int32)[0, 1, 2, 3] ^= 1
    assert content_ids(changed)[0] != ids[0]
    assert len(set(content_ids(images.double()).tolist())) == 50


# -- the callback ---------------------------------------------------------------------------------

def tiny_datamodule(val_size=96, eval_batch_size=32) -> ShapesDataModule:
    return ShapesDataModule(n_train=160, n_test=32, val_size=val_size, batch_size=32,
                            eval_batch_size=eval_batch_size)


def lenet_module(lr=0.05) -> ClassifierModule:
    return ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9))


def tiny_trainer(root: Path, callbacks, max_epochs=1, logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs,
                      callbacks=callbacks, logger=logger, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, **kwargs)


def expected_top(net, dm, layer, filters, k, batch=32):
    """Brute force over the whole validation split: every image's maxima (an independent forward
    per batch), sorted per filter by (-value, id); patches cropped from the raw uint8 images."""
    images = dm.normalization(dm.val_set.images)
    values, positions = [], []
    for s in range(0, len(images), batch):
        v, p = max_activations(net, images[s:s + batch], layer, torch.tensor(filters))
        values.append(v)
        positions.append(p)
    values, positions = torch.cat(values), torch.cat(positions)
    ids = content_ids(images)
    rows = brute_force(values, ids, k)
    field = receptive_field(net, images[:1], layer)
    pixels = dm.val_set.images.float() / 255
    patches = torch.stack([crop_patches(pixels[r], field, positions[r, c, 0], positions[r, c, 1])
                           for c, r in enumerate(rows)])
    return (torch.stack([values[r, c] for c, r in enumerate(rows)]), torch.stack([ids[r] for r in rows]),
            torch.stack([positions[r, c] for c, r in enumerate(rows)]), patches)


def assert_result_equals_brute_force(result, net, dm, chosen, k):
    for layer, top in result.items():
        values, ids, positions, patches = expected_top(net, dm, layer, chosen[layer], k)
        assert torch.equal(top.image_ids, ids), layer
        assert torch.allclose(top.values, values, rtol=1e-5, atol=1e-6), layer
        assert torch.equal(top.positions, positions), layer
        assert torch.equal(torch.isnan(top.payload), torch.isnan(patches)), layer
        assert torch.allclose(top.payload.nan_to_num(-1), patches.nan_to_num(-1), atol=1e-6), layer


def test_callback_collects_the_validation_top_k_and_logs_each_epoch(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm, module = tiny_datamodule(), lenet_module()
    cb = TopActivations(k=3, max_units=4, tile_size=32)
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=2, logger=TensorBoardLogger(tmp_path, name="tb", version=""))
    trainer.fit(module, datamodule=dm)
    # the last collection ran with the final weights: it equals a brute-force pass over the val split
    assert cb.chosen == {layer: [0, 1, 2, 3] for layer in LENET_CONVS}
    assert_result_equals_brute_force(cb.result, module.net, dm, cb.chosen, 3)
    events = read_events(tmp_path / "tb")
    steps = sorted(trainer.global_step * e // 2 - 1 for e in (1, 2))  # the epochs' validation steps
    assert sorted(events["scalars"]["val/acc"]) == steps
    for layer in LENET_CONVS:
        assert sorted(events["images"][f"top_activations/{layer}"]) == steps
    assert sorted(events["scalars"]["viz_time/top_activations_collect"]) == steps
    # hooks were removed at validation end
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_callback_most_active_selection_and_explicit_filters(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm, module = tiny_datamodule(val_size=64), lenet_module()
    cb = TopActivations(layers=["conv2", "conv3"], k=2, max_units=3, selection="most_active",
                        units={"conv3": [9, 4]})
    cb.visualize = lambda trainer, pl_module: None
    tiny_trainer(tmp_path, [cb], max_epochs=1).fit(module, datamodule=dm)
    # oracle: the mean over the probe images of each map's maximum, highest first
    values, _ = max_activations(module.net, cb.probe_images, "conv2")
    assert cb.chosen["conv2"] == values.mean(0).argsort(descending=True, stable=True)[:3].tolist()
    assert cb.chosen["conv3"] == [9, 4]
    assert_result_equals_brute_force(cb.result, module.net, dm, cb.chosen, 2)


def test_callback_every_n_epochs_collects_only_due_epochs(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm, module = tiny_datamodule(val_size=32), lenet_module()
    cb = TopActivations(layers=["conv1"], k=1, max_units=1, every_n_epochs=2)
    collected = []
    original = cb.on_validation_epoch_end
    cb.on_validation_epoch_end = lambda trainer, m: (collected.append((trainer.current_epoch, bool(cb._handles))),
                                                     original(trainer, m))
    tiny_trainer(tmp_path, [cb], max_epochs=3, num_sanity_val_steps=1).fit(module, datamodule=dm)
    # sanity check (epoch 0), epochs 0, 1, 2: only epoch 1 (the 2nd) had hooks
    assert collected == [(0, False), (0, False), (1, True), (2, False)]
    assert cb.result_epoch == 1


def test_grid_tiles_are_the_patches():
    g = torch.Generator().manual_seed(0)
    patches = torch.rand(2, 3, 1, 5, 5, generator=g)
    patches[0, 1, :, :2] = math.nan                      # outside the field
    values = torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.25, -1.0]])
    filled = torch.tensor([[True, True, True], [True, True, False]])
    grid = top_activations_grid(patches, values, filled, [7, 12], tile_size=20)
    th = tw = 20                                          # 5 px upscaled x4
    top, left, pad, cap = 14, 8 + 6 * len("#12"), 2, 12   # column titles, row titles (captioned_grid)
    for r in range(2):
        for s in range(3):
            y = top + pad + r * (th + pad + cap)
            x = left + pad + s * (tw + pad)
            drawn = grid[:, y:y + th, x:x + tw]
            if filled[r, s]:
                want = patches[r, s].expand(3, -1, -1).clone()
                want = torch.where(torch.isnan(want), torch.tensor(OUTSIDE_COLOR).view(3, 1, 1), want)
            else:
                want = torch.ones(3, 5, 5)
            want = upscale(want[None], 20)[0]
            assert (drawn - want).abs().max() <= 1 / 255 + 1e-6, (r, s)


def test_callback_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="k .* must be an int >= 1"):
        TopActivations(k=0)
    with pytest.raises(ValueError, match="max_units"):
        TopActivations(max_units=0)
    with pytest.raises(ValueError, match="selection"):
        TopActivations(selection="best")
    with pytest.raises(ValueError, match="non-empty list of unit indices"):
        TopActivations(units={"conv1": []})
    with pytest.raises(ValueError, match="twice"):
        TopActivations(units={"conv1": [1, 1]})
    net = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(LayerError, match="Valid layer names: conv1, conv2, conv3, conv4"):
        TopActivations(layers=["fc9"]).setup(None, net, "fit")
    with pytest.raises(ValueError, match="conv1 has 20 units"):
        TopActivations(units={"conv1": [20]}).setup(None, net, "fit")
    with pytest.raises(LayerError, match="not drawn"):
        TopActivations(layers=["conv2"], units={"conv1": [0]}).setup(None, net, "fit")


def test_state_dict_round_trip():
    cb = TopActivations(units={"conv3": [5, 1]})
    cb.probe_images, cb.probe_labels, cb.layers = torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]), ["conv3"]
    other = TopActivations()
    other.load_state_dict(cb.state_dict())
    assert other.units == {"conv3": [5, 1]} and other.layers == ["conv3"]
    assert torch.equal(other.probe_images, cb.probe_images)


# -- end to end: train.py with the configs -------------------------------------------------------

def test_train_logs_top_activations_and_saliency_each_epoch(tmp_path):
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=[none,top_activations,saliency]",
                                     "callbacks.top_activations.max_units=4"], tmp_path)
    train(cfg)
    events = read_events(tmp_path / "tensorboard")
    per_epoch = math.ceil((cfg.datamodule.n_train - cfg.datamodule.val_size) / cfg.datamodule.batch_size)
    steps = [per_epoch - 1, 2 * per_epoch - 1]  # the step of each epoch's validation scalars
    assert sorted(events["scalars"]["val/acc"]) == steps
    for tag in [f"top_activations/{layer}" for layer in LENET_CONVS] + ["saliency/gradcam",
                                                                        "saliency/guided_backprop"]:
        assert sorted(events["images"][tag]) == sorted(steps), tag


# -- DDP: two CPU processes give the single-process result ----------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import sys
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from convlens.callbacks.top_activations import TopActivations
    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.lenet import LeNet
    from convlens.models.module import ClassifierModule

    class CountImages(pl.Callback):
        seen = 0
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                self.seen += len(batch[0])

    if __name__ == "__main__":
        out, devices = sys.argv[1], int(sys.argv[2])
        torch.set_num_threads(1)
        pl.seed_everything(0, verbose=False)
        # lr = 0: the weights stay those of the seeded init, the same in both runs
        module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.0))
        # 80 val images in batches of 32: 3 batches for 2 ranks, so the sampler repeats one batch
        dm = ShapesDataModule(n_train=128, n_test=32, val_size=80, batch_size=32, eval_batch_size=32)
        cb, count = TopActivations(k=3, max_units=5), CountImages()
        trainer = pl.Trainer(strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices,
                             max_epochs=1, default_root_dir=out, logger=False, callbacks=[cb, count],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        seen = trainer.strategy.reduce(torch.tensor(float(count.seen)), reduce_op="sum")
        if trainer.is_global_zero:
            torch.save({{"result": {{l: t.state_dict() for l, t in cb.result.items()}}, "chosen": cb.chosen,
                        "seen": int(seen)}}, out + f"/top{{devices}}.pt")
        print("RANK", trainer.global_rank, "DONE")
""")


@pytest.mark.slow  # three interpreters (2 DDP ranks, then 1 process): ~15-30 s
def test_ddp_two_processes_equal_one_process(tmp_path):
    results = run_ddp_script(DDP_SCRIPT.format(), tmp_path, "top")
    ddp, single = results[2], results[1]
    assert ddp["seen"] > single["seen"] == 80      # the DDP ranks saw repeated images ...
    assert ddp["chosen"] == single["chosen"]
    for layer in LENET_CONVS:                      # ... and still agree with one process
        a, b = ddp["result"][layer], single["result"][layer]
        assert torch.equal(a["image_ids"], b["image_ids"]), layer
        assert torch.allclose(a["values"], b["values"], rtol=1e-5, atol=1e-6), layer
        assert torch.equal(a["positions"], b["positions"]), layer
        assert torch.equal(a["payload"].nan_to_num(-1), b["payload"].nan_to_num(-1)), layer
        assert (a["image_ids"] >= 0).all()
