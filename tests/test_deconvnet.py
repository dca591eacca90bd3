"""viz.deconvnet against independent formulations.

Oracle: the deconvnet projection equals autograd's gradient of sum(F_c * F_c.detach()) with
respect to the input, for the model in eval mode, with every ReLU's backward replaced by a ReLU of
the incoming signal (a custom autograd Function swapped in for each ReLU's forward module), and for
unpool="fill" every max pool's gradient that of the sum over its window (a straight-through
module). Plus cases worked out by hand, brute-force loops for the ranking helpers, the
one-map-at-a-time loop for the batched projection, and Captum's NeuronDeconvolution on torchvision
nets.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair

from convlens.models.cifar import BlogConvNet, CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.vgg import VGG16
from convlens.viz import deconvnet
from convlens.viz.deconvnet import (DeconvnetError, fast_dtype, max_activating_images, project, project_many, record,
                           top_units)
from convlens.viz.layers import LayerError, eval_mode, get_layer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# ------------------------------------------------------------------------------------------
# the autograd oracle
# ------------------------------------------------------------------------------------------

class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward is a ReLU of the incoming gradient (the deconvnet's rectification)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _Stop(Exception):
    pass


def _sum_gradient_pool(m: nn.MaxPool2d):
    """The max pool's value, the gradient of the sum over each window (what "fill" sends back)."""
    assert _pair(m.dilation) == (1, 1), "the oracle's window sum has no dilation"

    def forward(x):
        y = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
        s = F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, True, divisor_override=1)
        return y.detach() + (s - s.detach())
    return forward


def oracle(model: nn.Module, images: torch.Tensor, layer: str, channel, unpool: str = "switches") -> torch.Tensor:
    """d/dx sum_n <F_{n,c_n}, stopgrad(F_{n,c_n})>, ReLU backward = ReLU(grad), eval mode; with
    unpool="fill", each MaxPool2d module's gradient spread over its whole window."""
    n = images.shape[0]
    channel = torch.as_tensor(channel).expand(n) if not torch.is_tensor(channel) else channel
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)] if unpool == "fill" else []
    captured = {}

    def grab(module, args, out):
        captured["out"] = out
        raise _Stop

    handle = get_layer(model, layer).register_forward_hook(grab)
    for m in relus:
        m.forward = _DeconvReLU.apply  # instance attribute shadows the class's forward
    for m in pools:
        m.forward = _sum_gradient_pool(m)
    try:
        with eval_mode(model), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            with contextlib.suppress(_Stop):
                model(x)
            fmap = captured["out"][torch.arange(n), channel]
            (grad,) = torch.autograd.grad((fmap * fmap.detach()).sum(), x)
    finally:
        handle.remove()
        for m in relus + pools:
            del m.forward
    return grad


def test_oracle_is_not_plain_autograd():
    """Guard on the oracle itself: its ReLU rule changes the result (else the tests below would
    not check the deconvnet's rectification)."""
    torch.manual_seed(0)
    model = CifarConvNet(c3=16, c4=8).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x = images.clone().requires_grad_(True)
    with eval_mode(model):
        fmap = nn.Sequential(*list(model)[:8])(x)[:, 3]  # conv3
    (plain,) = torch.autograd.grad((fmap * fmap.detach()).sum(), x)
    deconv = oracle(model, images, "conv3", 3)
    assert (plain - deconv).abs().max() > 1e-3 * deconv.abs().max()


def assert_close_rel(actual, expected, rel=1e-10):
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"max relative error {err:.3g} > {rel}"
    assert expected.abs().max() > 0, "the oracle is all zero: the comparison proves nothing"


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            k = m.num_features
            m.running_mean.copy_(torch.randn(k, generator=g))
            m.running_var.copy_(torch.rand(k, generator=g) * 2 + 0.2)
            with torch.no_grad():
                m.weight.copy_(torch.randn(k, generator=g))  # some negative: the sign must survive
                m.bias.copy_(torch.randn(k, generator=g))


def random_channels(model, images, layer, seed=0):
    k = record(model, images, layer).num_units
    return torch.randint(0, k, (images.shape[0],), generator=torch.Generator().manual_seed(seed))


def check_against_oracle(model, images, layer, rel=1e-10, seed=0):
    """project == oracle for random maps, one per image; redraws the maps (a few times) while
    their projections are all zero (e.g. behind a negative BN scale and a ReLU), which would
    prove nothing."""
    for attempt in range(8):
        channel = random_channels(model, images, layer, seed=seed + 1000 * attempt)
        expected = oracle(model, images, layer, channel)
        if expected.abs().max() > 0:
            break
    assert_close_rel(project(model, images, layer, channel), expected, rel)
    return channel


