"""DeconvProjection and FilterEvolution (callbacks/deconv.py, callbacks/evolution.py), and the base's
DDP behaviour.

Oracles: the drawn tiles are compared pixel by pixel with projections computed independently here
(`viz.deconvnet.project` on maps ranked by a forward hook, not by the callback's code path); the
weight-change scalars with ||W_e - W_{e-1}|| / ||W_{e-1}|| computed from per-epoch checkpoints;
event files (TensorBoard) and PNG files are read back from disk.
"""
from __future__ import annotations

import copy
import csv
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchvision.models.vgg import cfgs as vgg_cfgs, make_layers

import convlens.callbacks.deconv
from convlens.callbacks.deconv import DeconvProjection
from convlens.viz.layers import default_conv_layers
from convlens.callbacks.evolution import FilterEvolution
from convlens.render import MAX_GRID_WIDTH, columns_that_fit, scale_each, scale_symmetric, to_pixels, upscale
from conftest import FAST_SHAPES, compose_cfg, read_events
from convlens.datamodules.shapes import ShapesDataModule
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule
from convlens.train import train
from convlens.viz.deconvnet import Recording, project
from convlens.viz.layers import LayerError, eval_mode

LENET_CONVS = ["conv1", "conv2", "conv3", "conv4"]
PAD, CAPTION_H = 2, 12  # captioned_grid's default padding and caption band


# -- small builders ------------------------------------------------------------------------------

def tiny_datamodule() -> ShapesDataModule:
    return ShapesDataModule(n_train=192, n_test=64, val_size=64, batch_size=64)


def lenet_module() -> ClassifierModule:
    return ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def tiny_trainer(root: Path, callbacks, max_epochs: int = 1, logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs,
                      callbacks=callbacks, logger=logger, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, **kwargs)


def capture_images(callback) -> dict[str, torch.Tensor]:
    """Make `callback.log_image` record what it would log: {tag: [3, H, W]} (latest call wins)."""
    logged: dict[str, torch.Tensor] = {}
    callback.log_image = lambda trainer, tag, image: logged.__setitem__(tag, image.detach().clone())
    return logged


def tile(grid: torch.Tensor, index: int, nrow: int, hw: tuple[int, int], top: int = 0, left: int = 0,
         caption_h: int = CAPTION_H, rows: int | None = None) -> torch.Tensor:
    """Tile `index` of a captioned_grid ([3, H, W]), the tiles being `hw` pixels (after upscaling).
    With `rows` (the grid's row count), the caption height is read off the grid's height: class
    names too long for a tile take two caption lines."""
    r, c = divmod(index, nrow)
    th, tw = hw
    if rows is not None:
        caption_h = (grid.shape[-2] - top - PAD) // rows - th - PAD
    y = top + PAD + r * (th + PAD + caption_h)
    x = left + PAD + c * (tw + PAD)
    return grid[:, y:y + th, x:x + tw]


