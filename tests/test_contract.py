"""The plugin contract: no visualization ever stops a user's training.

Every callback x models {an MLP with no conv, a chain CNN, torchvision's ResNet-18, a net whose
last maps are 1x1} x Lightning modes {fast_dev_run, overfit_batches, limit_*_batches, validate
only, test only, resume after a declined callback, DDP spawn (slow)}, with the callbacks built
from the project's Hydra configs: `fit` always finishes, each callback either logs or is switched
off with exactly one warning naming it, and no hook, mode or grad flag is left behind. What a user
asked for explicitly (a named layer, an explicit probe) still fails fast, before any batch trains.

Oracles: the event files read back (what was drawn), `warnings` recorded (what was said), the
model's hook dicts, `training` flags and `requires_grad` flags compared with their state before
`fit`; the checkpoint's storages (probe images stored once).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convlens.callbacks import VisualizationCallback
from convlens.errors import ConvlensError
from convlens.events import read_events
from convlens.methods import METHODS
from conftest import SMALL, compose_cfg

NUM_CLASSES = 4
ALL = list(METHODS)  # every visualization method, new ones included


# -- models ---------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def chain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, NUM_CLASSES))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def one_by_one() -> nn.Module:
    """Its last conv's maps are 1x1 (as LeNet's conv3/conv4)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 7), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8, NUM_CLASSES))


MODELS = {"mlp": mlp, "chain": chain_cnn, "resnet18": resnet18, "one_by_one": one_by_one}


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 16, side: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g)
    y = torch.arange(n) % NUM_CLASSES
    return DataLoader(TensorDataset(x, y), batch_size=8)


# -- the callbacks, as the Hydra configs build them -----------------------------------------------


@pytest.fixture(scope="module")
def callback_cfg(tmp_path_factory):
    """The `callbacks` group with every method's config, as `convlens-train 'callbacks=[...]'` composes it."""
    overrides = [f"callbacks=[{','.join(ALL)}]"] + [o for m in ALL for o in SMALL.get(m, [])]
    return compose_cfg(overrides, tmp_path_factory.mktemp("cfg")).callbacks


def build(callback_cfg, methods=ALL) -> list[VisualizationCallback]:
    callbacks = [instantiate(callback_cfg[m]) for m in methods]
    assert all(isinstance(cb, VisualizationCallback) for cb in callbacks)
    return callbacks


# -- what is left behind --------------------------------------------------------------------------
def snapshot(net: nn.Module) -> dict:
    return {"training": {n: m.training for n, m in net.named_modules()},
            "grad": {n: p.requires_grad for n, p in net.named_parameters()}}


def assert_nothing_left(net: nn.Module, before: dict) -> None:
    for name, m in net.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{attr} left on {name or 'the net'}"
    from torch.nn.modules import module as module_lib

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        assert not getattr(module_lib, attr, {}), f"{attr} left"
    after = snapshot(net)
    assert after["grad"] == before["grad"], "requires_grad flags changed"
    assert after["training"] == before["training"], "module modes changed"


def warnings_about(record, callback) -> list[str]:
    name = type(callback).__name__
    return [str(w.message) for w in record if str(w.message).startswith(name)]


def check_outcome(callback, record, tags: dict, drawn: bool) -> str:
    """'declined' (exactly one warning naming it, nothing drawn) or 'logged' (its scalar of seconds
    and its images are in the event files); with drawn=False (modes that draw nothing), 'quiet'."""
    said = warnings_about(record, callback)
    switched_off = [w for w in said if "is switched off" in w]
    ours = [t for t in tags["images"] if t.split("/")[0].split("_")[0] == callback.name.split("_")[0]]
    if callback.declined:
        assert len(switched_off) == 1, said
        assert not ours and f"viz_time/{callback.name}" not in tags["scalars"]
        return "declined"
    assert not switched_off, said
    if not drawn:
        assert not ours
        return "quiet"
    assert f"viz_time/{callback.name}" in tags["scalars"], (callback.name, sorted(tags["scalars"]))
    assert ours, (callback.name, sorted(tags["images"]))
    return "logged"


def trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   num_sanity_val_steps=0, logger=TensorBoardLogger(tmp_path, name="tb", version=""))
    options.update(kwargs)
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, **options)


