"""Sweep job bookkeeping: `status.json`, skipping finished jobs, retrying failed ones, folder clashes.

`job(train)` wraps a task `train(cfg) -> metrics` the way lightning-hydra-template's `task_wrapper`
wraps its task: the wrapped function runs one job of a single run or of a Hydra multirun and keeps
its state in `<output_dir>/status.json`:

    {"status": "running" | "failed" | "finished", "overrides": [...], "error": ..., "traceback": ...,
     "started": ..., "ended": ..., "attempts": [earlier failed attempts]}

beside the `metrics.json` that the task writes last. A rerun of a sweep into the same sweep dir
skips jobs whose `metrics.json` exists (from the same overrides) and retries the others; a job dir
that holds a finished job trained with other overrides is a `JobConflictError`. In a multirun an
exception is recorded and the job returns None, so one failed job never stops the sweep.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import shutil
import sys
import traceback as tb
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from convlens.errors import ConvlensError, one_line

log = logging.getLogger("convlens.jobs")

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
#: job overrides that do not change what a job computes (ignored when matching a finished job)
_BOOKKEEPING_KEYS = ("skip_finished",)


class JobConflictError(ConvlensError, ValueError):
    """A job dir already holds a finished job trained with other overrides."""


def _is_rank_zero() -> bool:
    # the env vars Lightning reads (DDP children, SLURM tasks); one writer per job dir
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


def read_status(job_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job's `status.json`, or None when there is none (or it cannot be read)."""
    path = Path(job_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_status(job_dir: str | os.PathLike, status: str, overrides: Sequence[str],
                 error: str | None = None, traceback: str | None = None) -> None:
    """Record the job's state in `status.json` (atomically, on rank zero only). A failed attempt
    that is retried moves into `attempts`, so its error is kept."""
    if not _is_rank_zero():
        return
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(job_dir) or {}
    attempts = list(previous.get("attempts", []))
    if status == "running" and previous.get("status") in ("failed", "running"):
        attempts.append({k: previous.get(k) for k in ("status", "error", "started", "ended")})
    now = dt.datetime.now().isoformat(timespec="seconds")
    record = {"status": status, "overrides": list(overrides), "error": error, "traceback": traceback,
              "started": now if status == "running" else previous.get("started"),
              "ended": None if status == "running" else now, "attempts": attempts}
    tmp = job_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(job_dir / STATUS_FILE)


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


def _comparable(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in _BOOKKEEPING_KEYS)


def finished_metrics(job_dir: str | os.PathLike, overrides: Sequence[str]) -> dict[str, float] | None:
    """The metrics of a finished job in `job_dir` (its `metrics.json`), or None if it has not
    finished. Raises JobConflictError when it finished with other overrides than `overrides`
    (two sweep points mapped to one folder, or a sweep rerun with other settings)."""
    job_dir = Path(job_dir)
    path = job_dir / METRICS_FILE
    if not path.is_file():
        return None
    recorded = (read_status(job_dir) or {}).get("overrides")
    if recorded is not None and _comparable(recorded) != _comparable(overrides):
        raise JobConflictError(
            f"{job_dir} already holds a finished job trained with the overrides {_comparable(recorded)}, "
            f"not this job's {_comparable(overrides)}. If a swept key is missing from the folder name, "
            f"add it to hydra.sweep.subdir (e.g. 'hydra.sweep.subdir=c3=${{model.c3}},c4=${{model.c4}},"
            f"lr=${{model.optimizer.lr}}'); to train again, delete that folder, use another "
            f"hydra.sweep.dir, or pass skip_finished=false")
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a broken file: train again


def clear_previous_attempt(job_dir: str | os.PathLike) -> bool:
    """Before training again in a job dir that holds an earlier attempt (a `status.json`): delete
    that attempt's TensorBoard event files, `checkpoints/` and `metrics.json`, so the new run's
    curves and best checkpoint are not mixed with the old ones. Its error stays in `status.json`.
    Returns whether there was an earlier attempt."""
    job_dir = Path(job_dir)
    if read_status(job_dir) is None or not _is_rank_zero():
        return False
    for f in job_dir.rglob("events.out.tfevents.*"):
        f.unlink()
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    (job_dir / METRICS_FILE).unlink(missing_ok=True)
    return True


def _job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def job(task: Callable[[DictConfig], dict[str, float]]) -> Callable[..., float | None]:
    """Wrap `task(cfg) -> metrics` into `run(cfg, multirun=False) -> best val accuracy | None`,
    with the bookkeeping of the module docstring. With `cfg.skip_finished`, a job whose
    `metrics.json` exists is not run again; a failed or interrupted earlier attempt is cleared and
    retried. In a single run an exception propagates (after being recorded)."""

    @functools.wraps(task)
    def run(cfg: DictConfig, multirun: bool = False) -> float | None:
        out = Path(cfg.paths.output_dir)
        overrides = _job_overrides()
        try:
            if cfg.get("skip_finished"):
                finished = finished_metrics(out, overrides)
                if finished is not None:
                    log.info("Skipping %s: finished earlier (metrics.json exists)", out)
                    return finished.get("val/acc_best")
        except JobConflictError as e:
            if not multirun:
                raise
            log.error("%s", one_line(e))
            print(f"\nconvlens: {one_line(e)}", file=sys.stderr)
            return None
        if cfg.get("ckpt_path") is None and clear_previous_attempt(out):
            log.info("Retrying %s: cleared the earlier attempt's event files and checkpoints", out)
        write_status(out, "running", overrides)
        try:
            metrics = task(cfg)
        except Exception as e:
            write_status(out, "failed", overrides, error=describe_error(e), traceback=tb.format_exc())
            if not multirun:
                raise
            log.error("Job %s failed (recorded in status.json; the sweep goes on): %s",
                      out, one_line(e), exc_info=not isinstance(e, ConvlensError))
            return None
        write_status(out, "finished", overrides)
        return metrics.get("val/acc_best")  # what a sweeper optimizes

    return run
