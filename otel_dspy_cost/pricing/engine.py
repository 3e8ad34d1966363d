"""`CostEngine`: an LM call priced (and its worst case), with the policy for models of no known price.

A price card per model; unknown models refused, warned about once or priced at a fallback.

Used by the accounting station for every call, ours or another instrumentation's, so every call is
priced the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from otel_dspy_cost import _validate
from otel_dspy_cost.errors import UnknownModelError, UnpricedModelError
from otel_dspy_cost.pricing.catalog import RATE_FIELDS, PriceEntry, Rates, split_model, user_catalog_path
from otel_dspy_cost.pricing.cost import (
    PER_MILLION,
    UNKNOWN_COST,
    CallCost,
    Usage,
    compute_cost,
    worst_case_usd,
    worst_rates,
)
from otel_dspy_cost.pricing.editing import add_entry
from otel_dspy_cost.pricing.resolver import PricingResolver

logger = logging.getLogger("otel_dspy_cost")

UNKNOWN_MODEL_ENV = "OTEL_DSPY_COST_UNKNOWN_MODEL"  # the policy for models with no known price
POLICIES = ("error", "warn", "prompt")
DEFAULT_MAX_OUTPUT_TOKENS = 16_384  # reservation when neither the call nor the catalog says


@dataclasses.dataclass(slots=True, frozen=True)
class _PriceCard:
    """What pricing one call to a model needs, worked out on its first call (two lookups, the tier's rates
    and the worst-case rates would otherwise be redone for every call)."""

    entry: PriceEntry
    tier: str | None
    rates: Rates  # the tier's rates below any long-context threshold
    long_above: int | None  # prompts above this many tokens are priced at long-context rates (rates do not apply)
    worst_in: float  # USD per 1M prompt tokens at most (a prompt token may be a cache write)
    worst_out: float  # USD per 1M output tokens at most (an output token may be a reasoning one, or an image)
    fee: float = 0.0  # USD every request costs besides tokens (`Rates.request`, per 1,000)


def default_policy() -> str:
    env = os.environ.get(UNKNOWN_MODEL_ENV)
    if env:
        return env
    return "error" if os.environ.get("CI") else "warn"


class CostEngine:
    """Prices calls for one instrumentation: policy for unknown models, the tier in use, warnings said once.

    `unknown_model_price` ({"input": R, "output": R, ...} USD per 1M tokens) is an explicit fallback price
    for models with no known price; without it an unpriced model has no worst case, and a USD budget
    refuses the call (see `budgets.accounting`).
    """

    def __init__(self, resolver: PricingResolver, *, unknown_model: str | None = None, tier: str | None = None,
                 user_catalog: str | os.PathLike[str] | None = None,
                 unknown_model_price: Mapping[str, float] | None = None, missing_usage: str = "worst_case"):
        policy = unknown_model or default_policy()
        if policy not in POLICIES:
            raise ValueError(f"unknown_model must be one of {POLICIES}, not {policy!r}")
        if tier is not None and (not isinstance(tier, str) or not tier.strip()):
            raise ValueError(f"tier must be a non-empty string such as 'batch' or 'flex', or None, not {tier!r}")
        # A call answered without usage: "worst_case" (its reserved worst case, the default: a provider that
        # reports nothing cannot set its own price) or "estimate" (~4 characters a token of the visible text,
        # for providers known never to report usage and never to bill hidden tokens).
        self.missing_usage = _validate.choice("missing_usage", missing_usage, ("worst_case", "estimate"))
        self.resolver = resolver
        self.policy = policy
        self.tier = tier
        self.fallback_rates = _fallback_rates(unknown_model_price)
        # Models whose entry lacks the requested tier: priced at their standard rates (said once, and on spans).
        self.tier_missing: set[str] = set()
        self.user_catalog = Path(user_catalog) if user_catalog else user_catalog_path()
        self._lock = threading.Lock()
        self._said: set[tuple[str, str]] = set()
        self._entries: dict[str, PriceEntry | None] = {}
        self._cards: dict[str, _PriceCard] = {}

    def _once(self, kind: str, model: str, message: str, *args: object) -> None:
        with self._lock:
            if (kind, model) in self._said:
                return
            self._said.add((kind, model))
        logger.warning(message, *args)

    def entry_for(self, model: str) -> PriceEntry | None:
        """The price entry for `model`, or None (cost unknown) under the `warn` policy.

        Under `error` (and `prompt` where nobody can answer) raises `UnpricedModelError` so no
        call to an unpriced model is made.
        """
        try:
            return self._entries[model]
        except KeyError:
            pass
        try:
            entry: PriceEntry | None = self.resolver.lookup(model, tier=self.tier)
        except UnknownModelError as exc:
            entry = self._unknown(model, exc)
        except KeyError:  # the entry has no such tier: its standard rates, said once and marked on spans
            entry = self.resolver.lookup(model)
            with self._lock:
                self.tier_missing.add(model)
            self._once("tier", model, "%s has no %r tier price; its standard rates are used "
                       "(dspy.pricing.tier_missing on its spans).", model, self.tier)
        with self._lock:
            self._entries[model] = entry
        return entry

    def tier_for(self, model: str) -> str | None:
        """The tier a call to `model` is priced at: the configured one, unless the model lacks it."""
        return None if model in self.tier_missing else self.tier

    def _unknown(self, model: str, exc: UnknownModelError) -> PriceEntry | None:
        if self.fallback_rates is not None:
            self._once("fallback", model, "%s It is priced at the unknown_model_price fallback "
                       "(dspy.pricing.source=fallback).", exc)
            return _fallback_entry(model, self.fallback_rates)
        policy = self.policy
        if policy == "prompt":
            if sys.stdin is not None and sys.stdin.isatty() and not os.environ.get("CI"):
                return self._ask(model)
            policy = "error"
        if policy == "error":
            raise UnpricedModelError(f"{exc} (unknown_model policy is 'error'; use 'warn' to record the cost as "
                                     f"unknown instead)")
        self._once("unknown", model, "%s Its cost is recorded as unknown (dspy.cost.unknown=true), not $0.", exc)
        return None

    def _ask(self, model: str) -> PriceEntry | None:
        """Interactive: ask for rates, append them to the user catalog with a timestamp."""
        print(f"otel-dspy-cost: no price known for {model!r}.", file=sys.stderr)
        try:
            rates = {name: float(input(f"  {name} USD per 1M tokens: ").strip())
                     for name in ("input", "cached_input", "output")}
        except (EOFError, ValueError):
            raise UnpricedModelError(f"No price entered for {model!r}") from None
        add_entry(self.user_catalog, model, rates, note="entered at the unknown-model prompt")
        self.resolver.reload_user_catalog(self.user_catalog)
        return self.resolver.lookup(model, tier=self.tier)

    def _card(self, model: str) -> _PriceCard | None:
        """The model's price card, or None when no price is known (raises like `entry_for`)."""
        card = self._cards.get(model)
        if card is not None:
            return card
        entry = self.entry_for(model)
        if entry is None:
            return None
        tier = self.tier_for(model)  # after entry_for: it learns whether the model lacks the tier
        rates = entry.rates_for(tier, 0)
        long_above = entry.long_context_threshold if entry.long_context_rates is not None else None
        card = _PriceCard(entry, tier, rates, long_above, *worst_rates(rates), (rates.request or 0.0) / 1000)
        self._cards[model] = card
        return card

    def cost(self, model: str, usage: Usage, *, cache_hit: bool = False) -> CallCost:
        try:
            card = self._card(model)
        except UnpricedModelError:
            # After the call the money is spent: never raise here, record the cost as unknown.
            return UNKNOWN_COST
        if card is None:
            return UNKNOWN_COST
        short = card.long_above is None or usage.input_tokens <= card.long_above  # else long-context rates
        return compute_cost(usage, card.entry, tier=card.tier, cache_hit=cache_hit, rates=card.rates if short else None)

    def worst_case(self, model: str, input_tokens_bound: int, max_tokens: int | None, n: int = 1,
                   apart: tuple[str, ...] = (), searches: int = 0) -> tuple[float | None, str | None]:
        """(USD to reserve, the term that dominates it) for a call about to be made; (None, None) when no
        price is known, (None, "unpriced:<units>") when the request can cause a unit billed apart that has no
        price (`apart`: audio_input / audio_output / image_output the request carries or asks for; `searches`:
        the most web searches its tools allow). `n` completions are `n` times the call."""
        card = self._card(model)
        if card is None:
            return None, None
        entry = card.entry
        unset = max_tokens is None
        out = max_tokens if max_tokens is not None else (entry.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS)
        if entry.local or (card.long_above is not None and input_tokens_bound > card.long_above):
            total, in_part, out_part = worst_case_usd(entry, input_tokens_bound, out, card.tier)
        else:  # worst_case_usd's arithmetic on the card's rates
            in_part, out_part = input_tokens_bound * card.worst_in / PER_MILLION, out * card.worst_out / PER_MILLION
            total = in_part + out_part
        if apart or searches:  # the rare request: audio in or out, images out, search tools
            rates = card.rates
            missing = [u for u in apart if getattr(rates, u) is None]
            if searches and rates.web_search is None:
                missing.append("web_search")
            if missing and not entry.local:
                return None, "unpriced:" + ",".join(missing)
            for unit in apart:
                rate = getattr(rates, unit) or 0.0
                if unit == "audio_input":
                    in_part = max(in_part, input_tokens_bound * rate / PER_MILLION)
                else:
                    out_part = max(out_part, out * rate / PER_MILLION)
            total = in_part + out_part + (0.0 if entry.local else searches * (rates.web_search or 0.0) / 1000)
        total += card.fee
        # n completions: DSPy 3.4's native engine sends n requests (each billed for the prompt), LiteLLM one
        # request with n choices (prompt billed once). The bound covers both: the whole call, n times.
        copies = max(1, n)
        total, in_part, out_part = total * copies, in_part * copies, out_part * copies
        if unset and out_part >= in_part:
            term = "max_tokens_unset"
        else:
            term = "output" if out_part >= in_part else "input"
        return total, term

    def warn_unbounded(self, model: str, amount: float) -> None:
        """A call under a budget that sets no max_tokens (and whose engine sends none): reserved at the model's
        maximum output, which is usually most of its worst case. Said once per model."""
        if ("unbounded", model) in self._said:
            return
        card = self._card(model)
        out = (card.entry.max_output_tokens if card is not None else None) or DEFAULT_MAX_OUTPUT_TOKENS
        self._once("unbounded", model, "LM calls to %s set no max_tokens: under a budget each is reserved at the "
                   "model's maximum output (%d tokens), $%.6f a call here, and given back when it settles. Set "
                   "max_tokens on the LM (dspy.LM(..., max_tokens=...)) to reserve what you expect instead.",
                   model, out, amount)

    def warn_worst_case(self, model: str) -> None:
        self._once("worst_case", model, "Provider reported no token usage for %s: each such call counts at its "
                   "worst case (dspy.cost.estimated=true, reason 'usage missing'). If it never reports usage and "
                   "never bills hidden tokens, instrument(missing_usage='estimate') counts from the text instead.",
                   model)

    def warn_unpriced(self, model: str, units: tuple[str, ...]) -> None:
        self._once("unpriced_unit", model, "%s billed %s, which has no price for it: such calls count at their worst "
                   "case (dspy.cost.unpriced_units on their spans). Add the rate with pricing_overrides or a catalog "
                   "entry (audio_input, audio_output, image_output per 1M tokens; web_search per 1,000).",
                   model, ", ".join(units))

    def warn_estimated(self, model: str) -> None:
        self._once("estimated", model, "Provider reported no token usage for %s: tokens were estimated from the text "
                   "(dspy.cost.estimated=true).", model)


def _fallback_rates(price: Mapping[str, float] | None) -> Rates | None:
    if price is None:
        return None
    if not isinstance(price, Mapping):
        raise TypeError(f"unknown_model_price must be a dict of USD per 1M tokens, not {price!r}")
    unknown = set(price) - set(RATE_FIELDS)
    if unknown or "input" not in price or "output" not in price:
        raise ValueError("unknown_model_price needs 'input' and 'output' (USD per 1M tokens) and may add "
                         f"'cached_input', 'cache_write', 'cache_write_1h', 'reasoning'; got {sorted(price)}")
    return Rates(**{k: _validate.number(f"unknown_model_price[{k!r}]", v, allow_none=False) for k, v in price.items()})


def _fallback_entry(model: str, rates: Rates) -> PriceEntry:
    import datetime as dt

    provider, name = split_model(model)
    return PriceEntry(provider=provider or "unknown", model=name, variant="default", price_version=0,
                      effective_at=dt.datetime(1970, 1, 1, tzinfo=dt.UTC), expires_at=None, currency="USD",
                      standard_rates=rates, tiers={}, long_context_threshold=None, long_context_rates=None,
                      max_output_tokens=None, source="fallback", catalog_version="fallback")

