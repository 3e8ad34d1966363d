"""Span helpers shared by every DSPy wrapper: start a span as current, close it with error info.

Why wrappers and not DSPy callbacks: a single global no-op `BaseCallback` made a one-Predict call
go from ~245 us to ~433 us here (DSPy runs `inspect.getcallargs` and makes a uuid for every hook),
and `dspy.configure(callbacks=[...])` silently replaces the list. Class-level wrappers cost a
fraction of that, survive `dspy.configure`, and follow deep-copied and re-loaded programs.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from . import _attributes as A
from . import _runtime

logger = logging.getLogger("otel_dspy_cost")

# (module instance, module path) of the innermost DSPy module being called: the parent for paths.
CURRENT_MODULE: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "otel_dspy_cost_module", default=None)

_said: set[str] = set()


def internal_error(where: str) -> None:
    """Our bug: log it (once per place, with traceback) and let the user's program go on."""
    if where not in _said:
        _said.add(where)
        logger.exception("otel-dspy-cost: internal error in %s (the program continues; logged once)", where)
    else:
        logger.debug("otel-dspy-cost: internal error in %s", where, exc_info=True)


def start(tracer: trace.Tracer, name: str, attributes: dict[str, Any]) -> tuple[Span, object]:
    span = tracer.start_span(name, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token


def finish(span: Span, token: object, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            span.set_attribute(A.ERROR_TYPE, type(exc).__qualname__)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    except Exception:
        internal_error("span error status")
    try:
        otel_context.detach(token)
    except Exception:
        internal_error("context detach")
    rt = _runtime.active()
    if rt is not None and rt.processor is not None:
        rt.processor.write_rollup(span)  # guarded inside
    span.end()
