"""Kernel interpretation by suppression (viz/suppression.py), its baselines (viz/baselines.py) and the
KernelSuppression callback (callbacks/suppression.py).

Oracles:
- SSIM: scikit-image's structural_similarity (when installed: the `dev` extra), an independent naive
  loop over window positions, and hand-computed cases (SSIM(x, x) = 1, constant maps, symmetry);
- the loss: Eqs. 1-3 written out again here on maps taken by a plain forward hook, in both scales;
- the optimizer: one plain gradient-descent step equals x - lr * (autograd gradient of that
  independent loss); a first Adam step moves every pixel by lr against its gradient's sign;
  a batch gives what each image gives alone;
- a linear net where the answer is known: two kernels reading disjoint input channels, so X̂ that
  keeps one and silences the other exists (keep that channel, zero the other) and is found;
- a small ReLU net trained here for a few seconds on synthetic shapes: S. >= 0.8 while R. falls below
  the original image's;
- baselines: deconv equals viz.deconvnet.project at the ReLU on the real model; guided backprop an
  autograd pass with hand-written guided ReLUs; LRP (epsilon rule, no biases) equals input x gradient;
- the callback: events read back from a real TensorBoard run, tiles compared with the method's
  output computed here.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from convlens.render import CAPTION_LINE_H, class_caption, fit_caption, to_pixels, upscale
from convlens.callbacks.lightning_compat import log_step
from convlens.callbacks.suppression import KernelSuppression
from conftest import FAST_SHAPES, compose_cfg, read_events
from convlens.datamodules.shapes import ShapesDataModule
from convlens.datamodules.shapes_data import make_shapes
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule
from convlens.train import train
from convlens.viz.baselines import BaselineError, as_input, baseline_inputs, kernel_attribution
from convlens.viz.deconvnet import project
from convlens.viz.layers import LayerError
from convlens.viz.suppression import SuppressionError, evaluate, follows_relu, interpret_kernel, ssim

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# -- small nets ----------------------------------------------------------------------------------

def tiny_relu_net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(8, 16, 3), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(16 * 5 * 5, 10)))


@pytest.fixture(scope="module")
def trained():
    """A small ReLU net trained for a few seconds on synthetic shapes (28x28 gray), and 6 images."""
    torch.manual_seed(0)
    data = make_shapes(640, size=28, channels=1, seed=0)
    x = data.images.float() / 255
    x = (x - x.mean()) / x.std()
    net = tiny_relu_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(4):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == data.labels).float().mean().item()
    assert accuracy > 0.3, f"the test net did not learn (accuracy {accuracy:.2f})"
    return net, x[:6].clone()


def hooked_maps(net: nn.Module, x: torch.Tensor, layer: str, rectify: bool) -> torch.Tensor:
    """The layer's output by a plain forward hook (the whole forward runs), rectified if asked."""
    out = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    try:
        net(x)
    finally:
        handle.remove()
    return out["y"].relu() if rectify else out["y"]


def paper_loss_terms(maps_hat, maps, channel, x_hat, x, scale):
    """Eqs. 1-3, one image at a time, written out again (scale "paper" or "relative")."""
    lp, ls, lr = [], [], []
    for n in range(len(maps)):
        c = int(channel[n])
        f, f_hat = maps[n], maps_hat[n]
        keep = [j for j in range(f.shape[0]) if j != c]
        wh = f.shape[-1] * f.shape[-2]
        p = torch.sqrt(((f_hat[c] - f[c]) ** 2).sum()) / torch.sqrt((f[c] ** 2).sum())
        s = f_hat[keep].abs().sum() / f[keep].abs().sum()
        r = x_hat[n].abs().sum()
        if scale == "paper":
            lp.append(p / wh)
            ls.append(s / wh)
            lr.append(r / (x.shape[-1] * x.shape[-2]))
        else:
            lp.append(p)
            ls.append(s)
            lr.append(r / x[n].abs().sum())
    return torch.stack(lp), torch.stack(ls), torch.stack(lr)


