"""Worker processes of a spawn or forkserver pool, counted against the parent's budget through a shared ledger.

A spawned child starts a fresh interpreter: no `instrument()`, no budget in its context, so its LM calls
would be outside every cap. `process_initializer` is the pool's initializer that fixes both, once per worker:
the budget is entered for the worker's lifetime (pool workers run their tasks in the thread that ran the
initializer), and a shared ledger makes the children and the parent one budget by label.
"""

from __future__ import annotations

from typing import Any

from otel_dspy_cost.budgets.budget import Budget, budget
from otel_dspy_cost.instrumentation.instrumentor import instrument

_worker_budget: list[Budget] = []  # entered for the process's lifetime; held so it is never collected


def process_initializer(ledger: str, label: str, limit_usd: float | None = None, **budget_options: Any) -> None:
    """`ProcessPoolExecutor(initializer=process_initializer, initargs=("sqlite:///b.db", "nightly", 5.0))`, or
    `multiprocessing.get_context("spawn").Pool(initializer=..., initargs=...)`: each worker instruments DSPy and
    enters `budget(limit_usd, label=label, ledger=ledger, **budget_options)`. Use the same ledger and label as
    the parent's budget: one cap for all of them."""
    if not isinstance(ledger, str) or "://" not in ledger or ledger.startswith("memory"):
        raise ValueError(f"process_initializer needs a shared ledger URL (sqlite:///... or redis://...), not "
                         f"{ledger!r}: an in-process budget cannot count another process's spend")
    instrument()
    b = budget(limit_usd, label=label, ledger=ledger, **budget_options)
    b.__enter__()
    _worker_budget.append(b)
