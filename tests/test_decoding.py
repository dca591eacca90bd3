"""Filter decoding by substitution (viz/decoding.py) against independent oracles:

* a network that is linear (average pools, no ReLU, zero biases) is exactly one correlation with
  its decoded filters, up to the known factor 1/(pool area) per unpooled average pool;
* a literal Python loop that substitutes lower filters scaled by each value and adds overlaps
  (the paper's Fig. 2), on small random nets with BatchNorm, stride-2, dilated and grouped convs;
* brute force for class_max_responses; hand-computed cases for thresholding.
"""
from collections import OrderedDict

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from convlens.models.lenet import LeNet
from convlens.models.cifar import BlogConvNet, CifarConvNet
from convlens.models.vgg import VGG16
from convlens.viz.decoding import (
    DECODING_UNPOOL_MODES, DecodingError, class_max_responses, decode_filters, decoded_geometry,
    decoded_stride, reconstruction_error, threshold_decoded,
)
from convlens.viz.layers import LayerError


def linear_lenet(seed=0):
    """LeNet with average pooling, relu3 removed and zero biases: a linear map of the image."""
    torch.manual_seed(seed)
    net = LeNet(pool="avg").double()
    net.relu3 = nn.Identity()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.zero_()
    return net.eval()


def layer_output(net, name, x):
    out = {}
    handle = dict(net.named_modules())[name].register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    return out["y"]


# ---------------------------------------------------------------- exactness on linear networks

@pytest.mark.parametrize("layer, pools", [("conv1", 0), ("conv2", 1), ("conv3", 2), ("conv4", 2)])
def test_linear_lenet_response_is_one_correlation_with_decoded_filters(layer, pools):
    net = linear_lenet()
    torch.manual_seed(1)
    x = torch.randn(3, 1, 36, 36, dtype=torch.float64)  # 36: conv3/conv4 maps are 3x3, not 1x1
    decoded = decode_filters(net, layer)
    response = layer_output(net, layer, x)
    correlation = F.conv2d(x, decoded, stride=decoded_stride(net, layer))
    assert correlation.shape == response.shape
    # nearest unpooling is the transpose of 2x2 average pooling times 4: one factor 1/4 per pool
    c = 0.25 ** pools
    torch.testing.assert_close(response, c * correlation, rtol=1e-10, atol=1e-12)
    # the same single scalar, fitted by least squares over every channel and position
    fitted = (response * correlation).sum() / (correlation * correlation).sum()
    assert abs(fitted.item() - c) < 1e-10 * c


def test_reconstruction_error_is_zero_on_linear_lenet_and_positive_with_max_pooling():
    torch.manual_seed(2)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    linear = linear_lenet()
    for layer in ("conv2", "conv3", "conv4"):
        mean, std = reconstruction_error(linear, layer, x)
        assert mean < 1e-20 and std < 1e-20
    torch.manual_seed(3)
    maxpool = LeNet(pool="max").double()
    for layer in ("conv2", "conv3", "conv4"):
        mean, std = reconstruction_error(maxpool, layer, x)
        assert mean > 1e-4 and std >= 0
    # a batch iterable (DataLoader style, (images, labels) tuples) gives the same statistics
    streamed = reconstruction_error(maxpool, "conv3", [(x[:4], None), (x[4:], None)])
    assert streamed == pytest.approx(reconstruction_error(maxpool, "conv3", x), rel=1e-12)


def linear_net(kind):
    """Small linear nets (convs, average pools, BatchNorm with zero shift; zero biases) whose only
    padding is at the first layer, so that zero padding the image is what the network does."""
    torch.manual_seed(4)
    if kind == "padded_first":
        layers = [nn.Conv2d(2, 3, 3, padding=2), nn.AvgPool2d(2), nn.Conv2d(3, 4, 3)]
    elif kind == "stride2_bn":
        layers = [nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, stride=2), nn.AvgPool2d(3),
                  nn.Conv2d(4, 2, 2)]
    elif kind == "dilated_grouped":
        layers = [nn.Conv2d(2, 4, 3, dilation=2), nn.Conv2d(4, 6, 3, groups=2), nn.AvgPool2d(2),
                  nn.Conv2d(6, 3, 2, groups=3, dilation=2)]
    net = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-2, 2)
                m.running_mean.zero_()
                m.bias.zero_()
    return net


@pytest.mark.parametrize("kind, factor", [("padded_first", 1 / 4), ("stride2_bn", 1 / 9),
                                          ("dilated_grouped", 1 / 4)])