# -- SSIM against its oracles --------------------------------------------------------------------

def naive_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int, sigma: float) -> float:
    """Mean SSIM of two 2-D maps by an explicit loop over every window position (float64)."""
    x, y = x.double(), y.double()
    r = (window - 1) // 2
    weights = [[math.exp(-((i - r) ** 2 + (j - r) ** 2) / (2 * sigma ** 2)) for j in range(window)]
               for i in range(window)]
    total = sum(map(sum, weights))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for top in range(x.shape[0] - window + 1):
        for left in range(x.shape[1] - window + 1):
            mx = my = sxx = syy = sxy = 0.0
            for i in range(window):
                for j in range(window):
                    w = weights[i][j] / total
                    a, b = x[top + i, left + j].item(), y[top + i, left + j].item()
                    mx, my = mx + w * a, my + w * b
                    sxx, syy, sxy = sxx + w * a * a, syy + w * b * b, sxy + w * a * b
            vx, vy, cov = sxx - mx * mx, syy - my * my, sxy - mx * my
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


@pytest.mark.parametrize("size,window", [(13, 11), (8, 7), (4, 3), (1, 1)])
def test_ssim_matches_a_naive_loop(size, window):
    torch.manual_seed(size)
    x = torch.rand(2, size, size, dtype=torch.float64)
    y = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    got = ssim(x, y, data_range=1.0)
    for n in range(2):
        # small maps: the largest odd window that fits, sigma scaled with it
        expected = naive_ssim(x[n], y[n], 1.0, window, 1.5 * window / 11)
        assert got[n].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("size", [16, 7, 5])
def test_ssim_matches_scikit_image(size):
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(1)
    x = torch.rand(3, size, size, dtype=torch.float64) * 4 - 1
    y = x + 0.5 * torch.randn_like(x)
    window = min(11, size if size % 2 else size - 1)
    got = ssim(x, y, data_range=5.0)
    for n in range(3):
        expected = metrics.structural_similarity(
            x[n].numpy(), y[n].numpy(), data_range=5.0, gaussian_weights=True,
            sigma=1.5 * window / 11, use_sample_covariance=False)
        assert got[n].item() == pytest.approx(expected, rel=1e-7)


def test_ssim_hand_computed_cases():
    torch.manual_seed(2)
    x = torch.rand(3, 12, 12, dtype=torch.float64)
    y = torch.rand(3, 12, 12, dtype=torch.float64)
    assert torch.allclose(ssim(x, x, 1.0), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ssim(x, y, 1.0), ssim(y, x, 1.0))
    assert (ssim(x, y, 1.0) < 0.9).all()
    # constant maps a and b: the variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, L = 0.3, 0.7, 2.0
    c1 = (0.01 * L) ** 2
    got = ssim(torch.full((1, 12, 12), a, dtype=torch.float64), torch.full((1, 12, 12), b, dtype=torch.float64), L)
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    # invariance to a common scale when the data range scales with it
    assert torch.allclose(ssim(7 * x, 7 * y, 7.0), ssim(x, y, 1.0))


# -- the method on a trained ReLU net ----------------------------------------------------------------

