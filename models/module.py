"""One LightningModule for every classifier net: loss, accuracy and best val accuracy, with the
optimizer and scheduler given by config (as `_partial_` objects)."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from convlens.errors import ConfigError, ConvlensError


class NonFiniteLossError(ConvlensError, RuntimeError):
    """The training loss became NaN or infinite."""


class ClassifierModule(pl.LightningModule):
    """Wraps a plain `nn.Module` (`self.net`) that maps images to class logits.

    `optimizer` is a partial taking the parameters (e.g. `torch.optim.Adam` with `_partial_: true`),
    `scheduler` an optional partial taking the optimizer. Further keyword arguments (architecture
    hyperparameters such as `c3`, `c4`) are recorded in `hparams` for logging and comparison.
    Logs `train/loss_step` (every `trainer.log_every_n_steps` steps), `train/loss_epoch`,
    `train/acc`, `val/loss`, `val/acc`, `val/acc_best`, `test/loss`, `test/acc`. A NaN or infinite
    training loss stops the run with `NonFiniteLossError` naming its epoch and step.

    `channels_last`: keep the net's weights and the batches in channels-last memory order, which
    the convolution kernels of recent CPUs and GPUs run faster (benchmarks/RESULTS.md); the
    numbers are the same up to float rounding.
    `compile`: run the training forward through `torch.compile` (fewer kernel launches for the
    small steps of these nets on a GPU). Validation, testing and the visualization callbacks use
    the plain net, whose layer names and hooks stay as they are.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, scheduler_monitor: str = "val/loss",
                 num_classes: int = 10, channels_last: bool = False, compile: bool = False, **arch: Any):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"A classifier needs at least 2 classes, got num_classes={num_classes!r}; give the "
                              f"data at least two classes (an image folder: two class folders under train/)")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last, self.compile_training = channels_last, compile
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss()
        # predictions are argmaxes, always valid: skip torchmetrics' per-update input checks
        accuracy = partial(MulticlassAccuracy, num_classes, average="micro", validate_args=False)
        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.on_train_epoch_start()  # the per-epoch training buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _training_net(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.compile_training:
            return self.net
        if "_compiled_net" not in self.__dict__:  # kept out of the module tree (and the state dict)
            self.__dict__["_compiled_net"] = torch.compile(self.net)
        return self.__dict__["_compiled_net"]

    def _step(self, batch):
        x, y = batch
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = (self._training_net() if self.training else self.net)(x)
        return self.criterion(logits, y), logits.argmax(1), y

    def on_train_start(self) -> None:
        self.val_acc_best.reset()

    def on_train_epoch_start(self) -> None:
        self._losses: list[torch.Tensor] = []  # this epoch's detached step losses (train/loss_epoch)
        self._checked = 0  # how many of them were checked to be finite
        self._unscored: list[tuple[torch.Tensor, torch.Tensor]] = []  # (preds, targets) not in train_acc yet

    def training_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        # Per step, only tensor ops and list appends: each `self.log` call and each torchmetrics
        # update costs Python time that is a visible share of a small net's step on CPU
        # (benchmarks/RESULTS.md, framework overhead). So the loss is logged at the steps the logger
        # writes (`log_every_n_steps`), the accuracy gets the interval's predictions in one update,
        # and both epoch values are logged once, at epoch end.
        self._losses.append(loss.detach())
        self._unscored.append((preds, y))
        log_now = (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0
        # a finiteness check reads the loss on the host: every step on CPU (free), at the logging
        # interval on accelerators (a device sync per step would stall the pipeline)
        if log_now or self._check_every_step(loss):
            self._check_finite(batch_idx)
        if log_now:
            self._score()
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    @staticmethod
    def _check_every_step(loss: torch.Tensor) -> bool:
        return loss.device.type == "cpu"

    def _check_finite(self, batch_idx: int) -> None:
        unchecked = self._losses[self._checked:]
        if not unchecked:
            return
        finite = torch.isfinite(torch.stack(unchecked))
        if not bool(finite.all()):
            back = len(unchecked) - 1 - int((~finite).nonzero()[0])  # steps since the first bad one
            raise NonFiniteLossError(
                f"The training loss became {unchecked[-1 - back].item()} at epoch {self.current_epoch}, "
                f"step {self.global_step - back} (batch {batch_idx - back}). Lower the learning rate "
                f"(model.optimizer.lr), check the input normalization, or add gradient clipping "
                f"(++trainer.gradient_clip_val=1.0)."
            )
        self._checked = len(self._losses)

    def _score(self) -> None:
        if self._unscored:
            preds, targets = zip(*self._unscored)
            self.train_acc.update(torch.cat(preds), torch.cat(targets))
            self._unscored = []

    def on_train_epoch_end(self) -> None:
        if not self._losses:  # e.g. limit_train_batches=0
            return
        self._check_finite(len(self._losses) - 1)
        self._score()
        # logged from this hook, after the visualization callbacks' on_train_epoch_end and before
        # ModelCheckpoint/EarlyStopping read them; torchmetrics' compute() syncs across processes
        self.log("train/loss_epoch", torch.stack(self._losses).mean(), sync_dist=True, prog_bar=True)
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_acc.reset()
        self._losses = []

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
        optimizer = _built("optimizer", self.optimizer_factory, params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = _built("scheduler", self.scheduler_factory, optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor,
                                 "interval": "epoch", "frequency": 1}}

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad or not trainable_only)


def _built(what: str, factory: Callable[..., Any], **kwargs: Any) -> Any:
    """`factory(**kwargs)`; torch's refusal of a config value (a negative lr, an unknown keyword)
    becomes a ConfigError naming the config key, so the run ends with one line, not a traceback."""
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:
        name = getattr(getattr(factory, "func", factory), "__name__", what)
        raise ConfigError(f"model.{what} ({name}) refused its options: {' '.join(str(e).split())}; "
                          f"fix model.{what} in the config or on the command line") from e
