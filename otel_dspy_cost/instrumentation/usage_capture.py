"""Usage from DSPy's own finalisation of an LM call, captured where DSPy has it (version specific, feature-detected).

DSPy 3.4 finalises every call in `execution.finalize(lm, call, result)` (a CallResult: DSPy's usage dict, the
native engine's responses, LiteLLM's raw response); DSPy 3.3 in `BaseLM._process_lm_response` (LiteLLM's
response) or `_finalize_lm_response` (the typed path). Each hook fills in the LMCall in progress on that LM
(`_context.CURRENT_CALL`) once; `lm_call.price` turns it into a cost.
"""

from __future__ import annotations

from typing import Any

from otel_dspy_cost import _context
from otel_dspy_cost.budgets.accounting import LMCall
from otel_dspy_cost.instrumentation import billed_units
from otel_dspy_cost.pricing.cost import Usage, usage_from_openai, usage_from_verbatim

# Where the first call's usage rides on a DSPy cache hit (set by the cache patch in `instrumentation.patches`).
CACHED_USAGE_ATTR = "_otel_dspy_cost_usage"
# Providers whose answers can carry image tokens or search counts that DSPy 3.4's usage dict leaves out.
_UNITS_IN_PROVIDER_DATA = frozenset({"anthropic", "gcp.gemini", "gcp.vertex_ai"})


def _finish_reason_list(values: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in values if v)


def _claim(lm: Any) -> LMCall | None:
    """The LM call in progress on `lm`, the first time a usage hook reports it."""
    rec = _context.CURRENT_CALL.get()
    if rec is None or rec.captured or rec.lm is not lm:
        return None
    rec.captured = True
    return rec


def _store(rec: LMCall, usage: Usage | None, cache_hit: bool) -> None:
    """Billed usage, or for a DSPy cache hit the first call's usage (what the hit is worth)."""
    rec.cache_hit = cache_hit
    if cache_hit:
        rec.original_usage = usage
    else:
        rec.usage = usage


def _prefix(model: str) -> str:
    return model.split("/", 1)[0].lower() if "/" in model else "openai"


def _ttl_1h(response: Any) -> int:
    """Anthropic's 1-hour cache writes, from the provider's own usage that lm15 keeps in `provider_data`."""
    data = getattr(response, "provider_data", None)
    usage = data.get("usage") if isinstance(data, dict) else None
    creation = usage.get("cache_creation") if isinstance(usage, dict) else None
    return _int_or_0(creation.get("ephemeral_1h_input_tokens")) if isinstance(creation, dict) else 0


def _int_or_0(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _native_usage(responses: Any, model: str) -> Usage | None:
    """Usage of lm15 responses (DSPy 3.4's native engine; n completions are n responses), summed."""
    total = None
    for response in responses or ():
        u = usage_from_verbatim(getattr(response, "usage", None), _prefix(model), _ttl_1h(response))
        if u is not None:
            total = u if total is None else total + u
    return total


def _stashed_usage(response: Any) -> Usage | None:
    return usage_from_openai(getattr(response, CACHED_USAGE_ATTR, None)) if response is not None else None


def capture_from_call_result(lm: Any, result: Any) -> None:
    """DSPy 3.4 `execution.finalize(lm, call, result)`: result is a CallResult."""
    rec = _claim(lm)
    if rec is None:
        return
    cache_hit = bool(getattr(result, "cache_hit", False))
    responses = getattr(result, "responses", ()) or ()
    raw = getattr(result, "raw", None)
    if cache_hit:  # DSPy cleared the usage: the native responses keep theirs, LiteLLM's rode along
        usage = _native_usage(responses, rec.model) if responses else _stashed_usage(raw)
    else:
        usage = usage_from_openai(getattr(result, "usage", None))
        if usage is not None and responses:
            usage.cache_write_1h_tokens = min(usage.cache_creation_tokens, sum(_ttl_1h(r) for r in responses))
            if rec.searches or rec.apart or rec.provider in _UNITS_IN_PROVIDER_DATA or "image" in rec.model:
                billed_units.add_native_units(usage, responses)
            if not usage.cache_read_tokens and rec.provider == "deepseek":
                _deepseek_cache_hits(usage, responses)
    _store(rec, usage, cache_hit)
    rec.response_model = getattr(result, "response_model", None)
    if responses:
        rec.finish_reasons = _finish_reason_list(getattr(r, "finish_reason", None) for r in responses)
    if not rec.finish_reasons and raw is not None:
        rec.finish_reasons = _finish_reason_list(getattr(c, "finish_reason", None)
                                                 for c in (getattr(raw, "choices", None) or ()))


def _deepseek_cache_hits(usage: Usage, responses: Any) -> None:
    """DeepSeek reports cache hits as `usage.prompt_cache_hit_tokens`, which DSPy 3.4's native engine does not
    read (LiteLLM maps it to `prompt_tokens_details.cached_tokens`): without it every prompt token would be
    billed at the full input rate, 10x the hit rate."""
    hits = 0
    for response in responses:
        raw = getattr(response, "provider_data", None)
        counters = raw.get("usage") if isinstance(raw, dict) else None
        hits += _int_or_0(counters.get("prompt_cache_hit_tokens")) if isinstance(counters, dict) else 0
    usage.cache_read_tokens = min(hits, usage.input_tokens)


def capture_from_provider_response(lm: Any, response: Any) -> None:
    """DSPy 3.3 `BaseLM._process_lm_response`: an OpenAI-shaped (LiteLLM) response."""
    rec = _claim(lm)
    if rec is None:
        return
    cache_hit = bool(getattr(response, "cache_hit", False))
    usage = _stashed_usage(response) if cache_hit else usage_from_openai(
        response.get("usage") if isinstance(response, dict) else getattr(response, "usage", None))
    _store(rec, usage, cache_hit)
    rec.response_model = getattr(response, "model", None)
    choices = getattr(response, "choices", None) or ()
    rec.finish_reasons = _finish_reason_list(getattr(c, "finish_reason", None) for c in choices)


def capture_from_lm_response(lm: Any, response: Any) -> None:
    """DSPy 3.3 `BaseLM._finalize_lm_response` (typed path): an LMResponse."""
    rec = _claim(lm)
    if rec is None:
        return
    cache_hit = bool(getattr(response, "cache_hit", False))
    if cache_hit:
        usage = _stashed_usage(getattr(response, "provider_response", None))
    else:
        usage_fn = getattr(response, "usage_as_dict", None)
        usage = usage_from_openai(usage_fn() if callable(usage_fn) else getattr(response, "usage", None))
    _store(rec, usage, cache_hit)
    rec.response_model = getattr(response, "model", None)
    reason = getattr(response, "finish_reason", None)
    if reason:
        rec.finish_reasons = (str(reason),)
