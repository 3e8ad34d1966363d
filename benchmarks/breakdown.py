"""Where our overhead per one-Predict call goes: the product built up piece by piece, in one process.

    python benchmarks/breakdown.py [--calls 200] [--rounds 15]

Steps, interleaved round by round (medians), each adding one piece to the one before:
  baseline              uninstrumented DSPy
  SDK floor, 2 spans    empty spans where ours go (predictor, LM; no attributes, no processor of ours)
  our spans             instrument() with the BudgetSpanProcessor switched off: wrappers, attributes, cost
  + processor           roll-ups, spend aggregator (no budget active, no MeterProvider)
  + budget              an active budget: reservation before the call, settlement after
  + metrics             an SDK MeterProvider: GenAI histograms, cost sums (= the full product)
Then the cost of one `CostMetrics.record_call` (what the processor feeds per LM call) with an SDK
MeterProvider and with the API's no-op one.
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.simplefilter("ignore")  # DSPy 3.4 deprecates BaseLM.forward(); the path is still what users run

from _common import InProcessLM, Variant, dspy, interleaved, one_predict  # noqa: E402
from opentelemetry import metrics  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from overhead import _ours, _sdk_floor  # noqa: E402

from otel_dspy_cost.telemetry.metrics import CostMetrics  # noqa: E402


def record_call_us(meter_provider, n: int) -> float:
    cm = CostMetrics.create(meter_provider)
    kw = dict(module="Predict", model="openai/gpt-4o-mini", provider="openai", operation="chat", phase="infer",
              budget_label="bench", optimizer="", usd=0.001, economic_usd=0.001, input_tokens=100,
              output_tokens=20, cache_hit=False, unknown=False, duration_s=0.0004)
    for _ in range(200):
        cm.record_call(**kw)
    start = time.perf_counter()
    for _ in range(n):
        cm.record_call(**kw)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="program calls per step per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    dspy.configure(lm=InProcessLM())
    steps = [Variant("baseline", lambda: None, lambda: None), _sdk_floor("SDK floor, 2 spans", False),
             _ours("our spans", processor=False, budget=False, metrics=False),
             _ours("+ processor", budget=False, metrics=False),
             _ours("+ budget", metrics=False),
             _ours("+ metrics (full)")]
    results = interleaved(steps, {"one Predict": one_predict()}, args.calls, args.rounds)
    base = results[("one Predict", "baseline")]
    print(f"dspy {dspy.__version__}; one Predict; {args.rounds} interleaved rounds x {args.calls} calls; medians")
    print(f"  {'step':20s} {'added us':>9s} {'this step':>10s}")
    previous = 0.0
    for step in steps[1:]:
        added = (results[("one Predict", step.name)] - base) * 1e6
        delta = added if step.name.startswith("SDK") else added - previous
        print(f"  {step.name:20s} {added:9,.0f} {delta:+10,.0f}")
        if not step.name.startswith("SDK"):
            previous = added
    n = max(args.calls * 10, 1000)
    sdk = record_call_us(MeterProvider(metric_readers=[InMemoryMetricReader()]), n)
    noop = record_call_us(metrics.NoOpMeterProvider(), n)
    print(f"\nCostMetrics.record_call per LM call: SDK MeterProvider {sdk:.1f} us, no-op provider {noop:.1f} us")


if __name__ == "__main__":
    main()
