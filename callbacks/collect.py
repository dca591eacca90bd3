"""Collecting during the validation loop, for the callbacks that draw what a whole validation pass
showed them (top_activations, dissection, mistakes): forward hooks attached at the start of the
loop and removed at its end, on an exception, at teardown and when the callback is switched off;
each forward's records; the ranks' collections gathered (DDP); and whether the last collection is
the one to draw now.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.viz.layers import get_layer, input_module
from convlens.viz.top_activations import spatial_max


class ValidationCollector(VisualizationCallback):
    """The base of a callback that collects during the validation loop. The loop's hooks are here: a
    subclass attaches its forward hooks to `self._handles` in `start_collecting` (with
    `attach_maxima_hooks`, or its own), takes each batch's records in `take_records` and returns the
    ranks' merged collection from `finish_collecting`, which becomes `self.result` on rank zero. The
    hooks never outlive an exception, the fit or the callback being switched off, and the time spent
    is `collect_seconds`. (A subclass with another loop overrides the three Lightning hooks.)"""

    result: Any = None
    result_epoch: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: seconds this rank spent collecting during the last validation loop
        self.collect_seconds = 0.0
        self._handles: list = []
        self._records: list[dict] = []
        self._warned_stale = False

    # -- the loop ------------------------------------------------------------------------------
    def start_collecting(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: nn.Module) -> None:
        raise NotImplementedError

    def take_records(self, records: list[dict], batch: Any) -> None:
        raise NotImplementedError

    def finish_collecting(self, trainer: pl.Trainer) -> Any:
        raise NotImplementedError

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if not self.collects_validation(trainer):
            return
        self.collect_seconds = 0.0
        start = time.perf_counter()
        self.start_collecting(trainer, pl_module, self.net(pl_module))
        self.collect_seconds += time.perf_counter() - start

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._handles:
            return
        start = time.perf_counter()
        records, self._records = self._records, []
        self.take_records(records, batch)
        self.collect_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        start = time.perf_counter()
        merged = self.finish_collecting(trainer)
        if trainer.is_global_zero:
            self.result, self.result_epoch = merged, trainer.current_epoch
        self.collect_seconds += time.perf_counter() - start

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._records = [], []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def release(self) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def attach_maxima_hooks(self, net: nn.Module, units: Mapping[str, Any] | None = None,
                            thresholds: Callable[[str], torch.Tensor] | None = None) -> None:
        """Hooks that record each forward of the loop into `self._records` as {"images": the net's
        input [N, C, H, W], "maps": {layer: (values, positions)}}: each map's maximum and where it
        is (`viz.top_activations.spatial_max`), of the units `units[layer]` (else every unit). With
        `thresholds(layer)` ([units] values, read at each forward; e.g. the k-th kept value of each
        unit's top, which only rises during the loop) a position is found only where the maximum
        reaches its unit's threshold, (-1, -1) elsewhere. The time they take is added to
        `collect_seconds`."""
        self._records = []

        def net_input(_module, args):
            t0 = time.perf_counter()
            x = args[0] if args else None
            if torch.is_tensor(x) and x.dim() == 4 and x.is_floating_point():
                self._records.append({"images": x, "maps": {}})
            self.collect_seconds += time.perf_counter() - t0

        def layer_output(_module, _args, out, layer):
            t0 = time.perf_counter()
            if self._records and layer not in self._records[-1]["maps"] and torch.is_tensor(out) and out.dim() == 4:
                self._records[-1]["maps"][layer] = spatial_max(out.detach(), None if units is None else units[layer],
                                                               None if thresholds is None else thresholds(layer))
            self.collect_seconds += time.perf_counter() - t0

        self._handles = [input_module(net, self.layers).register_forward_pre_hook(net_input)]
        for layer in self.layers:
            self._handles.append(get_layer(net, layer).register_forward_hook(partial(layer_output, layer=layer)))

    @staticmethod
    def gather(trainer: pl.Trainer, state: Any) -> list:
        """Every rank's `state` in rank order (`torch.distributed.all_gather_object` under DDP);
        `[state]` in a single process."""
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, state)
            return gathered
        return [state]

    def collected_now(self, trainer: pl.Trainer, epoch: int | None, drawn: str) -> bool:
        """Whether the collection of epoch `epoch` (None: none yet) is the one to draw now: this
        epoch's (in an offline `validate`, the one just made), or with `every_n_epochs=0` the last
        one. Otherwise one warning for the run, saying that `drawn` (e.g. "top activations are
        drawn") only after a collected validation."""
        if epoch is not None and (self.every_n_epochs == 0 or epoch == trainer.current_epoch
                                  or trainer.state.fn == TrainerFn.VALIDATING):
            return True
        if not self._warned_stale:
            self._warn_once(f"{type(self).__name__}: no validation ran in epoch {trainer.current_epoch} "
                            f"(check_val_every_n_epoch, limit_val_batches=0?); {drawn} only after an epoch "
                            "whose validation was collected")
            self._warned_stale = True
        return False
