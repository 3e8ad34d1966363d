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
import importlib
import logging
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import context as otel_context

from . import _attributes as A
from . import _context, _lm_span, _runtime
from ._spans import CURRENT_MODULE, finish, internal_error, start

logger = logging.getLogger("otel_dspy_cost")

_IN_ADAPTER_OP: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_dspy_cost_adapter_op", default=False)
_IN_COMPILE: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar("otel_dspy_cost_compile", default=())


class _OurWrapper(wrapt.FunctionWrapper):
    """Marks our wrappers so a second instrument() never wraps them twice."""


class _Patches:
    """Remembers every (owner, name, original) it replaced so `remove()` restores DSPy exactly."""

    def __init__(self) -> None:
        self.applied: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        original = owner.__dict__.get(name)
        if original is None or isinstance(original, _OurWrapper):
            return
        # Another instrumentation's wrapper is wrapped too: ours sits outside it and restores it on removal.
        setattr(owner, name, _OurWrapper(original, wrapper))
        self.applied.append((owner, name, original))

    def remove(self) -> None:
        for owner, name, original in reversed(self.applied):
            try:
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            except Exception:
                internal_error("uninstrument")
        self.applied.clear()


_patches = _Patches()


# -- module path --------------------------------------------------------------------------------------

def _child_name(parent: Any, child: Any) -> str | None:
    try:
        items = vars(parent).items()
    except TypeError:
        return None
    for name, value in items:
        if value is child:
            return name
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if item is child:
                    return f"{name}[{i}]"
        elif isinstance(value, dict):
            for key, item in value.items():
                if item is child:
                    return f"{name}[{key}]"
    return None


def _module_path(instance: Any) -> str:
    parent = CURRENT_MODULE.get()
    if parent is None:
        return type(instance).__name__
    if parent[0] is instance:
        return parent[1]
    return f"{parent[1]}.{_child_name(parent[0], instance) or type(instance).__name__}"


def _is_predictor(instance: Any) -> bool:
    import dspy

    return isinstance(instance, dspy.Predict)


# -- wrappers ---------------------------------------------------------------------------------------------

