"""Incremental occlusion (viz/occlusion_incremental.py, through `occlusion_maps`) against independent
oracles:

* exact maps: a naive loop that pastes the patch by slicing and runs one occluded copy at a time
  through `model(x)` (a deep copy in eval mode), on LeNet, the CIFAR net (BatchNorm, dropout), VGG
  at reduced input size and a chain built to hit every geometric corner case;
* Krypton's projective-field thresholding (`tau`): a naive per-copy propagation over full maps,
  whose changed region in each layer is found by running the layer's window over a 0/1 mask;
* the callback's logged image: rendered once with the incremental path and once with the batched
  forward, pixel for pixel.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convlens.callbacks.occlusion as callback_module
from convlens.callbacks.occlusion import OcclusionSensitivity
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.viz import occlusion_incremental
from convlens.viz.occlusion import OcclusionError, occlusion_maps

EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 nets: the two paths differ only by summation order


# --------------------------------------------------------------------------------------------
# Oracles and helpers
# --------------------------------------------------------------------------------------------

def occluded_copy(image, fill, y0, x0, patch):
    x = image.clone()
    x[:, y0:y0 + patch, x0:x0 + patch] = torch.broadcast_to(
        torch.as_tensor(fill, dtype=x.dtype), x.shape)[:, y0:y0 + patch, x0:x0 + patch]
    return x


def naive_occlusion(model, images, targets, patch, stride, fill):
    """One forward pass per image and position through a deep copy of the model in eval mode."""
    model = copy.deepcopy(model).eval()
    N, C, H, W = images.shape
    rows, cols = (H - patch) // stride + 1, (W - patch) // stride + 1
    prob = torch.zeros(N, rows, cols, dtype=images.dtype)
    label = torch.zeros(N, rows, cols, dtype=torch.long)
    with torch.no_grad():
        for n in range(N):
            for i in range(rows):
                for j in range(cols):
                    out = model(occluded_copy(images[n], fill, i * stride, j * stride, patch)[None])[0]
                    prob[n, i, j] = out.softmax(0)[targets[n]]
                    label[n, i, j] = out.argmax()
    return prob, label


def predicted(model, images):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(images).argmax(1)


def assert_maps_equal(got, expected, **tol):
    torch.testing.assert_close(got[0], expected[0], **(tol or EXACT))
    assert torch.equal(got[1], expected[1])


@pytest.fixture(autouse=True)
def one_thread():
    """The naive oracles run thousands of tiny forwards; on a busy 2-core machine two threads per
    process oversubscribe the cores (measured ~20x slower here); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spy(monkeypatch):
    """What `occlusion_incremental.prepare` returned in each call: a runner or None (batched)."""
    returned = []
    real = occlusion_incremental.prepare

    def recording(*args, **kwargs):
        runner = real(*args, **kwargs)
        returned.append(runner)
        return runner

    monkeypatch.setattr(occlusion_incremental, "prepare", recording)
    return returned


