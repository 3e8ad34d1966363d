"""The versioned pricing catalog: its files loaded and validated, and the entries and rates they hold.

Prices are append-only history: a price change adds an entry with a higher `price_version` and a
later `effective_at`, so a run dated before the change is still priced at the old rate and past
reports stay auditable. Which entry is in force for a call is `resolver`'s job.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fnmatch
import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from otel_dspy_cost import _validate
from otel_dspy_cost.errors import CatalogError

logger = logging.getLogger("otel_dspy_cost")

PRICING_FILE_ENV = "OTEL_DSPY_COST_PRICING_FILE"
USER_CATALOG_ENV = "OTEL_DSPY_COST_USER_CATALOG"
LOCAL_PROVIDERS = frozenset({"ollama", "ollama_chat", "lm_studio", "hosted_vllm", "local", "llamafile"})
EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
RATE_FIELDS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning", "audio_input",
               "audio_output", "image_output", "web_search", "request")
STANDARD_TIERS = (None, "", "default", "standard")
# Dated snapshot suffixes: `gpt-4o-2024-08-06`, `claude-sonnet-4-20250514` belong to the family before them.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


@dataclasses.dataclass(frozen=True)
class Rates:
    """USD per 1M tokens. `None` means "not priced apart" (falls back as documented in `pricing.cost`).

    `cache_write` is a 5-minute prompt-cache write, `cache_write_1h` a 1-hour one (Anthropic bills
    1.25x and 2x the input rate). Audio and image tokens are billed apart from text where a price list
    says so. Two are not per token: `web_search` is USD per 1,000 searches (or grounded queries) a call
    makes, `request` USD per 1,000 requests, charged on every call (OpenAI's search-preview models).
    """

    input: float | None = None
    cached_input: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None
    output: float | None = None
    reasoning: float | None = None
    audio_input: float | None = None
    audio_output: float | None = None
    image_output: float | None = None
    web_search: float | None = None
    request: float | None = None

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Rates:
        return cls(**{f: raw.get(f) for f in RATE_FIELDS})

    def merged(self, other: Rates) -> Rates:
        """`other`'s set fields win; used for tiers, long context and fine-tune overrides."""
        return Rates(**{f: getattr(other, f) if getattr(other, f) is not None else getattr(self, f)
                        for f in RATE_FIELDS})

    def scaled(self, factors: Mapping[str, float]) -> Rates:
        return Rates(**{f: (getattr(self, f) * factors.get(f, 1.0)) if getattr(self, f) is not None else None
                        for f in RATE_FIELDS})

    def rescaled(self, base: Rates, target: Rates) -> Rates:
        """`self` is a variant (a tier) of `base`; the same variant of `target`, field by field in proportion.

        Used where a price list gives a tier's standard rates but not its long-context ones (a batch
        discount applies to long-context rates too), and for tiers of a fine-tuned model.
        """
        out = {}
        for f in RATE_FIELDS:
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
        if tier in STANDARD_TIERS:
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
    return Path(__file__).resolve().parents[2] / "pricing" / name


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
    explained: Mapping[str, str] = dataclasses.field(default_factory=dict)  # `pricing diff`'s reasons

    def covers(self, provider: str, model: str, when: _dt.datetime) -> bool:
        return (self.provider == provider and self.effective_at <= when
                and any(fnmatch.fnmatchcase(model, pattern) for pattern in self.applies_to))


def with_premium(base: PriceEntry, premium: Any) -> PriceEntry:
    """A fine-tune of `base` priced by a provider's premium (its multipliers over every rate of the base)."""
    f = premium.factors
    return dataclasses.replace(
        base, standard_rates=base.standard_rates.scaled(f), variant="fine-tuned",
        inherits=f"{base.provider}/{base.model}", tiers={k: v.scaled(f) for k, v in base.tiers.items()},
        long_context_rates=base.long_context_rates.scaled(f) if base.long_context_rates else None,
        tier_long_context={k: v.scaled(f) for k, v in base.tier_long_context.items()})


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


def model_family(name: str) -> str:
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
                      "output": p.get("output_multiplier", 1.0), "reasoning": p.get("output_multiplier", 1.0)},
                     dict(p.get("differs_from_litellm", {})))
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
        try:  # NaN and Infinity parse as JSON numbers and pass the schema's `minimum`: refuse them first
            _validate.finite_tree(self.origin, data)
        except ValueError as exc:
            raise CatalogError(str(exc)) from None
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


def fine_tune_base(name: str) -> str | None:
    """OpenAI names fine-tunes 'ft:<base>:<org>::<id>'."""
    if name.startswith("ft:"):
        return name.split(":")[1]
    return None
