"""LLM clients called directly (a tool's own OpenAI client, a helper calling LiteLLM): admitted like DSPy's calls.

A budget that only sees `dspy.LM` leaves a side door: an OpenAI or Anthropic client inside a ReAct tool, or
`litellm.completion` in a helper, spends without admission. These wrappers put the same station on those
call points (LiteLLM `completion`/`acompletion`/`embedding`/`aembedding`; the OpenAI SDK's chat completions,
responses and embeddings `create`; the Anthropic SDK's messages `create`; sync and async, streaming too): the
same LMCall, worst case, admission, settlement, span and reports as a DSPy call. A call made while one of ours
is already in progress (DSPy going through LiteLLM, LiteLLM through the OpenAI SDK) passes through: it is
counted once, by the outermost.

The client libraries are patched when they are imported (wrapt's post-import hooks), so `instrument()` does not
import LiteLLM or the SDKs itself.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import context as otel_context

from otel_dspy_cost import _context, _redact, _runtime
from otel_dspy_cost.budgets.accounting import LMCall
from otel_dspy_cost.instrumentation import lm_call
from otel_dspy_cost.pricing.cost import Usage, usage_from_openai, usage_from_verbatim
from otel_dspy_cost.telemetry.spans import finish_detached, internal_error

logger = logging.getLogger("otel_dspy_cost")


class _Client:
    """How one client's call reads: its model name (with our provider prefix), messages, and usage."""

    def __init__(self, prefix: str, operation: str, usage: Callable[[Any], Usage | None],
                 messages: Callable[[tuple, dict], Any] | None = None):
        self.prefix, self.operation, self.usage = prefix, operation, usage
        self.messages = messages or (lambda args, kwargs: kwargs.get("messages"))


def _anthropic_usage(usage: Any) -> Usage | None:
    """The Anthropic SDK's own usage: cache reads and writes apart from input tokens."""
    if usage is None:
        return None
    get = (lambda k: usage.get(k)) if isinstance(usage, dict) else (lambda k: getattr(usage, k, None))
    creation = get("cache_creation")
    ttl = (creation.get("ephemeral_1h_input_tokens") if isinstance(creation, dict)
           else getattr(creation, "ephemeral_1h_input_tokens", 0)) or 0
    return usage_from_verbatim({"input_tokens": get("input_tokens"), "output_tokens": get("output_tokens"),
                                "cache_read_tokens": get("cache_read_input_tokens") or 0,
                                "cache_write_tokens": get("cache_creation_input_tokens") or 0}, "anthropic", ttl)


def _openai_like_usage(response: Any) -> Usage | None:
    if response is not None and not hasattr(response, "usage") and callable(getattr(response, "parse", None)):
        response = response.parse()  # `.with_raw_response.create(...)`: the SDK caches what it parses
    usage = response.get("usage") if isinstance(response, dict) else getattr(response, "usage", None)
    return usage_from_openai(usage)


def _responses_messages(args: tuple, kwargs: dict) -> Any:
    return [kwargs.get("instructions"), kwargs.get("input")]


def _anthropic_messages(args: tuple, kwargs: dict) -> Any:
    return [kwargs.get("system"), kwargs.get("messages")]