def as_drawn(x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """What a [C, h, w] tile in [0, 1] looks like in a grid: nearest-upscaled, 3 channels."""
    up = upscale(x[None].float(), tile_size)[0]
    return up.expand(3, -1, -1) if up.shape[0] == 1 else up


def assert_tile(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # the grid goes through uint8 (truncation): at most 1/255 below the float value
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1 / 255 + 1e-6


def conv_maps(net: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's output, by a plain forward hook (independent of viz.deconvnet's recording)."""
    out = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, a, o: out.setdefault("y", o.detach()))
    try:
        with torch.no_grad(), eval_mode(net):
            net(images)
    finally:
        handle.remove()
    return out["y"]


@pytest.fixture(scope="module")
def shapes_probe():
    dm = tiny_datamodule()
    dm.setup("fit")
    images, labels = dm.probe_batch()
    return dm, images, labels


def fake_trainer(dm, step: int = 0, val_acc: float | None = None):
    """What `visualize` reads of a trainer (the callbacks' logging is captured, not written)."""
    metrics = {} if val_acc is None else {"val/acc": torch.tensor(val_acc)}
    return SimpleNamespace(datamodule=dm, global_step=step, loggers=[], callback_metrics=metrics)


def fake_module(net: nn.Module):
    return SimpleNamespace(net=net, device=torch.device("cpu"))


# -- default layers ------------------------------------------------------------------------------

def test_default_layers():
    assert default_conv_layers(LeNet()) == LENET_CONVS
    assert default_conv_layers(CifarConvNet(c3=8, c4=8)) == LENET_CONVS
    # VGG16's layout (13 convs; its `features` as torchvision builds them, without the costly head):
    # each block's last conv, before its max pool
    vgg = nn.Module()
    vgg.features = make_layers(vgg_cfgs["D"])
    assert default_conv_layers(vgg) == ["features.2", "features.7", "features.14", "features.21", "features.28"]


# -- the drawn tiles are the projections (oracle: independent ranking + project) ----------------

def test_deconv_grid_tiles_are_the_projections_of_the_top_maps(shapes_probe):
    dm, images, labels = shapes_probe
    torch.manual_seed(0)
    net = LeNet()
    cb = DeconvProjection(k=3, deconv_max=False, tile_size=56, precision="float32")
    cb.setup(None, fake_module(net), "fit")
    cb.probe_images, cb.probe_labels = images, labels
    logged = capture_images(cb)
    net.train()
    cb.visualize(fake_trainer(dm), fake_module(net))
    assert all(m.training for m in net.modules())  # the callback leaves the training mode alone
    assert set(logged) == {f"deconv/{layer}" for layer in LENET_CONVS}
    hw = (56, 56)  # 28 x 28 upscaled twice
    pixels = to_pixels(images, dm.normalization)
    for layer in ["conv2", "conv3"]:
        grid = logged[f"deconv/{layer}"]
        maxima = conv_maps(net, images, layer).amax(dim=(2, 3))
        for n in [0, 7]:
            assert_tile(tile(grid, n * 4, 4, hw, rows=len(images)), as_drawn(pixels[n], 56))
            top = maxima[n].argsort(descending=True)[:3]
            for j, c in enumerate(top.tolist()):
                expected = scale_each(project(net, images[n:n + 1], layer, c))[0]
                assert_tile(tile(grid, n * 4 + 1 + j, 4, hw, rows=len(images)), as_drawn(expected, 56))
            # the comparison discriminates: another map's projection is not what is drawn
            other = int(maxima[n].argsort()[0])
            wrong = as_drawn(scale_each(project(net, images[n:n + 1], layer, other))[0], 56)
            assert (tile(grid, n * 4 + 1, 4, hw, rows=len(images)) - wrong).abs().max() > 0.1


def test_deconv_max_tiles_are_each_maps_most_activating_image(shapes_probe):
    dm, _, _ = shapes_probe
    torch.manual_seed(1)
    net = LeNet()
    images, labels = dm.normalization(dm.val_set.images[:40]), dm.val_set.labels[:40]
    cb = DeconvProjection(layers=["conv2"], deconv_max=True, max_units=6, val_images=32, tile_size=56,
                          precision="float32")
    cb.setup(None, fake_module(net), "fit")
    cb.probe_images, cb.probe_labels = images[:2], labels[:2]
    # validation batches arrive through the hook: only batch `val_batch_index` (0) is kept, cut to 32
    cb.on_validation_batch_end(None, None, None, (images, labels), 0)
    cb.on_validation_batch_end(None, None, None, (images.flip(0), labels.flip(0)), 1)
    logged = capture_images(cb)
    cb.visualize(fake_trainer(dm), fake_module(net))
    grid = logged["deconv_max/conv2"]
    batch = images[:32]
    maps = conv_maps(net, batch, "conv2")                       # [32, 50, h, w]
    per_image = maps.amax(dim=(2, 3))                           # [32, 50]
    best_value, best_image = per_image.max(dim=0)               # per map
    ranked = best_value.argsort(descending=True)[:6]
    pixels = to_pixels(batch, dm.normalization)
    # the 6 pairs wrap onto rows no wider than render.MAX_GRID_WIDTH
    ncol = columns_that_fit(56, 12, group=2)
    rows = -(-12 // ncol)
    assert ncol < 12 and grid.shape[-1] <= MAX_GRID_WIDTH
    for j, c in enumerate(ranked.tolist()):
        i = int(best_image[c])
        assert_tile(tile(grid, 2 * j, ncol, (56, 56), rows=rows), as_drawn(pixels[i], 56))
        expected = scale_each(project(net, batch[i:i + 1], "conv2", c))[0]
        assert_tile(tile(grid, 2 * j + 1, ncol, (56, 56), rows=rows), as_drawn(expected, 56))


def test_precision_auto_runs_the_fast_dtype_and_draws_what_float32_draws(shapes_probe, monkeypatch):
    # "auto" asks viz.deconvnet.fast_dtype for the device (bfloat16 here, as on an AMX CPU or a
    # recent GPU); both drawings (deconv and deconv_max) must match float32's to a few gray levels
    dm, images, labels = shapes_probe
    monkeypatch.setattr(convlens.callbacks.deconv, "fast_dtype", lambda device: torch.bfloat16)
    dtypes = []
    reverse = Recording._reverse

    def spy(self, sample, channel, unpool, dtype=None, *rest):
        dtypes.append(dtype)
        return reverse(self, sample, channel, unpool, dtype, *rest)

    monkeypatch.setattr(Recording, "_reverse", spy)
    torch.manual_seed(0)
    net = LeNet()
    drawn = {}
    for precision in ("auto", "float32"):
        cb = DeconvProjection(k=3, max_units=6, val_images=32, tile_size=28, precision=precision)
        cb.setup(None, fake_module(net), "fit")
        cb.probe_images, cb.probe_labels = images, labels
        cb.on_validation_batch_end(None, None, None, (images, labels), 0)
        drawn[precision] = capture_images(cb)
        cb.visualize(fake_trainer(dm), fake_module(net))
    assert dtypes == [torch.bfloat16] * 8 + [None] * 8  # 4 layers x (deconv, deconv_max)
    assert set(drawn["auto"]) == set(drawn["float32"]) and len(drawn["auto"]) == 8
    for tag, grid in drawn["auto"].items():
        diff = (grid - drawn["float32"][tag]).abs()
        assert diff.max() <= 4 / 255 + 1e-6, tag
        assert diff.mean() < 0.5 / 255, tag


def test_evolution_tiles_weights_and_summary(shapes_probe):
    dm, images, labels = shapes_probe
    torch.manual_seed(2)
    net = LeNet()
    cb = FilterEvolution(units={"conv3": 7}, probe_index=2, tile_size=56)
    cb.setup(None, fake_module(net), "fit")
    cb.probe_images, cb.probe_labels = images, labels
    cb._previous_weights = {layer: dict(net.named_modules())[layer].weight.detach().clone() for layer in cb.layers}
    before = net.conv2.weight.detach().clone()
    with torch.no_grad():
        net.conv2.weight.add_(0.01 * torch.randn_like(before))
    logged, scalars = capture_images(cb), {}
    cb.log_scalars = lambda trainer, values: scalars.update(values)
    cb.visualize(fake_trainer(dm, step=5, val_acc=0.5), fake_module(net))
    expected_change = ((net.conv2.weight.detach().double() - before.double()).norm() / before.double().norm()).item()
    assert scalars == {"evolution_weight_change/conv1": 0.0,
                       "evolution_weight_change/conv2": pytest.approx(expected_change, rel=1e-12),
                       "evolution_weight_change/conv3": 0.0, "evolution_weight_change/conv4": 0.0}
    assert expected_change > 1e-3
    image = images[2:3]
    maxima = conv_maps(net, image, "conv1").amax(dim=(2, 3))[0]
    expected_maps = {"conv1": int(maxima.argmax()), "conv3": 7}
    assert {k: cb.chosen[k] for k in expected_maps} == expected_maps
    for layer, c in expected_maps.items():
        drawn = logged[f"evolution/{layer}"]
        assert_tile(tile(drawn, 0, 2, (56, 56), rows=1), as_drawn(to_pixels(image, dm.normalization)[0], 56))
        assert_tile(tile(drawn, 1, 2, (56, 56), rows=1), as_drawn(scale_each(project(net, image, layer, c))[0], 56))
    # first conv's filters: 20 of 1x5x5, symmetric scaling, 5 per row, upscaled 8x to 40 px
    weights = logged["evolution/weights_conv1"]
    w = net.conv1.weight.detach()
    for i in [0, 13]:
        assert_tile(tile(weights, i, 5, (40, 40)), as_drawn(scale_symmetric(w[i:i + 1])[0], 40))
    # the summary: rows = layers, columns = input + this epoch; the epoch's tile is the same projection
    cb.history[-1]["epoch"] = 1
    summary = cb.summary_image(to_pixels(image, dm.normalization))
    left = 8 + 6 * max(len(f"{layer} #{cb.tracked_unit(layer)}") for layer in cb.layers)
    expected = as_drawn(scale_each(project(net, image, "conv3", 7))[0], 56)
    assert_tile(tile(summary, 2 * 2 + 1, 2, (56, 56), top=14, left=left, caption_h=0), expected)


# -- end to end: TensorBoard events, PNG fallback, weight change, resume, fast_dev_run ------------

@pytest.mark.slow
def test_two_epoch_shapes_run_logs_every_tag_each_epoch(tmp_path):
    # FAST_SHAPES, smaller still, with this file's two callbacks (and checkpointing) as the only ones
    smaller = {"datamodule.n_train": 320, "datamodule.val_size": 64, "datamodule.n_test": 64}
    overrides = [o for o in FAST_SHAPES if "rich_progress_bar" not in o and o.split("=")[0] not in smaller]
    cfg = compose_cfg(overrides + [f"{k}={v}" for k, v in smaller.items()] + [
        "callbacks=[model_checkpoint,deconv,evolution]", "test=false",
        "callbacks.deconv.val_images=16", "callbacks.deconv.max_units=8"], tmp_path)
    train(cfg)
    events = read_events(tmp_path / "tensorboard")
    dm = cfg.datamodule
    per_epoch = math.ceil((dm.n_train - dm.val_size) / dm.batch_size)
    # each epoch's images land on the step of its validation scalars (Lightning: global_step - 1)
    steps = [per_epoch - 1, 2 * per_epoch - 1]
    assert sorted(events["scalars"]["val/acc"]) == steps
    expected = [f"{kind}/{layer}" for kind in ("deconv", "deconv_max", "evolution") for layer in LENET_CONVS]
    for tag in expected + ["evolution/weights_conv1"]:
        assert sorted(events["images"].get(tag, [])) == sorted(steps), f"{tag}: {events['images'].get(tag)}"
    for tag in [f"evolution_weight_change/{layer}" for layer in LENET_CONVS] + ["viz_time/deconv",
                                                                      "viz_time/evolution"]:
        assert sorted(events["scalars"].get(tag, [])) == sorted(steps), tag
    assert events["images"]["evolution/summary"] == [max(steps)]


@pytest.fixture(scope="module")
def png_run(tmp_path_factory):
    """2 epochs without a logger (PNG/CSV fallback), a checkpoint per epoch and the initial weights."""
    root = tmp_path_factory.mktemp("png_run")
    torch.manual_seed(3)
    module = lenet_module()
    initial = copy.deepcopy(module.net.state_dict())
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    callbacks = [ckpt, DeconvProjection(num_probe=3, max_units=4, val_images=16), FilterEvolution(num_probe=3)]
    trainer = tiny_trainer(root, callbacks, max_epochs=2)
    trainer.fit(module, datamodule=tiny_datamodule())
    return root, initial, trainer


@pytest.mark.slow
def test_png_fallback_without_tensorboard(png_run):
    root, _, trainer = png_run
    viz = root / "viz"
    steps = [trainer.global_step // 2 - 1, trainer.global_step - 1]  # the epochs' validation steps
    for tag in [f"deconv/{layer}" for layer in LENET_CONVS] + ["deconv_max/conv1", "evolution/conv4",
                                                                "evolution/weights_conv1"]:
        assert sorted(p.name for p in (viz / tag).glob("*.png")) == [f"step{s:07d}.png" for s in steps], tag
    assert [p.name for p in (viz / "evolution" / "summary").glob("*.png")] == [f"step{steps[1]:07d}.png"]


def test_weight_change_equals_change_between_checkpoints(png_run):
    root, initial, _ = png_run
    with (root / "viz" / "scalars.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["tag"].startswith("evolution_weight_change/")]
    logged = {(r["tag"].split("/")[1], int(r["step"])): float(r["value"]) for r in rows}
    states = [initial] + [{k[len("net."):]: v for k, v in
                           torch.load(root / "ckpt" / f"epoch={e}.ckpt", weights_only=False)["state_dict"].items()
                           if k.startswith("net.")} for e in (0, 1)]
    steps = sorted({s for _, s in logged})
    assert len(steps) == 2 and set(logged) == {(layer, s) for layer in LENET_CONVS for s in steps}
    for e, step in enumerate(steps):
        for layer in LENET_CONVS:
            before, after = states[e][f"{layer}.weight"].double(), states[e + 1][f"{layer}.weight"].double()
            expected = ((after - before).norm() / before.norm()).item()
            assert expected > 0
            assert logged[(layer, step)] == pytest.approx(expected, rel=1e-9)


def test_resume_keeps_probe_images_filter_choice_and_history(tmp_path):
    torch.manual_seed(4)
    make = lambda seed: [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),  # noqa: E731
                         DeconvProjection(num_probe=3, probe_seed=seed, deconv_max=False),
                         FilterEvolution(num_probe=3, probe_seed=seed)]
    first = make(seed=0)
    tiny_trainer(tmp_path, first, max_epochs=1).fit(lenet_module(), datamodule=tiny_datamodule())
    deconv1, evo1 = first[1], first[2]
    assert evo1.history and set(evo1.chosen) == set(LENET_CONVS)

    # Tamper with one stored choice: conv1's map becomes the one the probe image activates LEAST, which
    # a fresh choice at epoch 2 would not pick; the resumed run must track it anyway.
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = ckpt["callbacks"][evo1.state_key]
    net = LeNet()
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    least = int(conv_maps(net, evo1.probe_images[:1], "conv1").amax(dim=(2, 3))[0].argmin())
    assert least != evo1.chosen["conv1"]
    state["tracked_units"]["conv1"] = least
    torch.save(ckpt, tmp_path / "resume.ckpt")

    second = make(seed=1)  # a fresh selection with seed 1 would pick other probe images
    deconv2, evo2 = second[1], second[2]
    fresh = torch.randperm(10, generator=torch.Generator().manual_seed(1))[:3].sort().values
    kept = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:3].sort().values
    assert not torch.equal(fresh, kept)
    logged = capture_images(evo2)
    tiny_trainer(tmp_path, second, max_epochs=2).fit(lenet_module(), datamodule=tiny_datamodule(),
                                                     ckpt_path=tmp_path / "resume.ckpt")
    assert torch.equal(deconv2.probe_images, deconv1.probe_images)
    assert torch.equal(evo2.probe_images, evo1.probe_images)
    assert evo2.chosen == {**evo1.chosen, "conv1": least}
    assert [e["epoch"] for e in evo2.history] == [1, 2]
    for layer in LENET_CONVS:
        assert torch.equal(evo2.history[0]["tiles"][layer], evo1.history[0]["tiles"][layer])
    assert "evolution/summary" in logged and "evolution/conv1" in logged


def test_fast_dev_run_logs_nothing(tmp_path):
    callbacks = [DeconvProjection(num_probe=2, max_units=4), FilterEvolution(num_probe=2)]
    logged = [capture_images(cb) for cb in callbacks]
    trainer = tiny_trainer(tmp_path, callbacks, logger=TensorBoardLogger(tmp_path, name="tb"), fast_dev_run=True)
    trainer.fit(lenet_module(), datamodule=tiny_datamodule())
    assert logged == [{}, {}]
    assert not (tmp_path / "viz").exists()
    assert not any(read_events(tmp_path)["images"].values())


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs, match", [
    (DeconvProjection, {"k": 0}, "k .*>= 1"),
    (DeconvProjection, {"k": True}, "k .*int"),
    (DeconvProjection, {"unpool": "nearest"}, "unpool.*switches.*fill"),
    (DeconvProjection, {"max_units": 0}, "max_units"),
    (DeconvProjection, {"max_units_by": "random"}, "max_units_by.*activation.*index"),
    (DeconvProjection, {"val_batch_index": -1}, "val_batch_index"),
    (DeconvProjection, {"val_images": 0}, "val_images"),
    (DeconvProjection, {"deconv_max": "yes"}, "deconv_max"),
    (DeconvProjection, {"precision": "fp16"}, "precision.*auto, float32, bfloat16"),
    (DeconvProjection, {"every_n_epochs": -1}, "every_n_epochs"),
    (FilterEvolution, {"units": [3]}, "units must map"),
    (FilterEvolution, {"units": {"conv1": -2}}, "units\\['conv1'\\]"),
    (FilterEvolution, {"units": {"conv1": 1.5}}, "units\\['conv1'\\]"),
    (FilterEvolution, {"probe_index": -1}, "probe_index"),
    (FilterEvolution, {"unpool": "bilinear"}, "unpool"),
    (FilterEvolution, {"summary_max_epochs": 0}, "summary_max_epochs"),
    (FilterEvolution, {"weights_layer": 3}, "weights_layer"),
])
def test_bad_constructor_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (DeconvProjection, {"layers": ["conv9"]}, LayerError, "Unknown layer 'conv9'.*conv1, conv2, conv3, conv4"),
    (DeconvProjection, {"layers": ["relu3"]}, LayerError, "relu3.*ReLU.*conv1, conv2, conv3, conv4"),
    (FilterEvolution, {"layers": ["conv1", "convX"]}, LayerError, "convX.*conv1, conv2, conv3, conv4"),
    (FilterEvolution, {"units": {"conv7": 1}}, LayerError, "conv7.*Tracked layers: conv1, conv2, conv3, conv4"),
    (FilterEvolution, {"units": {"conv2": 50}}, ValueError, "conv2 has 50 units.*0..49"),
    (FilterEvolution, {"weights_layer": "pool1"}, LayerError, "pool1.*MaxPool2d.*conv1"),
])
def test_bad_layers_fail_at_setup_with_valid_names(tmp_path, cls, kwargs, error, match):
    module = lenet_module()
    trainer = tiny_trainer(tmp_path, [cls(**kwargs)])
    with pytest.raises(error, match=match):
        trainer.fit(module, datamodule=tiny_datamodule())
    assert trainer.global_step == 0  # raised before any training step