def test_linear_nets_with_padding_stride_bn_groups_are_exact(kind, factor):
    net = linear_net(kind)
    top = str(len(net) - 1)
    torch.manual_seed(5)
    # 21x21: pools and strides do not divide it, so the network drops rows the correlation keeps
    x = torch.randn(2, 2, 21, 21, dtype=torch.float64)
    g = decoded_geometry(net, top)
    decoded = decode_filters(net, top)
    assert decoded.shape[2:] == g.size
    response = layer_output(net, top, x)
    correlation = F.conv2d(x, decoded, stride=g.stride, padding=g.padding)
    h, w = response.shape[2:]
    assert correlation.shape[2] >= h and correlation.shape[3] >= w
    torch.testing.assert_close(response, factor * correlation[:, :, :h, :w], rtol=1e-10, atol=1e-12)
    assert reconstruction_error(net, top, x)[0] < 1e-20


# ------------------------------------------------------------------- naive substitution oracle

def naive_decode(modules, k, upsample=None):
    """The paper's algorithm written out: filter k of the last conv, then for each module below
    (top to bottom) substitute every value by the lower filter scaled by it (overlaps add up),
    unpool by nearest replication (or `upsample(df, s)`), scale by BatchNorm's weight/sqrt(var+eps)."""
    top = modules[-1]
    w = top.weight.detach()
    in_per_group, out_per_group = top.in_channels // top.groups, top.out_channels // top.groups
    (dh, dw), (kh, kw) = top.dilation, top.kernel_size
    df = torch.zeros(top.in_channels, (kh - 1) * dh + 1, (kw - 1) * dw + 1, dtype=w.dtype)
    g = k // out_per_group
    for a in range(kh):
        for b in range(kw):
            df[g * in_per_group:(g + 1) * in_per_group, a * dh, b * dw] = w[k, :, a, b]
    for m in reversed(modules[:-1]):
        if isinstance(m, nn.Conv2d):
            W = m.weight.detach()
            (s, _), (d, _), (kh, kw) = m.stride, m.dilation, m.kernel_size
            ig, og = m.in_channels // m.groups, m.out_channels // m.groups
            C, h, wd = df.shape
            out = torch.zeros(m.in_channels, (h - 1) * s + d * (kh - 1) + 1, (wd - 1) * s + d * (kw - 1) + 1,
                              dtype=df.dtype)
            for j in range(C):
                group = j // og
                for y in range(h):
                    for x in range(wd):
                        for a in range(kh):
                            for b in range(kw):
                                out[group * ig:(group + 1) * ig, y * s + a * d, x * s + b * d] += \
                                    df[j, y, x] * W[j, :, a, b]
            df = out
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            if upsample is not None:
                df = upsample(df, s)
                continue
            C, h, wd = df.shape
            out = torch.zeros(C, h * s, wd * s, dtype=df.dtype)
            for y in range(h * s):
                for x in range(wd * s):
                    out[:, y, x] = df[:, y // s, x // s]
            df = out
        elif isinstance(m, nn.BatchNorm2d):
            df = df * (m.weight.detach() / torch.sqrt(m.running_var + m.eps))[:, None, None]
    return df


def random_net(kind):
    torch.manual_seed(6)
    if kind == "bn_maxpool":
        layers = [("c1", nn.Conv2d(2, 3, 3)), ("r1", nn.ReLU()), ("p1", nn.MaxPool2d(2)),
                  ("bn", nn.BatchNorm2d(3)), ("d1", nn.Dropout(0.5)), ("c2", nn.Conv2d(3, 4, 3, padding=1)),
                  ("r2", nn.ReLU()), ("p2", nn.AvgPool2d(2)), ("c3", nn.Conv2d(4, 5, 2))]
    elif kind == "stride2":
        layers = [("c1", nn.Conv2d(1, 3, 3, stride=2)), ("r1", nn.ReLU()), ("c2", nn.Conv2d(3, 4, 3, stride=2)),
                  ("p", nn.MaxPool2d(2)), ("c3", nn.Conv2d(4, 3, 2))]
    elif kind == "dilated_grouped":
        layers = [("c1", nn.Conv2d(2, 4, 3, dilation=2)), ("r", nn.LeakyReLU()), ("c2", nn.Conv2d(4, 6, 3, groups=2)),
                  ("p", nn.MaxPool2d(2)), ("c3", nn.Conv2d(6, 3, 2, groups=3, dilation=(2, 1)))]
    net = nn.Sequential(OrderedDict(layers)).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-1, 1)
                m.weight.uniform_(-2, 2)
    return net


