"""Per-call overhead of instrumentation on a DSPy program, side by side with the alternatives.

    python benchmarks/overhead.py [--calls 400] [--rounds 7]

Variants, interleaved round by round in one process (instrument, time, uninstrument), medians:
  baseline       uninstrumented DSPy
  otel-dspy-cost instrument() as shipped: spans (2 per Predict call, the adapter's format/parse timed onto
                 the predictor span) + cost + budget (an active budget) + metrics, BatchSpanProcessor
  ours, adapter spans  instrument(adapter_spans=True): format/parse as spans, 4 per Predict call
  ours, lean     instrument(adapter_spans=False): 2 spans, no adapter timings
  ours, no genai hist  the default with instrument(genai_metrics=False): no GenAI histograms
  ours, no backend attrs  the default with instrument(backend_attributes=False): no OpenInference/MLflow names
  ours, sampled out the provider's sampler is ALWAYS_OFF, a budget is active, metrics on: no span can record,
                 so none is made and this is the accounting station alone (pricing, reservation, settlement,
                 spend report, metrics); "sampled, no metrics" without the MeterProvider
  ours, ratio 0  the sampler is TraceIdRatioBased(0.0): every trace dropped, but the sampler is asked at each
                 trace's root (the SDK makes and drops a root span per program call), as for any ratio sampler
  openinference  openinference-instrumentation-dspy (if installed)
  genai-dspy     the official opentelemetry-instrumentation-genai-dspy (if installed; LM/tool/agent spans, no cost)
  SDK floor, 4/2 bare spans: nothing but empty spans where ours go (module or predictor, format, LM, parse; or
                 module/predictor and LM), made current, behind the same BatchSpanProcessor: what the OpenTelemetry
                 SDK alone costs for our span model, the part no instrumentation code can remove
  SDK floor, 2 spans+attrs  the same two spans carrying the attributes ours carry (captured from one real call):
                 what the SDK charges for the data itself (it validates and copies every attribute)
Each on one Predict and on a four-module program, against an in-process LM (no HTTP).
Prints microseconds per program call, the added overhead and our added overhead as a share of the others'.
"""

from __future__ import annotations

import argparse
import warnings

warnings.simplefilter("ignore")  # DSPy 3.4 deprecates BaseLM.forward(); the path is still what users run

import wrapt  # noqa: E402
from _common import FourModules, InProcessLM, Variant, batch_provider, dspy, interleaved, one_predict  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased  # noqa: E402

import otel_dspy_cost  # noqa: E402


def _shut(*providers) -> None:
    """Each variant's providers end with its turn: a BatchSpanProcessor left running keeps a worker thread
    (and a periodic metric reader its own) competing with the variants measured after it."""
    for provider in providers:
        if provider is not None:
            provider.shutdown()


def _ours(name="otel-dspy-cost", metrics=True, budget=True, processor=True, sampled=True, sampler=ALWAYS_OFF,
          **options):
    """instrument() with an SDK MeterProvider (metrics) and an active budget (budget); processor=False
    switches the BudgetSpanProcessor off, only to measure its share (benchmarks/breakdown.py);
    sampled=False puts `sampler` on the provider (ALWAYS_OFF: what the accounting station alone costs)."""
    state = {}

    def on():
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()]) if metrics else None
        provider = state["provider"] = batch_provider() if sampled else batch_provider(sampler=sampler)
        state["meter_provider"] = meter_provider
        otel_dspy_cost.instrument(tracer_provider=provider, meter_provider=meter_provider,
                                  unknown_model="warn", **options)
        if not processor:
            from otel_dspy_cost import _runtime

            _runtime.active().processor.enabled = False
        if budget:
            state["budget"] = otel_dspy_cost.budget(limit_usd=1e9, label="bench").__enter__()

    def off():
        if "budget" in state:
            state.pop("budget").__exit__(None, None, None)
        otel_dspy_cost.uninstrument()
        _shut(state.pop("provider"), state.pop("meter_provider"))

    return Variant(name, on, off)


def _from_instrumentor(name, factory):
    holder = {}

    def on():
        holder["i"] = factory()
        holder["provider"] = batch_provider()
        holder["i"].instrument(tracer_provider=holder["provider"])

    def off():
        holder.pop("i").uninstrument()
        _shut(holder.pop("provider"))

    return Variant(name, on, off)


