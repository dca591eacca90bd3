import math

import lightning.pytorch as pl
import pytest
import torch
from functools import partial

from convlens.datamodules.shapes import ShapesDataModule
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule, NonFiniteLossError


def test_nan_loss_stops_naming_epoch_and_step(tmp_path):
    net = LeNet()
    module = ClassifierModule(net, optimizer=partial(torch.optim.SGD, lr=1e-3))
    calls = {"n": 0}
    forward = net.forward

    def poisoned(x):  # finite for 3 steps, then NaN
        calls["n"] += 1
        out = forward(x)
        return out * math.nan if calls["n"] > 3 else out

    net.forward = poisoned
    dm = ShapesDataModule(n_train=400, n_test=50, val_size=64, batch_size=32)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 0, step 3"):
        trainer.fit(module, datamodule=dm)


def _poisoned_module(after: int):
    """A LeNet module whose outputs turn NaN after `after` forward calls."""
    net = LeNet()
    module = ClassifierModule(net, optimizer=partial(torch.optim.SGD, lr=1e-3))
    calls = {"n": 0}
    forward = net.forward

    def poisoned(x):
        calls["n"] += 1
        out = forward(x)
        return out * math.nan if calls["n"] > after else out

    net.forward = poisoned
    return module


def test_nan_found_at_the_logging_interval_still_names_its_step(tmp_path, monkeypatch):
    # on an accelerator the loss is checked every log_every_n_steps steps (no per-step sync);
    # the check must still name the first non-finite step, not the step where it looked
    module = _poisoned_module(after=3)
    monkeypatch.setattr(module, "_check_every_step", lambda loss: False)
    dm = ShapesDataModule(n_train=400, n_test=50, val_size=64, batch_size=32)
    seen = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch_idx)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         log_every_n_steps=5, callbacks=[Steps()])
    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 0, step 3 \(batch 3\)"):
        trainer.fit(module, datamodule=dm)
    assert seen == [0, 1, 2, 3]  # batch 4 (the 5th step) is where it was checked
