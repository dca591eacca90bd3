"""Resuming a run in its own folder without wrong numbers: the TensorBoard events and checkpoints a
killed run wrote after the checkpoint it resumes from are taken out of the way.

A run killed at step S after writing `last.ckpt` at step G < S has logged steps G..S that the resumed
run logs again: the same tags and steps twice in one TensorBoard run. `prune_events` rewrites the
run's event files (atomically) without them: every event after step G, and at step G those written
after the checkpoint (Lightning logs the first batch of the next epoch at step G too; the epoch's
own images and metrics at G were logged before `last.ckpt`, which is written last at the end of an
epoch). Checkpoints written after the resumed one (a "best" epoch the run will train again) are
moved to `checkpoints/superseded/`, so the best checkpoint that `test` and the sweep summary use
is one of this run's.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from convlens.files import atomic_write

log = logging.getLogger("convlens.resume")

EVENT_GLOB = "events.out.tfevents.*"
SUPERSEDED = "superseded"


def _read_records(path: Path) -> list[bytes]:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    return list(RawEventFileLoader(str(path)).Load())  # stops at a truncated last record


def prune_events(logdir: str | os.PathLike, step: int, saved_at: float | None = None) -> int:
    """Drop from every event file under `logdir` the events with a step above `step`, and those at
    `step` with a wall time after `saved_at` (kept when it is None). Returns how many were dropped;
    a file that loses nothing is left untouched, a file left with no summary is removed."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(Path(logdir).rglob(EVENT_GLOB)):
        records = _read_records(path)
        kept = []
        for raw in records:
            event = event_pb2.Event.FromString(raw)
            if event.HasField("summary") and (
                    event.step > step or (event.step == step and saved_at is not None and event.wall_time > saved_at)):
                continue
            kept.append((raw, event))
        size_ok = sum(len(r) + 16 for r in records) == path.stat().st_size
        if len(kept) == len(records) and size_ok:
            continue
        dropped += len(records) - len(kept)
        if not any(event.HasField("summary") for _, event in kept):
            path.unlink()
            continue

        def write(f, kept=kept):
            writer = RecordWriter(f)
            for raw, _ in kept:
                writer.write(raw)

        atomic_write(path, write)
    return dropped


def set_aside_newer_checkpoints(folder: str | os.PathLike, resumed: str | os.PathLike) -> list[Path]:
    """Move the `*.ckpt` files in `folder` written after `resumed` into `folder/superseded/`."""
    folder, resumed = Path(folder), Path(resumed).resolve()
    if not folder.is_dir() or resumed.parent != folder.resolve():
        return []
    since = resumed.stat().st_mtime
    moved = []
    for p in sorted(folder.glob("*.ckpt")):
        if p.resolve() != resumed and p.stat().st_mtime > since:
            target = folder / SUPERSEDED / p.name
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(p), str(target))
            moved.append(target)
    return moved


def prepare_resume(run_dir: str | os.PathLike, ckpt_path: str | os.PathLike, ckpt: dict) -> None:
    """Before resuming from `ckpt_path` (loaded: `ckpt`) into `run_dir`: prune the events and set
    aside the checkpoints that a killed run wrote after it (rank zero only)."""
    from convlens.checkpoints import SAVED_AT

    run_dir, ckpt_path = Path(run_dir), Path(ckpt_path)
    step = int(ckpt.get("global_step", 0))
    saved_at = ckpt.get(SAVED_AT)
    if saved_at is None and ckpt_path.resolve().is_relative_to(run_dir.resolve()):
        saved_at = ckpt_path.stat().st_mtime  # a checkpoint of this run, not written by AtomicCheckpointIO
    dropped = prune_events(run_dir, step, saved_at)
    if dropped:
        log.info("Resuming at step %d: removed %d TensorBoard events logged after %s", step, dropped, ckpt_path.name)
    moved = set_aside_newer_checkpoints(run_dir / "checkpoints", ckpt_path)
    if moved:
        log.info("Moved %s (written after %s) to %s", ", ".join(p.name for p in moved), ckpt_path.name,
                 moved[0].parent)
