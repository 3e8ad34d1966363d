"""The versioned pricing catalog: load, validate, and look up the price in force for a model.

Prices are append-only history: a price change adds an entry with a higher `price_version` and a
later `effective_at`, so a run dated before the change is still priced at the old rate and past
reports stay auditable. Sources are consulted in order: user overrides, the shipped catalog, then
LiteLLM's bundled price map (read from the installed package, never fetched online).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import fnmatch
import functools
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger("otel_dspy_cost.pricing")

PRICING_FILE_ENV = "OTEL_DSPY_COST_PRICING_FILE"
UNKNOWN_MODEL_ENV = "OTEL_DSPY_COST_UNKNOWN_MODEL"
USER_CATALOG_ENV = "OTEL_DSPY_COST_USER_CATALOG"
LOCAL_PROVIDERS = frozenset({"ollama", "ollama_chat", "lm_studio", "hosted_vllm", "local", "llamafile"})
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_RATE_FIELDS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")
_STANDARD_TIERS = (None, "", "default", "standard")
# Dated snapshot suffixes: `gpt-4o-2024-08-06`, `claude-sonnet-4-20250514` belong to the family before them.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


class CatalogError(ValueError):
    """A catalog file or override is malformed; the message names the file, the entry and the field."""


class UnknownModelError(LookupError):
    """No price is known for a model; the message names the nearest known models."""

    def __init__(self, model: str, suggestions: list[str]):
        self.model = model
        self.suggestions = suggestions
        hint = f" Nearest known models: {', '.join(suggestions)}." if suggestions else ""
        super().__init__(
            f"No price known for model {model!r}.{hint} Add it with `otel-dspy-cost pricing add`, pass "
            f"pricing_overrides= to instrument(), or set {PRICING_FILE_ENV}."
        )


@dataclasses.dataclass(frozen=True)
class Rates:
    """USD per 1M tokens. `None` means "not priced apart" (falls back as documented in `_cost`).

    `cache_write` is a 5-minute prompt-cache write, `cache_write_1h` a 1-hour one (Anthropic bills
    1.25x and 2x the input rate).
    """

    input: float | None = None
    cached_input: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None
    output: float | None = None
    reasoning: float | None = None

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Rates:
        return cls(**{f: raw.get(f) for f in _RATE_FIELDS})

    def merged(self, other: Rates) -> Rates:
        """`other`'s set fields win; used for tiers, long context and fine-tune overrides."""
        return Rates(**{f: getattr(other, f) if getattr(other, f) is not None else getattr(self, f)
                        for f in _RATE_FIELDS})

    def scaled(self, factors: Mapping[str, float]) -> Rates:
        return Rates(**{f: (getattr(self, f) * factors.get(f, 1.0)) if getattr(self, f) is not None else None
                        for f in _RATE_FIELDS})

    def rescaled(self, base: Rates, target: Rates) -> Rates:
        """`self` is a variant (a tier) of `base`; the same variant of `target`, field by field in proportion.

        Used where a price list gives a tier's standard rates but not its long-context ones (a batch
        discount applies to long-context rates too), and for tiers of a fine-tuned model.
        """
        out = {}
        for f in _RATE_FIELDS:
            mine, b, t = getattr(self, f), getattr(base, f), getattr(target, f)
            out[f] = mine if mine is None or not b or t is None else round(t * mine / b, 10)
        return Rates(**out)