# -- the matrix -----------------------------------------------------------------------------------
MODES = {
    "limit_batches": dict(max_epochs=2, limit_train_batches=2, limit_val_batches=1),
    "fast_dev_run": dict(fast_dev_run=True),
    "overfit_batches": dict(overfit_batches=1, max_epochs=1),
}
#: every callback draws on the CNNs; on the MLP only those that need no conv layer (occlusion, ...)
EXPECT_DECLINED = {"mlp": {m for m in ALL if METHODS[m].callback_class().needs_conv}}
assert "occlusion" not in EXPECT_DECLINED["mlp"] and "deconv" in EXPECT_DECLINED["mlp"]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", list(MODES))
def test_fit_always_finishes(tmp_path, callback_cfg, model, mode):
    torch.manual_seed(0)
    net = MODELS[model]()
    module = Module(net)
    callbacks = build(callback_cfg)
    before = snapshot(net)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks, **MODES[mode]).fit(module, loader(), loader(seed=1))
    assert module.steps > 0
    tags = read_events(tmp_path / "tb")
    drawn = mode != "fast_dev_run"
    outcomes = {cb.name: check_outcome(cb, record, tags, drawn) for cb in callbacks}
    declined = {name for name, outcome in outcomes.items() if outcome == "declined"}
    if drawn or model == "mlp":
        assert declined == EXPECT_DECLINED.get(model, declined), outcomes
    if model != "mlp" and drawn:  # a chain CNN, ResNet-18, 1x1 maps: the first three always draw
        assert {"deconv", "occlusion", "saliency"} <= {n for n, o in outcomes.items() if o == "logged"}, outcomes
    assert_nothing_left(net, before)


@pytest.mark.parametrize("model", ["mlp", "chain", "resnet18"])
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_or_test_only(tmp_path, callback_cfg, model, stage):
    net = MODELS[model]()
    net.eval()  # an offline run starts from a model in eval mode
    module = Module(net)
    callbacks = build(callback_cfg)
    before = snapshot(net)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        getattr(trainer(tmp_path, callbacks), stage)(module, loader(seed=1))
    for cb in callbacks:
        said = [w for w in warnings_about(record, cb) if "is switched off" in w]
        assert len(said) == (1 if cb.declined else 0), said
    declined = {cb.name for cb in callbacks if cb.declined}
    if stage == "test":  # the callbacks draw at fit and validation ends: a test run leaves them alone
        assert not declined
    elif model == "mlp":
        assert declined == EXPECT_DECLINED["mlp"]
    assert_nothing_left(net, before)


@pytest.mark.parametrize("model", ["mlp", "chain"])
def test_resume_after_a_declined_callback(tmp_path, callback_cfg, model):
    """The switched-off state is part of the checkpoint: the resumed run is off the same way,
    says so once, and finishes (it used to crash at the end of its first epoch)."""
    net = MODELS[model]()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = build(callback_cfg)
    first[ALL.index("occlusion")]._decline("switched off by the test")  # one declined callback on any model
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer(tmp_path, first + [ckpt], enable_checkpointing=True).fit(Module(net), loader(), loader(seed=1))
    declined_first = {cb.name for cb in first if cb.declined}
    assert "occlusion" in declined_first

    resumed, module = build(callback_cfg), Module(MODELS[model]())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, resumed, max_epochs=2).fit(module, loader(), loader(seed=1),
                                                     ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert module.steps > 0
    assert {cb.name for cb in resumed if cb.declined} == declined_first
    for cb in resumed:
        said = [w for w in warnings_about(record, cb) if "is switched off" in w]
        assert len(said) == (1 if cb.declined else 0), (cb.name, said)
    occlusion = resumed[ALL.index("occlusion")]
    assert occlusion.declined_reason == "switched off by the test"


@pytest.mark.parametrize("method", ALL)
def test_an_exception_inside_visualize_switches_the_callback_off(tmp_path, callback_cfg, method, monkeypatch):
    net = chain_cnn()
    callback = build(callback_cfg, [method])[0]
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom inside visualize")

    monkeypatch.setattr(callback, "visualize", broken)
    module, before = Module(net), snapshot(net)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], max_epochs=3).fit(module, loader(), loader(seed=1))
    assert module.steps == 6  # all three epochs trained
    assert len(calls) == 1 and callback.declined  # tried once, then off
    said = warnings_about(record, callback)
    assert len(said) == 1 and "RuntimeError: boom inside visualize" in said[0] and "CONVLENS_STRICT" in said[0]
    assert_nothing_left(net, before)


def test_strict_mode_lets_the_exception_through(tmp_path, callback_cfg, monkeypatch):
    callback = build(callback_cfg, ["deconv"])[0]
    monkeypatch.setattr(callback, "visualize", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setenv("CONVLENS_STRICT", "1")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [callback]).fit(Module(chain_cnn()), loader(), loader(seed=1))