# ------------------------------------------------------------------------------------------
# equality with autograd on the project's nets
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet().double()


@pytest.fixture(scope="module")
def cifar_net():
    torch.manual_seed(0)
    net = CifarConvNet().double()  # the report's c3=256, c4=64
    randomize_batchnorm(net)
    return net


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return VGG16(num_classes=10)


@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "pool2", "conv3", "relu3", "conv4"])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_lenet_equals_autograd(layer, pool):
    torch.manual_seed(0)
    model = LeNet(pool=pool).double()
    images = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    check_against_oracle(model, images, layer)


@pytest.mark.parametrize("layer", ["conv1", "relu1", "conv2", "pool2", "bn2", "drop2", "conv3",
                                   "relu3", "pool3", "conv4", "relu4", "pool4", "drop4"])
def test_cifar_net_with_batchnorm_equals_autograd(cifar_net, layer):
    """BN has random running stats and gammas (some negative): dropping its scale would fail."""
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    check_against_oracle(cifar_net, images, layer)


# features.16: a max pool inside the stack; avgpool: all 13 convs, 5 pools and the adaptive pool
@pytest.mark.parametrize("layer", ["features.16", "avgpool"])
def test_vgg16_equals_autograd(vgg, layer):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    check_against_oracle(vgg, images, layer, rel=1e-4)


def test_torchvision_vgg16_with_inplace_relus(vgg):
    """A plain torchvision vgg16 (in-place ReLUs) gives the projection of our VGG16 (non-in-place)."""
    tv = torchvision.models.vgg16(num_classes=10)
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in tv.modules())
    tv.load_state_dict(vgg.state_dict())
    images = torch.randn(2, 3, 32, 32)
    ours = project(vgg, images, "features.23", torch.tensor([5, 17]))
    assert torch.equal(project(tv, images, "features.23", torch.tensor([5, 17])), ours)
    assert ours.abs().max() > 0


# each entry: a name and a factory of the chain's modules (built inside the test, after seeding)
MODULE_VARIANTS = [
    ("avgpool padding ceil count_include_pad",
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), nn.Conv2d(4, 3, 2)]),
    ("avgpool no pad count",
     lambda: [nn.Conv2d(2, 4, 3), nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
              nn.ReLU(), nn.Conv2d(4, 3, 2)]),
    ("avgpool divisor_override",
     lambda: [nn.Conv2d(2, 4, 3), nn.AvgPool2d(2, divisor_override=3), nn.Conv2d(4, 3, 2)]),
    ("adaptive avg",
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((3, 4)), nn.Conv2d(4, 3, 2)]),
    ("adaptive max",
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d((3, 5)), nn.Conv2d(4, 3, 2)]),
    ("overlapping maxpool padding dilation ceil",
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1, dilation=2, ceil_mode=True),
              nn.Conv2d(4, 3, 2)]),
    ("non-overlapping maxpools: gaps, padding, ceil_mode",  # max_unpool2d places the values
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2, 3, padding=1), nn.Conv2d(4, 4, 1),
              nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 3, 1)]),
    ("overlapping maxpool, grouped conv after",  # the signal reaches the pool not in channels_last
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(4, 4, 2, groups=2)]),
    ("strided dilated conv with leftover",
     lambda: [nn.Conv2d(2, 4, 3, stride=3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(4, 5, 2, stride=2)]),
    ("grouped conv as target",
     lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, groups=2), nn.ReLU()]),
    ("same padding even kernel",
     lambda: [nn.Conv2d(2, 4, 4, padding="same"), nn.ReLU(), nn.Conv2d(4, 3, 2, padding="same")]),
    ("reflect/circular/replicate padding",
     lambda: [nn.Conv2d(2, 4, 3, padding=2, padding_mode="reflect"), nn.ReLU(),
              nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular"),
              nn.Conv2d(3, 3, 3, padding=(1, 2), padding_mode="replicate")]),
    ("batchnorm without affine, dropouts, identity",
     lambda: [nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Dropout2d(0.3), nn.Identity(),
              nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 3, 3)]),
]


@pytest.mark.parametrize("name,make", MODULE_VARIANTS, ids=[name for name, _ in MODULE_VARIANTS])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_module_variants_equal_autograd(name, make):
    torch.manual_seed(0)
    model = nn.Sequential(*make()).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    images = torch.randn(2, 2, 13, 12, dtype=torch.float64)  # odd and even sizes (ceil_mode clipping)
    for i in range(len(model)):
        layer = str(i)
        channel = check_against_oracle(model, images, layer, seed=i)
        # the same maps swapped between the images
        assert_close_rel(project(model, images, layer, channel.flip(0)),
                         oracle(model, images, layer, channel.flip(0)))


