"""The time budget of the visualizations: together they take at most a share of the epoch.

Each due epoch, a callback compares the seconds its drawing took with its part of the budget:
`budget` (a share, default 5%) of the epoch's own time (training and validation, measured from the
epoch's start, less what the visualizations drew before it), divided among the visualization
callbacks of the trainer. One that went over draws from then on every k epochs, the smallest k that
brings its cost per epoch within its part, and says so once. A callback whose drawing took under
`MIN_SECONDS` is never spaced out (on tiny epochs any drawing is a large share, and a second a
draw is not what slows a run). What the user set explicitly (`every_n_epochs=`) is never changed:
it is only warned about. `budget=None` (`callbacks.budget=null`) turns it off.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

#: the default share of an epoch's time all visualizations together may take
DEFAULT_BUDGET = 0.05
#: a drawing shorter than this is never spaced out
MIN_SECONDS = 2.0
#: CONVLENS_BUDGET=off turns the budget off whatever the callbacks were given (the test suite does)
BUDGET_ENV = "CONVLENS_BUDGET"

_CLOCKS: "weakref.WeakKeyDictionary[Any, EpochClock]" = weakref.WeakKeyDictionary()


@dataclass
class EpochClock:
    """One per trainer: when the current epoch started, and what visualizations spent in it."""

    epoch: int = -1
    start: float = 0.0
    spent: float = 0.0


def epoch_started(trainer) -> None:
    """Called by every visualization at the start of each training epoch; the first starts the clock."""
    try:
        clock = _CLOCKS.setdefault(trainer, EpochClock())
    except TypeError:  # a stand-in trainer
        return
    if clock.epoch != trainer.current_epoch:
        clock.epoch, clock.start, clock.spent = trainer.current_epoch, time.perf_counter(), 0.0


def epoch_seconds(trainer, now: float) -> float | None:
    """The current epoch's own seconds up to `now` (visualizations excluded), or None if unknown."""
    clock = _CLOCKS.get(trainer) if _is_weakrefable(trainer) else None
    if clock is None or clock.epoch != trainer.current_epoch:
        return None
    return max(now - clock.start - clock.spent, 0.0)


def spent(trainer, seconds: float) -> None:
    clock = _CLOCKS.get(trainer) if _is_weakrefable(trainer) else None
    if clock is not None and clock.epoch == trainer.current_epoch:
        clock.spent += seconds


def check_budget(budget: Any) -> float | None:
    from convlens.errors import ConfigError

    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ConfigError(f"budget must be a share of the epoch's time in (0, 1], e.g. 0.05, or null (no budget), "
                          f"got {budget!r}")
    return float(budget)


def spacing(seconds: float, epoch_time: float, budget: float | None, callbacks: int) -> int:
    """Every how many epochs a drawing of `seconds` keeps within its part of `budget` of an epoch
    of `epoch_time` seconds shared by `callbacks` visualizations (1: every epoch)."""
    if budget is None or os.environ.get(BUDGET_ENV, "") == "off" or seconds < MIN_SECONDS or epoch_time <= 0:
        return 1
    part = budget * epoch_time / max(callbacks, 1)
    return max(1, math.ceil(seconds / part))


def _is_weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False
