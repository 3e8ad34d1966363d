"""What happens when a shared ledger cannot be reached: `fail_closed` refuses, `fail_open` counts locally.

`on_unavailable="fail_closed"` (default) refuses the provider call with an error naming the ledger;
`"fail_open"` keeps accounting locally with a loud warning (the local ledger enforces what was left when
the shared one was last read) and replays that spend into the shared ledger once it answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from otel_dspy_cost.errors import LedgerUnavailable
from otel_dspy_cost.ledgers.in_process import InProcessLedger
from otel_dspy_cost.ledgers.protocol import AccountState, Limits, Refusal, Reservation

logger = logging.getLogger("otel_dspy_cost")

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
        self.inner, self.policy, self.url, self.clock = inner, policy, inner.url, inner.clock
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
            from otel_dspy_cost import _runtime

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

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str,
                calls: int = 1) -> Reservation | Refusal:
        try:
            if self._pending:
                self._replay()
            out = self.inner.reserve(accounts, amount_usd, phase, calls)
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
            res = self.local.reserve(accounts, amount_usd, phase, calls)
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