def _embedding_input(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("input", args[1] if len(args) > 1 else None)


def _litellm_messages(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("messages", args[1] if len(args) > 1 else None)


_LITELLM_CHAT = _Client("", "chat", _openai_like_usage, _litellm_messages)
_LITELLM_STREAM_BUILDER = _Client("", "stream_builder", lambda response: None)
_LITELLM_EMBED = _Client("", "embeddings", _openai_like_usage, _embedding_input)
_OPENAI_CHAT = _Client("openai/", "chat", _openai_like_usage)
_OPENAI_RESPONSES = _Client("openai/", "chat", _openai_like_usage, _responses_messages)
_OPENAI_EMBED = _Client("openai/", "embeddings", _openai_like_usage, _embedding_input)
_ANTHROPIC = _Client("anthropic/", "chat", lambda r: _anthropic_usage(getattr(r, "usage", None)),
                     _anthropic_messages)

# module -> [(owner path inside it, attribute, client)]
_POINTS: dict[str, list[tuple[str, str, _Client]]] = {
    "litellm": [("", "completion", _LITELLM_CHAT), ("", "acompletion", _LITELLM_CHAT),
                ("", "embedding", _LITELLM_EMBED), ("", "aembedding", _LITELLM_EMBED),
                ("", "stream_chunk_builder", _LITELLM_STREAM_BUILDER)],
    "openai": [("resources.chat.completions.Completions", "create", _OPENAI_CHAT),
               ("resources.chat.completions.AsyncCompletions", "create", _OPENAI_CHAT),
               ("resources.responses.Responses", "create", _OPENAI_RESPONSES),
               ("resources.responses.AsyncResponses", "create", _OPENAI_RESPONSES),
               ("resources.embeddings.Embeddings", "create", _OPENAI_EMBED),
               ("resources.embeddings.AsyncEmbeddings", "create", _OPENAI_EMBED)],
    "anthropic": [("resources.messages.Messages", "create", _ANTHROPIC),
                  ("resources.messages.AsyncMessages", "create", _ANTHROPIC)],
}


def _fix_model(client: _Client, model: str) -> str:
    """LiteLLM's names already carry the provider (a bare name is OpenAI's, as DSPy reads it)."""
    if client.prefix == "" or model.startswith(client.prefix):
        return model
    return f"{client.prefix}{model}"


def _begin(client: _Client, args: tuple, kwargs: dict):
    """The call and its span, before admission; None passes the call through (nested in one of ours, or not
    instrumented, or our own failure)."""
    rt = _runtime.active()
    if rt is None or _context.CURRENT_CALL.get() is not None:
        return None
    try:
        model = _fix_model(client, str(kwargs.get("model", args[0] if args and isinstance(args[0], str) else "")))
        messages = client.messages(args, kwargs)
        request = {k: v for k, v in kwargs.items() if k not in ("messages", "input", "model")}
        if request:
            _redact.remember(_redact.secrets_of(request))
        call, merged = lm_call.new_client_call(model, client.operation, messages, request)
        span, token = lm_call.open_span(rt, call, merged, None, messages)
        return rt, span, token, call, messages
    except Exception:
        internal_error("direct client call start")
        return None


# -- streams: ask for usage, and tell when none came back ---------------------------------------------------

_stream_options: dict[str, bool] = {}  # model -> whether LiteLLM passes `stream_options` on to its provider


def _ask_for_stream_usage(args: tuple, kwargs: dict) -> None:
    """DSPy's LiteLLM engine streams (`dspy.streamify`) without `stream_options.include_usage`, so the provider
    sends no usage and LiteLLM counts the visible text itself (no cached or reasoning tokens). Asked for here,
    inside a DSPy call only (DSPy assembles the chunks with LiteLLM's builder, which reads the usage chunk; a
    user's own stream would get one more chunk than it expects), where LiteLLM supports it for the provider."""
    if not kwargs.get("stream") or kwargs.get("stream_options") is not None or _context.CURRENT_CALL.get() is None:
        return
    model = str(kwargs.get("model", args[0] if args and isinstance(args[0], str) else ""))
    if model not in _stream_options:
        try:
            import litellm

            provider = litellm.get_llm_provider(model)[1]
            supported = litellm.get_supported_openai_params(model=model, custom_llm_provider=provider) or ()
            _stream_options[model] = "stream_options" in supported
        except Exception:  # noqa: BLE001 - a model LiteLLM cannot place: the request stays as DSPy made it
            _stream_options[model] = False
    if _stream_options[model]:
        kwargs["stream_options"] = {"include_usage": True}


def _built_from_stream(wrapped, instance, args, kwargs):
    """LiteLLM's `stream_chunk_builder`, where DSPy assembles a streamed answer: when no chunk carried the
    provider's usage, the builder counts tokens from the text; the call is then one without usage (priced by
    `instrument(missing_usage=...)`), not a call with exact usage."""
    call = _context.CURRENT_CALL.get()
    if call is not None:
        try:
            chunks = kwargs.get("chunks", args[0] if args else None)
            if isinstance(chunks, list) and chunks and not any(getattr(c, "usage", None) for c in chunks):
                call.usage_counted_by_client = True
        except Exception:
            internal_error("stream usage check")
    return wrapped(*args, **kwargs)


def _wrapper(client: _Client) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(sync, async) wrappers for one client call point."""
    from otel_dspy_cost.instrumentation import patches  # the LM wrapper's admission and end: one path

    if client is _LITELLM_STREAM_BUILDER:
        return _built_from_stream, _built_from_stream
    ask_for_usage = client is _LITELLM_CHAT

    def sync_wrapper(wrapped, instance, args, kwargs):
        if ask_for_usage:
            _ask_for_stream_usage(args, kwargs)
        begun = _begin(client, args, kwargs)
        if begun is None:
            return wrapped(*args, **kwargs)
        rt, span, token, call, messages = begun
        try:
            rt.accountant.admit(call)
        except BaseException as exc:
            patches._admission_failed(rt, span, token, call, exc)
        state = rt, span, token, call, _context.CURRENT_CALL.set(call), None, messages
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            patches._lm_end(state, None, exc)
            raise
        return _finish(client, state, result)

    async def async_wrapper(wrapped, instance, args, kwargs):
        if ask_for_usage:
            _ask_for_stream_usage(args, kwargs)
        begun = _begin(client, args, kwargs)
        if begun is None:
            return await wrapped(*args, **kwargs)
        rt, span, token, call, messages = begun
        try:
            await rt.accountant.admit_async(call)
        except BaseException as exc:
            patches._admission_failed(rt, span, token, call, exc)
        state = rt, span, token, call, _context.CURRENT_CALL.set(call), None, messages
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            patches._lm_end(state, None, exc)
            raise
        return _finish(client, state, result)

    return sync_wrapper, async_wrapper


def _finish(client: _Client, state: tuple, result: Any) -> Any:
    """A response: its usage into the call and the call settled; a stream: settled when it ends."""
    if _is_stream(result):  # read later, maybe elsewhere: the span stops being current here, ends with the stream
        rt, span, token, call, call_token, prompt, messages = state
        _context.CURRENT_CALL.reset(call_token)
        if token is not None:
            otel_context.detach(token)
        return _Stream(result, client, (rt, span, call, messages))
    _capture(client, state[3], result)
    from otel_dspy_cost.instrumentation import patches

    patches._lm_end(state, None, None)
    return result


def _capture(client: _Client, call: LMCall, response: Any) -> None:
    try:
        usage = client.usage(response)
    except Exception:
        internal_error("direct client usage")
        usage = None
    call.captured = True
    call.usage = usage
    model = getattr(response, "model", None)
    if isinstance(model, str):
        call.response_model = model


def _is_stream(result: Any) -> bool:
    return (not isinstance(result, (dict, list, str, bytes)) and not hasattr(result, "usage")
            and (hasattr(result, "__next__") or hasattr(result, "__anext__")))


class _Stream(wrapt.ObjectProxy):
    """A streamed response, settled once when it ends (exhausted, closed, failed, or dropped): with the usage a
    chunk reported (OpenAI's `stream_options={"include_usage": True}`, Anthropic's message events), else, like
    any call without usage, at its worst case."""

    def __init__(self, stream: Any, client: _Client, state: tuple):
        super().__init__(stream)
        self._self_client, self._self_state = client, state
        self._self_usage: dict[str, int] = {}
        self._self_done = False
        # Dropped without being read to the end: settled when collected (its reservation must not stay held).
        self._self_finalizer = weakref.finalize(self, _settle_stream, state, self._self_usage, None)

    def __iter__(self):
        return self

    def __aiter__(self):
        return self

    def __next__(self):
        try:
            chunk = self.__wrapped__.__next__()
        except StopIteration:
            self._self_end(None)
            raise
        except BaseException as exc:
            self._self_end(exc)
            raise
        self._self_read(chunk)
        return chunk

    async def __anext__(self):
        try:
            chunk = await self.__wrapped__.__anext__()
        except StopAsyncIteration:
            self._self_end(None)
            raise
        except BaseException as exc:
            self._self_end(exc)
            raise
        self._self_read(chunk)
        return chunk

    def close(self):
        try:
            return self.__wrapped__.close()
        finally:
            self._self_end(None)

    def __exit__(self, *exc_info):
        try:
            return self.__wrapped__.__exit__(*exc_info)
        finally:
            self._self_end(None)

    async def __aexit__(self, *exc_info):
        try:
            return await self.__wrapped__.__aexit__(*exc_info)
        finally:
            self._self_end(None)

    def _self_read(self, chunk: Any) -> None:
        try:
            _read_chunk(chunk, self._self_usage)
        except Exception:
            internal_error("stream usage")

    def _self_end(self, exc: BaseException | None) -> None:
        if self._self_done:
            return
        self._self_done = True
        self._self_finalizer.detach()
        _settle_stream(self._self_state, self._self_usage, exc)


def _read_chunk(chunk: Any, seen: dict[str, int]) -> None:
    """Usage as streams report it: an OpenAI/LiteLLM chunk's `usage`, Anthropic's message_start/message_delta."""
    usage = getattr(chunk, "usage", None)
    message = getattr(chunk, "message", None)
    if usage is None and message is not None:  # Anthropic message_start: the input side
        usage = getattr(message, "usage", None)
    if usage is None:
        return
    fields = usage if isinstance(usage, dict) else {k: getattr(usage, k, None) for k in (
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "cache_read_input_tokens",
        "cache_creation_input_tokens", "prompt_tokens_details", "completion_tokens_details")}
    for key, value in fields.items():
        if isinstance(value, int) and not isinstance(value, bool) and value:
            seen[key] = max(seen.get(key, 0), value)
        elif value is not None and not isinstance(value, int):
            seen[key] = value  # type: ignore[assignment]


def _settle_stream(state: tuple, seen: dict[str, Any], exc: BaseException | None) -> None:
    from otel_dspy_cost.instrumentation import patches

    rt, span, call, messages = state
    try:
        if "input_tokens" in seen and "prompt_tokens" not in seen:
            call.usage = _anthropic_usage(seen)
        else:
            call.usage = usage_from_openai(seen) if seen else None
        call.captured = exc is None or call.usage is not None
        patches.lm_settle(rt, span, call, None, messages, None, exc)
    except Exception:
        internal_error("stream settlement")
    finish_detached(span, exc)


# -- patching on import -----------------------------------------------------------------------------------

_applied: list[tuple[Any, str, Any]] = []
_hooked: set[str] = set()
_active = [False]


def apply(wrap: Callable[[Any, str, Any], None]) -> None:
    """Patch each client library now if it is imported, else as soon as it is (a post-import hook)."""
    _active[0] = True
    for module_name in _POINTS:
        if module_name in sys.modules and getattr(sys.modules[module_name], "__spec__", None) is not None:
            _patch(module_name, wrap)
        elif module_name not in _hooked:
            _hooked.add(module_name)
            wrapt.register_post_import_hook(lambda module, name=module_name: _on_import(name), module_name)
    _wrap_fn[0] = wrap


_wrap_fn: list[Callable[[Any, str, Any], None] | None] = [None]


def _on_import(module_name: str) -> None:
    wrap = _wrap_fn[0]
    if _active[0] and wrap is not None:
        _patch(module_name, wrap)


def remove() -> None:
    _active[0] = False


def _patch(module_name: str, wrap: Callable[[Any, str, Any], None]) -> None:
    for path, attribute, client in _POINTS[module_name]:
        try:
            owner: Any = importlib.import_module(module_name)
            if path:
                module_path, _, class_path = path.rpartition(".")
                owner = importlib.import_module(f"{module_name}.{module_path}")
                owner = getattr(owner, class_path)
            original = getattr(owner, attribute, None)
            if callable(original):
                # The SDKs' async `create` is a plain function returning a coroutine (a decorator hides the
                # `async def`): which of the pair is told by what it wraps.
                sync_wrapper, async_wrapper = _wrapper(client)
                wrap(owner, attribute, async_wrapper if inspect.iscoroutinefunction(inspect.unwrap(original))
                     else sync_wrapper)
        except Exception:  # noqa: BLE001 - a client version without this call point: nothing to admit there
            logger.debug("otel-dspy-cost: %s.%s.%s not patched", module_name, path, attribute, exc_info=True)
