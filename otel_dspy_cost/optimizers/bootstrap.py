"""BootstrapFewShot (and RandomSearch): bootstrap attempts as spans, the teacher's LM role, the estimate,
and the demos gathered so far as the program `guarded_compile()` returns when a budget stops it.

Each `_bootstrap_one_example` attempt is a span with its round and success (a private method, wrapped only
where the class defines it: tested on every supported DSPy version).
"""

from __future__ import annotations

from typing import Any

from otel_dspy_cost import _attributes as A
from otel_dspy_cost.optimizers import projection, runs
from otel_dspy_cost.telemetry.spans import internal_error

NAMES = ("BootstrapFewShot", "BootstrapFewShotWithRandomSearch")
CLI_NAMES = ("bootstrap",)


def lm_roles(optimizer: Any) -> list[tuple[Any, str]]:
    return [((getattr(optimizer, "teacher_settings", None) or {}).get("lm"), "teacher")]


def _bootstrap_begin(instance: Any, args: tuple, kwargs: dict) -> Any:
    try:
        example = kwargs.get("example", args[0] if args else None)
        round_idx = kwargs.get("round_idx", args[1] if len(args) > 1 else 0)
        trainset = getattr(instance, "trainset", None) or []
        index = next((i for i, e in enumerate(trainset) if e is example), -1)
        return runs.open_role_span("bootstrap example", {
            A.SPAN_KIND: "bootstrap", A.OPTIMIZER_NAME: type(instance).__name__, A.OPTIMIZER_ROUND: int(round_idx),
            A.OPTIMIZER_EXAMPLE: index}, "teacher")
    except Exception:
        internal_error("bootstrap span start")
        return None


def _bootstrap_end(state: tuple[Any, Any, Any], result: Any, exc: BaseException | None) -> None:
    if exc is None:
        state[0].set_attribute(A.OPTIMIZER_SUCCESS, bool(result))
    runs.close_role_span(state, result, exc)


BOOTSTRAP_ATTEMPT = (_bootstrap_begin, _bootstrap_end)


METHOD_HOOKS = {"BootstrapFewShot": {"_bootstrap_one_example": BOOTSTRAP_ATTEMPT}}


def on_compile(optimizer: Any, run: runs.CompileRun) -> None:
    """A random search's schedule, for its projection: one unit per candidate seed, `range(-3, num_candidate_sets)`
    as DSPy iterates it."""
    sets = getattr(optimizer, "num_candidate_sets", None)
    if type(optimizer).__name__ == "BootstrapFewShotWithRandomSearch" and isinstance(sets, int):
        projection.units(run, 0, sets + 3, per_trial=True)


def from_cli(name: str, args: Any) -> tuple[str, dict[str, Any]] | None:
    if name != "bootstrap":
        return None
    return "BootstrapFewShot", {"max_bootstrapped_demos": args.demos, "max_rounds": 1}


def estimate_stages(optimizer: Any, name: str, trainset_size: int, valset_size: int | None, n_predictors: int,
                    stages: dict[str, dict[str, int]], notes: list[str]) -> None:
    """Low: the demos found at once; high: every example tried in every round (and each candidate set)."""
    demos = getattr(optimizer, "max_bootstrapped_demos", 4)
    rounds = getattr(optimizer, "max_rounds", 1)
    low = min(trainset_size, demos)
    high = trainset_size * rounds
    if name == "BootstrapFewShotWithRandomSearch":
        candidates = getattr(optimizer, "num_candidate_sets", 16) + 3
        val = valset_size if valset_size is not None else trainset_size
        stages["bootstrap"] = {"runs_low": low * (candidates - 3), "runs_high": high * (candidates - 3),
                               "extra_calls": 0, "successes_wanted": demos, "sets": candidates - 3}
        stages["candidates"] = {"runs_low": val * candidates, "runs_high": val * candidates, "extra_calls": 0,
                                "demos": demos / 2}
    else:
        # a pilot's metric pass rate p makes the point: demos / p tries (every example at most, each round)
        stages["bootstrap"] = {"runs_low": low, "runs_high": high, "extra_calls": 0, "successes_wanted": demos}


def recover_best(run: runs.CompileRun | None, optimizer: Any, program: Any) -> Any:
    """The student with the demos bootstrapped so far (any optimizer keeping BootstrapFewShot's `name2traces`)."""
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
