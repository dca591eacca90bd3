"""Collecting during the validation loop, for the callbacks that draw what a whole validation pass
showed them (top_activations, dissection, mistakes): forward hooks attached at the start of the
loop and removed at its end, on an exception, at teardown and when the callback is switched off;
each forward's records; the ranks' collections gathered (DDP); and whether the last collection is
the one to draw now.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.viz.layers import get_layer, input_module
from convlens.viz.top_activations import spatial_max


class ValidationCollector(VisualizationCallback):
    """The base of a callback that collects during the validation loop. A subclass attaches its
    forward hooks to `self._handles` at validation epoch start (`attach_maxima_hooks`, or its own),
    takes `self._records` at each batch end and calls `_remove_hooks` at validation epoch end; the
    hooks never outlive an exception, the fit or the callback being switched off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: seconds this rank spent collecting during the last validation loop
        self.collect_seconds = 0.0
        self._handles: list = []
        self._records: list[dict] = []
        self._warned_stale = False

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

    def attach_maxima_hooks(self, net: nn.Module, units: Mapping[str, Any] | None = None) -> None:
        """Hooks that record each forward of the loop into `self._records` as {"images": the net's
        input [N, C, H, W], "maps": {layer: (values, positions)}}: each map's maximum and where it
        is (`viz.top_activations.spatial_max`), of the units `units[layer]` (else every unit). The
        time they take is added to `collect_seconds`."""
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
                self._records[-1]["maps"][layer] = spatial_max(out.detach(), None if units is None else units[layer])
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
