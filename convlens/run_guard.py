"""Whether a run may use its folder: the conflict policy of runs and sweeps, and the Hydra callback
that applies it before Hydra writes anything.

- single run (`convlens-train ...`): a folder that holds a run's results (metrics.json or
  checkpoints) is refused with what is there and what to do (a new `hydra.run.dir`,
  `ckpt_path=<dir>/checkpoints/last.ckpt` to resume, or `++overwrite=true` to replace it)
  (`check_run_dir`), by `RunGuard.on_run_start` before Hydra writes its `.hydra/` into it, or by
  the job wrapper for a run started in code;
- multirun: a folder that holds the results or checkpoints of a job trained with other overrides
  is a `JobConflictError` (`check_job_dir`, unless `++overwrite=true`), recorded as a "refused" job
  of the sweep (`record_refused`); a finished job (metrics.json, from the same overrides) is
  skipped (`skip_finished`); an interrupted one resumes from its own intact checkpoint
  (`resume_point`); `RunGuard.on_multirun_end` exits non-zero if a job failed or was refused.

What the files say is `convlens.run_status`; the job wrapper is `convlens.jobs`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, read_write

from convlens.errors import ConvlensError, one_line
from convlens.files import atomic_write_text
from convlens.run_status import (CHECKPOINTS, METRICS_FILE, STATUS_FILE, is_rank_zero, previous_outputs,
                                 read_status)

log = logging.getLogger("convlens.jobs")

#: job overrides that do not change what a job computes (ignored when matching a finished job)
BOOKKEEPING_KEYS = ("skip_finished", "overwrite", "ckpt_path", "optimized_metric")
#: where a multirun records the jobs it refused (they have no folder of their own)
REFUSED_DIR = Path(".convlens") / "refused"


class JobConflictError(ConvlensError, ValueError):
    """A job dir already holds a finished job trained with other overrides."""


class RunDirExistsError(ConvlensError, FileExistsError):
    """A single run's folder already holds a run's results; nothing was changed."""


# ----------------------------------------------------------------------------------------------
# the same job?
# ----------------------------------------------------------------------------------------------

def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def comparable(overrides: Sequence[str]) -> list[str]:
    """The overrides that decide what a job computes, sorted."""
    return sorted(o for o in overrides if override_key(o) not in BOOKKEEPING_KEYS)


def _subdir_suggestion(recorded: Sequence[str], overrides: Sequence[str]) -> str:
    """A `hydra.sweep.subdir` override (shell- and Hydra-quoted, so it parses as one value) that
    adds the keys in which the two jobs differ to the current folder name."""
    differ = sorted({override_key(o) for o in set(comparable(recorded)) ^ set(comparable(overrides))
                     if not override_key(o).startswith("hydra.")})
    template = "${hydra.job.override_dirname}"  # conf/hydra/default.yaml's, where Hydra's config is not at hand
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        template = OmegaConf.to_container(HydraConfig.get().sweep, resolve=False)["subdir"]
    present = template.split(",")
    extra = [f"{k.rsplit('.', 1)[-1]}=${{{k}}}" for k in differ if f"${{{k}}}" not in template]
    return "'hydra.sweep.subdir=\"" + ",".join(present + extra) + "\"'"


def _conflict(job_dir: Path, what: str, recorded: Sequence[str], overrides: Sequence[str]) -> JobConflictError:
    return JobConflictError(
        f"{job_dir} already holds {what} trained with the overrides {comparable(recorded)}, "
        f"not this job's {comparable(overrides)}. If a swept key is missing from the folder name, "
        f"add it to hydra.sweep.subdir, e.g. {_subdir_suggestion(recorded, overrides)} (quoted as "
        f"shown); to train again, delete that folder, use another hydra.sweep.dir, or replace it with "
        f"++overwrite=true")


def check_job_dir(job_dir: str | os.PathLike, overrides: Sequence[str]) -> None:
    """The policy of a sweep job: a folder that holds the results or checkpoints of a job with other
    overrides (two sweep points mapped to one folder, or a sweep rerun with other settings) is a
    JobConflictError; anything else is the job's own to skip, resume or retry."""
    job_dir = Path(job_dir)
    recorded = (read_status(job_dir) or {}).get("overrides")
    if recorded is None or comparable(recorded) == comparable(overrides) or not previous_outputs(job_dir):
        return
    finished = (job_dir / METRICS_FILE).is_file()
    raise _conflict(job_dir, "a finished job" if finished else "an unfinished job's checkpoints", recorded, overrides)


def finished_metrics(job_dir: str | os.PathLike, overrides: Sequence[str]) -> dict[str, float] | None:
    """The metrics of a finished job in `job_dir` (its `metrics.json`), or None if it has not
    finished. Raises JobConflictError when it finished with other overrides than `overrides`."""
    job_dir = Path(job_dir)
    path = job_dir / METRICS_FILE
    if not path.is_file():
        return None
    recorded = (read_status(job_dir) or {}).get("overrides")
    if recorded is not None and comparable(recorded) != comparable(overrides):
        raise _conflict(job_dir, "a finished job", recorded, overrides)
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a broken file: train again


def resume_point(job_dir: str | os.PathLike, overrides: Sequence[str]) -> Path | None:
    """The checkpoint an interrupted job (status "running" or "interrupted", same overrides)
    resumes from: its `last.ckpt` if intact, else its newest intact checkpoint; None otherwise."""
    from convlens.checkpoints import looks_intact, newest_intact_checkpoint

    job_dir = Path(job_dir)
    status = read_status(job_dir) or {}
    if status.get("status") not in ("running", "interrupted"):
        return None
    if comparable(status.get("overrides") or []) != comparable(overrides):
        return None
    last = job_dir / CHECKPOINTS / "last.ckpt"
    if looks_intact(last):
        return last
    return newest_intact_checkpoint(job_dir / CHECKPOINTS, exclude=last)


