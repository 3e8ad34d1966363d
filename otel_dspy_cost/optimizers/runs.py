"""What any optimizer's compile is made of: its run, trials (a trace each), Evaluate inside it, best-so-far.

One `CompileRun` per optimizer `compile` (held in a ContextVar and carried into DSPy's worker threads)
numbers the trials and remembers the best candidate evaluated so far, which is what `guarded_compile()`
returns when a budget stops the run. Any `Evaluate` inside a compile and outside a trial is a trial of
its own (RandomSearch candidates, MIPROv2's baseline and periodic full evaluations). What is particular to
one optimizer (its private stages, Optuna trials, GEPA's callbacks) is in its own module (`registry`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _runtime
from otel_dspy_cost.optimizers import projection
from otel_dspy_cost.telemetry import viewers
from otel_dspy_cost.telemetry.spans import finish, finish_detached, internal_error, start, unsampled


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
    progress: Any = None  # optimizers.projection.Progress: the projected final spend
    span: Any = None  # the compile span, given the projection as it moves
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


def role_for(lm: Any) -> str | None:
    run = COMPILE_RUN.get()
    return run.roles.get(id(lm)) if run is not None else None


def finished(run: CompileRun) -> None:
    """A compile ended: `guarded_compile` finds its run here (the last few only)."""
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
    optimizer: str = ""
    spent_at_open: float = 0.0  # the accounting station's total when it opened: the trial's cost at its close

    def set(self, attrs: dict[str, Any]) -> None:
        for span in (self.span, self.summary):
            if span is not None and span.is_recording():
                span.set_attributes(attrs)
        score = attrs.get(A.OPTIMIZER_SCORE)
        if score is not None and watched:
            trial_record(self.optimizer, self.number, score=score, trace_id=_recorded_trace(self.span))


# -- trials and program runs, recorded whatever the tracer does (record_run's summary) ----------------------

class RunRecords:
    """The trials (score, evaluation kind, trace id where one was recorded) and program runs of a `record_run`
    block, fed by the wrappers themselves: a sampled-out or disabled tracer leaves them the same, as it leaves
    cost and budgets."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.trials: dict[tuple[str, int], dict[str, Any]] = {}
        self.program_runs = 0  # top-level inference module calls that returned
        self.program_runs_failed = 0

    def trial(self, optimizer: str, number: int, score: float | None, eval_kind: str | None,
              trace_id: str | None) -> None:
        with self.lock:
            row = self.trials.setdefault((optimizer, number), {"optimizer": optimizer, "trial": number, "score": None,
                                                               "eval": None, "trace_id": None})
            if score is not None:
                row["score"] = score
            if eval_kind is not None:
                row["eval"] = eval_kind
            if trace_id and not row["trace_id"]:
                row["trace_id"] = trace_id

    def program_run(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.program_runs += 1
            else:
                self.program_runs_failed += 1


watched: tuple[RunRecords, ...] = ()  # the record_run blocks open now (a tuple: read without a lock)
_watching_lock = threading.Lock()


def watch(records: RunRecords) -> None:
    global watched
    with _watching_lock:
        watched = (*watched, records)


def unwatch(records: RunRecords) -> None:
    global watched
    with _watching_lock:
        watched = tuple(r for r in watched if r is not records)


def trial_record(optimizer: str, number: int, *, score: float | None = None, eval_kind: str | None = None,
                 trace_id: str | None = None) -> None:
    for records in watched:
        records.trial(optimizer, number, score, eval_kind, trace_id)


def program_run_record(ok: bool) -> None:
    """A top-level inference module call ended (`instrumentation.patches._module_end`)."""
    for records in watched:
        records.program_run(ok)


def _hex(trace_id: int) -> str:
    return f"{trace_id:032x}"


def _recorded_trace(span: Any) -> str | None:
    """The trace id of a span that is recorded (sampled), else None: an id no backend holds is no pointer."""
    context = span.get_span_context() if span is not None else None
    if context is None or not context.is_valid or not context.trace_flags.sampled:
        return None
    return _hex(context.trace_id)


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
        summary_attrs = {**base, A.SPAN_KIND: "trial_summary"}
        if viewers.on:
            viewers.add_start(name, summary_attrs)
        summary = rt.tracer.start_span(name, attributes=summary_attrs)
        try:
            compile_side = summary.get_span_context()
            trial_attrs = {**base, A.OPTIMIZER_COMPILE_TRACE_ID: _hex(compile_side.trace_id)}
            if viewers.on:  # the trial's trace joins its compile's session, in backends that drop links
                viewers.add_start(name, trial_attrs, trace.INVALID_SPAN_CONTEXT)
                trial_attrs.update(viewers.session_of(summary))
            span = rt.tracer.start_span(name, context=otel_context.Context(), links=[
                Link(compile_side, {A.LINK_RELATION: "compile"})], attributes=trial_attrs)
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
    return OpenTrial(number, span, token, _pushed_trial(number, role), TRIAL_SPAN.set(span), summary, run.name,
                     projection.spent_now())


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
    run = COMPILE_RUN.get()
    stop = None
    if exc is None and run is not None:  # projected before the summary span ends, which is given the figure
        try:
            stop = projection.trial_ended(run, trial.number, projection.spent_now() - trial.spent_at_open,
                                          trial.summary)
        except Exception:
            internal_error("compile projection")
    finish(trial.span, trial.token, exc)  # its totals reach the summary as it ends
    if trial.summary is not None:
        finish_detached(trial.summary, exc)
    if stop is not None:
        raise stop  # stop_on_projection: the deliberate stop, between trials


def next_trial(run: CompileRun) -> int:
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
    number = next_trial(run)
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
    kind = None
    if trial_span is not None:
        if metric_key is not None:  # MIPROv2 says which; other optimizers do not
            kind = "minibatch" if metric_key == "eval_minibatch" else "full"
            trial_span.set_attribute(A.OPTIMIZER_EVAL, kind)
            span.set_attribute(A.OPTIMIZER_EVAL, kind)
    else:  # MIPROv2's final full evaluation of its last trial
        kind = "full"
        span.set_attribute(A.OPTIMIZER_EVAL, "full")
    trial = _context.current().trial if trial_span is not None else run.last_trial
    if trial is not None:
        span.set_attribute(A.OPTIMIZER_TRIAL, trial)
        if kind is not None and watched:
            trial_record(run.name, trial, eval_kind=kind)


def evaluate_end(span: Any, program: Any, score: float | None, metric_key: str | None) -> None:
    run = COMPILE_RUN.get()
    if run is None:
        return
    if score is not None:
        span.set_attribute(A.OPTIMIZER_SCORE, score)
    trial = _context.current().trial if TRIAL_SPAN.get() is not None else run.last_trial
    run.record(program, score, trial, full=metric_key != "eval_minibatch")
    if score is not None and trial is not None and watched:
        trial_record(run.name, trial, score=score, trace_id=_recorded_trace(TRIAL_SPAN.get() or span))


# -- spans of an optimizer's own stages, with the role of the LM calls inside -------------------------------

# Begin/end pairs for `instrumentation.patches._around`, which makes the sync and async wrappers.

def open_role_span(name: str, attrs: dict[str, Any], role: str | None) -> tuple[Any, Any, Any] | None:
    rt = _runtime.active()
    if rt is None:
        return None
    span, token = start(rt.tracer, name, {A.PHASE: "train", **attrs})
    state = _context.current()
    return span, token, _context.var().set(dataclasses.replace(state, lm_role=role or state.lm_role))


def close_role_span(state: tuple[Any, Any, Any], result: Any, exc: BaseException | None) -> None:
    span, token, ctx = state
    _context.var().reset(ctx)
    finish(span, token, exc)


def stage_hooks(name: str, role: str | None):
    """One span for an optimizer stage; the LM calls inside carry `role`."""
    def begin(instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return open_role_span(f"stage {name}", {A.SPAN_KIND: "stage", A.OPTIMIZER_STAGE: name,
                                                      A.OPTIMIZER_NAME: type(instance).__name__}, role)
        except Exception:
            internal_error("stage span start")
            return None

    return begin, close_role_span
