"""Budgets: `with budget(limit_usd=...)` caps what the code inside may spend, and `scope()` sub-limits."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

from otel_dspy_cost import _context, _runtime, _validate
from otel_dspy_cost._redact import scrub
from otel_dspy_cost.errors import BudgetExceededError, LedgerUnavailableError, ScopeExhaustedError
from otel_dspy_cost.ledgers.in_process import InFlight, InProcessLedger
from otel_dspy_cost.ledgers.protocol import Ledger, Limits, Refusal
from otel_dspy_cost.ledgers.urls import LEDGER_ENV, ledger_from_url, shared_ledger
from otel_dspy_cost.ledgers.windows import parse_window
from otel_dspy_cost.pricing.cost import usd_text

logger = logging.getLogger("otel_dspy_cost")

WITHIN_BUDGET = "within_budget"
WARNED = "warned"
EXCEEDED = "exceeded"  # spend (or calls) reached the limit, or passed it under action="warn"
STOPPED = "stopped"  # a call was refused because its worst case did not fit in what was left
DEFAULT_DRAIN_TIMEOUT_S = 5.0
# How long a call whose worst case fits only once calls in flight settle waits for them (see `admit`).
DEFAULT_WAIT_TIMEOUT_S = 300.0


_ids = itertools.count(1)


def _where() -> tuple[int, int]:
    """(thread, asyncio task) running now: where a `with budget` was entered."""
    task = None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        pass
    return threading.get_ident(), id(task) if task is not None else 0
_default_ledger = InProcessLedger()


def default_ledger() -> Ledger:
    return _default_ledger


class Budget:
    """A spending cap over the code run inside `with`, including DSPy worker threads and async tasks.

    Use `budget()` to make one. Nested budgets are all enforced; each LM call reserves its worst
    case against every active budget at once and settles to the actual cost when it ends.
    """

    def __init__(self, limit_usd: float | None = None, *, warn_at: float | None = 0.8, action: str = "stop",
                 label: str | None = None, max_calls: int | None = None, max_train_usd: float | None = None,
                 max_infer_usd: float | None = None, on_warn: Callable[[Budget], Any] | None = None,
                 on_exceed: Callable[[Budget], Any] | None = None, ledger: Ledger | str | None = None,
                 window: str | None = None, tz: str = "UTC", on_unavailable: str = "fail_closed",
                 drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
                 stop_on_projection: bool = False, _scope_of: Budget | None = None):
        # Every number is checked here, before any call: a NaN or a string would otherwise switch the cap off.
        _validate.choice("action", action, ("stop", "warn"))
        _validate.choice("on_unavailable", on_unavailable, ("fail_closed", "fail_open"))
        limit_usd = _validate.number("limit_usd", limit_usd)
        max_calls = _validate.integer("max_calls", max_calls)
        max_train_usd = _validate.number("max_train_usd", max_train_usd)
        max_infer_usd = _validate.number("max_infer_usd", max_infer_usd)
        drain_timeout_s = _validate.number("drain_timeout_s", drain_timeout_s, allow_none=False)
        wait_timeout_s = _validate.number("wait_timeout_s", wait_timeout_s, allow_none=False)
        if warn_at is not None and not 0 < _validate.number("warn_at", warn_at) <= 1:
            raise ValueError(f"warn_at is a fraction of the limit, in (0, 1], not {warn_at!r}")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ValueError(f"label must be a non-empty string, not {label!r}")
        if not isinstance(stop_on_projection, bool):
            raise TypeError(f"stop_on_projection must be True or False, not {stop_on_projection!r}")
        # A compile's projected final spend (optimizers.projection), updated after each trial; with
        # stop_on_projection, a compile sure to pass the cap stops between trials instead of spending it.
        self.stop_on_projection = stop_on_projection
        self.projected_usd: float | None = None
        self.limit_usd = limit_usd
        self.warn_at = warn_at
        self.action = action
        self.label = label or f"budget-{next(_ids)}"
        self.max_calls = max_calls
        self.phase_limits = {k: v for k, v in (("train", max_train_usd), ("infer", max_infer_usd)) if v is not None}
        self.on_warn = on_warn
        self.on_exceed = on_exceed
        self.window = parse_window(window, tz)
        if isinstance(ledger, str) or (ledger is None and os.environ.get(LEDGER_ENV)):
            ledger = shared_ledger(ledger or os.environ[LEDGER_ENV], on_unavailable)
        elif ledger is None and self.window is not None:
            ledger = ledger_from_url("sqlite://:memory:")  # a window needs timestamped spend
        self.ledger: Ledger = ledger or default_ledger()
        if getattr(self.ledger, "shared", False):
            # One number for every process using this ledger and label.
            name = f"{_scope_of.label}/{self.label}" if _scope_of is not None else self.label
            self.account = self.ledger.key(name)
        else:
            self.account = f"{self.label}#{next(_ids)}"
        self.is_scope = _scope_of is not None
        self._scopes: dict[str, Budget] = {}
        self._scopes_lock = threading.Lock()
        self._warned = False
        self._exceeded = False
        # A warn (or, under action="warn", an exceed) may still fire: read by the station at every settle.
        self.events_pending = warn_at is not None or action == "warn"
        self._fire_lock = threading.Lock()
        # Entered-state tokens per thread and asyncio task: one Budget may be entered in many threads
        # at once (`with b:` in each worker), and each must restore its own context.
        self._tokens: dict[tuple[int, int], list[Any]] = {}
        self.events: list[tuple[str, float]] = []  # (kind, spent_usd) for each warn/exceed fired
        self.max_reserved_usd = 0.0  # the largest worst case reserved for one call under this budget
        self._first_stop: str | None = None  # what the first refusal said; later (sticky) refusals repeat it
        self._fork_generation = _context.fork_generation()
        self.drain_timeout_s = drain_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.in_flight = InFlight()  # calls admitted under this budget and not yet settled
        # What is left, as far as this process knows (its own settled spend; a shared ledger's fleet spends too,
        # so there it is unknown): admission asks for an exact prompt count once a call's worst case comes near
        # it (`Accountant._refined`), and a call that had to wait sets it to -inf. A hint: never a limit.
        caps = [v for v in (limit_usd, *self.phase_limits.values()) if v is not None] if action == "stop" else []
        self.room_hint = (-math.inf if self.ledger.shared else min(caps)) if caps else math.inf
        self.ledger.open(self.account, Limits(limit_usd, max_calls, self.phase_limits, enforce=action == "stop",
                                              window=self.window))

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> Budget:
        if _runtime.active() is None:  # never a silent no-op: accounting is switched on for this budget
            _runtime.start_implicit()
        state = _context.current()
        self._tokens.setdefault(_where(), []).append(_context.var().set(
            _context.RunContext(state.budgets + (self,), state.phase, state.optimizer, state.trial, state.lm_role)))
        _context.budget_entered(self)
        _runtime.watch_budget(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        key = _where()
        stack = self._tokens[key]
        _context.var().reset(stack.pop())
        if not stack:
            del self._tokens[key]
        _context.budget_left(self)
        stopped = isinstance(exc, BudgetExceededError) or (self.action == "stop" and self._exceeded)
        if stopped and self.in_flight.count:
            # Calls admitted before the stop may still be running in threads the stop did not unwind
            # (DSPy's pool keeps going): wait for them, so the spend is final when the user sees the stop.
            if not self.wait_idle(self.drain_timeout_s):
                logger.warning("budget %r: %d call(s) admitted before the stop were still running after %.1f s",
                               self.label, self.in_flight.count, self.drain_timeout_s)
        if self.is_scope and isinstance(exc, ScopeExhaustedError) and exc.label == self.label:
            logger.warning("scope %r exhausted (%s); leaving the scope, the enclosing run continues", self.label,
                           exc.reason)
            return True
        return False

    async def __aenter__(self) -> Budget:
        return self.__enter__()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        return self.__exit__(exc_type, exc, tb)

    # -- what users read ------------------------------------------------------------------------
    @property
    def spent_usd(self) -> float:
        ledger = self.ledger
        if type(ledger) is InProcessLedger:  # the usual ledger, read without a copy of its state
            return ledger.spent_usd(self.account)
        return ledger.state(self.account).spent_usd

    @property
    def economic_usd(self) -> float:
        return self.ledger.state(self.account).economic_usd

    @property
    def call_count(self) -> int:
        return self.ledger.state(self.account).calls

    @property
    def remaining_usd(self) -> float | None:
        if self.limit_usd is None:
            return None
        return max(0.0, self.limit_usd - self.spent_usd)

    @property
    def utilisation(self) -> float | None:
        if not self.limit_usd:
            return None
        return self.spent_usd / self.limit_usd

    def window_bounds(self) -> tuple[Any, Any] | None:
        """(start, end) of the current window as UTC datetimes, or None without a window."""
        if self.window is None:
            return None
        import datetime as dt
        import time

        start, end = self.window.bounds(getattr(getattr(self.ledger, "inner", self.ledger), "clock", time.time)())
        return dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(end, dt.UTC)

    @property
    def caps_usd(self) -> bool:
        """True when the budget limits dollars (a call with no known price cannot be admitted under it)."""
        return self.limit_usd is not None or bool(self.phase_limits)

    @property
    def status(self) -> str:
        """within_budget | warned | exceeded (spend or calls reached the limit) | stopped (a call was refused
        because its worst case did not fit in what was left, before spend reached the limit)."""
        state = self.ledger.state(self.account)
        if self._exceeded and self.action == "warn":
            return EXCEEDED
        if self.limit_usd is not None and state.spent_usd >= self.limit_usd and self.limit_usd > 0:
            return EXCEEDED
        if state.tripped:
            return EXCEEDED if state.tripped == "max_calls" else STOPPED
        return WARNED if self._warned else WITHIN_BUDGET

    @property
    def exhausted(self) -> bool:
        return self.status in (EXCEEDED, STOPPED)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no call admitted under this budget is still running; False if some were at the timeout."""
        return self.in_flight.wait(self.drain_timeout_s if timeout_s is None else timeout_s)

    def spent_by_phase(self) -> dict[str, float]:
        return dict(self.ledger.state(self.account).phase_spent)

    def __repr__(self) -> str:
        return (f"Budget(label={self.label!r}, spent_usd={self.spent_usd:.6f}, limit_usd={self.limit_usd}, "
                f"calls={self.call_count}, status={self.status!r})")

    def _scope(self, name: str, **kwargs: Any) -> Budget:
        with self._scopes_lock:
            existing = self._scopes.get(name)
            if existing is None:
                existing = Budget(label=name, ledger=self.ledger, _scope_of=self, **kwargs)
                self._scopes[name] = existing
            return existing

    # -- the accounting station's side of a budget (budgets/accounting.py calls these; users need not) -----
    def refusal_error(self, refusal: Refusal, *, requested_usd: float, term: str | None,
                      model: str) -> BudgetExceededError:
        """The stop to raise for a refusal of this budget's account, worded for the user; trips the budget."""
        # Not spend, so not sticky: the ledger may come back; a set-up mistake may be corrected.
        if refusal.reason == "ledger_unavailable":
            why = (f"the shared budget ledger {getattr(self.ledger, 'url', '?')} is unreachable ({refusal.detail}); "
                   f"failing closed, so no call is made. Use on_unavailable='fail_open' to keep running with local "
                   f"accounting.")
        elif refusal.reason == "window_mismatch":
            why = (f"{refusal.detail}. One label is one budget with one window on a shared ledger: use another "
                   f"label, or start this one again with `otel-dspy-cost budget reset "
                   f"{getattr(self.ledger, 'url', 'URL')} {self.label}`.")
        else:
            why = ""
        if why:
            cls_ = LedgerUnavailableError if refusal.reason == "ledger_unavailable" else BudgetExceededError
            return cls_(scrub(f"Budget {self.label!r} refused a call to {model}: {why}"), label=self.label,
                        spent_usd=0.0, limit=self.limit_usd or 0.0, reason=refusal.reason,
                        requested_usd=requested_usd, term=term)
        first_reason = self.ledger.state(self.account).tripped
        self.ledger.trip(self.account, refusal.reason)
        # A refusal is final only when the call does not fit beside what is spent (calls in flight settle
        # first), or when it waited `wait_timeout_s` for calls in flight that never made room.
        waited = refusal.detail == "waited"
        left = max(0.0, refusal.limit - refusal.spent_usd - (refusal.reserved_usd if waited else 0.0))
        what = {
            "limit_usd": f"its worst case ${requested_usd:.6f} does not fit in the ${left:.6f} left of the "
                         f"${refusal.limit:.6f} limit (${refusal.spent_usd:.6f} spent; ${refusal.reserved_usd:.6f} "
                         f"reserved by calls in flight)",
            "max_calls": f"{int(refusal.spent_usd)} calls made + {int(refusal.reserved_usd)} in flight reach "
                         f"max_calls={int(refusal.limit)}",
            "tripped": f"the budget already stopped this run; no further provider calls are made. First stop: "
                       f"{(self._first_stop or first_reason or '').rstrip('.')}",
        }.get(refusal.reason, f"${refusal.spent_usd:.6f} spent in this phase + ${requested_usd:.6f} would pass "
                              f"{refusal.reason}=${refusal.limit:.6f}")
        if waited:
            what += (f", after waiting {self.wait_timeout_s:g} s (wait_timeout_s) for the calls in flight to make "
                     f"room")
        hints = {
            "max_tokens_unset": " The reservation assumed the model's maximum output tokens because max_tokens is "
                                "not set; set max_tokens on the LM to reserve less per call.",
            "output": " Most of the reservation is max_tokens at the output rate; a lower max_tokens reserves less.",
            "input": " Most of the reservation is the prompt's worst-case token count.",
        }
        # A sticky stop refuses whatever is asked: what the call would have reserved explains nothing.
        hint = "" if refusal.reason == "tripped" else hints.get(term or "", "")
        cls = ScopeExhaustedError if self.is_scope else BudgetExceededError
        if refusal.reason != "tripped" and self._first_stop is None:
            self._first_stop = f"{what}.{hint}"
        err = cls(f"Budget {self.label!r} stopped a call to {model}: {what}.{hint}", label=self.label,
                  spent_usd=self.spent_usd, limit=refusal.limit, reason=refusal.reason,
                  requested_usd=requested_usd, term=term)
        self._fire("exceeded")
        return err

    def after_settle(self) -> list[str]:
        """Fire warn/exceed once per crossing; returns the kinds fired for span events and metrics. The
        station calls it only while `events_pending`: after that, settling costs a budget no call."""
        fired = []
        if not self.events_pending:
            return fired  # nothing left to fire: skip reading the ledger on every call
        if self.limit_usd:
            spent = self.spent_usd
            if self.warn_at is not None and not self._warned and spent >= self.warn_at * self.limit_usd:
                fired.append("warn")
            if self.action == "warn" and not self._exceeded and spent > self.limit_usd:
                fired.append("exceeded")
        for kind in fired:
            self._fire(kind)
        return fired

    def _fire(self, kind: str) -> None:
        with self._fire_lock:
            if kind == "warn":
                if self._warned:
                    return
                self._warned = True
            elif kind == "exceeded":
                if self._exceeded:
                    return
                self._exceeded = True
            self.events_pending = ((self.warn_at is not None and not self._warned)
                                   or (self.action == "warn" and not self._exceeded))
            spent = self.spent_usd
            self.events.append((kind, spent))
        if kind == "warn":
            what = "passed its warn threshold"
        elif self.limit_usd is not None and spent < self.limit_usd and self.action == "stop":
            what = "stopped a call whose worst case did not fit in what was left"
        else:
            what = "exceeded"
        logger.warning("budget %r %s: $%s spent of $%s limit", self.label, what, usd_text(spent),
                       usd_text(self.limit_usd) if self.limit_usd is not None else "no")
        callback = self.on_warn if kind == "warn" else self.on_exceed
        if callback is not None:
            try:
                callback(self)
            except Exception:  # a user's callback must not break the run
                logger.exception("budget %r: %s callback failed", self.label, kind)
        from otel_dspy_cost import _runtime

        _runtime.budget_event(self, kind)