def test_batchnorm_without_running_stats_uses_batch_stats_as_constants():
    """track_running_stats=False: eval mode normalizes by the batch's own variance; the projection
    scales by weight/sqrt(batch var + eps), holding the statistics constant (as a bias is)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bn, nn.ReLU(), nn.Conv2d(4, 3, 3)).double()
    images = torch.randn(3, 2, 9, 9, dtype=torch.float64)

    # the oracle: the same net with the batch statistics detached (constants)
    class FrozenStatsBN(nn.Module):
        def forward(self, x):
            mean = x.mean((0, 2, 3), keepdim=True).detach()
            var = x.var((0, 2, 3), unbiased=False, keepdim=True).detach()
            return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)

    frozen = nn.Sequential(model[0], FrozenStatsBN(), model[2], model[3])
    for layer in ["1", "3"]:
        assert torch.allclose(record(model, images, layer).maps, frozen[: int(layer) + 1](images))
        assert_close_rel(project(model, images, layer, 1), oracle(frozen, images, layer, 1))


# ------------------------------------------------------------------------------------------
# worked out by hand
# ------------------------------------------------------------------------------------------

def hand_net() -> nn.Sequential:
    """conv 2x2 (1 -> 2 maps) + ReLU + maxpool 2x2, on one 4x4 image."""
    conv = nn.Conv2d(1, 2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1., 0.], [0., 2.]]],      # map 0: x[i,j] + 2 x[i+1,j+1]
                                        [[[0., -1.], [1., 0.]]]]))   # map 1: x[i+1,j] - x[i,j+1]
        conv.bias.copy_(torch.tensor([-1., 0.]))
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2)).double()


HAND_IMAGE = torch.tensor([[1., 2., 0., 1.],
                           [0., 3., 1., 0.],
                           [2., 0., 1., 1.],
                           [1., 1., 0., 2.]], dtype=torch.float64).view(1, 1, 4, 4)


def test_hand_case_relu_layer():
    # map 0 = x[i,j] + 2 x[i+1,j+1] - 1 = [[6,3,-1],[-1,4,2],[3,-1,4]]; after ReLU r = [[6,3,0],[0,4,2],[3,0,4]]
    # projection (bias ignored): grad[i,j] += r[i,j]*1 and grad[i+1,j+1] += r[i,j]*2
    expected = torch.tensor([[6., 3., 0., 0.],
                             [0., 16., 8., 0.],
                             [3., 0., 12., 4.],
                             [0., 6., 0., 8.]], dtype=torch.float64)
    assert torch.equal(record(hand_net(), HAND_IMAGE, "1").maps[0, 0],
                       torch.tensor([[6., 3., 0.], [0., 4., 2.], [3., 0., 4.]], dtype=torch.float64))
    assert torch.equal(project(hand_net(), HAND_IMAGE, "1", 0)[0, 0], expected)


def test_hand_case_pool_switches():
    # the 2x2 pool over the 3x3 maps sees rows/cols 0..1 only.
    # map 0 there: [[6,3],[0,4]] -> 6, switch (0,0) -> grad[0,0] = 6*1, grad[1,1] = 6*2
    # map 1 = x[i+1,j] - x[i,j+1]: [[-2,3],[-1,-1]] -> ReLU -> 3 at (0,1) -> grad[0,2] = 3*(-1), grad[1,1] = 3*1
    expected0 = torch.zeros(4, 4, dtype=torch.float64)
    expected0[0, 0], expected0[1, 1] = 6, 12
    expected1 = torch.zeros(4, 4, dtype=torch.float64)
    expected1[0, 2], expected1[1, 1] = -3, 3
    two = HAND_IMAGE.repeat(2, 1, 1, 1)
    out = project(hand_net(), two, "2", torch.tensor([0, 1]))
    assert torch.equal(out[0, 0], expected0)
    assert torch.equal(out[1, 0], expected1)


def test_hand_case_pool_fill():
    # "fill": the pooled value fills its whole 2x2 window of the 3x3 map.
    # map 0: 6 on (0..1, 0..1) -> grad = 6 at window + 12 at window shifted by (1,1)
    expected0 = torch.tensor([[6., 6., 0., 0.],
                              [6., 18., 12., 0.],
                              [0., 12., 12., 0.],
                              [0., 0., 0., 0.]], dtype=torch.float64)
    # map 1: 3 on (0..1, 0..1) -> -3 at window shifted by (0,1), +3 at window shifted by (1,0)
    expected1 = torch.tensor([[0., -3., -3., 0.],
                              [3., 0., -3., 0.],
                              [3., 3., 0., 0.],
                              [0., 0., 0., 0.]], dtype=torch.float64)
    out = project_many(hand_net(), HAND_IMAGE, "2", torch.tensor([[0, 1]]), unpool="fill")
    assert torch.equal(out[0, 0, 0], expected0)
    assert torch.equal(out[0, 1, 0], expected1)


def test_fill_with_overlapping_windows_sums_them():
    """maxpool 3 stride 2 on a 5x5 map: windows overlap on row/col 2; fill adds both windows."""
    model = nn.Sequential(nn.MaxPool2d(3, 2)).double()
    images = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    images[0, 0, 0, 0], images[0, 0, 4, 4] = 1.0, 5.0    # pooled 2x2 = [[1,0],[0,5]]
    out = project(model, images, "0", 0, unpool="fill")[0, 0]
    expected = torch.zeros(5, 5, dtype=torch.float64)
    expected[0:3, 0:3] += 1
    expected[2:5, 2:5] += 5
    assert torch.equal(out, expected)
    # with switches, the values go back exactly where they came from
    assert torch.equal(project(model, images, "0", 0)[0, 0], images[0, 0])


# ------------------------------------------------------------------------------------------
# state hygiene
# ------------------------------------------------------------------------------------------

def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


def test_train_mode_does_not_leak_into_the_projection(cifar_net):
    """Modes, flags, hooks, gradients and inference mode: tests/test_viz_contract.py. Here: a net in
    train mode (dropout, BN batch statistics) is projected as in eval mode."""
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cifar_net.train()
    try:
        out = project(cifar_net, images, "conv3", 1)
    finally:
        cifar_net.eval()
    assert_close_rel(out, oracle(cifar_net, images, "conv3", 1))


def test_channel_forms_agree(lenet):
    """An int, a numpy int, a 0-d tensor and a constant [N] tensor name the same map."""
    import numpy as np
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    rec = record(lenet, images, "pool2")
    expected = rec.project(torch.tensor([7, 7]))
    for channel in (7, np.int64(7), torch.tensor(7), torch.tensor([7, 7], dtype=torch.int32)):
        assert torch.equal(rec.project(channel), expected)


def test_result_is_detached(lenet):
    out = project(lenet, torch.randn(1, 1, 28, 28, dtype=torch.float64), "conv2", 3)
    assert not out.requires_grad and out.grad_fn is None


def test_inplace_relu_same_as_not_inplace(cifar_net):
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    relus = [m for m in cifar_net.modules() if isinstance(m, nn.ReLU)]
    plain = project_many(cifar_net, images, "relu4", torch.tensor([[0, 3], [5, 1]]))
    try:
        for m in relus:
            m.inplace = True
        inplace = project_many(cifar_net, images, "relu4", torch.tensor([[0, 3], [5, 1]]))
    finally:
        for m in relus:
            m.inplace = False
    assert torch.equal(plain, inplace) and plain.abs().max() > 0


# ------------------------------------------------------------------------------------------
# batching and ranking
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,unpool", [("conv1", "switches"), ("bn2", "switches"),
                                          ("pool4", "switches"), ("conv3", "fill")])
def test_project_many_equals_one_map_at_a_time(cifar_net, layer, unpool):
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rec = record(cifar_net, images, layer)
    channels = torch.stack([torch.randperm(rec.num_units)[:3] for _ in range(2)])
    many = project_many(cifar_net, images, layer, channels, unpool=unpool)
    assert many.shape == (2, 3, 3, 32, 32)
    for n in range(2):
        for j in range(3):
            one = project(cifar_net, images[n:n + 1], layer, int(channels[n, j]), unpool=unpool)
            assert torch.allclose(many[n, j], one[0], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(fast_dtype("cpu") is None,
                    reason="no native bfloat16 on this CPU, so the deconvnet runs in float32 here; the bound is "
                           "for native kernels (emulated ones were 2.02 gray levels off in one case)")
@pytest.mark.parametrize("net_name,layers", [("lenet", ["conv2", "conv4"]),
                                              ("cifar_net", ["conv2", "conv3", "conv4"])])
def test_bfloat16_reverse_pass_within_a_gray_level_of_the_oracle(net_name, layers, request):
    # the reduced-precision pass, where it is the default (native bfloat16), against the float32
    # autograd oracle: off by at most ~1 gray level of the rendered image (1/255 of each
    # projection's range), in the oracle's dtype
    net = copy.deepcopy(request.getfixturevalue(net_name)).float()
    images = torch.randn(4, *((1, 28, 28) if net_name == "lenet" else (3, 32, 32)))
    for layer in layers:
        rec = record(net, images, layer)
        _, top = rec.top_units(3)
        fast = rec.project_many(top, dtype=torch.bfloat16)
        assert fast.dtype == torch.float32
        for j in range(3):
            expected = oracle(net, images, layer, top[:, j]).flatten(1)
            span = expected.amax(1) - expected.amin(1)
            assert (span > 0).all()
            err = ((fast[:, j].flatten(1) - expected).abs().amax(1) / span).max().item()
            assert err < 2 / 255, f"{layer} map rank {j}: bfloat16 off by {err:.4f} of the range"


def test_dtype_is_checked(lenet):
    with pytest.raises(DeconvnetError, match="floating point torch.dtype"):
        project(lenet, torch.randn(1, 1, 28, 28, dtype=torch.float64), "conv2", 0, dtype=torch.int8)


def test_fast_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert fast_dtype("cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert fast_dtype("cpu") is None
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: float32
    assert fast_dtype(torch.device("cpu")) is None
    assert deconvnet.fast_dtype("meta") is None


def test_project_pairs_equals_projecting_each_pair_alone(cifar_net):
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    rec = record(cifar_net, images, "conv3")
    which = torch.tensor([2, 0, 2, 3, 1])
    maps = torch.tensor([5, 7, 100, 5, 0])
    pairs = rec.project_pairs(which, maps, max_batch=2)
    assert pairs.shape == (5, 3, 32, 32)
    for i in range(5):
        alone = project(cifar_net, images[int(which[i])][None], "conv3", int(maps[i]))[0]
        assert torch.allclose(pairs[i], alone, rtol=1e-12, atol=1e-12)
    assert rec.project_pairs(which[:0], maps[:0]).shape == (0, 3, 32, 32)
    with pytest.raises(DeconvnetError, match="recording holds 4 images"):
        rec.project_pairs(torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(DeconvnetError, match="integer tensor"):
        rec.project_pairs(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(DeconvnetError, match="out of range"):
        rec.project_pairs(torch.tensor([0]), torch.tensor([256]))


def test_max_batch_splits_the_pass_without_changing_the_result(cifar_net):
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    rec = record(cifar_net, images, "pool3")
    channels = torch.tensor([[0, 5], [7, 1], [2, 2]])
    whole = rec.project_many(channels)
    assert torch.allclose(rec.project_many(channels, max_batch=4), whole, rtol=1e-12, atol=1e-12)
    assert torch.allclose(rec.project(channels[:, 1], max_batch=1), whole[:, 1], rtol=1e-12, atol=1e-12)
    with pytest.raises(DeconvnetError, match="max_batch must be a positive int"):
        rec.project_many(channels, max_batch=0)


def test_recording_at_earlier_layer_equals_fresh_recording(cifar_net):
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    deep = record(cifar_net, images, "conv4")
    for layer in ["conv1", "conv2", "bn2", "conv3"]:
        fresh = record(cifar_net, images, layer)
        cut = deep.at(layer)
        assert torch.equal(cut.maps, fresh.maps)
        ch = torch.tensor([1, 4])
        assert torch.equal(cut.project(ch), fresh.project(ch))
    with pytest.raises(LayerError, match="Recorded layers: conv1"):
        deep.at("fc1")


def test_top_maps_against_brute_force(lenet):
    torch.manual_seed(3)
    images = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    maps = nn.Sequential(*list(lenet)[:3])(images)  # conv1, pool1, conv2, without any hooks
    values, indices = top_units(lenet, images, "conv2", 5)
    for n in range(4):
        maxima = [max(maps[n, c].flatten().tolist()) for c in range(maps.shape[1])]
        ranked = sorted(range(len(maxima)), key=lambda c: -maxima[c])[:5]
        assert indices[n].tolist() == ranked
        assert values[n].tolist() == [maxima[c] for c in ranked]


def test_max_activating_images_against_brute_force(cifar_net):
    torch.manual_seed(4)
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    maps = nn.Sequential(*list(cifar_net)[:5])(images)  # up to pool2, without any hooks
    values, image_index = max_activating_images(cifar_net, images, "pool2")
    assert values.shape == image_index.shape == (64,)
    for c in range(64):
        per_image = [max(maps[n, c].flatten().tolist()) for n in range(6)]
        assert values[c].item() == max(per_image)
        assert per_image[image_index[c].item()] == max(per_image)  # the (or a tied) best image


def test_top_maps_feed_project_many(cifar_net):
    """The ranking's indices are what project_many takes; the top map has the largest maximum."""
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rec = record(cifar_net, images, "relu3")
    values, indices = rec.top_units(3)
    out = rec.project_many(indices)
    assert out.shape == (2, 3, 3, 32, 32)
    assert torch.equal(values[:, 0], rec.maps.amax(dim=(1, 2, 3)))


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_unknown_layer(lenet):
    with pytest.raises(LayerError, match="Valid layer names: conv1, pool1"):
        project(lenet, torch.randn(1, 1, 28, 28, dtype=torch.float64), "conv9", 0)


