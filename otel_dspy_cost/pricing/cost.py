"""Token usage -> USD for one LM call, and the worst case a budget must reserve before the call.

Conventions (the OTel GenAI ones): `input_tokens` includes cache reads and writes, `output_tokens`
includes reasoning tokens, `cache_write_1h_tokens` is the 1-hour part of `cache_creation_tokens`.
Each part is billed once, at its own rate. Providers that count otherwise (Anthropic's disjoint cache
counters, Gemini's thoughts outside the candidates) are brought to these conventions on the way in.
Audio tokens are part of input or output tokens, image tokens part of output tokens (as OpenAI and
Gemini count them); web searches are a count of their own, billed per 1,000.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from otel_dspy_cost.pricing.catalog import PriceEntry, Rates

PER_MILLION = 1_000_000.0


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, a measurable
# share of the per-call cost (several of these are made per LM call). Treat instances as values.
@dataclasses.dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    audio_input_tokens: int = 0  # part of input_tokens
    audio_output_tokens: int = 0  # part of output_tokens
    image_output_tokens: int = 0  # part of output_tokens
    web_search_requests: int = 0  # searches or grounded queries the provider made for the call

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                     self.cache_read_tokens + other.cache_read_tokens,
                     self.cache_creation_tokens + other.cache_creation_tokens,
                     self.reasoning_tokens + other.reasoning_tokens,
                     self.cache_write_1h_tokens + other.cache_write_1h_tokens,
                     self.audio_input_tokens + other.audio_input_tokens,
                     self.audio_output_tokens + other.audio_output_tokens,
                     self.image_output_tokens + other.image_output_tokens,
                     self.web_search_requests + other.web_search_requests)

    @property
    def billed_apart(self) -> bool:
        """Units billed at rates of their own besides text tokens (audio, images, searches)."""
        return bool(self.audio_input_tokens or self.audio_output_tokens or self.image_output_tokens
                    or self.web_search_requests)

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
    fallback: str | None = None  # the kind of `PriceEntry.fallback` (history_gap, ...), when one was used
    currency: str = "USD"
    media_usd: float = 0.0  # audio and image tokens at their own rates (also in usd, not in input/output_usd)
    search_usd: float = 0.0  # web searches and per-request fees
    # Units the call was billed for that the price entry has no rate for: priced at the model's highest token
    # rate (tokens) or not at all (searches), so the call is settled at its worst case too (`lm_call.price`).
    unpriced: tuple[str, ...] = ()


UNKNOWN_COST = CallCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "unknown", -1, None, unknown=True)


def _int(value: Any) -> int:
    if type(value) is int:  # the common case, without the conversions below
        return value if value > 0 else 0
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


class _Attrs:
    """An object's attributes read like a dict's keys (LiteLLM's usage objects)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self.obj, name, default)


_NOTHING: Mapping[str, Any] = {}


def _fields(obj: Any) -> Any:
    """Something with `.get` over obj's fields: a dict as it is (DSPy 3.4's usage: C-level lookups, this runs
    once per LM call), nothing for None, an object's attributes otherwise."""
    if obj is None:
        return _NOTHING
    if type(obj) is dict or isinstance(obj, Mapping):
        return obj
    return _Attrs(obj)


def usage_from_openai(usage: Any) -> Usage | None:
    """Reads an OpenAI-shaped usage (dict or object, as DSPy and LiteLLM normalise it); None if empty."""
    if not usage:
        return None
    u = _fields(usage)
    prompt, completion = u.get("prompt_tokens"), u.get("completion_tokens")
    if prompt is None and completion is None:
        prompt, completion = u.get("input_tokens"), u.get("output_tokens")
        if prompt is None and completion is None:
            return None
    inputs, outputs = _int(prompt), _int(completion)
    if not inputs and not outputs:
        return None  # LiteLLM reports all-zero usage when the provider sent none: that is "missing"
    p = _fields(u.get("prompt_tokens_details") or u.get("input_tokens_details"))
    c = _fields(u.get("completion_tokens_details") or u.get("output_tokens_details"))
    # LiteLLM: prompt_tokens_details.cache_creation_token_details; Anthropic's own: usage.cache_creation.
    ttl = _fields(p.get("cache_creation_token_details") or u.get("cache_creation"))
    read, created = p.get("cached_tokens"), p.get("cache_creation_tokens") or p.get("cache_write_tokens")
    reasoning, created_1h = c.get("reasoning_tokens"), ttl.get("ephemeral_1h_input_tokens")
    # `_int` only for a value that is there: most are 0 or absent
    usage = Usage(inputs, outputs, _int(read) if read else 0, _int(created) if created else 0,
                  _int(reasoning) if reasoning else 0, _int(created_1h) if created_1h else 0)
    # Billed apart: OpenAI's (and LiteLLM's) audio details, LiteLLM's Gemini image output and grounding
    # queries, Anthropic's server tool use (`server_tool_use.web_search_requests`).
    audio_in, audio_out, image_out = p.get("audio_tokens"), c.get("audio_tokens"), c.get("image_tokens")
    searches = p.get("web_search_requests") or _fields(u.get("server_tool_use")).get("web_search_requests")
    if audio_in or audio_out or image_out or searches:
        usage.audio_input_tokens = min(_int(audio_in), inputs)
        usage.audio_output_tokens = min(_int(audio_out), outputs)
        usage.image_output_tokens = min(_int(image_out), outputs - usage.audio_output_tokens)
        usage.web_search_requests = _int(searches)
    return usage


# Providers whose own counters leave cache reads/writes out of input tokens, and thinking out of output
# tokens (lm15, DSPy 3.4's native client, keeps them provider-verbatim; LiteLLM and DSPy's live usage
# fold them in). Keyed by the model prefix DSPy users write.
_DISJOINT_CACHE = frozenset({"anthropic", "bedrock", "vertex_ai-anthropic"})
_THOUGHTS_APART = frozenset({"gemini", "vertex_ai", "vertex", "xai"})


def usage_from_verbatim(counters: Any, provider_prefix: str, ttl_1h: int = 0) -> Usage | None:
    """A provider-verbatim usage (lm15's `Usage`: input/output/cache_read/cache_write/reasoning tokens)
    brought to our conventions, as DSPy does for a live call (`call_result.usage_dict`).

    Hand-written because DSPy's function is private and keyed by lm15's provider ids; the live path and
    this one are tested to price a call the same.
    """
    if counters is None:
        return None
    c = _fields(counters)
    inputs, outputs = c.get("input_tokens"), c.get("output_tokens")
    if inputs is None and outputs is None:
        return None
    read, write = _int(c.get("cache_read_tokens")), _int(c.get("cache_write_tokens"))
    reasoning = _int(c.get("reasoning_tokens"))
    total_in, total_out = _int(inputs), _int(outputs)
    if provider_prefix in _DISJOINT_CACHE:
        total_in += read + write
    if provider_prefix in _THOUGHTS_APART:
        total_out += reasoning
    return Usage(total_in, total_out, read, write, reasoning, min(ttl_1h, write))


MONEY_DIGITS = 12


def money(value: float) -> float:
    """USD as written out (span attributes, reports, summaries, the cost log): 12 decimals, a thousandth of a
    nano-dollar, so sums read 2.61e-05 and not 2.6099999999999997e-05. Sums are kept unrounded inside."""
    return round(value, MONEY_DIGITS)


def usd_text(value: float) -> str:
    """USD for a sentence: to the nano-dollar, fixed notation, no float noise (0.0015456, not
    0.0015456000000000003 or 2.376e-05)."""
    text = f"{money(value):.9f}".rstrip("0").rstrip(".")
    return text or "0"


def estimate_tokens(text_chars: int) -> int:
    """Rough tokens for text when a provider reports no usage: about 4 characters per token."""
    return math.ceil(text_chars / 4)


def _rate(value: float | None, fallback: float | None) -> float:
    if value is not None:
        return value
    return fallback or 0.0


def compute_cost(usage: Usage, entry: PriceEntry, *, tier: str | None = None, cache_hit: bool = False,
                 rates: Rates | None = None) -> CallCost:
    """Actual and economic cost. DSPy cache hits and local models spend 0 actual dollars.

    The economic cost is what the same usage costs without any cache: every input token at the input
    rate (of the tier and prompt size), so a DSPy cache hit is worth what its first call would have
    cost uncached. `rates`, when given, are `entry.rates_for(tier, usage.input_tokens)` worked out
    beforehand (the cost engine keeps them per model)."""
    if rates is None:
        rates = entry.rates_for(tier, usage.input_tokens)
    if not (usage.cache_read_tokens or usage.cache_creation_tokens or usage.reasoning_tokens
            or cache_hit or entry.local or rates.request or usage.audio_input_tokens or usage.audio_output_tokens
            or usage.image_output_tokens or usage.web_search_requests):  # `billed_apart` inline: per LM call
        # The usual call (no cache, no reasoning, billed): the arithmetic below with its zero terms left out,
        # the same floats (adding 0.0 changes none); this runs once per LM call.
        input_usd = usage.input_tokens * (rates.input or 0.0) / PER_MILLION
        output_usd = usage.output_tokens * (rates.output or 0.0) / PER_MILLION
        return CallCost(input_usd + output_usd, input_usd + output_usd, input_usd, 0.0, output_usd, 0.0,
                        entry.source, entry.price_version, tier if tier is not None else entry.tier, False,
                        entry.fallback.split(":", 1)[0] if entry.fallback else None, entry.currency)
    cached = min(usage.cache_read_tokens, usage.input_tokens)
    written = min(usage.cache_creation_tokens, usage.input_tokens - cached)
    written_1h = min(usage.cache_write_1h_tokens, written)
    audio_in = min(usage.audio_input_tokens, usage.input_tokens - cached - written)
    plain_in = usage.input_tokens - cached - written - audio_in
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    audio_out = min(usage.audio_output_tokens, usage.output_tokens - reasoning)
    image_out = min(usage.image_output_tokens, usage.output_tokens - reasoning - audio_out)
    visible_out = usage.output_tokens - reasoning - audio_out - image_out
    media_usd, search_usd, unpriced = _billed_apart(rates, audio_in, audio_out, image_out, usage.web_search_requests)

    # `_rate`'s fallbacks written inline: this runs once per LM call
    in_rate = rates.input or 0.0
    out_rate = rates.output or 0.0
    input_usd = plain_in * in_rate / PER_MILLION
    write_rate = rates.cache_write if rates.cache_write is not None else in_rate
    cached_rate = rates.cached_input if rates.cached_input is not None else in_rate
    write_1h_rate = rates.cache_write_1h if rates.cache_write_1h is not None else write_rate
    cached_input_usd = (cached * cached_rate + (written - written_1h) * write_rate
                        + written_1h * write_1h_rate) / PER_MILLION
    output_usd = visible_out * out_rate / PER_MILLION
    reasoning_usd = reasoning * (rates.reasoning if rates.reasoning is not None else out_rate) / PER_MILLION
    billed = input_usd + cached_input_usd + output_usd + reasoning_usd + media_usd + search_usd
    # Uncached: the prompt's text at the input rate, its audio at the audio rate (a cache changes neither)
    economic = ((usage.input_tokens - audio_in) * in_rate) / PER_MILLION + output_usd + reasoning_usd + media_usd \
        + search_usd
    free = cache_hit or entry.local
    if free:
        input_usd = cached_input_usd = output_usd = reasoning_usd = media_usd = search_usd = 0.0
    return CallCost(
        usd=0.0 if free else billed,
        economic_usd=economic,
        input_usd=input_usd,
        cached_input_usd=cached_input_usd,
        output_usd=output_usd,
        reasoning_usd=reasoning_usd,
        source=entry.source,
        version=entry.price_version,
        tier=tier if tier is not None else entry.tier,
        fallback=entry.fallback.split(":", 1)[0] if entry.fallback else None,
        currency=entry.currency,
        media_usd=media_usd,
        search_usd=search_usd,
        unpriced=unpriced,
    )


def _billed_apart(rates: Rates, audio_in: int, audio_out: int, image_out: int, searches: int
                  ) -> tuple[float, float, tuple[str, ...]]:
    """(audio and image USD, search and request fees USD, units without a rate). A token unit without a
    rate of its own is priced at the entry's highest token rate (audio and image tokens cost more than text
    wherever they are priced apart); a search without a rate is not priced at all. Either is named in
    `unpriced`, and the call is settled at its worst case too."""
    unpriced: list[str] = []
    highest = max((r for r in (rates.input, rates.output, rates.reasoning, rates.cache_write, rates.cache_write_1h,
                               rates.audio_input, rates.audio_output, rates.image_output) if r is not None),
                  default=0.0)
    media = 0.0
    for count, rate, unit in ((audio_in, rates.audio_input, "audio_input_tokens"),
                              (audio_out, rates.audio_output, "audio_output_tokens"),
                              (image_out, rates.image_output, "image_output_tokens")):
        if count:
            if rate is None:
                unpriced.append(unit)
                rate = highest
            media += count * rate / PER_MILLION
    fees = (rates.request or 0.0) / 1000
    if searches:
        if rates.web_search is None:
            unpriced.append("web_search_requests")
        else:
            fees += searches * rates.web_search / 1000
    return media, fees, tuple(unpriced)


def worst_case_usd(entry: PriceEntry, input_tokens_bound: int, max_output_tokens: int, tier: str | None = None
                   ) -> tuple[float, float, float]:
    """(total, input part, output part) a call can cost at most: the budget reserves this up front."""
    if entry.local:
        return 0.0, 0.0, 0.0
    in_rate, out_rate = worst_rates(entry.rates_for(tier, input_tokens_bound))  # (per-request fees: the engine's)
    input_part = input_tokens_bound * in_rate / PER_MILLION
    output_part = max_output_tokens * out_rate / PER_MILLION
    return input_part + output_part, input_part, output_part


def worst_rates(rates: Rates) -> tuple[float, float]:
    """(per input token, per output token) at most, USD per 1M: a prompt token may be a cache write, an
    output token a reasoning one, or an image where the model prices image output (image models). Audio is
    left to requests that carry or ask for it (`CostEngine.worst_case`)."""
    return (max(_rate(rates.input, 0.0), _rate(rates.cache_write, 0.0), _rate(rates.cache_write_1h, 0.0)),
            max(_rate(rates.output, 0.0), _rate(rates.reasoning, 0.0), _rate(rates.image_output, 0.0)))
