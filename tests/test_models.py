"""Parameter counts from the papers, LeNet's exact layer sequence, forward shapes, VGG16 weights."""
import pytest
import torch
from torch import nn

from convlens.models.cifar import BlogConvNet, CifarConvNet
from convlens.models.lenet import LeNet
from convlens.checkpoints import WeightsError
from convlens.models.vgg import VGG16


def trainable(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_lenet_is_matconvnets_mnist_lenet():
    net = LeNet()
    assert trainable(net) == 431_080
    seq = [(n, type(m).__name__) for n, m in net.named_children()]
    assert seq == [("conv1", "Conv2d"), ("pool1", "MaxPool2d"), ("conv2", "Conv2d"), ("pool2", "MaxPool2d"),
                   ("conv3", "Conv2d"), ("relu3", "ReLU"), ("conv4", "Conv2d"), ("flatten", "Flatten")]
    shapes = [(m.in_channels, m.out_channels, m.kernel_size) for m in net if isinstance(m, nn.Conv2d)]
    assert shapes == [(1, 20, (5, 5)), (20, 50, (5, 5)), (50, 500, (4, 4)), (500, 10, (1, 1))]
    assert all(m.kernel_size == 2 and m.stride == 2 for m in net if isinstance(m, nn.MaxPool2d))
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in net.modules())


def test_lenet_matconvnet_init():
    torch.manual_seed(0)
    net = LeNet(init="matconvnet")
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    weights = torch.cat([m.weight.flatten() for m in convs])  # 430,500 draws of f * randn, f = 1/100
    assert abs(weights.std().item() - 0.01) < 1e-4 and abs(weights.mean().item()) < 1e-4
    with pytest.raises(ValueError, match="'pytorch' or 'matconvnet'"):
        LeNet(init="xavier")


@pytest.mark.parametrize("c3,c4,params", [(64, 32, 217_258), (256, 64, 588_170)])
def test_cifar_grid_net_parameter_counts(c3, c4, params):
    assert trainable(CifarConvNet(c3, c4)) == params


def test_cifar_grid_net_layer_order():
    names = [n for n, _ in CifarConvNet().named_children()]
    assert names[:8] == ["conv1", "relu1", "conv2", "relu2", "pool2", "bn2", "drop2", "conv3"]
    net = CifarConvNet()
    assert net.conv1.padding == (1, 1) and net.conv2.padding == (0, 0)
    assert net.fc1.out_features == 1024 and net.drop5.p == 0.5 and net.drop2.p == 0.25


@pytest.mark.parametrize("size", [28, 32, 64])
def test_forward_shapes(size):
    x1, x3 = torch.randn(2, 1, size, size), torch.randn(2, 3, size, size)
    if size == 28:
        assert LeNet()(x1).shape == (2, 10)
    assert CifarConvNet(64, 32, input_size=size)(x3).shape == (2, 10)
    assert BlogConvNet(input_size=size)(x3).shape == (2, 10)
    if size >= 32:  # VGG16's five 2x2 pools need at least 32x32
        assert VGG16(num_classes=7)(x3).shape == (2, 7)


def test_lenet_rejects_other_sizes_clearly():
    with pytest.raises(ValueError, match="pool"):
        LeNet(pool="median")
    with pytest.raises(ValueError, match="too small"):
        CifarConvNet(input_size=16)


@pytest.mark.slow
def test_vgg16_local_weights_roundtrip_and_new_head(tmp_path):
    src = VGG16(num_classes=1000)
    path = tmp_path / "vgg.pth"
    torch.save(src.state_dict(), path)
    net = VGG16(num_classes=10, weights=str(path))
    assert torch.equal(net.features[0].weight, src.features[0].weight)
    assert net.classifier[6].out_features == 10
    # a Lightning checkpoint of our module ("net." prefix under "state_dict") loads too
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.ckpt")
    net2 = VGG16(num_classes=1000, weights=str(tmp_path / "c.ckpt"))
    assert torch.equal(net2.classifier[6].weight, src.classifier[6].weight)


@pytest.mark.slow
def test_vgg16_mismatched_file_names_the_keys(tmp_path):
    state = VGG16(num_classes=10).state_dict()
    state["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    del state["features.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as e:
        VGG16(num_classes=10, weights=str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "features.2.bias" in msg and "extra.weight" in msg and "features.0.weight" in msg


@pytest.mark.slow
def test_vgg16_weights_file_must_be_plain_tensors(tmp_path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pth")  # a pickled module, not tensors
    with pytest.raises(WeightsError, match="weights_only"):
        VGG16(weights=str(tmp_path / "pickle.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        VGG16(weights=str(tmp_path / "missing.pth"))


def test_vgg16_imagenet_weights_offline_message(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsError, match="model.weights=/path/to"):
        VGG16(weights="imagenet")
