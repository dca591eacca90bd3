"""Every default callback on torchvision's architectures, in a user-style project.

A LightningModule of the user's own (the torchvision model in `self.model`, random init), plain
DataLoaders over a TensorDataset, a real TensorBoardLogger; the callbacks of every method with
`default=True` in `convlens.methods.METHODS`, with their default layers. Each one either logs its
images for each of its layers (read back from the event files, at the epoch's validation step) or
declines with its warning; `fit` always finishes. VGG-11-BN (its 100M-parameter head makes the
training step itself slow), DenseNet-121 and ConvNeXt-T are marked `slow`.
"""
from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from conftest import NetModule
from convlens.events import read_events
from convlens.methods import METHODS

#: small options, so that each method's full path runs in seconds on a CPU
SMALL = {
    "deconv": dict(num_probe=2, k=2, max_units=3, val_images=4),
    "evolution": dict(num_probe=2),
    "decoded": dict(num_probe=2, max_units=8),
    "occlusion": dict(num_probe=1, stride=8),
}
#: tags each method logs per layer ("{layer}" filled in), and once
PER_LAYER = {"deconv": ["deconv/{layer}", "deconv_max/{layer}"], "evolution": ["evolution/{layer}"],
             "decoded": ["decoded/{layer}", "decoded_threshold/{layer}"], "occlusion": []}
ONCE = {"deconv": [], "evolution": ["evolution/summary"], "decoded": [], "occlusion": ["occlusion/0"]}

ZOO = [
    pytest.param("resnet18", 32, id="resnet18"),
    pytest.param("resnet50", 32, id="resnet50", marks=pytest.mark.slow),  # bottlenecks
    pytest.param("mobilenet_v3_small", 64, id="mobilenet_v3_small"),   # Hardswish, squeeze-excitation, in place
    pytest.param("efficientnet_b0", 32, id="efficientnet_b0"),         # SiLU
    pytest.param("vgg11_bn", 32, id="vgg11_bn", marks=pytest.mark.slow),
    pytest.param("densenet121", 32, id="densenet121", marks=pytest.mark.slow),    # concatenations
    pytest.param("convnext_tiny", 64, id="convnext_tiny", marks=pytest.mark.slow),  # LayerNorm, GELU, 7x7 dw
]


def UserModel(arch: str) -> NetModule:
    """A user's LightningModule around a torchvision net, kept as `self.model`."""
    return NetModule(getattr(torchvision.models, arch)(num_classes=4), lr=0.01, attr="model")


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch, size", ZOO)
def test_every_default_callback_draws_or_declines(tmp_path, arch, size):
    torch.manual_seed(0)
    images = torch.randn(8, 3, size, size)
    labels = torch.tensor([0, 1, 2, 3] * 2)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    defaults = [m for m in METHODS.values() if m.default]
    assert {m.name for m in defaults} == set(SMALL)  # a new default method needs an entry here
    callbacks = [m.callback_class()(**SMALL[m.name]) for m in defaults]
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1,
                         callbacks=callbacks, logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(UserModel(arch), loader, loader)
    assert trainer.global_step == len(loader)  # fit finished
    events = read_events(tmp_path / "tb")
    val_step = events["scalars"]["val/acc"]
    messages = [str(w.message) for w in caught]
    for cb in callbacks:
        if cb.declined:
            assert any(f"{type(cb).__name__} is switched off" in m for m in messages), cb.name
            assert not any(tag.startswith(f"{cb.name}/") for tag in events["images"])
            continue
        expected = [t for t in ONCE[cb.name]]
        expected += [t.format(layer=layer) for layer in (cb.layers or []) for t in PER_LAYER[cb.name]]
        assert expected, cb.name
        for tag in expected:
            assert events["images"].get(tag) == val_step, (cb.name, tag, sorted(events["images"]))
        assert events["scalars"][f"viz_time/{cb.name}"] == val_step
    layers = {cb.name: cb.layers for cb in callbacks if cb.layers}
    # the deconvnet methods draw a conv of every stage, every one of them (general path where needed)
    assert len(layers["deconv"]) >= 4 and layers["evolution"] == layers["deconv"]
    assert all(layer.startswith("model.") for layer in layers["deconv"])


def test_the_other_callbacks_on_resnet18(tmp_path):
    """Saliency, TopActivations (gradient-support receptive fields) and KernelSuppression, not
    defaults, in the same user project: each logs for every one of its layers."""
    from convlens.callbacks import KernelSuppression, Saliency, TopActivations

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)), batch_size=4)
    callbacks = [Saliency(num_probe=2), TopActivations(k=2, max_units=2, num_probe=2),
                 KernelSuppression(layers=["model.layer2.0.conv1"], steps=3, num_probe=1, every_n_epochs=1)]
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1,
                         callbacks=callbacks, logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(UserModel("resnet18"), loader, loader)
    events = read_events(tmp_path / "tb")
    val_step = events["scalars"]["val/acc"]
    saliency, top, suppression = callbacks
    assert saliency.layer == "model.layer3.1.conv2"  # the last conv with maps larger than 1x1 at 32x32
    expected = ["saliency/gradcam", "saliency/guided_backprop", "suppression/model.layer2.0.conv1"]
    expected += [f"top_activations/{layer}" for layer in top.layers]
    assert len(top.layers) == 5 and top.fields["model.layer4.1.conv2"].patch_size == (32, 32)
    assert top.fields["model.conv1"].patch_size == (7, 7) and top.fields["model.conv1"].size == (7, 7)
    for tag in expected:
        assert events["images"].get(tag) == val_step, tag
