"""Run state crosses into threads the user starts: `threading.Thread`, `ThreadPoolExecutor.submit`
(and so `loop.run_in_executor`), and DSPy's `ParallelExecutor`.

Python does not copy contextvars into a new thread, so without this a `ThreadPoolExecutor` inside
`with budget(...)` runs its LM calls outside the budget (and outside the trace). Like OpenTelemetry's
threading instrumentation we wrap the start of a thread and the submission of a task, but we carry the
whole `contextvars.copy_context()` (our run state and the OTel context together, nothing to forget), as
asyncio does for tasks. Applied by `instrument()` with the DSPy patches and removed by `uninstrument()`.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread
import contextvars
import threading
from collections.abc import Callable
from typing import Any

from otel_dspy_cost import _runtime

_POOL_WORKER = getattr(concurrent.futures.thread, "_worker", None)


def carried(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, to be run (any number of times, in any thread) in the context current now."""
    captured = contextvars.copy_context()

    def in_context(*args: Any, **kwargs: Any) -> Any:
        # A Context can be entered by one thread at a time: each run gets its own copy.
        return captured.copy().run(function, *args, **kwargs)

    in_context.__name__ = getattr(function, "__name__", "in_context")
    in_context.__wrapped__ = function  # type: ignore[attr-defined]
    return in_context


def _thread_start(wrapped: Any, instance: threading.Thread, args: tuple, kwargs: dict) -> Any:
    # An executor's worker thread is skipped: it outlives the submission that started it, and each task
    # it runs already gets its submitter's context (below); a copied budget must not stick to the worker.
    if _runtime.active() is not None and getattr(instance, "_target", None) is not _POOL_WORKER:
        run = instance.run  # bound, so a subclass's own run() is carried too
        captured = contextvars.copy_context()
        instance.run = lambda: captured.run(run)  # type: ignore[method-assign]
    return wrapped(*args, **kwargs)


def _executor_submit(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if _runtime.active() is not None:
        if args:
            args = (carried(args[0]), *args[1:])
        elif "fn" in kwargs:
            kwargs = {**kwargs, "fn": carried(kwargs["fn"])}
    return wrapped(*args, **kwargs)


def apply(wrap: Callable[[Any, str, Any], None]) -> None:
    """`wrap(owner, name, wrapper)` is the DSPy patch set's, so `uninstrument()` restores these too."""
    wrap(threading.Thread, "start", _thread_start)
    wrap(concurrent.futures.ThreadPoolExecutor, "submit", _executor_submit)
