"""Memory over many LM calls with instrumentation on: RSS and Python heap must stay flat.

    python benchmarks/memory.py [--calls 100000]      # 1,000,000 for the full claim (~10 min here)

Runs the same number of calls uninstrumented first (DSPy's own growth, the baseline), then with
instrument() + an active budget + metrics. Prints RSS (MiB) and live Python objects at checkpoints,
and the instrumented growth minus the baseline growth.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings

warnings.simplefilter("ignore")

from _common import InProcessLM, batch_provider, dspy, rss_mb  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

import otel_dspy_cost  # noqa: E402


def run(lm: InProcessLM, calls: int, checkpoints: list[int], label: str,
        collect=None) -> dict[int, tuple[float, int]]:
    marks = {}
    for i in range(1, calls + 1):
        lm(f"memory question {i % 1000}")
        if collect is not None and i % 10_000 == 0:
            collect()  # as a PeriodicExportingMetricReader would (buffered histogram values are recorded then)
        if i in checkpoints:
            lm.history.clear()  # DSPy's own per-LM history is the user's to bound; not what we measure
            gc.collect()
            marks[i] = (rss_mb(), sys.getallocatedblocks())
            print(f"  {label:14s} {i:>9,d} calls  RSS {marks[i][0]:8.1f} MiB  heap blocks {marks[i][1]:>10,d}",
                  flush=True)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    # DSPy keeps a global history of the last 10,000 LM calls: growth is measured after it is full.
    warm = min(12_000, args.calls // 2)
    checkpoints = sorted({warm, args.calls // 2, args.calls} | ({100_000} if args.calls > 100_000 else set()))
    dspy.configure(lm=None)
    lm = InProcessLM()
    print(f"dspy {dspy.__version__}; {args.calls:,d} LM calls; growth measured from {warm:,d} calls")
    base = run(lm, args.calls, checkpoints, "uninstrumented")
    reader = InMemoryMetricReader()
    otel_dspy_cost.instrument(tracer_provider=batch_provider(), meter_provider=MeterProvider(metric_readers=[reader]),
                              unknown_model="warn")
    with otel_dspy_cost.budget(limit_usd=1e9, label="memory") as b:
        ours = run(lm, args.calls, checkpoints, "otel-dspy-cost", collect=reader.get_metrics_data)
    reader.get_metrics_data()
    base_growth = base[args.calls][0] - base[warm][0]
    our_growth = ours[args.calls][0] - ours[warm][0]
    print(f"\nRSS growth {warm:,d} -> {args.calls:,d} calls: uninstrumented {base_growth:+.1f} MiB, "
          f"otel-dspy-cost {our_growth:+.1f} MiB; attributable to instrumentation {our_growth - base_growth:+.1f} MiB")
    print(f"heap blocks growth: uninstrumented {base[args.calls][1] - base[warm][1]:+,d}, "
          f"otel-dspy-cost {ours[args.calls][1] - ours[warm][1]:+,d}")
    print(f"budget counted {b.call_count:,d} calls, ${b.spent_usd:.2f}")


if __name__ == "__main__":
    main()
