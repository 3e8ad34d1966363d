"""The accounting station: every LM call is priced, reserved against its budgets, and settled here.

Why a station of its own, apart from span processing: the OpenTelemetry SDK runs span processors
only for *recording* spans. A sampler that drops a trace, `OTEL_SDK_DISABLED=true`, a no-op or
foreign tracer provider, or a `ConcurrentMultiSpanProcessor` (hooks on a pool thread, without our
ContextVars) would each turn budgets off if enforcement lived in a processor. Our LM wrapper calls
`admit` before the provider call and `settle` (or `release`) after it, whatever the span does; the
spend report, metrics and the run's cost log are fed from `settle`, so they count every call,
sampled or not. `BudgetSpanProcessor` uses the same station for LM spans of other instrumentations.

One call is one `LMCall`: made by the wrapper, filled by DSPy's finalisation hooks, settled here,
then written onto the span and read by the roll-up tree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from otel_dspy_cost import _context
from otel_dspy_cost.budgets.spend import SpendAggregator
from otel_dspy_cost.errors import BudgetExceededError, ForkedBudgetError, UnpricedModelError
from otel_dspy_cost.ledgers.in_process import InFlight
from otel_dspy_cost.ledgers.protocol import Refusal
from otel_dspy_cost.pricing.cost import CallCost, Usage
from otel_dspy_cost.pricing.tokenizers import prompt_tokens_bound

if TYPE_CHECKING:
    from otel_dspy_cost.budgets.budget import Budget
    from otel_dspy_cost.pricing.engine import CostEngine

logger = logging.getLogger("otel_dspy_cost")

# Outcomes of a call, as `LMCall.outcome` and the `dspy.lm.outcome` span attribute.
OK = "ok"  # the provider answered; usage as reported (or estimated from the text when it sent none)
UNKNOWN = "unknown"  # the request may have left and no answer came back: settled at the reserved worst case
REJECTED = "rejected"  # the provider answered with a client error (4xx): nothing billed
REFUSED = "refused"  # a budget refused the call before it was sent: nothing spent
NOT_SENT = "not_sent"  # raised after admission but before DSPy handed the request to a client: nothing counted


@dataclasses.dataclass(slots=True, eq=False)
class LMCall:
    """One provider call, from our wrapper's first look at it to its settled cost."""

    model: str
    provider: str = ""
    operation: str = "chat"
    input_tokens_bound: int = 0
    max_tokens: int | None = None
    n: int = 1  # completions asked for: the whole worst case is reserved n times
    module: str = ""
    phase: str = "infer"
    optimizer: str = ""
    trial: int | None = None
    role: str | None = None
    budgets: tuple[Budget, ...] = ()
    lm: Any = None
    # Units billed apart that the request carries or asks for (audio_input, audio_output, image_output), and
    # the most web searches its tools allow: the worst case covers them (`CostEngine.worst_case`).
    apart: tuple[str, ...] = ()
    searches: int = 0
    # -- what DSPy's finalisation reported (the usage hooks fill these in) --
    captured: bool = False
    usage: Usage | None = None
    original_usage: Usage | None = None  # of a DSPy cache hit: what the first call used
    cache_hit: bool = False
    usage_counted_by_client: bool = False  # a stream without usage, which LiteLLM counted from the text
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    # Whether the request was handed to the provider's client: None when we cannot tell (a path our marker
    # does not cover), False until DSPy starts an attempt, True from then on. A call that raised while still
    # False never left the process: its reservation is given back and nothing is counted.
    sent: bool | None = None
    # -- its requests (instrumentation.attempts): DSPy's attempts, HTTP requests under LiteLLM and the SDKs, the
    # outcome of each that failed, and a retry about to be sent --
    dspy_attempts: int = 0
    http_requests: int = 0
    retry_pending: bool = False
    failed_attempts: list[str] = dataclasses.field(default_factory=list)
    # -- admission --
    # (messages, request) as sent, while a tighter prompt bound may still be asked for near a cap (see `_refined`)
    prompt: tuple[Any, Any] | None = None
    refined: bool = False  # input_tokens_bound is the tokenizer's count, not the byte bound the span started with
    reserved_usd: float = 0.0
    term: str | None = None
    holds: tuple[tuple[Any, Any], ...] = ()  # (ledger, reservation) per ledger the call is reserved in
    extra_holds: tuple[tuple[Any, Any], ...] = ()  # room held for its retries: given back when it settles
    # How its budgets were reserved in, set by `admit` whenever the call has budgets (`admit_unbudgeted` clears
    # both): settlement reads the same plan.
    plan: _Plan | None = None
    started: float = 0.0
    # -- settlement --
    outcome: str = ""
    cost: CallCost | None = None
    billed: Usage = dataclasses.field(default_factory=Usage)  # usage as billed: zero on a DSPy cache hit
    estimated: bool = False
    estimate_reason: str | None = None
    usage_missing: bool = False
    error_type: str | None = None
    duration_s: float | None = None
    fired: tuple[tuple[Budget, str], ...] = ()  # (budget, "warn" | "exceeded") crossings this call caused
    trace_id: int = 0
    span_id: int = 0
    ts: float = 0.0  # wall-clock start, for the cost log

    @property
    def trial_key(self) -> str | None:
        return None if self.trial is None else f"{self.optimizer or 'optimizer'}#{self.trial}"

    @property
    def budget_labels(self) -> list[str]:
        return [b.label for b in self.budgets]


