"""`DSPyCostInstrumentor`: the OpenTelemetry instrumentor (and what `instrument()` calls).

Registered under the `opentelemetry_instrumentor` entry point, so `opentelemetry-instrument python
app.py` picks it up with no code change. `BaseInstrumentor` makes it a singleton and makes
instrument/uninstrument idempotent.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import weakref
from collections.abc import Collection, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _redact, _runtime, _validate
from otel_dspy_cost.budgets.accounting import Accountant
from otel_dspy_cost.instrumentation import patches
from otel_dspy_cost.pricing.engine import CostEngine
from otel_dspy_cost.pricing.resolver import PricingResolver, set_default_resolver
from otel_dspy_cost.telemetry import viewers
from otel_dspy_cost.telemetry.processor import BudgetSpanProcessor
from otel_dspy_cost.telemetry.provider import meter_provider_from_env, provider_from_env

logger = logging.getLogger("otel_dspy_cost")

_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_processors: weakref.WeakKeyDictionary[TracerProvider, BudgetSpanProcessor] = weakref.WeakKeyDictionary()


def _resolve_provider(tracer_provider: Any) -> Any:
    if tracer_provider is not None:
        return tracer_provider
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        provider = provider_from_env()
        trace.set_tracer_provider(provider)
        return trace.get_tracer_provider()
    return current


def _resolve_meter_provider(meter_provider: Any) -> Any:
    """The given provider, the global one if the app set one, else one from OTEL_* (None: the no-op global)."""
    if meter_provider is not None:
        return meter_provider
    from opentelemetry import metrics

    current = metrics.get_meter_provider()
    if type(current).__name__ != "_ProxyMeterProvider":
        return current
    provider = meter_provider_from_env()
    if provider is not None:
        metrics.set_meter_provider(provider)
    return None


def _installed_processor(provider: TracerProvider) -> BudgetSpanProcessor | None:
    """A BudgetSpanProcessor the user already added: reuse it, or every call would be counted twice.

    The SDK has no public list of processors; this reads its private one and copes with its absence.
    """
    multi = getattr(provider, "_active_span_processor", None)
    for candidate in getattr(multi, "_span_processors", ()) or ():
        if isinstance(candidate, BudgetSpanProcessor):
            _processors[provider] = candidate
            return candidate
    return None


def _records(tracer: trace.Tracer, provider: Any) -> bool:
    """Whether a span of ours can ever record. A no-op tracer (no-op provider, `OTEL_SDK_DISABLED`) cannot, nor
    can an SDK provider whose sampler is ALWAYS_OFF (`OTEL_TRACES_SAMPLER=always_off`): it drops every span
    whatever its parent. Then our wrappers make no span at all and only the accounting runs, instead of asking
    the sampler at every trace's root (~35,000 instructions for the SDK to make and drop a root span here, plus
    ours around it). A sampler that may record some trace (ratio, parent-based) is asked per trace as usual."""
    if isinstance(tracer, trace.NoOpTracer):
        return False
    try:
        sampler = getattr(provider, "sampler", None)
        return sampler is None or sampler.get_description() != "AlwaysOffSampler"
    except Exception:  # noqa: BLE001 - a sampler we cannot read may record: make spans
        return True


class DSPyCostInstrumentor(BaseInstrumentor):
    """Spans, cost and budgets for DSPy.

    Options (all keyword): ``tracer_provider``, ``meter_provider``, ``capture_content`` (default off,
    or ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``), ``pricing_overrides`` (a file
    path or a dict), ``unknown_model`` ("error" | "warn" | "prompt"; default "error" when ``CI`` is
    set, else "warn"), ``local_models`` ({"model": {"input": rate, "output": rate}} for economic cost
    of self-hosted models), ``tier`` (e.g. "batch", "flex"), ``use_litellm_prices`` (default True),
    ``unknown_model_price`` ({"input": R, "output": R} USD per 1M tokens: an explicit fallback price for
    unpriced models; without it a USD budget refuses calls to them), ``metrics_module_depth`` (module-path
    levels kept as a metric label; default 2), ``adapter_spans``
    (default "attributes": the adapter's format/parse timed onto the predictor span; True: a span each,
    twice the spans of a Predict call; False: neither), ``prices_as_of`` (a date: price the run from the catalog as it
    stood then, to re-price or audit an old run; default the run's start), ``genai_metrics`` (default
    True; False drops the GenAI histograms `gen_ai.client.token.usage` and `gen_ai.client.operation.duration`,
    keeping the `dspy.*` cost metrics), ``missing_usage`` ("worst_case", the default: a call answered without
    token usage counts at its worst case; "estimate": ~4 characters a token of the visible text).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("dspy >= 3.3, < 3.5",)

    def _instrument(self, **kwargs: Any) -> None:
        if kwargs.get("adapter_spans", "attributes") not in (True, False, "attributes"):
            raise ValueError(f"adapter_spans must be True, False or 'attributes', not {kwargs['adapter_spans']!r}")
        _check_options(kwargs)
        backend_attributes = kwargs.get("backend_attributes", True)
        if not isinstance(backend_attributes, bool):
            raise ValueError(f"backend_attributes must be True or False, not {backend_attributes!r}")
        viewers.on = backend_attributes
        _redact.install_log_filter()
        resolver = PricingResolver(kwargs.get("pricing_overrides"), local_models=kwargs.get("local_models"),
                                   use_litellm=kwargs.get("use_litellm_prices", True),
                                   run_started_at=_as_of(kwargs.get("prices_as_of")))
        engine = CostEngine(resolver, unknown_model=kwargs.get("unknown_model"), tier=kwargs.get("tier"),
                            unknown_model_price=kwargs.get("unknown_model_price"),
                            missing_usage=kwargs.get("missing_usage", "worst_case"))
        provider = _resolve_provider(kwargs.get("tracer_provider"))
        previous = kwargs.get("_previous")
        aggregator = previous.accountant.aggregator if previous is not None else None
        accountant = Accountant(engine, aggregator)
        processor = None
        if isinstance(provider, TracerProvider):
            processor = _processors.get(provider) or _installed_processor(provider)
            if processor is None:
                processor = BudgetSpanProcessor(engine)
                provider.add_span_processor(processor)
                _processors[provider] = processor
            processor.accountant = accountant
            processor.enabled = True
        elif not kwargs.get("_implicit"):
            logger.warning("otel-dspy-cost: the tracer provider is not the OpenTelemetry SDK's: cost, budgets and "
                           "spend_report() work, but spans carry no roll-ups (they need an SDK TracerProvider)")
        capture = kwargs.get("capture_content")
        if capture is None:
            capture = os.environ.get(_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes")
        tracer = trace.get_tracer(A.SCOPE_NAME, A.scope_version(), tracer_provider=provider)
        try:
            from otel_dspy_cost.telemetry.metrics import CostMetrics

            accountant.metrics = CostMetrics.create(_resolve_meter_provider(kwargs.get("meter_provider")),
                                                    module_depth=kwargs.get("metrics_module_depth", 2),
                                                    genai_histograms=kwargs.get("genai_metrics", True))
        except Exception:  # noqa: BLE001 - metrics are optional; spans and budgets still work
            logger.debug("otel-dspy-cost: metrics unavailable", exc_info=True)
        set_default_resolver(resolver)
        options = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        _runtime.set_active(_runtime.Runtime(tracer, engine, processor, bool(capture), accountant, provider, options,
                                             implicit=bool(kwargs.get("_implicit")),
                                             records=_records(tracer, provider)))
        try:
            patches.apply(adapter_spans=kwargs.get("adapter_spans", "attributes"))
        except Exception:
            patches.remove()
            _runtime.set_active(None)
            logger.exception("otel-dspy-cost: could not instrument this DSPy version; DSPy runs uninstrumented")

    def _uninstrument(self, **kwargs: Any) -> None:
        patches.remove()
        rt = _runtime.active()
        if rt is not None and rt.processor is not None:
            rt.processor.enabled = False
        _runtime.set_active(None)


def _check_options(kwargs: dict[str, Any]) -> None:
    """Options that are not prices (those are checked by the pricing package) refused before anything is set up."""
    for name in ("capture_content", "use_litellm_prices", "genai_metrics"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, not {value!r}")
    _validate.integer("metrics_module_depth", kwargs.get("metrics_module_depth"))
    overrides = kwargs.get("pricing_overrides")
    if overrides is not None and not isinstance(overrides, (str, os.PathLike, Mapping)):
        raise TypeError(f"pricing_overrides must be a file path or a dict, not {type(overrides).__name__}")


def _as_of(value: Any) -> _dt.datetime | None:
    """`prices_as_of=`: the date whose price list prices the run (default: the run's start)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    elif isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
        value = _dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, _dt.datetime):
        raise ValueError(f"prices_as_of must be a date, datetime or ISO-8601 string, not {value!r}")
    return value if value.tzinfo else value.replace(tzinfo=_dt.UTC)


_OPTIONS = frozenset({"capture_content", "pricing_overrides", "unknown_model", "local_models", "tier",
                      "use_litellm_prices", "unknown_model_price", "metrics_module_depth", "adapter_spans",
                      "prices_as_of", "genai_metrics", "skip_dep_check", "raise_exception_on_conflict",
                      "missing_usage", "backend_attributes"})


def instrument(tracer_provider: Any = None, meter_provider: Any = None, **options: Any) -> DSPyCostInstrumentor:
    """Instrument DSPy once, at start-up; `uninstrument()` reverses it.

    Calling it again with the same options does nothing. Called again with other options (say
    `opentelemetry-instrument` already instrumented, and the app now passes its own provider or
    `pricing_overrides`), the new options are applied: DSPy is re-instrumented with them (logged), and the
    spend report carries on. Raises `CatalogError` for a malformed pricing override and `ValueError` for a
    bad option (bad input is reported, not ignored); a re-instrumentation that fails that way keeps the
    previous set-up in force.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:  # a misspelt option would otherwise be ignored without a word
        import difflib

        hints = [f"{name!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
            name, _OPTIONS, n=1)) else "") for name in unknown]
        raise ValueError(f"instrument() has no option {', '.join(hints)}; options: {', '.join(sorted(_OPTIONS))}")
    instrumentor = DSPyCostInstrumentor()
    wanted = {"tracer_provider": tracer_provider, "meter_provider": meter_provider, **options}
    if instrumentor.is_instrumented_by_opentelemetry:
        current = _runtime.active()
        changed = _changed_options(current.options, wanted) if current is not None else []
        if current is not None and not current.implicit and not changed:
            return instrumentor
        if current is not None and not current.implicit:
            logger.info("otel-dspy-cost: instrument() called again with other options (%s): applying them",
                        ", ".join(changed))
        instrumentor.uninstrument()
        try:
            instrumentor.instrument(_previous=current, **wanted)
        except BaseException:
            if current is not None:  # bad new options: keep counting with the old ones, then report
                instrumentor.instrument(_previous=current, _implicit=current.implicit, **current.options)
            raise
        return instrumentor
    instrumentor.instrument(**wanted)
    return instrumentor


def _changed_options(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) is not new.get(k) and old.get(k) != new.get(k))


def ensure_accounting() -> None:
    """`budget()` entered without `instrument()`: turn the accounting station on (no spans are exported),
    so the budget is enforced rather than silently ignored. A later `instrument()` replaces this set-up."""
    if _runtime.active() is not None:
        return
    logger.warning("otel-dspy-cost: budget() or record_run() was used before instrument(): enabling cost "
                   "accounting so budgets are enforced (no spans are exported; call otel_dspy_cost.instrument() at "
                   "start-up for traces)")
    DSPyCostInstrumentor().instrument(tracer_provider=trace.NoOpTracerProvider(), _implicit=True)


def uninstrument() -> None:
    """Remove every wrapper: DSPy is left exactly as it was before `instrument()`."""
    instrumentor = DSPyCostInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


_runtime.set_implicit_start(ensure_accounting)
