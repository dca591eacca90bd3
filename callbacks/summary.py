"""What the callbacks that draw a summary of the whole fit at its end (evolution, feature_viz)
share: the epochs completed when they last drew, and the summary drawn once at fit end.
"""
from __future__ import annotations

import lightning.pytorch as pl

from convlens.callbacks.base import VisualizationCallback


class FitSummaryCallback(VisualizationCallback):
    """The base of a callback that keeps an entry per drawing (`history`, headed by `_epochs_done`,
    the epochs completed when it drew) and, with `summary` on, draws them together at fit end
    (`_log_summary`; not in the sanity check or `fast_dev_run`)."""

    #: draw the summary at fit end (the subclass's option)
    summary: bool = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_done = trainer.current_epoch + 1  # current_epoch counts completed epochs
        super().on_train_epoch_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_done = trainer.current_epoch
        super().on_fit_end(trainer, pl_module)
        if self.summary and self.history and not (trainer.sanity_checking or trainer.fast_dev_run):
            self._log_summary(trainer)

    def _log_summary(self, trainer: pl.Trainer) -> None:
        raise NotImplementedError
