"""Where the spans come from: wrappers on DSPy's public call points, applied and removed as a set.

Public methods wrapped at class level: `Module.__call__/acall` (modules and predictors),
`BaseLM.__call__/acall`, each Adapter's `format/parse`, `Tool.__call__/acall`, `Evaluate.__call__`,
each Teleprompter's `compile`, `Retrieve.__call__`, and `ParallelExecutor.execute` (to carry the
OTel context and our run state into DSPy's worker threads, which DSPy does not do).
Private hooks, feature-detected per DSPy version, only read usage: `execution.finalize` (3.4),
`BaseLM._process_lm_response` / `_finalize_lm_response` (3.3).
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
import inspect
import logging
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import trace

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _redact, _runtime
from otel_dspy_cost._context import CURRENT_MODULE
from otel_dspy_cost._context import EVAL_ERRORS as _EVAL_ERRORS
from otel_dspy_cost._context import IN_ADAPTER_OP as _IN_ADAPTER_OP
from otel_dspy_cost._context import IN_COMPILE as _IN_COMPILE
from otel_dspy_cost.budgets.accounting import REFUSED
from otel_dspy_cost.errors import BudgetExceededError, UnpricedModelError
from otel_dspy_cost.instrumentation import attempts, clients, lm_call, usage_capture
from otel_dspy_cost.instrumentation import threads as user_threads
from otel_dspy_cost.optimizers import registry as optimizers
from otel_dspy_cost.optimizers import runs as optimizer_runs
from otel_dspy_cost.telemetry.spans import finish, internal_error, mark_refused, skipped, start, unsampled

logger = logging.getLogger("otel_dspy_cost")


class _Patches:
    """Remembers every (owner, name, original) it replaced so `remove()` restores DSPy exactly."""

    def __init__(self) -> None:
        self.applied: list[tuple[Any, str, Any]] = []
        # Our wrappers by id, so a second instrument() never wraps them twice. Kept here rather than marked
        # by a subclass of wrapt.FunctionWrapper: a Python subclass of wrapt's C type costs ~3,800 more
        # instructions on every call through it (measured under callgrind), and these run several times
        # per LM call.
        self._ours: dict[int, Any] = {}

    def wrap(self, owner: Any, name: str, wrapper: Callable[..., Any] | Wrappers) -> None:
        original = owner.__dict__.get(name)
        if original is None or id(original) in self._ours:
            return
        if isinstance(wrapper, tuple):  # (sync, async) from _around: chosen once here, not on every call
            wrapper = wrapper[1] if inspect.iscoroutinefunction(original) else wrapper[0]
        # Another instrumentation's wrapper is wrapped too: ours sits outside it and restores it on removal.
        if inspect.ismodule(owner):
            ours = _module_function(original, wrapper)
        elif type(original) is types.FunctionType:
            ours = _method(original, wrapper)
        elif _is_proxy(original):  # another instrumentation's wrapper (wrapt's): see `_proxied_method`
            ours = _proxied_method(original, wrapper)
        else:  # a classmethod, staticmethod or builtin: wrapt binds each correctly
            ours = wrapt.FunctionWrapper(original, wrapper)
        setattr(owner, name, ours)
        self._ours[id(ours)] = ours  # held, so the id stays ours until remove()
        self.applied.append((owner, name, original))

    def remove(self) -> None:
        stuck: dict[int, Any] = {}
        for owner, name, original in reversed(self.applied):
            try:
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            except Exception:
                internal_error("uninstrument")
                left = getattr(owner, "__dict__", {}).get(name)
                if id(left) in self._ours:  # still in place: a later instrument() must still know it
                    stuck[id(left)] = left
        self.applied.clear()
        self._ours = stuck


# Plain functions in place of `wrapt.FunctionWrapper` where the original is a plain function (a module's, or
# one defined in a class body). Hand-written because wrapt's C proxy costs more per call than the work of
# most of our wrappers: ~2.0 us per call of a module function here and ~1.1 us per method call, against
# ~0.6 and ~0.5 us through a plain closure (timeit, a wrapper that only calls through), and a Predict call
# goes through six of them. A plain function binds as the original did (instance, class or `super()`);
# wrapt stays for everything else, where its descriptor handling is needed. `functools.wraps` keeps name and
# docs, and a coroutine function stays one. `__wrapped__` is taken off again (`__signature__` keeps what
# `inspect.signature` reads): other instrumentations' `uninstrument()` walks the `__wrapped__` chain to its
# end (OpenInference's `unwrap_object`), which would take our LM admission off the call path with theirs.


def _own(function: Callable[..., Any], original: Any) -> Callable[..., Any]:
    del function.__wrapped__
    try:
        function.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # a callable inspect cannot read: no signature to keep
        pass
    return function


def _module_function(original: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """`wrapper(original, None, args, kwargs)` as a module-level function."""
    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def coroutine(*args: Any, **kwargs: Any) -> Any:
            return await wrapper(original, None, args, kwargs)

        return _own(coroutine, original)

    @functools.wraps(original)
    def function(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, None, args, kwargs)

    return _own(function, original)


def _method(original: types.FunctionType, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """`wrapper(bound original, self, args, kwargs)` as a method defined in a class body."""
    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def coroutine_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await wrapper(types.MethodType(original, self), self, args, kwargs)

        return _own(coroutine_method, original)

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(types.MethodType(original, self), self, args, kwargs)

    return _own(method, original)


_PROXY = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)  # wrapt 2's base of every proxy (1.x: ObjectProxy)


def _is_proxy(original: Any) -> bool:
    return (isinstance(original, _PROXY) and hasattr(type(original), "__get__")
            and not isinstance(getattr(original, "__wrapped__", None), (classmethod, staticmethod)))


def _proxied_method(original: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """A method another instrumentation wrapped before us (a wrapt proxy in the class body). Ours is a plain
    function around it, bound through the proxy's own `__get__`, rather than a wrapt proxy of a proxy: their
    `uninstrument()` (`opentelemetry.instrumentation.utils.unwrap`) puts back the `__wrapped__` of whatever proxy
    it finds, which would be theirs, taking our admission off the call path. A plain function is left alone."""
    if inspect.iscoroutinefunction(original):
        async def coroutine_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await wrapper(original.__get__(self, type(self)), self, args, kwargs)

        return _own(functools.update_wrapper(coroutine_method, original), original)

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(original.__get__(self, type(self)), self, args, kwargs)

    return _own(functools.update_wrapper(method, original), original)


_patches = _Patches()


# -- module path --------------------------------------------------------------------------------------

_NO_INDEX = object()
# parent module -> {id(child): (attribute, index or key, path)}; a module's children rarely change, so
# each pair is searched for once and afterwards only checked. Weak keys: a dropped program takes its entry.
_child_names: weakref.WeakKeyDictionary[Any, dict[int, tuple[str, Any, str]]] = weakref.WeakKeyDictionary()


def _scan_child_name(parent: Any, child: Any) -> tuple[str, Any, str] | None:
    """Where `child` sits inside `parent`. Lists and dicts are searched only when they hold modules: a
    module's `history` and demos lists grow with every call and must not be walked on every call."""
    from dspy.primitives.module import BaseModule

    try:
        items = vars(parent).items()
    except TypeError:
        return None
    for name, value in items:
        if value is child:
            return name, _NO_INDEX, name
        if isinstance(value, (list, tuple)):
            if value and isinstance(value[0], BaseModule):
                for i, item in enumerate(value):
                    if item is child:
                        return name, i, f"{name}[{i}]"
        elif isinstance(value, dict):
            if value and isinstance(next(iter(value.values())), BaseModule):
                for key, item in value.items():
                    if item is child:
                        return name, key, f"{name}[{key}]"
    return None