def tricky_chain(seed=0):
    """Every corner of the geometry: stride 2 with dilation 2, padding='same' with an even kernel,
    max pool with padding and ceil_mode, average pools without and with counted padding and with a
    divisor override, a grouped conv, a strided 1x1 conv (which skips inputs), a dilated max pool,
    BatchNorm with perturbed statistics, in-place and per-channel activations. 61x53 input."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        c1=nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2), bn=nn.BatchNorm2d(4), r1=nn.ReLU(inplace=True),
        c2=nn.Conv2d(4, 6, 4, padding="same"), a1=nn.LeakyReLU(0.1),
        p1=nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
        c3=nn.Conv2d(6, 6, 3, padding=1, groups=2),
        p2=nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
        id=nn.Identity(), dr=nn.Dropout(0.3),
        c4=nn.Conv2d(6, 5, 1, stride=2),
        p3=nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=True), pr=nn.PReLU(5),
        p4=nn.MaxPool2d(2, stride=1, dilation=2),
        p5=nn.AvgPool2d(2, ceil_mode=True, divisor_override=3),
        flat=nn.Flatten(), fc=nn.Linear(5 * 2 * 2, 7),
    )).double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2)
        net.pr.weight.uniform_(-0.5, 0.5)
    return net


def cifar_net(seed=0):
    torch.manual_seed(seed)
    net = CifarConvNet(c3=16, c4=8, hidden=32).double()
    with torch.no_grad():
        net.bn2.running_mean.uniform_(-0.5, 0.5)
        net.bn2.running_var.uniform_(0.5, 2)
    return net


def normalization():
    mean = torch.tensor([0.49, 0.48, 0.45], dtype=torch.float64)[:, None, None]
    std = torch.tensor([0.25, 0.24, 0.26], dtype=torch.float64)[:, None, None]
    return lambda pixels: (pixels - mean) / std


def model_state(model):
    """Everything a call must leave as it found it."""
    return ([m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_same_state(model, state):
    modes, hooks, flags, tensors = model_state(model)
    assert modes == state[0] and hooks == state[1] and flags == state[2]
    for k, v in tensors.items():
        assert torch.equal(v, state[3][k]), k


# --------------------------------------------------------------------------------------------
# Exact maps against the naive loop
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, stride", [(1, 7), (5, 3), (12, 5), (20, 11), (53, 4)])
def test_tricky_chain_equals_naive_loop(patch, stride, spy):
    net = tricky_chain()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 61, 53, dtype=torch.float64)
    fill = torch.randn(3, 61, 53, dtype=torch.float64)  # position-dependent: cut at the patch
    targets = torch.tensor([3, 6])
    expected = naive_occlusion(net, images, targets, patch, stride, fill)
    assert_maps_equal(occlusion_maps(net, images, targets, patch, stride, fill, incremental=True, max_batch=13),
                      expected)
    assert spy[-1] is not None and spy[-1].plan.switch >= 3  # several layers ran incrementally
    assert_maps_equal(occlusion_maps(net, images, targets, patch, stride, fill), expected)  # automatic
    assert_maps_equal(occlusion_maps(net, images, targets, patch, stride, fill, incremental=False), expected)


def test_tricky_chain_channels_last():
    net = tricky_chain().to(memory_format=torch.channels_last)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 61, 53, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([0, 1])
    got = occlusion_maps(net, images, targets, patch=7, stride=6, fill=0.25, incremental=True, max_batch=50)
    assert_maps_equal(got, naive_occlusion(net, images, targets, 7, 6, 0.25))


@pytest.mark.parametrize("patch, stride", [(7, 3), (5, 4), (9, 2)])
def test_lenet_equals_naive_loop(patch, stride):
    torch.manual_seed(3)
    net = LeNet().double()
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    targets = torch.tensor([7, 2])
    fill = torch.rand(1, 28, 28, dtype=torch.float64)
    expected = naive_occlusion(net, images, targets, patch, stride, fill)
    for max_batch in (1, 29, None):
        got = occlusion_maps(net, images, targets, patch, stride, fill, incremental=True, max_batch=max_batch)
        assert_maps_equal(got, expected)
    assert_maps_equal(occlusion_maps(net, images, targets, patch, stride, fill), expected)


def test_whole_image_patch_falls_back_or_says_why():
    torch.manual_seed(4)
    net = LeNet().double()
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    expected = naive_occlusion(net, images, [1, 2], 28, 1, 0.0)
    assert_maps_equal(occlusion_maps(net, images, [1, 2], patch=28, fill=0.0), expected)
    with pytest.raises(OcclusionError, match="window already covers its whole map.*incremental=None"):
        occlusion_maps(net, images, [1, 2], patch=28, fill=0.0, incremental=True)


@pytest.mark.parametrize("patch, stride", [(7, 3), (4, 5), (11, 2)])
def test_cifar_net_in_train_mode_with_pixel_to_input(patch, stride, spy):
    """BatchNorm (perturbed statistics) and dropout: the maps are the eval-mode ones, and the
    default gray fill goes through pixel_to_input; the model's modes come back."""
    net = cifar_net()
    net.train()
    net.drop3.eval()
    state = model_state(net)
    torch.manual_seed(5)
    to_input = normalization()
    images = to_input(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    gray = to_input(torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64))[0]
    targets = predicted(net, images)
    expected = naive_occlusion(net, images, targets, patch, stride, gray)
    got = occlusion_maps(net, images, None, patch, stride, pixel_to_input=to_input, incremental=True, max_batch=40)
    assert_maps_equal(got, expected)
    assert spy[-1].plan.switch >= 5
    assert_same_state(net, state)
    fill = torch.randn(3, 32, 32, dtype=torch.float64)
    assert_maps_equal(occlusion_maps(net, images, targets, patch, stride, fill),
                      naive_occlusion(net, images, targets, patch, stride, fill))
    assert_same_state(net, state)


