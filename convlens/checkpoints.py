"""Loading weight files and checkpoints, in one place, never running code from them.

Every file a user hands us (a `.pth` state dict, a Lightning `.ckpt`, a sweep job's checkpoint) is
read with `torch.load(..., weights_only=True)`: tensors, containers and an allow-list of plain
types only, so a crafted pickle is refused instead of executed. A file that is missing, empty,
truncated or not a checkpoint gets a `WeightsError` that names it and says what to do.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.errors import ConvlensError

#: prefixes a state dict saved from a wrapper carries (LightningModule.net, DataParallel, ...)
WRAPPER_PREFIXES = ("net.", "model.", "module.")


class WeightsError(ConvlensError, RuntimeError):
    """A weight file or source that cannot be used for this architecture."""


def load_file(path: str | os.PathLike, what: str = "weight file") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with a clear `WeightsError` for a
    missing, empty, corrupt or unsafe file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"The {what} {path} does not exist. Pass an existing .pth/.ckpt path.")
    if path.stat().st_size == 0:
        raise WeightsError(f"The {what} {path} is empty (0 bytes): it was not written completely. "
                           f"Use another checkpoint (e.g. an epoch checkpoint beside it).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"Refused to load {path}: it holds objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) does not run ({' '.join(str(e).split()[:24])} ...). "
            f"Only load files you trust; convert it to a plain state dict where it was made."
        ) from e
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"Could not read the {what} {path}: it is truncated or not a PyTorch file "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).") from e


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
