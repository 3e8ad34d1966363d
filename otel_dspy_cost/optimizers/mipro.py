"""MIPROv2: its stages and Optuna trials as spans, its LM roles, its estimate, and its `optuna` check.

Each Optuna trial is a trial (a trace of its own) through Optuna's public `Study.optimize` (the objective
wrapped), with the chosen instruction/demo indices and its score; the default-program evaluation before
the trials is trial 1; with minibatches, each periodic full evaluation is a trial of its own, as DSPy logs it;
the bootstrap and instruction-proposal stages are spans of their own (private methods, wrapped only where the
class defines them: tested on every supported DSPy version).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _runtime
from otel_dspy_cost.optimizers import projection, runs
from otel_dspy_cost.telemetry.spans import internal_error

NAMES = ("MIPROv2",)


def _full_evaluation_begin(instance: Any, args: tuple, kwargs: dict) -> Any:
    """MIPROv2 with minibatches runs a full evaluation of its best-averaging candidate every few trials, inside
    the Optuna objective of the trial before it, and logs it as a trial of its own (`trial_num + 1`, added to
    the study). It is a trial here too: numbered as DSPy logs it, `eval` = full, its calls its own."""
    run = runs.COMPILE_RUN.get()
    rt = _runtime.active()
    if run is None or rt is None:
        return None
    try:  # arguments by name: the private method's order is DSPy's to change
        bound = inspect.signature(instance._perform_full_evaluation).bind_partial(*args, **kwargs).arguments
        trial_num = bound.get("trial_num")
        if not isinstance(trial_num, int):
            return None
        number = trial_num + 1
        with run.lock:
            run.next_trial = max(run.next_trial, number + 1)
        opened = runs.open_trial(rt, run, f"trial {number}", number, "task_model", {A.OPTIMIZER_EVAL: "full"})
        runs.trial_record(run.name, number, eval_kind="full")
        return opened, bound.get("trial_logs"), number
    except Exception:
        internal_error("full evaluation trial start")
        return None


def _full_evaluation_end(state: Any, result: Any, exc: BaseException | None) -> None:
    opened, trial_logs, number = state
    attrs: dict[str, Any] = {}
    try:  # the score MIPROv2 logged for it (the method returns the best so far, not this one)
        logged = trial_logs.get(number) if isinstance(trial_logs, dict) else None
        if isinstance(logged, dict):
            attrs = _score(logged.get("full_eval_score"))
    except Exception:
        internal_error("full evaluation score")
    runs.close_trial(opened, exc, attrs)


METHOD_HOOKS = {"MIPROv2": {"_bootstrap_fewshot_examples": runs.stage_hooks("bootstrap", "teacher"),
                            "_propose_instructions": runs.stage_hooks("propose_instructions", "prompt_model"),
                            "_perform_full_evaluation": (_full_evaluation_begin, _full_evaluation_end)}}
CLI_NAMES = ("mipro-light", "mipro-medium", "mipro-heavy")


def lm_roles(optimizer: Any) -> list[tuple[Any, str]]:
    return [(getattr(optimizer, "prompt_model", None), "prompt_model"),
            (getattr(optimizer, "task_model", None), "task_model")]


def before_compile(instance: Any) -> None:
    """MIPROv2 imports optuna only after its bootstrap and proposal stages have spent money: say so first."""
    if type(instance).__name__ != "MIPROv2":
        return
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ImportError("MIPROv2 needs optuna, which it would import only after its first stages had spent "
                          "money: pip install 'otel-dspy-cost[mipro]' (or optuna)") from None


def public_patches(optimizer: Any) -> list[tuple[Any, str, Any]]:
    """(owner, attribute, wrapper) to apply when a MIPROv2 compiles: Optuna's public `Study.optimize`."""
    if type(optimizer).__name__ != "MIPROv2":
        return []
    try:
        import optuna
    except ImportError:
        return []
    return [(optuna.study.Study, "optimize", optuna_optimize)]