@dataclasses.dataclass(slots=True, eq=False)
class _Plan:
    """How one set of active budgets is reserved in: worked out once per set (a `budget()` block), not per call."""

    budgets: tuple[Budget, ...]
    groups: tuple[tuple[Any, list[str], list[Budget]], ...]  # (ledger, its accounts, their budgets), all or nothing
    in_process: tuple[Budget, ...]  # budgets a forked child must not spend against (see `_refuse_forked`)
    labels: tuple[str, ...]
    run_label: str  # the innermost run budget (not a scope): the metrics' budget label


def _plan(budgets: tuple[Budget, ...]) -> _Plan:
    by_ledger: dict[int, tuple[Any, list[str], list[Budget]]] = {}
    for b in budgets:
        _, accounts, group = by_ledger.setdefault(id(b.ledger), (b.ledger, [], []))
        accounts.append(b.account)
        group.append(b)
    runs = [b for b in budgets if not b.is_scope]
    return _Plan(budgets, tuple(by_ledger.values()),
                 tuple(b for b in budgets if not getattr(b.ledger, "shared", False)),
                 tuple(b.label for b in budgets), runs[-1].label if runs else "")


class Accountant:
    """Admission, settlement and the per-process tallies (spend report, metrics, cost-log sinks)."""

    def __init__(self, engine: CostEngine, aggregator: SpendAggregator | None = None):
        self.engine = engine
        self.aggregator = aggregator or SpendAggregator()
        self.metrics: Any = None  # telemetry.metrics.CostMetrics when a meter provider is available
        self._sinks: tuple[Callable[[LMCall], None], ...] = ()
        self._sinks_lock = threading.Lock()
        self._in_flight = InFlight()  # admitted, not yet settled or released
        self._plans: dict[int, _Plan] = {}  # by id() of the budgets tuple (the plan holds the tuple: no id reuse)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted call is still running; False if some were at the timeout."""
        return self._in_flight.wait(timeout_s)

    def _plan_for(self, budgets: tuple[Budget, ...]) -> _Plan:
        plan = self._plans.get(id(budgets))
        if plan is None or plan.budgets is not budgets:
            plan = _plan(budgets)
            if len(self._plans) >= 1024:  # budget blocks come and go: keep the cache bounded
                self._plans.clear()
            self._plans[id(budgets)] = plan
        return plan

    # -- sinks (record_run's cost log) ---------------------------------------------------------------
    def add_sink(self, sink: Callable[[LMCall], None]) -> None:
        with self._sinks_lock:
            self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: Callable[[LMCall], None]) -> None:
        with self._sinks_lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    # -- before the provider call ---------------------------------------------------------------------
    def admit(self, call: LMCall) -> None:
        """Reserve the call's worst case against every active budget, all or nothing, or refuse.

        Raises `BudgetExceededError` (or a subclass) or `UnpricedModelError`: both are deliberate stops,
        raised before any request is made. Any other exception is our bug: nothing stays reserved, and the
        caller logs it and goes on with `admit_unbudgeted`.
        """
        prepared = self._prepare(call)
        if prepared is not None:
            plan, amount, term = prepared
            waiting = self._reserve(call, plan, amount, term)
            if waiting is not None:  # the rare path: others in flight are in the way
                amount, term, waiting = self._refined_again(call, plan, amount, term, waiting)
                if waiting is not None:
                    self._wait_for_room(call, plan, amount, term, waiting)
            self._admitted(call, plan, amount, term)

    async def admit_async(self, call: LMCall) -> None:
        """`admit` for a coroutine: waiting for room yields to the event loop (the calls in flight that would
        make room may be tasks of the same loop)."""
        prepared = self._prepare(call)
        if prepared is not None:
            plan, amount, term = prepared
            waiting = self._reserve(call, plan, amount, term)
            if waiting is not None:
                amount, term, waiting = self._refined_again(call, plan, amount, term, waiting)
                if waiting is not None:
                    await self._wait_for_room_async(call, plan, amount, term, waiting)
            self._admitted(call, plan, amount, term)

    def admit_extra(self, call: LMCall, amount: float) -> None:
        """Room for one more request of an admitted call (a retry), held until the call settles: waits and stops
        as an admission does (money only: a retry is not another call under `max_calls`)."""
        if call.plan is not None and call.holds and amount > 0:
            own_holds = call.holds
            self._reserve_waiting(call, call.plan, amount, call.term, own=_held(call))
            call.extra_holds, call.holds = call.extra_holds + call.holds, own_holds

    async def admit_extra_async(self, call: LMCall, amount: float) -> None:
        if call.plan is not None and call.holds and amount > 0:
            own_holds = call.holds
            await self._reserve_waiting_async(call, call.plan, amount, call.term, own=_held(call))
            call.extra_holds, call.holds = call.extra_holds + call.holds, own_holds

    def _prepare(self, call: LMCall) -> tuple[_Plan, float, str | None] | None:
        """(plan, worst case, its dominant term) of a call with budgets; None for a call without (counted in
        flight here: there is nothing to reserve)."""
        call.started = time.perf_counter()
        call.ts = time.time()
        budgets = call.budgets
        if not budgets:
            if self.engine.policy != "warn":
                self.engine.entry_for(call.model)  # the unknown-model policy applies with or without a budget
            if _context._open_budgets:
                _outside_budgets(call.model)
            self._in_flight.add()
            return None
        plan = call.plan = self._plan_for(budgets)
        if plan.in_process:
            _refuse_forked(plan.in_process, call.model)
        amount, term = self._worst_case(call)
        if call.prompt is not None:
            near = amount * _NEAR_CAP
            for b in budgets:
                if near > b.room_hint:
                    return plan, *self._refined(call, amount, term)
        return plan, amount, term

    def _refined_again(self, call: LMCall, plan: _Plan, amount: float, term: str | None, waiting: _Waiting
                       ) -> tuple[float, str | None, _Waiting | None]:
        """A call told to wait is near the cap: with its prompt counted exactly (if not yet) it may fit now."""
        if call.prompt is None:
            return amount, term, waiting
        amount, term = self._refined(call, amount, term)
        return amount, term, waiting.again(self._reserve(call, plan, amount, term))

    def _refined(self, call: LMCall, amount: float, term: str | None) -> tuple[float, str | None]:
        """The worst case with the prompt counted by the model's own tokenizer where it has one offline
        (`pricing.tokenizers`: OpenAI models), instead of one token per byte: asked once per call, and only near
        a cap, where the byte bound (about 4x the real count for English) would stop a run calls early."""
        prompt, call.prompt = call.prompt, None
        try:
            bound = prompt_tokens_bound(call.model, *prompt) if prompt is not None else None
        except Exception:  # noqa: BLE001 - our bug must not stop the call: the byte bound holds
            logger.debug("otel-dspy-cost: exact prompt count failed", exc_info=True)
            bound = None
        if bound is None or bound >= call.input_tokens_bound:
            return amount, term
        call.input_tokens_bound = bound
        call.refined = True
        return self._worst_case(call)

    def _reserve_waiting(self, call: LMCall, plan: _Plan, amount: float, term: str | None,
                         own: float | None = None) -> None:
        """`_reserve`, waiting while it says to (only calls in flight are in the way), up to the bound."""
        waiting = self._reserve(call, plan, amount, term, own=own)
        if waiting is not None:
            self._wait_for_room(call, plan, amount, term, waiting, own)

    def _wait_for_room(self, call: LMCall, plan: _Plan, amount: float, term: str | None, waiting: _Waiting,
                       own: float | None = None) -> None:
        deadline = time.monotonic() + waiting.timeout_s
        while waiting is not None:
            waiting.sleep(deadline)
            waiting = waiting.again(self._reserve(call, plan, amount, term, deadline, own=own))

    async def _reserve_waiting_async(self, call: LMCall, plan: _Plan, amount: float, term: str | None,
                                     own: float | None = None) -> None:
        waiting = self._reserve(call, plan, amount, term, own=own)
        if waiting is not None:
            await self._wait_for_room_async(call, plan, amount, term, waiting, own)

    async def _wait_for_room_async(self, call: LMCall, plan: _Plan, amount: float, term: str | None,
                                   waiting: _Waiting, own: float | None = None) -> None:
        deadline = time.monotonic() + waiting.timeout_s
        while waiting is not None:
            await asyncio.sleep(min(waiting.next_delay(), max(0.0, deadline - time.monotonic())))
            waiting = waiting.again(self._reserve(call, plan, amount, term, deadline, own=own))

    def _worst_case(self, call: LMCall) -> tuple[float, str | None]:
        amount, term = self.engine.worst_case(call.model, call.input_tokens_bound, call.max_tokens, call.n,
                                              call.apart, call.searches)
        if amount is None:  # no price known: a USD cap cannot be kept for this call
            capped = [b for b in call.budgets if b.caps_usd]
            if capped:
                raise UnpricedModelError(_unpriced_message(call.model, capped[-1], term))
            amount = 0.0
        elif term == "max_tokens_unset":
            self.engine.warn_unbounded(call.model, amount)
        return amount, term

    def _reserve(self, call: LMCall, plan: _Plan, amount: float, term: str | None,
                 deadline: float | None = None, own: float | None = None) -> _Waiting | None:
        """One attempt at reserving in every ledger, all or nothing: None when the call holds its reservations
        (in `call.holds`), a `_Waiting` when it fits once calls in flight settle; raises the stop otherwise
        (also when `deadline` has passed while waiting). `own`: room for a retry of this call, which already
        holds `own` itself (it cannot wait for its own reservation to settle)."""
        held: list[tuple[Any, Any]] = []
        try:
            for ledger, accounts, group in plan.groups:
                version = getattr(ledger, "version", None)
                outcome = (ledger.reserve(accounts, amount, call.phase) if own is None
                           else _reserve_room(ledger, accounts, amount, call.phase))
                if not isinstance(outcome, Refusal):  # a Reservation
                    held.append((ledger, outcome))
                    continue
                if own is not None and outcome.wait and outcome.reserved_usd - own <= 1e-12:
                    outcome = dataclasses.replace(outcome, wait=False)  # only its own call is in flight
                if outcome.wait:
                    for b in group:
                        b.room_hint = -math.inf  # the cap is near: later calls count their prompts exactly
                if outcome.wait and (deadline is None or time.monotonic() < deadline):
                    _give_back(held)  # a waiting call holds nothing: the calls it waits for may need the room
                    held = []
                    return _Waiting(ledger, version, min(b.wait_timeout_s for b in group))
                if outcome.wait:  # waited the whole bound: the calls in flight never made room
                    outcome = dataclasses.replace(outcome, wait=False, detail="waited")
                call.outcome = REFUSED
                raise _refusal(group, outcome, amount, term, call.model)
        except BaseException:
            _give_back(held)  # all or nothing: what this call already holds goes back
            raise
        call.holds = tuple(held)
        return None

    def _admitted(self, call: LMCall, plan: _Plan, amount: float, term: str | None) -> None:
        budgets = plan.budgets
        call.reserved_usd = amount
        call.term = term
        for b in budgets:  # each budget counts its calls in flight (a stop drains them); runs per LM call
            b.in_flight.add()
            if amount > b.max_reserved_usd:
                b.max_reserved_usd = amount  # a plain max: a lost race only under-reports a hint
        self._in_flight.add()

    def admit_unbudgeted(self, call: LMCall) -> None:
        """Our own admission failed (a bug, logged by the caller): the call goes ahead, and is still counted
        in the spend report, metrics and cost log when it settles (not in a ledger: nothing was reserved)."""
        call.holds = ()
        call.budgets = ()
        call.plan = None
        if not call.started:
            call.started = time.perf_counter()
        self._in_flight.add()

    # -- after it ---------------------------------------------------------------------------------------
    def release(self, call: LMCall) -> None:
        """The call was admitted but never sent: give its reservations back, count nothing."""
        _give_back(call.holds + call.extra_holds)
        call.holds = call.extra_holds = ()
        call.prompt = None
        for b in call.budgets:
            b.in_flight.done()
        self._in_flight.done()

    def settle(self, call: LMCall) -> None:
        """Count a call that was sent: ledgers, warn/exceed crossings, spend report, metrics, cost log."""
        cost = call.cost
        call.prompt = None  # not kept with the call: prompts can be large
        if cost is None:
            self.release(call)
            return
        if call.started:
            call.duration_s = time.perf_counter() - call.started
        budgets = call.budgets
        try:
            for ledger, reservation in call.holds:
                ledger.settle(reservation, cost.usd, cost.economic_usd)
            call.holds = ()
            if call.extra_holds:  # after the settle: the room stays held until the cost is counted
                _give_back(call.extra_holds)
                call.extra_holds = ()
            for b in budgets:
                b.room_hint -= cost.usd  # a racy float: a hint for `_prepare`, never a limit
                # Once a budget has nothing left to fire (no warn threshold or already warned; a stop, or an
                # exceed already fired), it costs no call here.
                if b.events_pending:
                    kinds = b.after_settle()
                    if kinds:
                        call.fired += tuple((b, kind) for kind in kinds)
        finally:
            for b in budgets:
                b.in_flight.done()
            self._in_flight.done()
        plan = call.plan
        usage = call.billed
        self.aggregator.add(
            (call.module or "(no module)", call.model or "(unknown model)", call.phase,
             plan.labels if plan is not None else (), None if call.trial is None else call.trial_key),
            1, cost.usd, cost.economic_usd, usage.input_tokens, usage.cache_read_tokens, usage.output_tokens,
            usage.reasoning_tokens, int(cost.unknown), int(call.estimated), int(call.cache_hit),
            1 if cost.unpriced else 0)
        metrics = self.metrics
        if metrics is not None:
            try:
                metrics.record_call(
                    module=call.module, model=call.model, provider=call.provider, operation=call.operation,
                    phase=call.phase, budget_label=plan.run_label if plan is not None else "",
                    optimizer=call.optimizer, usd=cost.usd, economic_usd=cost.economic_usd,
                    input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, cache_hit=call.cache_hit,
                    unknown=cost.unknown, duration_s=call.duration_s)
            except Exception:  # telemetry must never break the run
                logger.debug("otel-dspy-cost: metrics failed", exc_info=True)
        for sink in self._sinks:
            try:
                sink(call)
            except Exception:
                logger.exception("otel-dspy-cost: the cost log could not record a call")


