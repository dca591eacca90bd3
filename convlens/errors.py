"""The one error base of convlens.

Every error whose message already says what was wrong and what to do derives from
`ConvlensError`; the entry points (`convlens-train`, `convlens-visualize`, `convlens-sweep-summary`)
print such an error as one line, without a traceback. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

from typing import Callable


class ConvlensError(Exception):
    """An error the user can fix; its message names the problem and the remedy."""


class ConfigError(ConvlensError, ValueError):
    """A configuration value that cannot be used (a callback option, a model argument)."""


def one_line(error: BaseException) -> str:
    """`<ErrorType>: <message>` on one line, for the terminal and for status files."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def in_chain(error: BaseException | None, matches: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in `error`'s chain (itself, then what it was raised from or while
    handling) for which `matches` is true, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if matches(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def user_error(error: BaseException) -> ConvlensError | None:
    """The ConvlensError behind `error` (itself, or the cause it wraps, e.g. inside Hydra's
    InstantiationException when a constructor refused its config), or None for anything else."""
    return in_chain(error, lambda e: isinstance(e, ConvlensError))
