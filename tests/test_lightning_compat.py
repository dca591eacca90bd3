"""Every private Lightning internal convlens uses (`callbacks/lightning_compat.py`), pinned: each
test fails when Lightning changes what the helper relies on.

Oracles: the step Lightning itself logs `val/acc` at (read back from the event file), the loader
object the user passed, the batch `validation_step` receives, and Lightning's documented
state-key format (`ModelCheckpoint`'s own key).
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convlens.callbacks import lightning_compat as compat
from convlens.events import read_events


class Doubling(pl.LightningModule):
    """Its `on_after_batch_transfer` doubles the images: what validation_step sees differs from the loader's."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
        self.val_inputs = []

    def forward(self, x):
        return self.net(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 2, y

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_inputs.append(batch[0])
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Probe(pl.Callback):
    def __init__(self, loader):
        self.loader, self.seen = loader, {}

    def on_fit_start(self, trainer, pl_module):
        self.seen["loader_at_fit_start"] = compat.val_loader(trainer)
        self.seen["dataset_at_fit_start"] = compat.val_dataset(trainer)
        batch = next(iter(self.loader))
        self.seen["transferred"] = compat.transfer_batch(pl_module, batch)[0]
        self.seen["raw"] = batch[0]

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self.seen["loader_at_validate"] = compat.val_loader(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.setdefault("steps", []).append(compat.log_step(trainer))


def data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(12, 3, 2, 2, generator=g), torch.arange(12) % 2), batch_size=4)


def test_each_private_internal_still_does_what_convlens_relies_on(tmp_path):
    loader = data()
    probe = Probe(loader)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=3, accelerator="cpu", callbacks=[probe],
                         logger=TensorBoardLogger(tmp_path, name="tb", version=""), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    module = Doubling()
    trainer.fit(module, data(), loader)
    # val_loader: the user's own loader, before the validation loop has loaded it
    assert probe.seen["loader_at_fit_start"] is loader
    assert probe.seen["dataset_at_fit_start"] is loader.dataset
    # transfer_batch: the module's transfer hooks applied (`_apply_batch_transfer_handler`)
    assert torch.equal(probe.seen["transferred"], probe.seen["raw"] * 2)
    assert torch.equal(module.val_inputs[0], probe.seen["raw"] * 2)
    # log_step: the step of the epoch's validation scalars (`fit_loop.epoch_loop._batches_that_stepped`)
    assert probe.seen["steps"] == sorted(read_events(tmp_path / "tb")["scalars"]["val/acc"])
    # offline validation: the loader comes from the validate loop's source
    trainer.validate(module, loader, verbose=False)
    assert probe.seen["loader_at_validate"] is loader


def test_state_key_is_lightnings_key_format():
    """`_generate_state_key`: the class name and the options, as Lightning keys ModelCheckpoint."""
    checkpoint = ModelCheckpoint(monitor="val/acc")
    assert checkpoint.state_key == compat.state_key(checkpoint, monitor="val/acc", mode="min",
                                                    every_n_train_steps=0, every_n_epochs=1,
                                                    train_time_interval=None)
    assert compat.state_key(Probe(None), layers=("conv1",)) == "Probe{'layers': ('conv1',)}"


def test_tensorboard_file_writer_takes_an_encoded_summary(tmp_path):
    from convlens.events import image_summary, read_images

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    compat.tensorboard_file_writer(logger).add_summary(image_summary("probe/x", torch.rand(3, 4, 4)), 7)
    logger.experiment.flush()
    assert [step for step, _ in read_images(tmp_path / "tb")["probe/x"]] == [7]
