"""What every ledger implements (`Ledger`), the records it trades in, and the one statement of the limits.

Reserving the worst case before a provider call and settling to the actual cost afterwards is what
makes "no overshoot" hold under concurrency: a check-then-increment without the reservation races
(LiteLLM's budgets leak that way). The in-process ledger does it under one lock; a shared ledger
(SQLite, Redis) implements the same protocol without touching the accounting station.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass
class AccountState:
    """What one budget has spent and holds in reservation. Amounts in USD."""

    spent_usd: float = 0.0
    economic_usd: float = 0.0
    reserved_usd: float = 0.0
    calls: int = 0
    reserved_calls: int = 0
    phase_spent: dict[str, float] = dataclasses.field(default_factory=dict)
    phase_reserved: dict[str, float] = dataclasses.field(default_factory=dict)
    tripped: str | None = None  # reason of a sticky stop


@dataclasses.dataclass(frozen=True)
class Limits:
    limit_usd: float | None
    max_calls: int | None
    phase_limits: dict[str, float]
    enforce: bool  # False for action="warn": track, never refuse
    window: Any = None  # ledgers.windows.Window: spend older than the window stops counting


@dataclasses.dataclass(frozen=True)
class Refusal:
    account: str
    reason: str  # limit_usd | max_calls | max_<phase>_usd | tripped | ledger_unavailable | window_mismatch
    spent_usd: float
    reserved_usd: float
    limit: float
    detail: str = ""
    # True while other calls of the account are in flight: the caller waits for them to settle and asks again
    # instead of stopping; the ledger does not trip the account for it (see `check_limits`).
    wait: bool = False


@dataclasses.dataclass
class Reservation:
    accounts: tuple[str, ...]
    amount_usd: float
    phase: str
    settled: bool = False
    reservation_id: str = ""  # shared ledgers: the call's id, so settling is idempotent
    local: bool = False  # counted in a fail-open local ledger while the shared one was down
    # shared ledgers: per account, (spend + reservations + this one, calls likewise) as read while reserving
    seen: dict[str, tuple[float, int]] | None = None
    calls: int = 1  # 0: room for a retry of a call already reserved (see `check_limits`)


NANO = 1_000_000_000


def to_nano(usd: float) -> int:
    """Shared ledgers store integer nano-dollars: sums are exact, with no float drift across a fleet."""
    return int(round(usd * NANO))


def check_limits(name: str, lim: Limits, amount_usd: float, phase: str, st: AccountState,
                 calls: int = 1) -> Refusal | None:
    """The one statement of what a reservation may not exceed, for the Python ledgers (Redis states the
    same rules in its Lua script, where they run atomically on the server). `st` holds the account's
    spend, reservations and calls as of now, this call excluded. `calls` is 0 for room held for a retry of a
    call already counted (money, not another call).

    A refusal with `wait` set is not a stop: other calls of the account are in flight. They usually settle for
    less than their worst case, and the caller waits for them and asks again; a call that does not fit beside
    the spend alone keeps waiting while others run (smaller calls may still fit), and is refused, stopping the
    account, only when it does not fit with nothing else in flight."""
    if not lim.enforce:
        return None
    if st.tripped:
        return Refusal(name, "tripped", st.spent_usd, st.reserved_usd, lim.limit_usd or 0.0)
    if calls and lim.max_calls is not None and st.calls + st.reserved_calls + calls > lim.max_calls:
        return Refusal(name, "max_calls", st.calls, st.reserved_calls, lim.max_calls, wait=st.reserved_calls > 0)
    if lim.limit_usd is not None and st.spent_usd + st.reserved_usd + amount_usd > lim.limit_usd:
        return Refusal(name, "limit_usd", st.spent_usd, st.reserved_usd, lim.limit_usd, wait=st.reserved_usd > 0)
    cap = lim.phase_limits.get(phase)
    if cap is not None and st.phase_spent.get(phase, 0.0) + st.phase_reserved.get(phase, 0.0) + amount_usd > cap:
        return Refusal(name, f"max_{phase}_usd", st.phase_spent.get(phase, 0.0), st.phase_reserved.get(phase, 0.0),
                       cap, wait=st.phase_reserved.get(phase, 0.0) > 0)
    return None


@runtime_checkable
class Ledger(Protocol):
    """What a `Budget` and the accounting station need of any ledger."""

    shared: bool  # True: accounts are keyed by budget label, one number for every process using the ledger
    url: str  # where it counts ("memory://", "sqlite:///...", "redis://..."), for messages and `budget status`

    def open(self, account: str, limits: Limits) -> None: ...

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str,
                calls: int = 1) -> Reservation | Refusal: ...

    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def trip(self, account: str, reason: str) -> None: ...

    def state(self, account: str) -> AccountState: ...


@runtime_checkable
class SharedLedger(Ledger, Protocol):
    """A ledger a fleet shares (`shared` is True): SQLite, Redis, and the failure policy around either."""

    def key(self, label: str) -> str:
        """The account of a budget label: namespaced, so one label is one number for every process."""
        ...

    def clock(self) -> float:
        """Seconds since the epoch as the ledger counts them (windows, reservation expiry); injectable in tests."""
        ...

    def reset(self, account: str) -> None:
        """Remove an account's spend and reservations (`otel-dspy-cost budget reset`)."""
        ...