@pytest.mark.slow  # ~15 s: 32 VGG16 forwards in the oracle, most of it the 4096-wide classifier
def test_vgg16_at_32x32():
    from convlens.models.vgg import VGG16

    torch.manual_seed(6)
    net = VGG16(num_classes=10, weights=None).eval()
    images = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([1, 8])
    expected = naive_occlusion(net, images, targets, 8, 8, 0.0)
    got = occlusion_maps(net, images, targets, patch=8, stride=8, fill=0.0, incremental=True)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-6)  # float32
    assert torch.equal(got[1], expected[1])


@pytest.mark.slow  # ~9 s
def test_torchvision_vgg11_in_place_relu_at_64x64():
    from torchvision.models import vgg11

    torch.manual_seed(7)
    net = vgg11(weights=None, num_classes=5).eval()
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in net.features)
    images = torch.randn(1, 3, 64, 64)
    fill = torch.randn(3, 1, 1)
    expected = naive_occlusion(net, images, [3], 13, 17, fill)
    for incremental in (True, None):
        got = occlusion_maps(net, images, [3], patch=13, stride=17, fill=fill, incremental=incremental)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-6)
        assert torch.equal(got[1], expected[1])


def test_under_inference_mode_with_inference_tensor_images():
    net = cifar_net()
    with torch.inference_mode():
        images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        got = occlusion_maps(net, images, [0, 9], patch=6, stride=5, fill=0.0, incremental=True)
    assert_maps_equal(got, naive_occlusion(net, images.clone(), [0, 9], 6, 5, 0.0))


# --------------------------------------------------------------------------------------------
# Where it does not apply: exact maps all the same
# --------------------------------------------------------------------------------------------

class Residual(nn.Module):
    """conv -> relu -> (conv -> relu) + skip: the stem's output is read twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x)) + x
        return self.fc(x.mean(dim=(2, 3)))


class SideRead(nn.Module):
    """A chain conv1 -> conv2 -> pool whose first map is also read functionally at the end."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8, 5)

    def forward(self, x):
        first = self.conv1(x)
        x = self.pool(self.conv2(first))
        return self.fc(torch.cat([x.mean(dim=(2, 3)), first.amax(dim=(2, 3))], 1))


class SharedReLU(nn.Sequential):
    """The same ReLU instance after every conv, also after the chain's end."""

    def __init__(self):
        torch.manual_seed(10)
        relu = nn.ReLU()
        super().__init__(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 4, 3), relu, nn.Flatten(), nn.Linear(4 * 12 * 12, 3),
                         relu)


@pytest.mark.parametrize("make", [Residual, SideRead, SharedReLU])
def test_models_outside_the_chain_rule_are_exact(make, spy):
    net = make().double()
    torch.manual_seed(11)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = naive_occlusion(net, images, [1, 2], 5, 3, 0.0)
    assert_maps_equal(occlusion_maps(net, images, [1, 2], patch=5, stride=3, fill=0.0), expected)
    try:
        got = occlusion_maps(net, images, [1, 2], patch=5, stride=3, fill=0.0, incremental=True)
    except OcclusionError as e:
        assert "incremental=None" in str(e) and "\n" not in str(e)
    else:  # a shorter chain that is safe (the stem of the residual net, the convs before the shared ReLU)
        assert_maps_equal(got, expected)
    if make is SideRead:  # its chain runs conv1, conv2 and pool: the substitution check must catch it
        assert spy[-1] is None or spy[-1].plan.switch <= 1


def test_a_hook_on_a_chain_module_is_honoured():
    net = LeNet().double()
    handle = net.conv1.register_forward_hook(lambda module, args, out: out * 2 + 1)
    try:
        torch.manual_seed(12)
        images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
        expected = naive_occlusion(net, images, [0, 1], 7, 4, 0.0)  # the deep copy keeps the hook
        assert_maps_equal(occlusion_maps(net, images, [0, 1], patch=7, stride=4, fill=0.0), expected)
        with pytest.raises(OcclusionError, match="plain chain"):
            occlusion_maps(net, images, [0, 1], patch=7, stride=4, fill=0.0, incremental=True)
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# Model state after the call and after an error
# --------------------------------------------------------------------------------------------