def _still_there(parent: Any, child: Any, where: tuple[str, Any, str]) -> bool:
    attr, index, _ = where
    value = vars(parent).get(attr)
    if index is _NO_INDEX:
        return value is child
    try:
        return value[index] is child
    except (LookupError, TypeError):
        return False


def _child_name(parent: Any, child: Any) -> str | None:
    try:
        names = _child_names.get(parent)
    except TypeError:  # not weak-referenceable or unhashable: no cache
        names = None
    where = names.get(id(child)) if names is not None else None
    if where is None or not _still_there(parent, child, where):
        where = _scan_child_name(parent, child)
        if where is None:
            return None
        try:
            _child_names.setdefault(parent, {})[id(child)] = where
        except TypeError:
            pass
    return where[2]


def _module_path(instance: Any) -> str:
    parent = CURRENT_MODULE.get()
    if parent is None:
        return type(instance).__name__
    if parent[0] is instance:
        return parent[1]
    return f"{parent[1]}.{_child_name(parent[0], instance) or type(instance).__name__}"


_predict_class: type | None = None


def _is_predictor(instance: Any) -> bool:
    global _predict_class
    if _predict_class is None:  # imported once, not on every call
        import dspy

        _predict_class = dspy.Predict
    return isinstance(instance, _predict_class)


