import pytest

from conftest import FAST_SHAPES, compose_cfg, read_events

from convlens.train import train


def test_shapes_demo_two_epochs_logs_scalars(tmp_path):
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none"], tmp_path)
    metrics = train(cfg)
    events = read_events(tmp_path / "tensorboard")
    for tag in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"):
        assert tag in events["scalars"], f"{tag} missing: {sorted(events['scalars'])}"
    assert len(events["scalars"]["val/acc"]) == 2  # one per epoch
    assert (tmp_path / "metrics.json").is_file()
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["params"] == 431_080


def test_last_ckpt_is_the_last_epoch_beside_the_best(tmp_path):
    # the best epoch is made epoch 0 (monitor "epoch", mode min), so "last" and "best" differ: with
    # Lightning 2.6's save_last, last.ckpt would stay at epoch 0
    import torch

    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=3",
                                     "callbacks.model_checkpoint.monitor=epoch",
                                     "callbacks.model_checkpoint.mode=min",
                                     "callbacks.model_checkpoint.filename='best-epoch{epoch}'"], tmp_path)
    train(cfg)
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["epoch"] == 2
    (best,) = [p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"]
    assert best.name == "best-epoch0.ckpt"
    assert torch.load(best, weights_only=False, map_location="cpu")["epoch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch0.ckpt", "last.ckpt"]


def test_training_loss_and_accuracy_logged_at_the_interval_and_per_epoch(tmp_path):
    # the loss is logged only at the steps the logger writes; its epoch value must be the mean of
    # every step's loss (the oracle: the losses training_step returned, collected by a callback)
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none"], tmp_path)
    losses = []

    class Collect(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module = instantiate(cfg.model)
    step, scored = module._step, []

    def spy(batch):  # the training predictions, the oracle of train/acc
        loss, preds, y = step(batch)
        if module.training:
            scored.append((int((preds == y).sum()), len(y)))
        return loss, preds, y

    module._step = spy
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", limit_train_batches=7, limit_val_batches=0,
                         log_every_n_steps=3, enable_progress_bar=False, enable_checkpointing=False,
                         logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[Collect()])
    trainer.fit(module, datamodule=instantiate(cfg.datamodule))
    acc = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*"))), size_guidance={"scalars": 0})
    acc.Reload()
    step_events = acc.Scalars("train/loss_step")
    assert [e.step for e in step_events] == [2, 5]  # global steps 3 and 6 (0-based 2, 5)
    assert [e.value for e in step_events] == pytest.approx([losses[2], losses[5]], rel=1e-6)
    (epoch_loss,) = acc.Scalars("train/loss_epoch")
    assert epoch_loss.value == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert len(losses) == 7 and len(scored) == 7
    # accuracy over every step's predictions, including the 7th, after the last logging interval
    (epoch_acc,) = acc.Scalars("train/acc")
    assert epoch_acc.value == pytest.approx(sum(c for c, _ in scored) / sum(n for _, n in scored), rel=1e-6)