def test_probe_index_beyond_probe_set_fails_at_fit_start(tmp_path):
    trainer = tiny_trainer(tmp_path, [FilterEvolution(num_probe=2, probe_index=2)])
    with pytest.raises(ValueError, match="probe_index=2.*only 2 probe images"):
        trainer.fit(lenet_module(), datamodule=tiny_datamodule())
    assert trainer.global_step == 0


@pytest.mark.parametrize("cls", [DeconvProjection, FilterEvolution])
def test_model_with_a_gelu_is_drawn(tmp_path, cls):
    # a GELU gets its ordinary gradient (as Captum), so the callbacks draw every conv
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 4, 3), act=nn.GELU(), conv2=nn.Conv2d(4, 4, 3),
                                    pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, 10)))
    module = ClassifierModule(net, optimizer=partial(torch.optim.SGD, lr=0.01))
    cb = cls(num_probe=2)
    logged = capture_images(cb)
    trainer = tiny_trainer(tmp_path, [cb])
    trainer.fit(module, datamodule=tiny_datamodule())
    assert {f"{cb.name}/conv1", f"{cb.name}/conv2"} <= set(logged)


def test_no_validation_batch_warns_and_skips_deconv_max(tmp_path):
    cb = DeconvProjection(num_probe=2, k=1)
    logged = capture_images(cb)
    trainer = tiny_trainer(tmp_path, [cb], limit_val_batches=0)
    with pytest.warns(UserWarning, match="no validation batch #0"):
        trainer.fit(lenet_module(), datamodule=tiny_datamodule())
    assert set(logged) == {f"deconv/{layer}" for layer in LENET_CONVS}