@dataclasses.dataclass(frozen=True)
class PriceEntry:
    """One row of price history, already resolved (inheritance and premiums applied).

    `rates` are the rates of the entry's `tier` (standard when none) for a prompt below any long-context
    threshold; `rates_for(tier, input_tokens)` gives any other combination. `fallback` says why this
    price was used when it is not simply the one in force (a date outside the model's history, a
    fine-tune priced at its base model's rates); it is None otherwise.
    """

    provider: str
    model: str
    variant: str
    price_version: int
    effective_at: _dt.datetime
    expires_at: _dt.datetime | None
    currency: str
    standard_rates: Rates
    tiers: Mapping[str, Rates]
    long_context_threshold: int | None
    long_context_rates: Rates | None
    max_output_tokens: int | None
    source: str  # override | user | catalog | litellm | local | fallback
    catalog_version: str
    local: bool = False
    aliases: tuple[str, ...] = ()
    inherits: str | None = None
    # A tier's own long-context rates where the price list gives them (else derived in proportion).
    tier_long_context: Mapping[str, Rates] = dataclasses.field(default_factory=dict)
    tier: str | None = None
    fallback: str | None = None

    @property
    def key(self) -> str:
        base = f"{self.provider}/{self.model}"
        return base if self.variant == "default" else f"{base}@{self.variant}"

    @property
    def rates(self) -> Rates:
        return self.rates_for()

    def rates_for(self, tier: str | None = None, input_tokens: int = 0) -> Rates:
        """Rates for a tier (default: the entry's own) and prompt size.

        Above the long-context threshold the long-context rates apply, in every tier: a tier's own
        long-context rates where the catalog gives them, else its discount applied in proportion to the
        long-context rates (batch halves them).
        """
        tier = tier if tier is not None else self.tier
        std = self.standard_rates
        long = (self.long_context_rates is not None and self.long_context_threshold is not None
                and input_tokens > self.long_context_threshold)
        long_rates = std.merged(self.long_context_rates) if long and self.long_context_rates else std
        if tier in _STANDARD_TIERS:
            return long_rates
        if tier not in self.tiers:
            raise KeyError(f"{self.key} has no {tier!r} tier (known: {', '.join(sorted(self.tiers)) or 'none'})")
        tiered = std.merged(self.tiers[tier])
        if not long:
            return tiered
        derived = long_rates.merged(tiered.rescaled(std, long_rates))
        own = self.tier_long_context.get(tier)
        return derived.merged(own) if own is not None else derived

    def in_force(self, when: _dt.datetime) -> bool:
        return self.effective_at <= when and (self.expires_at is None or when < self.expires_at)

    def selected_by(self, when: _dt.datetime, price_version: int | None) -> bool:
        """The pinned version when one is given, else the entry in force at `when`."""
        return self.price_version == price_version if price_version is not None else self.in_force(when)


@dataclasses.dataclass(frozen=True)
class TrainingPrice:
    provider: str
    model: str
    effective_at: _dt.datetime
    per_1m_training_tokens: float


def _parse_time(value: str | None, where: str) -> _dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{where}: not an ISO-8601 timestamp: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.UTC)