# -- one mechanism for every span: begin before the call, end after it, sync and async alike -------------

Wrappers = tuple[Callable[..., Any], Callable[..., Any]]


def _around(begin: Callable[[Any, tuple, dict], Any], end: Callable[[Any, Any, BaseException | None], None]
            ) -> Wrappers:
    """(sync, async) wrapt wrappers: `begin(instance, args, kwargs)` returns a state (None runs the call
    untraced); `end(state, result, exc)` closes it. `_Patches.wrap` picks the one matching the method."""

    def sync_wrapper(wrapped, instance, args, kwargs):
        state = begin(instance, args, kwargs)
        if state is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            end(state, None, exc)
            raise
        end(state, result, None)
        return result

    async def run_async(wrapped, instance, args, kwargs):
        state = begin(instance, args, kwargs)
        if state is None:
            return await wrapped(*args, **kwargs)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            end(state, None, exc)
            raise
        end(state, result, None)
        return result

    def async_wrapper(wrapped, instance, args, kwargs):
        return run_async(wrapped, instance, args, kwargs)

    return sync_wrapper, async_wrapper


def _module_begin(instance, args, kwargs):
    rt = _runtime.active()
    if rt is None:
        return None
    try:
        path = _module_path(instance)  # also when unsampled: the path labels the LM call's cost
        timings = None
        if unsampled(rt):
            span, token = skipped()
        else:
            kind = "predictor" if _is_predictor(instance) else "module"
            attrs = {A.SPAN_KIND: kind, A.MODULE_PATH: path, A.MODULE_CLASS: type(instance).__qualname__,
                     A.PHASE: _context.current().phase}
            span, token = start(rt.tracer, f"{'predict' if kind == 'predictor' else 'module'} {path}", attrs)
            if span.is_recording():
                timings = [None, None, None, span]  # adapter format/parse seconds, its name (`_timed_adapter_op`)
        return span, token, CURRENT_MODULE.set((instance, path, timings)), "." not in path, timings
    except Exception:
        internal_error("module span start")
        return None


def _module_end(state, result, exc):
    span, token, mod_token, top_level, timings = state
    CURRENT_MODULE.reset(mod_token)
    if top_level:
        if exc is not None and isinstance(exc, Exception):
            errors = _EVAL_ERRORS.get()
            if errors is not None:
                errors[0] += 1
        if optimizer_runs.watched and _context.current().phase == "infer":  # record_run's program runs
            optimizer_runs.program_run_record(exc is None)
    finish(span, token, exc, _adapter_attributes(timings) if timings is not None and timings[2] else None)


def _lm_begin(instance, args, kwargs):
    """Admission: the call is priced and its worst case reserved before DSPy sends anything.

    The span is made first (so a refused call is still visible), but the money path does not depend on
    it: a sampled-out, no-op or foreign span changes nothing here."""
    prepared = _lm_prepare(instance, args, kwargs)
    if prepared is None:
        return None
    rt, span, token, call, prompt, messages = prepared
    try:
        rt.accountant.admit(call)  # the deliberate stops (budget, unpriced model) propagate from here
    except BaseException as exc:
        _admission_failed(rt, span, token, call, exc)
    # The admission's attributes (reservation, budget labels) are written with the end attributes, in one
    # write: spans are exported when they end, and a second write per call costs the SDK's lock and loop.
    return rt, span, token, call, _context.CURRENT_CALL.set(call), prompt, messages


async def _lm_async(wrapped, instance, args, kwargs):
    """`BaseLM.acall`: as `_around`'s async wrapper, but admission waits for room without blocking the loop."""
    prepared = _lm_prepare(instance, args, kwargs)
    if prepared is None:
        return await wrapped(*args, **kwargs)
    rt, span, token, call, prompt, messages = prepared
    try:
        await rt.accountant.admit_async(call)
    except BaseException as exc:
        _admission_failed(rt, span, token, call, exc)
    state = rt, span, token, call, _context.CURRENT_CALL.set(call), prompt, messages
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        _lm_end(state, None, exc)
        raise
    _lm_end(state, result, None)
    return result