@pytest.mark.parametrize("channel", [20, -1, torch.tensor([0, 20]), torch.tensor([-3, 0])])
def test_channel_out_of_range(lenet, channel):
    with pytest.raises(DeconvnetError, match=r"valid units are 0\.\.19"):
        project(lenet, torch.randn(2, 1, 28, 28, dtype=torch.float64), "conv1", channel)


@pytest.mark.parametrize("channel,message", [
    (torch.tensor([0, 1, 2]), r"shape \[N\] = \[2\]"),
    (torch.tensor([0.0, 1.0]), "integer tensor"),
    (1.5, "an int or an integer tensor"),
])
def test_channel_bad_type_or_shape(lenet, channel, message):
    with pytest.raises(DeconvnetError, match=message):
        project(lenet, torch.randn(2, 1, 28, 28, dtype=torch.float64), "conv1", channel)


def test_project_many_bad_shape(lenet):
    with pytest.raises(DeconvnetError, match=r"shape \[N, k\] = \[2, k\]"):
        project_many(lenet, torch.randn(2, 1, 28, 28, dtype=torch.float64), "conv1", torch.tensor([0, 1]))


@pytest.mark.parametrize("model_name,layer,valid", [
    ("lenet", "flatten", "conv1, pool1, conv2, pool2, conv3, relu3, conv4"),
    ("cifar", "fc1", "conv1, relu1, conv2, relu2, pool2, bn2, drop2, conv3, relu3, pool3, drop3, conv4, relu4, "
                     "pool4, drop4"),
    ("cifar", "relu5", "conv1, relu1, conv2, relu2, pool2, bn2, drop2, conv3, relu3, pool3, drop3, conv4, relu4, "
                       "pool4, drop4"),
])
def test_layer_without_spatial_maps(lenet, cifar_net, model_name, layer, valid):
    model, shape = (lenet, (1, 1, 28, 28)) if model_name == "lenet" else (cifar_net, (1, 3, 32, 32))
    with pytest.raises(LayerError, match="no spatial feature maps") as info:
        project(model, torch.randn(*shape, dtype=torch.float64), layer, 0)
    assert str(info.value).endswith(f"Layers with spatial maps: {valid}")