# A call's prompt is counted exactly once its worst case times this is more than a budget's room: the last
# calls of a cap, where the byte bound would refuse what fits (`benchmarks/budget_utilisation.py`).
_NEAR_CAP = 8.0


def _held(call: LMCall) -> float:
    """What a call holds in each of its ledgers: its reservation and the room already held for its retries."""
    return call.reserved_usd + sum(getattr(r, "amount_usd", 0.0) for _, r in call.extra_holds)


def _reserve_room(ledger: Any, accounts: list[str], amount: float, phase: str) -> Any:
    """A reservation that is not another call (room for a retry): `calls=0`; a user ledger without that
    parameter reserves it as a call, which only counts more."""
    try:
        return ledger.reserve(accounts, amount, phase, calls=0)
    except TypeError:
        return ledger.reserve(accounts, amount, phase)


class _Waiting:
    """A call that fits once calls in flight settle: how it waits for that. An in-process ledger wakes it at
    the next settle or release; a shared ledger (other processes' calls) is asked again, backing off from
    5 ms to 100 ms. Hand-written because neither SQLite nor a Redis script can notify a waiter."""

    __slots__ = ("ledger", "version", "timeout_s", "_delay")

    def __init__(self, ledger: Any, version: int | None, timeout_s: float):
        self.ledger, self.version, self.timeout_s, self._delay = ledger, version, timeout_s, 0.005

    def again(self, latest: _Waiting | None) -> _Waiting | None:
        """After another attempt: None once admitted, else this waiter (its back-off kept) on the latest read."""
        if latest is None:
            return None
        self.ledger, self.version = latest.ledger, latest.version
        return self

    def next_delay(self) -> float:
        delay = self._delay
        self._delay = min(0.1, delay * 1.5)
        return delay

    def sleep(self, deadline: float) -> None:
        left = max(0.0, deadline - time.monotonic())
        wait_for_change = getattr(self.ledger, "wait_for_change", None)
        if wait_for_change is not None and self.version is not None:
            wait_for_change(self.version, min(left, 1.0))
        else:
            time.sleep(min(left, self.next_delay()))