@pytest.mark.parametrize("kind", ["bn_maxpool", "stride2", "dilated_grouped"])
def test_decode_filters_equals_naive_substitution_loop(kind):
    net = random_net(kind)
    modules = list(net)
    decoded = decode_filters(net, "c3")
    expected = torch.stack([naive_decode(modules, k) for k in range(modules[-1].out_channels)])
    assert decoded.shape == expected.shape
    torch.testing.assert_close(decoded, expected, rtol=1e-12, atol=1e-12)
    # middle layer too
    middle = decode_filters(net, "c2")
    expected = torch.stack([naive_decode(modules[:modules.index(net.c2) + 1], k) for k in range(net.c2.out_channels)])
    torch.testing.assert_close(middle, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_interpolating_unpool_follows_the_same_substitution_loop(mode):
    net = random_net("bn_maxpool")
    upsample = lambda df, s: F.interpolate(df[None], scale_factor=s, mode=mode, align_corners=False)[0]  # noqa: E731
    expected = torch.stack([naive_decode(list(net), k, upsample) for k in range(net.c3.out_channels)])
    torch.testing.assert_close(decode_filters(net, "c3", unpool=mode), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(decode_filters(net, "c3", unpool="nearest"), expected)


def test_filter_subset_and_chunk_size_give_the_same_filters():
    net = random_net("bn_maxpool")
    full = decode_filters(net, "c3")
    for chunk in (1, 2, 3, 100):
        torch.testing.assert_close(decode_filters(net, "c3", chunk_size=chunk), full, rtol=0, atol=0)
    torch.testing.assert_close(decode_filters(net, "c3", filters=[4, 0, 2], chunk_size=2), full[[4, 0, 2]],
                               rtol=0, atol=0)


# -------------------------------------------------------------------- sizes of the real models

def test_lenet_decoded_sizes_are_the_papers():
    net = LeNet()
    expected = {"conv1": (20, 5), "conv2": (50, 14), "conv3": (500, 28), "conv4": (10, 28)}
    for layer, (count, size) in expected.items():
        for mode in DECODING_UNPOOL_MODES:
            assert decode_filters(net, layer, unpool=mode).shape == (count, 1, size, size)
        assert decoded_geometry(net, layer).size == (size, size)
    assert [decoded_stride(net, layer) for layer in expected] == [(1, 1), (2, 2), (4, 4), (4, 4)]
    # the first layer decodes to its own filters
    torch.testing.assert_close(decode_filters(net, "conv1"), net.conv1.weight.detach(), rtol=0, atol=0)


def test_cifar_nets_decode_with_padding_in_geometry():
    net = CifarConvNet(c3=8, c4=6)
    assert decode_filters(net, "conv4").shape == (6, 3, 20, 20)
    assert decoded_geometry(net, "conv4") == ((20, 20), (4, 4), (1, 1))
    blog = BlogConvNet()
    # conv1 pads 2; conv2 pads 2 at stride 2 from the input: 2 + 2 * 2
    assert decoded_geometry(blog, "conv2") == ((14, 14), (2, 2), (6, 6))
    mean, _ = reconstruction_error(net, "conv3", torch.randn(2, 3, 32, 32))
    assert 0 <= mean <= 1


@pytest.mark.slow
def test_vgg16_last_conv_decodes_a_few_filters():
    torch.manual_seed(7)
    net = VGG16()
    g = decoded_geometry(net, "features.28")
    assert g == ((196, 196), (16, 16), (90, 90))
    decoded = decode_filters(net, "features.28", filters=[0, 511], chunk_size=1)
    assert decoded.shape == (2, 3, 196, 196)
    assert torch.isfinite(decoded).all() and decoded.abs().sum() > 0


def test_reconstruction_error_input_errors():
    """Modes, flags, hooks, weights and buffers: tests/test_viz_contract.py."""
    net = CifarConvNet(c3=8, c4=6)
    with pytest.raises(DecodingError):
        reconstruction_error(net, "conv3", torch.randn(2, 1, 32, 32))
    with pytest.raises(DecodingError, match="smaller than the decoded filters"):
        reconstruction_error(net, "conv4", torch.randn(2, 3, 12, 12))

    def fail_on_batches(module, args):  # the dummy trace (batch 1) passes, the real forward fails
        if args[0].shape[0] > 1:
            raise RuntimeError("forward failed")

    handle = net.conv2.register_forward_pre_hook(fail_on_batches)
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            reconstruction_error(net, "conv3", torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()


# ------------------------------------------------------------------------------ Fig. 1 helpers

def test_class_max_responses_matches_brute_force_when_streamed():
    torch.manual_seed(8)
    decoded = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    images = torch.randn(30, 2, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,))  # class 4 of 5 never occurs
    # a tie at the top: image 3 (first batch) and 17 (third batch) both give filter 0's largest
    # response to class 1; the earlier image must win
    images[3] = 10 * decoded[0]
    images[17], labels[17], labels[3] = images[3], 1, 1
    best, seen = None, 0
    for batch in (slice(0, 7), slice(7, 14), slice(14, 21), slice(21, 30)):
        best = class_max_responses(decoded, images[batch], labels[batch], 5, running=best, index_offset=seen)
        seen += len(images[batch])
    values, index = best
    for k in range(4):
        for c in range(5):
            top, where = float("-inf"), -1
            for n in range(30):
                if labels[n] == c:
                    score = float((decoded[k] * images[n]).sum())
                    if score > top:
                        top, where = score, n
            assert index[k, c] == where
            assert values[k, c].item() == pytest.approx(top, rel=1e-12) if where >= 0 else values[k, c] == float("-inf")
    assert index[0, 1] == 3
    one_shot = class_max_responses(decoded, images, labels, 5)
    assert torch.equal(one_shot[1], index)


def test_threshold_decoded_hand_case():
    decoded = torch.tensor([[[[1.0, -0.6, 0.4], [-1.0, 0.0, 0.5]]],
                            [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
                            [[[10.0, -3.0, 5.0], [-6.0, 4.9, 0.0]]]])
    out = threshold_decoded(decoded, q=0.5)
    expected = torch.tensor([[[[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0]]],
                             [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
                             [[[1.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]]])
    assert torch.equal(out, expected)
    with pytest.raises(DecodingError, match="q must"):
        threshold_decoded(decoded, q=0)


# ------------------------------------------------------------------------------------- errors

def test_clear_errors():
    net = LeNet()
    with pytest.raises(LayerError, match="conv1.*conv2.*conv3.*conv4"):
        decode_filters(net, "pool1")
    with pytest.raises(LayerError, match="Unknown layer"):
        decode_filters(net, "conv9")
    with pytest.raises(DecodingError, match="nearest, bilinear, bicubic"):
        decode_filters(net, "conv2", unpool="lanczos")
    with pytest.raises(DecodingError, match="nearest"):
        reconstruction_error(net, "conv2", torch.randn(1, 1, 28, 28), unpool="area")
    with pytest.raises(DecodingError, match=r"\[0, 50\)"):
        decode_filters(net, "conv2", filters=[0, 50])
    with pytest.raises(DecodingError, match="chunk_size"):
        decode_filters(net, "conv2", chunk_size=0)
    with pytest.raises(DecodingError, match="same C, H, W"):
        class_max_responses(torch.randn(2, 1, 28, 28), torch.randn(3, 1, 14, 14), torch.zeros(3), 10)
    with pytest.raises(DecodingError, match="labels must lie"):
        class_max_responses(torch.randn(2, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 10]), 10)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv3 = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv3(self.conv2(x) + self.conv1(x))


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv2(F.relu(self.pool(self.conv1(x))))


class FunctionalPool(FunctionalReLU):
    def forward(self, x):
        return self.conv2(F.max_pool2d(self.conv1(x), 2))


def test_functional_relu_is_passed_through():
    torch.manual_seed(9)
    net = FunctionalReLU().double()
    expected = naive_decode([net.conv1, net.pool, net.conv2], 1)
    torch.testing.assert_close(decode_filters(net, "conv2")[1], expected, rtol=1e-12, atol=1e-12)


def test_unsupported_models_are_refused():
    with pytest.raises(DecodingError, match="plain chain"):
        decode_filters(FunctionalPool(), "conv2")
    with pytest.raises(DecodingError, match="plain chain"):
        decode_filters(Residual(), "conv3")
    net = nn.Sequential(OrderedDict(c1=nn.Conv2d(1, 2, 3), n=nn.LocalResponseNorm(2), c2=nn.Conv2d(2, 2, 3)))
    with pytest.raises(DecodingError, match="LocalResponseNorm"):
        decode_filters(net, "c2")
