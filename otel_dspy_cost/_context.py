"""Run state that follows the code path, in one place: every ContextVar this package uses lives here.

Why one module: threads started by the user, DSPy's worker pool and our own hand-offs carry run state
as the values of `CARRIED` (see `instrumentation.threads`), listed next to the variables themselves so that
none is forgotten. Only ours are carried: a copy of the caller's whole context would override what the
task's own thread set up (DSPy's per-thread settings, usage tracker). Async tasks inherit the context.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otel_dspy_cost.budgets.budget import Budget


@dataclasses.dataclass(frozen=True, slots=True)
class RunContext:
    """Budgets in force, phase and optimizer trial of the code running now (immutable: replace, don't edit)."""

    budgets: tuple[Budget, ...] = ()
    phase: str = "infer"
    optimizer: str | None = None
    trial: int | None = None
    lm_role: str | None = None


# RunContext is frozen, so a shared default instance is safe.
_RUN: contextvars.ContextVar[RunContext] = contextvars.ContextVar(
    "otel_dspy_cost_run", default=RunContext())  # noqa: B039
# (module instance, module path, adapter timings) of the innermost DSPy module being called: the parent for
# paths; the timings list exists while its span records (see `instrumentation.patches._timed_adapter_op`).
CURRENT_MODULE: contextvars.ContextVar[tuple[Any, str, list[Any] | None] | None] = contextvars.ContextVar(
    "otel_dspy_cost_module", default=None)
# The LM call in progress (a `budgets.accounting.LMCall`): DSPy's finalisation hooks fill in its usage.
CURRENT_CALL: contextvars.ContextVar[Any] = contextvars.ContextVar("otel_dspy_cost_lm_call", default=None)
# Inside an adapter format/parse span: a nested twin (a subclass calling super()) makes no second span.
IN_ADAPTER_OP: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_dspy_cost_adapter_op", default=False)
# ids of the optimizers whose compile is running here: super().compile() makes no second span.
IN_COMPILE: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar("otel_dspy_cost_compile", default=())
# Per Evaluate call: [examples whose program call raised] (Evaluate scores them as failures and goes on).
EVAL_ERRORS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("otel_dspy_cost_eval_errors",
                                                                              default=None)
# The optimizer run (`optimizers.runs.CompileRun`) and the trial span open here.
COMPILE_RUN: contextvars.ContextVar[Any] = contextvars.ContextVar("otel_dspy_cost_compile_run", default=None)
TRIAL_SPAN: contextvars.ContextVar[Any] = contextvars.ContextVar("otel_dspy_cost_trial_span", default=None)


# Every variable above: what crosses into a thread or pool task we hand work to (`instrumentation.threads`).
# Only ours: the task keeps the rest of its own context (DSPy's per-thread settings among it).
CARRIED: tuple[contextvars.ContextVar[Any], ...] = (_RUN, CURRENT_MODULE, CURRENT_CALL, IN_ADAPTER_OP, IN_COMPILE,
                                                    EVAL_ERRORS, COMPILE_RUN, TRIAL_SPAN)


def snapshot() -> tuple[Any, ...]:
    """The values of our variables here, to be `entered` in another thread."""
    return tuple(v.get() for v in CARRIED)


def enter(values: tuple[Any, ...]) -> list[contextvars.Token[Any]]:
    return [v.set(value) for v, value in zip(CARRIED, values, strict=True)]


def leave(tokens: list[contextvars.Token[Any]]) -> None:
    for v, token in zip(reversed(CARRIED), reversed(tokens), strict=True):
        v.reset(token)


# Budgets entered somewhere in this process and not left yet (id -> [budget, times entered]): an LM call with no
# budget in its own context while one is open elsewhere ran in a thread that did not get the run state.
_open_budgets: dict[int, list[Any]] = {}
_open_lock = threading.Lock()


def budget_entered(budget: Budget) -> None:
    with _open_lock:
        _open_budgets.setdefault(id(budget), [budget, 0])[1] += 1


def budget_left(budget: Budget) -> None:
    with _open_lock:
        entry = _open_budgets.get(id(budget))
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _open_budgets[id(budget)]


def open_budget_labels() -> list[str]:
    """Labels of run budgets entered in this process and not left (empty on the usual path: a dict read)."""
    if not _open_budgets:
        return []
    with _open_lock:
        return [entry[0].label for entry in _open_budgets.values() if not entry[0].is_scope]


def current() -> RunContext:
    return _RUN.get()


def var() -> contextvars.ContextVar[RunContext]:
    return _RUN


# -- fork ------------------------------------------------------------------------------------------------
# Bumped in every child right after os.fork(): an in-process budget remembers the generation it was made
# in, so a forked child can tell that its copy of the ledger is not the one the parent counts in.
_fork_generation = 0


def fork_generation() -> int:
    return _fork_generation


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Starting(threading.local):
    """The attributes we are handing the SDK for a span of ours it is starting in this thread, else None.

    The SDK calls our processor's `on_start` synchronously inside `start_span`; reading the three attributes
    it needs from this plain dict instead of the span's `attributes` (a mapping proxy over the SDK's
    `BoundedAttributes`, whose `get` and `len` are Python-level calls) saves ~7,000 instructions per span.
    A thread-local, not a ContextVar: it is only ever set around one synchronous call."""

    attributes: dict[str, Any] | None = None


STARTING = _Starting()
