"""Occlusion sensitivity (viz/occlusion.py) against an independent naive loop over patch positions,
and a recording model that shows exactly which occluded inputs reach the network."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

from convlens.viz.occlusion import OcclusionError, occlusion_maps, occlusion_result


def small_net(in_channels=3, num_classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, 4, 3, padding=1), bn=nn.BatchNorm2d(4), relu=nn.ReLU(),
        drop=nn.Dropout(0.5), pool=nn.AdaptiveAvgPool2d(2), flat=nn.Flatten(),
        fc=nn.Linear(16, num_classes),
    )).double()


def naive_occlusion(model, images, targets, patch, stride, fill):
    """One forward pass per image and position, the patch pasted by slicing."""
    model.eval()
    N, C, H, W = images.shape
    rows, cols = (H - patch) // stride + 1, (W - patch) // stride + 1
    prob = torch.zeros(N, rows, cols, dtype=images.dtype)
    label = torch.zeros(N, rows, cols, dtype=torch.long)
    with torch.no_grad():
        for n in range(N):
            for i in range(rows):
                for j in range(cols):
                    x = images[n].clone()
                    y0, x0 = i * stride, j * stride
                    x[:, y0:y0 + patch, x0:x0 + patch] = torch.broadcast_to(
                        torch.as_tensor(fill, dtype=x.dtype), x.shape)[:, y0:y0 + patch, x0:x0 + patch]
                    out = model(x[None])[0]
                    prob[n, i, j] = out.softmax(0)[targets[n]]
                    label[n, i, j] = out.argmax()
    return prob, label


def perturbed_bn(net):
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("patch, stride, size", [(3, 1, (9, 8)), (4, 2, (11, 10)), (9, 3, (9, 9))])
def test_equals_naive_loop(patch, stride, size):
    net = perturbed_bn(small_net())
    torch.manual_seed(1)
    images = torch.randn(3, 3, *size, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2])
    fill = torch.randn(3, *size, dtype=torch.float64)  # position-dependent fill: cut at the patch
    prob, label = occlusion_maps(net, images, targets, patch=patch, stride=stride, fill=fill, max_batch=7)
    expected_prob, expected_label = naive_occlusion(net, images, targets, patch, stride, fill)
    assert prob.shape == ((3, (size[0] - patch) // stride + 1, (size[1] - patch) // stride + 1))
    torch.testing.assert_close(prob, expected_prob, rtol=1e-12, atol=1e-14)
    assert torch.equal(label, expected_label)
    # a scalar fill too, and targets=None meaning the prediction on the unoccluded image
    prob, _ = occlusion_maps(net, images, None, patch=patch, stride=stride, fill=-0.3, max_batch=5)
    with torch.no_grad():
        predicted = net.eval()(images).argmax(1)
    torch.testing.assert_close(prob, naive_occlusion(net, images, predicted, patch, stride, -0.3)[0],
                               rtol=1e-12, atol=1e-14)


def test_chunk_size_does_not_change_the_maps():
    net = perturbed_bn(small_net())
    torch.manual_seed(2)
    images = torch.randn(2, 3, 10, 10, dtype=torch.float64)  # 2 x 36 = 72 occluded copies
    reference = occlusion_maps(net, images, [1, 3], patch=5, stride=1, fill=0.0, max_batch=72)
    for max_batch in (1, 5, 36, 71, 1000, None):  # 5 and 71 do not divide 72
        prob, label = occlusion_maps(net, images, [1, 3], patch=5, stride=1, fill=0.0, max_batch=max_batch)
        torch.testing.assert_close(prob, reference[0], rtol=1e-12, atol=1e-14)
        assert torch.equal(label, reference[1])


def test_stop_ends_the_maps_early_and_marks_what_was_not_computed():
    """`stop` asked before each chunk but the first, with the copies forwarded so far: the copies
    forwarded equal the naive loop's, the rest are NaN / -1 / not known; and both the incremental
    and the full-forward paths stop alike."""
    net = perturbed_bn(small_net())
    torch.manual_seed(4)
    images = torch.randn(2, 3, 9, 8, dtype=torch.float64)  # 2 images x 7 x 6 positions
    expected_prob, expected_label = naive_occlusion(net, images, [0, 4], 3, 1, 0.0)
    for incremental in (None, False):
        asked = []

        def stop(copies):
            asked.append(copies)
            return copies >= 50
        result = occlusion_result(net, images, [0, 4], patch=3, stride=1, fill=0.0, max_batch=6, stop=stop,
                                  incremental=incremental)
        assert asked == [6, 12, 18, 24, 30, 36, 42, 48, 54] and result.copies == 54
        flat_prob, flat_label, known = result.prob.flatten(), result.label.flatten(), result.known.flatten()
        assert known.tolist() == [True] * 54 + [False] * 30
        torch.testing.assert_close(flat_prob[:54], expected_prob.flatten()[:54], rtol=1e-12, atol=1e-14)
        assert torch.equal(flat_label[:54], expected_label.flatten()[:54])
        assert flat_prob[54:].isnan().all() and (flat_label[54:] == -1).all()
    with pytest.raises(OcclusionError, match="stop works with exact maps only"):
        occlusion_result(net, images, [0, 4], patch=3, stride=1, approximate="fast", stop=lambda copies: False)


class Recorder(nn.Module):
    """Logs every batch it is given; logits are a fixed linear function of the image."""

    def __init__(self, channels, size, num_classes=3):
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(channels * size * size, num_classes)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.linear(x.flatten(1))


def test_default_fill_is_gray_in_pixel_space():
    mean = torch.tensor([0.49, 0.48, 0.45])
    std = torch.tensor([0.25, 0.24, 0.26])
    normalize = lambda pixels: (pixels - mean[:, None, None]) / std[:, None, None]  # noqa: E731
    torch.manual_seed(4)
    pixels = torch.rand(2, 3, 8, 8)
    images = normalize(pixels)
    model = Recorder(3, 8)
    occlusion_maps(model, images, [0, 2], patch=3, stride=2, pixel_to_input=normalize, max_batch=4)
    batches = model.seen[1:]  # the first call is the unoccluded images
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2]  # 2 images x 9 positions = 18 copies
    fed = torch.cat(batches).view(2, 3, 3, 3, 8, 8)  # image, row, column of the patch
    gray = (0.5 - mean) / std
    for n in range(2):
        for i in range(3):
            for j in range(3):
                x = fed[n, i, j]
                inside = torch.zeros(8, 8, dtype=torch.bool)
                inside[2 * i:2 * i + 3, 2 * j:2 * j + 3] = True
                # in pixel space the patch is exactly mid-gray, the rest the original image
                torch.testing.assert_close(x[:, inside], gray[:, None].expand(3, 9))
                torch.testing.assert_close(x[:, ~inside], images[n][:, ~inside], rtol=0, atol=0)
                torch.testing.assert_close(x * std[:, None, None] + mean[:, None, None],
                                           torch.where(inside, 0.5, pixels[n]), rtol=0, atol=1e-6)
    # without pixel_to_input, the default is 0.5 in input space
    model = Recorder(3, 8)
    occlusion_maps(model, images, [0, 2], patch=8, max_batch=1)
    assert torch.equal(model.seen[1], torch.full((1, 3, 8, 8), 0.5))


def test_model_mode_is_restored_and_outputs_are_ordinary_tensors():
    net = small_net()
    net.train()
    net.drop.eval()
    modes = [m.training for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    prob, label = occlusion_maps(net, images, patch=2, stride=2, max_batch=4)
    assert [m.training for m in net.modules()] == modes
    assert not prob.is_inference() and not label.is_inference()
    assert label.dtype == torch.long and ((prob >= 0) & (prob <= 1)).all()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval mode: BatchNorm statistics untouched
    with pytest.raises(OcclusionError):
        occlusion_maps(net, images, [9, 0], patch=2)
    assert [m.training for m in net.modules()] == modes


def test_clear_errors():
    net = small_net()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cases = [
        (dict(patch=9), "larger than the images"),
        (dict(patch=0), "patch must be a positive integer"),
        (dict(stride=0), "stride must be a positive integer"),
        (dict(patch=2.5), "patch must be a positive integer"),
        (dict(targets=[0]), "targets has 1 entries for 2 images"),
        (dict(targets=[0, 5]), r"\[0, 5\).*\[5\]"),
        (dict(targets=[0, -1]), r"out-of-range \[-1\]"),
        (dict(targets=torch.tensor([0.0, 1.0])), "integer class indices"),
        (dict(max_batch=0), "max_batch"),
        (dict(fill=torch.zeros(2, 1, 1)), "does not broadcast"),
        (dict(pixel_to_input=lambda x: x[:, :2]), "does not broadcast"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OcclusionError, match=message):
            occlusion_maps(net, images, **kwargs)
    with pytest.raises(OcclusionError, match=r"\(N, C, H, W\)"):
        occlusion_maps(net, images[0])
    with pytest.raises(OcclusionError, match="logits"):
        occlusion_maps(nn.Identity(), images)
