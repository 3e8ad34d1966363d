"""The LM call span: GenAI request attributes at start, usage and cost at the end.

Usage comes from DSPy's own finalisation step (3.4: `execution.finalize`; 3.3:
`BaseLM._process_lm_response` / `_finalize_lm_response`), captured into a per-call record held in
a ContextVar, because `on_lm_end` carries no usage and `lm.history[-1]` is racy across threads.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
from typing import Any

from . import _attributes as A
from . import _context, _optimizers, _redact
from ._cost import CallCost, Usage, estimate_tokens, usage_from_openai
from ._runtime import Runtime
from ._spans import CURRENT_MODULE

_PROVIDERS = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
              "vertex_ai": "gcp.vertex_ai", "bedrock": "aws.bedrock", "groq": "groq", "mistral": "mistral_ai",
              "deepseek": "deepseek", "xai": "x_ai", "cohere": "cohere", "perplexity": "perplexity",
              "databricks": "databricks", "ollama": "ollama", "ollama_chat": "ollama"}
_OPERATIONS = {"chat": "chat", "text": "text_completion", "responses": "chat"}


@dataclasses.dataclass
class LMCallRecord:
    lm: Any
    usage: Usage | None = None
    original_usage: Usage | None = None  # of a DSPy cache hit: what the first call used
    original_cost: float | None = None  # of a DSPy cache hit whose usage DSPy cleared: the cached cost
    cache_hit: bool = False
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    captured: bool = False


CURRENT_CALL: contextvars.ContextVar[LMCallRecord | None] = contextvars.ContextVar(
    "otel_dspy_cost_lm_call", default=None)


def _text_len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8", "ignore"))
    if isinstance(value, dict):
        return sum(_text_len(v) for k, v in value.items() if k not in ("role", "type"))
    if isinstance(value, (list, tuple)):
        return sum(_text_len(v) for v in value)
    return len(str(value).encode("utf-8", "ignore"))


def input_tokens_bound(prompt: Any, messages: Any) -> int:
    """An upper bound on prompt tokens: every token is at least one UTF-8 byte, plus chat overhead.

    A tokenizer count would be tighter but is model-specific (and tiktoken fetches its tables online);
    a bound is what keeps the no-overshoot guarantee true for every provider.
    """
    msgs = messages if messages is not None else [prompt]
    count = len(msgs) if isinstance(msgs, list) else 1
    return _text_len(msgs) + 8 * count + 16


def provider_of(model: str) -> str:
    if "/" in model:
        return _PROVIDERS.get(model.split("/", 1)[0].lower(), model.split("/", 1)[0].lower())
    return "openai"


def start_attributes(rt: Runtime, lm: Any, prompt: Any, messages: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    model = str(getattr(lm, "model", "") or type(lm).__name__)
    lm_kwargs = getattr(lm, "kwargs", None) or {}
    merged = {**lm_kwargs, **kwargs}
    max_tokens = merged.get("max_tokens") or merged.get("max_completion_tokens") or merged.get("max_output_tokens")
    state = _context.current()
    attrs: dict[str, Any] = {
        A.SPAN_KIND: "lm",
        A.GEN_AI_OPERATION: _OPERATIONS.get(getattr(lm, "model_type", "chat"), "chat"),
        A.GEN_AI_PROVIDER: provider_of(model), A.GEN_AI_REQUEST_MODEL: model,
        A.INPUT_TOKENS_BOUND: input_tokens_bound(prompt, messages), A.PHASE: state.phase,
    }
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        attrs[A.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    temperature = merged.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        attrs[A.GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
    module = CURRENT_MODULE.get()
    if module is not None:
        attrs[A.MODULE_PATH] = module[1]
    if state.trial is not None:
        attrs[A.OPTIMIZER_TRIAL] = state.trial
    if state.optimizer:
        attrs[A.OPTIMIZER_NAME] = state.optimizer
    role = _optimizers.role_for(lm) or state.lm_role
    if role:
        attrs[A.LM_ROLE] = role
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


def end_attributes(rt: Runtime, span: Any, rec: LMCallRecord, model: str, prompt: Any, messages: Any,
                   outputs: Any) -> tuple[CallCost, Usage, bool, bool]:
    """Usage, cost and response attributes; estimates tokens when the provider reported none.

    Returns (cost, billed usage, cache hit, estimated): the figures the attributes say, for the processor."""
    attrs: dict[str, Any] = {A.CACHE_HIT: rec.cache_hit}
    usage = rec.usage
    estimated = False
    missing = usage is None and not rec.cache_hit
    if missing:
        estimated = True
        usage = Usage(input_tokens=estimate_tokens(_text_len(messages if messages is not None else prompt)),
                      output_tokens=estimate_tokens(_text_len(outputs)))
        rt.engine.warn_estimated(model)
    attrs[A.USAGE_MISSING] = missing
    billed = usage if not rec.cache_hit else Usage()
    attrs.update({A.GEN_AI_INPUT_TOKENS: billed.input_tokens, A.GEN_AI_OUTPUT_TOKENS: billed.output_tokens,
                  A.GEN_AI_CACHE_READ_TOKENS: billed.cache_read_tokens,
                  A.GEN_AI_CACHE_CREATION_TOKENS: billed.cache_creation_tokens,
                  A.GEN_AI_REASONING_TOKENS: billed.reasoning_tokens})
    priced = usage if not rec.cache_hit else (rec.original_usage or Usage())
    cost: CallCost = rt.engine.cost(model, priced, cache_hit=rec.cache_hit)
    if rec.cache_hit and rec.original_usage is None and rec.original_cost and not cost.unknown:
        # DSPy 3.3 clears usage on a cache hit but keeps the first call's cost: that is the economic cost.
        cost = dataclasses.replace(cost, economic_usd=float(rec.original_cost))
    attrs[A.COST_ESTIMATED] = estimated
    if cost.unknown:
        attrs[A.COST_UNKNOWN] = True
        attrs[A.PRICING_SOURCE] = "unknown"
    else:
        attrs.update({A.COST_USD: cost.usd, A.COST_ECONOMIC_USD: cost.economic_usd, A.COST_INPUT_USD: cost.input_usd,
                      A.COST_CACHED_INPUT_USD: cost.cached_input_usd, A.COST_OUTPUT_USD: cost.output_usd,
                      A.COST_REASONING_USD: cost.reasoning_usd, A.PRICING_SOURCE: cost.source,
                      A.PRICING_VERSION: cost.version, A.OPENINFERENCE_COST_TOTAL: cost.usd})
        if cost.tier:
            attrs[A.PRICING_TIER] = cost.tier
    if rec.response_model:
        attrs[A.GEN_AI_RESPONSE_MODEL] = rec.response_model
    if rec.finish_reasons:
        attrs[A.GEN_AI_FINISH_REASONS] = list(rec.finish_reasons)
    if rt.capture_content and outputs is not None:
        secrets = _redact.secrets_of(getattr(rec.lm, "kwargs", None) or {})
        attrs[A.GEN_AI_OUTPUT_MESSAGES] = _redact.scrub(json.dumps(outputs, default=str), secrets)
    span.set_attributes(attrs)
    return cost, billed, rec.cache_hit, estimated


# -- usage capture from DSPy's finalisation (version specific, feature-detected) ---------------------

def _finish_reason_list(values: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in values if v)


def _claim(lm: Any) -> LMCallRecord | None:
    """The record of the LM call in progress on `lm`, the first time a usage hook reports it."""
    rec = CURRENT_CALL.get()
    if rec is None or rec.captured or rec.lm is not lm:
        return None
    rec.captured = True
    return rec


def _store(rec: LMCallRecord, usage: Usage | None, cache_hit: bool, cached_cost: Any) -> None:
    """Billed usage, or for a DSPy cache hit the first call's usage (or cost, where DSPy cleared usage)."""
    rec.cache_hit = cache_hit
    if cache_hit:
        rec.original_usage = usage
        rec.original_cost = cached_cost
    else:
        rec.usage = usage


