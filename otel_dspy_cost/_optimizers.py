"""What an optimizer run is made of: trials, stages, bootstrap attempts, LM roles, best-so-far.

One `CompileRun` per optimizer `compile` (held in a ContextVar and carried into DSPy's worker
threads) numbers the trials and remembers the best candidate evaluated so far, which is what
`guarded_compile()` returns when a budget stops the run. Hooks, all feature-detected:

- MIPROv2: each Optuna trial is a span (Optuna's public `Study.optimize`, objective wrapped), with the
  chosen instruction/demo indices and minibatch vs full; the default-program evaluation before the
  trials is trial 0; the bootstrap and instruction-proposal stages are spans of their own.
- Any `Evaluate` inside a compile and outside a trial is a trial of its own (RandomSearch candidates,
  MIPROv2's baseline and periodic full evaluations).
- BootstrapFewShot: each `_bootstrap_one_example` attempt is a span with its round and success.
- GEPA: a GEPA callback (its public `gepa_kwargs={"callbacks": ...}`) makes a span per iteration with the
  selected parent candidate, the new candidate, its score and whether it was accepted; LM calls made
  while GEPA proposes new instructions carry `dspy.lm.role = reflection`.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link

from . import _attributes as A
from . import _context, _runtime
from ._spans import finish, finish_detached, internal_error, start, unsampled


@dataclasses.dataclass
class CompileRun:
    name: str
    optimizer: Any
    student: Any = None
    next_trial: int = 1  # 1-based, as MIPROv2 logs them: its default-program evaluation is trial 1
    optuna_started: bool = False
    last_trial: int | None = None
    best_score: float | None = None
    best_program: Any = None
    best_trial: int | None = None
    trials: int = 0
    roles: dict[int, str] = dataclasses.field(default_factory=dict)
    gepa_best: tuple[float, dict[str, str]] | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def record(self, program: Any, score: float | None, trial: int | None, full: bool) -> None:
        """A candidate was evaluated: keep it if it is the best full evaluation so far."""
        if score is None or not full or program is None:
            return
        with self.lock:
            self.trials += 1
            if self.best_score is None or score > self.best_score:
                self.best_score, self.best_program, self.best_trial = score, program, trial


COMPILE_RUN = _context.COMPILE_RUN  # the CompileRun of the compile running here
TRIAL_SPAN = _context.TRIAL_SPAN
# Runs that ended, numbered, newest last (the last few only), so guarded_compile can find the one it started.
_finished: list[tuple[int, CompileRun]] = []
_ended = 0


def _roles_of(optimizer: Any) -> dict[int, str]:
    """LM instance -> role, from the optimizer's own attributes; an LM in two roles is left out."""
    found: dict[int, set[str]] = {}
    teacher = (getattr(optimizer, "teacher_settings", None) or {}).get("lm")
    for lm, role in ((getattr(optimizer, "prompt_model", None), "prompt_model"),
                     (getattr(optimizer, "task_model", None), "task_model"),
                     (getattr(optimizer, "reflection_lm", None), "reflection"), (teacher, "teacher")):
        if lm is not None:
            found.setdefault(id(lm), set()).add(role)
    return {k: next(iter(v)) for k, v in found.items() if len(v) == 1}


def role_for(lm: Any) -> str | None:
    run = COMPILE_RUN.get()
    return run.roles.get(id(lm)) if run is not None else None


