"""Run and sweep job bookkeeping: `status.json`, skipping finished jobs, resuming interrupted ones,
retrying failed ones, folder clashes, and never deleting a finished run.

`job(train)` wraps a task `train(cfg) -> metrics` the way lightning-hydra-template's `task_wrapper`
wraps its task: the wrapped function runs one job of a single run or of a Hydra multirun and keeps
its state in `<output_dir>/status.json`:

    {"status": "running" | "failed" | "interrupted" | "finished", "overrides": [...], "error": ...,
     "traceback": ..., "started": ..., "ended": ..., "resumed_from": ..., "attempts": [earlier attempts]}

beside the `metrics.json` that the task writes last (both written atomically: temp file, fsync,
rename). What a job does with what it finds in its folder:

- single run (`convlens-train ...`): a folder that holds a run's results (metrics.json or
  checkpoints) is refused with what is there and what to do (a new `hydra.run.dir`,
  `ckpt_path=<dir>/checkpoints/last.ckpt` to resume, or `++overwrite=true` to replace it), before
  Hydra writes anything into it (`RunGuard.on_run_start`);
- multirun: a finished job (metrics.json, from the same overrides) is skipped (`skip_finished`); an
  interrupted one (status "running" after `kill -9`, or "interrupted" after Ctrl-C / SIGTERM)
  resumes from its own intact `last.ckpt` (callback state and TensorBoard steps included, see
  `convlens.resume`); a failed one is cleared and retried; a folder that holds a finished job
  trained with other overrides is a `JobConflictError`, recorded as a "refused" job of the sweep.

In a multirun an exception is recorded and the job returns None, so one failed job never stops the
sweep; `RunGuard.on_multirun_end` then exits non-zero (after the summary) if a job failed or was
refused. Ctrl-C or SIGTERM marks the job "interrupted" and stops the run (exit 130 / 143).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback as tb
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from convlens.errors import ConvlensError, in_chain, one_line
from convlens.files import atomic_write_text, remove_stale_temps

log = logging.getLogger("convlens.jobs")

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
#: job overrides that do not change what a job computes (ignored when matching a finished job)
_BOOKKEEPING_KEYS = ("skip_finished", "overwrite", "ckpt_path")
#: where a multirun records the jobs it refused (they have no folder of their own)
REFUSED_DIR = Path(".convlens") / "refused"
#: exit codes of an interrupted run (the shell's 128 + signal number)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class JobConflictError(ConvlensError, ValueError):
    """A job dir already holds a finished job trained with other overrides."""


class RunDirExistsError(ConvlensError, FileExistsError):
    """A single run's folder already holds a run's results; nothing was changed."""


class RunDirError(ConvlensError, OSError):
    """The run (or sweep) folder cannot be written."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (like Ctrl-C's KeyboardInterrupt)."""


def _is_rank_zero() -> bool:
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
    if not _is_rank_zero():
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


# ----------------------------------------------------------------------------------------------
# what a job dir holds
# ----------------------------------------------------------------------------------------------

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


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _comparable(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if _key(o) not in _BOOKKEEPING_KEYS)


def _subdir_suggestion(recorded: Sequence[str], overrides: Sequence[str]) -> str:
    """A `hydra.sweep.subdir` override (shell- and Hydra-quoted, so it parses as one value) that
    adds the keys in which the two jobs differ to the current folder name."""
    differ = sorted({_key(o) for o in set(_comparable(recorded)) ^ set(_comparable(overrides))
                     if not _key(o).startswith("hydra.")})
    template = "c3=${model.c3},c4=${model.c4}"
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        template = OmegaConf.to_container(HydraConfig.get().sweep, resolve=False)["subdir"]
    present = template.split(",")
    extra = [f"{k.rsplit('.', 1)[-1]}=${{{k}}}" for k in differ if f"${{{k}}}" not in template]
    return "'hydra.sweep.subdir=\"" + ",".join(present + extra) + "\"'"


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
            f"add it to hydra.sweep.subdir, e.g. {_subdir_suggestion(recorded, overrides)} (quoted as "
            f"shown); to train again, delete that folder, use another hydra.sweep.dir, or pass "
            f"skip_finished=false")
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a broken file: train again


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