def _admission_failed(rt, span, token, call, exc: BaseException) -> None:
    """Called from an `except` around admission: re-raises a deliberate stop (budget, unpriced model) or an
    interrupt after closing the span; our own bug is logged and the call goes ahead, still counted."""
    if isinstance(exc, (BudgetExceededError, UnpricedModelError)):
        _refused(span, token, exc)
        raise exc
    if isinstance(exc, Exception):  # our bug: logged; the call goes ahead and is still counted in the report and log
        internal_error("LM call admission")
        rt.accountant.admit_unbudgeted(call)
        return
    finish(span, token, exc)  # KeyboardInterrupt and the like, before any request: close the span
    raise exc


def _lm_prepare(instance, args, kwargs):
    """The call and its span, before admission; None runs the call untraced."""
    rt = _runtime.active()
    current = _context.CURRENT_CALL.get()
    if rt is None or (current is not None and current.lm is instance):  # a subclass calling super(): one call
        return None
    try:
        prompt = kwargs.get("prompt", args[0] if args else None)
        messages = kwargs.get("messages")
        call_kwargs = {k: v for k, v in kwargs.items() if k not in ("prompt", "messages")}
        if call_kwargs:  # credentials given per call (api_key=, headers): scrubbed from everything, from now on
            _redact.remember(_redact.secrets_of(call_kwargs))
        call, merged = lm_call.new_call(instance, prompt, messages, call_kwargs)
        if attempts.tracks_sending(instance):
            call.sent = False
        span, token = lm_call.open_span(rt, call, merged, prompt, messages)
    except Exception:
        internal_error("LM span start")
        return None
    return rt, span, token, call, prompt, messages


def _refused(span, token, stop: BaseException) -> None:
    """The call will not be made: end its span marked refused (a bug of ours here is logged, not raised)."""
    try:
        mark_refused(span, stop)
    except Exception:
        internal_error("LM span refusal")
    finish(span, token, None)


def _lm_end(state, result, exc):
    rt, span, token, call, call_token, prompt, messages = state
    _context.CURRENT_CALL.reset(call_token)
    lm_settle(rt, span, call, prompt, messages, result, exc)
    finish(span, token, exc)


def lm_settle(rt, span, call, prompt, messages, result, exc) -> None:
    """A call that ended (answered, or raised `exc`): priced, settled, and written on its span (not ended)."""
    try:
        if call.outcome == REFUSED:  # the budget refused a retry: nothing more was sent
            lm_call.settle_at_worst_case(call, "a retry was refused", 0.0)
            call.outcome = REFUSED
        elif exc is not None and not call.captured and call.sent is False:
            lm_call.not_sent(call, exc)  # raised before any request left (cancelled while queued, say)
        elif exc is not None and not call.captured:
            _redact.remember_lm(call.lm)  # a provider may echo the key in its error: scrub it everywhere
            lm_call.price_failure(rt.engine, call, exc)
        else:
            lm_call.price(rt, call, prompt, messages, result)
        if call.failed_attempts:
            attempts.add_failed_requests(call, exc is not None and not call.captured)
    except Exception:  # our bug: the call was made, so it counts at its reserved worst case, never less
        internal_error("LM call pricing")
        lm_call.settle_at_worst_case(call, "internal error")
    try:
        rt.accountant.settle(call)
    except Exception:
        internal_error("LM call settlement")
    try:
        if span.is_recording():
            span.set_attributes(lm_call.end_attributes(rt, call, result))
            for budget_, kind in call.fired:
                span.add_event(f"dspy.budget.{kind}", {A.BUDGET_LABEL: budget_.label,
                                                       "dspy.budget.spent_usd": budget_.spent_usd,
                                                       "dspy.budget.limit_usd": budget_.limit_usd or 0.0})
            if rt.processor is not None:
                rt.processor.note_call(span, call)
    except Exception:
        internal_error("LM span end")


