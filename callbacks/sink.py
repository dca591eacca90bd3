"""Where the callbacks' pictures, numbers, text and histograms go: every logger the trainer has.

Plain functions of the trainer, called on rank zero (they do nothing elsewhere), each at an explicit
step (the callbacks use `base.log_step`, the step of the epoch's validation scalars):

| logger | images | scalars | text | histograms |
|---|---|---|---|---|
| `TensorBoardLogger` | image summaries | `log_metrics` | text summaries | histogram summaries |
| `WandbLogger` | `log_image` (with the caption) | `log_metrics` | a one-cell `wandb.Table` | `wandb.Histogram` |
| `MLFlowLogger` | artifacts `viz/<tag>/step<step>.png` | `log_metrics` | artifacts `.txt` | artifacts `.json` |
| `CSVLogger` | files `<its log_dir>/viz/<tag>/step<step>.png` | `log_metrics` | files `.txt` | files `.json` |
| any other logger | files under `<default_root_dir>/viz` | `log_metrics` | files | files |
| no logger | files under `<default_root_dir>/viz` | `<default_root_dir>/viz/scalars.csv` | files | files |

Several loggers at once: each gets everything. W&B takes the step as Lightning's `WandbLogger` does,
as the `trainer/global_step` value of the row (W&B's own `_step` only counts rows), so the
visualizations never clash with Lightning's metric steps. `wandb` and `mlflow` are imported only
through such a logger: a run without one never imports them. A logger that fails to record
something is warned about once and left out of that record; training goes on.

Images are [1|3, H, W] floats in [0, 1], stored as uint8 (values truncated, as TensorBoard's
`add_image`) and enlarged by `render.readable_factor` (nearest neighbour), the same pixels for
every logger. Histograms drop non-finite values; files and MLflow store
`{"tag", "step", "count", "min", "max", "edges", "counts"}` with `HISTOGRAM_BINS` equal bins.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from convlens.callbacks.lightning_compat import tensorboard_file_writer
from convlens.errors import ConvlensError
from convlens.events import encode_png, image_summary
from convlens.render import readable_factor

#: bins of a histogram written to files and MLflow (TensorBoard and W&B bin on their own)
HISTOGRAM_BINS = 64
#: the folder, inside a run's directory, of the files the sink writes
VIZ_DIR = "viz"


def log_dir(trainer) -> Path:
    """The run's directory for files: the `log_dir` of the trainer's first TensorBoard or CSV
    logger, else its `default_root_dir`. (Lightning's `trainer.log_dir` broadcasts from rank zero,
    which would wait forever for ranks that do not call it.)"""
    for lg in trainer.loggers:
        if isinstance(lg, (TensorBoardLogger, CSVLogger)):
            return Path(lg.log_dir)
    return Path(trainer.default_root_dir)


def fallback_dir(trainer) -> Path:
    """Where files go for a logger that takes no images (and for no logger): `<default_root_dir>/viz`."""
    return Path(trainer.default_root_dir) / VIZ_DIR


@rank_zero_only
def log_image(trainer, tag: str, image: torch.Tensor, step: int, caption: str | None = None) -> None:
    """Log a [1|3, H, W] image in [0, 1] under `tag` at `step` to every logger; `caption` goes to
    the loggers that show one (W&B)."""
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] not in (1, 3) or not image.numel():
        shape = list(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ConvlensError(f"log_image({tag!r}) needs a [1|3, H, W] image tensor, got {shape}")
    image = image.detach().float().clamp(0, 1).cpu()
    factor = readable_factor(image.shape[-1])
    pixels = _pixels(image)
    png = summary = None  # each encoded once, for however many loggers take it
    what = f"image {tag!r}"
    for kind, target in _targets(trainer):
        if kind == "tensorboard":
            summary = summary if summary is not None else image_summary(tag, image, scale=factor)
            _guarded(target, what, lambda: tensorboard_file_writer(target).add_summary(summary, step))
        elif kind == "wandb":
            big = pixels.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else pixels
            extra = {"caption": [caption]} if caption is not None else {}
            _guarded(target, what, lambda: target.log_image(key=tag, images=[big], step=step, **extra))
        else:
            png = png if png is not None else encode_png(pixels, factor)
            _write(kind, target, tag, step, ".png", png, what)


@rank_zero_only
def log_scalars(trainer, scalars: Mapping[str, float], step: int) -> None:
    """Log `{tag: value}` at `step` through every logger's `log_metrics`; without a logger, appended
    to `<default_root_dir>/viz/scalars.csv` (columns step, tag, value)."""
    scalars = {k: float(v) for k, v in scalars.items()}
    if not trainer.loggers:
        path = fallback_dir(trainer) / "scalars.csv"
        _guarded(path.parent, "scalars", lambda: _append_scalars(path, scalars, step))
    for lg in trainer.loggers:
        _guarded(lg, "scalars", lambda: lg.log_metrics(scalars, step=step))


@rank_zero_only
def log_text(trainer, tag: str, text: str, step: int) -> None:
    """Log `text` (TensorBoard renders it as markdown, so a markdown table is a table there) under
    `tag` at `step` to every logger."""
    text, what = str(text), f"text {tag!r}"
    for kind, target in _targets(trainer):
        if kind == "tensorboard":
            _guarded(target, what, lambda: target.experiment.add_text(tag, text, global_step=step))
        elif kind == "wandb":
            _guarded(target, what, lambda: target.log_text(key=tag, columns=["text"], data=[[text]], step=step))
        else:
            _write(kind, target, tag, step, ".txt", text.encode(), what)


@rank_zero_only
def log_histogram(trainer, tag: str, values: Any, step: int) -> None:
    """Log the distribution of `values` (a tensor or array of any shape; non-finite values are
    dropped) under `tag` at `step` to every logger."""
    values = values.detach().double().cpu().numpy() if torch.is_tensor(values) else np.asarray(values, float)
    values = values.ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        _warn_once(("no finite values", tag), f"convlens: histogram {tag!r} has no finite values; not logged")
        return
    record, what = None, f"histogram {tag!r}"
    for kind, target in _targets(trainer):
        if kind == "tensorboard":
            _guarded(target, what, lambda: target.experiment.add_histogram(tag, values, global_step=step))
        elif kind == "wandb":
            _guarded(target, what, lambda: _wandb_histogram(target, tag, values, step))
        else:
            if record is None:
                counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
                record = json.dumps({"tag": tag, "step": step, "count": int(values.size), "min": float(values.min()),
                                     "max": float(values.max()), "edges": edges.tolist(),
                                     "counts": counts.tolist()}).encode()
            _write(kind, target, tag, step, ".json", record, what)


# -- dispatch ------------------------------------------------------------------------------------

def _targets(trainer) -> Iterator[tuple[str, Any]]:
    """(kind, logger or folder) for each place a record goes: one per TensorBoard, W&B, MLflow
    logger; a folder per CSV logger; the fallback folder once for all other loggers (and for no
    logger), so two loggers that take no images do not write the same files twice."""
    folders: list[Path] = []
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            yield "tensorboard", lg
        elif isinstance(lg, WandbLogger):
            yield "wandb", lg
        elif isinstance(lg, MLFlowLogger):
            yield "mlflow", lg
        else:
            folder = fallback_dir(trainer)
            if isinstance(lg, CSVLogger):
                # its writer first: made in a log dir that is not empty (our files), it would warn
                # that the run's files are about to be replaced
                _ = lg.experiment
                folder = Path(lg.log_dir) / VIZ_DIR
            if folder not in folders:
                folders.append(folder)
                yield "files", folder
    if not trainer.loggers:
        yield "files", fallback_dir(trainer)


def _record_name(tag: str, step: int, suffix: str) -> str:
    return f"{tag}/step{step:07d}{suffix}"


def _write(kind: str, target: Any, tag: str, step: int, suffix: str, data: bytes, what: str) -> None:
    if kind == "mlflow":
        _guarded(target, what, lambda: _to_mlflow(target, _record_name(tag, step, suffix), data))
    else:
        path = target / _record_name(tag, step, suffix)
        _guarded(target, what, lambda: _write_file(path, data))


def _write_file(path: Path, data: bytes) -> None:
    """Written whole or not at all: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _to_mlflow(lg: MLFlowLogger, name: str, data: bytes) -> None:
    """`data` as the run's artifact `viz/<name>` (`log_artifact` takes a local file)."""
    folder, _, filename = f"{VIZ_DIR}/{name}".rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        lg.experiment.log_artifact(lg.run_id, str(path), artifact_path=folder)