def _our_attributes() -> dict[str, dict]:
    """The attributes instrument() (default options, a budget active) puts on one Predict call's spans, by span
    kind: what the SDK floor "+attrs" variant sets, so it charges the SDK's attribute handling for the same data."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
    try:
        with otel_dspy_cost.budget(limit_usd=1e9, label="bench"):
            one_predict()(question="what the spans carry")
    finally:
        otel_dspy_cost.uninstrument()
        provider.shutdown()
    return {span.attributes.get("dspy.span.kind"): dict(span.attributes) for span in exporter.get_finished_spans()}


def _sdk_floor(name: str, with_adapter: bool, attributes: bool = False) -> Variant:
    """Bare spans (no processor of ours) at the places ours go; with `attributes`, carrying our attributes."""
    targets = [(dspy.Module, "__call__"), (dspy.BaseLM, "__call__")]
    if with_adapter:
        targets += [(dspy.ChatAdapter, "format"), (dspy.ChatAdapter, "parse")]
    saved = []
    holder = {}

    def on():
        holder["provider"] = batch_provider()
        tracer = holder["provider"].get_tracer("sdk-floor")
        if "attrs" not in holder:  # captured once: it runs our instrumentation for one call
            holder["attrs"] = _our_attributes() if attributes else {}
        attrs = holder["attrs"]

        def span_around(wrapped, instance, args, kwargs):
            kind = "lm" if isinstance(instance, dspy.BaseLM) else "predictor"
            with tracer.start_as_current_span("floor", attributes=attrs.get(kind)):
                return wrapped(*args, **kwargs)

        for owner, attr in targets:
            saved.append((owner, attr, owner.__dict__[attr]))
            setattr(owner, attr, wrapt.FunctionWrapper(owner.__dict__[attr], span_around))

    def off():
        while saved:
            owner, attr, original = saved.pop()
            setattr(owner, attr, original)
        _shut(holder.pop("provider"))

    return Variant(name, on, off)


def variants() -> list[Variant]:
    out = [Variant("baseline", lambda: None, lambda: None), _ours(),
           _ours("ours, adapter spans", adapter_spans=True), _ours("ours, lean", adapter_spans=False),
           _ours("ours, no genai hist", genai_metrics=False),
           _ours("ours, no backend attrs", backend_attributes=False),
           _ours("ours, sampled out", sampled=False), _ours("sampled, no metrics", sampled=False, metrics=False),
           _ours("ours, ratio 0", sampled=False, sampler=TraceIdRatioBased(0.0)),
           _sdk_floor("SDK floor, 4 spans", True), _sdk_floor("SDK floor, 2 spans", False),
           _sdk_floor("SDK floor, 2 spans+attrs", False, attributes=True)]
    try:
        from openinference.instrumentation.dspy import DSPyInstrumentor as OpenInference

        out.append(_from_instrumentor("openinference", OpenInference))
    except ImportError:
        print("(openinference-instrumentation-dspy not installed: skipped)")
    try:
        from opentelemetry.instrumentation.genai.dspy import DSPyInstrumentor as GenAI

        out.append(_from_instrumentor("genai-dspy", GenAI))
    except ImportError:
        print("(opentelemetry-instrumentation-genai-dspy not installed: skipped)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="program calls per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dspy.configure(lm=InProcessLM())
    programs = {"one Predict": one_predict(), "4-module program": FourModules()}
    vs = variants()
    results = interleaved(vs, programs, args.calls, args.rounds)
    print(f"dspy {dspy.__version__}; {args.rounds} interleaved rounds x {args.calls} calls; median per program call")
    for pname in programs:
        base = results[(pname, "baseline")]
        print(f"\n{pname}: baseline {base * 1e6:,.0f} us/call")
        print(f"  {'variant':24s} {'us/call':>9s} {'added us':>9s} {'ratio':>6s}")
        added = {}
        for v in vs:
            t = results[(pname, v.name)]
            added[v.name] = t - base
            print(f"  {v.name:24s} {t * 1e6:9,.0f} {added[v.name] * 1e6:9,.0f} {t / base:6.2f}x")
        # genai-dspy wraps only dspy.LM.__call__ (no span for a BaseLM subclass like this LM, no cost):
        # a share of its near-zero overhead says nothing, so ours is compared with OpenInference's.
        if added.get("openinference", 0) > 0:
            for ours in ("otel-dspy-cost", "ours, adapter spans", "ours, lean"):
                print(f"  {ours} added overhead = {added[ours] / added['openinference']:.0%} of openinference's")
        print(f"  accounting alone (sampled out, budget active): {added['ours, sampled out'] * 1e6:,.0f} us with "
              f"metrics, {added['sampled, no metrics'] * 1e6:,.0f} us without")
        for ours, floor in (("otel-dspy-cost", "SDK floor, 2 spans"), ("ours, adapter spans", "SDK floor, 4 spans"),
                            ("ours, lean", "SDK floor, 2 spans"), ("otel-dspy-cost", "SDK floor, 2 spans+attrs")):
            print(f"  {ours}: {added[floor] * 1e6:,.0f} us of its {added[ours] * 1e6:,.0f} us are the SDK's own "
                  f"spans ({floor}); {(added[ours] - added[floor]) * 1e6:,.0f} us are ours")


if __name__ == "__main__":
    main()