def _simple_span(kind: str, name_fn: Callable[[Any, tuple, dict], str],
                 attrs_fn: Callable[[Any, tuple, dict], dict] | None = None,
                 guard: contextvars.ContextVar[bool] | None = None, phase: bool = True) -> Wrappers:
    """One span around a method (adapter ops, tools, retrievers); `guard` stops a nested twin span.

    Adapter format/parse spans (two per LM call) carry only kind and module path: every attribute is
    validated and copied by the SDK, and their class is already in the span name."""

    def begin(instance, args, kwargs):
        rt = _runtime.active()
        if rt is None or (guard is not None and guard.get()) or unsampled(rt):
            return None
        try:
            attrs = {A.SPAN_KIND: kind}
            if phase:
                attrs[A.PHASE] = _context.current().phase
            module = CURRENT_MODULE.get()
            if module is not None:
                attrs[A.MODULE_PATH] = module[1]
            if attrs_fn is not None:
                attrs.update(attrs_fn(instance, args, kwargs))
            span, token = start(rt.tracer, name_fn(instance, args, kwargs), attrs)
            return span, token, guard.set(True) if guard is not None else None
        except Exception:
            internal_error(f"{kind} span start")
            return None

    def end(state, result, exc):
        span, token, guard_token = state
        if guard_token is not None:
            guard.reset(guard_token)
        finish(span, token, exc)

    return _around(begin, end)


def _tool_attrs(instance, args, kwargs):
    name = getattr(instance, "name", None) or type(instance).__name__
    attrs = {A.TOOL_NAME: str(name), A.GEN_AI_OPERATION: "execute_tool"}
    rt = _runtime.active()
    if rt is not None and rt.capture_content:
        from otel_dspy_cost import _redact

        attrs["gen_ai.tool.call.arguments"] = _redact.scrub(repr(kwargs)[:4000])
    return attrs


def _evaluate_begin(instance, args, kwargs):
    rt = _runtime.active()
    if rt is None:
        return None
    trial = None
    try:
        program = kwargs.get("program", args[0] if args else None)
        devset = kwargs.get("devset") or getattr(instance, "devset", None) or []
        attrs = {A.SPAN_KIND: "evaluate", A.PHASE: _context.current().phase,
                 A.EVAL_SIZE: len(devset), A.EVAL_THREADS: int(kwargs.get("num_threads") or
                                                               getattr(instance, "num_threads", None) or 1),
                 A.MODULE_CLASS: type(program).__qualname__}
        metric = kwargs.get("metric") or getattr(instance, "metric", None)
        if metric is not None:
            attrs[A.EVAL_METRIC] = getattr(metric, "__name__", type(metric).__name__)
        trial = optimizer_runs.evaluate_trial(rt)  # a trial of its own: its trace, current from here
        span, token = start(rt.tracer, f"evaluate {type(program).__name__}", attrs)
        metric_key = (kwargs.get("callback_metadata") or {}).get("metric_key")
        optimizer_runs.evaluate_begin(span, kwargs, len(devset))
        errors = [0]
        # The program called by Evaluate starts a fresh module path.
        return (span, token, CURRENT_MODULE.set(None), trial, program, metric_key, errors,
                _EVAL_ERRORS.set(errors))
    except Exception:
        internal_error("evaluate span start")
        if trial is not None:
            optimizer_runs.close_trial(trial)
        return None


def _evaluate_end(state, result, exc):
    span, token, mod_token, trial, program, metric_key, errors, errors_token = state
    _EVAL_ERRORS.reset(errors_token)
    span.set_attribute(A.EVAL_ERRORS, errors[0])
    CURRENT_MODULE.reset(mod_token)
    score = None
    if exc is None:
        try:
            value = getattr(result, "score", result)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                score = float(value)
                span.set_attribute(A.EVAL_SCORE, score)
        except Exception:
            internal_error("evaluate score")
    try:
        optimizer_runs.evaluate_end(span, program, score, metric_key)
    except Exception:
        internal_error("evaluate trial end")
    finish(span, token, exc)
    if trial is not None:
        optimizer_runs.close_trial(trial, exc, {A.OPTIMIZER_SCORE: score} if score is not None else None)


def _patch_optimizer_internals(optimizer: Any) -> None:
    """Trial, stage and bootstrap spans, patched when an optimizer that has them first compiles.

    What to wrap comes from each optimizer's module (`optimizers.registry`); private methods are wrapped
    only where the class defines them (tested on every supported DSPy version).
    """
    for cls in type(optimizer).__mro__:
        for name, wrapper in _OPTIMIZER_HOOKS.get(cls.__name__, {}).items():
            if callable(cls.__dict__.get(name)):
                _patches.wrap(cls, name, wrapper)
    for owner, name, wrapper in optimizers.public_patches(optimizer):
        _patches.wrap(owner, name, wrapper)


# The (sync, async) wrappers of every optimizer hook, made once.
_OPTIMIZER_HOOKS = {cls: {name: _around(*pair) for name, pair in hooks.items()}
                    for cls, hooks in optimizers.method_hooks().items()}


