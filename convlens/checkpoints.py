"""Loading weight files and checkpoints, in one place, never running code from them.

Every file a user hands us (a `.pth` state dict, a Lightning `.ckpt`, a sweep job's checkpoint) is
read with `torch.load(..., weights_only=True)`: tensors, containers and an allow-list of plain
types only, so a crafted pickle is refused instead of executed. A file that is missing, empty,
truncated or not a checkpoint gets a `WeightsError` that names it and says what to do; a
checkpoint to resume from that is broken also names the newest intact one beside it.

Checkpoints are written by `AtomicCheckpointIO` (the trainer's `plugins` in conf/trainer): a temp file
in the checkpoint's own folder, fsync, rename (`convlens.files.atomic_write`), so a kill or a full
disk never leaves a truncated or empty `last.ckpt`, and nothing is left in `$TMPDIR`.
"""
from __future__ import annotations

import os
import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from convlens.errors import ConvlensError
from convlens.files import atomic_write, is_disk_full

#: prefixes a state dict saved from a wrapper carries (LightningModule.net, DataParallel, ...)
WRAPPER_PREFIXES = ("net.", "model.", "module.")


class WeightsError(ConvlensError, RuntimeError):
    """A weight file or source that cannot be used for this architecture."""


def _unsafe_reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    found = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+|class \S+)", text)
    return found.group(0) if found else text[:160]


def load_file(path: str | os.PathLike, what: str = "weight file", map_location: Any = "cpu") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with a clear `WeightsError` for a
    missing, empty, corrupt or unsafe file (or one that is not a PyTorch file at all)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"The {what} {path} does not exist. Pass an existing .pth/.ckpt path.")
    if path.stat().st_size == 0:
        raise WeightsError(f"The {what} {path} is empty (0 bytes): it was not written completely.")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise WeightsError(f"The {what} {path} is not a PyTorch file (it starts with {head!r}, not a "
                           f"torch.save archive): pass a .ckpt/.pth file written by torch.save.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"Refused to load the {what} {path}: it holds objects other than tensors and plain containers "
            f"({_unsafe_reason(e)}), and convlens never runs code from a file (torch.load weights_only=True). "
            f"Only use files you trust; convert it to a plain state dict where it was made."
        ) from e
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"Could not read the {what} {path}: it is truncated or not a PyTorch file "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).") from e


def looks_intact(path: str | os.PathLike) -> bool:
    """A cheap check that `path` is a complete torch.save archive (its zip directory, which is
    written last, is there); `load_file` is the real check."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_intact_checkpoint(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Path | None:
    """The most recently written `*.ckpt` in `folder` (other than `exclude`) that loads, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude is not None else None
    for p in sorted(folder.glob("*.ckpt"), key=lambda q: q.stat().st_mtime, reverse=True):
        if skip is not None and p.resolve() == skip:
            continue
        try:
            ckpt = load_file(p, "checkpoint")
        except WeightsError:
            continue
        if isinstance(ckpt, dict) and "state_dict" in ckpt:
            return p
    return None


def load_resume_checkpoint(path: str | os.PathLike) -> dict:
    """The Lightning checkpoint `ckpt_path=` resumes from, read with weights_only=True. A missing,
    empty, truncated, unsafe or foreign file is a WeightsError that names the newest intact
    checkpoint in the same folder and how to resume from it."""
    path = Path(path).expanduser()
    try:
        ckpt = load_file(path, "checkpoint")
        if not isinstance(ckpt, dict) or not {"state_dict", "loops", "optimizer_states"} <= set(ckpt):
            raise WeightsError(f"The checkpoint {path} is not a training checkpoint of convlens-train "
                               f"(it has no state_dict, optimizer and loop state to resume from).")
    except WeightsError as e:
        other = newest_intact_checkpoint(path.parent, exclude=path)
        hint = (f" The newest intact checkpoint in {path.parent} is {other.name} (epoch "
                f"{load_file(other, 'checkpoint').get('epoch')}): resume from it with ckpt_path={other}"
                if other is not None else
                f" There is no intact checkpoint in {path.parent}: start a new run (without ckpt_path).")
        raise WeightsError(f"Cannot resume: {e}{hint}") from e
    return ckpt


#: checkpoint key with the time.time() at which AtomicCheckpointIO wrote it (resume uses it to
#: drop the TensorBoard events a killed run logged after it)
SAVED_AT = "convlens_saved_at"


class CheckpointWriteError(ConvlensError, RuntimeError):
    """A checkpoint could not be written (full disk, read-only folder); the previous one is intact."""


class _Sink:
    """The file torch.save writes to, keeping the OSError of a failed write (torch.save raises its
    own RuntimeError instead)."""

    def __init__(self) -> None:
        self.error: OSError | None = None
        self._f = None

    def into(self, f) -> "_Sink":
        self._f = f
        return self

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, crash-safe: each checkpoint is written to a temp file beside it,
    fsynced and renamed over it, so it is either the old file or the new one (never truncated);
    a failed write removes its temp file and raises a CheckpointWriteError. Loading is always
    `weights_only=True` (`load_file`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {**checkpoint, SAVED_AT: time.time()}
        sink = _Sink()
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, sink.into(f)))
        except (OSError, RuntimeError) as e:
            # torch.save's zip writer reports a failed write (a full disk) as a RuntimeError
            e = sink.error or e
            if not isinstance(e, OSError):
                raise
            why = "the disk is full" if is_disk_full(e) else f"{type(e).__name__}: {e.strerror or e}"
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise CheckpointWriteError(
                f"Could not write the checkpoint {path}: {why} ({kept}). Free space or fix the folder, "
                f"then resume with ckpt_path={path.parent / 'last.ckpt'} (the same hydra.run.dir)."
            ) from e

    def load_checkpoint(self, path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_file(path, "checkpoint", map_location="cpu" if map_location is None else map_location)


def strip_prefix(state: dict, prefixes=WRAPPER_PREFIXES) -> dict:
    """The state dict without a prefix that every key shares (`net.conv1.weight` -> `conv1.weight`)."""
    for p in prefixes:
        if state and all(k.startswith(p) for k in state):
            return {k[len(p):]: v for k, v in state.items()}
    return state


def load_weight_file(path: str | os.PathLike) -> dict:
    """A plain state dict from a .pt/.pth file or a Lightning checkpoint (its `state_dict`), read with
    weights_only=True, a shared wrapper prefix stripped."""
    obj = load_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return strip_prefix(obj)


def load_state_checked(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model`; every missing, unexpected or wrongly shaped key is named in the error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if own[k].shape != state[k].shape
    )
    if missing or unexpected or mismatched:
        def show(xs):
            return ", ".join(xs[:12]) + (f" ... (+{len(xs) - 12} more)" if len(xs) > 12 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise WeightsError(
            f"The weights in {source} do not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Check that the file was saved from the same architecture (and num_classes)."
        )
    model.load_state_dict(state)


def pick_checkpoint(folder: str | os.PathLike) -> Path:
    """The best checkpoint in `folder` (the newest that is not `last*.ckpt`: ModelCheckpoint keeps
    the best there), else `last.ckpt`."""
    folder = Path(folder)
    ckpts = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    best = [p for p in ckpts if not p.name.startswith("last")]
    if best:
        return best[-1]
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(f"no checkpoint in {folder}")
