"""Cost metrics emitted by the library itself, so a Collector only forwards them.

(A span-to-metric connector in the Collector would multiply cost per grouping label and drop
zero-valued labels; see docs/architecture.md.) Label sets are bounded: module path, model,
phase and budget label; never trace ids or prompts.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics


class CostMetrics:
    def __init__(self, meter: metrics.Meter):
        self.cost = meter.create_counter("dspy.cost", unit="USD", description="Actual LM spend")
        self.economic = meter.create_counter("dspy.cost.economic", unit="USD", description="Uncached-equivalent spend")
        self.calls = meter.create_counter("dspy.lm.calls", unit="{call}", description="LM calls")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Tokens per LM call")
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                               description="LM call duration")
        self.budget_events = meter.create_counter("dspy.budget.events", unit="{event}",
                                                  description="Budget warn/exceeded crossings")

    @classmethod
    def create(cls, meter_provider: Any = None) -> CostMetrics:
        meter = metrics.get_meter("otel_dspy_cost", meter_provider=meter_provider)
        return cls(meter)

    def budget_event(self, budget: Any, kind: str) -> None:
        self.budget_events.add(1, {"dspy.budget.label": budget.label, "dspy.budget.event": kind})