def test_suppression_keeps_the_kernel_and_suppresses_the_others(trained):
    net, images = trained
    assert follows_relu(net, images, "conv2")
    maps = hooked_maps(net, images, "conv2", rectify=True).detach()
    channel = maps.amax(dim=(2, 3)).argmax(1)  # each image's most active kernel
    x_hat, metrics = interpret_kernel(net, images, "conv2", channel)
    assert x_hat.shape == images.shape and not x_hat.requires_grad
    assert (metrics["ssim"] >= 0.8).all(), metrics["ssim"]
    assert (metrics["mse"] < metrics["mse_original"]).all(), (metrics["mse"], metrics["mse_original"])
    assert metrics["mse_relative"].mean() < 0.7
    # the metrics are those of X̂ as the net sees it (independent forward, metrics recomputed)
    with torch.no_grad():
        maps_hat = hooked_maps(net, x_hat, "conv2", rectify=True)
    rows = torch.arange(len(images))
    f, f_hat = maps[rows, channel], maps_hat[rows, channel]
    data_range = f.flatten(1).amax(1) - f.flatten(1).amin(1)
    assert f.shape[-2:] == (11, 11)  # conv2's maps: the full 11x11 window fits once
    for n in range(len(images)):
        expected = naive_ssim(f_hat[n], f[n], data_range[n].item(), 11, 1.5)
        assert metrics["ssim"][n].item() == pytest.approx(expected, abs=1e-5)
        others = [j for j in range(maps.shape[1]) if j != int(channel[n])]
        assert metrics["mse"][n].item() == pytest.approx(maps_hat[n, others].pow(2).mean().item(), rel=1e-5)
        assert metrics["mse_original"][n].item() == pytest.approx(maps[n, others].pow(2).mean().item(), rel=1e-5)
    # and `evaluate`, the metrics of any X̂, agrees
    again = evaluate(net, images, x_hat, "conv2", channel)
    for key in ("ssim", "mse", "mse_original"):
        assert torch.allclose(again[key], metrics[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", ["relative", "paper"])
def test_reported_loss_terms_are_eqs_1_to_3(trained, scale):
    net, images = trained
    channel = torch.tensor([0, 3, 5, 1, 2, 7])
    x_hat, metrics = interpret_kernel(net, images, "conv1", channel, alpha=0.8, beta=0.3, steps=5,
                                      loss_scale=scale)
    with torch.no_grad():
        maps = hooked_maps(net, images, "conv1", rectify=True)
        maps_hat = hooked_maps(net, x_hat, "conv1", rectify=True)
    lp, ls, lr = paper_loss_terms(maps_hat, maps, channel, x_hat, images, scale)
    assert torch.allclose(metrics["preservation"], lp, rtol=1e-4, atol=1e-7)
    assert torch.allclose(metrics["suppression"], ls, rtol=1e-4)
    assert torch.allclose(metrics["regularization"], lr, rtol=1e-4)
    assert torch.allclose(metrics["loss"], lp + 0.8 * ls + 0.3 * lr, rtol=1e-4)


def test_one_gradient_descent_step_is_the_autograd_step(trained):
    net, images = trained
    net = net.double()
    try:
        x = images[:3].double()
        channel = torch.tensor([1, 4, 6])
        alpha, beta, lr = 0.7, 10.0, 1e-3  # beta large: the step surely lowers the loss, so it is kept
        x_hat, metrics = interpret_kernel(net, x, "conv2", channel, alpha=alpha, beta=beta, steps=1, lr=lr,
                                          optimizer="gd", loss_scale="paper")
        assert metrics["steps"].tolist() == [1, 1, 1]
        x0 = x.clone().requires_grad_(True)
        with torch.no_grad():
            maps = hooked_maps(net, x, "conv2", rectify=True)
        lp, ls, lr_term = paper_loss_terms(hooked_maps(net, x0, "conv2", rectify=True), maps, channel, x0, x, "paper")
        # Lp is a norm at its kink (0) at X: its gradient there is taken as 0, as torch does
        loss = (alpha * ls + beta * lr_term).sum()
        grad, = torch.autograd.grad(loss, x0)
        assert torch.allclose(x_hat, x - lr * grad, rtol=1e-10, atol=1e-12)
        # Adam's first step: every pixel moves by lr against its gradient's sign
        x_adam, _ = interpret_kernel(net, x, "conv2", channel, alpha=alpha, beta=beta, steps=1, lr=lr,
                                     loss_scale="paper")
        moved = grad.abs() > 1e-6
        assert torch.allclose((x_adam - x)[moved], (-lr * grad.sign())[moved], rtol=1e-4)
    finally:
        net.float()


def test_a_batch_gives_what_each_image_gives_alone(trained):
    """Per-image learning rates, plateaus, early stops and Adam moments: a batch gives what each
    image gives alone, also when the images stop at different steps."""
    net, images = trained
    net = net.double()
    try:
        x = images[:3].double()
        channel = torch.tensor([1, 4, 6])
        options = dict(steps=100, patience=3, max_decays=2)
        together, m_together = interpret_kernel(net, x, "conv2", channel, **options)
        assert len(set(m_together["steps"].tolist())) > 1  # the images did stop at different steps
        for n in range(3):
            alone, m_alone = interpret_kernel(net, x[n:n + 1], "conv2", int(channel[n]), **options)
            assert m_together["steps"][n] == m_alone["steps"][0]
            assert torch.allclose(together[n:n + 1], alone, atol=1e-8)
    finally:
        net.float()


def test_exact_on_a_linear_net_with_separable_kernels():
    """Kernel 0 reads only input channel 0, kernel 1 only channel 1 (no biases): the optimum keeps
    channel 0 and zeroes channel 1 (F_0 kept exactly, F_1 = 0), which is what is found."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight[0, 1] = 0
        conv.weight[1, 0] = 0
    net = nn.Sequential(OrderedDict(conv=conv)).double()
    x = torch.randn(2, 2, 10, 10, dtype=torch.float64)
    assert not follows_relu(net, x, "conv")
    x_hat, metrics = interpret_kernel(net, x, "conv", 0, alpha=1.0, beta=0.0, steps=500, lr=0.02)
    assert (metrics["ssim"] > 0.999).all()
    assert (metrics["mse_relative"] < 1e-3).all(), metrics["mse_relative"]
    assert torch.allclose(x_hat[:, 0], x[:, 0], atol=0.02)
    # channel 1 need not be zero (beta = 0; conv has a null space), only its map must vanish
    with torch.no_grad():
        f_1 = net(x_hat)[:, 1]
    assert f_1.abs().max() < 0.05 * net(x)[:, 1].abs().max()


def test_vgg16_layout_runs():
    """VGG16's features (torchvision layout, random weights: the ImageNet weights are not available
    offline) at 32x32: the method and every baseline run at a block's last conv."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(8)
    net = nn.Sequential(OrderedDict(features=make_layers(cfgs["D"]))).eval()
    x = torch.randn(1, 3, 32, 32)
    assert follows_relu(net, x, "features.7")
    x_hat, metrics = interpret_kernel(net, x, "features.7", 5, steps=3)
    assert x_hat.shape == x.shape and torch.isfinite(metrics["ssim"]).all()
    for method in ("deconv", "guided_backprop", "lrp"):
        assert torch.isfinite(baseline_inputs(net, x, "features.7", 5, method)).all()


# -- state hygiene -------------------------------------------------------------------------------

def messy_net() -> nn.Module:
    """CifarConvNet in train mode with mixed modes and requires_grad flags."""
    torch.manual_seed(4)
    net = CifarConvNet(c3=8, c4=8, hidden=16)
    net.train()
    net.drop2.eval()
    net.conv1.weight.requires_grad_(False)
    return net


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_results_are_normal_tensors_under_grad_modes(grad_mode):
    """Modes, flags, hooks, gradients, weights and attributes: tests/test_viz_contract.py. Here: X̂
    is an ordinary tensor (later optimization may use it) and every baseline runs on this net."""
    net = messy_net()
    x = torch.randn(2, 3, 32, 32)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    with context():
        x_in = x.clone()
        x_hat, metrics = interpret_kernel(net, x_in, "conv3", torch.tensor([1, 2]), steps=3)
        baselines = {m: baseline_inputs(net, x_in, "conv2", 3, m) for m in ("deconv", "guided_backprop", "lrp")}
    assert not x_hat.is_inference() and x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    assert all(b.shape == x.shape and torch.isfinite(b).all() for b in baselines.values())


def test_channel_errors_name_the_valid_range():
    net = messy_net()
    with pytest.raises(SuppressionError, match=r"out of range.*0\.\.7"):
        interpret_kernel(net, torch.randn(1, 3, 32, 32), "conv3", 8, steps=2)
    with pytest.raises(SuppressionError, match="out of range"):
        baseline_inputs(net, torch.randn(1, 3, 32, 32), "conv3", 8, "lrp")


# -- errors --------------------------------------------------------------------------------------

def test_clear_errors():
    net = LeNet()
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(LayerError, match="Unknown layer 'conv9'.*conv1"):
        interpret_kernel(net, x, "conv9", 0)
    with pytest.raises(LayerError, match="spatial feature maps"):
        interpret_kernel(net, x, "flatten", 0)
    with pytest.raises(SuppressionError, match=r"unit 20 is out of range.*0\.\.19"):
        interpret_kernel(net, x, "conv1", 20)
    with pytest.raises(SuppressionError, match=r"shape \[N\] = \[2\]"):
        interpret_kernel(net, x, "conv1", torch.tensor([0, 1, 2]))
    with pytest.raises(SuppressionError, match="integer tensor"):
        interpret_kernel(net, x, "conv1", torch.tensor([0.0, 1.0]))
    for kwargs, pattern in [({"alpha": -1}, "alpha must be a finite number >= 0"),
                            ({"alpha": float("nan")}, "alpha"), ({"beta": "1"}, "beta"),
                            ({"steps": 0}, "steps must be an int >= 1"), ({"steps": 2.5}, "steps"),
                            ({"lr": 0}, "lr must be a finite number > 0"),
                            ({"decay": 1.0}, r"decay must be a number in \(0, 1\)"),
                            ({"optimizer": "sgd"}, "Unknown optimizer 'sgd'"),
                            ({"loss_scale": "raw"}, "Unknown loss_scale"), ({"rectify": "yes"}, "rectify")]:
        with pytest.raises(SuppressionError, match=pattern):
            interpret_kernel(net, x, "conv1", 0, **kwargs)
    with pytest.raises(SuppressionError, match=r"\[N, C, H, W\].*unsqueeze"):
        interpret_kernel(net, x[0], "conv1", 0)
    with pytest.raises(BaselineError, match="Unknown baseline 'gradcam'"):
        baseline_inputs(net, x, "conv1", 0, "gradcam")
    with pytest.raises(BaselineError, match="Unknown scaling"):
        baseline_inputs(net, x, "conv1", 0, "deconv", scaling="zscore")
    assert issubclass(SuppressionError, ValueError) and issubclass(BaselineError, ValueError)


class Residual(nn.Module):
    """conv2 sees conv1's output plus the input: not a chain of modules."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.conv1(x) + x)


def test_the_method_works_on_any_model_but_baselines_need_a_chain():
    torch.manual_seed(7)
    x = torch.randn(1, 1, 8, 8)
    # the suppression method only needs the layer's output
    _, metrics = interpret_kernel(Residual(), x, "conv2", 0, steps=2)
    assert torch.isfinite(metrics["ssim"]).all()
    with pytest.raises(BaselineError, match="not a plain chain"):
        baseline_inputs(Residual(), x, "conv2", 0, "deconv")


# -- baselines against their oracles ---------------------------------------------------------------

def test_deconv_baseline_is_the_deconvnet_projection_at_the_relu(trained):
    net, images = trained
    channel = torch.tensor([0, 3, 5, 1, 2, 7])
    got = kernel_attribution(net, images, "conv2", channel, "deconv")
    # the rectified map of conv2 is relu2's output: project it on the real model
    assert torch.allclose(got, project(net, images, "relu2", channel), atol=1e-6)
    # unrectified maps: the deconvnet starts from the raw conv output
    raw = kernel_attribution(net, images, "conv2", channel, "deconv", rectify=False)
    assert torch.allclose(raw, project(net, images, "conv2", channel), atol=1e-6)


class GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad.clamp_min(0) * (x > 0)


def test_guided_backprop_baseline_against_hand_written_guided_relus(trained):
    net, images = trained
    channel = torch.tensor([0, 3, 5, 1, 2, 7])
    got = kernel_attribution(net, images, "conv2", channel, "guided_backprop")
    x = images.clone().requires_grad_(True)
    y = GuidedReLU.apply(net.conv1(x))
    y = GuidedReLU.apply(net.conv2(F.max_pool2d(y, 2)))  # rectified conv2: relu2's output
    f_i = y[torch.arange(len(x)), channel]
    grad, = torch.autograd.grad(0.5 * (f_i ** 2).sum(), x)  # starts from F_i itself
    assert torch.allclose(got, grad, rtol=1e-5, atol=1e-7)


def test_lrp_baseline_is_input_times_gradient_without_biases():
    """With epsilon -> 0 and no biases, epsilon-LRP through convolutions, ReLUs and max pooling is
    input x gradient (Ancona et al. 2018); the relevance starts from mean(F_i)."""
    torch.manual_seed(5)
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(2, 6, 3, bias=False), relu1=nn.ReLU(),
                                    pool1=nn.MaxPool2d(2), conv2=nn.Conv2d(6, 5, 3, bias=False),
                                    relu2=nn.ReLU())).double()
    x = torch.randn(3, 2, 14, 14, dtype=torch.float64)
    channel = torch.tensor([0, 2, 4])
    got = kernel_attribution(net, x, "conv2", channel, "lrp")
    x0 = x.clone().requires_grad_(True)
    f_i = net(x0)[torch.arange(3), channel]
    grad, = torch.autograd.grad(f_i.mean(dim=(1, 2)).sum(), x0)
    assert (x * grad).flatten(1).abs().sum(1).count_nonzero() >= 2  # not a vacuous comparison
    # captum's epsilon (1e-9) in the denominators: agreement to about 1e-7
    assert torch.allclose(got, x * grad, rtol=1e-5, atol=1e-9)


def test_as_input_scalings():
    torch.manual_seed(6)
    a = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) * 2
    mm = as_input(a, x, "minmax")
    sym = as_input(a, x, "symmetric")
    for n in range(2):
        # minmax: the increasing affine map taking [min A, max A] onto [min X, max X]
        slope = (x[n].max() - x[n].min()) / (a[n].max() - a[n].min())
        assert torch.allclose(mm[n], x[n].min() + slope * (a[n] - a[n].min()))
        # symmetric: A times max|X| / max|A| (zero stays zero)
        assert torch.allclose(sym[n], a[n] * x[n].abs().max() / a[n].abs().max())
    zero = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(as_input(zero, x[:1], "symmetric"), zero)
    assert torch.allclose(as_input(zero, x[:1], "minmax"), ((x[0].min() + x[0].max()) / 2).expand(1, 3, 5, 5))


# -- the callback ----------------------------------------------------------------------------------

def test_callback_validates_its_arguments():
    for kwargs, pattern in [({"units": {"conv1": [0, -1]}}, "units"), ({"units": {"conv1": []}}, "units"),
                            ({"top_k": 0}, "top_k must be an int >= 1"), ({"alpha": -2}, "alpha"),
                            ({"steps": 0}, "steps"), ({"lr": -1}, "lr"), ({"tile_size": 0}, "tile_size"),
                            ({"every_n_epochs": -1}, "every_n_epochs")]:
        with pytest.raises(ValueError, match=pattern):
            KernelSuppression(**kwargs)
    module = SimpleNamespace(net=LeNet())
    with pytest.raises(LayerError, match=r"out of range for layer 'conv1'.*0\.\.19"):
        KernelSuppression(layers=["conv1"], units={"conv1": [3, 25]}).setup(None, module, "fit")
    with pytest.raises(LayerError, match="Unknown layer 'conv7'"):
        KernelSuppression(layers=["conv7"]).setup(None, module, "fit")
    cb = KernelSuppression()
    cb.setup(None, module, "fit")
    assert cb.layers == ["conv1", "conv2", "conv3", "conv4"]


def test_callback_draws_the_method_output_and_keeps_its_kernels(tmp_path):
    """Every epoch, on a real Trainer with TensorBoard: the grid's X and X̂ tiles are the probe images
    and interpret_kernel's output computed here; the kernels chosen at the first run are kept and
    saved in the state dict."""
    torch.manual_seed(0)
    dm = ShapesDataModule(n_train=192, n_test=64, val_size=64, batch_size=64)
    module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    cb = KernelSuppression(layers=["conv2"], every_n_epochs=1, steps=20, tile_size=56)
    drawn = {}
    log_image = cb.log_image

    def capture(trainer, tag, image):
        drawn[(tag, log_step(trainer))] = image
        log_image(trainer, tag, image)

    cb.log_image = capture
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=2, callbacks=[cb],
                         logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    trainer.logger.experiment.flush()
    events = read_events(tmp_path)
    steps = sorted(events["images"]["suppression/conv2"])
    assert len(steps) == 2 and steps == sorted(events["scalars"]["suppression_ssim/conv2"])
    assert "suppression_mse/conv2" in events["scalars"] and "suppression_mse_relative/conv2" in events["scalars"]
    chosen = cb.chosen["conv2"]
    assert chosen.shape == (2, 1)
    # the tiles of the last run against the method's output (the net as it ended)
    grid = drawn[("suppression/conv2", steps[-1])]
    net = module.net
    images, _ = cb.probe(module)
    x_hat, _ = interpret_kernel(net, images, "conv2", chosen.flatten(), alpha=cb.alpha, beta=cb.beta,
                                steps=20, lr=cb.lr)
    # the column-title band, padding and caption band of captioned_grid (a class name too long for
    # a tile takes two caption lines)
    names = [class_caption(y, dm.class_names) for y in cb.probe_labels]
    top, pad, caption = 14, 2, CAPTION_LINE_H * max(fit_caption(n, 56, lines=2).count("\n") + 1 for n in names)
    for row in range(2):
        for col, expected in ((0, images[row]), (1, x_hat[row])):
            y0, x0 = top + pad + row * (56 + pad + caption), pad + col * (56 + pad)
            tile = grid[:, y0:y0 + 56, x0:x0 + 56]
            want = upscale(to_pixels(expected[None], dm.normalization), 56)[0].expand(3, -1, -1)
            assert (tile - want).abs().max() <= 1 / 255 + 1e-6
    state = cb.state_dict()
    restored = KernelSuppression(layers=["conv2"])
    restored.load_state_dict(state)
    assert torch.equal(restored.chosen["conv2"], chosen)


def test_callback_logs_at_fit_end_in_a_shapes_run(tmp_path):
    cfg = compose_cfg([o for o in FAST_SHAPES if "rich_progress_bar" not in o]
                      + ["callbacks=[model_checkpoint,suppression]",
                         "callbacks.suppression.layers=[conv1,conv3]",
                         "callbacks.suppression.steps=20", "test=false"], tmp_path)
    train(cfg)
    events = read_events(tmp_path / "tensorboard")
    dm = cfg.datamodule
    # the last epoch's validation step (Lightning logs epoch-end metrics at global_step - 1)
    final_step = cfg.trainer.max_epochs * math.ceil((dm.n_train - dm.val_size) / dm.batch_size) - 1
    assert max(events["scalars"]["val/acc"]) == final_step
    for layer in ("conv1", "conv3"):
        assert events["images"][f"suppression/{layer}"] == [final_step]  # once, at fit end
        for kind in ("ssim", "mse", "mse_relative"):
            assert events["scalars"][f"suppression_{kind}/{layer}"] == [final_step]