@functools.cache
def _schema_validator():
    import jsonschema

    schema = json.loads(_data_path("catalog.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def _data_path(name: str) -> Path:
    """The shipped data file: inside the wheel, or the repo's top-level `pricing/` in a source tree."""
    packaged = resources.files("otel_dspy_cost") / "_data" / "pricing" / name
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "pricing" / name


def default_catalog_path() -> Path:
    return _data_path("catalog.json")


def user_catalog_path() -> Path:
    """The user's own catalog (`pricing add`, the `prompt` policy write it; every resolver reads it)."""
    env = os.environ.get(USER_CATALOG_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "otel-dspy-cost" / "pricing.json"


def _entry_name(raw: Any, index: int) -> str:
    if isinstance(raw, dict):
        return f"entries[{index}] ({raw.get('provider', '?')}/{raw.get('model', '?')} v{raw.get('price_version', '?')})"
    return f"entries[{index}]"


@dataclasses.dataclass(frozen=True)
class _Premium:
    """A provider-wide fine-tune multiplier, for base models matching `applies_to` (fnmatch patterns)."""

    provider: str
    effective_at: _dt.datetime
    applies_to: tuple[str, ...]
    factors: Mapping[str, float]

    def covers(self, provider: str, model: str, when: _dt.datetime) -> bool:
        return (self.provider == provider and self.effective_at <= when
                and any(fnmatch.fnmatchcase(model, pattern) for pattern in self.applies_to))


def entry_from_raw(raw: Mapping[str, Any], where: str, *, source: str, catalog_version: str, currency: str = "USD",
                   base: PriceEntry | None = None) -> PriceEntry:
    """A `PriceEntry` from one catalog record (schema-valid), merged over `base` when it inherits."""
    effective = _parse_time(raw["effective_at"], where)
    expires = _parse_time(raw.get("expires_at"), where)
    if expires is not None and expires <= effective:
        raise CatalogError(f"{where}: field 'expires_at': must be after effective_at")
    own = Rates.of(raw)
    tiers = {name: Rates.of(t) for name, t in raw.get("tiers", {}).items()}
    tier_lc = {name: Rates.of(t["long_context"]) for name, t in raw.get("tiers", {}).items() if "long_context" in t}
    lc = raw.get("long_context")
    entry = PriceEntry(
        provider=raw["provider"], model=raw["model"], variant=raw.get("variant", "default"),
        price_version=int(raw["price_version"]), effective_at=effective, expires_at=expires,
        currency=raw.get("currency", currency), standard_rates=own, tiers=tiers,
        long_context_threshold=lc["threshold_input_tokens"] if lc else None,
        long_context_rates=Rates.of(lc["rates"]) if lc else None,
        max_output_tokens=raw.get("max_output_tokens"), source=source, catalog_version=catalog_version,
        local=bool(raw.get("local", False)), aliases=tuple(raw.get("aliases", ())), inherits=raw.get("inherits"),
        tier_long_context=tier_lc)
    return inherit(entry, base) if base is not None else entry


def inherit(entry: PriceEntry, base: PriceEntry) -> PriceEntry:
    """`entry`'s own rates over `base`'s; base tiers and long-context rates carried in proportion."""
    std = base.standard_rates.merged(entry.standard_rates)
    tiers = {name: t.rescaled(base.standard_rates, std) for name, t in base.tiers.items()}
    tiers.update(entry.tiers)
    lc_rates = entry.long_context_rates
    if lc_rates is None and base.long_context_rates is not None:
        lc_rates = base.long_context_rates.rescaled(base.standard_rates, std)
    return dataclasses.replace(
        entry, standard_rates=std, tiers=tiers, long_context_rates=lc_rates,
        long_context_threshold=entry.long_context_threshold or base.long_context_threshold,
        max_output_tokens=entry.max_output_tokens or base.max_output_tokens,
        tier_long_context={**base.tier_long_context, **entry.tier_long_context})


def _family(name: str) -> str:
    return _SNAPSHOT.sub("", name)


class Catalog:
    """A validated set of price entries from one source (the shipped file, or a user override)."""

    def __init__(self, data: Mapping[str, Any], *, origin: str, source: str):
        self.origin = origin
        self.source = source
        self._validate_schema(data)
        self.catalog_version = str(data["catalog_version"])
        self.currency = data["currency"]
        self.raw = data
        self.premiums = [
            _Premium(p["provider"], _parse_time(p["effective_at"], f"{origin}: fine_tune_premiums"),
                     tuple(p.get("applies_to", ("*",))),
                     {"input": p.get("input_multiplier", 1.0), "cached_input": p.get("cached_input_multiplier", 1.0),
                      "cache_write": p.get("input_multiplier", 1.0), "cache_write_1h": p.get("input_multiplier", 1.0),
                      "output": p.get("output_multiplier", 1.0), "reasoning": p.get("output_multiplier", 1.0)})
            for p in data.get("fine_tune_premiums", [])
        ]
        self.training = [
            TrainingPrice(t["provider"], t["model"], _parse_time(t["effective_at"], f"{origin}: training"),
                          float(t["per_1m_training_tokens"]))
            for t in data.get("fine_tuning_training", [])
        ]
        raw_entries = list(data["entries"])
        self.entries: list[PriceEntry] = []
        pending = list(enumerate(raw_entries))
        # Entries that inherit are resolved after their base; two passes cover one level of inheritance,
        # and a loop guards against chains.
        for _ in range(4):
            deferred = []
            for index, raw in pending:
                entry = self._build(raw, index)
                if entry is None:
                    deferred.append((index, raw))
                else:
                    self.entries.append(entry)
            pending = deferred
            if not pending:
                break
        for index, raw in pending:
            raise CatalogError(f"{origin}: {_entry_name(raw, index)}: field 'inherits': base model "
                               f"{raw['inherits']!r} is not in this catalog")
        self._check_overlaps()

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, source: str = "override") -> Catalog:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise CatalogError(f"{path}: cannot read pricing file: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        return cls(data, origin=str(path), source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "<overrides>") -> Catalog:
        """Accepts a full catalog, or the shorthand {"provider/model": {"input": .., "output": ..}}."""
        if "entries" not in data:
            entries = []
            for key, rates in data.items():
                if "/" not in key or not isinstance(rates, Mapping):
                    raise CatalogError(f"{origin}: override {key!r}: expected 'provider/model': {{rates}}")
                provider, model = key.split("/", 1)
                entries.append({"provider": provider, "model": model, "price_version": 1,
                                "effective_at": "1970-01-01T00:00:00Z", **rates})
            data = {"schema_version": 1, "catalog_version": "overrides", "currency": "USD", "entries": entries}
        return cls(data, origin=origin, source="override")

    def _validate_schema(self, data: Any) -> None:
        errors = sorted(_schema_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
        if not errors:
            return
        err = errors[0]
        path = list(err.absolute_path)
        where = self.origin
        if len(path) >= 2 and path[0] == "entries" and isinstance(path[1], int):
            entries = data.get("entries", [])
            where += f": {_entry_name(entries[path[1]] if path[1] < len(entries) else None, path[1])}"
            field = ".".join(str(p) for p in path[2:]) or "(entry)"
        else:
            field = ".".join(str(p) for p in path) or "(top level)"
        raise CatalogError(f"{where}: field {field!r}: {err.message}")

    def _build(self, raw: Mapping[str, Any], index: int) -> PriceEntry | None:
        where = f"{self.origin}: {_entry_name(raw, index)}"
        base_key = raw.get("inherits")
        base = None
        if base_key:
            base = self.find(base_key, _parse_time(raw["effective_at"], where))
            if base is None:
                return None
            if raw.get("variant") == "fine-tuned":
                base = None  # a fine-tune inherits at lookup time, from the base price in force then
        elif not raw.get("local"):
            for required in ("input", "output"):
                if raw.get(required) is None:
                    raise CatalogError(f"{where}: field {required!r}: missing rate (USD per 1M tokens)")
        return entry_from_raw(raw, where, source=self.source, catalog_version=self.catalog_version,
                              currency=self.currency, base=base)

    def find(self, key: str, when: _dt.datetime) -> PriceEntry | None:
        provider, _, model = key.partition("/")
        matches = [e for e in self.entries if e.provider == provider and e.variant == "default"
                   and (e.model == model or model in e.aliases) and e.in_force(when)]
        return max(matches, key=lambda e: e.price_version, default=None)

    def _check_overlaps(self) -> None:
        by_key: dict[tuple[str, int], list[PriceEntry]] = {}
        for entry in self.entries:
            by_key.setdefault((entry.key, entry.price_version), []).append(entry)
        for (key, version), group in by_key.items():
            group.sort(key=lambda e: e.effective_at)
            for a, b in zip(group, group[1:], strict=False):
                if a.expires_at is None or a.expires_at > b.effective_at:
                    raise CatalogError(
                        f"{self.origin}: {key} v{version}: field 'effective_at': overlapping effective ranges "
                        f"({a.effective_at.isoformat()} .. {a.expires_at.isoformat() if a.expires_at else 'open'}"
                        f" and from {b.effective_at.isoformat()}); a price change needs a new price_version")

    def known_keys(self) -> list[str]:
        keys = {e.key for e in self.entries}
        keys.update(f"{e.provider}/{a}" for e in self.entries for a in e.aliases)
        return sorted(keys)


def split_model(model: str) -> tuple[str | None, str]:
    """'openai/gpt-4o-mini' -> ('openai', 'gpt-4o-mini'); a bare name has no provider."""
    if "/" in model:
        provider, name = model.split("/", 1)
        return provider.lower(), name
    return None, model


def _fine_tune_base(name: str) -> str | None:
    """OpenAI names fine-tunes 'ft:<base>:<org>::<id>'."""
    if name.startswith("ft:"):
        return name.split(":")[1]
    return None


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
        if tier not in _STANDARD_TIERS:
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
        base_name = _fine_tune_base(name)
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
            found = _litellm_entry(model if base_name is None else f"{provider}/{base_name}" if provider
                                   else base_name)
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
                f = premium.factors
                return dataclasses.replace(
                    base, standard_rates=base.standard_rates.scaled(f), variant="fine-tuned",
                    inherits=f"{base.provider}/{base.model}", tiers={k: v.scaled(f) for k, v in base.tiers.items()},
                    long_context_rates=base.long_context_rates.scaled(f) if base.long_context_rates else None,
                    tier_long_context={k: v.scaled(f) for k, v in base.tier_long_context.items()})
        if self.use_litellm and base.source != "litellm":
            for name in (base.model, *base.aliases):
                found = _litellm_entry(f"ft:{name}", provider=base.provider)
                if found is not None:
                    return dataclasses.replace(found, variant="fine-tuned", inherits=f"{base.provider}/{base.model}")
        return dataclasses.replace(base, variant="fine-tuned", fallback=(
            f"fine_tune_at_base: no fine-tune price known for {model}; {base.key}'s rates are used (add one with "
            f"`otel-dspy-cost pricing add` or a fine-tuned catalog entry)"))

    @staticmethod
    def _fine_tuned_entry(catalog: Catalog, base: PriceEntry, when: _dt.datetime, price_version: int | None
                          ) -> PriceEntry | None:
        """A fine-tuned entry inheriting from `base`'s model family (a dated snapshot belongs to its family)."""
        family = _family(base.model)
        candidates = [e for e in catalog.entries
                      if e.variant == "fine-tuned" and e.provider == base.provider and e.inherits
                      and _family(split_model(e.inherits)[1]) == family and e.selected_by(when, price_version)]
        return max(candidates, key=lambda e: e.price_version, default=None)

    def _local_entry(self, model: str) -> PriceEntry:
        provider, name = split_model(model)
        rates = self.local_models.get(model, Rates(input=0.0, output=0.0))
        return PriceEntry(provider=provider or "local", model=name, variant="default", price_version=0,
                          effective_at=_EPOCH, expires_at=None, currency="USD", standard_rates=rates, tiers={},
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


_LITELLM_RATES = {"input": "input_cost_per_token", "cached_input": "cache_read_input_token_cost",
                  "cache_write": "cache_creation_input_token_cost",
                  "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
                  "output": "output_cost_per_token", "reasoning": "output_cost_per_reasoning_token"}
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


def litellm_entry_fields(info: Mapping[str, Any]) -> dict[str, Any]:
    """Everything billing needs from a LiteLLM record, in catalog form: rates, tiers, long context (with each
    tier's own long-context rates), 1-hour cache writes and the output cap. The one place LiteLLM's naming
    is read, shared by the live fallback, `pricing import-litellm` and `pricing diff`.

    Where LiteLLM lists several long-context thresholds the lowest is kept (the higher price sooner:
    when in doubt, count more).
    """
    fields: dict[str, Any] = _without_default_reasoning(litellm_rates(info))
    thresholds = sorted(int(m.group(1)) for k in info if (m := _LITELLM_LONG_CONTEXT.match(k)))
    lc_suffix = f"_above_{thresholds[0]}k_tokens" if thresholds else None
    if lc_suffix and (lc := _without_default_reasoning(litellm_rates(info, lc_suffix))):
        fields["long_context"] = {"threshold_input_tokens": thresholds[0] * 1000, "rates": lc}
    tiers = {}
    for tier, suffix in LITELLM_TIERS.items():
        rates: dict[str, Any] = _without_default_reasoning(litellm_rates(info, suffix))
        if not rates:
            continue
        if lc_suffix and (tier_lc := litellm_rates(info, lc_suffix + suffix)):
            rates["long_context"] = tier_lc
        tiers[tier] = rates
    if tiers:
        fields["tiers"] = tiers
    if isinstance(info.get("max_output_tokens"), int) and not isinstance(info["max_output_tokens"], bool) \
            and info["max_output_tokens"] > 0:
        fields["max_output_tokens"] = info["max_output_tokens"]
    return fields


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


def _litellm_entry(model: str, provider: str | None = None) -> PriceEntry | None:
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
           **litellm_entry_fields(info)}
    entry = entry_from_raw(raw, f"LiteLLM price map: {key}", source="litellm",
                           catalog_version=f"litellm-{_litellm_version()}")
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
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            import litellm

            found = dict(litellm.model_cost)
        except Exception:  # noqa: BLE001 - a broken LiteLLM must not break pricing
            found = {}
    _cost_map = found
    return found


@functools.lru_cache(maxsize=1)  # read from package metadata once, not once per LiteLLM-priced model
def _litellm_version() -> str:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:  # noqa: BLE001
        return "unknown"


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