def test_spatial_layer_after_flatten_is_projected_through_the_reshapes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Unflatten(1, (2, 6, 6)), nn.Conv2d(2, 2, 3))
    # autograd goes through the reshapes: the oracle's projection
    images = torch.randn(2, 1, 8, 8)
    assert_close_rel(project(model, images, "3", 1), oracle(model, images, "3", 1), 1e-6)


def test_vgg_classifier_has_no_spatial_maps(vgg):
    with pytest.raises(LayerError, match="Layers with spatial maps: features.0.*avgpool"):
        top_units(vgg, torch.randn(1, 3, 32, 32), "classifier.0", 1)


def test_other_nonlinearity_gets_its_ordinary_gradient():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3))
    # Tanh's ordinary gradient (as Captum): the oracle's projection
    images = torch.randn(2, 1, 8, 8)
    assert_close_rel(project(model, images, "2", 1), oracle(model, images, "2", 1), 1e-6)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)) + x)


class _FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3)
        self.conv2 = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.conv2(torch.nn.functional.relu(self.conv1(x)))


class _InPlaceBetween(nn.Module):
    """The very tensor conv1 returned reaches conv2, but written to in place in between: only the
    version counter tells it apart from a plain chain."""

    def __init__(self, inplace_relu: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.conv2 = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x.mul_(2)
        return self.conv2(x)


def test_in_place_module_keeps_the_chain():
    # an in-place ReLU module writes to conv1's output: still a chain, and conv1's recorded output
    # must be the value before the ReLU
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3))
    images = torch.randn(2, 2, 9, 9)
    rec = record(model, images, "0")
    torch.testing.assert_close(rec.maps, model[0](images))
    assert (rec.maps < 0).any()
    assert project(model, images, "2", 1).shape == images.shape