def _module_call(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    rt = _runtime.active()
    if rt is None:
        return wrapped(*args, **kwargs)
    try:
        path = _module_path(instance)
        kind = "predictor" if _is_predictor(instance) else "module"
        attrs = {A.SPAN_KIND: kind, A.MODULE_PATH: path, A.MODULE_CLASS: type(instance).__qualname__,
                 A.PHASE: _context.current().phase, A.INSTRUMENTATION: "otel-dspy-cost"}
        span, token = start(rt.tracer, f"{'predict' if kind == 'predictor' else 'module'} {path}", attrs)
        mod_token = CURRENT_MODULE.set((instance, path))
    except Exception:
        internal_error("module span start")
        return wrapped(*args, **kwargs)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        CURRENT_MODULE.reset(mod_token)
        finish(span, token, exc)
        raise
    CURRENT_MODULE.reset(mod_token)
    finish(span, token)
    return result


async def _module_acall_impl(wrapped, instance, args, kwargs):
    rt = _runtime.active()
    if rt is None:
        return await wrapped(*args, **kwargs)
    try:
        path = _module_path(instance)
        kind = "predictor" if _is_predictor(instance) else "module"
        attrs = {A.SPAN_KIND: kind, A.MODULE_PATH: path, A.MODULE_CLASS: type(instance).__qualname__,
                 A.PHASE: _context.current().phase, A.INSTRUMENTATION: "otel-dspy-cost"}
        span, token = start(rt.tracer, f"{'predict' if kind == 'predictor' else 'module'} {path}", attrs)
        mod_token = CURRENT_MODULE.set((instance, path))
    except Exception:
        internal_error("module span start")
        return await wrapped(*args, **kwargs)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        CURRENT_MODULE.reset(mod_token)
        finish(span, token, exc)
        raise
    CURRENT_MODULE.reset(mod_token)
    finish(span, token)
    return result


def _module_acall(wrapped, instance, args, kwargs):
    return _module_acall_impl(wrapped, instance, args, kwargs)


def _lm_begin(rt: _runtime.Runtime, instance: Any, args: tuple, kwargs: dict):
    prompt = kwargs.get("prompt", args[0] if args else None)
    messages = kwargs.get("messages")
    call_kwargs = {k: v for k, v in kwargs.items() if k not in ("prompt", "messages")}
    attrs = _lm_span.start_attributes(rt, instance, prompt, messages, call_kwargs)
    model = attrs[A.GEN_AI_REQUEST_MODEL]
    return prompt, messages, model, f"{attrs[A.GEN_AI_OPERATION]} {model}", attrs


def _lm_call(wrapped, instance, args, kwargs):
    rt = _runtime.active()
    if rt is None or _lm_span.CURRENT_CALL.get() is not None and _lm_span.CURRENT_CALL.get().lm is instance:
        return wrapped(*args, **kwargs)
    try:
        prompt, messages, model, name, attrs = _lm_begin(rt, instance, args, kwargs)
    except Exception:
        internal_error("LM span start")
        return wrapped(*args, **kwargs)
    span, token = start(rt.tracer, name, attrs)  # the budget processor may refuse here, before any request
    rec = _lm_span.LMCallRecord(instance)
    rec_token = _lm_span.CURRENT_CALL.set(rec)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        _lm_span.CURRENT_CALL.reset(rec_token)
        _lm_end(rt, span, rec, model, prompt, messages, None, failed=True)
        finish(span, token, exc)
        raise
    _lm_span.CURRENT_CALL.reset(rec_token)
    _lm_end(rt, span, rec, model, prompt, messages, result)
    finish(span, token)
    return result


async def _lm_acall_impl(wrapped, instance, args, kwargs):
    rt = _runtime.active()
    if rt is None or _lm_span.CURRENT_CALL.get() is not None and _lm_span.CURRENT_CALL.get().lm is instance:
        return await wrapped(*args, **kwargs)
    try:
        prompt, messages, model, name, attrs = _lm_begin(rt, instance, args, kwargs)
    except Exception:
        internal_error("LM span start")
        return await wrapped(*args, **kwargs)
    span, token = start(rt.tracer, name, attrs)
    rec = _lm_span.LMCallRecord(instance)
    rec_token = _lm_span.CURRENT_CALL.set(rec)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        _lm_span.CURRENT_CALL.reset(rec_token)
        _lm_end(rt, span, rec, model, prompt, messages, None, failed=True)
        finish(span, token, exc)
        raise
    _lm_span.CURRENT_CALL.reset(rec_token)
    _lm_end(rt, span, rec, model, prompt, messages, result)
    finish(span, token)
    return result


def _lm_acall(wrapped, instance, args, kwargs):
    return _lm_acall_impl(wrapped, instance, args, kwargs)


def _lm_end(rt, span, rec, model, prompt, messages, outputs, failed: bool = False) -> None:
    try:
        if failed and not rec.captured:
            # The provider call failed before usage was known: nothing billed that we can see.
            span.set_attributes({A.USAGE_MISSING: True, A.CACHE_HIT: False, A.COST_USD: 0.0,
                                 A.COST_ECONOMIC_USD: 0.0, A.GEN_AI_INPUT_TOKENS: 0, A.GEN_AI_OUTPUT_TOKENS: 0})
            return
        _lm_span.end_attributes(rt, span, rec, model, prompt, messages, outputs)
    except Exception:
        internal_error("LM span end")


def _simple_span(kind: str, name_fn: Callable[[Any, tuple, dict], str],
                 attrs_fn: Callable[[Any, tuple, dict], dict] | None = None,
                 guard: contextvars.ContextVar[bool] | None = None):
    """A wrapper making one span around a sync or async method (adapter ops, tools, retrievers)."""

    def begin(instance, args, kwargs):
        rt = _runtime.active()
        if rt is None or (guard is not None and guard.get()):
            return None
        try:
            attrs = {A.SPAN_KIND: kind, A.INSTRUMENTATION: "otel-dspy-cost", A.PHASE: _context.current().phase}
            module = CURRENT_MODULE.get()
            if module is not None:
                attrs[A.MODULE_PATH] = module[1]
            if attrs_fn is not None:
                attrs.update(attrs_fn(instance, args, kwargs))
            span, token = start(rt.tracer, name_fn(instance, args, kwargs), attrs)
            guard_token = guard.set(True) if guard is not None else None
            return span, token, guard_token
        except Exception:
            internal_error(f"{kind} span start")
            return None

    def end(opened, exc=None):
        span, token, guard_token = opened
        if guard_token is not None:
            guard.reset(guard_token)
        finish(span, token, exc)

    async def run_async(wrapped, instance, args, kwargs):
        opened = begin(instance, args, kwargs)
        if opened is None:
            return await wrapped(*args, **kwargs)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            end(opened, exc)
            raise
        end(opened)
        return result

    def wrapper(wrapped, instance, args, kwargs):
        import inspect

        if inspect.iscoroutinefunction(wrapped):
            return run_async(wrapped, instance, args, kwargs)
        opened = begin(instance, args, kwargs)
        if opened is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            end(opened, exc)
            raise
        end(opened)
        return result

    return wrapper


def _tool_attrs(instance, args, kwargs):
    name = getattr(instance, "name", None) or type(instance).__name__
    attrs = {A.TOOL_NAME: str(name), A.GEN_AI_OPERATION: "execute_tool"}
    rt = _runtime.active()
    if rt is not None and rt.capture_content:
        from . import _redact

        attrs["gen_ai.tool.call.arguments"] = _redact.scrub(repr(kwargs)[:4000])
    return attrs


def _adapter_attrs(instance, args, kwargs):
    return {A.ADAPTER_CLASS: type(instance).__name__}


def _evaluate_call(wrapped, instance, args, kwargs):
    rt = _runtime.active()
    if rt is None:
        return wrapped(*args, **kwargs)
    try:
        program = kwargs.get("program", args[0] if args else None)
        devset = kwargs.get("devset") or getattr(instance, "devset", None) or []
        attrs = {A.SPAN_KIND: "evaluate", A.INSTRUMENTATION: "otel-dspy-cost", A.PHASE: _context.current().phase,
                 A.EVAL_SIZE: len(devset), A.EVAL_THREADS: int(kwargs.get("num_threads") or
                                                               getattr(instance, "num_threads", None) or 1),
                 A.MODULE_CLASS: type(program).__qualname__}
        metric = kwargs.get("metric") or getattr(instance, "metric", None)
        if metric is not None:
            attrs["dspy.evaluate.metric"] = getattr(metric, "__name__", type(metric).__name__)
        span, token = start(rt.tracer, f"evaluate {type(program).__name__}", attrs)
        mod_token = CURRENT_MODULE.set(None)  # the program called by Evaluate starts a fresh module path
    except Exception:
        internal_error("evaluate span start")
        return wrapped(*args, **kwargs)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        CURRENT_MODULE.reset(mod_token)
        finish(span, token, exc)
        raise
    CURRENT_MODULE.reset(mod_token)
    try:
        score = getattr(result, "score", result)
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            span.set_attribute(A.EVAL_SCORE, float(score))
    except Exception:
        internal_error("evaluate score")
    finish(span, token)
    return result


def _compile_call(wrapped, instance, args, kwargs):
    rt = _runtime.active()
    active = _IN_COMPILE.get()
    if rt is None or id(instance) in active:  # super().compile() of the same optimizer: one span
        return wrapped(*args, **kwargs)
    try:
        name = type(instance).__name__
        attrs = {A.SPAN_KIND: "compile", A.INSTRUMENTATION: "otel-dspy-cost", A.PHASE: "train",
                 A.OPTIMIZER_NAME: name}
        span, token = start(rt.tracer, f"compile {name}", attrs)
        compile_token = _IN_COMPILE.set(active + (id(instance),))
        state = _context.current()
        run_token = _context.var().set(_context.RunContext(state.budgets, "train", name, state.trial, state.lm_role))
        mod_token = CURRENT_MODULE.set(None)
    except Exception:
        internal_error("compile span start")
        return wrapped(*args, **kwargs)

    def restore():
        CURRENT_MODULE.reset(mod_token)
        _context.var().reset(run_token)
        _IN_COMPILE.reset(compile_token)

    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        restore()
        finish(span, token, exc)
        raise
    restore()
    finish(span, token)
    return result


def _parallel_execute(wrapped, instance, args, kwargs):
    """Carry the OTel context and our context vars into each task: DSPy's pool does not copy them."""
    if _runtime.active() is None:
        return wrapped(*args, **kwargs)
    try:
        function = kwargs.pop("function") if "function" in kwargs else args[0]
        rest = args[1:] if args and args[0] is function else args
        otel_ctx = otel_context.get_current()
        carried = [(var, var.get()) for var in (_context.var(), CURRENT_MODULE, _IN_COMPILE)]

        def in_context(item):
            token = otel_context.attach(otel_ctx)
            tokens = [(var, var.set(value)) for var, value in carried]
            try:
                return function(item)
            finally:
                for var, t in reversed(tokens):
                    var.reset(t)
                otel_context.detach(token)

        in_context.__name__ = getattr(function, "__name__", "in_context")
    except Exception:
        internal_error("parallel context")
        return wrapped(*args, **kwargs)
    return wrapped(in_context, *rest, **kwargs)


# -- usage capture hooks --------------------------------------------------------------------------------

def _capture_finalize(wrapped, instance, args, kwargs):
    try:
        lm = args[0] if args else kwargs.get("lm")
        result = args[2] if len(args) > 2 else kwargs.get("result")
        _lm_span.capture_from_call_result(lm, result)
    except Exception:
        internal_error("usage capture (finalize)")
    return wrapped(*args, **kwargs)


def _capture_process_response(wrapped, instance, args, kwargs):
    try:
        _lm_span.capture_from_provider_response(instance, args[0] if args else kwargs.get("response"))
    except Exception:
        internal_error("usage capture (_process_lm_response)")
    return wrapped(*args, **kwargs)


def _capture_finalize_lm_response(wrapped, instance, args, kwargs):
    try:
        _lm_span.capture_from_lm_response(instance, args[1] if len(args) > 1 else kwargs.get("response"))
    except Exception:
        internal_error("usage capture (_finalize_lm_response)")
    return wrapped(*args, **kwargs)


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
    "format": _simple_span("adapter.format", lambda i, a, k: f"format {type(i).__name__}", _adapter_attrs,
                           guard=_IN_ADAPTER_OP),
    "parse": _simple_span("adapter.parse", lambda i, a, k: f"parse {type(i).__name__}", _adapter_attrs,
                          guard=_IN_ADAPTER_OP),
}


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


