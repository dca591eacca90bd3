"""Every private Lightning (and TensorBoard writer) internal the callbacks use, in one place.

Each use is pinned by `tests/test_lightning_compat.py`, which fails when Lightning changes it;
nothing else in convlens touches a private Lightning name.
"""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl


def log_step(trainer) -> int:
    """The step images and scalars of this epoch are logged at: the step of its validation
    scalars. Lightning logs epoch-end metrics at `_batches_that_stepped - 1` during fit (its loop
    counter has moved on by then); offline runs (`trainer.validate`) log at the counter itself."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    if not isinstance(step, int):
        return int(trainer.global_step)
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return step - 1 if fn == "fit" and step > 0 else step


def transfer_batch(pl_module: pl.LightningModule | None, batch: Any) -> Any:
    """`batch` as `validation_step` receives it (the module's and datamodule's transfer hooks
    applied, on the module's device); the batch as it is when the hooks need more context."""
    if pl_module is None or getattr(pl_module, "_trainer", None) is None:
        return batch
    try:
        return pl_module._apply_batch_transfer_handler(batch, pl_module.device)
    except Exception:  # noqa: BLE001  a hook that wants more context: the raw batch
        return batch


def state_key(callback: pl.Callback, **options: Any) -> str:
    """Lightning's key of a callback's state in a checkpoint, from the options that tell two
    instances of its class apart (as `ModelCheckpoint` builds its own)."""
    return callback._generate_state_key(**options)


def _first_loader(loaders):
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return _first_loader(next(iter(loaders.values()), None))
    if isinstance(loaders, (list, tuple)):
        return _first_loader(loaders[0]) if loaders else None
    return loaders


def val_loader(trainer):
    """The first validation dataloader of the run (the same loader validation uses; requested from
    its source when the loop has not loaded it yet), or None."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is None:
        try:
            fn = getattr(getattr(trainer, "state", None), "fn", None)
            loop = trainer.validate_loop if fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
            source = loop._data_source
            if source.instance is None or not source.is_defined():
                return None
            loaders = source.dataloader()
        except (AttributeError, NotImplementedError):
            return None
    return _first_loader(loaders)


def val_dataset(trainer):
    return getattr(val_loader(trainer), "dataset", None)


def tensorboard_file_writer(logger):
    """The event-file writer behind a `TensorBoardLogger` (`SummaryWriter._get_file_writer()`), to
    add an already encoded summary without encoding the image again."""
    return logger.experiment._get_file_writer()
