"""Span helpers shared by every DSPy wrapper: start a span as current, close it with scrubbed error info.

Why wrappers and not DSPy callbacks: a single global no-op `BaseCallback` made a one-Predict call
go from ~245 us to ~433 us here (DSPy runs `inspect.getcallargs` and makes a uuid for every hook),
and `dspy.configure(callbacks=[...])` silently replaces the list. Class-level wrappers cost a
fraction of that, survive `dspy.configure`, and follow deep-copied and re-loaded programs.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _redact, _runtime
from otel_dspy_cost._context import STARTING
from otel_dspy_cost.errors import BudgetExceededError
from otel_dspy_cost.telemetry import viewers

logger = logging.getLogger("otel_dspy_cost")

_said: set[str] = set()


def internal_error(where: str) -> None:
    """Our bug: log it (once per place, with traceback) and let the user's program go on."""
    if where not in _said:
        _said.add(where)
        logger.exception("otel-dspy-cost: internal error in %s (the program continues; logged once)", where)
    else:
        logger.debug("otel-dspy-cost: internal error in %s", where, exc_info=True)


def unsampled(rt: Any) -> bool:
    """No span of ours would record here: the tracer is a no-op one, or we are inside a trace the sampler
    dropped (the SDK's default `ParentBased` samplers, ALWAYS_OFF and `TraceIdRatioBased` decide the same for
    every span of a trace). Then wrappers make no span at all and build no attributes: the accounting
    station still prices, reserves and settles every LM call (measured: `benchmarks/overhead.py`,
    "ours, sampled out")."""
    if not rt.records:
        return True
    ctx = trace.get_current_span().get_span_context()
    return ctx.is_valid and not ctx.trace_flags.sampled


def start(tracer: trace.Tracer, name: str, attributes: dict[str, Any],
          kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> tuple[Span, object]:
    session = viewers.on and viewers.add_start(name, attributes)
    STARTING.attributes = attributes  # what our processor's on_start reads for this span (see _context)
    try:
        span = tracer.start_span(name, attributes=attributes, kind=kind)
    finally:
        STARTING.attributes = None
    if session:
        span.set_attributes(viewers.session_of(span))
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token


def skipped() -> tuple[Span, object]:
    """(span, token) of a span not made (see `unsampled`): `finish` leaves it alone."""
    return trace.INVALID_SPAN, None


def record_error(span: Span, exc: BaseException) -> None:
    """error.type, a scrubbed exception event and status: a provider may echo a key in its error text."""
    if not span.is_recording():
        return
    span.set_attribute(A.ERROR_TYPE, type(exc).__qualname__)
    span.add_event("exception", _redact.exception_attributes(exc))
    span.set_status(Status(StatusCode.ERROR, _redact.scrub(f"{type(exc).__name__}: {exc}")[:500]))


def mark_refused(span: Span, stop: BaseException) -> None:
    """An LM span whose call a budget refused (never sent): marked, with the stop as its error."""
    if span.is_recording():
        span.set_attributes({A.BUDGET_REFUSED: True, A.LM_OUTCOME: "refused"})
    record_error(span, stop)


def finish(span: Span, token: object, exc: BaseException | None = None, extra: dict[str, Any] | None = None) -> None:
    """End a span made current by `start`; `extra` attributes are written with its roll-up, in one go."""
    if token is None:  # a span we did not make (unsampled)
        return
    try:
        otel_context.detach(token)
    except Exception:
        internal_error("context detach")
    if isinstance(exc, BudgetExceededError) and getattr(span, "parent", True) is None:
        _drain(exc)
    finish_detached(span, exc, extra)


def _drain(stop: BudgetExceededError) -> None:
    """A budget stop is ending a trace's root span of ours: calls admitted before the stop may still be running
    in threads the stop did not unwind (DSPy's pool goes on). Wait for them (each budget's `drain_timeout_s`,
    as leaving its `with` block would), so that they settle while the root is open and its roll-up counts them."""
    try:
        for b in _context.current().budgets:
            b.wait_idle()
    except Exception:
        internal_error("drain before a root span ends")


def finish_detached(span: Span, exc: BaseException | None = None, extra: dict[str, Any] | None = None) -> None:
    """End a span that was never made current (a trial's summary span in the compile trace)."""
    try:
        if exc is not None:
            record_error(span, exc)
    except Exception:
        internal_error("span error status")
    rt = _runtime.active()
    if rt is not None and rt.processor is not None:
        rt.processor.write_rollup(span, extra)  # guarded inside
    elif extra:
        try:
            span.set_attributes(extra)
        except Exception:
            internal_error("span attributes")
    span.end()