_said_outside: set[int] = set()


def _outside_budgets(model: str) -> None:
    """An LM call with no budget in its context while a budget is open elsewhere in the process: said once per
    thread, since its spend is not held to that budget (a thread or queue worker started before the budget
    that it was handed work through something we do not wrap)."""
    labels = _context.open_budget_labels()
    thread = threading.current_thread()
    if not labels or thread.ident in _said_outside:
        return
    _said_outside.add(thread.ident or 0)
    logger.warning(
        "otel-dspy-cost: an LM call to %s in thread %r ran outside budget(s) %s, which are open in another thread: "
        "its spend is not held to them. Threads started, and tasks submitted to ThreadPoolExecutor or "
        "multiprocessing ThreadPool, inside the budget carry it; a worker that was already running (a queue "
        "consumer) does not: run its work under `with b:` (a Budget can be entered in many threads at once).",
        model, thread.name, ", ".join(repr(label) for label in labels))


def _give_back(holds: Iterable[tuple[Any, Any]]) -> None:
    """Release reservations of a call that will not be made (a release that fails is left to expire)."""
    for ledger, reservation in holds:
        try:
            ledger.release(reservation)
        except Exception:
            logger.debug("otel-dspy-cost: release failed", exc_info=True)


def _refusal(group: list[Budget], outcome: Any, amount: float, term: str | None, model: str) -> BaseException:
    """The stop a refusal raises. Built defensively: a bug while wording it must still stop the call."""
    try:
        culprit = next(b for b in group if b.account == outcome.account)
        return culprit.refusal_error(outcome, requested_usd=amount, term=term, model=model)
    except Exception:  # noqa: BLE001
        logger.exception("otel-dspy-cost: internal error while wording a budget refusal (the call is refused)")
        label = group[0].label
        return BudgetExceededError(f"Budget {label!r} refused a call to {model} ({outcome.reason})", label=label,
                                   spent_usd=0.0, limit=float(getattr(outcome, "limit", 0.0) or 0.0),
                                   reason=str(outcome.reason), requested_usd=amount, term=term)


