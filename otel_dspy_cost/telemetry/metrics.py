"""Cost metrics emitted by the library itself, so a Collector only forwards them.

Why here and not a span-to-metric connector in the Collector: the contrib `sum` connector adds a
value once per grouping label (three labels = triple cost), drops zero-valued labels and emits
deltas Prometheus does not accumulate (see docs/architecture.md). Emitting from the accounting station
counts each LM call exactly once, sampled or not, including LM spans of other instrumentations.

The GenAI histograms (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`) are synchronous
instruments as the conventions define them, but an LM call does not pay for their aggregation: it appends
its values to a bounded buffer, and the buffer is recorded into the SDK instruments when a reader collects
(from our first observable callback, which the SDK runs before it reads the instruments' storage), with
the LM span's context, so exemplars still point at the call. An SDK measurement hashes and validates its
label set (~15 us each here, three per call); the buffer append is a list append. If nothing collects
for `_MAX_PENDING` calls, values are recorded as they come. `instrument(genai_metrics=False)` turns the
histograms off.

Label sets are bounded: every label that can grow (module path, model, budget label, optimizer)
passes through `_Bounded`, which keeps the first `max_values` distinct values and maps the rest to
"other". Never trace ids, prompts or trial numbers (trial costs live on trial spans).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation

from otel_dspy_cost import _attributes as A

logger = logging.getLogger("otel_dspy_cost")
OVERFLOW = "other"
_MAX_PENDING = 20_000  # histogram values held between collections, at most (~5 MB)
_NO_CONTEXT = Context()


class _Bounded:
    """First-come distinct values of one label, capped; later values become "other".

    Hand-written because the SDK's cardinality limit drops the whole point into one overflow
    series without saying which label overflowed; this keeps the other labels intact.
    """

    def __init__(self, max_values: int):
        self.max_values = max_values
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.max_values:
                self._seen.add(value)
                return value
        return OVERFLOW


class CostMetrics:
    """The instruments; `record_call` is fed once per settled LM call by the accounting station."""

    def __init__(self, meter: metrics.Meter, *, module_depth: int = 2, max_label_values: int = 100,
                 via_global: bool = False, genai_histograms: bool = True):
        self.module_depth = module_depth
        # On the global no-op provider every call would still pay for labels and sums nobody reads:
        # skip until the app sets a real global MeterProvider (the API's proxy instruments then go live).
        self._live = not via_global
        self._module = _Bounded(max_label_values)
        self._model = _Bounded(max_label_values)
        self._label = _Bounded(max_label_values)
        self._optimizer = _Bounded(20)
        # Cost and call counts are summed here per label set and observed at collection time: one dict
        # update per call instead of three SDK measurements (each hashes its attribute set).
        self._sums: dict[tuple[str, ...], list[float]] = {}
        self._genai_labels: dict[tuple[str, str, str], tuple[dict[str, str], ...]] = {}
        self._slots: dict[tuple[Any, ...], tuple[list[float], tuple[dict[str, str], ...]]] = {}
        self._sums_lock = threading.Lock()
        # (input tokens, output tokens, duration or None, label sets, span context) per call, to record
        self._pending: list[tuple[int, int, float | None, tuple[dict[str, str], ...], Any]] = []
        self._histograms = genai_histograms
        meter.create_observable_counter("dspy.cost", [self._observe_sums(0)], unit="USD",
                                        description="Actual LM spend (0 for cache hits and free local models)")
        meter.create_observable_counter("dspy.cost.economic", [self._observe_sums(1)], unit="USD",
                                        description="What the calls would have cost uncached, at list price")
        meter.create_observable_counter("dspy.lm.calls", [self._observe_sums(2)], unit="{call}",
                                        description="LM calls, with cache hits and unknown-price calls labelled")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Tokens per LM call (GenAI semantic conventions)")
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                               description="LM call duration (GenAI semantic conventions)")
        self.budget_events = meter.create_counter("dspy.budget.events", unit="{event}",
                                                  description="Budget warn/exceeded crossings")
        self.ledger_outages = meter.create_counter("dspy.budget.ledger_outages", unit="{event}",
                                                   description="A shared budget ledger became unreachable")
        self._budgets: OrderedDict[str, Any] = OrderedDict()
        self._budgets_lock = threading.Lock()
        self._max_budgets = max_label_values
        meter.create_observable_gauge("dspy.budget.spent", [self._observe(lambda b: b.spent_usd)], unit="USD",
                                      description="Spend counted against each budget")
        meter.create_observable_gauge("dspy.budget.limit", [self._observe(lambda b: b.limit_usd)], unit="USD",
                                      description="Each budget's limit")
        # Ratios carry no unit on purpose: exporters would add a "_ratio" suffix on some paths and not
        # others, and the dashboards pin one name.
        meter.create_observable_gauge("dspy.budget.utilization", [self._observe(lambda b: b.utilisation)], unit="",
                                      description="spent / limit")
        meter.create_observable_gauge("dspy.budget.warn_threshold", [self._observe(lambda b: b.warn_at)], unit="",
                                      description="The fraction of the limit at which the budget warns")
        self._projections: dict[str, float] = {}  # optimizer -> its running compile's projected final spend
        meter.create_observable_gauge("dspy.optimizer.projected_cost", [self._observe_projections], unit="USD",
                                      description="A running compile's final spend, projected after each trial")

    @classmethod
    def create(cls, meter_provider: Any = None, **options: Any) -> CostMetrics:
        meter = metrics.get_meter(A.SCOPE_NAME, A.scope_version(), meter_provider=meter_provider)
        return cls(meter, via_global=meter_provider is None, **options)

    def _went_live(self) -> bool:
        if type(metrics.get_meter_provider()).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider"):
            return False
        self._live = True
        return True

    def module_label(self, path: str) -> str:
        return self._module(".".join(path.split(".")[: self.module_depth]) if path else "(no module)")

    def record_call(self, *, module: str, model: str, provider: str, operation: str, phase: str,
                    budget_label: str, optimizer: str, usd: float, economic_usd: float, input_tokens: int,
                    output_tokens: int, cache_hit: bool, unknown: bool, duration_s: float | None) -> None:
        if not self._live and not self._went_live():
            return
        raw = (module, model, phase, budget_label, optimizer, cache_hit, unknown, operation, provider)
        with self._sums_lock:
            slot = self._slots.get(raw)
            if slot is None:
                slot = self._slot(raw)
            row = slot[0]
            row[0] += usd
            row[1] += economic_usd
            row[2] += 1
            if not self._histograms:
                return
            item = (input_tokens, output_tokens, duration_s, slot[1], trace.get_current_span().get_span_context())
            if len(self._pending) < _MAX_PENDING:
                self._pending.append(item)
                return
        self._record(item)  # nothing has collected for a long while: record as they come

    def _slot(self, raw: tuple[Any, ...]) -> tuple[list[float], tuple[dict[str, str], ...]]:
        """(sums row, GenAI label sets) of a call's raw labels, bounded on the way (caller holds the lock).
        Kept per raw label set, so a call is one dict lookup and three additions."""
        module, model, phase, budget_label, optimizer, cache_hit, unknown, operation, provider = raw
        model_label = self._model(model or "unknown")
        key = (self.module_label(module), model_label, phase, self._label(budget_label or "none"),
               self._optimizer(optimizer or "none"), "true" if cache_hit else "false", "true" if unknown else "false")
        row = self._sums.get(key)
        if row is None:
            row = self._sums[key] = [0.0, 0.0, 0]
        genai_key = (operation, provider, model_label)
        label_sets = self._genai_labels.get(genai_key)
        if label_sets is None:
            label_sets = self._genai_label_sets(*genai_key)
        slot = (row, label_sets)
        if len(self._slots) < 4096:  # past that, labels are bounded per call (slower, same series)
            self._slots[raw] = slot
        return slot

    def _record(self, item: tuple[int, int, float | None, tuple[dict[str, str], ...], Any]) -> None:
        input_tokens, output_tokens, duration_s, label_sets, span_context = item
        # The call's span as context: a trace-based exemplar filter still links the point to the call.
        context = (trace.set_span_in_context(trace.NonRecordingSpan(span_context)) if span_context.is_valid
                   else _NO_CONTEXT)
        self.tokens.record(input_tokens, label_sets[0], context=context)
        self.tokens.record(output_tokens, label_sets[1], context=context)
        if duration_s is not None:
            self.duration.record(duration_s, label_sets[2], context=context)

    def flush(self) -> None:
        """Record the buffered histogram values now (a reader is collecting)."""
        with self._sums_lock:
            pending, self._pending = self._pending, []
        for item in pending:
            try:
                self._record(item)
            except Exception:  # telemetry must never break the run (nor the reader's collection)
                logger.debug("otel-dspy-cost: histogram record failed", exc_info=True)

    def _genai_label_sets(self, operation: str, provider: str, model_label: str) -> tuple[dict[str, str], ...]:
        """(input tokens, output tokens, duration) label sets, built once per (operation, provider, model):
        three dicts per call were a measurable share of the per-call cost. Bounded like the labels."""
        genai = {A.GEN_AI_OPERATION: operation or "chat", A.GEN_AI_PROVIDER: provider or "unknown",
                 A.GEN_AI_REQUEST_MODEL: model_label.split("/", 1)[-1]}  # the conventions' model name
        sets = ({**genai, "gen_ai.token.type": "input"}, {**genai, "gen_ai.token.type": "output"}, genai)
        if len(self._genai_labels) < 4 * self._model.max_values:  # a few operations/providers per model
            self._genai_labels[(operation, provider, model_label)] = sets
        return sets

    # -- budgets ---------------------------------------------------------------------------------
    def watch_budget(self, budget: Any) -> None:
        """Report this budget's gauges; the latest budget of a label wins, the oldest labels are dropped."""
        label = self._label(budget.label)
        for kind in ("warn", "exceeded"):  # series exist at 0 from the start, so increase() sees the first event
            self.budget_events.add(0, {A.BUDGET_LABEL: label, "dspy.budget.event": kind})
        with self._budgets_lock:
            self._budgets[label] = budget
            self._budgets.move_to_end(label)
            while len(self._budgets) > self._max_budgets:
                self._budgets.popitem(last=False)

    def ledger_outage(self, policy: str) -> None:
        self.ledger_outages.add(1, {"dspy.budget.on_unavailable": policy})

    def budget_event(self, budget: Any, kind: str) -> None:
        self.budget_events.add(1, {A.BUDGET_LABEL: self._label(budget.label), "dspy.budget.event": kind})

    _COST_LABELS = (A.MODULE_PATH, A.LM_MODEL, A.PHASE, A.BUDGET_LABEL, A.OPTIMIZER_NAME)

    def _observe_sums(self, column: int):
        """Cost columns are observed per cost label set; the call count also by cache hit and unknown price."""
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if column == 0:  # the first callback the SDK runs on a collection: histogram values go in first
                self.flush()
            with self._sums_lock:
                rows = [(k, v[column]) for k, v in self._sums.items()]
            if column == 2:
                labels = (*self._COST_LABELS, A.CACHE_HIT, A.COST_UNKNOWN)
                return [Observation(v, dict(zip(labels, k, strict=True))) for k, v in rows]
            merged: dict[tuple[str, ...], float] = {}
            for k, v in rows:
                merged[k[:5]] = merged.get(k[:5], 0.0) + v
            return [Observation(v, dict(zip(self._COST_LABELS, k, strict=True))) for k, v in merged.items()]

        return callback

    def record_projection(self, optimizer: str, usd: float) -> None:
        """A compile's projection moved (optimizers.projection); the label set is bounded like the others."""
        self._projections[self._optimizer(optimizer)] = usd

    def _observe_projections(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {A.OPTIMIZER_NAME: k}) for k, v in list(self._projections.items())]

    def _observe(self, read: Callable[[Any], float | None]):
        """A gauge callback reporting `read(budget)` for every watched budget label."""
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            with self._budgets_lock:
                items = list(self._budgets.items())
            out = []
            for label, b in items:
                value = read(b)
                if value is not None:
                    out.append(Observation(float(value), {A.BUDGET_LABEL: label}))
            return out

        return callback