@pytest.mark.parametrize("model", [_Residual(), _FunctionalRelu(), _InPlaceBetween(), _InPlaceBetween(True)])
def test_not_a_chain_is_projected(model):
    assert project(model, torch.randn(1, 2, 8, 8), "conv2", 0).shape == (1, 2, 8, 8)
    assert _no_hooks(model)
    assert project(model, torch.randn(1, 2, 8, 8), "conv1", 0).shape == (1, 2, 8, 8)


def test_container_layer_stands_for_its_last_leaf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    images = torch.randn(2, 1, 9, 9)
    assert torch.equal(project(model, images, "1", 2), project(model, images, "1.1", 2))


def test_container_with_functional_ops():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            return self.conv(x) * 2

    model = nn.Sequential(Block())
    images = torch.randn(2, 1, 6, 6)
    assert_close_rel(project(model, images, "0", 2), oracle(model, images, "0", 2), 1e-6)
    assert project(model, torch.randn(1, 1, 6, 6), "0.conv", 0).shape == (1, 1, 6, 6)


def test_unknown_unpool_mode(lenet):
    with pytest.raises(DeconvnetError, match="'switches'.*'fill'"):
        project(lenet, torch.randn(1, 1, 28, 28, dtype=torch.float64), "pool1", 0, unpool="average")


