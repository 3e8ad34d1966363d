"""Run state crosses into threads the user starts: `threading.Thread`, `ThreadPoolExecutor.submit`
(and so `loop.run_in_executor`), and DSPy's `ParallelExecutor`.

Python does not copy contextvars into a new thread, so without this a `ThreadPoolExecutor` inside
`with budget(...)` runs its LM calls outside the budget (and outside the trace). Like OpenTelemetry's
threading instrumentation we wrap the start of a thread and the submission of a task, and carry our run
state (`_context.CARRIED`) and the OTel context, nothing else: the task keeps its own thread's context, so
DSPy's per-thread settings (its usage tracker, `dspy.context` overrides) stay as DSPy set them. Applied by
`instrument()` with the DSPy patches and removed by `uninstrument()`.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread
import logging
import multiprocessing.pool
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context

from otel_dspy_cost import _context, _runtime

logger = logging.getLogger("otel_dspy_cost")

# Threads whose target runs other people's tasks: each task carries its own submitter's state instead.
_POOL_WORKERS = tuple(w for w in (getattr(concurrent.futures.thread, "_worker", None),
                                  getattr(multiprocessing.pool, "worker", None)) if w is not None)


def carried(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, to be run (any number of times, in any thread) with our run state and the OTel context
    current now, and everything else as the running thread has it."""
    ours = _context.snapshot()
    otel_ctx = otel_context.get_current()

    def in_context(*args: Any, **kwargs: Any) -> Any:
        tokens = _context.enter(ours)
        otel_token = otel_context.attach(otel_ctx)
        try:
            return function(*args, **kwargs)
        finally:
            otel_context.detach(otel_token)
            _context.leave(tokens)

    in_context.__name__ = getattr(function, "__name__", "in_context")
    in_context.__wrapped__ = function  # type: ignore[attr-defined]
    return in_context


def _thread_start(wrapped: Any, instance: threading.Thread, args: tuple, kwargs: dict) -> Any:
    # An executor's worker thread is skipped: it outlives the submission that started it, and each task
    # it runs already gets its submitter's context (below); a copied budget must not stick to the worker.
    if _runtime.active() is not None and getattr(instance, "_target", None) not in _POOL_WORKERS:
        instance.run = carried(instance.run)  # bound, so a subclass's own run() is carried too
    return wrapped(*args, **kwargs)


def _executor_submit(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if _runtime.active() is not None:
        if args:
            args = (carried(args[0]), *args[1:])
        elif "fn" in kwargs:
            kwargs = {**kwargs, "fn": carried(kwargs["fn"])}
    return wrapped(*args, **kwargs)


def _pool_task(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """`multiprocessing.pool.ThreadPool`'s apply_async/map/imap: its workers were started with the pool (often
    before the budget), so each task carries its submitter's run state. A process pool's tasks are pickled and
    run in other processes: left as they are (see `_process_pool_task`)."""
    if _runtime.active() is not None:
        if not isinstance(instance, multiprocessing.pool.ThreadPool):
            return _process_pool_task(wrapped, instance, args, kwargs)
        if args:
            args = (carried(args[0]), *args[1:])
        elif "func" in kwargs:
            kwargs = {**kwargs, "func": carried(kwargs["func"])}
    return wrapped(*args, **kwargs)


_warned_process_pools: set[str] = set()


def _process_pool_task(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Work handed to a process pool under a budget. Forked children inherit instrumentation and run state (an
    in-process budget then refuses there, loudly: `ForkedBudgetError`); spawn and forkserver children start
    from nothing, so their LM calls are outside the budget: said once per budget."""
    if _runtime.active() is not None:
        budgets = _context.current().budgets
        if budgets:
            try:
                context = getattr(instance, "_mp_context", None) or getattr(instance, "_ctx", None)
                method = context.get_start_method() if context is not None else "fork"
            except Exception:  # noqa: BLE001 - an unknown pool: say nothing rather than fail the submission
                method = "fork"
            label = budgets[-1].label
            if method != "fork" and label not in _warned_process_pools:
                _warned_process_pools.add(label)
                logger.warning(
                    "otel-dspy-cost: work sent to a %r-started process pool under budget %r runs in processes that "
                    "start without instrumentation or budget: their LM calls are outside the budget. Start the pool "
                    "with initializer=otel_dspy_cost.process_initializer and initargs=(ledger_url, label, limit_usd) "
                    "(a shared ledger: the children then count against the same budget by label).", method, label)
    return wrapped(*args, **kwargs)


def apply(wrap: Callable[[Any, str, Any], None]) -> None:
    """`wrap(owner, name, wrapper)` is the DSPy patch set's, so `uninstrument()` restores these too."""
    wrap(threading.Thread, "start", _thread_start)
    wrap(concurrent.futures.ThreadPoolExecutor, "submit", _executor_submit)
    for name in ("apply_async", "_map_async", "imap", "imap_unordered"):
        wrap(multiprocessing.pool.Pool, name, _pool_task)
    wrap(concurrent.futures.ProcessPoolExecutor, "submit", _process_pool_task)