def apply() -> None:
    import dspy
    from dspy.adapters.base import Adapter
    from dspy.clients.base_lm import BaseLM
    from dspy.teleprompt.teleprompt import Teleprompter
    from dspy.utils.parallelizer import ParallelExecutor

    _patches.wrap(dspy.Module, "__call__", _module_call)
    _patches.wrap(dspy.Module, "acall", _module_acall)
    _patches.wrap(BaseLM, "__call__", _lm_call)
    _patches.wrap(BaseLM, "acall", _lm_acall)
    # Subclasses that override __call__ without calling super() would otherwise be invisible.
    for cls in _all_subclasses(BaseLM):
        if "__call__" in cls.__dict__:
            _patches.wrap(cls, "__call__", _lm_call)
        if "acall" in cls.__dict__:
            _patches.wrap(cls, "acall", _lm_acall)
    _wrap_subclass_methods(Adapter, _adapter_wrappers)
    _hook_new_subclasses(Adapter, _adapter_wrappers)
    tool_span = _simple_span("tool", lambda i, a, k: f"execute_tool {getattr(i, 'name', type(i).__name__)}",
                             _tool_attrs)
    _patches.wrap(dspy.Tool, "__call__", tool_span)
    _patches.wrap(dspy.Tool, "acall", tool_span)
    _patches.wrap(dspy.Evaluate, "__call__", _evaluate_call)
    _wrap_subclass_methods(Teleprompter, {"compile": _compile_call})
    _hook_new_subclasses(Teleprompter, {"compile": _compile_call})
    retrieve_span = _simple_span("retriever", lambda i, a, k: f"retrieve {type(i).__name__}")
    _patches.wrap(dspy.Retrieve, "__call__", retrieve_span)
    embeddings = getattr(dspy, "Embeddings", None)
    if isinstance(embeddings, type):
        _patches.wrap(embeddings, "__call__", retrieve_span)
    _patches.wrap(ParallelExecutor, "execute", _parallel_execute)

    # Usage capture: private, so each is feature-detected and optional.
    try:
        execution = importlib.import_module("dspy.clients.execution")
        if callable(getattr(execution, "finalize", None)):
            _patches.wrap(execution, "finalize", _capture_finalize)
    except ImportError:
        pass
    # Subclasses (or another instrumentation's leftovers) may define these in their own __dict__ too.
    for cls in [BaseLM, *_all_subclasses(BaseLM)]:
        if "_process_lm_response" in cls.__dict__:
            _patches.wrap(cls, "_process_lm_response", _capture_process_response)
        if "_finalize_lm_response" in cls.__dict__:
            _patches.wrap(cls, "_finalize_lm_response", _capture_finalize_lm_response)


def remove() -> None:
    _patches.remove()