def _compile_begin(instance, args, kwargs):
    rt = _runtime.active()
    active = _IN_COMPILE.get()
    if rt is None or id(instance) in active:  # super().compile() of the same optimizer: one span
        return None
    optimizers.before_compile(instance)  # the one error we raise on purpose here: before any LM call
    try:
        name = type(instance).__name__
        attrs = {A.SPAN_KIND: "compile", A.PHASE: "train",
                 A.OPTIMIZER_NAME: name}
        _patch_optimizer_internals(instance)
        span, token = start(rt.tracer, f"compile {name}", attrs)
        state = _context.current()
        return (span, token, _IN_COMPILE.set(active + (id(instance),)),
                # An inner compile (MIPROv2's bootstrap) spends for the outer optimizer: cost is labelled with it.
                _context.var().set(_context.RunContext(state.budgets, "train", state.optimizer or name, None,
                                                       state.lm_role)),
                CURRENT_MODULE.set(None), optimizers.begin_compile(instance, args, kwargs, span))
    except Exception:
        internal_error("compile span start")
        return None


def _compile_end(state, result, exc):
    span, token, compile_token, run_token, mod_token, optimizer_state = state
    try:
        optimizers.end_compile(optimizer_state)
    except Exception:
        internal_error("compile end")
    CURRENT_MODULE.reset(mod_token)
    _context.var().reset(run_token)
    _IN_COMPILE.reset(compile_token)
    finish(span, token, exc)


_MODULE_SPAN = _around(_module_begin, _module_end)
_LM_SPAN = (_around(_lm_begin, _lm_end)[0], _lm_async)
_EVALUATE_SPAN = _around(_evaluate_begin, _evaluate_end)
_COMPILE_SPAN = _around(_compile_begin, _compile_end)


def _parallel_execute(wrapped, instance, args, kwargs):
    """Carry the OTel context and our run state into each task: DSPy's pool does not copy contextvars."""
    if _runtime.active() is None:
        return wrapped(*args, **kwargs)
    try:
        function = kwargs.pop("function") if "function" in kwargs else args[0]
        rest = args[1:] if args and args[0] is function else args
        in_context = user_threads.carried(function)
    except Exception:
        internal_error("parallel context")
        return wrapped(*args, **kwargs)
    return wrapped(in_context, *rest, **kwargs)


# -- usage capture hooks --------------------------------------------------------------------------------

def _capture_finalize(wrapped, instance, args, kwargs):
    try:
        lm = args[0] if args else kwargs.get("lm")
        result = args[2] if len(args) > 2 else kwargs.get("result")
        usage_capture.capture_from_call_result(lm, result)
    except Exception:
        internal_error("usage capture (finalize)")
    return wrapped(*args, **kwargs)


def _capture_process_response(wrapped, instance, args, kwargs):
    try:
        usage_capture.capture_from_provider_response(instance, args[0] if args else kwargs.get("response"))
    except Exception:
        internal_error("usage capture (_process_lm_response)")
    return wrapped(*args, **kwargs)


def _capture_finalize_lm_response(wrapped, instance, args, kwargs):
    try:
        usage_capture.capture_from_lm_response(instance, args[1] if len(args) > 1 else kwargs.get("response"))
    except Exception:
        internal_error("usage capture (_finalize_lm_response)")
    return wrapped(*args, **kwargs)


def _keep_cached_usage(wrapped, instance, args, kwargs):
    """DSPy's cache clears `usage` on a hit (LiteLLM responses; both versions). The first call's usage is
    what a hit is worth (its economic cost), so a copy rides along on the returned response."""
    response = args[0] if args else kwargs.get("response")
    usage = None
    try:
        usage = copy.deepcopy(getattr(response, "usage", None)) if response is not None else None
    except Exception:
        internal_error("usage capture (cache hit)")
    out = wrapped(*args, **kwargs)
    if usage:
        try:
            object.__setattr__(out, usage_capture.CACHED_USAGE_ATTR, usage)
        except Exception:  # noqa: BLE001 - an object that refuses attributes: the hit is estimated instead
            pass
    return out


# -- apply / remove ----------------------------------------------------------------------------------------

def _all_subclasses(cls: type) -> list[type]:
    seen, stack = [], [cls]
    while stack:
        current = stack.pop()
        for sub in current.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