def refuse_existing_run(job_dir: str | os.PathLike) -> None:
    """Raise RunDirExistsError if `job_dir` holds an earlier run's results (see `previous_outputs`)."""
    job_dir = Path(job_dir)
    found = previous_outputs(job_dir)
    if not found:
        return
    state = (read_status(job_dir) or {}).get("status")
    what = ("a finished run" if (job_dir / METRICS_FILE).is_file()
            else f"an unfinished run (status: {state or 'unknown'})")
    raise RunDirExistsError(
        f"The run dir {job_dir} already holds {what} ({'; '.join(found)}); nothing was changed. Use a "
        f"new hydra.run.dir, resume that run with ckpt_path={job_dir / CHECKPOINTS / 'last.ckpt'} "
        f"(with a larger trainer.max_epochs to train it further), or replace it with ++overwrite=true.")


def clear_previous_attempt(job_dir: str | os.PathLike) -> bool:
    """Before training again from scratch in a job dir that holds an earlier attempt (a
    `status.json`): delete that attempt's TensorBoard event files, `checkpoints/` and
    `metrics.json`, so the new run's curves and best checkpoint are not mixed with the old ones.
    Its error stays in `status.json`. Returns whether there was an earlier attempt. Only for a
    failed sweep job, an explicit `++overwrite=true`, or an attempt with nothing worth keeping."""
    job_dir = Path(job_dir)
    if read_status(job_dir) is None or not _is_rank_zero():
        return False
    for f in job_dir.rglob("events.out.tfevents.*"):
        f.unlink()
    shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)
    (job_dir / METRICS_FILE).unlink(missing_ok=True)
    return True


def resume_point(job_dir: str | os.PathLike, overrides: Sequence[str]) -> Path | None:
    """The checkpoint an interrupted job (status "running" or "interrupted", same overrides)
    resumes from: its `last.ckpt` if intact, else its newest intact checkpoint; None otherwise."""
    from convlens.checkpoints import looks_intact, newest_intact_checkpoint

    job_dir = Path(job_dir)
    status = read_status(job_dir) or {}
    if status.get("status") not in ("running", "interrupted"):
        return None
    if _comparable(status.get("overrides") or []) != _comparable(overrides):
        return None
    last = job_dir / CHECKPOINTS / "last.ckpt"
    if looks_intact(last):
        return last
    return newest_intact_checkpoint(job_dir / CHECKPOINTS, exclude=last)


# ----------------------------------------------------------------------------------------------
# sweeps: refused jobs, the exit status
# ----------------------------------------------------------------------------------------------

def _multirun_sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(str(HydraConfig.get().sweep.dir)).absolute()


def record_refused(job_dir: Path, overrides: Sequence[str], error: BaseException, cfg: DictConfig) -> None:
    """Record a job the sweep refused (folder clash) under `<sweep dir>/.convlens/refused/`, so the
    summary lists it."""
    sweep_dir = _multirun_sweep_dir()
    if sweep_dir is None or not _is_rank_zero():
        return
    key = hashlib.sha1("\n".join(_comparable(overrides)).encode()).hexdigest()[:12]
    recorded = set(_comparable((read_status(job_dir) or {}).get("overrides") or []))
    differ = [o for o in _comparable(overrides) if o not in recorded]
    try:
        folder = job_dir.absolute().relative_to(sweep_dir).as_posix()
    except ValueError:
        folder = job_dir.name
    record = {"name": f"{folder} [refused: {' '.join(differ) or 'clash'}]", "overrides": _comparable(overrides),
              "dir": str(job_dir), "error": one_line(error), "config": OmegaConf.to_container(cfg, resolve=False)}
    path = sweep_dir / REFUSED_DIR / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, default=str))
    except OSError as e:
        log.error("Could not record the refused job in %s: %s", path, e)


