"""Feature visualization by optimization (`viz.feature_visualization`, callback `FeatureVisualization`).

Oracles: the Fourier image against a naive inverse DFT written out as a sum of waves; the colour
square root against numpy's covariance; the transforms against shifts by slicing; the optimum of a
known linear filter under a norm constraint (Lagrange form: x* = gray + w / (2 l2)); a batch
against its units optimized one at a time; real validation images (a synthesized image must beat
the best of them, on trained nets); the model's hook dicts, modes and grad flags before and after.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import convlens.callbacks.feature_viz as feature_viz_module
from conftest import NetModule
from convlens.callbacks import FeatureVisualization, TopActivations
from convlens.callbacks.display import Normalization
from convlens.callbacks.feature_viz import _thin
from convlens.errors import ConfigError, ConvlensError
from convlens.events import read_events
from convlens.viz.feature_visualization import (FOURIER_GAIN, IMAGENET_COLOR_SQRT, FeatureVizError, Transforms,
                                                 _gram_diversity, color_sqrt, fourier_image, fourier_scale,
                                                 measure_units, optimize_units, random_coefficients, transform_images,
                                                 transforms_for, unit_objective, visualize_units)
from convlens.viz.layers import LayerError, layer_maxima, rank_units

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def small_net(channels: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(channels, 6, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(8 * 4 * 4, 4)))


def linear_filter_net(filters: torch.Tensor) -> nn.Sequential:
    """One conv whose kernel covers the whole image: unit u's output is <filters[u], x> + b[u]."""
    conv = nn.Conv2d(filters.shape[1], filters.shape[0], filters.shape[-1])
    with torch.no_grad():
        conv.weight.copy_(filters)
    return nn.Sequential(OrderedDict(conv=conv))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# -- parameterization ------------------------------------------------------------------------------

