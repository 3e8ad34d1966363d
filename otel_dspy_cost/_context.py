"""Run state that follows the code path: active budgets, phase, optimizer trial.

One ContextVar holds an immutable snapshot, so async tasks inherit it for free and DSPy's worker
threads inherit it through the ParallelExecutor patch (which carries this and the OTel context).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import Budget


@dataclasses.dataclass(frozen=True, slots=True)
class RunContext:
    budgets: tuple[Budget, ...] = ()
    phase: str = "infer"
    optimizer: str | None = None
    trial: int | None = None
    lm_role: str | None = None


# RunContext is frozen, so a shared default instance is safe.
_RUN: contextvars.ContextVar[RunContext] = contextvars.ContextVar(
    "otel_dspy_cost_run", default=RunContext())  # noqa: B039


def current() -> RunContext:
    return _RUN.get()


@contextmanager
def pushed(**changes: Any) -> Iterator[RunContext]:
    state = dataclasses.replace(_RUN.get(), **changes)
    token = _RUN.set(state)
    try:
        yield state
    finally:
        _RUN.reset(token)


def var() -> contextvars.ContextVar[RunContext]:
    return _RUN
