"""TensorBoardLayout: a custom-scalars layout (TensorBoard's "Custom Scalars" tab) that groups the
curves a run logs: training and validation curves, each layer's weight change and decoding error,
the suppression metrics and every callback's seconds, one chart each.
"""
from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

#: {category: {chart: [kind, [tag regexes]]}}: tags of other runs simply do not appear
LAYOUT = {
    "training": {
        "loss (epoch means)": ["Multiline", [r"train/loss_epoch", r"val/loss"]],
        "accuracy": ["Multiline", [r"train/acc", r"val/acc", r"val/acc_best"]],
        "loss (steps)": ["Multiline", [r"train/loss_step"]],
    },
    "filters": {
        "relative weight change per epoch, by layer": ["Multiline", [r"evolution_weight_change/.*"]],
        "decoding error (Rafegas & Vanrell, Eq. 3), by layer": ["Multiline", [r"decoded_error/.*"]],
    },
    "suppression": {
        "SSIM of the kept kernel's map, by layer": ["Multiline", [r"suppression_ssim/.*"]],
        "other kernels' activity left (relative), by layer": ["Multiline", [r"suppression_mse_relative/.*"]],
    },
    "cost": {
        "seconds per visualization callback": ["Multiline", [r"viz_time/.*"]],
    },
}


class TensorBoardLayout(pl.Callback):
    """Writes `LAYOUT` (or `layout`) once per fit into every TensorBoard logger, at the end of the
    first training epoch: a run that fails before then leaves no TensorBoard run behind."""

    def __init__(self, layout: dict | None = None):
        self.layout = layout or LAYOUT
        self._written = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = False

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._written:
            return
        self._written = True
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_custom_scalars(self.layout)