def naive_inverse(coefficients: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The real image of a half spectrum [h, w//2+1] (complex), as a sum of waves: the missing half
    is the conjugate mirror, the orthonormal 1/sqrt(hw), in float64, one pixel at a time."""
    full = torch.zeros(h, w, dtype=torch.complex128)
    half = w // 2 + 1
    for ky in range(h):
        for kx in range(w):
            full[ky, kx] = coefficients[ky, kx] if kx < half else coefficients[(-ky) % h, w - kx].conj()
    out = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            total = 0j
            for ky in range(h):
                for kx in range(w):
                    total += complex(full[ky, kx]) * complex(math.cos(2 * math.pi * (ky * y / h + kx * x / w)),
                                                             math.sin(2 * math.pi * (ky * y / h + kx * x / w)))
            out[y, x] = total.real / math.sqrt(h * w)
    return out


@pytest.mark.parametrize("h,w", [(4, 6), (5, 5)])
def test_fourier_image_is_the_scaled_inverse_dft_through_colour_and_sigmoid(h, w):
    g = torch.Generator().manual_seed(1)
    coefficients = torch.randn(2, 3, h, w // 2 + 1, 2, generator=g) * 0.1
    color = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.6, -0.2], [0.3, 0.0, 0.4]])
    pixels = fourier_image(coefficients, h, w, decay_power=1.0, color=color, squash="sigmoid")
    clipped = fourier_image(coefficients, h, w, decay_power=1.0, color=color, squash="clip")
    scale = fourier_scale(h, w).double()
    for n in range(2):
        waves = torch.stack([naive_inverse(torch.view_as_complex(coefficients[n, c].double()) * scale, h, w)
                             for c in range(3)]) * math.sqrt(h * w) * FOURIER_GAIN
        mixed = torch.einsum("ij,jhw->ihw", color.double(), waves)
        torch.testing.assert_close(pixels[n].double(), torch.sigmoid(mixed), atol=1e-6, rtol=0)
        torch.testing.assert_close(clipped[n].double(), (mixed + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    gray = fourier_image(coefficients[:, :1], h, w, squash="sigmoid")  # one channel: no colour mixing
    wave = naive_inverse(torch.view_as_complex(coefficients[0, 0].double()) * scale, h, w)
    torch.testing.assert_close(gray[0, 0].double(), torch.sigmoid(wave * math.sqrt(h * w) * FOURIER_GAIN),
                               atol=1e-6, rtol=0)


def test_clip_passes_the_gradient_that_leads_back_into_the_range():
    x = torch.tensor([-0.7, -0.7, 0.2, 0.7, 0.7], requires_grad=True)   # pixels -0.2, -0.2, 0.7, 1.2, 1.2
    pixels = fourier_image.__globals__["_ClipToBox"].apply(x)
    torch.testing.assert_close(pixels, torch.tensor([0.0, 0.0, 0.7, 1.0, 1.0]))
    (grad,) = torch.autograd.grad(pixels, x, torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0]))
    # a descent step moves a pixel by -grad: up from below the range, down from above it
    torch.testing.assert_close(grad, torch.tensor([-1.0, 0.0, 1.0, 1.0, 0.0]))


def test_fourier_scale_by_hand():
    # 4 x 4: frequencies 0, 1/4, 1/2 (rows also -1/4); the constant gets the lowest nonzero one's weight
    s = fourier_scale(4, 4)
    assert s.shape == (4, 3)
    assert s[0, 0] == pytest.approx(4) and s[0, 1] == pytest.approx(4) and s[0, 2] == pytest.approx(2)
    assert s[1, 1] == pytest.approx(1 / math.hypot(0.25, 0.25)) and s[3, 2] == pytest.approx(1 / math.hypot(.25, .5))
    assert torch.equal(fourier_scale(4, 4, decay_power=0.0), torch.ones(4, 3))


def test_colour_square_root_against_numpy_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.3, 0.0], [0.6, 0.2, 0.4]])
    pixels = torch.einsum("ij,njhw->nihw", mix, torch.rand(4, 3, 8, 8, generator=g))
    root = color_sqrt(pixels).double()
    cov = np.cov(pixels.permute(1, 0, 2, 3).reshape(3, -1).double().numpy())
    product = (root @ root.T).numpy()
    ratio = product[0, 0] / cov[0, 0]   # the root is scaled so that its largest column has norm 1
    np.testing.assert_allclose(product, cov * ratio, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(root, root.T)                            # the symmetric root
    assert root.norm(dim=0).max().item() == pytest.approx(1.0)
    lucid = torch.tensor(IMAGENET_COLOR_SQRT)
    torch.testing.assert_close(color_sqrt(None), lucid / lucid.norm(dim=0).max())
    assert torch.equal(color_sqrt(torch.full((1, 3, 4, 4), 0.5)), torch.eye(3))  # flat images: plain RGB


# -- transforms ------------------------------------------------------------------------------------

def test_transforms_are_sized_to_the_image():
    # Lucent's pixel sizes at 224 (pad 12, shifts +-4, +-2) times side / 224, shifts at least 1 px
    assert transforms_for(28, 28) == Transforms(pad=2, jitter=1, scale=0.1, angle=10.0, jitter2=1)
    assert transforms_for(32, 32) == Transforms(pad=2, jitter=1, scale=0.1, angle=10.0, jitter2=1)
    assert transforms_for(224, 224) == Transforms(pad=12, jitter=4, scale=0.1, angle=10.0, jitter2=2)
    assert transforms_for(112, 300).jitter == 2  # the shorter side


def test_transforms_identity_and_integer_shifts_with_gray_fill():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 9, generator=g)
    t = Transforms(pad=3, jitter=2, scale=0.1, angle=10.0, jitter2=1)
    middle = torch.full((2, 6), 0.5)  # no shift, scale 1, angle 0
    torch.testing.assert_close(transform_images(x, t, middle), x, atol=1e-5, rtol=0)
    draws = middle.clone()
    draws[0, 0] = 0.99          # image 0: first shift +2 px in x: output column c reads column c + 2
    draws[1, 5] = 0.0           # image 1: second shift -1 px in y: output row r reads row r - 1
    out = transform_images(x, t, draws)
    expected = torch.full_like(x, 0.5)
    expected[0, :, :, :-2] = x[0, :, :, 2:]
    expected[1, :, 1:, :] = x[1, :, :-1, :]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # Lucent's growing canvas: side + 2 (pad - jitter - jitter2), the image in its centre
    grown = transform_images(x, t, middle, keep_size=False)
    assert grown.shape[-2:] == (7, 9) and torch.allclose(grown, x, atol=1e-5)
    t4 = Transforms(pad=4, jitter=1, scale=0.1, angle=10.0, jitter2=1)
    grown = transform_images(x, t4, middle, keep_size=False)
    assert grown.shape[-2:] == (11, 13)
    torch.testing.assert_close(grown[:, :, 2:-2, 2:-2], x, atol=1e-5, rtol=0)
    assert torch.allclose(grown[:, :, :2], torch.tensor(0.5))


# -- objectives ------------------------------------------------------------------------------------

def test_unit_objectives_by_hand():
    maps = torch.arange(2 * 3 * 3 * 4, dtype=torch.float32).view(2, 3, 3, 4)
    units = torch.tensor([2, 0])
    channel = torch.stack([maps[0, 2].mean(), maps[1, 0].mean()])
    torch.testing.assert_close(unit_objective(maps, units, "channel"), channel)
    neuron = torch.stack([maps[0, 2, 1, 2], maps[1, 0, 1, 2]])  # the centre of a 3 x 4 map: row 1, column 2
    torch.testing.assert_close(unit_objective(maps, units, "neuron"), neuron)


def test_diversity_term_against_a_loop():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, 3, 2, 2, generator=g)
    units = torch.tensor([1, 1, 2, 1])
    got = _gram_diversity(maps, units)
    grams = [(m.flatten(1) @ m.flatten(1).T).flatten() for m in maps]
    for i in range(4):
        others = [j for j in range(4) if j != i and units[j] == units[i]]
        want = sum(float(F.cosine_similarity(grams[i], grams[j], dim=0)) for j in others) / max(len(others), 1)
        assert got[i].item() == pytest.approx(want, abs=1e-5)
    assert got[2].item() == 0.0  # alone with its unit


# -- the optimization ------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_a_linear_filter_optimum_is_its_pattern(channels):
    """Unit u computes <w_u, input> (+ b). Under a norm constraint (Lagrange form: minus l2 times the
    squared distance from gray), the optimum is gray + w_u / (2 l2) in the input; with a
    normalization (x - m) / s the display-space optimum is gray + (w_u / s) / (2 l2). Both a random
    and a smooth filter, through the grayscale path and the decorrelated-colour path."""
    side, l2 = 12, 4.0
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(side) - 5.5, torch.arange(side) - 5.5, indexing="ij")
    smooth = torch.cos(0.5 * xx + 0.3 * yy) * torch.exp(-(xx ** 2 + yy ** 2) / 30)
    filters = torch.stack([torch.randn(channels, side, side, generator=g), smooth.expand(channels, -1, -1)])
    filters = filters / filters.abs().amax(dim=(1, 2, 3), keepdim=True)    # the optimum stays inside (0, 1)
    std = torch.linspace(0.5, 1.0, channels).view(channels, 1, 1)
    normalization = Normalization(torch.full((channels,), 0.4), std.flatten())
    result = optimize_units(linear_filter_net(filters), "conv", [0, 1], (channels, side, side), steps=400, l2=l2,
                            transforms=None, pixel_to_input=normalization)
    pixels = normalization.inverse(result.images)
    for u in range(2):
        target = filters[u] / std / (2 * l2)
        assert correlation(pixels[u] - 0.5, target) >= 0.99
        torch.testing.assert_close(pixels[u] - 0.5, target, atol=0.02, rtol=0)
    assert (result.objectives > result.start).all()


def test_final_objective_beats_the_start_and_the_objective_grows():
    net = small_net()
    result = optimize_units(net, "conv2", [0, 3, 5, 7], (3, 16, 16), steps=64)
    assert (result.objectives >= result.start).all()
    assert (result.trace[-8:].mean(0) > result.trace[:8].mean(0)).all()  # through the transforms too
    # the images are what the net was fed: measuring them again gives the objectives
    torch.testing.assert_close(measure_units(net, result.images, "conv2", [0, 3, 5, 7]), result.objectives)


def test_a_batch_equals_its_units_one_at_a_time_in_one_forward_per_step():
    net = small_net()
    calls = []
    handle = net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        batch = optimize_units(net, "conv2", [1, 4, 6], (3, 16, 16), steps=12, seed=10)
    finally:
        handle.remove()
    assert calls == [3] * (12 + 2)  # the start, one per step, the end: all three units together
    assert torch.equal(random_coefficients([10, 11], 3, 16, 16)[1], random_coefficients([11], 3, 16, 16)[0])
    for i, unit in enumerate([1, 4, 6]):
        alone = optimize_units(net, "conv2", [unit], (3, 16, 16), steps=12, seed=10 + i)
        torch.testing.assert_close(alone.images[0], batch.images[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.objectives[0], batch.objectives[i], atol=1e-5, rtol=1e-5)


def test_deterministic_on_the_cpu():
    net = small_net()
    a = visualize_units(net, "conv1", [0, 2], (3, 16, 16), steps=10, seed=5)
    b = visualize_units(net, "conv1", [0, 2], (3, 16, 16), steps=10, seed=5)
    c = visualize_units(net, "conv1", [0, 2], (3, 16, 16), steps=10, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_warm_start_goes_on_from_the_coefficients():
    net = small_net()
    first = optimize_units(net, "conv2", [0, 1], (3, 16, 16), steps=16, transforms=None)
    on = optimize_units(net, "conv2", [0, 1], (3, 16, 16), steps=0, init=first.coefficients)
    torch.testing.assert_close(on.images, first.images)  # zero steps from a warm start: the same images
    more = optimize_units(net, "conv2", [0, 1], (3, 16, 16), steps=16, transforms=None, init=first.coefficients)
    torch.testing.assert_close(more.start, first.objectives)
    assert (more.objectives > first.objectives).all()


def test_carried_optimizer_state_makes_two_calls_one_optimization():
    """Oracle: one run of 20 steps. 8 steps, then 12 more from its coefficients and Adam state, are
    that run step for step (no transforms, same model); a fresh Adam on the same coefficients is not."""
    net, shape = small_net(), (3, 16, 16)
    one = optimize_units(net, "conv2", [0, 1], shape, steps=20, transforms=None)
    first = optimize_units(net, "conv2", [0, 1], shape, steps=8, transforms=None)
    assert first.optimizer_state["step"] == 8
    on = optimize_units(net, "conv2", [0, 1], shape, steps=12, transforms=None, init=first.coefficients,
                        optimizer_state=first.optimizer_state)
    torch.testing.assert_close(on.coefficients, one.coefficients, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(on.optimizer_state["exp_avg_sq"], one.optimizer_state["exp_avg_sq"])
    assert on.optimizer_state["step"] == 20
    fresh = optimize_units(net, "conv2", [0, 1], shape, steps=12, transforms=None, init=first.coefficients)
    assert (fresh.coefficients - one.coefficients).abs().max() > 1e-3
    # the caller's state is not changed by the call; zero steps hand it back as it was
    torch.testing.assert_close(first.optimizer_state["exp_avg"], optimize_units(
        net, "conv2", [0, 1], shape, steps=0, init=first.coefficients,
        optimizer_state=first.optimizer_state).optimizer_state["exp_avg"])
    assert optimize_units(net, "conv2", [0, 1], shape, steps=0).optimizer_state is None


def test_grayscale_and_rgb_paths():
    gray = optimize_units(small_net(1), "conv2", [0, 1], (1, 28, 28), steps=24)
    assert gray.images.shape == (2, 1, 28, 28) and gray.coefficients.shape == (2, 1, 28, 15, 2)
    assert (gray.images.flatten(1).std(1) > 0.01).all()  # not blank (Lucent #29)
    assert (gray.objectives > gray.start).all()
    rgb = optimize_units(small_net(3), "conv2", [0, 1], (3, 16, 16), steps=24, color=color_sqrt(None))
    assert rgb.images.shape == (2, 3, 16, 16)
    assert (rgb.images[:, 0] - rgb.images[:, 2]).abs().mean() > 1e-3  # channels differ: colour, not gray
    plain = optimize_units(small_net(3), "conv2", [0, 1], (3, 16, 16), steps=24, color=None)
    assert not torch.allclose(plain.images, rgb.images)


def test_neuron_objective_and_diversity():
    net = small_net()
    neuron = optimize_units(net, "conv2", [2], (3, 16, 16), steps=24, objective="neuron")
    assert neuron.objectives[0] > neuron.start[0]
    same = optimize_units(net, "conv1", [3, 3, 3], (3, 16, 16), steps=32)
    diverse = optimize_units(net, "conv1", [3, 3, 3], (3, 16, 16), steps=32, diversity=50.0)

    def similarity(images):
        with torch.no_grad():
            return _gram_diversity(net.conv1(images), torch.tensor([3, 3, 3])).mean()

    assert similarity(diverse.images) < similarity(same.images)


def test_no_hook_mode_or_grad_flag_left_after_an_exception_mid_optimization():
    class Bomb(nn.Module):
        calls = 0

        def forward(self, x):
            Bomb.calls += 1
            if Bomb.calls == 5:
                raise RuntimeError("boom at step 3")
            return x

    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bomb=Bomb(), relu=nn.ReLU(), conv2=nn.Conv2d(4, 4, 3)))
    net.train()
    net.conv2.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match="boom at step 3"):
        optimize_units(net, "conv2", [0, 1], (3, 12, 12), steps=10)
    for name, m in net.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            assert not getattr(m, attr), (name, attr)
        assert m.training, name
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient accumulated


@pytest.mark.parametrize("kwargs,match", [
    (dict(units=[8]), r"unit 8 is out of range for layer 'conv2', which has 8 units"),
    (dict(units=[]), "non-empty list of unit indices"),
    (dict(units=[-1]), "non-empty list of unit indices"),
    (dict(image_shape=(16, 16)), r"image_shape must be \(C, H, W\)"),
    (dict(objective="mean"), "Unknown objective 'mean'"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(lr=0), "lr must be a finite number > 0"),
    (dict(init=torch.zeros(1, 3, 16, 8, 2)), r"init must be coefficients \[1, 3, 16, 9, 2\]"),
    (dict(seed=[1, 2]), "seed must be an int or one int per unit"),
    (dict(color="lab"), "color must be"),
    (dict(optimizer_state={"step": 1}), "optimizer_state goes with init"),
    (dict(init=torch.zeros(1, 3, 16, 9, 2), optimizer_state={"step": 1}),
     r"optimizer_state must be a previous result's optimizer_state .*\[1, 3, 16, 9, 2\]"),
])
def test_bad_arguments_say_what_to_pass(kwargs, match):
    args = dict(model=small_net(), layer="conv2", units=[0], image_shape=(3, 16, 16), steps=1)
    args.update(kwargs)
    with pytest.raises(FeatureVizError, match=match) as error:
        optimize_units(**args)
    assert "\n" not in str(error.value)


def test_a_layer_without_maps_is_named():
    with pytest.raises(LayerError, match="not maps"):
        optimize_units(small_net(), "fc", [0], (3, 16, 16), steps=1)
    with pytest.raises(LayerError, match="Unknown layer"):
        optimize_units(small_net(), "conv9", [0], (3, 16, 16), steps=1)


# -- the callback ----------------------------------------------------------------------------------

Module = NetModule


def loader(n=16, seed=0, channels=3, side=16):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.rand(n, channels, side, side, generator=g), torch.arange(n) % 4),
                      batch_size=8)


def fit(tmp_path, callbacks, module, epochs=2, ckpt_path=None, **kwargs):
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, max_epochs=epochs, limit_train_batches=2,
                         limit_val_batches=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         logger=TensorBoardLogger(tmp_path, name="tb", version=""), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(), loader(seed=1), ckpt_path=ckpt_path)
    return trainer


class Spy:
    """Records every optimize_units call of the callback (its init and its result)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = feature_viz_module.optimize_units

        def spy(*args, **kwargs):
            result = real(*args, **kwargs)
            init = kwargs.get("init")
            self.calls.append({"layer": args[1], "units": list(args[2]), "steps": kwargs["steps"],
                               "init": None if init is None else init.clone(), "result": result,
                               "optimizer_state": kwargs.get("optimizer_state")})
            return result
        monkeypatch.setattr(feature_viz_module, "optimize_units", spy)


def test_logs_grids_objectives_and_the_summary(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    callback = FeatureVisualization(layers=["conv1", "conv2"], max_units=3, steps=4, mean=[0.5] * 3, std=[0.25] * 3)
    fit(tmp_path, [callback], Module(small_net()), epochs=3)
    events = read_events(tmp_path / "tb")
    for layer in ("conv1", "conv2"):
        assert f"feature_viz/{layer}" in events["images"] and f"feature_viz_summary/{layer}" in events["images"]
        for u in range(3):
            assert f"feature_viz_objective/{layer}/unit{u}" in events["scalars"]
    assert "viz_time/feature_viz" in events["scalars"]
    last = [c for c in spy.calls if c["layer"] == "conv2"][-1]
    values = []
    for path in sorted((tmp_path / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "feature_viz_objective/conv2/unit2" in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars("feature_viz_objective/conv2/unit2")]
    assert len(values) == 3 and values[-1] == pytest.approx(float(last["result"].objectives[2]))
    assert [e["epoch"] for e in callback.history] == [1, 2, 3]
    summary = callback.summary_image("conv2")
    assert summary.shape[0] == 3 and summary.min() >= 0 and summary.max() <= 1


def test_warm_start_from_epoch_to_epoch_and_through_a_checkpoint(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = FeatureVisualization(layers=["conv2"], max_units=2, steps=3)
    fit(tmp_path, [callback, ckpt], Module(small_net()), epochs=2, enable_checkpointing=True)
    first, second = spy.calls
    assert first["init"] is None and first["steps"] == 3
    torch.testing.assert_close(second["init"], first["result"].coefficients)
    torch.testing.assert_close(callback.coefficients["conv2"], second["result"].coefficients)
    # Adam goes on too: the second epoch's optimizer starts from the first's moments and step count
    assert first["optimizer_state"] is None and second["optimizer_state"]["step"] == 3
    torch.testing.assert_close(second["optimizer_state"]["exp_avg_sq"],
                               first["result"].optimizer_state["exp_avg_sq"])

    spy.calls.clear()
    resumed = FeatureVisualization(layers=["conv2"], max_units=2, steps=3)
    fit(tmp_path / "r", [resumed], Module(small_net()), epochs=3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    (third,) = spy.calls
    torch.testing.assert_close(third["init"], second["result"].coefficients)
    assert third["optimizer_state"]["step"] == 6
    torch.testing.assert_close(third["optimizer_state"]["exp_avg"], second["result"].optimizer_state["exp_avg"])
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]


def test_cold_start_every_epoch_is_the_same_start(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    callback = FeatureVisualization(layers=["conv1"], max_units=2, steps=3, warm_start=False)
    fit(tmp_path, [callback], Module(small_net(), lr=0.0), epochs=2)  # lr 0: the net does not change
    a, b = spy.calls
    assert a["init"] is None and b["init"] is None and not callback.coefficients
    torch.testing.assert_close(a["result"].images, b["result"].images)


def test_units_configured_borrowed_or_most_active(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    mine = FeatureVisualization(layers=["conv1", "conv2"], units={"conv1": [5, 2]}, steps=1, summary=False)
    top = TopActivations(layers=["conv2"], units={"conv2": [7, 1]}, k=1)
    fit(tmp_path, [mine, top], Module(small_net()), epochs=1)
    assert {c["layer"]: c["units"] for c in spy.calls} == {"conv1": [5, 2], "conv2": [7, 1]}

    spy.calls.clear()
    active = FeatureVisualization(layers=["conv2"], selection="most_active", max_units=3, steps=1, summary=False)
    net = small_net()
    fit(tmp_path / "a", [active], Module(net, lr=0.0), epochs=1)
    expected = rank_units(layer_maxima(net, active.probe_images, ["conv2"])["conv2"], 3).tolist()
    assert spy.calls[0]["units"] == expected == active.chosen["conv2"]


def test_thinning_keeps_first_last_and_a_spread():
    history = []
    for epoch in range(1, 41):  # one epoch at a time, as the callback remembers them
        history = _thin(history + [{"epoch": epoch}], 10)
    kept = [e["epoch"] for e in history]
    assert len(kept) == 10 and kept[0] == 1 and kept[-1] == 40
    assert max(np.diff(kept)) <= 2 * (40 - 1) / 9  # no gap over twice the even spacing


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(objective="max"), "Unknown objective"), (dict(color="rgb"), "Unknown color"),
    (dict(lr=-1), "lr must be"), (dict(warm_start="yes"), "warm_start must be true or false"),
    (dict(units={"conv1": [1, 1]}), "lists a unit twice"), (dict(max_unit=3), "did you mean max_units"),
])
def test_bad_options_fail_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as error:
        FeatureVisualization(**kwargs)
    assert "\n" not in str(error.value)


def test_a_unit_out_of_range_fails_at_fit_start(tmp_path):
    callback = FeatureVisualization(layers=["conv1"], units={"conv1": [6]})
    with pytest.raises(ConvlensError, match=r"conv1 has 6 units"):
        fit(tmp_path, [callback], Module(small_net()), epochs=1)


# -- trained nets, real data (slow) ----------------------------------------------------------------

def _train(net, dm, epochs, lr, batches=None):
    dm.setup("fit")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        for i, (x, y) in enumerate(dm.train_dataloader()):
            if batches is not None and i >= batches:
                break
            loss = F.cross_entropy(net(dm.normalization(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return net


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lenet", "cifar"])
def test_a_synthesized_image_beats_the_best_validation_image(shared_data, which):
    """On a briefly trained LeNet (MNIST) and CIFAR net (CIFAR-10), each unit's feature
    visualization (512 steps, cold) reaches at least the objective of the validation image that
    drives that unit most (out of 2000)."""
    from convlens.datamodules.cifar10 import CIFAR10DataModule
    from convlens.datamodules.mnist import MNISTDataModule
    from convlens.models.cifar import CifarConvNet
    from convlens.models.lenet import LeNet

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if which == "lenet":
        if not (shared_data / "MNIST" / "raw").is_dir():
            pytest.skip("no MNIST under DATA_DIR")
        dm, net, layers = MNISTDataModule(root=str(shared_data), download=False, val_size=2000), LeNet(), \
            ["conv1", "conv2", "conv3"]
        net = _train(net, dm, 1, 1e-3, batches=300)
    else:
        if not (shared_data / "cifar10-jpg").is_dir():
            pytest.skip("no cifar10-jpg under DATA_DIR")
        dm, net = CIFAR10DataModule(root=str(shared_data), download=False, val_size=2000), CifarConvNet(c3=64, c4=32)
        layers = ["conv1", "conv2", "conv3", "conv4"]
        net = _train(net, dm, 1, 1e-3, batches=300)
    val = dm.normalization(dm.val_set.images)
    shape = tuple(val.shape[1:])
    color = color_sqrt(dm.normalization.inverse(val[:200]).clamp(0, 1)) if shape[0] == 3 else None
    units = list(range(8))
    for layer in layers:
        best_real = torch.stack([measure_units(net, val, layer, [u]) for u in units]).amax(1)
        result = optimize_units(net, layer, units, shape, steps=512, pixel_to_input=dm.normalization, color=color)
        assert (result.objectives >= result.start).all(), layer
        assert (result.objectives >= best_real).all(), (layer, result.objectives, best_real)


def test_a_checkpoint_from_before_the_optimizer_state_goes_on_with_a_fresh_adam():
    saved = FeatureVisualization(layers=["conv2"])
    saved.chosen, saved.coefficients = {"conv2": [0]}, {"conv2": torch.ones(1, 3, 16, 9, 2)}
    saved.optimizer_states = {"conv2": {"step": 4, "exp_avg": torch.ones(1, 3, 16, 9, 2),
                                        "exp_avg_sq": torch.ones(1, 3, 16, 9, 2)}}
    state = saved.state_dict()
    assert state["optimizer_states"]["conv2"]["step"] == 4
    restored = FeatureVisualization(layers=["conv2"])
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.optimizer_states["conv2"]["exp_avg"], torch.ones(1, 3, 16, 9, 2))
    del state["optimizer_states"]
    older = FeatureVisualization(layers=["conv2"])
    older.load_state_dict(state)
    assert older.optimizer_states == {} and torch.equal(older.coefficients["conv2"], torch.ones(1, 3, 16, 9, 2))