@pytest.mark.parametrize("images", [torch.randn(1, 28, 28), torch.zeros(1, 1, 28, 28, dtype=torch.long),
                                    torch.zeros(0, 1, 28, 28)])
def test_bad_images(lenet, images):
    with pytest.raises(DeconvnetError, match="images"):
        project(lenet.float(), images, "conv1", 0)
    lenet.double()


@pytest.mark.parametrize("k", [0, 21, 2.0])
def test_bad_k(lenet, k):
    with pytest.raises(DeconvnetError, match=r"k must be an int in 1\.\.20"):
        top_units(lenet, torch.randn(1, 1, 28, 28, dtype=torch.float64), "conv1", k)


def test_blog_net_works():
    """The blog's net (pool before ReLU) at both conv layers, against the oracle."""
    torch.manual_seed(0)
    net = BlogConvNet().double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for layer in ["relu1", "relu2"]:
        assert_close_rel(project(net, images, layer, 3), oracle(net, images, layer, 3))


def test_sync_batchnorm_projects_like_batchnorm():
    """DDP's sync_batchnorm turns BatchNorm2d into SyncBatchNorm, identical in eval mode."""
    torch.manual_seed(0)
    net = CifarConvNet(16, 8)
    with torch.no_grad():
        net.bn2.running_var.uniform_(0.5, 2.0)
        net.bn2.weight.uniform_(-1.5, 1.5)
    synced = copy.deepcopy(net)
    synced.bn2 = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(synced.bn2))[0]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(project(synced, x, "conv4", 3), project(net, x, "conv4", 3))


# ------------------------------------------------------------------------------------------
# any network: against Captum, and the oracle on the batched entry points
# ------------------------------------------------------------------------------------------

def captum_projection(model: nn.Module, images: torch.Tensor, layer: str, channel: torch.Tensor) -> torch.Tensor:
    """Captum's NeuronDeconvolution with the activation-weighted selector: the gradient of
    sum(F_c * F_c.detach()) with Captum's ReLU rule, map channel[n] for image n."""
    captum_attr = pytest.importorskip("captum.attr")
    import warnings

    rows = torch.arange(images.shape[0])
    selector = lambda out: (out[rows, channel] * out[rows, channel].detach()).sum((1, 2))  # noqa: E731
    with warnings.catch_warnings(), eval_mode(model):
        warnings.simplefilter("ignore")  # Captum's notes on hooks and requires_grad
        return captum_attr.NeuronDeconvolution(model, get_layer(model, layer)).attribute(
            images.clone(), neuron_selector=selector)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    randomize_batchnorm(net)
    return net


@pytest.mark.parametrize("layer", ["layer1.1.conv2", "layer2.0.downsample.0", "layer3.1.conv1", "layer4.1.bn2",
                                   "layer2"])
def test_equals_captum_on_resnet18(resnet18, layer):
    """Residual sums, a ReLU module reused twice per block (in place), BatchNorm, a container layer."""
    images = torch.randn(3, 3, 64, 64)
    rec = record(resnet18, images, layer)
    _, top = rec.top_units(3)
    projections = rec.project_many(top)
    for j in range(3):
        assert_close_rel(projections[:, j], captum_projection(resnet18, images, layer, top[:, j]), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["features.denseblock1.denselayer3.conv2", "features.transition2.conv"])
