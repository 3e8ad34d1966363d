"""The price in force for a model at a time: user overrides, then the shipped catalog, then LiteLLM's map."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otel_dspy_cost import _validate
from otel_dspy_cost.errors import UnknownModelError
from otel_dspy_cost.pricing.catalog import (
    EPOCH,
    LOCAL_PROVIDERS,
    PRICING_FILE_ENV,
    STANDARD_TIERS,
    Catalog,
    PriceEntry,
    Rates,
    TrainingPrice,
    default_catalog_path,
    fine_tune_base,
    inherit,
    model_family,
    split_model,
    user_catalog_path,
    with_premium,
)
from otel_dspy_cost.pricing.litellm_prices import litellm_entry

logger = logging.getLogger("otel_dspy_cost")


class PricingResolver:
    """Looks prices up across overrides, the user catalog, the shipped catalog and LiteLLM, caching answers.

    `when` defaults to the resolver's `run_started_at`, so every call in one run is priced from
    the same price list even if a price change takes effect mid-run.
    """

    def __init__(self, overrides: str | os.PathLike[str] | Mapping[str, Any] | None = None, *,
                 catalog_path: str | os.PathLike[str] | None = None, use_litellm: bool = True,
                 local_models: Mapping[str, Mapping[str, float]] | None = None,
                 run_started_at: _dt.datetime | None = None):
        self.run_started_at = run_started_at or _dt.datetime.now(_dt.UTC)
        self._dated_run = run_started_at is not None  # `prices_as_of`: a past price list was asked for
        self.catalogs: list[Catalog] = []
        env_file = os.environ.get(PRICING_FILE_ENV)
        if isinstance(overrides, Mapping):
            self.catalogs.append(Catalog.from_mapping(overrides))
        elif overrides is not None:
            self.catalogs.append(Catalog.from_path(overrides))
        if env_file:
            self.catalogs.append(Catalog.from_path(env_file))
        user_file = user_catalog_path()
        if user_file.is_file():
            self.catalogs.append(Catalog.from_path(user_file, source="user"))
        self.catalogs.append(Catalog.from_path(catalog_path or default_catalog_path(), source="catalog"))
        self.use_litellm = use_litellm
        if local_models is not None and not isinstance(local_models, Mapping):
            raise TypeError(f"local_models must be a dict of model -> rates, not {local_models!r}")
        _validate.finite_tree("local_models", dict(local_models or {}))
        for model, rates in (local_models or {}).items():
            for field, rate in (rates.items() if isinstance(rates, Mapping) else ()):
                _validate.number(f"local_models[{model!r}][{field!r}]", rate, allow_none=False)
        self.local_models = {k: Rates.of(v) for k, v in (local_models or {}).items()}
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], PriceEntry] = {}
        self._said: set[tuple[str, str]] = set()

    def reload_user_catalog(self, path: Path) -> None:
        """Re-read the user catalog (after the unknown-model prompt appended to it) and forget cached answers."""
        catalogs = [c for c in self.catalogs if c.source != "user"]
        catalogs.insert(len(catalogs) - 1, Catalog.from_path(path, source="user"))  # just before the shipped one
        with self._lock:
            self.catalogs = catalogs
            self._cache.clear()

    def is_local(self, model: str) -> bool:
        provider, _ = split_model(model)
        return model in self.local_models or provider in LOCAL_PROVIDERS

    def lookup(self, model: str, *, when: _dt.datetime | None = None, tier: str | None = None,
               fine_tuned: bool = False, price_version: int | None = None) -> PriceEntry:
        """The entry priced for `model` at `when` in `tier` (its `rates` are that tier's).

        Raises `UnknownModelError` when no source knows the model and `KeyError` when the entry has no
        such tier. A price that is not simply the one in force (a date outside the model's history, no
        dated history at all, a fine-tune at base rates) carries the reason in `fallback`, said once
        per model in the log.
        """
        dated = when is not None or self._dated_run
        when = when or self.run_started_at
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        key = (model, when, tier, fine_tuned, price_version)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        entry = self._lookup(model, when, tier, fine_tuned, price_version)
        if entry.source == "litellm" and dated and when < _dt.datetime.now(_dt.UTC) - _dt.timedelta(days=1):
            entry = dataclasses.replace(entry, fallback=f"no_history: LiteLLM's current price for {when.date()} "
                                                        f"(LiteLLM keeps no dated prices)")
        if tier not in STANDARD_TIERS:
            entry.rates_for(tier)  # raises KeyError early for an unknown tier
            entry = dataclasses.replace(entry, tier=tier)
        if entry.fallback:
            self._say_once(model, entry.fallback)
        with self._lock:
            self._cache[key] = entry
        return entry

    def _say_once(self, model: str, why: str) -> None:
        kind = why.split(":", 1)[0]
        with self._lock:
            if (model, kind) in self._said:
                return
            self._said.add((model, kind))
        logger.warning("Price of %s: %s (dspy.pricing.fallback on its spans).", model, why)

    def _lookup(self, model: str, when: _dt.datetime, tier: str | None, fine_tuned: bool,
                price_version: int | None) -> PriceEntry:
        if self.is_local(model):
            return self._local_entry(model)
        provider, name = split_model(model)
        base_name = fine_tune_base(name)
        if base_name is not None:
            fine_tuned = True
        # The price in force in any catalog beats a fallback from an earlier one (a user's price change
        # from today must not hide the shipped price of last month).
        found = None
        for strict in (True, False):
            for catalog in self.catalogs:
                found = self._match(catalog, provider, base_name or name, when, price_version, strict)
                if found is not None:
                    break
            if found is not None:
                break
        if found is None and self.use_litellm and price_version is None:
            found = litellm_entry(model if base_name is None else f"{provider}/{base_name}" if provider
                                   else base_name)
        if found is None and price_version is not None:
            versions = sorted({e.price_version for c in self.catalogs for e in c.entries if e.variant == "default"
                               and (provider is None or e.provider == provider)
                               and (e.model == (base_name or name) or (base_name or name) in e.aliases)})
            if versions:  # the model is known: the version asked for is not
                raise UnknownModelError(model, [], detail=(
                    f"{model} has no price_version {price_version} (its versions: "
                    f"{', '.join(str(v) for v in versions)}; `otel-dspy-cost pricing show {model}` lists them)"))
        if found is None:
            raise UnknownModelError(model, self.suggest(model))
        return self._fine_tuned(model, found, when, price_version) if fine_tuned else found

    @staticmethod
    def _match(catalog: Catalog, provider: str | None, name: str, when: _dt.datetime, price_version: int | None,
               strict: bool) -> PriceEntry | None:
        """The entry of `name` (an exact model name beats an alias) selected by version or date.

        `strict=False` also answers for a date outside the model's history, with the reason in `fallback`.
        """
        rows = [e for e in catalog.entries if e.variant == "default" and (provider is None or e.provider == provider)]
        same = [e for e in rows if e.model == name] or [e for e in rows if name in e.aliases]
        if not same:
            return None
        chosen = [e for e in same if e.selected_by(when, price_version)]
        if chosen:
            return max(chosen, key=lambda e: e.price_version)
        if strict or price_version is not None:
            return None
        started = [e for e in same if e.effective_at <= when]
        if started:
            e = max(started, key=lambda e: (e.effective_at, e.price_version))
            why = (f"history_gap: no price of {e.key} in force on {when.date()}; the last one before it "
                   f"(v{e.price_version} from {e.effective_at.date()}) is used")
        else:
            e = min(same, key=lambda e: (e.effective_at, e.price_version))
            why = (f"before_history: {when.date()} is before the first price of {e.key}; that first price "
                   f"(v{e.price_version} from {e.effective_at.date()}) is used")
        return dataclasses.replace(e, fallback=why)

    def _fine_tuned(self, model: str, base: PriceEntry, when: _dt.datetime, price_version: int | None
                    ) -> PriceEntry:
        """A fine-tune's price, most specific first: a fine-tuned entry in a catalog, a provider premium
        covering the base model, LiteLLM's `ft:` record, else the base model's rates (said as a fallback)."""
        for catalog in self.catalogs:
            explicit = self._fine_tuned_entry(catalog, base, when, price_version)
            if explicit is not None:
                return inherit(explicit, base)
        for catalog in self.catalogs:
            premium = next((p for p in reversed(catalog.premiums) if p.covers(base.provider, base.model, when)), None)
            if premium is not None:
                return with_premium(base, premium)
        if self.use_litellm and base.source != "litellm":
            for name in (base.model, *base.aliases):
                found = litellm_entry(f"ft:{name}", provider=base.provider)
                if found is not None:
                    return dataclasses.replace(found, variant="fine-tuned", inherits=f"{base.provider}/{base.model}")
        return dataclasses.replace(base, variant="fine-tuned", fallback=(
            f"fine_tune_at_base: no fine-tune price known for {model}; {base.key}'s rates are used (add one with "
            f"`otel-dspy-cost pricing add` or a fine-tuned catalog entry)"))

    @staticmethod
    def _fine_tuned_entry(catalog: Catalog, base: PriceEntry, when: _dt.datetime, price_version: int | None
                          ) -> PriceEntry | None:
        """A fine-tuned entry inheriting from `base`'s model family (a dated snapshot belongs to its family)."""
        family = model_family(base.model)
        candidates = [e for e in catalog.entries
                      if e.variant == "fine-tuned" and e.provider == base.provider and e.inherits
                      and model_family(split_model(e.inherits)[1]) == family and e.selected_by(when, price_version)]
        return max(candidates, key=lambda e: e.price_version, default=None)

    def _local_entry(self, model: str) -> PriceEntry:
        provider, name = split_model(model)
        rates = self.local_models.get(model, Rates(input=0.0, output=0.0))
        return PriceEntry(provider=provider or "local", model=name, variant="default", price_version=0,
                          effective_at=EPOCH, expires_at=None, currency="USD", standard_rates=rates, tiers={},
                          long_context_threshold=None, long_context_rates=None, max_output_tokens=None,
                          source="local", catalog_version="local", local=True)

    def suggest(self, model: str, n: int = 3) -> list[str]:
        known = sorted({k for c in self.catalogs for k in c.known_keys()})
        _, name = split_model(model)
        by_name = {k.split("/", 1)[1]: k for k in known}
        close = difflib.get_close_matches(name, list(by_name), n=n, cutoff=0.4)
        return [by_name[c] for c in close]

    def training_price(self, model: str, when: _dt.datetime | None = None) -> TrainingPrice | None:
        """Fine-tuning *training* price (per 1M training tokens), recorded apart from inference."""
        when = when or self.run_started_at
        provider, name = split_model(model)
        prices = [t for c in self.catalogs for t in c.training
                  if t.model == name and (provider is None or t.provider == provider) and t.effective_at <= when]
        return max(prices, key=lambda t: t.effective_at, default=None)


_default_lock = threading.Lock()
_default: PricingResolver | None = None


def default_resolver() -> PricingResolver:
    """The resolver `instrument()` configured, or one over the shipped catalog."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PricingResolver()
        return _default


def set_default_resolver(resolver: PricingResolver | None) -> None:
    global _default
    with _default_lock:
        _default = resolver


def lookup(model: str, *, when: _dt.datetime | None = None, tier: str | None = None, fine_tuned: bool = False,
           price_version: int | None = None) -> PriceEntry:
    """The price entry in force for `model` at `when` (default: the run's start), or the pinned version.

    Raises `UnknownModelError` naming the nearest known models when nothing matches.
    """
    return default_resolver().lookup(model, when=when, tier=tier, fine_tuned=fine_tuned, price_version=price_version)
