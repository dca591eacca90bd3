"""viz/saliency.py (Grad-CAM, guided backpropagation, guided Grad-CAM) and the Saliency callback.

Oracles: captum's `LayerGradCam` (+ `LayerAttribution.interpolate`), `GuidedBackprop` and
`GuidedGradCam` (on LeNet, the CIFAR net and a torchvision ResNet-18), an implementation
independent of ours (captum uses module backward hooks, we use forward hooks and an autograd
function); the CAM identity of Grad-CAM (for maps followed by global
average pooling and a linear layer, Grad-CAM is ReLU(sum_k w_ck A^k) / (h w), Selvaraju et al.,
section 3.1), computed by hand from the weights; and the same net with non-in-place ReLUs for the
in-place case. The callback's drawn tiles are compared pixel by pixel with captum's maps rendered.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchvision.models.vgg import make_layers

from convlens.render import (CAPTION_LINE_H, as_rgb, class_caption, fit_caption, heatmap, scale_symmetric, to_pixels,
                             upscale)
from convlens.callbacks.saliency import Saliency
from convlens.viz.saliency import default_saliency_layer
from conftest import read_events
from convlens.datamodules.shapes import ShapesDataModule
from convlens.models.cifar import CifarConvNet
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule
from convlens.viz.layers import LayerError
from convlens.viz.saliency import SaliencyError, grad_cam, guided_backprop, guided_grad_cam, upsample

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # captum's notes on hooks and grads
              pytest.mark.usefixtures("one_thread")]


def lenet():
    torch.manual_seed(0)
    return LeNet().double().eval()


def cifar():
    torch.manual_seed(0)
    return CifarConvNet(c3=16, c4=8).double().eval()


def images(shape, n=4, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def resnet18():
    """Residual sums and one in-place ReLU module reused twice per block (torchvision's BasicBlock),
    BatchNorm with random statistics."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.double().eval()


NETS = {"lenet": (lenet, (1, 28, 28), ["conv1", "conv2", "conv3"]),
        "cifar": (cifar, (3, 32, 32), ["conv2", "pool2", "conv3", "relu4", "conv4"]),
        "resnet18": (resnet18, (3, 32, 32), ["layer1.0.conv2", "layer2.1.bn2", "layer3"])}


def module(net, name):
    return dict(net.named_modules())[name]


# -- Grad-CAM, guided backprop, guided Grad-CAM against captum -----------------------------------

@pytest.mark.parametrize("name", sorted(NETS))
def test_grad_cam_equals_captum(name):
    make, shape, layers = NETS[name]
    net, x = make(), images(NETS[name][1])
    predicted = net(x).argmax(1)
    negative = False
    for layer in layers:
        ours = grad_cam(net, x, layer)                                   # predicted class
        theirs = LayerGradCam(net, module(net, layer)).attribute(x, target=predicted, relu_attributions=True)
        assert ours.shape == theirs.shape[:1] + theirs.shape[2:]
        assert torch.allclose(ours, theirs[:, 0], rtol=1e-10, atol=1e-12), layer
        raw = grad_cam(net, x, layer, target=3, relu=False)
        theirs = LayerGradCam(net, module(net, layer)).attribute(x, target=3)
        assert torch.allclose(raw, theirs[:, 0], rtol=1e-10, atol=1e-12), layer
        negative |= bool((raw < 0).any())
    assert negative  # the final ReLU matters somewhere: relu=True and relu=False were both checked


@pytest.mark.parametrize("name", sorted(NETS))
def test_guided_backprop_equals_captum(name):
    make, shape, _ = NETS[name]
    net, x = make(), images(shape)
    target = torch.tensor([0, 3, 9, 3])
    ours = guided_backprop(net, x, target)
    theirs = GuidedBackprop(net).attribute(x.clone(), target=target)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().max() > 0
    # guided backprop differs from the plain gradient (the oracle is not trivially met)
    xg = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(xg).gather(1, target[:, None]).sum(), xg)
    assert not torch.allclose(ours, plain)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_guided_grad_cam_and_upsample_equal_captum(mode):
    net, x = cifar(), images((3, 32, 32))
    predicted = net(x).argmax(1)
    ours = guided_grad_cam(net, x, "conv4", interpolate_mode=mode)
    theirs = GuidedGradCam(net, net.conv4).attribute(x.clone(), target=predicted, interpolate_mode=mode)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    resnet, xr = resnet18(), images((3, 32, 32), n=2)
    predicted = resnet(xr).argmax(1)
    ours = guided_grad_cam(resnet, xr, "layer3.1.conv2", interpolate_mode=mode)
    theirs = GuidedGradCam(resnet, resnet.layer3[1].conv2).attribute(xr.clone(), target=predicted,
                                                                    interpolate_mode=mode)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14) and ours.abs().max() > 0
    cam = grad_cam(net, x, "conv4")
    assert torch.equal(upsample(cam, (32, 32), mode), LayerAttribution.interpolate(cam[:, None], (32, 32), mode)[:, 0])


