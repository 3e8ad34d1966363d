"""`BudgetSpanProcessor`: wires the roll-up tree (`telemetry.rollup`) and the budget gate for other instrumentations.

Two jobs:

- **Roll-up tree.** Every recorded span gets the totals of the LM calls below it
  (`dspy.cost.total_usd`, tokens, `dspy.lm.calls`). Our LM wrapper hands each settled call over
  (`note_call`); LM spans of other instrumentations are priced from their GenAI attributes.
- **Budget gate for LM spans we did not make** (e.g. `opentelemetry-instrumentation-genai-dspy`): their
  worst case is reserved through the same accounting station (`budgets.accounting.Accountant`) at `on_start`
  and settled at `on_end`. The SDK calls processors only for recording spans, so such spans are budgeted
  only while they record. Our own LM calls never depend on this: the accounting station counts them in
  the LM wrapper, sampled or not.

Nested LM spans for one call (another instrumentation's inside ours, or ours inside another's) count
once: ours when present (`take_over` gives back an enclosing foreign span's reservation), else the
outermost. Nothing in the OTel SDK catches a processor's exceptions, so every hook is guarded; the only
exceptions that leave on purpose are the budget and unpriced-model stops, from `on_start` of a foreign
LM span, i.e. before its provider call.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _runtime
from otel_dspy_cost.budgets.accounting import Accountant, LMCall
from otel_dspy_cost.budgets.spend import SpendAggregator
from otel_dspy_cost.errors import BudgetExceededError, UnpricedModelError
from otel_dspy_cost.ledgers.in_process import InFlight
from otel_dspy_cost.pricing.cost import UNKNOWN_COST, CallCost, Usage
from otel_dspy_cost.pricing.engine import CostEngine
from otel_dspy_cost.telemetry import viewers
from otel_dspy_cost.telemetry.rollup import ENDED_KEPT, Node, RollupTree
from otel_dspy_cost.telemetry.spans import mark_refused

logger = logging.getLogger("otel_dspy_cost")


def _usage_from_attrs(attrs: Any) -> Usage | None:
    if A.GEN_AI_INPUT_TOKENS not in attrs and A.GEN_AI_OUTPUT_TOKENS not in attrs:
        return None
    return Usage(int(attrs.get(A.GEN_AI_INPUT_TOKENS, 0) or 0), int(attrs.get(A.GEN_AI_OUTPUT_TOKENS, 0) or 0),
                 int(attrs.get(A.GEN_AI_CACHE_READ_TOKENS, 0) or 0),
                 int(attrs.get(A.GEN_AI_CACHE_CREATION_TOKENS, 0) or 0),
                 int(attrs.get(A.GEN_AI_REASONING_TOKENS, 0) or 0))


_gates: weakref.WeakSet[BudgetSpanProcessor] = weakref.WeakSet()
_foreign_open = InFlight()  # foreign LM calls admitted by any gate and not yet ended: nothing to take over at 0


def take_over_current() -> None:
    """Our LM wrapper is about to admit a call: if the current span is a foreign LM span some gate admitted
    (another instrumentation wraps DSPy outside ours), that gate gives its reservation back."""
    if not _foreign_open.count:
        return
    try:
        span_id = trace.get_current_span().get_span_context().span_id
        if span_id:
            for gate in list(_gates):
                gate._take_over(span_id)
    except Exception:
        logger.debug("otel-dspy-cost: take-over failed", exc_info=True)


class BudgetSpanProcessor(SpanProcessor):
    """Install it on a `TracerProvider` (``instrument()`` does): roll-ups, and budgets for LM spans of
    other instrumentations."""

    def __init__(self, cost_engine: CostEngine | None = None, aggregator: SpendAggregator | None = None):
        if cost_engine is None:
            from otel_dspy_cost.pricing.resolver import default_resolver

            cost_engine = CostEngine(default_resolver())
        self.accountant = Accountant(cost_engine, aggregator)
        self.tree = RollupTree()
        self.tree.on_late = self._late
        self._failed_once = False
        self.enabled = True
        _gates.add(self)

    @property
    def engine(self) -> CostEngine:
        return self.accountant.engine

    @property
    def aggregator(self) -> SpendAggregator:
        return self.accountant.aggregator

    # -- hooks -----------------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if not self.enabled:
            return
        try:
            node = self.tree.track(span)
            if node.ours or not node.is_lm or node.lm_ancestor is not None:
                return
            if _context.CURRENT_CALL.get() is not None:  # inside one of our LM calls, which counts it
                node.taken_over = True
                return
            call = self._foreign_call(span, node)
        except Exception:
            self._internal_error("on_start")
            return
        try:
            self.accountant.admit(call)  # may raise the deliberate stop, before the foreign provider call
        except (BudgetExceededError, UnpricedModelError) as stop:
            self._refuse(span, stop)
            raise
        except Exception:
            self._internal_error("on_start")
            return
        node.call = call
        _foreign_open.add()

    def on_end(self, span: ReadableSpan) -> None:
        if not self.enabled:
            return
        try:
            node = self.tree.pop(span.context.span_id)
            if node is None:
                return
            if node.is_lm and not node.ours and node.call is not None and not node.taken_over:
                _foreign_open.done()
            if node.is_lm and not node.taken_over:
                self._end_lm(span, node)
            elif node.calls:
                self.tree.add_to_parent(node)
            node.span = None
            if not node.is_lm:  # kept a while for children that start after it (`RollupTree.ended`, inline)
                ended = self.tree.recently_ended
                ended[span.context.span_id] = node
                if len(ended) > ENDED_KEPT:
                    self.tree.ended_trim()
        except Exception:
            self._internal_error("on_end")

    def shutdown(self) -> None:
        self.tree.clear()

    def wait_for_calls(self, timeout_s: float = 10.0) -> bool:
        """Wait until no admitted LM call is still running; False if some were at the timeout."""
        return self.accountant.wait_idle(timeout_s)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    # -- from our LM wrapper ------------------------------------------------------------------------
    def _take_over(self, span_id: int) -> None:
        """One of our LM calls starts inside this foreign LM span: give its reservation back (ours counts)."""
        node = self.tree.get(span_id)
        if node is not None and node.is_lm and not node.ours and node.call is not None and not node.taken_over:
            node.taken_over = True
            self.accountant.release(node.call)
            node.call = None
            _foreign_open.done()

    def note_call(self, span: Span, call: LMCall) -> None:
        """Our LM wrapper hands over the settled call before the span ends (no attributes parsed back)."""
        node = self.tree.get(span.get_span_context().span_id)
        if node is not None:
            node.call = call

    def write_rollup(self, span: Span, extra: dict[str, Any] | None = None) -> None:
        """Called by our wrappers just before one of our spans ends: its roll-up attributes (and `extra`, the
        wrapper's own) are written once instead of after every LM call below it (an optimizer's LM call sits
        under five or six of our spans, and each rewrite is five attributes the SDK validates and copies)."""
        try:
            self.tree.write(span, extra, viewers.on and span.parent is None)
        except Exception:
            self._internal_error("write_rollup")

    def adopt(self, root: Span, parent: Span) -> None:
        """`root` starts a trace of its own (an optimizer trial) but its totals belong under `parent` (the
        trial's summary span in the compile trace): they roll up there when `root` ends, as a child's would."""
        try:
            node, above = self.tree.get(root.get_span_context().span_id), self.tree.get(
                parent.get_span_context().span_id)
            if node is not None and above is not None:
                node.parent = above
        except Exception:
            self._internal_error("adopt")

    def _late(self, parent: Node, node: Node) -> None:
        """Cost that reached an ended span (see `RollupTree.add_to_parent`): a `late cost` span under it, carrying
        the late subtree's totals, so that the trace still adds up (the ended span + its late-cost children)."""
        try:
            rt = _runtime.active()
            if rt is None or rt.processor is not self or parent.context is None or not node.calls:
                return
            with self.tree._lock:
                attrs = node.rollup_attributes()
            attrs[A.SPAN_KIND] = "late_cost"
            if viewers.on:
                attrs[viewers.OI_KIND] = "CHAIN"
            if node.module:
                attrs[A.MODULE_PATH] = node.module
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent.context))
            rt.tracer.start_span("late cost", context=ctx, attributes=attrs).end()
        except Exception:
            self._internal_error("late cost")

    # -- internals --------------------------------------------------------------------------------
    def _internal_error(self, where: str) -> None:
        if not self._failed_once:
            self._failed_once = True
            logger.exception("otel-dspy-cost: internal error in BudgetSpanProcessor.%s (the program continues; "
                             "this is logged once)", where)
        else:
            logger.debug("otel-dspy-cost: internal error in BudgetSpanProcessor.%s", where, exc_info=True)

    def _foreign_call(self, span: Span, node: Node) -> LMCall:
        """An LM call seen only as another instrumentation's span: what its attributes and our run state say."""
        attrs = span.attributes or {}
        state = _context.current()
        model = str(attrs.get(A.GEN_AI_REQUEST_MODEL, "") or "")
        max_tokens = attrs.get(A.GEN_AI_REQUEST_MAX_TOKENS)
        ctx = span.context
        return LMCall(
            model=model, provider=str(attrs.get(A.GEN_AI_PROVIDER, "")),
            operation=str(attrs.get(A.GEN_AI_OPERATION, "chat")),
            input_tokens_bound=int(attrs.get(A.INPUT_TOKENS_BOUND, 0) or 0),
            max_tokens=int(max_tokens) if max_tokens else None,
            n=int(attrs.get(A.GEN_AI_REQUEST_CHOICE_COUNT, 1) or 1), module=node.module,
            phase=str(attrs.get(A.PHASE, state.phase)), optimizer=state.optimizer or "", trial=state.trial,
            role=state.lm_role, budgets=state.budgets if model else (),
            trace_id=ctx.trace_id, span_id=ctx.span_id)

    def _refuse(self, span: Span, stop: BaseException) -> None:
        """The foreign call will not be made: close its span now, marked, so it is still exported.

        Its node is dropped first, so `on_end` accounts nothing for a call that was never sent."""
        try:
            self.tree.pop(span.context.span_id)
            mark_refused(span, stop)
            span.end()
        except Exception:
            self._internal_error("on_start")

    def _foreign_cost(self, span: ReadableSpan, call: LMCall) -> None:
        """Price a foreign LM span from its attributes: its own cost when it has one, else its usage."""
        attrs = span.attributes or {}
        usage = _usage_from_attrs(attrs)
        call.cache_hit = bool(attrs.get(A.CACHE_HIT, False))
        call.estimated = bool(attrs.get(A.COST_ESTIMATED, False))
        call.billed = usage or Usage()
        call.outcome = "ok"
        if A.COST_USD in attrs:
            figures = (float(attrs.get(name, 0.0)) for name in (
                A.COST_USD, A.COST_ECONOMIC_USD, A.COST_INPUT_USD, A.COST_CACHED_INPUT_USD, A.COST_OUTPUT_USD,
                A.COST_REASONING_USD))
            call.cost = CallCost(*figures, str(attrs.get(A.PRICING_SOURCE, "")), int(attrs.get(A.PRICING_VERSION, 0)),
                                 None)
        elif attrs.get(A.COST_UNKNOWN) or usage is None or not call.model:
            call.cost = UNKNOWN_COST
        else:
            call.cost = self.engine.cost(call.model, usage, cache_hit=call.cache_hit)

    def _end_lm(self, span: ReadableSpan, node: Node) -> None:
        call = node.call
        if not node.ours:
            if node.lm_ancestor is not None:
                return  # a second span for a call that an enclosing LM span counts
            if call is None:  # admitted nothing (e.g. the processor started after the span): count it now
                call = self._foreign_call(span, node)  # type: ignore[arg-type]
                self.accountant.admit_unbudgeted(call)
            self._foreign_cost(span, call)
            self.accountant.settle(call)
        if call is not None:
            self.tree.count(node, call)