# -- DDP: each image logged once per epoch, from rank zero -----------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import sys
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from convlens.callbacks.deconv import DeconvProjection
    from convlens.callbacks.evolution import FilterEvolution
    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.lenet import LeNet
    from convlens.models.module import ClassifierModule

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.set_num_threads(1)
        pl.seed_everything(0, verbose=False)
        module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
        dm = ShapesDataModule(n_train=256, n_test=64, val_size=64, batch_size=32)
        callbacks = [DeconvProjection(num_probe=3, max_units=4, val_images=16), FilterEvolution(num_probe=3)]
        drawn = []  # what this process drew (TensorBoard on rank 1 would swallow it silently)
        for cb in callbacks:
            cb.visualize = (lambda f, name: lambda *a: (drawn.append(name), f(*a)))(cb.visualize, cb.name)
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2,
                             default_root_dir=out, logger=TensorBoardLogger(out, name="tb", version=""),
                             callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, log_every_n_steps=1)
        trainer.fit(module, datamodule=dm)
        print("GLOBAL_STEP", trainer.global_step, "RANK", trainer.global_rank, "DREW", len(drawn))
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes_log_each_image_once_per_epoch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # both processes trained; only rank zero drew (2 callbacks x 2 epochs)
    assert "RANK 0 DREW 4" in proc.stdout and "RANK 1 DREW 0" in proc.stdout, proc.stdout[-2000:]
    events = read_events(out / "tb")
    images = events["images"]
    # (256 - 64 val) images / 2 ranks / batch 32 = 3 steps per epoch: epochs end at steps 3 and 6,
    # their validation scalars (and so the callbacks' images) are logged at steps 2 and 5
    assert "GLOBAL_STEP 6 RANK 0" in proc.stdout
    assert set(images) >= {"deconv/conv1", "deconv_max/conv4", "evolution/conv2", "evolution/weights_conv1",
                           "evolution/summary"}
    for tag, steps in images.items():
        expected = [5] if tag == "evolution/summary" else [2, 5]
        assert sorted(steps) == expected, f"{tag}: {steps}"
    for layer in LENET_CONVS:
        assert sorted(events["scalars"][f"evolution_weight_change/{layer}"]) == [2, 5]
    assert not (out / "viz").exists()  # no PNG fallback written by the other rank
