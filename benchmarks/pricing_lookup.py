"""Cost computation and pricing lookup per call, against the cost of one DSPy Predict call.

    python benchmarks/pricing_lookup.py [--n 200000]

Lookups are cached per (model, time, tier, version); the first lookup of a model walks the catalog.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import warnings

warnings.simplefilter("ignore")

from _common import MODEL, InProcessLM, dspy, one_predict, time_per_call  # noqa: E402

from otel_dspy_cost.pricing.cost import Usage, compute_cost  # noqa: E402
from otel_dspy_cost.pricing.engine import CostEngine  # noqa: E402
from otel_dspy_cost.pricing.resolver import PricingResolver  # noqa: E402


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    dspy.configure(lm=InProcessLM())
    program = one_predict()
    predict = time_per_call(lambda i: program(question=f"q {i}"), 500)

    resolver = PricingResolver(use_litellm=False)
    start = time.perf_counter()
    resolver.lookup(MODEL, when=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    first = time.perf_counter() - start
    engine = CostEngine(resolver, unknown_model="warn")
    usage = Usage(1200, 300, 1024, 0, 0)
    entry = engine.entry_for(MODEL)
    rows = [
        ("first lookup (uncached, walks catalog)", first),
        ("lookup, cached", per_call(lambda: resolver.lookup(MODEL), args.n)),
        ("compute_cost (entry in hand)", per_call(lambda: compute_cost(usage, entry), args.n)),
        ("CostEngine.cost (lookup + compute)", per_call(lambda: engine.cost(MODEL, usage), args.n)),
        ("CostEngine.worst_case (reservation)", per_call(lambda: engine.worst_case(MODEL, 1500, 512), args.n)),
    ]
    print(f"dspy {dspy.__version__}; baseline: one uninstrumented Predict call = {predict * 1e6:,.0f} us")
    print(f"  {'operation':40s} {'us/call':>9s} {'share of a Predict call':>24s}")
    for name, seconds in rows:
        print(f"  {name:40s} {seconds * 1e6:9.2f} {seconds / predict:24.3%}")


if __name__ == "__main__":
    main()