def _refuse_forked(budgets: tuple[Budget, ...], model: str) -> None:
    """A forked child must not silently get a fresh copy of an in-process budget (`budgets` are those on
    in-process ledgers): each child would spend the whole cap while the parent's ledger counts nothing."""
    generation = _context.fork_generation()
    for b in budgets:
        if b._fork_generation != generation:
            raise ForkedBudgetError(
                f"Budget {b.label!r} refused a call to {model}: this process was forked from the one that entered "
                f"the budget, and an in-process budget cannot count a child's spend (each child would spend the "
                f"whole cap again). Use a shared ledger, e.g. budget(..., ledger='sqlite:///budgets.db'), or "
                f"enter a budget of its own in the child.",
                label=b.label, spent_usd=0.0, limit=b.limit_usd or 0.0, reason="forked")


def _unpriced_message(model: str, b: Budget, term: str | None = None) -> str:
    if term and term.startswith("unpriced:"):
        units = term.split(":", 1)[1]
        return (f"Budget {b.label!r} refused a call to {model}: the request can be billed for {units}, which has "
                f"no price for {model!r}, so a USD cap cannot be kept (an unpriced unit is never counted as $0). "
                f"Add the rate with instrument(pricing_overrides={{{model!r}: {{...}}}}) or a catalog entry "
                f"(fields audio_input, audio_output, image_output: USD per 1M tokens; web_search: USD per 1,000 "
                f"searches), or leave that part out of the request.")
    return (f"Budget {b.label!r} refused a call to {model}: no price is known for {model!r}, so a USD cap cannot be "
            f"kept (an unpriced call is never reserved or counted as $0). Add its price with "
            f"`otel-dspy-cost pricing add {model} --input R --output R` (USD per 1M tokens) or "
            f"instrument(pricing_overrides={{...}}), or opt into a fallback price with "
            f"instrument(unknown_model_price={{'input': R, 'output': R}}).")


