"""Token usage -> USD for one LM call, and the worst case a budget must reserve before the call.

Conventions (the OTel GenAI ones): `input_tokens` includes cache reads and writes, `output_tokens`
includes reasoning tokens. Each part is billed once, at its own rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .pricing import PriceEntry, Rates

_M = 1_000_000.0


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, a measurable
# share of the per-call cost (several of these are made per LM call). Treat instances as values.
@dataclasses.dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclasses.dataclass(slots=True)
class CallCost:
    usd: float
    economic_usd: float
    input_usd: float
    cached_input_usd: float
    output_usd: float
    reasoning_usd: float
    source: str
    version: int
    tier: str | None
    unknown: bool = False


UNKNOWN_COST = CallCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "unknown", -1, None, unknown=True)


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if type(obj) is dict:  # the common case, without the (slower) ABC check below
        return obj.get(name)
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def usage_from_openai(usage: Any) -> Usage | None:
    """Reads an OpenAI-shaped usage (dict or object, as DSPy and LiteLLM normalise it); None if empty."""
    if not usage:
        return None
    prompt = _get(usage, "prompt_tokens")
    completion = _get(usage, "completion_tokens")
    if prompt is None and completion is None:
        prompt, completion = _get(usage, "input_tokens"), _get(usage, "output_tokens")
        if prompt is None and completion is None:
            return None
    if not _int(prompt) and not _int(completion):
        return None  # LiteLLM reports all-zero usage when the provider sent none: that is "missing"
    pdetails = _get(usage, "prompt_tokens_details") or _get(usage, "input_tokens_details")
    cdetails = _get(usage, "completion_tokens_details") or _get(usage, "output_tokens_details")
    return Usage(
        input_tokens=_int(prompt),
        output_tokens=_int(completion),
        cache_read_tokens=_int(_get(pdetails, "cached_tokens")),
        cache_creation_tokens=_int(_get(pdetails, "cache_creation_tokens")),
        reasoning_tokens=_int(_get(cdetails, "reasoning_tokens")),
    )


def estimate_tokens(text_chars: int) -> int:
    """Rough tokens for text when a provider reports no usage: about 4 characters per token."""
    return math.ceil(text_chars / 4)


def _rate(value: float | None, fallback: float | None) -> float:
    if value is not None:
        return value
    return fallback or 0.0


def compute_cost(usage: Usage, entry: PriceEntry, *, tier: str | None = None, cache_hit: bool = False) -> CallCost:
    """Actual and economic (uncached) cost. DSPy cache hits and local models spend 0 actual dollars."""
    rates = entry.rates_for(tier, usage.input_tokens)
    cached = min(usage.cache_read_tokens, usage.input_tokens)
    written = min(usage.cache_creation_tokens, usage.input_tokens - cached)
    plain_in = usage.input_tokens - cached - written
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    visible_out = usage.output_tokens - reasoning

    in_rate = _rate(rates.input, 0.0)
    out_rate = _rate(rates.output, 0.0)
    input_usd = plain_in * in_rate / _M
    cached_input_usd = (cached * _rate(rates.cached_input, in_rate) + written * _rate(rates.cache_write, in_rate)) / _M
    output_usd = visible_out * out_rate / _M
    reasoning_usd = reasoning * _rate(rates.reasoning, out_rate) / _M
    billed = input_usd + cached_input_usd + output_usd + reasoning_usd
    economic = (usage.input_tokens * in_rate) / _M + output_usd + reasoning_usd
    free = cache_hit or entry.local
    if free:
        input_usd = cached_input_usd = output_usd = reasoning_usd = 0.0
    return CallCost(
        usd=0.0 if free else billed,
        economic_usd=economic,
        input_usd=input_usd,
        cached_input_usd=cached_input_usd,
        output_usd=output_usd,
        reasoning_usd=reasoning_usd,
        source=entry.source,
        version=entry.price_version,
        tier=tier,
    )


def worst_case_usd(entry: PriceEntry, input_tokens_bound: int, max_output_tokens: int, tier: str | None = None
                   ) -> tuple[float, float, float]:
    """(total, input part, output part) a call can cost at most: the budget reserves this up front."""
    if entry.local:
        return 0.0, 0.0, 0.0
    rates: Rates = entry.rates_for(tier, input_tokens_bound)
    in_rate = max(_rate(rates.input, 0.0), _rate(rates.cache_write, 0.0))
    out_rate = max(_rate(rates.output, 0.0), _rate(rates.reasoning, 0.0))
    input_part = input_tokens_bound * in_rate / _M
    output_part = max_output_tokens * out_rate / _M
    return input_part + output_part, input_part, output_part
