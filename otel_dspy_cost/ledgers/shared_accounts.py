"""What every shared ledger keeps in this process: each account's limits and its sticky stop.

Limits come from this process's `budget()` call. A stop is the fleet's: the ledger stores it with the
account, so every process sharing the label is refused from then on, until `budget reset` for a budget
without a window, and for a windowed one until the spend that stopped it has left the window (one window
length after the stop for a rolling window, the window's end for a calendar one). This process also keeps
the stop in memory, so a refused budget stays refused without asking the store.
"""

from __future__ import annotations

from collections.abc import Callable

from otel_dspy_cost.ledgers.protocol import Limits, Refusal
from otel_dspy_cost.ledgers.windows import Window, window_spec


def stored_window(spec: str) -> Window | None:
    """The inverse of `window_spec`: what a shared ledger stored with an account."""
    if spec == "none":
        return None
    kind, _, rest = spec.partition(":")
    return Window(seconds=int(rest)) if kind == "rolling" else Window(calendar=kind, tz=rest)


class SharedAccounts:
    shared = True

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._limits: dict[str, Limits] = {}
        self._tripped: dict[str, tuple[str, float | None]] = {}  # account -> (reason, until; None: for good)

    def open(self, account: str, limits: Limits) -> None:
        self._limits[account] = limits

    def trip(self, account: str, reason: str) -> None:
        """The budget's own trip after a refusal: the refusing step already stored it (see `_stop`)."""
        self._stop_here(account, reason, self.clock())

    def _trip_until(self, account: str, now: float) -> float | None:
        """Until when a stop taken now holds: for good without a window, else until the spend it saw is gone."""
        window = self._window_of(account)
        if window is None:
            return None
        if window.seconds is not None:
            return now + window.seconds
        return window.bounds(now)[1]

    def _stop_here(self, account: str, reason: str, now: float) -> float | None:
        until = self._trip_until(account, now)
        self._tripped.setdefault(account, (reason, until))
        return until

    def _tripped_now(self, account: str, now: float) -> str | None:
        """This process's memory of the account's stop, while it holds."""
        stop = self._tripped.get(account)
        if stop is None:
            return None
        if stop[1] is not None and stop[1] <= now:
            self._tripped.pop(account, None)
            return None
        return stop[0]

    def _window_of(self, account: str) -> Window | None:
        limits = self._limits.get(account)
        return limits.window if limits is not None else None

    def _mismatch(self, account: str, stored: str) -> Refusal:
        """One label is one budget with one window: a process asking for another window is refused, rather
        than evicting spend the others still count (or counting spend their window already let go)."""
        return Refusal(account, "window_mismatch", 0.0, 0.0, 0.0,
                       detail=f"the ledger keeps this budget with window {stored!r}; this process asks for "
                              f"{window_spec(self._window_of(account))!r}")