def test_grad_cam_is_cam_for_global_average_pooling():
    # CAM architecture: maps A (K=5, 6x6) -> global average pool -> linear. dy^c/dA^k_ij = w_ck / 36
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 5, 3), relu=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1),
                                    flat=nn.Flatten(), fc=nn.Linear(5, 4))).double()
    x = images((2, 8, 8), n=3)
    with torch.no_grad():
        maps = net.relu(net.conv(x))
    for c in range(4):
        expected = torch.einsum("k,nkij->nij", net.fc.weight[c].detach(), maps).relu() / 36
        assert torch.allclose(grad_cam(net, x, "relu", c), expected, rtol=1e-12, atol=1e-15)


# -- in-place ReLUs (torchvision's VGG) -----------------------------------------------------------

def vgg_like(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(features=make_layers([8, 8, "M", 16, "M"]), flatten=nn.Flatten(),
                                    classifier=nn.Linear(16 * 4 * 4, 10))).double().eval()
    if not inplace:
        for m in net.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
    return net


def test_inplace_relus_give_the_same_maps_as_plain_ones():
    inplace, plain = vgg_like(True), vgg_like(False)
    assert any(m.inplace for m in inplace.modules() if isinstance(m, nn.ReLU))  # torchvision's builder
    x = images((3, 16, 16))
    # features.3 is a conv followed by ReLU(inplace=True), features.4 that ReLU
    for layer in ("features.0", "features.3", "features.4", "features.5"):
        assert torch.equal(grad_cam(inplace, x, layer), grad_cam(plain, x, layer)), layer
        theirs = LayerGradCam(plain, module(plain, layer)).attribute(x, target=plain(x).argmax(1),
                                                                     relu_attributions=True)[:, 0]
        assert torch.allclose(grad_cam(inplace, x, layer), theirs, rtol=1e-10, atol=1e-14), layer
    assert torch.equal(guided_backprop(inplace, x, 2), guided_backprop(plain, x, 2))
    assert torch.allclose(guided_backprop(inplace, x, 2), GuidedBackprop(plain).attribute(x.clone(), target=2),
                          rtol=1e-10, atol=1e-14)


# -- errors (modes, flags, hooks, grads: tests/test_viz_contract.py) ------------------------------

def test_target_errors_and_eval_mode():
    """Modes, flags, hooks, gradients, no_grad and inference mode: tests/test_viz_contract.py."""
    net = CifarConvNet(c3=16, c4=8)
    net.train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(SaliencyError, match="target class 10 is out of range"):
        grad_cam(net, x, "conv3", target=10)
    with pytest.raises(SaliencyError, match="out of range"):
        guided_backprop(net, x, target=torch.tensor([1, -1]))
    # Dropout is off (eval mode): two calls agree although the net is in train mode
    assert torch.equal(grad_cam(net, x, "conv4"), grad_cam(net, x, "conv4"))


def test_errors_are_clear():
    net = lenet()
    x = images((1, 28, 28))
    with pytest.raises(LayerError, match="Valid layer names: .*conv1"):
        grad_cam(net, x, "conv7")
    with pytest.raises(LayerError, match="spatial maps"):
        grad_cam(net, x, "flatten")
    with pytest.raises(SaliencyError, match=r"\[N, C, H, W\]"):
        guided_backprop(net, x[0])
    with pytest.raises(SaliencyError, match="floating point"):
        guided_backprop(net, x.to(torch.uint8))
    with pytest.raises(SaliencyError, match="one integer class per image"):
        grad_cam(net, x, "conv2", target=torch.tensor([1, 2]))
    with pytest.raises(SaliencyError, match="None .*int"):
        grad_cam(net, x, "conv2", target="cat")


# -- the callback -------------------------------------------------------------------------------

def test_default_layer_is_the_last_conv_with_spatial_maps():
    assert default_saliency_layer(LeNet(), torch.zeros(1, 1, 28, 28)) == "conv2"   # conv3, conv4: 1x1
    assert default_saliency_layer(CifarConvNet(c3=8, c4=8), torch.zeros(1, 3, 32, 32)) == "conv4"
    vgg = nn.Sequential(OrderedDict(features=make_layers([8, "M", 8, "M", 8, "M", 8, "M", 8, "M"])))
    assert default_saliency_layer(vgg, torch.zeros(1, 3, 32, 32)) == "features.12"   # 2x2 maps
    assert default_saliency_layer(vgg, torch.zeros(1, 3, 16, 16)) == "features.9"    # its last is 1x1


@pytest.fixture(scope="module")
def shapes():
    dm = ShapesDataModule(n_train=128, n_test=32, val_size=64, batch_size=32, channels=3, image_size=32)
    dm.setup("fit")
    return dm


