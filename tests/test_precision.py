"""Training precision and memory format: bf16-mixed by default where bfloat16 is native, float32
elsewhere or on request; channels-last nets compute what contiguous ones do; every callback draws
under mixed precision."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from conftest import FAST_SHAPES, compose_cfg
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


def test_every_callback_draws_under_bf16_mixed(tmp_path):
    cfg = compose_cfg(FAST_SHAPES + ["trainer.max_epochs=1", "trainer.precision=bf16-mixed",
                                     "callbacks=[default,saliency,top_activations,suppression]",
                                     "callbacks.suppression.steps=5", "test=false"], tmp_path)
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.1
    events = read_events(tmp_path / "tensorboard")
    for name in METHODS:
        assert any(t.startswith(f"{name}/") for t in events["images"]), name
        assert f"viz_time/{name}" in events["scalars"], name
