"""The time budget of the visualizations: together they take at most a share of the epoch.

Each due epoch, a callback compares the seconds its drawing took with its part of the budget:
`budget` (a share, default 5%) of the epoch's own time (training and validation, measured from the
epoch's start, less what the visualizations drew before it), divided among the visualization
callbacks of the trainer. One that went over draws from then on every k epochs, the smallest k that
brings its cost per epoch within its part, and says so once, however short the drawing (on a
3-second epoch, a 0.3-second drawing is a 10% share). What the user set explicitly (`every_n_epochs=`) is never changed:
it is only warned about. `budget=None` (`callbacks.budget=null`) turns it off.

The first drawing: its cost is not known before it runs, so it gets a deadline instead, its part of
the budget of the epoch it draws at. A callback draws in pieces (layers, probe images, rows of
occluded copies) in order, through `pieces_within` or a `PieceTimer`: before each piece it checks whether the deadline
would pass (now plus the last piece's seconds), and stops there, after at least one piece of the
drawing. The spacing of later drawings comes from the estimated whole cost (the seconds taken, per
piece drawn, times all pieces). Until a whole drawing has been timed, each drawing keeps a deadline:
the budget of the epochs since the last one, or twice the estimate if that is more, so later pieces
that cost more than the first ones said are stopped too (and the estimate and spacing grow).
Pieces the user chose (named layers, units, probe images) are never left out: the deadline is only
reported. Pieces are whole: stopping between two leaves no hook or mode behind.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

#: the default share of an epoch's time all visualizations together may take
DEFAULT_BUDGET = 0.05
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
    if budget is None or os.environ.get(BUDGET_ENV, "") == "off" or epoch_time <= 0:
        return 1
    part = budget * epoch_time / max(callbacks, 1)
    return max(1, math.ceil(seconds / part))


def first_part(epoch_time: float | None, budget: float | None, callbacks: int) -> float | None:
    """The seconds a first drawing may take (its part of `budget` of an epoch of `epoch_time`
    seconds shared by `callbacks` visualizations), or None: no deadline."""
    if budget is None or os.environ.get(BUDGET_ENV, "") == "off" or epoch_time is None or epoch_time <= 0:
        return None
    return budget * epoch_time / max(callbacks, 1)


@dataclass
class Cut:
    """What a drawing with a deadline drew of one sequence of pieces (`what`: "layers", ...)."""

    what: str
    drawn: list = field(default_factory=list)
    left: list = field(default_factory=list)
    #: the user chose these pieces: all are drawn, the deadline is only reported
    explicit: bool = False
    #: an explicit sequence went on past the deadline
    over: bool = False
    #: what the user chose, when `explicit` (None: the pieces themselves)
    chosen: str | None = None

    @property
    def total(self) -> int:
        return len(self.drawn) + len(self.left)

    def describe(self) -> str:
        if self.explicit:
            return f"the {self.chosen or self.what} were chosen, so all {self.total} {self.what} were drawn"
        return (f"it drew {len(self.drawn)} of {self.total} {self.what} ({_names(self.drawn) or 'none'}; left out: "
                f"{_names(self.left)})")


@dataclass
class Drawing:
    """One drawing's deadline (None: none) and what its pieces did."""

    deadline: float | None = None
    #: the seconds it was given (None: no deadline)
    allowed: float | None = None
    cuts: list[Cut] = field(default_factory=list)
    pieces: int = 0
    last: float = 0.0

    def full_cost(self, seconds: float) -> float:
        """The estimated seconds of the full drawing: `seconds` per piece drawn, times all pieces."""
        left = sum(len(c.left) for c in self.cuts)
        return seconds * (self.pieces + left) / self.pieces if self.pieces else seconds

    @property
    def stopped(self) -> bool:
        return any(c.left or c.over for c in self.cuts)


class PieceTimer:
    """Pieces of one sequence timed against a drawing's deadline, for code that asks between its
    pieces (`go` before each, `done` after the last): `pieces_within` over a list, or a stop
    predicate handed to a `viz` function that works in chunks (occlusion's rows of copies)."""

    def __init__(self, drawing: Drawing, what: str, explicit: bool = False, chosen: str | None = None):
        self.drawing, self.cut = drawing, Cut(what, explicit=explicit, chosen=chosen)
        if drawing.deadline is not None:
            drawing.cuts.append(self.cut)
        self._running: tuple[str, float] | None = None  # the piece under way: its label and start

    def go(self, label: str) -> bool:
        """Before a piece: whether it may run, now plus the last piece's seconds against the
        deadline (the drawing's first piece always may; with `explicit`, every piece may, and a
        passed deadline is only recorded). Ends the timing of the piece before it."""
        now = time.perf_counter()
        self._finish(now)
        drawing = self.drawing
        if drawing.deadline is not None and drawing.pieces and now + drawing.last > drawing.deadline:
            if not self.cut.explicit:
                return False
            self.cut.over = True
        self._running = (label, now)
        return True

    def leave_out(self, labels: Iterable[str]) -> None:
        """Record the pieces not drawn (after `go` said no)."""
        self.cut.left = list(labels)

    def done(self) -> None:
        """After the last piece drawn."""
        self._finish(time.perf_counter())

    def _finish(self, now: float) -> None:
        if self._running is not None:
            label, start = self._running
            self.cut.drawn.append(label)
            self.drawing.pieces += 1
            self.drawing.last = now - start
            self._running = None


def pieces_within(drawing: Drawing, pieces: Iterable, what: str, explicit: bool = False,
                  label: Callable[[Any], str] = str) -> Iterator:
    """Yield `pieces` in order until `drawing`'s deadline would pass (`PieceTimer.go`). What was
    drawn and left out goes to `drawing.cuts`, named by `label`."""
    pieces = list(pieces)
    timer = PieceTimer(drawing, what, explicit)
    for i, piece in enumerate(pieces):
        if not timer.go(label(piece)):
            timer.leave_out(label(p) for p in pieces[i:])
            return
        yield piece
        timer.done()


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... (+{len(names) - most} more)" if len(names) > most else "")


def _is_weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False
