"""Training precision and memory format: bf16-mixed by default where bfloat16 is native, float32
elsewhere or on request; channels-last nets compute what contiguous ones do; every callback draws
under mixed precision."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from conftest import FAST_SHAPES, SMALL, compose_cfg
from convlens import config
from convlens.events import read_events
from convlens.methods import METHODS
from convlens.models.cifar import CifarConvNet
from convlens.models.module import ClassifierModule
from convlens.train import train


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"),
                                                         (False, False, "32-true")])
def test_cpu_precision_follows_the_hardware(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert config.fast_precision("cpu") == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.fast_precision("auto") == expected


def test_gpu_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert config.fast_precision("gpu") == config.fast_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert config.fast_precision("gpu") == "16-mixed"


def test_the_config_default_and_the_override(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "native_bf16", lambda accelerator="auto": True)
    assert compose_cfg(["experiment=shapes_demo"], tmp_path).trainer.precision == "bf16-mixed"
    cfg = compose_cfg(["experiment=shapes_demo", "trainer.precision=32-true"], tmp_path)
    assert cfg.trainer.precision == "32-true"
    monkeypatch.setattr(config, "native_bf16", lambda accelerator="auto": False)
    assert compose_cfg(["experiment=shapes_demo"], tmp_path).trainer.precision == "32-true"


def test_channels_last_computes_what_contiguous_computes():
    torch.manual_seed(0)
    net = CifarConvNet(c3=16, c4=8).eval()
    reference = ClassifierModule(net, optimizer=partial(torch.optim.Adam, lr=1e-3))
    x = torch.randn(4, 3, 32, 32)
    expected = reference(x).detach()
    fast = ClassifierModule(CifarConvNet(c3=16, c4=8), optimizer=partial(torch.optim.Adam, lr=1e-3),
                            channels_last=True)
    fast.load_state_dict(reference.state_dict())
    fast.eval()
    assert fast.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    loss, preds, _ = fast._step((x, torch.zeros(4, dtype=torch.long)))
    torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(preds, expected.argmax(1))


@pytest.mark.slow
def test_every_callback_draws_under_bf16_mixed(tmp_path):
    cfg = compose_cfg(FAST_SHAPES + ["trainer.max_epochs=1", "trainer.precision=bf16-mixed",
                                     f"callbacks=[{','.join(METHODS)}]", "test=false"]
                      + [o for m in METHODS for o in SMALL[m]], tmp_path)
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.1
    events = read_events(tmp_path / "tensorboard")
    for name in METHODS:
        assert any(t.startswith(f"{name}/") for t in events["images"]), name
        assert f"viz_time/{name}" in events["scalars"], name


def test_resident_data_stays_on_the_training_device(tmp_path):
    import lightning.pytorch as pl

    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.lenet import LeNet

    dm = ShapesDataModule(n_train=128, n_test=32, val_size=32, batch_size=32, resident=True)
    module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.01))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert dm.train_set.images.device == trainer.strategy.root_device and not dm.pin_memory
    assert trainer.global_step == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (resident splits on the device)")
def test_resident_data_on_a_gpu(tmp_path):
    import lightning.pytorch as pl

    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.lenet import LeNet

    dm = ShapesDataModule(n_train=128, n_test=32, val_size=32, batch_size=32, resident=True)
    module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.01))
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert dm.train_set.images.is_cuda and dm.val_set.images.is_cuda


@pytest.mark.slow
def test_compiled_training_forward_gives_the_plain_loss_and_keeps_layer_names():
    torch.manual_seed(0)
    from convlens.models.lenet import LeNet

    plain = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.01))
    compiled = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.01), compile=True)
    compiled.load_state_dict(plain.state_dict())
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    plain.train(), compiled.train()
    torch.testing.assert_close(compiled._step(batch)[0], plain._step(batch)[0], rtol=1e-4, atol=1e-5)
    assert [n for n, _ in compiled.named_modules()] == [n for n, _ in plain.named_modules()]
    assert compiled.state_dict().keys() == plain.state_dict().keys()
