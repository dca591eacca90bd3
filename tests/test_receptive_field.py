"""viz/receptive_field.py: receptive-field boxes and supports.

Oracle: the support of the input gradient of one unit. With every conv weight a positive constant,
positive biases, positive images, and each max pool replaced by an average pool (or an all-ones
depthwise conv) of the same geometry, every activation is positive, every ReLU passes, and the
gradient of a unit is a sum of products of positive numbers over the paths from a pixel to it:
nonzero exactly on the pixels connected to the unit. That is the structural support the module
claims to compute, so the comparison is exact (equality of boolean masks, hence of boxes). Max
pooling itself is not a valid oracle: for one image its gradient reaches only the argmax of each
window, a subset of the field. Several units are read in one backward pass by giving each unit its
own copy of the image in the batch (samples do not interact in eval mode).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.vgg import VGG16
from convlens.viz.layers import LayerError
from convlens.viz.receptive_field import ReceptiveFieldError, crop_patches, receptive_field


# -- the oracle ---------------------------------------------------------------------------------

def positive_copy(model: nn.Module, dtype=torch.float64, narrow: bool = False) -> nn.Module:
    """A copy with positive constant weights and biases, max pools as average pools of the same
    geometry (kernel, stride, padding, ceil_mode), in eval mode. `narrow`: every conv made 1 -> 1
    channel (and BatchNorm 1 channel) with the same kernel, stride, padding, dilation and padding
    mode: with constant weights all maps of a layer are equal anyway, so the support is the same,
    at a fraction of the cost (for VGG16); the images must then have 1 channel."""
    # narrow: the convs are swapped while copying (deepcopy's memo), so the wide weights are never copied
    swap = {id(m): _narrow(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))} \
        if narrow else {}
    model = copy.deepcopy(model, swap).to(dtype).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MaxPool2d):
            assert m.dilation in (1, (1, 1)), "no average pool has this geometry"
            _set(model, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                           count_include_pad=False))
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            _set(model, name, nn.AdaptiveAvgPool2d(m.output_size))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data.fill_(1.0 / fan_in)
            if m.bias is not None:
                m.bias.data.fill_(0.1)
    return model


def _narrow(m: nn.Module) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, m.dilation, padding_mode=m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(1)
    return nn.Identity()  # a Linear head: never reached, the oracle stops after the layer


def _set(model, dotted, module):
    parent = model
    *path, last = dotted.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, module)


class StopForward(Exception):
    pass


def gradient_supports(model: nn.Module, image: torch.Tensor, layer: str, units: list[tuple[int, int]],
                      channel: int = 0, narrow: bool = False) -> torch.Tensor:
    """[U, H, W] bool: where d(unit u of `layer`, map `channel`) / d(input) is nonzero."""
    positive = positive_copy(model, image.dtype, narrow)
    if narrow:
        image, channel = image[:, :1], 0
    target = dict(positive.named_modules())[layer]
    maps = []

    def keep_and_stop(_module, _args, out):
        maps.append(out)
        raise StopForward  # what comes after the layer (a head sized for the full widths) is not needed

    handle = target.register_forward_hook(keep_and_stop)
    x = image.expand(len(units), -1, -1, -1).clone().requires_grad_(True)
    try:
        positive(x)
    except StopForward:
        pass
    finally:
        handle.remove()
    out = maps[0]
    assert (out > 0).all(), "the oracle needs every activation positive"
    rows = torch.tensor([u[0] for u in units])
    cols = torch.tensor([u[1] for u in units])
    score = out[torch.arange(len(units)), channel, rows, cols].sum()
    (grad,) = torch.autograd.grad(score, x)
    assert (grad >= 0).all()
    return grad.abs().sum(1) > 0


def sample_units(h: int, w: int, count: int = 64, seed: int = 0) -> list[tuple[int, int]]:
    """Every unit of a small map; else the corners, edge middles, center and random ones."""
    if h * w <= count:
        return [(i, j) for i in range(h) for j in range(w)]
    fixed = {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w // 2), (h // 2, 0),
             (h - 1, w // 2), (h // 2, w - 1), (1, 1), (h - 2, w - 2)}
    g = torch.Generator().manual_seed(seed)
    while len(fixed) < count:
        fixed.add((int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))))
    return sorted(fixed)


def check_against_gradient(model, image, layer, channel=0, narrow=False, count=64):
    field = receptive_field(model, image.float(), layer)
    h, w = field.output_size
    units = sample_units(h, w, count)
    supports = gradient_supports(model, image, layer, units, channel, narrow)
    for (i, j), support in zip(units, supports):
        assert torch.equal(field.support(i, j), support), f"{layer} unit ({i}, {j}): support differs"
        ys, xs = support.nonzero(as_tuple=True)
        expected = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        assert field.box(i, j) == expected, f"{layer} unit ({i}, {j}): box {field.box(i, j)} != {expected}"
    return field


def positive_image(c, h, w, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(1, c, h, w, generator=g, dtype=dtype) + 0.5)


# -- hand-computed: the lecture's example ---------------------------------------------------------

def test_lecture_region_example_kernel_3_stride_2():
    # lecture: kernel 3x3, stride 2x2, Region(3, 4) = (2(3-1) : 2(3-1)+3-1, 2(4-1) : 2(4-1)+3-1)
    # = (4:6, 6:8), a 1-based unit and an inclusive 0-based input range. Ours: 0-based unit (2, 3),
    # exclusive ends.
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, 3, stride=2)))
    field = receptive_field(net, torch.zeros(1, 1, 11, 11), "conv")
    assert field.output_size == (5, 5)
    assert field.box(2, 3) == (4, 6, 7, 9)
    assert (field.size, field.jump, field.start) == ((3, 3), (2, 2), (0, 0))
    assert field.boxes().shape == (5, 5, 4)
    assert field.boxes()[2, 3].tolist() == [4, 6, 7, 9]


def test_two_layers_hand_computed_with_padding_clipping():
    # conv 3x3 pad 1 (field 3, start -1), then maxpool 2/2 (field 4, jump 2, start -1): unit i
    # covers rows 2i-1 .. 2i+2; unit 0 is clipped at the top to rows 0..2, the last unit (3 of an
    # 8-row image) covers 5..8 clipped to 5..7
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, 3, padding=1), pool=nn.MaxPool2d(2)))
    field = receptive_field(net, torch.zeros(1, 1, 8, 8), "pool")
    assert (field.size, field.jump, field.start) == ((4, 4), (2, 2), (-1, -1))
    assert field.box(0, 0) == (0, 0, 3, 3)
    assert field.box(1, 2) == (1, 3, 5, 7)
    assert field.box(3, 3) == (5, 5, 8, 8)
    assert field.patch_size == (4, 4)


# -- the gradient oracle on our models ------------------------------------------------------------

@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "pool2", "conv3", "relu3", "conv4"])
def test_lenet_boxes_equal_gradient_support(layer):
    torch.manual_seed(0)
    field = check_against_gradient(LeNet(), positive_image(1, 28, 28), layer)
    # LeNet has no padding: interior boxes follow the closed form exactly, and conv3 sees it all
    if layer in ("conv3", "relu3", "conv4"):
        assert field.box(0, 0) == (0, 0, 28, 28)


def test_lenet_field_sizes_closed_form():
    sizes = {"conv1": 5, "pool1": 6, "conv2": 14, "pool2": 16, "conv3": 28}
    for layer, size in sizes.items():
        field = receptive_field(LeNet(), torch.zeros(1, 1, 28, 28), layer)
        assert field.size == (size, size), layer
        h, w = field.output_size
        for i in range(h):
            y0, x0, y1, x1 = field.box(i, 0)
            assert (y0, y1) == (i * field.jump[0], i * field.jump[0] + size)


def test_cifar_convnet_boxes_equal_gradient_support():
    net = CifarConvNet()
    for layer in ("conv1", "conv2", "bn2", "conv3", "pool3", "conv4", "pool4"):
        check_against_gradient(net, positive_image(3, 32, 32), layer, narrow=True)


@pytest.fixture(scope="module")
def vgg16():
    return VGG16()


@pytest.mark.parametrize("size,layers", [
    (32, ["features.2", "features.4", "features.9", "features.16", "features.28", "features.30"]),
    pytest.param(64, ["features.7", "features.14", "features.21", "features.30"], marks=pytest.mark.slow)])
def test_vgg16_boxes_equal_gradient_support(vgg16, size, layers):
    for layer in layers:
        check_against_gradient(vgg16, positive_image(3, size, size), layer, narrow=True, count=256)


def test_vgg16_closed_form_sizes(vgg16):
    # the classic VGG16 field sizes: conv1_2 5, pool1 6, pool2 16, pool3 44, pool4 100, conv5_3 196
    expected = {"features.2": 5, "features.4": 6, "features.9": 16, "features.16": 44, "features.23": 100,
                "features.28": 196, "features.30": 212}
    for layer, size in expected.items():
        field = receptive_field(vgg16, torch.zeros(1, 3, 32, 32), layer)
        assert field.size == (size, size), layer
        # away from the borders the box is the unclipped closed-form window
        (start, _), (jump, _) = field.start, field.jump
        inside = [i for i in range(field.output_size[0]) if start + i * jump >= 0 and start + i * jump + size <= 32]
        for i in inside:
            assert field.box(i, i) == (start + i * jump,) * 2 + (start + i * jump + size,) * 2, (layer, i)
    assert receptive_field(vgg16, torch.zeros(1, 3, 32, 32), "features.9").start == (-6, -6)


def test_narrow_oracle_agrees_with_full_width():
    # the narrow (1-channel) oracle gives the gradient supports of the full-width positive copy
    image = positive_image(1, 28, 28)
    units = sample_units(8, 8, count=16)
    assert torch.equal(gradient_supports(LeNet(), image, "conv2", units),
                       gradient_supports(LeNet(), image, "conv2", units, narrow=True))


# -- the tricky cases: strides that leave pixels unread, dilation, ceil_mode, padding modes --------

def tricky_net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 3, 2, stride=2),                          # 13 -> 6: row/col 12 never read
        relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(3, 3, 3, padding=1),                         # the last unit's window reaches the padding
        pool2=nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),  # 6 -> 4 (ceil)
        bn=nn.BatchNorm2d(3),
        conv3=nn.Conv2d(3, 3, 3, padding=2, dilation=2),             # dilated: holes in the support
        drop=nn.Dropout(0.5),
        conv4=nn.Conv2d(3, 3, 4, padding="same"),                    # even kernel: 1 before, 2 after
        conv5=nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        conv6=nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"),
        pool6=nn.AdaptiveAvgPool2d(3),
    ))


@pytest.mark.parametrize("layer", ["conv1", "conv2", "pool2", "bn", "conv3", "conv4", "conv5", "conv6", "pool6"])
def test_tricky_geometry_supports_equal_gradient_support(layer):
    torch.manual_seed(0)
    check_against_gradient(tricky_net(), positive_image(2, 13, 13), layer)


def single(*modules) -> nn.Sequential:
    return nn.Sequential(OrderedDict((f"m{i}", m) for i, m in enumerate(modules)))


# one feature at a time, on maps small enough that the supports do not fill the image
ISOLATED = {
    "same_even_kernel": single(nn.Conv2d(1, 1, 4, padding="same")),
    "reflect_pad2": single(nn.Conv2d(1, 1, 3, padding=2, padding_mode="reflect")),
    "replicate_pad2": single(nn.Conv2d(1, 1, 3, padding=2, padding_mode="replicate")),
    "circular_pad1": single(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")),
    "dilated_pad3": single(nn.Conv2d(1, 1, 3, dilation=2, padding=3)),
    "ceil_mode_pool": single(nn.Conv2d(1, 1, 1), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)),
    "stride_above_kernel": single(nn.Conv2d(1, 1, 1, stride=3), nn.Conv2d(1, 1, 2)),
    "adaptive_pool": single(nn.Conv2d(1, 1, 1), nn.AdaptiveMaxPool2d(3)),
}


@pytest.mark.parametrize("case", sorted(ISOLATED))
def test_isolated_geometry_supports_equal_gradient_support(case):
    net = ISOLATED[case]
    check_against_gradient(net, positive_image(1, 8, 8), list(dict(net.named_children()))[-1])


def test_isolated_geometry_hand_computed():
    def rows(case, i):
        net = ISOLATED[case]
        field = receptive_field(net, torch.zeros(1, 1, 8, 8), list(dict(net.named_children()))[-1])
        return field.row_support[i].nonzero().flatten().tolist()

    assert rows("same_even_kernel", 0) == [0, 1, 2]       # taps -1..2: PyTorch pads 1 before, 2 after
    assert rows("same_even_kernel", 7) == [6, 7]          # taps 6..9
    assert rows("reflect_pad2", 0) == [0, 1, 2]           # taps -2, -1, 0 read 2, 1, 0
    assert rows("replicate_pad2", 0) == [0]               # taps -2, -1, 0 all read 0
    assert rows("circular_pad1", 0) == [0, 1, 7]          # tap -1 reads the last row
    assert rows("dilated_pad3", 0) == [1]                 # taps -3, -1, 1
    assert rows("ceil_mode_pool", 3) == [5, 6, 7]         # window 5..7, cut by the image end
    assert rows("stride_above_kernel", 1) == [3, 6]       # a hole between the subsampled rows
    assert rows("adaptive_pool", 1) == [2, 3, 4, 5]       # [floor(8/3), ceil(16/3)) = [2, 6)


def test_unread_trailing_rows_are_not_in_the_box():
    # conv1 (k2 s2) never reads row 12 of a 13-row image; conv2's last unit reads conv1 rows 4, 5
    # and the padding row 6: its box ends at row 12 (exclusive), although the unclipped window
    # [start + 5 * jump, + size) = [8, 14) clipped to the image would include row 12
    field = receptive_field(tricky_net(), torch.zeros(1, 2, 13, 13), "conv2")
    assert field.box(5, 5) == (8, 8, 12, 12)
    start, jump, size = field.start[0], field.jump[0], field.size[0]
    naive = (max(0, start + 5 * jump), min(13, start + 5 * jump + size))
    assert naive == (8, 13) != (8, 12)


def test_dilated_support_has_holes_and_the_box_bounds_it():
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, 3, dilation=3)))
    field = receptive_field(net, torch.zeros(1, 1, 10, 10), "conv")
    assert field.box(0, 0) == (0, 0, 7, 7)
    assert field.row_support[0].nonzero().flatten().tolist() == [0, 3, 6]
    assert field.size == (7, 7)


# -- patches ---------------------------------------------------------------------------------------

def naive_patch(image, field, i, j, fill):
    """Pixel by pixel: the tile origin per axis is the box start, or box end - tile when the box is
    clipped at the low border; outside the box (or not connected): fill."""
    y0, x0, y1, x1 = field.box(i, j)
    ph, pw = field.patch_size
    oy = y1 - ph if (y0 == 0 and y1 - y0 < ph) else y0
    ox = x1 - pw if (x0 == 0 and x1 - x0 < pw) else x0
    out = torch.full((image.shape[0], ph, pw), fill)
    support = field.support(i, j)
    for a in range(ph):
        for b in range(pw):
            y, x = oy + a, ox + b
            if y0 <= y < y1 and x0 <= x < x1 and support[y, x]:
                out[:, a, b] = image[:, y, x]
    return out


@pytest.mark.parametrize("net,shape,layer", [
    (nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, 3, padding=1), pool=nn.MaxPool2d(2))), (1, 8, 8), "pool"),
    (tricky_net(), (2, 13, 13), "conv2"),
    (tricky_net(), (2, 13, 13), "conv3"),
    (LeNet(), (1, 28, 28), "pool2"),
])
def test_crop_patches_equal_a_pixel_loop(net, shape, layer):
    torch.manual_seed(0)
    field = receptive_field(net, torch.zeros(1, *shape), layer)
    h, w = field.output_size
    units = sample_units(h, w, count=12)
    images = torch.rand(len(units), *shape)
    i = torch.tensor([u[0] for u in units])
    j = torch.tensor([u[1] for u in units])
    patches = crop_patches(images, field, i, j, fill=-1.0)
    assert patches.shape == (len(units), shape[0], *field.patch_size)
    for m, (a, b) in enumerate(units):
        assert torch.equal(patches[m], naive_patch(images[m], field, a, b, -1.0)), (a, b)
    nan_patches = crop_patches(images, field, i, j)
    assert torch.equal(torch.isnan(nan_patches), patches == -1.0)


# -- errors (modes, hooks, flags: tests/test_viz_contract.py) ----------------------------------

def test_errors_are_clear():
    net = LeNet()
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(LayerError, match="Valid layer names: .*conv1"):
        receptive_field(net, x, "conv9")
    with pytest.raises(LayerError, match="no receptive field on the image grid"):
        receptive_field(net, x, "flatten")
    with pytest.raises(ReceptiveFieldError, match=r"\[N, C, H, W\]"):
        receptive_field(net, torch.zeros(1, 28, 28), "conv1")
    with pytest.raises(ReceptiveFieldError, match="floating point"):
        receptive_field(net, torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "conv1")
    up = nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2), conv=nn.Conv2d(1, 1, 3)))
    with pytest.raises(ReceptiveFieldError, match="Upsample"):
        receptive_field(up, torch.zeros(1, 1, 8, 8), "conv", path="chain")  # "auto": the gradient support

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y + x)

    with pytest.raises(ReceptiveFieldError, match="not a plain chain"):
        receptive_field(Residual(), torch.rand(1, 1, 8, 8), "b", path="chain")
    with pytest.raises(ReceptiveFieldError, match="Unknown path"):
        receptive_field(net, x, "conv1", path="fast")
    field = receptive_field(net, x, "conv2")
    with pytest.raises(ReceptiveFieldError, match="valid rows 0..7"):
        field.box(8, 0)
    with pytest.raises(ReceptiveFieldError, match="computed for"):
        crop_patches(torch.zeros(1, 1, 32, 32), field, torch.tensor([0]), torch.tensor([0]))


# -- the gradient support: any network -----------------------------------------------------------

class _LinearResidual(nn.Module):
    """No nonlinearity (so the Jacobian's support is the structural one for random weights): a
    residual sum, a dilated conv, a concatenation, a strided conv with reflect padding."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=2, dilation=2)
        self.c = nn.Conv2d(4, 3, 3, stride=2, padding=1, padding_mode="reflect")
        self.pool = nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y) + y
        return self.pool(self.c(torch.cat([z, y], 1)))