def test_equals_captum_on_densenet121(layer):
    """Concatenations (each dense layer reads every earlier map), average pools in transitions."""
    torch.manual_seed(0)
    net = torchvision.models.densenet121(num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    rec = record(net, images, layer)
    _, top = rec.top_units(2)
    projections = rec.project_many(top)
    for j in range(2):
        assert_close_rel(projections[:, j], captum_projection(net, images, layer, top[:, j]), 1e-5)


@pytest.mark.parametrize("net_name, shape", [("lenet", (3, 1, 28, 28)), ("cifar", (3, 3, 32, 32))])
@pytest.mark.parametrize("unpool", ["switches", "fill"])
def test_record_layers_equals_the_oracle(lenet, cifar_net, net_name, shape, unpool):
    net = lenet if net_name == "lenet" else cifar_net
    images = torch.randn(*shape, dtype=torch.float64)
    layers = ["conv1", "conv2", "conv3", "conv4"]
    recordings = deconvnet.record_layers(net, images, layers)  # one forward pass for all four
    for layer in layers:
        rec = recordings[layer]
        assert torch.equal(rec.maps, record(net, images, layer).maps)
        _, top = rec.top_units(3)
        projections = rec.project_many(top, unpool)
        for j in range(3):
            assert_close_rel(projections[:, j], oracle(net, images, layer, top[:, j], unpool))
        # pairs: each map's most activating image (rounds on the recording, or a re-recorded batch)
        _, which = rec.max_activating_images()
        maps = torch.arange(min(6, rec.num_units))
        expected = torch.cat([oracle(net, images[i:i + 1], layer, [c], unpool)
                              for i, c in zip(which[maps].tolist(), maps.tolist())])
        assert_close_rel(rec.project_pairs(which[maps], maps, unpool), expected)


def test_pairs_rounds_and_rerecording_agree(cifar_net):
    """One image in many pairs (re-recorded pseudo-batch) and spread pairs (rounds): both equal
    the oracle of each pair alone."""
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    rec = record(cifar_net, images, "conv3")
    for samples in (torch.tensor([2, 2, 2, 2, 5]), torch.tensor([0, 1, 2, 3, 4, 5, 0])):
        maps = torch.arange(len(samples)) * 3
        expected = torch.cat([oracle(cifar_net, images[s:s + 1], "conv3", [c])
                              for s, c in zip(samples.tolist(), maps.tolist())])
        assert_close_rel(rec.project_pairs(samples, maps), expected)
        assert_close_rel(rec.project_pairs(samples, maps, max_batch=2), expected)


class _Zoo(nn.Module):
    """The operations a chain lacks: a residual sum, one ReLU module reused (in place), functional
    F.relu and F.max_pool2d, a concatenation, a depthwise and a grouped conv, BatchNorm, adaptive
    pooling; and its module-only twin (`modular`), built from the same weights, whose ReLUs are all
    modules (for the module-patching oracle)."""

    def __init__(self, modular: bool = False):
        super().__init__()
        self.modular = modular
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 6, 3, padding=1)
        self.fn_relu = nn.ReLU()
        self.adapt = nn.AdaptiveAvgPool2d(3)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.dw(x)) + x                                 # residual, the ReLU reused
        z = self.fn_relu(self.grouped(y)) if self.modular else torch.nn.functional.relu(self.grouped(y))
        x = torch.cat([self.pool(y), torch.nn.functional.max_pool2d(z, 2)], 1)
        return self.conv3(self.adapt(self.conv2(x)))


@pytest.mark.parametrize("layer", ["dw", "grouped", "conv2", "conv3"])
def test_non_chain_operations_equal_oracle(layer):
    torch.manual_seed(0)
    net = _Zoo().double()
    randomize_batchnorm(net)
    twin = _Zoo(modular=True).double()
    twin.load_state_dict(net.state_dict())
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    channel = torch.tensor([0, 1, 3])
    expected = oracle(twin, images, layer, channel)  # every ReLU a module: the oracle rewrites them all
    assert_close_rel(project(net, images, layer, channel), expected)
    assert _no_hooks(net)


def test_unknown_path_and_bad_layers(resnet18):
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(DeconvnetError, match="Unknown path='fast'"):
        record(resnet18, images, "conv1", path="fast")
    with pytest.raises(LayerError, match="not feature maps"):
        record(resnet18, images, "fc", path="general")
    with pytest.raises(LayerError, match="no spatial feature maps"):
        record(resnet18, images, "fc")
    assert _no_hooks(resnet18)
