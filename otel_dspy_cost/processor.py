"""`BudgetSpanProcessor`: rolls cost up the span tree and enforces budgets before provider calls.

It works from span attributes only (the GenAI conventions plus our `dspy.cost.*`), so it also
budgets LM spans made by other instrumentations. Nested LM spans for one call (ours inside
another instrumentation's, or the reverse) count once: the outermost LM span holds the reservation
and the call's cost; inner ones hand their figures up to it.

Nothing in the OTel SDK catches a processor's exceptions, so every hook is guarded: our own bugs
are logged and swallowed. The only exceptions that leave on purpose are the budget stop and the
unknown-model stop, raised from `on_start` of an LM span, i.e. before the provider is called.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import Status, StatusCode

from . import _attributes as A
from . import _context
from ._cost import UNKNOWN_COST, CallCost, Usage
from ._costing import CostEngine
from .budget import Budget, BudgetExceededError, UnpricedModelError
from .report import SpendAggregator

logger = logging.getLogger("otel_dspy_cost.processor")


class _Node:
    """Book-keeping for one open span. The span reference is dropped when the span ends."""

    __slots__ = ("span", "parent", "is_lm", "lm_ancestor", "usd", "econ", "inp", "out", "calls", "unknown",
                 "child_cost", "own_cost", "reservation", "budgets", "phase", "module", "trial", "model", "optimizer",
                 "provider", "operation", "deferred")

    def __init__(self, span: Span | None, parent: _Node | None, is_lm: bool):
        self.span = span
        self.parent = parent
        self.is_lm = is_lm
        self.lm_ancestor: _Node | None = None
        self.usd = self.econ = 0.0
        self.inp = self.out = self.calls = self.unknown = 0
        self.child_cost: tuple[CallCost, Usage, bool, bool] | None = None
        self.own_cost: tuple[CallCost, Usage, bool, bool] | None = None  # handed over by our LM wrapper
        self.provider = self.operation = ""
        # Our own spans get their roll-up written once, by our wrapper just before they end
        # (`write_rollup`); other spans are updated after every LM call below them.
        self.deferred = False
        self.reservation: list[tuple[Any, Any]] = []
        self.budgets: tuple[Budget, ...] = ()
        self.phase = "infer"
        self.module = ""
        self.trial: str | None = None
        self.model = ""
        self.optimizer = ""

    def rollup_attributes(self) -> dict[str, Any]:
        """The subtree's totals as span attributes (read under the processor's lock)."""
        attrs: dict[str, Any] = {A.TOTAL_USD: self.usd, A.TOTAL_ECONOMIC_USD: self.econ, A.TOTAL_INPUT_TOKENS: self.inp,
                                 A.TOTAL_OUTPUT_TOKENS: self.out, A.LM_CALLS: self.calls}
        if self.unknown:
            attrs[A.TOTAL_UNKNOWN_CALLS] = self.unknown
        return attrs


def _is_lm(attrs: Any) -> bool:
    return attrs.get(A.SPAN_KIND) == "lm" or attrs.get(A.GEN_AI_OPERATION) in A.LM_OPERATIONS


def _usage_from_attrs(attrs: Any) -> Usage | None:
    if A.GEN_AI_INPUT_TOKENS not in attrs and A.GEN_AI_OUTPUT_TOKENS not in attrs:
        return None
    return Usage(int(attrs.get(A.GEN_AI_INPUT_TOKENS, 0) or 0), int(attrs.get(A.GEN_AI_OUTPUT_TOKENS, 0) or 0),
                 int(attrs.get(A.GEN_AI_CACHE_READ_TOKENS, 0) or 0),
                 int(attrs.get(A.GEN_AI_CACHE_CREATION_TOKENS, 0) or 0),
                 int(attrs.get(A.GEN_AI_REASONING_TOKENS, 0) or 0))


class BudgetSpanProcessor(SpanProcessor):
    """Install it on a `TracerProvider` (``instrument()`` does): roll-up, budgets, spend report."""

    def __init__(self, cost_engine: CostEngine | None = None, aggregator: SpendAggregator | None = None):
        if cost_engine is None:
            from .pricing import default_resolver

            cost_engine = CostEngine(default_resolver())
        self.engine = cost_engine
        self.aggregator = aggregator or SpendAggregator()
        # Open spans by span id. Only single get/set/pop operations touch it, each atomic on a dict, so
        # they take no lock (two lock round-trips per span were measurable); `_lock` guards the roll-up sums.
        self._live: dict[int, _Node] = {}
        self._lock = threading.Lock()
        self._failed_once = False
        self.enabled = True
        self.metrics: Any = None  # _metrics.CostMetrics, set by instrument(); fed once per LM call

    # -- hooks -----------------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if not self.enabled:
            return
        try:
            node = self._track(span)
            if node is None or not node.is_lm or node.lm_ancestor is not None:
                return
        except Exception:
            self._internal_error("on_start")
            return
        self._reserve(span, node)  # may raise the deliberate stop; its own bugs are guarded inside

    def on_end(self, span: ReadableSpan) -> None:
        if not self.enabled:
            return
        try:
            node = self._live.pop(span.context.span_id, None)
            if node is None:
                return
            if node.is_lm:
                self._end_lm(span, node)
            else:
                self._end_other(node)
            node.span = None
        except Exception:
            self._internal_error("on_end")

    def shutdown(self) -> None:
        with self._lock:
            self._live.clear()

    def wait_for_calls(self, timeout_s: float = 10.0) -> bool:
        """Wait until no LM call holds a reservation (e.g. calls still in flight in DSPy's worker
        threads when a budget stop unwound the caller); False if some were still running at the timeout."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            busy = any(n.is_lm and n.reservation for n in list(self._live.values()))
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    # -- internals --------------------------------------------------------------------------------
    def _internal_error(self, where: str) -> None:
        if not self._failed_once:
            self._failed_once = True
            logger.exception("otel-dspy-cost: internal error in BudgetSpanProcessor.%s (the program continues; "
                             "this is logged once)", where)
        else:
            logger.debug("otel-dspy-cost: internal error in BudgetSpanProcessor.%s", where, exc_info=True)

    def _track(self, span: Span) -> _Node | None:
        attrs = span.attributes or {}
        parent_ctx = span.parent
        parent = self._live.get(parent_ctx.span_id) if parent_ctx is not None else None
        node = _Node(span, parent, _is_lm(attrs))
        node.deferred = not node.is_lm and getattr(span.instrumentation_scope, "name", None) == A.SCOPE_NAME
        if parent is not None:
            node.lm_ancestor = parent if parent.is_lm else parent.lm_ancestor
            node.module = parent.module
            node.trial = parent.trial
        node.module = attrs.get(A.MODULE_PATH, node.module)
        state = _context.current()
        node.phase = attrs.get(A.PHASE, state.phase)
        node.optimizer = state.optimizer or ""
        if state.trial is not None:
            node.trial = f"{state.optimizer or 'optimizer'}#{state.trial}"
        node.budgets = state.budgets
        if node.is_lm:
            node.model = str(attrs.get(A.GEN_AI_REQUEST_MODEL, ""))
            node.provider = str(attrs.get(A.GEN_AI_PROVIDER, ""))
            node.operation = str(attrs.get(A.GEN_AI_OPERATION, "chat"))
        self._live[span.context.span_id] = node
        return node

    def _reserve(self, span: Span, node: _Node) -> None:
        budgets = node.budgets
        model = node.model
        try:
            if not model:
                return
            if not budgets:
                if self.engine.policy != "warn":
                    self.engine.entry_for(model)  # the unknown-model policy applies with or without a budget
                return
            attrs = span.attributes or {}
            max_tokens = attrs.get(A.GEN_AI_REQUEST_MAX_TOKENS)
            amount, term = self.engine.worst_case(model, int(attrs.get(A.INPUT_TOKENS_BOUND, 0) or 0),
                                                  int(max_tokens) if max_tokens else None)
            by_ledger: dict[int, list[Budget]] = {}
            for b in budgets:
                by_ledger.setdefault(id(b.ledger), []).append(b)
            held = []
            for group in by_ledger.values():
                outcome = group[0].ledger.reserve([b.account for b in group], amount, node.phase)
                if hasattr(outcome, "accounts"):
                    held.append((group[0].ledger, outcome))
                    continue
                for ledger, res in held:
                    ledger.release(res)
                culprit = next(b for b in group if b.account == outcome.account)
                raise culprit._refused(outcome, requested_usd=amount, term=term, model=model)
            node.reservation = held
            for b in budgets:
                if amount > b.max_reserved_usd:
                    b.max_reserved_usd = amount  # a plain max: a lost race only under-reports a hint
            span.set_attributes({A.BUDGET_RESERVED_USD: amount, A.BUDGET_LABEL: ",".join(b.label for b in budgets)})
        except (BudgetExceededError, UnpricedModelError) as stop:
            self._refuse(span, stop)
            raise
        except Exception:
            self._internal_error("on_start")

    def _refuse(self, span: Span, stop: BaseException) -> None:
        """The call will not be made: close the LM span now, marked, so it is still exported.

        Its node is dropped first, so `on_end` accounts nothing for a call that was never sent.
        """
        try:
            self._live.pop(span.context.span_id, None)
            span.set_attribute(A.BUDGET_REFUSED, True)
            span.set_attribute(A.ERROR_TYPE, type(stop).__name__)
            span.record_exception(stop)
            span.set_status(Status(StatusCode.ERROR, str(stop)))
            span.end()
        except Exception:
            self._internal_error("on_start")

    def note_call_cost(self, span: Span, figures: tuple[CallCost, Usage, bool, bool]) -> None:
        """Our LM wrapper hands over the figures it just wrote as attributes, before the span ends, so
        `on_end` need not parse ten attributes back (cProfile: about a fifth of `on_end`'s time)."""
        node = self._live.get(span.get_span_context().span_id)
        if node is not None:
            node.own_cost = figures

    def _call_cost(self, span: ReadableSpan, node: _Node) -> tuple[CallCost, Usage, bool, bool]:
        """(cost, usage, cache_hit, estimated) of one LM span: our attributes, a nested span's, or priced here."""
        if node.own_cost is not None:
            return node.own_cost
        attrs = span.attributes or {}
        usage = _usage_from_attrs(attrs) or Usage()
        cache_hit = bool(attrs.get(A.CACHE_HIT, False))
        estimated = bool(attrs.get(A.COST_ESTIMATED, False))
        if A.COST_USD in attrs:
            cost = CallCost(float(attrs[A.COST_USD]), float(attrs.get(A.COST_ECONOMIC_USD, 0.0)),
                            float(attrs.get(A.COST_INPUT_USD, 0.0)), float(attrs.get(A.COST_CACHED_INPUT_USD, 0.0)),
                            float(attrs.get(A.COST_OUTPUT_USD, 0.0)), float(attrs.get(A.COST_REASONING_USD, 0.0)),
                            str(attrs.get(A.PRICING_SOURCE, "")), int(attrs.get(A.PRICING_VERSION, 0)), None)
            return cost, usage, cache_hit, estimated
        if node.child_cost is not None:
            return node.child_cost
        if attrs.get(A.COST_UNKNOWN) or _usage_from_attrs(attrs) is None or not node.model:
            return UNKNOWN_COST, usage, cache_hit, estimated
        return self.engine.cost(node.model, usage, cache_hit=cache_hit), usage, cache_hit, estimated

    def _end_lm(self, span: ReadableSpan, node: _Node) -> None:
        figures = self._call_cost(span, node)
        if node.lm_ancestor is not None:
            # A second span for the same call (another instrumentation's): hand the figures up once.
            if node.lm_ancestor.child_cost is None:
                node.lm_ancestor.child_cost = figures
            return
        cost, usage, cache_hit, estimated = figures
        for ledger, reservation in node.reservation:
            ledger.settle(reservation, cost.usd, cost.economic_usd)
        fired = []
        for b in node.budgets:
            fired.extend((b, kind) for kind in b._after_settle())
        self.aggregator.record(
            module=node.module or "(no module)", model=node.model or "(unknown model)", phase=node.phase,
            budgets=[b.label for b in node.budgets], trial=node.trial,
            values={"calls": 1, "usd": cost.usd, "economic_usd": cost.economic_usd,
                    "input_tokens": usage.input_tokens, "cached_input_tokens": usage.cache_read_tokens,
                    "output_tokens": usage.output_tokens, "reasoning_tokens": usage.reasoning_tokens,
                    "unknown_cost_calls": int(cost.unknown), "estimated_calls": int(estimated),
                    "cache_hits": int(cache_hit)})
        node.usd, node.econ = cost.usd, cost.economic_usd
        node.inp, node.out, node.calls, node.unknown = usage.input_tokens, usage.output_tokens, 1, int(cost.unknown)
        self._add_to_parent(node, fired)
        if self.metrics is not None:
            self._record_metrics(span, node, cost, usage, cache_hit)

    def _record_metrics(self, span: ReadableSpan, node: _Node, cost: CallCost, usage: Usage, cache_hit: bool) -> None:
        runs = [b for b in node.budgets if not b.is_scope]
        duration = (span.end_time - span.start_time) / 1e9 if span.end_time and span.start_time else None
        self.metrics.record_call(
            module=node.module, model=node.model, provider=node.provider, operation=node.operation, phase=node.phase,
            budget_label=runs[-1].label if runs else "", optimizer=node.optimizer, usd=cost.usd,
            economic_usd=cost.economic_usd, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_hit=cache_hit, unknown=cost.unknown, duration_s=duration)

    def write_rollup(self, span: Span) -> None:
        """Called by our wrappers just before one of our spans ends: its roll-up attributes are written
        once instead of after every LM call below it (an optimizer's LM call sits under five or six of
        our spans, and each rewrite is five attributes the SDK validates and copies)."""
        try:
            node = self._live.get(span.get_span_context().span_id)
            if node is None or not node.calls:
                return
            with self._lock:
                attrs = node.rollup_attributes()
            span.set_attributes(attrs)
        except Exception:
            self._internal_error("write_rollup")

    def _end_other(self, node: _Node) -> None:
        if node.calls:
            self._add_to_parent(node, [])

    def _add_to_parent(self, node: _Node, fired: list[tuple[Budget, str]]) -> None:
        parent = node.parent
        while parent is not None and parent.span is None:  # ended early (e.g. a straggler thread): skip up
            parent = parent.parent
        if parent is None:
            return
        with self._lock:
            parent.usd += node.usd
            parent.econ += node.econ
            parent.inp += node.inp
            parent.out += node.out
            parent.calls += node.calls
            parent.unknown += node.unknown
            attrs = parent.rollup_attributes()
        span = parent.span
        if span is None:
            return
        if not parent.deferred:
            span.set_attributes(attrs)
        for budget_, kind in fired:
            span.add_event(f"dspy.budget.{kind}", {A.BUDGET_LABEL: budget_.label,
                                                   "dspy.budget.spent_usd": budget_.spent_usd,
                                                   "dspy.budget.limit_usd": budget_.limit_usd or 0.0})
