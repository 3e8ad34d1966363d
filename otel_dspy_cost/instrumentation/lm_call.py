"""One LM call as an `LMCall`: its request bounds before the call, its usage and cost after, its span attributes.

Usage comes from DSPy's own finalisation step (3.4: `execution.finalize`; 3.3:
`BaseLM._process_lm_response` / `_finalize_lm_response`), captured into the call in progress held in
a ContextVar, because `on_lm_end` carries no usage and `lm.history[-1]` is racy across threads.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from opentelemetry.trace import SpanKind

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _redact
from otel_dspy_cost._runtime import Runtime
from otel_dspy_cost.budgets.accounting import NOT_SENT, OK, REJECTED, UNKNOWN, LMCall, classify_failure
from otel_dspy_cost.instrumentation import billed_units
from otel_dspy_cost.optimizers import runs as optimizer_runs
from otel_dspy_cost.pricing.cost import (
    MONEY_DIGITS,
    UNKNOWN_COST,
    CallCost,
    Usage,
    estimate_tokens,
)
from otel_dspy_cost.pricing.tokenizers import MESSAGE_OVERHEAD, REQUEST_OVERHEAD, SCHEMA_KWARGS, SCHEMA_OVERHEAD
from otel_dspy_cost.telemetry import viewers
from otel_dspy_cost.telemetry.processor import take_over_current
from otel_dspy_cost.telemetry.spans import skipped, start, unsampled

# Tokens an image may cost at most, per image part of a prompt (OpenAI's high-detail tiling of a
# 2048 px image and Anthropic's 1.15 MP cap both stay well below this; base64 bytes are counted too).
IMAGE_TOKENS_BOUND = 6_000
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})

_PROVIDERS = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
              "vertex_ai": "gcp.vertex_ai", "bedrock": "aws.bedrock", "groq": "groq", "mistral": "mistral_ai",
              "deepseek": "deepseek", "xai": "x_ai", "cohere": "cohere", "perplexity": "perplexity",
              "databricks": "databricks", "ollama": "ollama", "ollama_chat": "ollama"}
_OPERATIONS = {"chat": "chat", "text": "text_completion", "responses": "chat"}


def _str_len(value: str) -> int:
    """UTF-8 bytes of a string (every token is at least one byte): ASCII text needs no encoding pass."""
    return len(value) if value.isascii() else len(value.encode("utf-8", "ignore"))


def _text_len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return _str_len(value)
    if isinstance(value, dict):
        return sum(_text_len(v) for k, v in value.items() if k not in ("role", "type"))
    if isinstance(value, (list, tuple)):
        return sum(_text_len(v) for v in value)
    return len(str(value).encode("utf-8", "ignore"))


def _images(value: Any) -> int:
    if isinstance(value, dict):
        own = 1 if value.get("type") in _IMAGE_PARTS else 0
        return own + sum(_images(v) for v in value.values() if isinstance(v, (list, dict)))
    if isinstance(value, (list, tuple)):
        return sum(_images(v) for v in value)
    return 0


def input_tokens_bound(prompt: Any, messages: Any, request: dict[str, Any] | None = None) -> int:
    """An upper bound on prompt tokens: every token is at least one UTF-8 byte, plus chat overhead, plus
    tool/function and response-format schemas, plus `IMAGE_TOKENS_BOUND` per image.

    A tokenizer count would be tighter but is model-specific: admission asks for one near a cap, where the
    model's tokenizer ships offline (`pricing.tokenizers`); a bound is what keeps the no-overshoot guarantee
    true for every provider.
    """
    return _prompt_bound(prompt, messages, request)[0]


def _prompt_bound(prompt: Any, messages: Any, request: dict[str, Any] | None) -> tuple[int, Any]:
    """(`input_tokens_bound`, the messages when some content is not a plain string, else None)."""
    msgs = messages if messages is not None else [prompt]
    if type(msgs) is not list:
        return (_bound_extras(_text_len(msgs) + MESSAGE_OVERHEAD + REQUEST_OVERHEAD, request),
                None if isinstance(msgs, str) else msgs)
    bound = MESSAGE_OVERHEAD * len(msgs) + REQUEST_OVERHEAD
    multimodal = False
    for m in msgs:  # DSPy's chat shape ({"role": str, "content": str}) inline: this runs once per LM call
        if isinstance(m, dict):
            for k, v in m.items():
                if k == "role" or k == "type":
                    continue
                if type(v) is str:
                    bound += _str_len(v)
                else:
                    bound += _text_len(v)
                    multimodal = multimodal or (k == "content" and v is not None)
        else:
            bound += _text_len(m)
    if multimodal:
        bound += IMAGE_TOKENS_BOUND * _images(msgs)  # multimodal content parts: only then is it worth a walk
    return _bound_extras(bound, request), msgs if multimodal else None


# Request kwargs through which a call can be billed for units apart from text (`billed_units`).
_UNIT_KWARGS = frozenset({"modalities", "response_modalities", "audio", "tools", "web_search_options"})


def _bound_extras(bound: int, request: dict[str, Any] | None) -> int:
    """Tool/function and response-format schemas: the provider turns them into prompt tokens too."""
    if request:
        for key in SCHEMA_KWARGS:
            value = request.get(key)
            if value:  # schemas count their keys too: json text, as the provider receives it
                bound += len(json.dumps(value, default=str).encode("utf-8", "ignore")) + SCHEMA_OVERHEAD
    return bound


def _completions(request: dict[str, Any]) -> int:
    for key in ("n", "num_generations", "candidate_count"):
        value = request.get(key)
        if value is not None and isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return 1


def provider_of(model: str) -> str:
    if "/" in model:
        return _PROVIDERS.get(model.split("/", 1)[0].lower(), model.split("/", 1)[0].lower())
    return "openai"


# (model, model_type) -> (provider, operation): the same few per process, asked for on every call.
_NAMES: dict[tuple[str, str], tuple[str, str]] = {}


def _names(model: str, model_type: str) -> tuple[str, str]:
    names = _NAMES.get((model, model_type))
    if names is None:
        names = (provider_of(model), _OPERATIONS.get(model_type, "chat"))
        if len(_NAMES) < 4096:
            _NAMES[(model, model_type)] = names
    return names


def new_call(lm: Any, prompt: Any, messages: Any, kwargs: dict[str, Any]) -> tuple[LMCall, dict[str, Any]]:
    """The call about to be made, with everything admission needs; also the merged request kwargs."""
    model = str(getattr(lm, "model", "") or type(lm).__name__)
    lm_kwargs = getattr(lm, "kwargs", None) or {}
    merged = {**lm_kwargs, **kwargs} if kwargs else lm_kwargs
    max_tokens = merged.get("max_tokens") or merged.get("max_completion_tokens") or merged.get("max_output_tokens")
    if max_tokens is None:
        max_tokens = engine_max_tokens(lm, model, merged)
    state = _context.current()
    module = _context.CURRENT_MODULE.get()
    provider, operation = _names(model, getattr(lm, "model_type", "chat"))
    bound, multimodal = _prompt_bound(prompt, messages, merged)
    call = LMCall(
        model, provider, operation, bound,
        max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None,
        _completions(merged), module[1] if module is not None else "", state.phase, state.optimizer or "",
        state.trial, optimizer_runs.role_for(lm) or state.lm_role, state.budgets, lm)
    if multimodal is not None or not _UNIT_KWARGS.isdisjoint(merged):  # the usual request has none of them
        call.apart, call.searches = billed_units.request_units(merged, multimodal)
    call.prompt = (messages if messages is not None else [{"role": "user", "content": prompt}], merged)
    return call, merged


_ENGINE_DEFAULTS: dict[str, int | None] = {}


def engine_max_tokens(lm: Any, model: str, request: dict[str, Any]) -> int | None:
    """The `max_tokens` DSPy's engine sends when the request sets none, where it sends one: DSPy 3.4's native
    Anthropic client fills in a default per model class (16,384 for current models), which bounds the answer
    far below the model's maximum. None where nothing is sent (the model's maximum output is the bound), where
    LiteLLM fills it in (it sends the model's maximum), or with extended thinking (its budget adds to it)."""
    if not model.lower().startswith("anthropic/") or request.get("thinking") or request.get("reasoning_effort"):
        return None
    if getattr(lm, "_engine_spec", None) not in ("auto", "native", "lm15"):  # DSPy 3.3, or the LiteLLM engine
        return None
    if model not in _ENGINE_DEFAULTS:
        try:  # private to DSPy 3.4's vendored client: feature-detected, and the model's maximum without it
            from dspy._vendor.lm15.providers import anthropic as native_anthropic

            value = native_anthropic._default_max_tokens(model.split("/", 1)[1])
            _ENGINE_DEFAULTS[model] = value if isinstance(value, int) and value > 0 else None
        except Exception:  # noqa: BLE001
            _ENGINE_DEFAULTS[model] = None
    return _ENGINE_DEFAULTS[model]


def new_client_call(model: str, operation: str, messages: Any, request: dict[str, Any]) -> tuple[LMCall, dict]:
    """A call made through an LLM client directly (`instrumentation.clients`): the same LMCall as DSPy's.
    An embedding produces no output tokens: its worst case is its input alone."""
    if operation == "embeddings":
        max_tokens: Any = 0
    else:
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or request.get(
            "max_output_tokens")
    state = _context.current()
    module = _context.CURRENT_MODULE.get()
    bound, multimodal = _prompt_bound(None, messages, request)
    call = LMCall(
        model, provider_of(model), operation, bound,
        max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None,
        _completions(request), module[1] if module is not None else "", state.phase, state.optimizer or "",
        state.trial, state.lm_role, state.budgets, None)
    if multimodal is not None or not _UNIT_KWARGS.isdisjoint(request):
        call.apart, call.searches = billed_units.request_units(request, multimodal)
    call.prompt = (messages if operation != "embeddings" or isinstance(messages, list) else [messages], request)
    return call, request


def request_model(model: str) -> str:
    """`gen_ai.request.model`: the model name without DSPy's (LiteLLM's) provider prefix, which the
    conventions put in `gen_ai.provider.name`."""
    return model.split("/", 1)[1] if "/" in model else model


def start_attributes(rt: Runtime, call: LMCall, merged: dict[str, Any], prompt: Any, messages: Any
                     ) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        A.SPAN_KIND: "lm", A.GEN_AI_OPERATION: call.operation, A.GEN_AI_PROVIDER: call.provider,
        A.GEN_AI_REQUEST_MODEL: request_model(call.model), A.LM_MODEL: call.model,
        A.INPUT_TOKENS_BOUND: call.input_tokens_bound, A.PHASE: call.phase,
    }
    if call.max_tokens is not None:
        attrs[A.GEN_AI_REQUEST_MAX_TOKENS] = call.max_tokens
    if call.n > 1:
        attrs[A.GEN_AI_REQUEST_CHOICE_COUNT] = call.n
    temperature = merged.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        attrs[A.GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
    if call.module:
        attrs[A.MODULE_PATH] = call.module
    if call.trial is not None:
        attrs[A.OPTIMIZER_TRIAL] = call.trial
    if call.optimizer:
        attrs[A.OPTIMIZER_NAME] = call.optimizer
    if call.role:
        attrs[A.LM_ROLE] = call.role
    server = _redact.server_address(merged.get("api_base") or merged.get("base_url"))
    if server:
        attrs["server.address"] = server[0]
        if server[1]:
            attrs["server.port"] = server[1]
    if rt.capture_content:
        secrets = _redact.secrets_of(merged)
        payload = messages if messages is not None else [{"role": "user", "content": prompt}]
        attrs[A.GEN_AI_INPUT_MESSAGES] = _redact.scrub(json.dumps(payload, default=str), secrets)
    return attrs


def open_span(rt: Runtime, call: LMCall, merged: dict[str, Any], prompt: Any, messages: Any) -> tuple[Any, Any]:
    """(span, context token) of the call, made current; none made where nothing would record. A foreign LM
    span around the call gives its reservation back first: this call counts."""
    take_over_current()
    if unsampled(rt):
        return skipped()
    attrs = start_attributes(rt, call, merged, prompt, messages)
    span, token = start(rt.tracer, f"{call.operation} {request_model(call.model)}", attrs, kind=SpanKind.CLIENT)
    ctx = span.get_span_context()
    call.trace_id, call.span_id = ctx.trace_id, ctx.span_id
    return span, token


def price(rt: Runtime, call: LMCall, prompt: Any, messages: Any, outputs: Any) -> None:
    """Usage and cost of a call the provider answered; tokens estimated when it reported none.

    A DSPy cache hit bills nothing; its economic cost is its first call's usage priced uncached (or,
    where that usage is gone, estimated from the text like a call without usage)."""
    usage = call.original_usage if call.cache_hit else call.usage
    if usage is not None and not call.cache_hit and not usage.input_tokens and not usage.output_tokens:
        usage = call.usage = None  # "0 tokens" from a provider that answered is no usage at all
    if call.usage_counted_by_client and not call.cache_hit:
        if rt.engine.missing_usage == "worst_case":
            usage = call.usage = None  # the provider reported nothing: LiteLLM's count of the text is no bill
        elif usage is not None:  # "estimate": LiteLLM's count is the estimate (its tokenizer, not ~4 chars)
            rt.engine.warn_estimated(call.model)
            call.usage_missing = True
            call.billed = usage
            call.cost = rt.engine.cost(call.model, usage)
            call.estimated, call.estimate_reason, call.outcome = True, "stream without usage", OK
            return
    if usage is None and not call.cache_hit and rt.engine.missing_usage == "worst_case":
        # A provider that reports nothing (or hides reasoning it bills) must not set its own price: the call
        # counts as the most it could have cost.
        rt.engine.warn_worst_case(call.model)
        call.usage_missing = True
        call.billed = Usage()
        price_failure(rt.engine, call, None)
        call.outcome = OK
        return
    if usage is None:
        call.estimated = True
        call.estimate_reason = "cache hit without usage" if call.cache_hit else "usage missing"
        usage = Usage(input_tokens=estimate_tokens(_text_len(messages if messages is not None else prompt)),
                      output_tokens=estimate_tokens(_text_len(outputs)))
        if not call.cache_hit:
            rt.engine.warn_estimated(call.model)
    call.usage_missing = call.usage is None and not call.cache_hit
    call.billed = usage if not call.cache_hit else Usage()
    call.cost = cost = rt.engine.cost(call.model, usage, cache_hit=call.cache_hit)
    call.outcome = OK
    if cost.unpriced and not call.cache_hit:
        _settle_unpriced(rt, call, cost)


def _settle_unpriced(rt: Runtime, call: LMCall, cost: CallCost) -> None:
    """The provider billed a unit the price entry has no rate for (a search with no search price, audio with no
    audio rate): the call's cost is not known, so it counts as the most it could have cost as far as we know,
    its reserved worst case or its token cost at the highest rate, whichever is more (docs/budgets.md)."""
    rt.engine.warn_unpriced(call.model, cost.unpriced)
    reason = "unpriced unit: " + ", ".join(cost.unpriced)
    call.estimated = True
    call.estimate_reason = f"{call.estimate_reason}; {reason}" if call.estimate_reason else reason
    if call.reserved_usd > cost.usd:
        extra = call.reserved_usd - cost.usd
        call.cost = dataclasses.replace(cost, usd=call.reserved_usd, economic_usd=cost.economic_usd + extra)


def price_failure(engine: Any, call: LMCall, exc: BaseException | None) -> None:
    """A call that raised: a provider's client error costs nothing; any other outcome is unknown, so the
    call is settled at the worst case reserved for it (marked estimated, with the reason). `exc` None: the
    call was answered without usage, and `missing_usage="worst_case"` prices it the same way."""
    outcome, reason = classify_failure(exc) if exc is not None else (UNKNOWN, "usage missing")
    if outcome == NOT_SENT:  # it never connected: given back, counted nowhere
        not_sent(call, exc)
        return
    call.outcome = outcome
    if exc is not None:
        call.error_type = type(exc).__qualname__
    call.usage_missing = True
    if outcome == REJECTED:
        call.cost = dataclasses.replace(UNKNOWN_COST, unknown=False, source="none", version=0)
        return
    amount = call.reserved_usd
    if not call.budgets:  # nothing was reserved: the same worst case, priced now
        try:
            worst, _ = engine.worst_case(call.model, call.input_tokens_bound, call.max_tokens, call.n, call.apart,
                                         call.searches)
        except BaseException:  # noqa: BLE001 - an unknown price after the fact is an unknown cost, never a stop
            worst = None
        if worst is None:
            call.estimated, call.estimate_reason, call.cost = True, reason, UNKNOWN_COST
            return
        amount = worst
    settle_at_worst_case(call, reason, amount)


def not_sent(call: LMCall, exc: BaseException) -> None:
    """A call that raised before DSPy handed the request to a provider client: nothing to pay, nothing to
    count (`settle` gives the reservation back)."""
    call.outcome = NOT_SENT
    call.error_type = type(exc).__qualname__
    call.cost = None


def settle_at_worst_case(call: LMCall, reason: str, amount: float | None = None) -> None:
    """The call's cost is not known: it counts as its worst case (reserved, or given), marked estimated."""
    amount = call.reserved_usd if amount is None else amount
    call.estimated = True
    call.estimate_reason = reason
    call.cost = CallCost(amount, amount, 0.0, 0.0, 0.0, 0.0, "worst_case", 0, None)


def end_attributes(rt: Runtime, call: LMCall, outputs: Any) -> dict[str, Any]:
    """Usage, cost, outcome and response attributes of a settled call."""
    billed = call.billed
    attrs: dict[str, Any] = {
        A.CACHE_HIT: call.cache_hit, A.USAGE_MISSING: call.usage_missing, A.COST_ESTIMATED: call.estimated,
        A.LM_OUTCOME: call.outcome,
        A.GEN_AI_INPUT_TOKENS: billed.input_tokens, A.GEN_AI_OUTPUT_TOKENS: billed.output_tokens,
        A.GEN_AI_CACHE_READ_TOKENS: billed.cache_read_tokens,
        A.GEN_AI_CACHE_CREATION_TOKENS: billed.cache_creation_tokens,
        A.GEN_AI_REASONING_TOKENS: billed.reasoning_tokens}
    if call.budgets:  # what admission reserved, under which budgets
        attrs[A.BUDGET_RESERVED_USD] = call.reserved_usd
        attrs[A.BUDGET_LABEL] = ",".join(call.budget_labels)
        if call.refined:  # counted exactly near a cap (`Accountant._refined`): the bound the span started with
            attrs[A.INPUT_TOKENS_BOUND] = call.input_tokens_bound
    if call.estimate_reason:
        attrs[A.COST_ESTIMATE_REASON] = call.estimate_reason
    cost = call.cost
    if call.outcome == NOT_SENT:
        pass  # nothing was sent: no cost, known or not
    elif cost is None or cost.unknown:
        attrs[A.COST_UNKNOWN] = True
        attrs[A.PRICING_SOURCE] = "unknown"
    else:
        d = MONEY_DIGITS  # `money()` written as round(): six calls fewer per LM call
        usd = round(cost.usd, d)
        attrs.update({A.COST_USD: usd, A.COST_ECONOMIC_USD: round(cost.economic_usd, d),
                      A.COST_INPUT_USD: round(cost.input_usd, d),
                      A.COST_CACHED_INPUT_USD: round(cost.cached_input_usd, d),
                      A.COST_OUTPUT_USD: round(cost.output_usd, d), A.COST_REASONING_USD: round(cost.reasoning_usd, d),
                      A.PRICING_SOURCE: cost.source, A.PRICING_VERSION: cost.version, A.OPENINFERENCE_COST_TOTAL: usd,
                      A.GEN_AI_COST_AMOUNT: usd, A.GEN_AI_COST_CURRENCY: cost.currency})
        if cost.tier:
            attrs[A.PRICING_TIER] = cost.tier
        if cost.fallback:
            attrs[A.PRICING_FALLBACK] = cost.fallback
    if billed.cache_write_1h_tokens:
        attrs[A.CACHE_WRITE_1H_TOKENS] = billed.cache_write_1h_tokens
    # units billed apart: a priced call has their USD (or names them unpriced); an unpriced call only its usage
    if (cost.media_usd or cost.search_usd or cost.unpriced) if cost is not None and not cost.unknown \
            else billed.billed_apart:
        _apart_attributes(attrs, billed, cost)
    if rt.engine.tier and call.model in rt.engine.tier_missing:
        attrs[A.PRICING_TIER_MISSING] = rt.engine.tier
    if call.response_model:
        attrs[A.GEN_AI_RESPONSE_MODEL] = call.response_model
    if call.finish_reasons:
        attrs[A.GEN_AI_FINISH_REASONS] = list(call.finish_reasons)
    if rt.capture_content and outputs is not None:
        secrets = _redact.secrets_of(getattr(call.lm, "kwargs", None) or {})
        attrs[A.GEN_AI_OUTPUT_MESSAGES] = _redact.scrub(json.dumps(outputs, default=str), secrets)
    if viewers.on:
        viewers.lm_end(attrs)
    return attrs


def _apart_attributes(attrs: dict[str, Any], billed: Usage, cost: CallCost | None) -> None:
    for key, value in ((A.AUDIO_INPUT_TOKENS, billed.audio_input_tokens),
                       (A.AUDIO_OUTPUT_TOKENS, billed.audio_output_tokens),
                       (A.IMAGE_OUTPUT_TOKENS, billed.image_output_tokens),
                       (A.WEB_SEARCH_REQUESTS, billed.web_search_requests)):
        if value:
            attrs[key] = value
    if cost is not None and not cost.unknown:
        attrs[A.COST_MEDIA_USD] = round(cost.media_usd, MONEY_DIGITS)
        attrs[A.COST_SEARCH_USD] = round(cost.search_usd, MONEY_DIGITS)
        if cost.unpriced:
            attrs[A.COST_UNPRICED_UNITS] = list(cost.unpriced)