def grid_tile(grid, row, col, n, hw, left, caption_h=12, pad=2):
    th, tw = hw
    y = pad + row * (th + pad + caption_h)
    x = left + pad + col * (tw + pad)
    return grid[:, y:y + th, x:x + tw]


def test_callback_tiles_are_captums_maps_rendered(shapes):
    torch.manual_seed(0)
    net = CifarConvNet(c3=16, c4=8)
    cb = Saliency(num_probe=4, alpha=0.4, tile_size=64, target="predicted")
    pl_module = SimpleNamespace(net=net, device=torch.device("cpu"))
    trainer = SimpleNamespace(datamodule=shapes, global_step=3, loggers=[], sanity_checking=False)
    cb.setup(trainer, pl_module, "fit")
    cb.on_fit_start(trainer, pl_module)
    assert cb.layer == "conv4"
    logged = {}
    cb.log_image = lambda trainer, tag, image: logged.__setitem__(tag, image)
    cb.visualize(trainer, pl_module)
    x = cb.probe_images
    net.eval()
    predicted = net(x).argmax(1)
    cam = LayerGradCam(net, net.conv4).attribute(x, target=predicted, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, (32, 32), "bilinear")[:, 0].detach()
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    pixels = as_rgb(to_pixels(x, shapes.normalization))
    overlay = 0.6 * pixels + 0.4 * heatmap(cam, "jet")
    guided = GuidedBackprop(net).attribute(x.clone(), target=predicted).detach()
    left_cam = 8 + 6 * len("Grad-CAM conv4")
    left_guided = 8 + 6 * len("guided Grad-CAM")
    upsampled_cam = LayerAttribution.interpolate(
        LayerGradCam(net, net.conv4).attribute(x, target=predicted, relu_attributions=True), (32, 32),
        "bilinear").detach()
    # class names too long for a tile take two caption lines (render.fit_caption)
    names = [class_caption(y, shapes.class_names) for y in torch.cat([cb.probe_labels, predicted])]
    caption_h = CAPTION_LINE_H * max(fit_caption(n, 64, lines=2).count("\n") + 1 for n in names)
    for i in range(4):
        for row, want, grid, left in [
            (0, pixels[i], logged["saliency/gradcam"], left_cam),
            (1, overlay[i], logged["saliency/gradcam"], left_cam),
            (1, as_rgb(scale_symmetric(guided))[i], logged["saliency/guided_backprop"], left_guided),
            (2, as_rgb(scale_symmetric(guided * upsampled_cam))[i], logged["saliency/guided_backprop"], left_guided),
        ]:
            drawn = grid_tile(grid, row, i, 4, (64, 64), left, caption_h=caption_h)
            expected = upscale(want[None].float(), 64)[0]
            assert (drawn - expected).abs().max() <= 1 / 255 + 1e-5, (i, row)


def test_callback_logs_both_images_each_epoch(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = ShapesDataModule(n_train=160, n_test=32, val_size=32, batch_size=32)
    module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    cb = Saliency(num_probe=3)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=2, callbacks=[cb],
                         logger=TensorBoardLogger(tmp_path, name="tb", version=""), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    events = read_events(tmp_path / "tb")
    assert cb.layer == "conv2"
    # 128 train images / 32 per step: epochs end at steps 4 and 8, their val scalars land on 3 and 7
    assert sorted(events["scalars"]["val/acc"]) == [3, 7]
    for tag in ("saliency/gradcam", "saliency/guided_backprop"):
        assert sorted(events["images"][tag]) == [3, 7]          # the epochs' validation steps
    assert sorted(events["scalars"]["viz_time/saliency"]) == [3, 7]
    assert all(not m._forward_hooks and not m._backward_hooks for m in module.modules())


def test_callback_argument_errors(shapes):
    with pytest.raises(ValueError, match="target"):
        Saliency(target="label")
    with pytest.raises(ValueError, match="alpha"):
        Saliency(alpha=1.5)
    with pytest.raises(ValueError, match="colormap"):
        Saliency(cmap="no-such-map")
    with pytest.raises(ValueError, match="one layer name"):
        Saliency(layer=["conv1", "conv2"])
    with pytest.raises(ValueError, match="tile_size"):
        Saliency(tile_size=0)
    net = LeNet()
    pl_module = SimpleNamespace(net=net, device=torch.device("cpu"))
    with pytest.raises(LayerError, match="Valid layer names"):
        Saliency(layer="conv9").setup(None, pl_module, "fit")
    gray = ShapesDataModule(n_train=64, n_test=16, val_size=16)
    trainer = SimpleNamespace(datamodule=gray)
    cb = Saliency(layer="flatten")
    cb.setup(trainer, pl_module, "fit")
    with pytest.raises(LayerError, match="not spatial maps"):
        cb.on_fit_start(trainer, pl_module)