# ----------------------------------------------------------------------------------------------
# a single run's folder
# ----------------------------------------------------------------------------------------------

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


def resumes_in_place(cfg: DictConfig, run_dir: str | os.PathLike) -> bool:
    """Whether `cfg.ckpt_path` is a checkpoint inside `run_dir` (resuming that folder's own run)."""
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None, throw_on_missing=False)
    return ckpt not in (None, "???") and \
        Path(str(ckpt)).expanduser().resolve().is_relative_to(Path(run_dir).resolve())


def check_run_dir(run_dir: str | os.PathLike, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """The policy of a single run: a folder with an earlier run's results is refused
    (RunDirExistsError) unless this run resumes it in place (`ckpt_path` inside it), replaces it
    (`overwrite`), or will skip it as finished with the same overrides (`skip_finished`; a finished
    run with other overrides is a JobConflictError)."""
    if resumes_in_place(cfg, run_dir) or cfg.get("overwrite"):
        return
    if cfg.get("skip_finished") and finished_metrics(run_dir, overrides) is not None:
        return
    refuse_existing_run(run_dir)


#: run dirs that RunGuard checked in this process: {dir: whether this run made it}
_GUARDED: dict[Path, bool] = {}


def guarded(run_dir: str | os.PathLike) -> bool:
    """Whether RunGuard has already applied `check_run_dir` to `run_dir` in this process."""
    return Path(run_dir).absolute() in _GUARDED


def made_by_this_run(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` did not exist before this run (RunGuard saw it missing)."""
    return _GUARDED.get(Path(run_dir).absolute(), False)


# ----------------------------------------------------------------------------------------------
# sweeps: refused jobs
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
    if sweep_dir is None or not is_rank_zero():
        return
    key = hashlib.sha1("\n".join(comparable(overrides)).encode()).hexdigest()[:12]
    recorded = set(comparable((read_status(job_dir) or {}).get("overrides") or []))
    differ = [o for o in comparable(overrides) if o not in recorded]
    try:
        folder = job_dir.absolute().relative_to(sweep_dir).as_posix()
    except ValueError:
        folder = job_dir.name
    record = {"name": f"{folder} [refused: {' '.join(differ) or 'clash'}]", "overrides": comparable(overrides),
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


# ----------------------------------------------------------------------------------------------
# the Hydra callback
# ----------------------------------------------------------------------------------------------

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


def hydra_dir(config: DictConfig, key: str) -> Path:
    """`config`'s `hydra.run.dir` or `hydra.sweep.dir` (`key`), absolute. Hydra calls the start
    callbacks before it sets its runtime config, which the default dirs need (`paths.root_dir` is
    `${hydra:runtime.cwd}`): it is set while the key is resolved, then put back as it was. The
    `${now:...}` in the dir is cached in `config`, so Hydra later resolves the same folder."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    previous, readonly = instance.cfg, config.hydra._get_node_flag("readonly")
    instance.set_config(config)  # also marks config.hydra read-only
    try:
        return Path(str(OmegaConf.select(config, key))).absolute()
    finally:
        instance.cfg = previous
        OmegaConf.set_readonly(config.hydra, readonly)


def _exit_one_line(message: str, code: int = 1) -> None:
    print(f"\nconvlens: {message}", file=sys.stderr)
    sys.exit(code)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class RunGuard(_HydraCallback):
    """Hydra callback (`hydra.callbacks.run_guard`, conf/hydra/default.yaml): checks the run dir
    before Hydra writes its `.hydra/` config and log file into it (an unwritable folder, an earlier
    run that this one would overwrite: `check_run_dir`), and ends a multirun with a non-zero exit
    status when a job failed or was refused, after every job ran and the summary was written (Hydra
    calls end callbacks in reverse order, so this one, listed first, runs last)."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = hydra_dir(config, "hydra.run.dir")
        existed = run_dir.exists()
        why = writable_dir_error(run_dir)
        if why is not None:
            _exit_one_line(f"RunDirError: cannot write to the run dir {run_dir} ({why}). Pick a writable "
                           f"hydra.run.dir, or fix the folder (a read-only mount, `chattr -i` for an immutable one).")
        if not is_rank_zero():  # a DDP child started by rank zero, which did the checks
            return
        try:
            check_run_dir(run_dir, config, list(config.hydra.overrides.task))
        except (RunDirExistsError, JobConflictError) as e:
            _exit_one_line(one_line(e))
        _GUARDED[run_dir] = not existed

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        sweep_dir = hydra_dir(config, "hydra.sweep.dir")
        # Hydra's sweepers read the sweep dir without setting its runtime config first, which the
        # default dir needs: they get it resolved (the jobs' own configs resolve it as before)
        with read_write(config.hydra.sweep):
            config.hydra.sweep.dir = str(sweep_dir)
        why = writable_dir_error(sweep_dir)
        if why is not None:
            _exit_one_line(f"RunDirError: cannot write to the sweep dir {sweep_dir} ({why}). Pick a "
                           f"writable hydra.sweep.dir.")
        shutil.rmtree(sweep_dir / REFUSED_DIR, ignore_errors=True)  # this run records its own

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = hydra_dir(config, "hydra.sweep.dir")
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
