"""`guarded_compile()`: run an optimizer under a budget and keep the best program found so far.

A budget stop is a `BaseException` that unwinds through the optimizer, so its own `best_program`
local is lost. The trial hooks (`_optimizers.CompileRun`) remember every candidate evaluated in full
and its score as the run goes; when the stop arrives this returns the best of them:

- MIPROv2 (and anything else evaluating candidates with `Evaluate`): the best-scoring candidate
  evaluated on the full validation set, the default program (trial 0) included;
- GEPA: stopped gracefully through a GEPA stop callback before an iteration the budget cannot
  afford, so GEPA itself returns its best candidate; if the hard stop still lands mid-iteration, the
  best valset candidate seen is rebuilt onto the student;
- BootstrapFewShot: the student with the demos bootstrapped so far.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from . import _optimizers
from .budget import Budget, BudgetExceededError
from .budget import budget as _make_budget

logger = logging.getLogger("otel_dspy_cost")


class NothingUsableError(RuntimeError):
    """The budget stopped the compile before any candidate was evaluated or any demo gathered."""


@dataclasses.dataclass
class CompileResult:
    """What `guarded_compile()` returns. `program` is ready to use, `save()` and `load()`."""

    program: Any
    cut_short: bool
    reason: str | None  # "budget_exceeded" when cut short
    spent_usd: float
    calls: int
    best_score: float | None
    best_trial: int | None
    trials_evaluated: int
    budget: Budget
    error: BudgetExceededError | None = None


class _GEPABudgetStopper:
    """GEPA stop callback: stop before an iteration the budget cannot afford (GEPA then returns its best).

    Learned from the run itself: an iteration can cost as much as the costliest one so far (times a
    margin), and at its last call the budget must still fit the largest single reservation seen.
    """

    def __init__(self, guard: Budget, margin: float = 1.5):
        self.guard, self.margin = guard, margin
        self.last_spent = 0.0
        self.worst_iteration = 0.0
        self.stopped = False

    def __call__(self, gepa_state: Any) -> bool:
        spent = self.guard.spent_usd
        self.worst_iteration = max(self.worst_iteration, spent - self.last_spent)
        self.last_spent = spent
        remaining = self.guard.remaining_usd
        needed = self.worst_iteration * self.margin + self.guard.max_reserved_usd
        if remaining is not None and remaining < needed:
            self.stopped = True
            logger.warning("guarded_compile: budget %r has $%.6f left, less than one more GEPA iteration may "
                           "need ($%.6f): stopping GEPA with its best candidate", self.guard.label, remaining, needed)
            return True
        return False


def guarded_compile(optimizer: Any, program: Any, *, budget: float | Budget, **compile_kwargs: Any) -> CompileResult:
    """Compile `program` with `optimizer` under a budget; on a budget stop, return the best so far.

    `budget` is a USD limit (a budget labelled `compile-<Optimizer>` is made) or a `Budget` from
    `otel_dspy_cost.budget(...)`. Raises `NothingUsableError` only when the stop came before anything
    usable existed; any other error of the compile propagates unchanged.
    """
    guard = budget if isinstance(budget, Budget) else _make_budget(
        limit_usd=float(budget), label=f"compile-{type(optimizer).__name__}")
    stopper = _attach_gepa_stopper(optimizer, guard)
    before = _optimizers.ended_count()
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
        best = _best_program(run, optimizer, program)
        if best is None:
            raise NothingUsableError(f"budget {guard.label!r} stopped {type(optimizer).__name__} before any "
                                     f"candidate was evaluated (spent ${guard.spent_usd:.6f})") from stop
        return CompileResult(best, True, "budget_exceeded", guard.spent_usd, guard.call_count,
                             run.best_score if run else None, run.best_trial if run else None,
                             run.trials if run else 0, guard, stop)
    finally:
        if stopper is not None:
            stopper[1]()


def _run_since(before: int) -> _optimizers.CompileRun | None:
    """The outermost compile that ended since `before` (nested compiles end first)."""
    runs = _optimizers.ended_since(before)
    return runs[-1] if runs else None


def _best_program(run: _optimizers.CompileRun | None, optimizer: Any, program: Any) -> Any:
    if run is not None and run.best_program is not None:
        best = run.best_program.deepcopy()
        best._compiled = True
        return best
    if run is not None and run.gepa_best is not None:
        student = program.deepcopy()
        for name, predictor in student.named_predictors():
            if name in run.gepa_best[1]:
                predictor.signature = predictor.signature.with_instructions(run.gepa_best[1][name])
        student._compiled = True
        return student
    traces = getattr(optimizer, "name2traces", None)
    student = getattr(optimizer, "student", None)
    if traces and student is not None and any(traces.values()):
        student = student.deepcopy()
        limit = getattr(optimizer, "max_bootstrapped_demos", None)
        for name, predictor in student.named_predictors():
            predictor.demos = list(traces.get(name, []))[:limit]
        student._compiled = True
        return student
    return None


def _attach_gepa_stopper(optimizer: Any, guard: Budget):
    kwargs = getattr(optimizer, "gepa_kwargs", None)
    if not isinstance(kwargs, dict) or type(optimizer).__name__ != "GEPA":
        return None
    stopper = _GEPABudgetStopper(guard)
    had, before = "stop_callbacks" in kwargs, kwargs.get("stop_callbacks")
    existing = [] if before is None else list(before) if isinstance(before, (list, tuple)) else [before]
    kwargs["stop_callbacks"] = [*existing, stopper]

    def undo() -> None:
        if had:
            kwargs["stop_callbacks"] = before
        else:
            kwargs.pop("stop_callbacks", None)

    return stopper, undo