def begin_compile(optimizer: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    student = kwargs.get("student", args[0] if args else None)
    run = CompileRun(type(optimizer).__name__, optimizer, student=student, roles=_roles_of(optimizer))
    gepa_restore = _attach_gepa(optimizer, run)
    return COMPILE_RUN.set(run), gepa_restore


def end_compile(state: tuple[Any, Any]) -> None:
    token, gepa_restore = state
    run = COMPILE_RUN.get()
    COMPILE_RUN.reset(token)
    if gepa_restore is not None:
        gepa_restore()
    if run is not None:
        global _ended
        _ended += 1
        _finished.append((_ended, run))
        del _finished[:-8]


def ended_count() -> int:
    return _ended


def ended_since(count: int) -> list[CompileRun]:
    return [run for seq, run in _finished if seq > count]


def _pushed_trial(trial: int, role: str | None) -> Any:
    state = _context.current()
    return _context.var().set(dataclasses.replace(state, trial=trial, lm_role=role or state.lm_role))


# -- trials: each the root of its own trace, with a summary span in the compile trace ----------------------

@dataclasses.dataclass
class OpenTrial:
    """A trial in progress. `span` is the root of the trial's own trace (made current); `summary` is its span
    in the compile trace, linked both ways and given the trial's totals, score and trace id as it ends.
    Where the compile's trace is not recorded (sampled out, no SDK), `span` is an ordinary child span and
    there is no summary."""

    number: int
    span: Any
    token: Any
    pushed: Any
    trial_token: Any
    summary: Any = None

    def set(self, attrs: dict[str, Any]) -> None:
        for span in (self.span, self.summary):
            if span is not None and span.is_recording():
                span.set_attributes(attrs)


def _hex(trace_id: int) -> str:
    return f"{trace_id:032x}"


def open_trial(rt: Any, run: CompileRun, name: str, number: int, role: str | None,
               attrs: dict[str, Any] | None = None) -> OpenTrial:
    """One trial of `run`: a trace of its own (a 2,000-trial compile is then 2,000 traces of a few hundred
    KB, not one trace past Tempo's per-trace limit), with the trial number (and LM role) pushed."""
    base = {A.SPAN_KIND: "trial", A.PHASE: "train", A.OPTIMIZER_NAME: run.name, A.OPTIMIZER_TRIAL: number,
            **(attrs or {})}
    with run.lock:
        run.last_trial = number
    summary = None
    if unsampled(rt):
        span, token = start(rt.tracer, name, base)
    else:
        summary = rt.tracer.start_span(name, attributes={**base, A.SPAN_KIND: "trial_summary"})
        try:
            compile_side = summary.get_span_context()
            span = rt.tracer.start_span(name, context=otel_context.Context(), links=[
                Link(compile_side, {A.LINK_RELATION: "compile"})],
                attributes={**base, A.OPTIMIZER_COMPILE_TRACE_ID: _hex(compile_side.trace_id)})
            trial_side = span.get_span_context()
            if trial_side.is_valid:
                summary.set_attribute(A.OPTIMIZER_TRIAL_TRACE_ID, _hex(trial_side.trace_id))
                summary.add_link(trial_side, {A.LINK_RELATION: "trial"})
            if rt.processor is not None:
                rt.processor.adopt(span, summary)  # the trial's totals roll up into the compile through its summary
            token = otel_context.attach(trace.set_span_in_context(span))
        except BaseException:
            summary.end()  # a trial that could not open leaves no summary span open behind it
            raise
    return OpenTrial(number, span, token, _pushed_trial(number, role), TRIAL_SPAN.set(span), summary)


def close_trial(trial: OpenTrial, exc: BaseException | None = None, attrs: dict[str, Any] | None = None) -> None:
    try:
        TRIAL_SPAN.reset(trial.trial_token)
        _context.var().reset(trial.pushed)
    except Exception:
        internal_error("trial context reset")
    try:
        if attrs:
            trial.set(attrs)
    except Exception:
        internal_error("trial span end")
    finish(trial.span, trial.token, exc)  # its totals reach the summary as it ends
    if trial.summary is not None:
        finish_detached(trial.summary, exc)


def _score(value: Any) -> dict[str, Any]:
    return {A.OPTIMIZER_SCORE: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else {}


def _next_trial(run: CompileRun) -> int:
    with run.lock:
        number = run.next_trial
        run.next_trial += 1
    return number


# -- Evaluate inside a compile ---------------------------------------------------------------------------

def evaluate_trial(rt: Any) -> OpenTrial | None:
    """Before an Evaluate span starts inside a compile: an Evaluate outside any trial is a trial of its own
    (a random-search candidate, MIPROv2's and GEPA's evaluation of the starting program: trial 1, the
    baseline); None when it belongs to a trial already open, or to MIPROv2's last trial (its final full
    evaluation after the Optuna loop)."""
    run = COMPILE_RUN.get()
    if run is None or TRIAL_SPAN.get() is not None:
        return None
    with run.lock:
        if run.optuna_started and run.last_trial is not None:
            return None
    number = _next_trial(run)
    return open_trial(rt, run, f"trial {number}", number, "student",
                      {A.OPTIMIZER_BASELINE: True} if number == 1 else None)


def evaluate_begin(span: Any, kwargs: dict, devset_size: int) -> None:
    """Annotate an Evaluate span inside a compile with its trial and, for MIPROv2, minibatch vs full."""
    run = COMPILE_RUN.get()
    if run is None:
        return
    metric_key = (kwargs.get("callback_metadata") or {}).get("metric_key")
    span.set_attribute(A.OPTIMIZER_NAME, run.name)
    trial_span = TRIAL_SPAN.get()
    if trial_span is not None:
        if metric_key is not None:  # MIPROv2 says which; other optimizers do not
            kind = "minibatch" if metric_key == "eval_minibatch" else "full"
            trial_span.set_attribute(A.OPTIMIZER_EVAL, kind)
            span.set_attribute(A.OPTIMIZER_EVAL, kind)
    else:  # MIPROv2's final full evaluation of its last trial
        span.set_attribute(A.OPTIMIZER_EVAL, "full")
    trial = _context.current().trial if trial_span is not None else run.last_trial
    if trial is not None:
        span.set_attribute(A.OPTIMIZER_TRIAL, trial)


def evaluate_end(span: Any, program: Any, score: float | None, metric_key: str | None) -> None:
    run = COMPILE_RUN.get()
    if run is None:
        return
    if score is not None:
        span.set_attribute(A.OPTIMIZER_SCORE, score)
    trial = _context.current().trial if TRIAL_SPAN.get() is not None else run.last_trial
    run.record(program, score, trial, full=metric_key != "eval_minibatch")


# -- Optuna trials (MIPROv2) -----------------------------------------------------------------------------------

def optuna_optimize(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrap the objective of `Study.optimize` when it runs inside a compile: one trial (trace) per Optuna trial,
    numbered as MIPROv2 logs them (trial.number + 1; its default program, added first, is trial 1)."""
    run = COMPILE_RUN.get()
    rt = _runtime.active()
    if run is None or rt is None:
        return wrapped(*args, **kwargs)
    func = kwargs.pop("func") if "func" in kwargs else args[0]
    rest = args[1:] if args and args[0] is func else args
    run.optuna_started = True

    def objective(trial: Any) -> Any:
        number = trial.number + 1
        with run.lock:
            run.next_trial = max(run.next_trial, number + 1)
        try:
            opened = open_trial(rt, run, f"trial {number}", number, "task_model")
        except Exception:
            internal_error("trial span start")
            return func(trial)
        try:
            value = func(trial)
        except BaseException as exc:
            close_trial(opened, exc, _params(trial))
            raise
        close_trial(opened, None, {**_params(trial), **_score(value)})
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


# -- stages (MIPROv2) and bootstrap attempts (BootstrapFewShot) ------------------------------------------------

# Begin/end pairs for `_dspy_patches._around`, which makes the sync and async wrappers.

def _open_role_span(name: str, attrs: dict[str, Any], role: str | None) -> tuple[Any, Any, Any] | None:
    rt = _runtime.active()
    if rt is None:
        return None
    span, token = start(rt.tracer, name, {A.PHASE: "train", **attrs})
    state = _context.current()
    return span, token, _context.var().set(dataclasses.replace(state, lm_role=role or state.lm_role))


def _close_role_span(state: tuple[Any, Any, Any], result: Any, exc: BaseException | None) -> None:
    span, token, ctx = state
    _context.var().reset(ctx)
    finish(span, token, exc)


def stage_hooks(name: str, role: str | None):
    """One span for an optimizer stage; the LM calls inside carry `role`."""
    def begin(instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return _open_role_span(f"stage {name}", {A.SPAN_KIND: "stage", A.OPTIMIZER_STAGE: name,
                                                      A.OPTIMIZER_NAME: type(instance).__name__}, role)
        except Exception:
            internal_error("stage span start")
            return None

    return begin, _close_role_span


def _bootstrap_begin(instance: Any, args: tuple, kwargs: dict) -> Any:
    try:
        example = kwargs.get("example", args[0] if args else None)
        round_idx = kwargs.get("round_idx", args[1] if len(args) > 1 else 0)
        trainset = getattr(instance, "trainset", None) or []
        index = next((i for i, e in enumerate(trainset) if e is example), -1)
        return _open_role_span("bootstrap example", {
            A.SPAN_KIND: "bootstrap", A.OPTIMIZER_NAME: type(instance).__name__, A.OPTIMIZER_ROUND: int(round_idx),
            A.OPTIMIZER_EXAMPLE: index}, "teacher")
    except Exception:
        internal_error("bootstrap span start")
        return None


def _bootstrap_end(state: tuple[Any, Any, Any], result: Any, exc: BaseException | None) -> None:
    if exc is None:
        state[0].set_attribute(A.OPTIMIZER_SUCCESS, bool(result))
    _close_role_span(state, result, exc)


BOOTSTRAP_ATTEMPT = (_bootstrap_begin, _bootstrap_end)


# -- GEPA -----------------------------------------------------------------------------------------------------

class _GEPAObserver:
    """A GEPA callback (gepa.core.callbacks.GEPACallback protocol): a trial (trace) per iteration.

    Trials follow our one numbering (the baseline evaluation of the seed program is trial 1, so GEPA's
    iteration N is trial N+1); `dspy.optimizer.iteration` keeps GEPA's own number, as its log prints it.
    GEPA skips `on_iteration_end` on some paths (no proposal, a merge that replaces the reflective step):
    an iteration still open is closed when the next starts or the optimization ends."""

    def __init__(self, run: CompileRun):
        self.run = run
        self.trial: OpenTrial | None = None
        self.proposal = None

    def on_iteration_start(self, event: dict) -> None:
        self._close()
        rt = _runtime.active()
        if rt is None:
            return
        try:
            iteration = int(event["iteration"])
            number = _next_trial(self.run)
            self.trial = open_trial(rt, self.run, f"iteration {iteration}", number, None,
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
            close_trial(trial)

    def __getattr__(self, name: str) -> Any:  # every other event of the protocol: nothing to do
        if name.startswith("on_"):
            return lambda event: None
        raise AttributeError(name)


def _attach_gepa(optimizer: Any, run: CompileRun):
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
