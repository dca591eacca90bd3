"""Callback state per instance: two instances of one class keep separate state through a
checkpoint and a resume (VisualizationCallback.state_key)."""
from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from convlens.callbacks import DeconvProjection, FilterEvolution
from convlens.datamodules.shapes import ShapesDataModule
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule


def fit(tmp_path, callbacks, max_epochs, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    dm = ShapesDataModule(n_train=192, n_test=32, val_size=64, batch_size=64)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=max_epochs, logger=False,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), *callbacks],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)


def make(seeds):
    return [FilterEvolution(layers=["conv1"], num_probe=2, probe_seed=seeds[0], summary=False),
            FilterEvolution(layers=["conv3"], num_probe=3, probe_seed=seeds[1], summary=False),
            DeconvProjection(layers=["conv2"], num_probe=2, probe_seed=seeds[0], deconv_max=False, k=1),
            DeconvProjection(layers=["conv4"], num_probe=4, probe_seed=seeds[1], deconv_max=False, k=1)]


def test_two_instances_of_a_class_have_their_own_state_key():
    a, b, c, d = make((0, 1))
    assert len({a.state_key, b.state_key, c.state_key, d.state_key}) == 4
    # the key does not depend on the probe options, so a resumed run with other ones keeps its images
    assert FilterEvolution(layers=["conv1"], probe_seed=5).state_key == a.state_key


def test_two_instances_keep_separate_state_through_a_checkpoint_and_a_resume(tmp_path):
    first = make((0, 1))
    fit(tmp_path, first, max_epochs=1)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(cb.state_key in ckpt["callbacks"] for cb in first)
    # the probe sets differ (sizes 2, 3, 2, 4), so a state restored into the wrong instance shows
    def probe_size(state):  # the shared probe pool, or this callback's rows of it
        return len(state["probe_index"]) if state["probe_index"] is not None else len(state["probe_pool"][0])

    sizes = [probe_size(ckpt["callbacks"][cb.state_key]) for cb in first]
    assert sizes == [2, 3, 2, 4]

    resumed = make((7, 8))  # other seeds: a fresh choice would pick other images
    fit(tmp_path, resumed, max_epochs=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for before, after in zip(first, resumed):
        assert torch.equal(before.probe_images, after.probe_images), type(after).__name__
        assert torch.equal(before.probe_labels, after.probe_labels)
    for before, after in zip(first[:2], resumed[:2]):
        assert after.chosen == before.chosen and set(after.chosen) == set(before.layers)
        assert [e["epoch"] for e in after.history] == [1, 2]  # the epoch before the resume is kept
