"""The in-process ledger (one lock over every account) and the in-flight call counter budgets wait on."""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

from otel_dspy_cost.ledgers.protocol import AccountState, Limits, Refusal, Reservation, check_limits


class InFlight:
    """A count of calls admitted and not yet settled, that one can wait on reaching zero.

    One implementation for the three places that need it: the accounting station (record_run waits for
    calls still running), each budget (a stop drains its own calls) and the foreign-span gate.

    Hand-written on a deque rather than a lock and a Condition: `add`/`done` run twice per LM call each, and a
    deque's append and pop are atomic in C (thread-safe by the deque's own contract), so counting a call in
    costs no lock and no Python frame (`add` is a C partial of the deque's append; measured ~10x cheaper than
    the locked pair). Waiting is rare (a stop drains, a run ends), so `wait` polls instead of being notified.
    """

    _POLL_S = 0.002

    def __init__(self) -> None:
        self._calls: collections.deque[None] = collections.deque()
        self.add: Callable[[], None] = functools.partial(self._calls.append, None)
        _every_in_flight.add(self)

    def reset(self) -> None:
        """Forget every call: a forked child runs none of the calls its parent's other threads had in flight."""
        self._calls.clear()

    @property
    def count(self) -> int:
        return len(self._calls)

    def done(self) -> None:
        try:
            self._calls.pop()
        except IndexError:  # more done() than add(): never below zero
            pass

    def wait(self, timeout_s: float) -> bool:
        """True once nothing is in flight; False if something still was at the timeout."""
        deadline = time.monotonic() + timeout_s
        while self._calls:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self._POLL_S, left))
        return True


_NOTHING = 1e-9  # USD: what shared ledgers count in (integer nano-dollars); less is float residue

_every_in_flight: weakref.WeakSet[InFlight] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for counter in list(_every_in_flight):
        counter.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class InProcessLedger:
    """One lock over every account: a reservation against nested budgets is all-or-nothing."""

    shared = False
    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, AccountState] = {}
        self._limits: dict[str, Limits] = {}
        # Admission waiting for calls in flight is woken by each settle or release (see `wait_for_change`).
        self._changed = threading.Condition(self._lock)
        self._waiters = 0
        self.version = 0  # bumped whenever a reservation goes away (read without the lock: an int is atomic)

    def open(self, account: str, limits: Limits) -> None:
        with self._lock:
            self._accounts.setdefault(account, AccountState())
            self._limits[account] = limits

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str,
                calls: int = 1) -> Reservation | Refusal:
        with self._lock:
            for name in accounts:
                st, lim = self._accounts[name], self._limits[name]
                refusal = check_limits(name, lim, amount_usd, phase, st, calls)
                if refusal is not None:
                    # The stop is sticky from this instant, under the lock: a smaller call in another thread
                    # cannot slip in between the refusal and the budget tripping the account afterwards.
                    # A call that only has to wait for calls in flight stops nothing.
                    if st.tripped is None and not refusal.wait:
                        st.tripped = refusal.reason
                        if self._waiters:  # calls waiting for room are refused at once, not at their next look
                            self.version += 1
                            self._changed.notify_all()
                    return refusal
            for name in accounts:
                st = self._accounts[name]
                st.reserved_usd += amount_usd
                st.reserved_calls += calls
                st.phase_reserved[phase] = st.phase_reserved.get(phase, 0.0) + amount_usd
            return Reservation(tuple(accounts), amount_usd, phase, calls=calls)

    def _unreserve(self, reservation: Reservation) -> bool:
        """Drops a reservation's hold (caller holds the lock); False if it was already given back."""
        if reservation.settled:
            return False
        reservation.settled = True
        self.version += 1
        if self._waiters:
            self._changed.notify_all()
        ph = reservation.phase
        for name in reservation.accounts:
            st = self._accounts[name]
            # Float sums leave a residue (5e-20) when every reservation is gone: below a nano-dollar is nothing
            # held, or a call would wait for calls in flight that do not exist.
            left = st.reserved_usd - reservation.amount_usd
            st.reserved_usd = left if left > _NOTHING else 0.0
            st.reserved_calls = max(0, st.reserved_calls - reservation.calls)
            left = st.phase_reserved.get(ph, 0.0) - reservation.amount_usd
            st.phase_reserved[ph] = left if left > _NOTHING else 0.0
        return True

    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        with self._lock:
            if not self._unreserve(reservation):
                return
            for name in reservation.accounts:
                st = self._accounts[name]
                st.spent_usd += actual_usd
                st.economic_usd += economic_usd
                st.calls += reservation.calls
                st.phase_spent[reservation.phase] = st.phase_spent.get(reservation.phase, 0.0) + actual_usd

    def release(self, reservation: Reservation) -> None:
        """Gives a reservation back without counting a call (the call was never made)."""
        with self._lock:
            self._unreserve(reservation)

    def trip(self, account: str, reason: str) -> None:
        with self._lock:
            st = self._accounts[account]
            if st.tripped is None:
                st.tripped = reason
            if self._waiters:  # waiting admissions see the stop at once
                self.version += 1
                self._changed.notify_all()

    def wait_for_change(self, version: int, timeout_s: float) -> None:
        """Block until a reservation goes away after `version` was read (or the account trips), or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._waiters += 1
            try:
                while self.version == version:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._changed.wait(left)
            finally:
                self._waiters -= 1

    def spent_usd(self, account: str) -> float:
        """An account's spend, read without the lock or a copy (one float read is atomic): a budget's warn check
        reads it once per LM call until it has fired, and `state` copies the whole account."""
        return self._accounts[account].spent_usd

    def state(self, account: str) -> AccountState:
        with self._lock:
            st = self._accounts[account]
            # A copy built field by field: dataclasses.replace() introspects the class on every call,
            # and this runs once per LM call (the budget's warn check).
            return AccountState(st.spent_usd, st.economic_usd, st.reserved_usd, st.calls, st.reserved_calls,
                                dict(st.phase_spent), dict(st.phase_reserved), st.tripped)