# DSPy 3.4's typed errors for answers the provider gave without billing (its 3.3 and LiteLLM errors carry a
# `status_code` instead).
_REJECTED_ERRORS = frozenset({"LMAuthError", "LMBillingError", "LMRateLimitError", "LMInvalidRequestError",
                              "ContextWindowExceededError", "LMUnsupportedModelError", "AuthenticationError",
                              "RateLimitError", "BadRequestError", "PermissionDeniedError", "NotFoundError"})


def _status(err: BaseException) -> int | None:
    for value in (getattr(err, "status_code", None), getattr(err, "status", None),
                  getattr(getattr(err, "response", None), "status_code", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# Errors raised while a connection was being made, before any byte of the request left: DNS (gaierror), a
# refused or unreachable port, a connect timeout, a TLS handshake (httpx/httpcore and DSPy 3.4's lm15 wrap
# each of these as `ConnectError`/`ConnectTimeout`; PoolTimeout: no connection was ever free).
_CONNECT_PHASE = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout", "gaierror", "ConnectionRefusedError"})
# Anywhere in the chain, these transport errors say a request did leave: it may have been billed whatever else
# the chain holds (a retry's read timeout raised while an earlier attempt's connect error was being handled).
# Wrappers' names and statuses are not read here: LiteLLM reports a refused connection as a 500.
_AFTER_SEND = ("ReadTimeout", "WriteTimeout", "ReadError", "WriteError", "RemoteProtocolError")


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason) of a call that raised. A provider's client error (4xx but 408) was answered and
    not billed; a failure to connect sent nothing; anything else (timeout, cancellation, dropped connection,
    5xx, an unknown error) may have been billed after the request left, so it settles at the worst case."""
    seen: set[int] = set()
    err: BaseException | None = exc
    connect, sent = None, False
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        kind = type(err).__name__
        status = _status(err)
        if status is not None and 400 <= status < 500 and status != 408:
            return REJECTED, f"provider answered {status}"
        if status is None and kind in _REJECTED_ERRORS:
            return REJECTED, f"provider answered: {kind}"
        if kind in _CONNECT_PHASE:
            connect = connect or kind
        elif kind in _AFTER_SEND:
            sent = True  # e.g. a read timeout of a retry, whose chain still holds an earlier connect error
        err = err.__cause__ or err.__context__
    if connect and not sent:
        return NOT_SENT, f"no connection: {connect}"
    name = type(exc).__name__
    lowered = f"{name} {str(exc)[:300]}".lower()
    if "cancel" in lowered:
        reason = "cancelled"
    elif "timeout" in lowered or "timed out" in lowered:
        reason = "timeout"
    elif "connection" in lowered or "transport" in lowered:
        reason = "connection"
    else:
        reason = f"error: {name}"
    return UNKNOWN, reason
