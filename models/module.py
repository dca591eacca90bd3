"""One LightningModule for every classifier net: loss, accuracy and best val accuracy, with the
optimizer and scheduler given by config (as `_partial_` objects)."""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class ClassifierModule(pl.LightningModule):
    """Wraps a plain `nn.Module` (`self.net`) that maps images to class logits.

    `optimizer` is a partial taking the parameters (e.g. `torch.optim.Adam` with `_partial_: true`),
    `scheduler` an optional partial taking the optimizer. Further keyword arguments (architecture
    hyperparameters such as `c3`, `c4`) are recorded in `hparams` for logging and comparison.
    Logs `train/loss`, `train/acc`, `val/loss`, `val/acc`, `val/acc_best`, `test/loss`, `test/acc`.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, scheduler_monitor: str = "val/loss",
                 num_classes: int = 10, **arch: Any):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        return self.criterion(logits, y), logits.argmax(1), y

    def on_train_start(self) -> None:
        self.val_acc_best.reset()

    def training_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step} (batch {batch_idx}). Lower the learning rate "
                f"(model.optimizer.lr), check the input normalization, or add gradient clipping "
                f"(++trainer.gradient_clip_val=1.0)."
            )
        # per step only what is cheap: `update` (not the metric's forward, which also computes a
        # per-batch value) and the loss tensor, which Lightning averages over the epoch itself
        self.train_acc.update(preds, y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        self.val_loss(loss)
        self.val_acc(preds, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        self.test_loss(loss)
        self.test_acc(preds, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor,
                                 "interval": "epoch", "frequency": 1}}

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad or not trainable_only)