class Boom(nn.Module):
    """Raises on its `at`-th call: inside the substitution check (2nd call) or mid-chunks (later)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("boom")
        return x


def boom_net(at):
    torch.manual_seed(13)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 5 * 5, 3), Boom(at)).double()
    net.train()
    net[1].eval()
    net[0].weight.requires_grad_(False)
    net[6].register_forward_hook(lambda module, args, out: None)  # a caller's hook outside the chain stays
    return net


def test_state_is_restored_after_the_call_and_after_errors():
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    net = boom_net(at=0)
    state = model_state(net)
    assert_maps_equal(occlusion_maps(net, images, [0, 2], patch=4, stride=3, fill=0.0, incremental=True),
                      naive_occlusion(net, images, [0, 2], 4, 3, 0.0))
    assert_same_state(net, state)
    net = boom_net(at=4)  # record, check, first chunk, second chunk: raises with the chain swapped out
    state = model_state(net)
    with pytest.raises(RuntimeError, match="boom"):
        occlusion_maps(net, images, [0, 2], patch=4, stride=3, fill=0.0, incremental=True, max_batch=10)
    assert net[7].calls == 4
    assert_same_state(net, state)
    net = boom_net(at=2)  # the substitution check fails: said so, nothing left behind
    state = model_state(net)
    with pytest.raises(OcclusionError, match="incremental=False"):
        occlusion_maps(net, images, [0, 2], patch=4, stride=3, fill=0.0, incremental=True)
    assert_same_state(net, state)


def test_clear_errors():
    net = tricky_chain()
    images = torch.randn(1, 3, 61, 53, dtype=torch.float64)
    # tau=1.0 is allowed since issue #23 (it thresholds nothing: exact maps, tested with the drill-down)
    for kwargs, message in [(dict(tau=0), r"tau must be a fraction in \(0, 1\]"), (dict(tau=1.5), "tau must"),
                            (dict(tau=True), "tau must"), (dict(tau="0.5"), "tau must"),
                            (dict(tau=0.5, incremental=False), "tau=None with incremental=False"),
                            (dict(incremental="yes"), "incremental must be None")]:
        with pytest.raises(OcclusionError, match=message):
            occlusion_maps(net, images, patch=5, **kwargs)


# --------------------------------------------------------------------------------------------
# The approximation: Krypton's projective-field thresholding
# --------------------------------------------------------------------------------------------

def changed_outputs(module, mask):
    """0/1 mask of the outputs whose window span reaches a changed input (the layer's geometry
    applied to the mask itself)."""
    if isinstance(module, nn.Conv2d):
        k, s, d = module.kernel_size, module.stride, module.dilation
        if module.padding == "same":
            before = [d[a] * (k[a] - 1) // 2 for a in range(2)]
            after = [d[a] * (k[a] - 1) - before[a] for a in range(2)]
        else:
            before = after = list(module.padding)
        padded = F.pad(mask, (before[1], after[1], before[0], after[0]))
        span = [d[a] * (k[a] - 1) + 1 for a in range(2)]  # every input between the first and last tap
        return F.max_pool2d(padded, span, s)
    k = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
    d = getattr(module, "dilation", 1)
    d = d if isinstance(d, tuple) else (d, d)
    span = tuple(d[a] * (k[a] - 1) + 1 for a in range(2))
    p = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
    out = F.max_pool2d(F.pad(mask, (p[1], p[1], p[0], p[0])), span, module.stride, 0, 1, module.ceil_mode)
    n_out = module(torch.zeros_like(mask, dtype=torch.float64)).shape[-2:]
    return out[..., :n_out[0], :n_out[1]]


def threshold(mask, tau):
    """The bounding box of the changed outputs, cut per axis to max(1, floor(tau * side)) around
    its center."""
    box = torch.zeros_like(mask)
    if not mask.any():
        return box
    spans = []
    for axis in (0, 1):
        hit = mask.any(dim=1 - axis).nonzero()[:, 0]
        a, b = int(hit.min()), int(hit.max()) + 1
        cap = max(1, math.floor(tau * mask.shape[axis]))
        if b - a > cap:
            a += (b - a - cap) // 2
            b = a + cap
        spans.append((a, b))
    box[spans[0][0]:spans[0][1], spans[1][0]:spans[1][1]] = 1
    return box


def naive_thresholded(net, images, targets, patch, stride, fill, tau, spatial):
    """Per copy, layer by layer over full maps: the changed region is thresholded, outputs outside
    it keep their unoccluded values. `spatial`: how many leading modules of the Sequential form the
    chain; the rest runs as it is."""
    net = copy.deepcopy(net).eval()
    modules = list(net)
    N, C, H, W = images.shape
    rows, cols = (H - patch) // stride + 1, (W - patch) // stride + 1
    prob = torch.zeros(N, rows, cols, dtype=images.dtype)
    label = torch.zeros(N, rows, cols, dtype=torch.long)
    with torch.no_grad():
        for n in range(N):
            clean = [images[n:n + 1]]
            for m in modules[:spatial]:
                clean.append(m(clean[-1].clone()))
            for i in range(rows):
                for j in range(cols):
                    x = occluded_copy(images[n], fill, i * stride, j * stride, patch)[None]
                    mask = torch.zeros(H, W, dtype=torch.float64)
                    mask[i * stride:i * stride + patch, j * stride:j * stride + patch] = 1
                    for k, m in enumerate(modules[:spatial]):
                        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                            mask = threshold(changed_outputs(m, mask[None, None])[0, 0] > 0, tau).double()
                        x = torch.where(mask > 0, m(x.clone()), clean[k + 1])
                    for m in modules[spatial:]:
                        x = m(x)
                    prob[n, i, j] = x[0].softmax(0)[targets[n]]
                    label[n, i, j] = x[0].argmax()
    return prob, label


@pytest.mark.parametrize("tau", [0.3, 0.6])
def test_tau_equals_the_naive_thresholded_propagation(tau):
    net = tricky_chain()
    torch.manual_seed(14)
    images = torch.randn(1, 3, 61, 53, dtype=torch.float64)
    spatial = list(dict(net.named_children())).index("flat")
    got = occlusion_maps(net, images, [2], patch=9, stride=7, fill=0.0, tau=tau, incremental=True, max_batch=17)
    assert_maps_equal(got, naive_thresholded(net, images, [2], 9, 7, 0.0, tau, spatial))
    exact = naive_occlusion(net, images, [2], 9, 7, 0.0)
    assert not torch.allclose(got[0], exact[0], rtol=1e-6, atol=1e-9)  # it does approximate


def test_tau_on_the_cifar_net():
    net = cifar_net()
    torch.manual_seed(15)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    spatial = list(dict(net.named_children())).index("flatten")
    got = occlusion_maps(net, images, [4, 5], patch=7, stride=5, fill=0.0, tau=0.5, incremental=True)
    assert_maps_equal(got, naive_thresholded(net, images, [4, 5], 7, 5, 0.0, 0.5, spatial))


# --------------------------------------------------------------------------------------------
# The callback: the automatic path is taken and the logged image is unchanged
# --------------------------------------------------------------------------------------------

def logged_images(net, images, labels, monkeypatch, **forced):
    """What OcclusionSensitivity logs for these probe images, with `occlusion_maps` given `forced`."""
    real = callback_module.occlusion_maps
    monkeypatch.setattr(callback_module, "occlusion_maps", lambda *a, **k: real(*a, **k, **forced))
    cb = OcclusionSensitivity(num_probe=None)
    cb.probe_images, cb.probe_labels = images, labels
    logged = {}
    cb.log_image = lambda trainer, tag, image: logged.__setitem__(tag, image)
    to_input = normalization()
    dm = SimpleNamespace(normalization=to_input, class_names=[f"c{i}" for i in range(10)], num_classes=10)
    trainer = SimpleNamespace(datamodule=dm, loggers=[], global_step=0)
    to_input.inverse = lambda x: x * torch.tensor([0.25, 0.24, 0.26], dtype=x.dtype)[:, None, None] + \
        torch.tensor([0.49, 0.48, 0.45], dtype=x.dtype)[:, None, None]
    cb.visualize(trainer, SimpleNamespace(net=net, device=torch.device("cpu")))
    monkeypatch.setattr(callback_module, "occlusion_maps", real)
    return logged


def test_callback_image_is_the_same_with_the_incremental_path(monkeypatch, spy):
    net = cifar_net()
    torch.manual_seed(16)
    images = normalization()(torch.rand(3, 3, 32, 32, dtype=torch.float64))
    labels = torch.tensor([3, 1, 4])
    automatic = logged_images(net, images, labels, monkeypatch)
    assert len(spy) == 1 and spy[0] is not None  # the callback's defaults take the incremental path
    batched = logged_images(net, images, labels, monkeypatch, incremental=False)
    assert sorted(automatic) == ["occlusion/0", "occlusion/1", "occlusion/2"] == sorted(batched)
    for tag in automatic:
        assert torch.equal(automatic[tag], batched[tag]), tag