_adapter_wrappers = {
    "format": _simple_span("adapter.format", lambda i, a, k: f"format {type(i).__name__}", guard=_IN_ADAPTER_OP,
                           phase=False),
    "parse": _simple_span("adapter.parse", lambda i, a, k: f"parse {type(i).__name__}", guard=_IN_ADAPTER_OP,
                          phase=False),
}


_ADAPTER_KEYS = ("dspy.adapter.format.duration_s", "dspy.adapter.parse.duration_s")


def _adapter_attributes(timings: list[Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {key: t for key, t in zip(_ADAPTER_KEYS, timings[:2], strict=True) if t is not None}
    attrs["dspy.adapter.name"] = timings[2]
    return attrs


def _timed_adapter_op(op: str) -> Wrappers:
    """`adapter_spans="attributes"`: the adapter's format/parse timed onto the enclosing (predictor) span instead
    of a span each: `dspy.adapter.<op>.duration_s` (summed when a predictor formats or parses more than once,
    e.g. a JSONAdapter fallback), `dspy.adapter.name`, and a `dspy.adapter.<op>.error` event for a failure
    DSPy may catch itself. A span costs ~35 us in the SDK here; a timing and two attributes, a few.

    Inside a module span of ours (the usual case) the timings are kept with it and written with its roll-up
    when it ends: one attribute write per span instead of a read and a write per format/parse. Outside one
    (an adapter called directly), they go onto the current span at once.

    The usual case (inside a recording module span of ours) runs inline in its own sync wrapper rather
    than through `_around`: this runs twice per LM call, and the begin/end calls `_around` makes cost two
    Python calls more each time. Everything else goes through `_around`."""
    key = f"dspy.adapter.{op}.duration_s"
    index = _ADAPTER_KEYS.index(key)  # its slot in the module span's timings

    def where() -> tuple[Any, Any] | None:
        """(span, timings) to time onto, or None to run untimed."""
        if _runtime.active() is None or _IN_ADAPTER_OP.get():
            return None
        module = CURRENT_MODULE.get()
        if module is not None:  # our module span: timings kept with it, or nothing if it records nothing
            return None if module[2] is None else (None, module[2])
        span = trace.get_current_span()  # not recording covers `unsampled` (dropped trace, no-op tracer) too
        return (span, None) if span.is_recording() else None

    def timed(target: tuple[Any, Any], instance: Any, started: float, exc: BaseException | None) -> None:
        span, timings = target
        try:
            elapsed = time.perf_counter() - started
            if timings is not None:
                timings[index] = (timings[index] or 0.0) + elapsed
                timings[2] = type(instance).__name__
                if exc is not None:
                    timings[3].add_event(f"dspy.adapter.{op}.error", {A.ERROR_TYPE: type(exc).__qualname__})
                return
            before = getattr(span, "attributes", None) or {}
            span.set_attributes({key: before.get(key, 0.0) + elapsed, "dspy.adapter.name": type(instance).__name__})
            if exc is not None:
                span.add_event(f"dspy.adapter.{op}.error", {A.ERROR_TYPE: type(exc).__qualname__})
        except Exception:
            internal_error(f"adapter {op} timing")

    def begin(instance, args, kwargs):
        target = where()
        return None if target is None else (target, instance, _IN_ADAPTER_OP.set(True), time.perf_counter())

    def end(state, result, exc):
        target, instance, guard, started = state
        _IN_ADAPTER_OP.reset(guard)
        timed(target, instance, started, exc)

    # Every case but the usual one (and every async call) through the shared `_around` mechanism.
    general_sync, async_wrapper = _around(begin, end)

    def sync_wrapper(wrapped, instance, args, kwargs):
        # `begin()`/`end()` inline for the usual case (inside a recording module span of ours).
        if _runtime.active() is None or _IN_ADAPTER_OP.get():
            return wrapped(*args, **kwargs)
        module = CURRENT_MODULE.get()
        if module is None:
            return general_sync(wrapped, instance, args, kwargs)
        timings = module[2]
        if timings is None:  # our module span here records nothing (sampled out): neither does its adapter
            return wrapped(*args, **kwargs)
        guard = _IN_ADAPTER_OP.set(True)
        started = time.perf_counter()
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _IN_ADAPTER_OP.reset(guard)
            timed((None, timings), instance, started, exc)
            raise
        _IN_ADAPTER_OP.reset(guard)
        try:
            timings[index] = (timings[index] or 0.0) + (time.perf_counter() - started)
            timings[2] = type(instance).__name__
        except Exception:
            internal_error(f"adapter {op} timing")
        return result

    return sync_wrapper, async_wrapper


_timed_adapter_wrappers = {"format": _timed_adapter_op("format"), "parse": _timed_adapter_op("parse")}


def _wrap_subclass_methods(base: type, names: dict[str, Callable[..., Any]]) -> None:
    for cls in [base, *_all_subclasses(base)]:
        for name, wrapper in names.items():
            if name in cls.__dict__:
                _patches.wrap(cls, name, wrapper)


def _hook_new_subclasses(base: type, names: dict[str, Callable[..., Any]]) -> None:
    """Subclasses defined after instrument() (a user's adapter or optimizer) get wrapped as they are made."""
    original = base.__dict__.get("__init_subclass__")

    def init_subclass(cls, **kw):
        if original is not None:
            original.__func__(cls, **kw)
        else:
            super(base, cls).__init_subclass__(**kw)
        if _runtime.active() is not None:
            for name, wrapper in names.items():
                if name in cls.__dict__:
                    _patches.wrap(cls, name, wrapper)

    base.__init_subclass__ = classmethod(init_subclass)
    _patches.applied.append((base, "__init_subclass__", original))


def apply(*, adapter_spans: bool | str = "attributes") -> None:
    import dspy
    from dspy.adapters.base import Adapter
    from dspy.clients.base_lm import BaseLM
    from dspy.teleprompt.teleprompt import Teleprompter
    from dspy.utils.parallelizer import ParallelExecutor

    _patches.wrap(dspy.Module, "__call__", _MODULE_SPAN)
    _patches.wrap(dspy.Module, "acall", _MODULE_SPAN)
    # BaseLM and every subclass that defines these itself (one overriding __call__ without super(), or
    # another instrumentation's leftovers): each would otherwise bypass the BaseLM wrapper.
    # The two usage hooks are DSPy 3.3's (private): wrapped only where a class defines them.
    _wrap_subclass_methods(BaseLM, {"__call__": _LM_SPAN, "acall": _LM_SPAN,
                                    "_process_lm_response": _capture_process_response,
                                    "_finalize_lm_response": _capture_finalize_lm_response})
    if adapter_spans:  # spans: two of the four spans of a Predict call; "attributes": timings on the predictor span
        wrappers = _timed_adapter_wrappers if adapter_spans == "attributes" else _adapter_wrappers
        _wrap_subclass_methods(Adapter, wrappers)
        _hook_new_subclasses(Adapter, wrappers)
    tool_span = _simple_span("tool", lambda i, a, k: f"execute_tool {getattr(i, 'name', type(i).__name__)}",
                             _tool_attrs)
    _patches.wrap(dspy.Tool, "__call__", tool_span)
    _patches.wrap(dspy.Tool, "acall", tool_span)
    _patches.wrap(dspy.Evaluate, "__call__", _EVALUATE_SPAN)
    _wrap_subclass_methods(Teleprompter, {"compile": _COMPILE_SPAN})
    _hook_new_subclasses(Teleprompter, {"compile": _COMPILE_SPAN})
    retrieve_span = _simple_span("retriever", lambda i, a, k: f"retrieve {type(i).__name__}")
    _patches.wrap(dspy.Retrieve, "__call__", retrieve_span)
    embeddings = getattr(dspy, "Embeddings", None)
    if isinstance(embeddings, type):
        _patches.wrap(embeddings, "__call__", retrieve_span)
    _patches.wrap(ParallelExecutor, "execute", _parallel_execute)
    user_threads.apply(_patches.wrap)
    clients.apply(_patches.wrap)

    # The first call's usage on a DSPy cache hit: private on both versions, so feature-detected.
    try:
        cache_cls = importlib.import_module("dspy.clients.cache").Cache
        if callable(getattr(cache_cls, "_prepare_cached_response", None)):
            _patches.wrap(cache_cls, "_prepare_cached_response", _keep_cached_usage)
    except (ImportError, AttributeError):
        pass
    # Usage capture on DSPy 3.4: private, so feature-detected and optional.
    try:
        execution = importlib.import_module("dspy.clients.execution")
        if callable(getattr(execution, "finalize", None)):
            _patches.wrap(execution, "finalize", _capture_finalize)
    except ImportError:
        pass
    attempts.apply(_patches.wrap, lambda attribute: id(attribute) in _patches._ours)



def remove() -> None:
    clients.remove()
    _patches.remove()
