"""The job wrapper: `job(train)` wraps a task `train(cfg) -> metrics` the way
lightning-hydra-template's `task_wrapper` wraps its task. The wrapped function runs one job of a
single run or of a Hydra multirun and returns the run's `optimized_metric` (what a sweeper such as
hydra-optuna-sweeper optimizes). Around the task it

- applies the folder policy of `convlens.run_guard` (a finished job of a multirun is skipped, an
  interrupted one resumed, a failed one cleared and retried; a single run's results are never
  overwritten by accident);
- records the job's state in `status.json` (`convlens.run_status`): running, then finished, failed
  or interrupted;
- turns SIGTERM into an interrupt like Ctrl-C: the job is marked "interrupted" and the run stops
  (exit 130 / 143);
- after a failed attempt, removes the TensorBoard run it left without data, and the whole folder of
  a single run that never started (one this run made, holding only Hydra's and our bookkeeping).

In a multirun an exception is recorded and the job returns None, so one failed job never stops the
sweep; `RunGuard.on_multirun_end` then exits non-zero (after the summary) if a job failed or was
refused.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import traceback as tb
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, open_dict

from convlens import run_guard
from convlens.errors import ConfigError, ConvlensError, in_chain, one_line
from convlens.files import remove_stale_temps
# the names the job bookkeeping had when it was one module, for callers that import them from here
from convlens.run_guard import (JobConflictError, RunDirExistsError, RunGuard, finished_metrics,  # noqa: F401
                                read_refused, record_refused, refuse_existing_run, resume_point)
from convlens.run_status import (CHECKPOINTS, METRICS_FILE, STATUS_FILE, RunDirError,  # noqa: F401
                                 clear_previous_attempt, describe_error, event_files, is_rank_zero,
                                 read_status, remove_empty_tensorboard_run, remove_unstarted_run_dir,
                                 write_status)

log = logging.getLogger("convlens.jobs")

#: exit codes of an interrupted run (the shell's 128 + signal number)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
#: what `job` returns when the config has no `optimized_metric` (a config of an older convlens)
DEFAULT_OPTIMIZED_METRIC = "val/acc_best"


class OptimizedMetricError(ConfigError):
    """`optimized_metric` names a metric the run did not log."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (like Ctrl-C's KeyboardInterrupt)."""


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of `cfg.optimized_metric` in the run's `metrics` (None when the key is null)."""
    name = cfg.get("optimized_metric", DEFAULT_OPTIMIZED_METRIC)
    if name is None:
        return None
    if name not in metrics:
        raise OptimizedMetricError(
            f"optimized_metric={name} is not a metric this run logged (its results are kept in metrics.json); "
            f"it logged: {', '.join(sorted(metrics)) or 'nothing'}. Pass one of these, e.g. "
            f"optimized_metric=val/loss hydra.sweeper.direction=minimize")
    return metrics[name]


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


def job(task: Callable[[DictConfig], dict[str, float]]) -> Callable[..., float | None]:
    """Wrap `task(cfg) -> metrics` into `run(cfg, multirun=False) -> cfg.optimized_metric's value | None`,
    with the bookkeeping of the module docstring."""

    @functools.wraps(task)
    def run(cfg: DictConfig, multirun: bool = False) -> float | None:
        out = Path(cfg.paths.output_dir)
        overrides = _job_overrides()
        if is_rank_zero():  # the temp files of a writer killed mid-write
            for folder in (out, out / CHECKPOINTS):
                for f in remove_stale_temps(folder):
                    log.info("Removed %s, left by a process killed while writing it", f)
        if not multirun and is_rank_zero() and not run_guard.guarded(out):
            run_guard.check_run_dir(out, cfg, overrides)  # a run started in code: RunGuard did not see it
        try:
            if multirun and not cfg.get("overwrite"):
                run_guard.check_job_dir(out, overrides)  # never retrain over another job's results
            if cfg.get("skip_finished"):
                finished = finished_metrics(out, overrides)
                if finished is not None:
                    log.info("Skipping %s: finished earlier (metrics.json exists)", out)
                    return optimized_value(cfg, finished)
        except JobConflictError as e:
            if not multirun:
                raise
            record_refused(out, overrides, e, cfg)
            log.error("%s", one_line(e))
            print(f"\nconvlens: {one_line(e)}", file=sys.stderr)
            return None

        if cfg.get("ckpt_path") is None and multirun and (point := resume_point(out, overrides)) is not None:
            with open_dict(cfg):
                cfg.ckpt_path = str(point)
            log.info("Resuming the interrupted job %s from %s", out, point)
        if run_guard.resumes_in_place(cfg, out):
            pass  # resuming this folder's own run: convlens.resume prunes what came after the checkpoint
        elif cfg.get("overwrite"):
            if clear_previous_attempt(out):
                log.info("Overwriting %s (++overwrite=true): deleted the earlier run's events, checkpoints "
                         "and metrics.json", out)
        elif clear_previous_attempt(out):  # a single run's results were refused above
            log.info("Retrying %s: cleared the earlier attempt's event files and checkpoints", out)
        write_status(out, "running", overrides, resumed_from=cfg.get("ckpt_path"))
        before = event_files(out)
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
                # a configuration refused before anything ran (a ConfigError) leaves no folder; any
                # other failure (data not found, ...) keeps its train.log and status.json to read
                refused = in_chain(e, lambda x: isinstance(x, ConfigError)) is not None
                if refused and is_rank_zero() and run_guard.made_by_this_run(out) and remove_unstarted_run_dir(out):
                    log.info("Removed the run dir %s: the run failed before it started", out)
                raise
            log.error("Job %s failed (recorded in status.json; the sweep goes on): %s",
                      out, one_line(e), exc_info=not isinstance(e, ConvlensError))
            return None
        write_status(out, "finished", overrides)
        return optimized_value(cfg, metrics)  # what a sweeper optimizes

    return run