def optuna_optimize(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrap the objective of `Study.optimize` when it runs inside a compile: one trial (trace) per Optuna trial,
    numbered as MIPROv2 logs them (trial.number + 1; its default program, added first, is trial 1)."""
    run = runs.COMPILE_RUN.get()
    rt = _runtime.active()
    if run is None or rt is None:
        return wrapped(*args, **kwargs)
    func = kwargs.pop("func") if "func" in kwargs else args[0]
    rest = args[1:] if args and args[0] is func else args
    run.optuna_started = True
    n_trials = kwargs.get("n_trials")
    if isinstance(n_trials, int) and not isinstance(n_trials, bool):
        projection.plan(run, n_trials + 1)  # its default program's evaluation is trial 1

    def objective(trial: Any) -> Any:
        number = trial.number + 1
        with run.lock:
            run.next_trial = max(run.next_trial, number + 1)
        try:
            opened = runs.open_trial(rt, run, f"trial {number}", number, "task_model")
        except Exception:
            internal_error("trial span start")
            return func(trial)
        try:
            value = func(trial)
        except BaseException as exc:
            runs.close_trial(opened, exc, _params(trial))
            raise
        runs.close_trial(opened, None, {**_params(trial), **_score(value)})
        return value

    return wrapped(objective, *rest, **kwargs)


def _params(trial: Any) -> dict[str, Any]:
    try:
        return {f"{A.OPTIMIZER_PARAM_PREFIX}{name}": choice
                for name, choice in (getattr(trial, "params", None) or {}).items()
                if isinstance(choice, (int, float, str, bool))}
    except Exception:
        internal_error("trial params")
        return {}


def _score(value: Any) -> dict[str, Any]:
    return {A.OPTIMIZER_SCORE: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else {}


def from_cli(name: str, args: Any) -> tuple[str, dict[str, Any]] | None:
    """`mipro-light|medium|heavy` (and `mipro`, light) of `otel-dspy-cost estimate --optimizer`."""
    if not name.startswith("mipro"):
        return None
    auto = name.split("-", 1)[1] if "-" in name else "light"
    if name not in ("mipro", "mipro-light", "mipro-medium", "mipro-heavy"):
        return None  # `mipro-fast` is a typo, not a setting
    return "MIPROv2", {"auto": auto, "max_bootstrapped_demos": args.demos, "max_labeled_demos": args.demos}


def estimate_stages(optimizer: Any, name: str, trainset_size: int, valset_size: int | None, n_predictors: int,
                    stages: dict[str, dict[str, int]], notes: list[str]) -> None:
    """Program runs per stage: bootstrap sets, instruction proposals, the trials and full evaluations."""
    if valset_size is None:
        valset_size = min(1000, max(1, int(trainset_size * 0.8)))
        trainset_size -= valset_size
        notes.append("MIPROv2 splits 80% of the trainset off as its valset")
    auto = getattr(optimizer, "auto", None)
    settings = {"light": (6, 100), "medium": (12, 300), "heavy": (18, 1000)}.get(auto or "", None)
    zeroshot = getattr(optimizer, "max_bootstrapped_demos", 4) == 0 and getattr(optimizer, "max_labeled_demos",
                                                                               4) == 0
    if settings is not None:
        n, val_cap = settings
        valset_size = min(valset_size, val_cap)
        n_fewshot = n
        n_instruct = n if zeroshot else int(n * 0.5)
        n_vars = n_predictors * (1 if zeroshot else 2)
        trials = int(max(2 * n_vars * math.log2(n), 1.5 * n))
    else:
        n_fewshot = getattr(optimizer, "num_fewshot_candidates", None) or getattr(optimizer, "num_candidates", 6)
        n_instruct = getattr(optimizer, "num_instruct_candidates", None) or n_fewshot
        trials = getattr(optimizer, "num_trials", None) or 10
    minibatch_size = 35
    minibatch = valset_size > minibatch_size
    demos = getattr(optimizer, "max_bootstrapped_demos", 4)
    sets = max(0, n_fewshot - 2) if not zeroshot else 0  # seeds -1 .. n-3 bootstrap; -3, -2 do not
    stages["bootstrap"] = {"runs_low": sets * min(trainset_size, demos), "runs_high": sets * trainset_size,
                           "extra_calls": 0, "successes_wanted": demos, "sets": sets}
    # Instruction proposal: per predictor and candidate one proposal call, plus the program and
    # dataset summaries (about one call per 10 examples, at least two).
    summaries = max(2, math.ceil(trainset_size / 10)) + 2
    stages["propose_instructions"] = {"runs_low": 0, "runs_high": 0,
                                      "extra_calls_low": n_predictors * n_instruct + summaries,
                                      "extra_calls": 2 * (n_predictors * n_instruct + summaries)}
    per_trial = minibatch_size if minibatch else valset_size
    full_evals = (trials // 5 + 1) * valset_size if minibatch else 0
    # Every trial and every full evaluation runs (the point); a trial's program carries a few-shot candidate:
    # on average about half its bootstrapped demos per predictor (the sets range from none to all; the pilot
    # prices a demo). Labeled demos are the examples' own fields, short next to a bootstrapped answer: left out.
    stages["trials"] = {"runs_low": valset_size + trials * per_trial,
                        "runs_high": valset_size + trials * per_trial + full_evals, "extra_calls": 0,
                        "runs_point": valset_size + trials * per_trial + full_evals,
                        "demos": 0 if zeroshot else demos / 2, "new_instructions": 1.0}
    notes.append(f"MIPROv2: {trials} trials on {per_trial} examples, {n_instruct} instruction and "
                 f"{n_fewshot} few-shot candidates")
