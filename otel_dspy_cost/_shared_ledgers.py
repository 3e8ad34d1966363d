"""Ledgers shared across processes and machines (SQLite, Redis), rolling windows, failure policy.

Chosen by URL: `budget(limit_usd=50, window="1d", ledger="sqlite:///path/budgets.db")` or
`ledger="redis://host:6379/0"`; `OTEL_DSPY_COST_LEDGER` sets a process-wide default. On a shared
ledger an account is the budget's *label* (namespaced), so every process using that label spends
from one number. Amounts are stored in integer nano-dollars: sums are exact, no float drift.

Every reservation carries an expiry (`reservation_timeout_s`, default 600 s): a process that crashes
while holding one leaks it only until then. A settle counts its call by consuming the reservation (an
expired one is kept 7 days for a late settle), so each call is counted exactly once. Spend is kept in
time buckets with a running total (`_windows`), so a reservation costs the same with 10 or 10 million
calls in the window.

When the shared ledger cannot be reached: `on_unavailable="fail_closed"` (default) refuses the provider
call with an error naming the ledger; `"fail_open"` keeps accounting locally with a loud warning (the
local ledger enforces what was left when the shared one was last read) and replays that spend into the
shared ledger once it answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ._ledger import AccountState, InProcessLedger, LedgerUnavailable, Limits, Refusal, Reservation
from ._redis_ledger import RedisLedger
from ._sqlite_ledger import SqliteLedger
from ._windows import Window, parse_window

__all__ = ["LEDGER_ENV", "GuardedLedger", "LedgerUnavailable", "RedisLedger", "SqliteLedger", "Window",
           "ledger_from_url", "parse_window", "shared_ledger"]

logger = logging.getLogger("otel_dspy_cost.budget")
LEDGER_ENV = "OTEL_DSPY_COST_LEDGER"


# -- failure policy ------------------------------------------------------------------------------------------

class GuardedLedger:
    """Applies the unavailable-ledger policy around a shared ledger.

    fail_closed: a reservation the ledger cannot make is refused (`ledger_unavailable`), naming the ledger.
    fail_open: calls are accounted in a local ledger meanwhile (warned once per outage) and replayed
    into the shared ledger, each exactly once, as soon as it answers again.
    """

    shared = True

    def __init__(self, inner: Any, policy: str = "fail_closed"):
        if policy not in ("fail_closed", "fail_open"):
            raise ValueError("on_unavailable must be 'fail_closed' or 'fail_open'")
        self.inner, self.policy, self.url = inner, policy, inner.url
        self.local = InProcessLedger()
        # (call id, accounts, phase, actual, economic, time, reserved): reserved = a settle that may have landed
        self._pending: list[tuple[str, tuple[str, ...], str, float, float, float, bool]] = []
        self._lock = threading.Lock()
        self._down = False
        self._limits: dict[str, Limits] = {}
        self._last_seen: dict[str, AccountState] = {}  # the shared totals last read, per account

    def key(self, label: str) -> str:
        return self.inner.key(label)

    def open(self, account: str, limits: Limits) -> None:
        self.inner.open(account, limits)
        self.local.open(account, limits)
        self._limits[account] = limits

    def _outage(self, exc: Exception) -> None:
        if not self._down:
            self._down = True
            # Failing open, a fresh local ledger enforces what was left when the shared one was last read,
            # so a process does not start from a full budget. (Other processes' spend meanwhile is unknown.)
            self.local = InProcessLedger()
            for account, lim in self._limits.items():
                seen = self._last_seen.get(account)
                if seen is None:
                    self.local.open(account, lim)
                    continue
                left = None if lim.limit_usd is None else max(0.0, lim.limit_usd - seen.spent_usd)
                calls = None if lim.max_calls is None else max(0, lim.max_calls - seen.calls)
                phases = {k: max(0.0, v - seen.phase_spent.get(k, 0.0)) for k, v in lim.phase_limits.items()}
                self.local.open(account, dataclasses.replace(lim, limit_usd=left, max_calls=calls,
                                                             phase_limits=phases))
            logger.error("otel-dspy-cost: shared budget ledger %s is unreachable (%s); policy %s%s", self.url, exc,
                         self.policy, ": counting locally against what was left at the last ledger read"
                         if self.policy == "fail_open" else ": refusing calls")
            from . import _runtime

            _runtime.ledger_outage(self.url, self.policy, str(exc))

    def _replay(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for i, (*item, reserved) in enumerate(pending):
            try:
                self.inner.record(*item, reserved=reserved)
            except LedgerUnavailable:
                with self._lock:
                    self._pending[:0] = pending[i:]
                raise
        if self._down:
            self._down = False
            logger.warning("otel-dspy-cost: shared budget ledger %s is back; %d calls counted locally were replayed",
                           self.url, len(pending))

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str) -> Reservation | Refusal:
        try:
            if self._pending:
                self._replay()
            out = self.inner.reserve(accounts, amount_usd, phase)
            if self._down:
                self._down = False
                logger.warning("otel-dspy-cost: shared budget ledger %s is back", self.url)
            for account, (committed, calls) in (getattr(out, "seen", None) or {}).items():
                # What this reservation read, plus everything held (ours included): the most that can be spent
                # as of now. An outage then starts from it, not from a stale read (or a full budget).
                prev = self._last_seen.get(account)
                phases = dict(prev.phase_spent) if prev is not None else {}
                phases[phase] = phases.get(phase, 0.0) + amount_usd
                self._last_seen[account] = AccountState(committed, 0.0, 0.0, calls, phase_spent=phases)
            return out
        except LedgerUnavailable as exc:
            self._outage(exc)
            if self.policy == "fail_closed":
                return Refusal(accounts[0], "ledger_unavailable", 0.0, 0.0, 0.0, detail=str(exc))
            res = self.local.reserve(accounts, amount_usd, phase)
            if isinstance(res, Reservation):
                res.local = True
            return res

    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        if getattr(reservation, "local", False):
            self.local.settle(reservation, actual_usd, economic_usd)
            with self._lock:
                self._pending.append((uuid.uuid4().hex, reservation.accounts, reservation.phase, actual_usd,
                                      economic_usd, self.inner.clock(), False))
            return
        try:
            self.inner.settle(reservation, actual_usd, economic_usd)
        except LedgerUnavailable as exc:
            # The money is spent: keep the call and write it when the ledger is back (same id: counted once).
            self._outage(exc)
            with self._lock:
                self._pending.append((reservation.reservation_id, reservation.accounts, reservation.phase,
                                      actual_usd, economic_usd, self.inner.clock(), True))

    def release(self, reservation: Reservation) -> None:
        if getattr(reservation, "local", False):
            self.local.release(reservation)
            return
        try:
            self.inner.release(reservation)
        except LedgerUnavailable as exc:
            self._outage(exc)  # the reservation expires on its own

    def trip(self, account: str, reason: str) -> None:
        self.inner.trip(account, reason)
        self.local.trip(account, reason)

    def state(self, account: str) -> AccountState:
        try:
            if self._pending:
                self._replay()
            shared = self.inner.state(account)
        except LedgerUnavailable:
            local = self.local.state(account)  # best knowledge while the shared ledger is away
            seen = self._last_seen.get(account)
            if seen is not None:
                local.spent_usd += seen.spent_usd
                local.economic_usd += seen.economic_usd
                local.calls += seen.calls
            return local
        seen = self._last_seen.get(account)
        if seen is None or shared.spent_usd + shared.reserved_usd >= seen.spent_usd:
            self._last_seen[account] = AccountState(shared.spent_usd + shared.reserved_usd, shared.economic_usd, 0.0,
                                                    shared.calls + shared.reserved_calls,
                                                    phase_spent=dict(shared.phase_spent))
        with self._lock:
            pending = [p for p in self._pending if account in p[1]]
        if pending:
            shared.spent_usd += sum(p[3] for p in pending)
            shared.economic_usd += sum(p[4] for p in pending)
            shared.calls += len(pending)
        return shared

    def reset(self, account: str) -> None:
        self.inner.reset(account)

    def flush(self) -> None:
        """Write spend counted during an outage now (raises LedgerUnavailable if still down)."""
        self._replay()


def ledger_from_url(url: str, *, on_unavailable: str = "fail_closed", reservation_timeout_s: float = 600.0,
                    namespace: str | None = None, clock: Callable[[], float] = time.time,
                    busy_timeout_s: float = 30.0) -> GuardedLedger:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, `sqlite://:memory:`, `redis://host:port/db`."""
    if url.startswith("sqlite://"):
        # SQLAlchemy's convention: sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite://:memory:
        path = url[len("sqlite://"):]
        path = path[1:] if path.startswith("/") else path
        inner: Any = SqliteLedger(path or ":memory:", namespace=namespace or "",
                                  reservation_timeout_s=reservation_timeout_s, clock=clock,
                                  busy_timeout_s=busy_timeout_s)
    elif url.startswith(("redis://", "rediss://", "unix://")):
        inner = RedisLedger(url, namespace=namespace if namespace is not None else "otel-dspy-cost:",
                            reservation_timeout_s=reservation_timeout_s, clock=clock)
    else:
        raise ValueError(f"unknown ledger URL {url!r}: use sqlite:///path/budgets.db or redis://host:6379/0")
    return GuardedLedger(inner, on_unavailable)


_by_url: dict[tuple[str, str], GuardedLedger] = {}
_by_url_lock = threading.Lock()


def shared_ledger(url: str, on_unavailable: str = "fail_closed") -> GuardedLedger:
    """One ledger object per URL and policy in this process (connections are reused)."""
    with _by_url_lock:
        key = (url, on_unavailable)
        if key not in _by_url:
            _by_url[key] = ledger_from_url(url, on_unavailable=on_unavailable)
        return _by_url[key]