def read_refused(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for path in sorted((Path(sweep_dir) / REFUSED_DIR).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def writable_dir_error(folder: str | os.PathLike) -> str | None:
    """Why `folder` (created if missing) cannot hold a run, or None if it can: tried by creating
    a file in it (as root, permission bits say nothing about a read-only or immutable folder)."""
    folder = Path(folder)
    probe = folder / f".convlens-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        for name in ("train.log", STATUS_FILE):  # an existing read-only or immutable file
            if (folder / name).exists():
                with open(folder / name, "ab"):
                    pass
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        return f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}"
    return None


def _exit_one_line(message: str, code: int = 1) -> None:
    print(f"\nconvlens: {message}", file=sys.stderr)
    sys.exit(code)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class RunGuard(_HydraCallback):
    """Hydra callback (`hydra.callbacks.run_guard`, conf/hydra/default.yaml): checks the run dir
    before Hydra writes its `.hydra/` config and log file into it (an unwritable folder, a
    finished run that a new run would overwrite), and ends a multirun with a non-zero exit status
    when a job failed or was refused, after every job ran and the summary was written (Hydra
    calls end callbacks in reverse order, so this one, listed first, runs last)."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        why = writable_dir_error(run_dir)
        if why is not None:
            _exit_one_line(f"RunDirError: cannot write to the run dir {run_dir} ({why}). Pick a writable "
                           f"hydra.run.dir, or fix the folder (a read-only mount, `chattr -i` for an immutable one).")
        if not _is_rank_zero():  # a DDP child started by rank zero, which did the checks
            return
        ckpt = OmegaConf.select(config, "ckpt_path", default=None, throw_on_missing=False)
        in_place = ckpt not in (None, "???") and \
            Path(str(ckpt)).expanduser().resolve().is_relative_to(run_dir.resolve())
        if not in_place and not config.get("overwrite") and not config.get("skip_finished"):
            try:
                refuse_existing_run(run_dir)
            except RunDirExistsError as e:
                _exit_one_line(one_line(e))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        why = writable_dir_error(sweep_dir)
        if why is not None:
            _exit_one_line(f"RunDirError: cannot write to the sweep dir {sweep_dir} ({why}). Pick a "
                           f"writable hydra.sweep.dir.")
        shutil.rmtree(sweep_dir / REFUSED_DIR, ignore_errors=True)  # this run records its own

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        failed = []
        for status_file in sorted(sweep_dir.rglob(STATUS_FILE)):
            with contextlib.suppress(OSError):
                if status_file.stat().st_mtime < self.started - 1:
                    continue  # not run by this multirun (skipped as finished, or another sweep point)
            status = read_status(status_file.parent) or {}
            if status.get("status") in ("failed", "interrupted", "running"):
                failed.append(status_file.parent.relative_to(sweep_dir).as_posix())
        refused = read_refused(sweep_dir)
        if failed or refused:
            parts = ([f"{len(failed)} failed ({', '.join(failed[:4])}{' ...' if len(failed) > 4 else ''})"]
                     if failed else []) + ([f"{len(refused)} refused (folder clash)"] if refused else [])
            summary = sweep_dir / "summary.md"
            where = f"; see {summary}" if summary.is_file() else f"; see the status.json files under {sweep_dir}"
            _exit_one_line(f"SweepError: the sweep ran every job, but {' and '.join(parts)}{where}. Rerun "
                           f"the same command to retry them (finished jobs are skipped).")


# ----------------------------------------------------------------------------------------------
# the job wrapper
# ----------------------------------------------------------------------------------------------

def _job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `_Terminated` in the main thread for the duration (Lightning's own handler,
    installed during fit, calls this one too), so the job is recorded as interrupted; SIGINT's
    handler is as before afterwards (a caller in the same process, a notebook, keeps its Ctrl-C)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sigint is not None:  # Lightning ignores SIGINT after a KeyboardInterrupt in fit: undo that
            signal.signal(signal.SIGINT, sigint)


def _caused_by_interrupt(error: BaseException) -> bool:
    return in_chain(error, lambda e: isinstance(e, KeyboardInterrupt)) is not None


def _interrupt_signal(error: BaseException) -> str:
    sigterm = in_chain(error, lambda e: isinstance(e, _Terminated) or type(e).__name__ == "SIGTERMException")
    return "SIGINT" if sigterm is None else "SIGTERM"


def _event_files(job_dir: Path) -> set[Path]:
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
    new = sorted(_event_files(job_dir) - before)
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


def job(task: Callable[[DictConfig], dict[str, float]]) -> Callable[..., float | None]:
    """Wrap `task(cfg) -> metrics` into `run(cfg, multirun=False) -> best val accuracy | None`,
    with the bookkeeping of the module docstring."""

    @functools.wraps(task)
    def run(cfg: DictConfig, multirun: bool = False) -> float | None:
        out = Path(cfg.paths.output_dir)
        overrides = _job_overrides()
        if _is_rank_zero():  # the temp files of a writer killed mid-write
            for folder in (out, out / CHECKPOINTS):
                for f in remove_stale_temps(folder):
                    log.info("Removed %s, left by a process killed while writing it", f)
        try:
            if cfg.get("skip_finished"):
                finished = finished_metrics(out, overrides)
                if finished is not None:
                    log.info("Skipping %s: finished earlier (metrics.json exists)", out)
                    return finished.get("val/acc_best")
        except JobConflictError as e:
            if not multirun:
                raise
            record_refused(out, overrides, e, cfg)
            log.error("%s", one_line(e))
            print(f"\nconvlens: {one_line(e)}", file=sys.stderr)
            return None

        resumed_from = cfg.get("ckpt_path")
        if resumed_from is None and multirun and (point := resume_point(out, overrides)) is not None:
            resumed_from = str(point)
            with open_dict(cfg):
                cfg.ckpt_path = resumed_from
            log.info("Resuming the interrupted job %s from %s", out, point)
        in_place = resumed_from is not None and Path(resumed_from).expanduser().resolve().is_relative_to(out.resolve())
        if in_place:
            pass  # resuming this folder's own run: convlens.resume prunes what came after the checkpoint
        elif cfg.get("overwrite"):
            if clear_previous_attempt(out):
                log.info("Overwriting %s (++overwrite=true): deleted the earlier run's events, checkpoints "
                         "and metrics.json", out)
        else:
            if not multirun and _is_rank_zero():
                refuse_existing_run(out)
            if clear_previous_attempt(out):
                log.info("Retrying %s: cleared the earlier attempt's event files and checkpoints", out)
        write_status(out, "running", overrides, resumed_from=resumed_from)
        before = _event_files(out)
        try:
            with _sigterm_raises():
                try:
                    metrics = task(cfg)
                except Exception as e:
                    if _caused_by_interrupt(e):  # e.g. an error raised while cleaning up after Ctrl-C
                        raise KeyboardInterrupt from e
                    raise
        except (KeyboardInterrupt, SystemExit) as e:
            sig = _interrupt_signal(e)
            write_status(out, "interrupted", overrides, error=f"interrupted by {sig}")
            remove_empty_tensorboard_run(out, before)
            last = out / CHECKPOINTS / "last.ckpt"
            how = ("rerun the same sweep command to resume it" if multirun else
                   f"resume with ckpt_path={last} hydra.run.dir={out}" if last.is_file() else
                   "no checkpoint was written yet: start it again")
            print(f"\nconvlens: interrupted by {sig}; {out / STATUS_FILE} says 'interrupted'; {how}",
                  file=sys.stderr)
            raise SystemExit(EXIT_CODES[sig]) from e
        except Exception as e:
            write_status(out, "failed", overrides, error=describe_error(e), traceback=tb.format_exc())
            remove_empty_tensorboard_run(out, before)
            if not multirun:
                raise
            log.error("Job %s failed (recorded in status.json; the sweep goes on): %s",
                      out, one_line(e), exc_info=not isinstance(e, ConvlensError))
            return None
        write_status(out, "finished", overrides)
        return metrics.get("val/acc_best")  # what a sweeper optimizes

    return run
