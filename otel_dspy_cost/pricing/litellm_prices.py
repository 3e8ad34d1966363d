"""LiteLLM's bundled price map as our price entries, read from the installed package, never fetched online."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otel_dspy_cost.pricing.catalog import PriceEntry, entry_from_raw, split_model

_LITELLM_RATES = {"input": "input_cost_per_token", "cached_input": "cache_read_input_token_cost",
                  "cache_write": "cache_creation_input_token_cost",
                  "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
                  "output": "output_cost_per_token", "reasoning": "output_cost_per_reasoning_token",
                  "audio_input": "input_cost_per_audio_token", "audio_output": "output_cost_per_audio_token",
                  "image_output": "output_cost_per_image_token"}
# USD per search (LiteLLM's search context sizes price alike for every model we bill; the highest is kept).
_LITELLM_SEARCH = "search_context_cost_per_query"
# LiteLLM's key suffixes for the tiers it records; long-context rates are `_above_<N>k_tokens`.
LITELLM_TIERS = {"batch": "_batches", "priority": "_priority", "flex": "_flex"}
_LITELLM_LONG_CONTEXT = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")


def litellm_rates(info: Mapping[str, Any], suffix: str = "") -> dict[str, float]:
    """Our per-1M rates from one LiteLLM price-map record (per-token floats; `suffix` picks a tier/context)."""
    out = {}
    for ours, theirs in _LITELLM_RATES.items():
        value = info.get(theirs + suffix)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[ours] = round(float(value) * 1e6, 10)
    return out


def litellm_entry_fields(info: Mapping[str, Any], key: str = "") -> dict[str, Any]:
    """Everything billing needs from a LiteLLM record, in catalog form: rates, tiers, long context (with each
    tier's own long-context rates), 1-hour cache writes and the output cap. The one place LiteLLM's naming
    is read, shared by the live fallback, `pricing import-litellm` and `pricing diff`.

    Where LiteLLM lists several long-context thresholds the lowest is kept (the higher price sooner:
    when in doubt, count more).
    """
    fields: dict[str, Any] = _without_default_reasoning(litellm_rates(info))
    search = info.get(_LITELLM_SEARCH)
    if isinstance(search, Mapping):
        per_query = [v for v in search.values() if isinstance(v, int | float) and not isinstance(v, bool)]
        if per_query:
            # OpenAI's search-preview chat models search on every request (a fee per call); elsewhere the fee
            # is per search the tool makes (Anthropic web search, Gemini grounding: when in doubt, per query).
            fields["request" if _searches_every_request(info, key) else "web_search"] = round(max(per_query) * 1000, 10)
    thresholds = sorted(int(m.group(1)) for k in info if (m := _LITELLM_LONG_CONTEXT.match(k)))
    lc_suffix = f"_above_{thresholds[0]}k_tokens" if thresholds else None
    if lc_suffix and (lc := _without_default_reasoning(litellm_rates(info, lc_suffix))):
        fields["long_context"] = {"threshold_input_tokens": thresholds[0] * 1000, "rates": lc}
    tiers = {}
    for tier, suffix in LITELLM_TIERS.items():
        rates: dict[str, Any] = _without_default_reasoning(litellm_rates(info, suffix))
        if not rates:
            continue
        if "cache_write" in rates and "cache_write_1h" not in rates and fields.get("cache_write") \
                and fields.get("cache_write_1h") is not None:
            # LiteLLM lists a tier's 5-minute write but not its 1-hour one (Claude batch): the tier's discount
            # applies to both, as Anthropic's batch pricing halves every token rate.
            rates["cache_write_1h"] = round(fields["cache_write_1h"] * rates["cache_write"] / fields["cache_write"], 10)
        if lc_suffix and (tier_lc := litellm_rates(info, lc_suffix + suffix)):
            rates["long_context"] = tier_lc
        tiers[tier] = rates
    if tiers:
        fields["tiers"] = tiers
    if isinstance(info.get("max_output_tokens"), int) and not isinstance(info["max_output_tokens"], bool) \
            and info["max_output_tokens"] > 0:
        fields["max_output_tokens"] = info["max_output_tokens"]
    return fields


def _searches_every_request(info: Mapping[str, Any], key: str) -> bool:
    """OpenAI's search chat models (`gpt-4o-mini-search-preview`, `gpt-5-search-api`): every request searches."""
    return info.get("litellm_provider") in ("openai", "azure") and "search" in key.rsplit("/", 1)[-1]


def _without_default_reasoning(rates: dict[str, Any]) -> dict[str, Any]:
    """A reasoning rate equal to the output rate is the default, not a price of its own: kept, it would
    survive into a tier that discounts output (Gemini's batch tier halves thinking tokens too)."""
    if rates.get("reasoning") is not None and rates.get("reasoning") == rates.get("output"):
        del rates["reasoning"]
    return rates


def litellm_record(model: str, provider: str | None = None) -> tuple[str, Mapping[str, Any]] | None:
    """(LiteLLM key, record) for `provider/model` or the bare model name, from the bundled map."""
    cost_map = _litellm_cost_map()
    split_provider, name = split_model(model)
    provider = provider or split_provider
    for key in ([f"{provider}/{name}", name] if provider else [name]):
        info = cost_map.get(key)
        if isinstance(info, Mapping) and info.get("input_cost_per_token") is not None \
                and info.get("output_cost_per_token") is not None:
            return key, info
    return None


def litellm_entry(model: str, provider: str | None = None) -> PriceEntry | None:
    """LiteLLM's bundled price map, read locally (never the online refresh), with tiers and long context."""
    found = litellm_record(model, provider)
    if found is None:
        return None
    key, info = found
    split_provider, name = split_model(model)
    return litellm_price_entry(key, info, provider or split_provider or str(info.get("litellm_provider", "unknown")),
                               name)


def litellm_price_entry(key: str, info: Mapping[str, Any], provider: str, model: str) -> PriceEntry:
    """One LiteLLM record as a `PriceEntry` of `provider/model` (price_version 0: LiteLLM keeps no history)."""
    raw = {"provider": provider, "model": model, "price_version": 1, "effective_at": "1970-01-01T00:00:00Z",
           **litellm_entry_fields(info, key)}
    entry = entry_from_raw(raw, f"LiteLLM price map: {key}", source="litellm",
                           catalog_version=f"litellm-{litellm_version()}")
    return dataclasses.replace(entry, price_version=0)


_cost_map: dict[str, Any] | None = None


def _litellm_cost_map() -> dict[str, Any]:
    """LiteLLM's bundled price map. Read as the JSON file the package ships, without importing LiteLLM:
    the import alone took about 3 s here, paid by the first lookup of a model our catalog lacks."""
    global _cost_map
    live = sys.modules.get("litellm")
    if live is not None and isinstance(getattr(live, "model_cost", None), dict):
        return live.model_cost  # already imported (DSPy 3.3 does): its live map, with register_model() entries
    if _cost_map is not None:
        return _cost_map
    found: dict[str, Any] = {}
    try:
        import importlib.util

        spec = importlib.util.find_spec("litellm")
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(folder) / "model_prices_and_context_window_backup.json"
            if path.is_file():
                found = json.loads(path.read_text())
                break
    except Exception:  # noqa: BLE001 - fall back to the package itself below
        found = {}
    if not found:
        try:
            import litellm

            found = dict(litellm.model_cost)
        except Exception:  # noqa: BLE001 - a broken LiteLLM must not break pricing
            found = {}
    _cost_map = found
    return found


@functools.lru_cache(maxsize=1)  # read from package metadata once, not once per LiteLLM-priced model
def litellm_version() -> str:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:  # noqa: BLE001
        return "unknown"
