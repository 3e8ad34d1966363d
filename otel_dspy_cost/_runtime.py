"""The one active instrumentation: its tracer, accounting station, processor and options.

Wrappers read `active()` on every call, so `uninstrument()` takes effect at once even for wrapper
objects other code still holds.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .report import SpendAggregator

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from ._accounting import Accountant
    from ._costing import CostEngine
    from .budget import Budget
    from .processor import BudgetSpanProcessor

logger = logging.getLogger("otel_dspy_cost")


@dataclasses.dataclass
class Runtime:
    tracer: Tracer
    engine: CostEngine
    processor: BudgetSpanProcessor | None
    capture_content: bool
    accountant: Accountant
    tracer_provider: Any = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # what instrument() was called with
    implicit: bool = False  # set up by budget() without instrument(): accounting only, no spans exported
    records: bool = True  # False when the tracer is a no-op one (no-op provider, OTEL_SDK_DISABLED)

    @property
    def metrics(self) -> Any:
        return self.accountant.metrics


_active: Runtime | None = None
_fallback_aggregator = SpendAggregator()


def active() -> Runtime | None:
    return _active


def set_active(runtime: Runtime | None) -> None:
    global _active
    _active = runtime


def aggregator() -> SpendAggregator:
    if _active is not None:
        return _active.accountant.aggregator
    return _fallback_aggregator


def budget_event(budget: Budget, kind: str) -> None:
    """A warn/exceeded crossing: a metric point for alert rules (span events come from the LM wrapper)."""
    rt = _active
    if rt is None or rt.metrics is None:
        return
    try:
        rt.metrics.budget_event(budget, kind)
    except Exception:  # never let telemetry break the run
        logger.debug("otel-dspy-cost: budget metric failed", exc_info=True)


def watch_budget(budget: Budget) -> None:
    """A budget was entered: its spent/limit/utilisation gauges are reported from now on."""
    rt = _active
    if rt is None or rt.metrics is None:
        return
    try:
        rt.metrics.watch_budget(budget)
    except Exception:  # never let telemetry break the run
        logger.debug("otel-dspy-cost: budget gauge failed", exc_info=True)


def ledger_outage(url: str, policy: str, detail: str) -> None:
    """A shared ledger went away: a span event on the call that found out, and a metric point for alerts."""
    try:
        from opentelemetry import trace

        from . import _redact

        trace.get_current_span().add_event("dspy.budget.ledger_unavailable", {
            "dspy.budget.ledger": _redact.scrub(url), "dspy.budget.on_unavailable": policy,
            "exception.message": _redact.scrub(detail)[:500]})
        rt = _active
        if rt is not None and rt.metrics is not None:
            rt.metrics.ledger_outage(policy)
    except Exception:  # never let telemetry break the run
        logger.debug("otel-dspy-cost: ledger outage telemetry failed", exc_info=True)


def wait_for_calls(timeout_s: float = 10.0) -> bool:
    """Wait for LM calls already admitted (e.g. in DSPy's worker threads when a budget stop unwound the
    caller): they cost money and belong in the run's accounting. True when none is left in flight."""
    if _active is None:
        return True
    return _active.accountant.wait_idle(timeout_s)
