"""Budget bookkeeping under contention: 1, 4 and 16 threads making LM calls under one budget.

    python benchmarks/budget_contention.py [--calls-per-thread 300]

For each thread count, two timed runs in this process: instrumented without a budget (baseline) and
with a budget large enough never to trip (calls/s ratio = the bookkeeping's cost under contention);
then a run against a small cap that every thread hits: overshoot = spent - limit, which must be <= 0.
Last, the ledger alone (reserve + settle pairs per second from the same threads): how many times
faster the bookkeeping is than the calls it guards.
"""

from __future__ import annotations

import argparse
import threading
import time
import warnings

warnings.simplefilter("ignore")

from _common import InProcessLM, batch_provider, dspy  # noqa: E402

import otel_dspy_cost  # noqa: E402


def hammer(lm: InProcessLM, threads: int, calls: int, budget=None) -> tuple[float, int]:
    """(calls per second, calls made); each thread stops at `calls` or at the budget stop."""
    made = [0] * threads
    ctx_budget = budget

    def worker(k: int) -> None:
        def loop():
            for i in range(calls):
                try:
                    lm(f"thread {k} call {i}")
                except otel_dspy_cost.BudgetExceededError:
                    return
                made[k] += 1

        if ctx_budget is None:
            loop()
        else:
            with ctx_budget:
                loop()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return sum(made) / elapsed, sum(made)


def ledger_throughput(threads: int, ops: int) -> float:
    """reserve+settle pairs per second on one budget's ledger from `threads` threads: the bookkeeping alone."""
    guard = otel_dspy_cost.budget(limit_usd=1e9, label=f"ledger-{threads}")
    ledger, account = guard.ledger, guard.account

    def worker() -> None:
        for _ in range(ops):
            ledger.settle(ledger.reserve([account], 0.001, "infer"), 0.0005, 0.0005)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return threads * ops / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls-per-thread", type=int, default=300)
    args = parser.parse_args()
    otel_dspy_cost.instrument(tracer_provider=batch_provider(), unknown_model="warn")
    lm = InProcessLM(max_tokens=64)
    lm("warm up")
    print(f"dspy {dspy.__version__}; {args.calls_per_thread} calls per thread")
    print(f"{'threads':>7s} {'no budget c/s':>14s} {'budget c/s':>11s} {'ratio':>6s} {'cap $':>9s} "
          f"{'spent $':>10s} {'overshoot $':>12s} {'calls':>6s} {'ledger ops/s':>13s} {'ops/call rate':>13s}")
    for threads in (1, 4, 16):
        frees, budgeteds = [], []
        for _ in range(3):  # interleaved, medians: the machine is noisy
            frees.append(hammer(lm, threads, args.calls_per_thread)[0])
            big = otel_dspy_cost.budget(limit_usd=1e9, label=f"big-{threads}")
            budgeteds.append(hammer(lm, threads, args.calls_per_thread, big)[0])
        free, budgeted = sorted(frees)[1], sorted(budgeteds)[1]
        per_call = big.spent_usd / max(big.call_count, 1)
        cap = per_call * threads * args.calls_per_thread / 2  # about half the calls fit
        small = otel_dspy_cost.budget(limit_usd=cap, label=f"cap-{threads}")
        _, made = hammer(lm, threads, args.calls_per_thread, small)
        overshoot = small.spent_usd - cap
        ops = ledger_throughput(threads, 2000)
        print(f"{threads:>7d} {free:14.0f} {budgeted:11.0f} {budgeted / free:6.2f} {cap:9.5f} "
              f"{small.spent_usd:10.6f} {overshoot:12.6f} {made:6d} {ops:13.0f} {ops / budgeted:12.1f}x")
        assert overshoot <= 1e-12, "a budget overshot its cap"


if __name__ == "__main__":
    main()
