"""`guarded_compile()`: run an optimizer under a budget and keep the best program found so far.

A budget stop is a `BaseException` that unwinds through the optimizer, so its own `best_program`
local is lost. The trial hooks (`runs.CompileRun`) remember every candidate evaluated in full and
its score as the run goes; when the stop arrives this returns the best of them (each optimizer's own
way of recovering, and of stopping gracefully, is in its module: `registry`):

- MIPROv2 (and anything else evaluating candidates with `Evaluate`): the best-scoring candidate
  evaluated on the full validation set, the default program (trial 0) included;
- GEPA: stopped gracefully through a GEPA stop callback before an iteration the budget cannot
  afford, so GEPA itself returns its best candidate; if the hard stop still lands mid-iteration, the
  best valset candidate seen is rebuilt onto the student;
- BootstrapFewShot: the student with the demos bootstrapped so far.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from otel_dspy_cost.budgets.budget import Budget
from otel_dspy_cost.budgets.budget import budget as _make_budget
from otel_dspy_cost.errors import BudgetExceededError, NothingUsableError
from otel_dspy_cost.optimizers import registry as optimizers
from otel_dspy_cost.optimizers import runs as optimizer_runs


@dataclasses.dataclass
class CompileResult:
    """What `guarded_compile()` returns. `program` is ready to use, `save()` and `load()`."""

    program: Any
    cut_short: bool
    reason: str | None  # "budget_exceeded" when cut short; "projected_overrun" (stop_on_projection)
    spent_usd: float
    calls: int
    best_score: float | None
    best_trial: int | None
    trials_evaluated: int
    budget: Budget
    error: BudgetExceededError | None = None


def guarded_compile(optimizer: Any, program: Any, *, budget: float | Budget, **compile_kwargs: Any) -> CompileResult:
    """Compile `program` with `optimizer` under a budget; on a budget stop, return the best so far.

    `budget` is a USD limit (a budget labelled `compile-<Optimizer>` is made) or a `Budget` from
    `otel_dspy_cost.budget(...)`. Raises `NothingUsableError` only when the stop came before anything
    usable existed; any other error of the compile propagates unchanged.
    """
    guard = budget if isinstance(budget, Budget) else _make_budget(
        limit_usd=float(budget), label=f"compile-{type(optimizer).__name__}")
    stopper = optimizers.guard(optimizer, guard)  # a graceful stop, where the optimizer has one (GEPA)
    before = optimizer_runs.ended_count()
    try:
        with guard:
            compiled = optimizer.compile(program, **compile_kwargs)
        run = _run_since(before)
        cut = stopper is not None and stopper[0].stopped
        return CompileResult(compiled, cut, "budget_exceeded" if cut else None, guard.spent_usd, guard.call_count,
                             run.best_score if run else getattr(compiled, "score", None),
                             run.best_trial if run else None, run.trials if run else 0, guard)
    except BudgetExceededError as stop:
        if stop.label != guard.label:  # an enclosing budget stopped the run: that stop is not ours to absorb
            raise
        run = _run_since(before)
        best = optimizers.recover_best(run, optimizer, program)
        if best is None:
            raise NothingUsableError(f"budget {guard.label!r} stopped {type(optimizer).__name__} before any "
                                     f"candidate was evaluated (spent ${guard.spent_usd:.6f})") from stop
        reason = "projected_overrun" if stop.reason == "projected_overrun" else "budget_exceeded"
        return CompileResult(best, True, reason, guard.spent_usd, guard.call_count,
                             run.best_score if run else None, run.best_trial if run else None,
                             run.trials if run else 0, guard, stop)
    finally:
        if stopper is not None:
            stopper[1]()


def _run_since(before: int) -> optimizer_runs.CompileRun | None:
    """The outermost compile that ended since `before` (nested compiles end first)."""
    runs = optimizer_runs.ended_since(before)
    return runs[-1] if runs else None