# -- explicit choices fail fast -------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_a_wrong_explicit_probe_fails_at_fit_start(tmp_path, callback_cfg, method):
    """3-channel probe images on a 1-channel model: one line naming the callback and `probe=`,
    before any batch trains (occlusion used to fail only after a whole epoch)."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, NUM_CLASSES))
    callback = type(build(callback_cfg, [method])[0])(probe=torch.randn(4, 3, 16, 16))
    module = Module(net)
    x = torch.rand(16, 1, 16, 16)
    data = DataLoader(TensorDataset(x, torch.arange(16) % NUM_CLASSES), batch_size=8)
    with pytest.raises(ConvlensError) as error:
        trainer(tmp_path, [callback]).fit(module, data, data)
    message = str(error.value)
    assert "\n" not in message
    assert type(callback).__name__ in message and "probe=" in message and "channels" in message
    assert module.steps == 0


def test_a_named_layer_the_method_cannot_use_lists_only_usable_layers(tmp_path, callback_cfg):
    from convlens.callbacks import Saliency

    net = chain_cnn()
    with pytest.raises(ConvlensError) as error:
        trainer(tmp_path, [Saliency(layer="7")]).fit(Module(net), loader(), loader(seed=1))  # "7": the Linear
    usable = str(error.value).split("Usable layers: ")[1]
    assert set(usable.split(", ")) == {"0", "1", "2", "3", "4", "5"}  # the convs, ReLUs and pools, no Flatten/Linear


def test_a_named_layer_on_a_model_without_conv_says_so(tmp_path):
    from convlens.callbacks import DeconvProjection

    with pytest.raises(ConvlensError, match=r"there is no nn\.Conv2d in the model"):
        trainer(tmp_path, [DeconvProjection(layers=["1"])]).fit(Module(mlp()), loader(), loader(seed=1))


def test_the_no_conv_warning_names_the_reason(tmp_path, callback_cfg):
    callbacks = build(callback_cfg, ["deconv", "saliency", "suppression"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks).fit(Module(mlp()), loader(), loader(seed=1))
    for cb in callbacks:
        (said,) = warnings_about(record, cb)
        assert "there is no nn.Conv2d in the model" in said, said


# -- probe images stored once ---------------------------------------------------------------------
def test_probe_images_are_stored_once_per_checkpoint(tmp_path, callback_cfg):
    defaults = [m.name for m in METHODS.values() if m.default]
    side = 48  # probe images large enough to dominate the checkpoint's size

    def fit(callbacks, folder):
        ckpt = ModelCheckpoint(dirpath=folder, save_last=True)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, NUM_CLASSES))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path, callbacks + [ckpt], enable_checkpointing=True, limit_val_batches=0).fit(
                Module(net), loader(16, side), loader(16, side, seed=1))
        return folder / "last.ckpt"

    many = fit(build(callback_cfg, defaults), tmp_path / "many")
    one = fit(build(callback_cfg, ["deconv"]), tmp_path / "one")
    none = fit([], tmp_path / "none")
    probe_bytes = NUM_CLASSES * 3 * side * side * 4
    extra_one = one.stat().st_size - none.stat().st_size
    extra_many = many.stat().st_size - none.stat().st_size
    assert extra_one >= probe_bytes
    assert extra_many < extra_one + probe_bytes / 2, (extra_one, extra_many)  # not len(defaults) copies

    state = torch.load(many, weights_only=True)["callbacks"]
    pools = [s["probe_pool"][0] for s in state.values() if s.get("probe_pool") is not None]
    assert len(pools) == len(defaults)
    assert len({p.untyped_storage().data_ptr() for p in pools}) == 1

    resumed = build(callback_cfg, defaults)
    originals = {cb.state_key: s for cb in build(callback_cfg, defaults) for s in [state[cb.state_key]]}
    for cb in resumed:
        cb.load_state_dict(originals[cb.state_key])
        index = originals[cb.state_key]["probe_index"]
        expected = originals[cb.state_key]["probe_pool"][0]
        expected = expected[index] if index is not None else expected
        assert torch.equal(cb.probe_images, expected)


# -- DDP ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "chain"])
def test_ddp_spawn_two_cpu_processes(tmp_path, callback_cfg, model):
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    callbacks = build(callback_cfg)
    module = Module(MODELS[model]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = trainer(tmp_path, callbacks, strategy="ddp_spawn", devices=2, max_epochs=2)
        run.fit(module, loader(32), loader(32, seed=1))
    assert run.state.finished
    tags = read_events(tmp_path / "tb")
    if model == "chain":
        assert any(t.startswith("deconv/") for t in tags["images"])


# -- the probe options: one object, the same keys ------------------------------------------------
def test_probe_options_as_keywords_or_one_probe_spec_are_the_same(callback_cfg):
    from convlens.callbacks import OcclusionSensitivity, Saliency
    from convlens.callbacks.options import ProbeSpec
    from convlens.errors import ConfigError

    flat = Saliency(num_probe=3, probe_seed=2, mean=[0.5], std=[0.25])
    spec = Saliency(probe=ProbeSpec(num_probe=3, probe_seed=2, mean=[0.5], std=[0.25]))
    for name in ("num_probe", "probe_seed", "probe_per_class", "batch_keys"):
        assert getattr(flat, name) == getattr(spec, name)
    assert torch.equal(flat.probe_spec.mean_std[1], spec.probe_spec.mean_std[1])
    assert OcclusionSensitivity().num_probe == 4  # a callback's own default still applies
    with pytest.raises(ConfigError, match=r"no option num_prob; did you mean num_probe\?"):
        Saliency(num_prob=3)
    with pytest.raises(ConfigError, match="not both"):
        Saliency(probe=ProbeSpec(num_probe=3), probe_seed=1)
