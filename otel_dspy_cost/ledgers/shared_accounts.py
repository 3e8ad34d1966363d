"""What every shared ledger keeps in this process: each account's limits and its sticky stop.

Limits come from this process's `budget()` call; a stop ends this process's run, not the fleet's, so it
is not written to the shared store.
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
        self._tripped: dict[str, str] = {}

    def open(self, account: str, limits: Limits) -> None:
        self._limits[account] = limits

    def trip(self, account: str, reason: str) -> None:
        self._tripped.setdefault(account, reason)

    def _window_of(self, account: str) -> Window | None:
        limits = self._limits.get(account)
        return limits.window if limits is not None else None

    def _mismatch(self, account: str, stored: str) -> Refusal:
        """One label is one budget with one window: a process asking for another window is refused, rather
        than evicting spend the others still count (or counting spend their window already let go)."""
        return Refusal(account, "window_mismatch", 0.0, 0.0, 0.0,
                       detail=f"the ledger keeps this budget with window {stored!r}; this process asks for "
                              f"{window_spec(self._window_of(account))!r}")