def _wandb_histogram(lg: WandbLogger, tag: str, values: np.ndarray, step: int) -> None:
    import wandb  # only here: a W&B logger is in use

    lg.log_metrics({tag: wandb.Histogram(values)}, step=step)


def _append_scalars(path: Path, scalars: Mapping[str, float], step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "tag", "value"])
        for k, v in scalars.items():
            w.writerow([step, k, v])


def _pixels(image: torch.Tensor) -> np.ndarray:
    """[H, W] or [H, W, 3] uint8, truncated as `events.image_summary` (and `add_image`) does."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


# -- failures ------------------------------------------------------------------------------------

#: loggers (and folders) already warned about: one warning each, however often they fail
_warned_loggers: "weakref.WeakSet[Logger]" = weakref.WeakSet()
_warned_keys: set = set()


def _guarded(target: Any, what: str, write: Callable[[], Any]) -> None:
    """Run `write` (at once); an exception (a logger that cannot write: W&B's offline storage full,
    an MLflow server gone, a full disk) is warned about once per logger or folder, and the run goes on."""
    try:
        write()
    except Exception as e:  # a logger's failure must not end the training
        name = type(target).__name__ if isinstance(target, Logger) else f"writing to {target}"
        _warn_once(target, f"convlens: {name} failed to record the {what} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())}); training goes on, and further failures there are not "
                           "reported")


def _warn_once(key: Any, message: str) -> None:
    seen = _warned_loggers if isinstance(key, Logger) else _warned_keys
    if key not in seen:
        seen.add(key)
        rank_zero_warn(message)
