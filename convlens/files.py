"""Crash-safe file writes: a temp file beside the destination, fsync, rename.

A reader (or a rerun after `kill -9`, a power cut, a full disk) sees either the old file or the
new one, never a truncated one: the rename is atomic because the temp file is in the destination's
own folder (not in `$TMPDIR`, which may be another filesystem, where a "move" is a copy). A failed
write removes its temp file; one left by a killed process is removed by `remove_stale_temps` when
the next run starts in that folder.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import IO, Callable, Iterator

#: temp files are `.<name>.tmp-<pid>` beside `<name>`: hidden, and never matching `*.ckpt`/`*.json`
TEMP_INFIX = ".tmp-"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait until the block is done, then take effect as usual.

    An interrupt raised inside `torch.save` leaves its zip writer inconsistent, and its cleanup then
    raises a RuntimeError that hides the interrupt: the run would be recorded as failed, not
    interrupted. A write takes seconds at most, so the signal is held for that long and then
    re-delivered to the handler that was in place. Outside the main thread, signals cannot be
    handled there anyway: nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: h for sig in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(sig)) is not None}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through `write(file)` into a temp file beside it, fsync it, rename it over
    `path`. On any error (a full disk) the temp file is removed and `path` is left as it was; the
    error propagates. An interrupt (Ctrl-C, SIGTERM) waits until the file is written."""
    with deferred_interrupts():
        return _atomic_write(Path(path), write)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data))


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files of `atomic_write` in `folder` whose writer is gone (killed mid-write);
    returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for f in folder.glob(f".*{TEMP_INFIX}*"):
        pid = f.name.rsplit(TEMP_INFIX, 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            removed.append(f)
    return removed