def budget(limit_usd: float | None = None, *, warn_at: float | None = 0.8, action: str = "stop",
           label: str | None = None, max_calls: int | None = None, max_train_usd: float | None = None,
           max_infer_usd: float | None = None, on_warn: Callable[[Budget], Any] | None = None,
           on_exceed: Callable[[Budget], Any] | None = None, ledger: Ledger | str | None = None,
           window: str | None = None, tz: str = "UTC", on_unavailable: str = "fail_closed",
           drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
           stop_on_projection: bool = False) -> Budget:
    """A budget to use as `with budget(limit_usd=25.0, label="compile-v1") as b: ...`.

    `action="stop"` refuses the first provider call whose worst case no longer fits and raises
    `BudgetExceededError`; `action="warn"` never refuses, it only warns. `max_calls` caps calls
    (the useful cap for free local models); `max_train_usd`/`max_infer_usd` cap one phase.

    `ledger="sqlite:///path/budgets.db"` or `"redis://host:6379/0"` (or `OTEL_DSPY_COST_LEDGER`) shares
    the budget, by label, with every process using that ledger; `window="1h" | "1d" | "30d"` (rolling) or
    `"day" | "month"` (calendar, in `tz`) counts only recent spend. `on_unavailable` says what happens
    when a shared ledger cannot be reached: "fail_closed" (refuse calls) or "fail_open" (account locally,
    replay later).

    Under a USD limit a call to a model with no known price is refused (`UnpricedModelError`) before it is
    sent. When a stop leaves the `with` block, it first waits up to `drain_timeout_s` for calls admitted
    before the stop (e.g. in DSPy's worker threads) to finish, so the spend is final when you read it.
    Entered before `instrument()`, it switches cost accounting on by itself (with a warning).

    A compile running under it projects its final spend after each trial (`b.projected_usd`); with
    `stop_on_projection=True` a compile that would pass the cap even at its cheapest trial so far stops between
    trials (`ProjectedOverrunError`, a budget stop: `guarded_compile()` returns the best program so far).
    """
    return Budget(limit_usd, warn_at=warn_at, action=action, label=label, max_calls=max_calls,
                  max_train_usd=max_train_usd, max_infer_usd=max_infer_usd, on_warn=on_warn, on_exceed=on_exceed,
                  ledger=ledger, window=window, tz=tz, on_unavailable=on_unavailable,
                  drain_timeout_s=drain_timeout_s, wait_timeout_s=wait_timeout_s,
                  stop_on_projection=stop_on_projection)


def scope(name: str, *, limit_usd: float | None = None, max_calls: int | None = None,
          warn_at: float | None = 0.8) -> Budget:
    """A named sub-limit inside the enclosing budget: spend counts toward both.

    Entering the same name again (say, once per request) continues the same account. When it runs
    out, only the scope's block stops: the `with scope(...)` statement swallows its own
    `ScopeExhaustedError` and the code after it runs on; check `.exhausted` to branch.
    """
    parents = [b for b in _context.current().budgets if not b.is_scope]
    if parents:
        return parents[-1]._scope(name, limit_usd=limit_usd, max_calls=max_calls, warn_at=warn_at)
    return _orphan_scope(name, limit_usd=limit_usd, max_calls=max_calls, warn_at=warn_at)


_orphans: dict[str, Budget] = {}
_orphans_lock = threading.Lock()


def _orphan_scope(name: str, **kwargs: Any) -> Budget:
    with _orphans_lock:
        if name not in _orphans:
            _orphans[name] = Budget(label=name, _scope_of=_ORPHAN_PARENT, **kwargs)
        return _orphans[name]


class _OrphanParent:
    label = "(none)"


_ORPHAN_PARENT: Any = _OrphanParent()