def capture_from_call_result(lm: Any, result: Any) -> None:
    """DSPy 3.4 `execution.finalize(lm, call, result)`: result is a CallResult."""
    rec = _claim(lm)
    if rec is None:
        return
    cache_hit = bool(getattr(result, "cache_hit", False))
    responses = getattr(result, "responses", ()) or ()
    raw = getattr(result, "raw", None)
    usage = _original_usage(responses, raw) if cache_hit else usage_from_openai(getattr(result, "usage", None))
    _store(rec, usage, cache_hit, getattr(result, "cost", None))
    rec.response_model = getattr(result, "response_model", None)
    if responses:
        rec.finish_reasons = _finish_reason_list(getattr(r, "finish_reason", None) for r in responses)
    if not rec.finish_reasons and raw is not None:
        rec.finish_reasons = _finish_reason_list(getattr(c, "finish_reason", None)
                                                 for c in (getattr(raw, "choices", None) or ()))


def _original_usage(responses: Any, raw: Any) -> Usage | None:
    """A cache hit reports empty usage; the cached response still carries the first call's usage."""
    for response in responses or ():
        u = getattr(response, "usage", None)
        if u is not None:
            return Usage(int(getattr(u, "input_tokens", 0) or 0), int(getattr(u, "output_tokens", 0) or 0),
                         int(getattr(u, "cache_read_tokens", 0) or 0), int(getattr(u, "cache_write_tokens", 0) or 0),
                         int(getattr(u, "reasoning_tokens", 0) or 0))
    if raw is not None:
        return usage_from_openai(getattr(raw, "usage", None))
    return None


def capture_from_provider_response(lm: Any, response: Any) -> None:
    """DSPy 3.3 `BaseLM._process_lm_response`: an OpenAI-shaped (LiteLLM) response."""
    rec = _claim(lm)
    if rec is None:
        return
    usage = usage_from_openai(response.get("usage") if isinstance(response, dict)
                              else getattr(response, "usage", None))
    _store(rec, usage, bool(getattr(response, "cache_hit", False)),
           (getattr(response, "_hidden_params", None) or {}).get("response_cost"))
    rec.response_model = getattr(response, "model", None)
    choices = getattr(response, "choices", None) or ()
    rec.finish_reasons = _finish_reason_list(getattr(c, "finish_reason", None) for c in choices)


def capture_from_lm_response(lm: Any, response: Any) -> None:
    """DSPy 3.3 `BaseLM._finalize_lm_response` (typed path): an LMResponse."""
    rec = _claim(lm)
    if rec is None:
        return
    usage_fn = getattr(response, "usage_as_dict", None)
    usage = usage_from_openai(usage_fn() if callable(usage_fn) else getattr(response, "usage", None))
    _store(rec, usage, bool(getattr(response, "cache_hit", False)), None)
    rec.response_model = getattr(response, "model", None)
    reason = getattr(response, "finish_reason", None)
    if reason:
        rec.finish_reasons = (str(reason),)