@pytest.mark.parametrize("layer", ["b", "c", "pool"])
def test_gradient_support_equals_the_jacobian_support_of_a_linear_net(layer):
    torch.manual_seed(0)
    net = _LinearResidual().double()
    x = torch.randn(1, 1, 13, 11, dtype=torch.float64)
    field = receptive_field(net, x, layer)
    assert (field.size is None) == (layer != "b")  # "b" is on the chain prefix: the closed form
    h, w = field.output_size
    module = dict(net.named_modules())[layer]
    for i in range(h):
        for j in range(w):
            xi = x.clone().requires_grad_(True)
            out = {}
            handle = module.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
            net(xi)
            handle.remove()
            (grad,) = torch.autograd.grad(out["y"][0, :, i, j].sum(), xi)
            support = grad[0].abs().sum(0) > 0                  # the exact Jacobian support, [H, W]
            # the field is the bounding product of rows and columns (exact for separable supports)
            rows, cols = support.any(1), support.any(0)
            assert torch.equal(field.row_support[i] & rows, rows) and torch.equal(field.col_support[j] & cols, cols)
            y0, x0, y1, x1 = field.box(i, j)
            assert (y0, y1) == (int(rows.nonzero().min()), int(rows.nonzero().max()) + 1), (i, j)
            assert (x0, x1) == (int(cols.nonzero().min()), int(cols.nonzero().max()) + 1), (i, j)


def test_resnet18_fields_equal_its_main_path_chain():
    """A residual block's field is its conv path's (the identity and 1x1-downsample branches see a
    subset): the gradient support on torchvision's ResNet-18 equals the chain composition over the
    main path's modules, an nn.Sequential of the same modules."""
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10).eval()
    main = [net.conv1, net.bn1, nn.ReLU(), net.maxpool]
    for stage in (net.layer1, net.layer2):
        for block in stage:
            main += [block.conv1, block.bn1, nn.ReLU(), block.conv2, block.bn2, nn.ReLU()]
    chain = nn.Sequential(*main)
    x = torch.randn(1, 3, 64, 64)
    for layer, index in (("layer1.1.conv2", 4 + 6 + 3), ("layer2.0.conv2", 4 + 12 + 3),
                         ("layer2.1.conv2", 4 + 18 + 3)):
        general = receptive_field(net, x, layer)
        expected = receptive_field(chain, x, str(index))
        assert general.size is None and expected.size is not None
        assert torch.equal(general.row_support, expected.row_support), layer
        assert torch.equal(general.col_support, expected.col_support), layer
