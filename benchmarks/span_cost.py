"""What one span costs in the OpenTelemetry SDK itself, with and without our processor.

    python benchmarks/span_cost.py [--spans 20000]

Start + end of a span with five attributes (like our module spans): on a bare TracerProvider (the
baseline), behind a BatchSpanProcessor with a no-op exporter, and with BudgetSpanProcessor added. A
DSPy Predict call makes 4 such spans (2 with `instrument(adapter_spans=False)`).
"""

from __future__ import annotations

import argparse
import gc
import time

from _common import batch_provider
from opentelemetry.sdk.trace import TracerProvider

from otel_dspy_cost.telemetry.processor import BudgetSpanProcessor

ATTRS = {"dspy.span.kind": "module", "dspy.module.path": "Agent.step", "dspy.phase": "infer",
         "dspy.instrumentation": "otel-dspy-cost", "dspy.module.class": "Predict"}


def per_span(provider: TracerProvider, n: int) -> float:
    tracer = provider.get_tracer("bench")
    start = time.perf_counter()
    for _ in range(n):
        tracer.start_span("module Agent.step", attributes=ATTRS).end()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20000)
    args = parser.parse_args()
    ours = batch_provider()
    ours.add_span_processor(BudgetSpanProcessor())
    rows = [("bare TracerProvider", TracerProvider()), ("+ BatchSpanProcessor", batch_provider()),
            ("+ BudgetSpanProcessor", ours)]
    base = None
    for name, provider in rows:
        per_span(provider, 500)
        t = per_span(provider, args.spans)
        base = base or t
        print(f"{name:24s} {t * 1e6:7.1f} us/span  {t / base:5.2f}x")
    # Why the batch processor costs more than its code: spans waiting in its export queue survive young
    # garbage collections, so the collector has more to walk. Shown, not changed (it is the SDK's design).
    provider = batch_provider()
    per_span(provider, 500)
    gc.disable()
    try:
        t = per_span(provider, args.spans)
    finally:
        gc.enable()
    print(f"{'+ Batch, gc disabled':24s} {t * 1e6:7.1f} us/span  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
