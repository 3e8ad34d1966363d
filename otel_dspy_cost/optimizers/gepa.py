"""GEPA: iterations as trials through its public callbacks, the reflection LM's role, the estimate, a
graceful stop before an iteration the budget cannot afford, and its best candidate when a stop lands.

A GEPA callback (its public `gepa_kwargs={"callbacks": ...}`) makes a trial per iteration with the selected
parent candidate, the new candidate, its score and whether it was accepted; LM calls made while GEPA
proposes new instructions carry `dspy.lm.role = reflection`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _runtime
from otel_dspy_cost.optimizers import projection, runs
from otel_dspy_cost.telemetry.spans import internal_error

if TYPE_CHECKING:
    from otel_dspy_cost.budgets.budget import Budget

logger = logging.getLogger("otel_dspy_cost")

NAMES = ("GEPA",)
CLI_NAMES = ("gepa",)


def lm_roles(optimizer: Any) -> list[tuple[Any, str]]:
    return [(getattr(optimizer, "reflection_lm", None), "reflection")]


class _GEPAObserver:
    """A GEPA callback (gepa.core.callbacks.GEPACallback protocol): a trial (trace) per iteration.

    Trials follow our one numbering (the baseline evaluation of the seed program is trial 1, so GEPA's
    iteration N is trial N+1); `dspy.optimizer.iteration` keeps GEPA's own number, as its log prints it.
    GEPA skips `on_iteration_end` on some paths (no proposal, a merge that replaces the reflective step):
    an iteration still open is closed when the next starts or the optimization ends."""

    def __init__(self, run: runs.CompileRun):
        self.run = run
        self.trial: runs.OpenTrial | None = None
        self.proposal = None

    def on_iteration_start(self, event: dict) -> None:
        try:  # the metric calls used so far, before the last iteration closes and projects with them
            projection.units(self.run, int(getattr(event.get("state"), "total_num_evals", 0) or 0),
                             getattr(self.run.optimizer, "max_metric_calls", None))
        except Exception:
            internal_error("GEPA progress")
        self._close()
        rt = _runtime.active()
        if rt is None:
            return
        try:
            iteration = int(event["iteration"])
            number = runs.next_trial(self.run)
            self.trial = runs.open_trial(rt, self.run, f"iteration {iteration}", number, None,
                                         {A.OPTIMIZER_ITERATION: iteration})
        except Exception:
            internal_error("GEPA iteration start")

    def on_candidate_selected(self, event: dict) -> None:
        if self.trial is not None:
            self.trial.set({A.OPTIMIZER_PARENT: int(event["candidate_idx"])})

    def on_proposal_start(self, event: dict) -> None:
        state = _context.current()
        self.proposal = _context.var().set(dataclasses.replace(state, lm_role="reflection"))

    def on_proposal_end(self, event: dict) -> None:
        if self.proposal is not None:
            _context.var().reset(self.proposal)
            self.proposal = None

    def on_candidate_accepted(self, event: dict) -> None:
        if self.trial is not None:
            self.trial.set({A.OPTIMIZER_CANDIDATE: int(event["new_candidate_idx"]),
                            A.OPTIMIZER_SCORE: float(event["new_score"]), A.OPTIMIZER_ACCEPTED: True})

    def on_candidate_rejected(self, event: dict) -> None:
        if self.trial is not None:
            self.trial.set({A.OPTIMIZER_SCORE: float(event["new_score"]), A.OPTIMIZER_ACCEPTED: False})

    def on_valset_evaluated(self, event: dict) -> None:
        score = float(event["average_score"])
        best = self.run.gepa_best
        if best is None or score > best[0]:
            self.run.gepa_best = (score, dict(event["candidate"]))
            self.run.best_score = score
            self.run.best_trial = self.trial.number if self.trial is not None else 1

    def on_iteration_end(self, event: dict) -> None:
        self._close()

    def on_optimization_end(self, event: dict) -> None:
        self._close()

    def _close(self) -> None:
        self.on_proposal_end({})
        trial, self.trial = self.trial, None
        if trial is not None:
            runs.close_trial(trial)

    def __getattr__(self, name: str) -> Any:  # every other event of the protocol: nothing to do
        if name.startswith("on_"):
            return lambda event: None
        raise AttributeError(name)


def on_compile(optimizer: Any, run: runs.CompileRun):
    """Add our callback to a dspy.GEPA's gepa_kwargs for this compile; returns the undo, or None."""
    kwargs = getattr(optimizer, "gepa_kwargs", None)
    if not isinstance(kwargs, dict) or type(optimizer).__name__ != "GEPA":
        return None
    had = "callbacks" in kwargs
    before = kwargs.get("callbacks")
    kwargs["callbacks"] = [*(before or []), _GEPAObserver(run)]

    def undo() -> None:
        if had:
            kwargs["callbacks"] = before
        else:
            kwargs.pop("callbacks", None)

    return undo


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


