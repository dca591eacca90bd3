"""What a run's folder holds and says about itself: `status.json`, `metrics.json`, checkpoints, and
the traces of a failed attempt.

    {"status": "running" | "failed" | "interrupted" | "finished", "overrides": [...], "error": ...,
     "traceback": ..., "started": ..., "ended": ..., "resumed_from": ..., "attempts": [earlier attempts]}

is `<run dir>/status.json`, beside the `metrics.json` that the task writes last (both written
atomically: temp file, fsync, rename). Whether a run may use a folder is `convlens.run_guard`;
the job wrapper that writes these files is `convlens.jobs`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from convlens.errors import ConvlensError
from convlens.files import atomic_write_text

log = logging.getLogger("convlens.jobs")

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"


class RunDirError(ConvlensError, OSError):
    """The run (or sweep) folder cannot be written."""


def is_rank_zero() -> bool:
    # the env vars Lightning reads (DDP children, SLURM tasks); one writer per job dir
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


# ----------------------------------------------------------------------------------------------
# status.json
# ----------------------------------------------------------------------------------------------

def read_status(job_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job's `status.json`, or None when there is none (or it cannot be read)."""
    path = Path(job_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_in_place(path: Path, text: str) -> None:
    # a full disk: no room for a temp file, but the old status.json's own blocks can be reused
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(0)
        f.truncate()
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def write_status(job_dir: str | os.PathLike, status: str, overrides: Sequence[str],
                 error: str | None = None, traceback: str | None = None, **extra: Any) -> None:
    """Record the job's state in `status.json` (atomically, on rank zero only). An earlier attempt
    that is retried or resumed moves into `attempts`, so its error is kept. On a full disk the old
    file is rewritten in place (without the traceback) rather than left saying "running"."""
    if not is_rank_zero():
        return
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(job_dir) or {}
    attempts = list(previous.get("attempts", []))
    if status == "running" and previous.get("status") in ("failed", "running", "interrupted"):
        attempts.append({k: previous.get(k) for k in ("status", "error", "started", "ended")})
    now = dt.datetime.now().isoformat(timespec="seconds")
    record = {"status": status, "overrides": list(overrides), "error": error, "traceback": traceback,
              "started": now if status == "running" else previous.get("started"),
              "ended": None if status == "running" else now, "attempts": attempts,
              "resumed_from": extra.pop("resumed_from", None if status == "running" else previous.get("resumed_from")),
              **extra}
    path = job_dir / STATUS_FILE
    try:
        atomic_write_text(path, json.dumps(record, indent=2))
    except OSError as e:
        if status == "running":
            raise RunDirError(f"Cannot write {path}: {e.strerror or e}. Use a writable hydra.run.dir "
                              f"(or hydra.sweep.dir) with free space.") from e
        try:
            _write_in_place(path, json.dumps({**record, "traceback": None}))
        except OSError:
            log.error("Could not record status %r in %s: %s", status, path, e)


def describe_error(error: BaseException) -> str:
    """One line for the summary: the root cause (e.g. the ValueError inside Hydra's
    InstantiationException), naming the wrapper it was raised as."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = f"{type(root).__name__}: {root}"
    if root is not error:
        text += f" (raised as {type(error).__name__})"
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# what an earlier run left in a folder
# ----------------------------------------------------------------------------------------------

def previous_outputs(job_dir: str | os.PathLike) -> list[str]:
    """What an earlier run left in `job_dir` that is worth keeping (results, checkpoints), in words;
    empty when there is nothing (or only the traces of a run that failed before its first epoch)."""
    job_dir = Path(job_dir)
    found = []
    if (job_dir / METRICS_FILE).is_file():
        found.append(METRICS_FILE)
    ckpts = sorted(p.name for p in (job_dir / CHECKPOINTS).glob("*.ckpt"))
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s): {', '.join(ckpts[:3])}" + (" ..." if len(ckpts) > 3 else ""))
    if found:
        events = list(job_dir.rglob("events.out.tfevents.*"))
        if events:
            found.append(f"{len(events)} TensorBoard event file(s)")
    return found


def clear_previous_attempt(job_dir: str | os.PathLike) -> bool:
    """Before training again from scratch in a job dir that holds an earlier attempt (a
    `status.json`): delete that attempt's TensorBoard event files, `checkpoints/` and
    `metrics.json`, so the new run's curves and best checkpoint are not mixed with the old ones.
    Its error stays in `status.json`. Returns whether there was an earlier attempt. Only for a
    failed sweep job, an explicit `++overwrite=true`, or an attempt with nothing worth keeping."""
    job_dir = Path(job_dir)
    if read_status(job_dir) is None or not is_rank_zero():
        return False
    for f in job_dir.rglob("events.out.tfevents.*"):
        f.unlink()
    shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)
    (job_dir / METRICS_FILE).unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------------------------
# the traces of a failed attempt
# ----------------------------------------------------------------------------------------------

def event_files(job_dir: Path) -> set[Path]:
    return set(job_dir.rglob("events.out.tfevents.*"))


def _holds_data(event_file: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    with contextlib.suppress(Exception):
        for raw in RawEventFileLoader(str(event_file)).Load():
            event = event_pb2.Event.FromString(raw)
            if event.HasField("summary") and len(event.summary.value):
                return True
        return False
    return True


def remove_empty_tensorboard_run(job_dir: Path, before: set[Path]) -> None:
    """After a failed attempt: remove the event files it created that hold no data (a run that
    failed before logging anything), its hparams.yaml and the folders left empty."""
    new = sorted(event_files(job_dir) - before)
    if not new or any(_holds_data(f) for f in new):
        return
    for f in new:
        with contextlib.suppress(OSError):
            f.unlink()
    for folder in sorted({f.parent for f in new}, key=lambda p: len(p.parts), reverse=True):
        if not any(folder.glob("events.out.tfevents.*")):
            with contextlib.suppress(OSError):
                (folder / "hparams.yaml").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()


def _run_trace(relative: str) -> bool:
    # what Hydra (its .hydra/ config, the job's log file) and the job wrapper write before the task starts
    top_level_log = "/" not in relative and relative.endswith(".log")
    return relative == STATUS_FILE or relative.startswith(".hydra/") or top_level_log


def remove_unstarted_run_dir(job_dir: Path) -> bool:
    """Remove a run dir that holds only the traces of a run that never started (Hydra's `.hydra/`,
    the log file, `status.json`, empty folders); returns whether it did. A folder with anything else
    in it, or with an earlier attempt recorded, is left as it is. Only for a folder this run made
    (`convlens.run_guard.made_by_this_run`)."""
    if not job_dir.is_dir() or previous_outputs(job_dir) or (read_status(job_dir) or {}).get("attempts"):
        return False
    if not all(_run_trace(p.relative_to(job_dir).as_posix()) for p in job_dir.rglob("*") if not p.is_dir()):
        return False
    shutil.rmtree(job_dir, ignore_errors=True)
    return not job_dir.exists()
