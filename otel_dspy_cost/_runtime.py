"""The one active instrumentation: its tracer, accounting station, processor and options.

Wrappers read `active()` on every call, so `uninstrument()` takes effect at once even for wrapper
objects other code still holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from otel_dspy_cost.budgets.accounting import Accountant
    from otel_dspy_cost.budgets.budget import Budget
    from otel_dspy_cost.pricing.engine import CostEngine
    from otel_dspy_cost.telemetry.processor import BudgetSpanProcessor

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
# How `budget()` switches accounting on when it is entered before `instrument()`, set by the instrumentor
# when it is imported. A hook rather than an import: budgets sit below instrumentation in the package
# layering (docs/architecture.md), and `otel_dspy_cost/__init__` always imports the instrumentor.
_implicit_start: Callable[[], None] | None = None


def active() -> Runtime | None:
    return _active


def set_active(runtime: Runtime | None) -> None:
    global _active
    _active = runtime


def set_implicit_start(start: Callable[[], None]) -> None:
    global _implicit_start
    _implicit_start = start


def start_implicit() -> None:
    """Accounting only, no spans exported: what a budget entered before `instrument()` needs."""
    if _active is not None:
        return
    if _implicit_start is None:  # cannot happen once the package is imported; said loudly if it does
        logger.error("otel-dspy-cost: budget entered before the instrumentor was imported: budgets are not "
                     "enforced; call otel_dspy_cost.instrument() at start-up")
        return
    _implicit_start()


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

        from otel_dspy_cost import _redact

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