def guard(optimizer: Any, budget: Budget) -> tuple[_GEPABudgetStopper, Callable[[], None]] | None:
    """Stop GEPA gracefully before an iteration `budget` cannot afford; returns (stopper, undo), or None."""
    kwargs = getattr(optimizer, "gepa_kwargs", None)
    if not isinstance(kwargs, dict) or type(optimizer).__name__ != "GEPA":
        return None
    stopper = _GEPABudgetStopper(budget)
    had, before = "stop_callbacks" in kwargs, kwargs.get("stop_callbacks")
    existing = [] if before is None else list(before) if isinstance(before, (list, tuple)) else [before]
    kwargs["stop_callbacks"] = [*existing, stopper]

    def undo() -> None:
        if had:
            kwargs["stop_callbacks"] = before
        else:
            kwargs.pop("stop_callbacks", None)

    return stopper, undo


def recover_best(run: runs.CompileRun | None, optimizer: Any, program: Any) -> Any:
    """The best valset candidate GEPA reported, rebuilt onto the student (a hard stop mid-iteration)."""
    if run is not None and run.gepa_best is not None:
        student = program.deepcopy()
        for name, predictor in student.named_predictors():
            if name in run.gepa_best[1]:
                predictor.signature = predictor.signature.with_instructions(run.gepa_best[1][name])
        student._compiled = True
        return student
    return None


def from_cli(name: str, args: Any) -> tuple[str, dict[str, Any]] | None:
    if name != "gepa":
        return None
    return "GEPA", {"max_metric_calls": args.max_metric_calls}


def estimate_stages(optimizer: Any, name: str, trainset_size: int, valset_size: int | None, n_predictors: int,
                    stages: dict[str, dict[str, int]], notes: list[str]) -> None:
    """Rollouts from the metric-call budget (GEPA may pass it by one iteration), one reflection each."""
    budget_calls = getattr(optimizer, "max_metric_calls", None)
    if budget_calls is None:
        budget_calls = 400 * n_predictors
        notes.append("GEPA without max_metric_calls: assumed 400 metric calls per predictor")
    reflections = math.ceil(budget_calls / 3)  # one reflection per iteration on a minibatch of 3
    # GEPA checks its budget between iterations, so the last one may pass it; the seed's valset
    # evaluation comes on top.
    # The point: GEPA spends its metric-call budget (each call one program run); an iteration evaluates the
    # current candidate and the proposed one on a minibatch of 3 and reflects once in between.
    val = valset_size or trainset_size
    stages["rollouts"] = {"runs_low": budget_calls // 2,
                          "runs_high": int(budget_calls * 1.25) + val, "extra_calls": 0,
                          "runs_point": budget_calls, "new_instructions": 1.0}
    stages["reflection"] = {"runs_low": 0, "runs_high": 0, "extra_calls": reflections,
                            "extra_calls_point": max(1, math.ceil((budget_calls - val) / 6))}
    notes.append("GEPA: each metric call is one program run; one reflection call per iteration")
