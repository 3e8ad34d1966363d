"""`pricing diff`: where a catalog disagrees with the installed LiteLLM price map, field by field.

Keeping prices current is one reviewed command: `otel-dspy-cost pricing diff` lists every disagreement
(rates of every tier, below and above the long-context threshold, the threshold itself, the output
cap), and `--append` writes LiteLLM's figures as a new `price_version` of each entry that disagrees
(append-only, with `effective_at`), keeping the fields the entry explains in `differs_from_litellm`.

Rates are compared as billed, after the fallbacks `pricing.cost` applies (no cached rate = the input rate,
no reasoning rate = the output rate, a tier's missing field = the standard one), so a field one side
leaves out and the other sets to the same figure is no disagreement.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from otel_dspy_cost.pricing.catalog import (
    RATE_FIELDS,
    Catalog,
    PriceEntry,
    Rates,
    inherit,
    model_family,
    split_model,
    with_premium,
)
from otel_dspy_cost.pricing.litellm_prices import litellm_entry_fields, litellm_price_entry, litellm_record

_SCALAR_FIELDS = ("max_output_tokens",)
_FALLS_BACK_TO = {"reasoning": "output", "cache_write_1h": "cache_write"}
_REL_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Disagreement:
    """One field where the catalog and LiteLLM differ; `explained` is the catalog's reason, if it gives one."""

    field: str  # as the catalog names it: cached_input, tiers.batch.input, long_context.output, tiers.priority
    ours: Any
    litellm: Any
    explained: str | None = None


@dataclasses.dataclass(frozen=True)
class EntryDiff:
    """The comparison of one catalog entry (the version in force) with its LiteLLM record."""

    key: str
    price_version: int
    litellm_key: str | None  # None: LiteLLM does not list the model
    disagreements: tuple[Disagreement, ...] = ()

    @property
    def unexplained(self) -> tuple[Disagreement, ...]:
        return tuple(d for d in self.disagreements if d.explained is None)


def _billed(rates: Rates) -> dict[str, float | None]:
    """Each rate as `pricing.cost` bills it (its fallbacks applied)."""
    cache_write = rates.cache_write if rates.cache_write is not None else rates.input
    return {"input": rates.input,
            "cached_input": rates.cached_input if rates.cached_input is not None else rates.input,
            "cache_write": cache_write,
            "cache_write_1h": rates.cache_write_1h if rates.cache_write_1h is not None else cache_write,
            "output": rates.output,
            "reasoning": rates.reasoning if rates.reasoning is not None else rates.output,
            # billed apart, no fallback: a unit without a rate is an unpriced unit (`pricing.cost`)
            "audio_input": rates.audio_input, "audio_output": rates.audio_output, "image_output": rates.image_output,
            "web_search": rates.web_search, "request": rates.request}


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) <= _REL_TOLERANCE * max(1.0, abs(float(a)), abs(float(b)))


def compare(ours: PriceEntry, theirs: PriceEntry) -> list[tuple[str, Any, Any]]:
    """(field, ours, LiteLLM's) for every field two entries bill differently."""
    out: list[tuple[str, Any, Any]] = []
    for tier in sorted(set(ours.tiers) ^ set(theirs.tiers)):
        out.append((f"tiers.{tier}", "present" if tier in ours.tiers else None,
                    "present" if tier in theirs.tiers else None))
    if ours.long_context_threshold != theirs.long_context_threshold:
        out.append(("long_context.threshold_input_tokens", ours.long_context_threshold,
                    theirs.long_context_threshold))
    thresholds = [t for t in (ours.long_context_threshold, theirs.long_context_threshold) if t]
    contexts = [("", 0)] + ([("long_context.", max(thresholds) + 1)] if thresholds else [])
    for tier in [None, *sorted(set(ours.tiers) & set(theirs.tiers))]:
        prefix = f"tiers.{tier}." if tier else ""
        for context, tokens in contexts:
            mine, other = _billed(ours.rates_for(tier, tokens)), _billed(theirs.rates_for(tier, tokens))
            out.extend((f"{prefix}{context}{f}", mine[f], other[f]) for f in RATE_FIELDS
                       if not _same(mine[f], other[f]))
    for f in _SCALAR_FIELDS:
        if getattr(ours, f) != getattr(theirs, f):
            out.append((f, getattr(ours, f), getattr(theirs, f)))
    return out


def _explanation(explained: Mapping[str, str], field: str) -> str | None:
    """The reason given for `field` or for a field path it lies under (`tiers.priority` covers its rates).

    A reasoning rate (or a 1-hour cache write) that a catalog rarely sets apart is covered by the reason
    given for the output rate (the 5-minute write) it falls back to."""
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        reason = explained.get(".".join(parts[:n]))
        if reason:
            return reason
    fallback = _FALLS_BACK_TO.get(parts[-1])
    return _explanation(explained, ".".join([*parts[:-1], fallback])) if fallback else None


def _litellm_names(entry: PriceEntry, catalog: Catalog) -> list[str]:
    """LiteLLM's names for an entry: the model and its aliases; for a fine-tune, `ft:` and its base's names."""
    if entry.variant == "fine-tuned" and entry.inherits:
        provider, base = split_model(entry.inherits)
        aliases = [a for e in catalog.entries if e.provider == provider and e.model == base for a in e.aliases]
        return [f"ft:{n}" for n in dict.fromkeys([base, *aliases])]
    return [entry.model, *entry.aliases]


def _litellm_entries_for(entry: PriceEntry, catalog: Catalog) -> list[tuple[str, PriceEntry]]:
    """LiteLLM's records for an entry: its own key where LiteLLM has one; else, for Anthropic's models, Bedrock's
    global key (`anthropic.<name>-v1:0`), which carries Anthropic's list prices with their cache rates. Vertex's
    records are not compared: they lack cache rates and list some models at other prices (Claude 3.5 Haiku at
    $1 / $5 against Anthropic's $0.80 / $4), and Vertex's Gemini prices are not AI Studio's."""
    names = _litellm_names(entry, catalog)
    for name in names:
        found = litellm_record(name, provider=entry.provider)
        if found is not None:
            return [(found[0], litellm_price_entry(*found, entry.provider, entry.model))]
    out: dict[str, PriceEntry] = {}
    if entry.provider != "anthropic":  # Bedrock and Vertex list Anthropic's prices; Vertex's Gemini prices differ
        return []
    for name in names:
        for key in (f"anthropic.{name}-v1:0", f"anthropic.{name}-v2:0"):
            found = litellm_record(key)
            if found is not None and found[0] not in out:
                out[found[0]] = litellm_price_entry(*found, entry.provider, entry.model)
    return list(out.items())


def _in_force(catalog: Catalog, when: _dt.datetime) -> list[PriceEntry]:
    """Per (provider, model, variant), the entry selected at `when` (the latest version in force)."""
    chosen: dict[str, PriceEntry] = {}
    for entry in catalog.entries:
        if entry.local or not entry.in_force(when):
            continue
        if entry.key not in chosen or entry.price_version > chosen[entry.key].price_version:
            chosen[entry.key] = entry
    return [chosen[k] for k in sorted(chosen)]


def diff_catalog(catalog: Catalog, *, when: _dt.datetime | None = None) -> list[EntryDiff]:
    """Every entry in force at `when` (default: now) compared with the installed LiteLLM map."""
    when = when or _dt.datetime.now(_dt.UTC)
    raw_by_version = {(r["provider"], r["model"], r.get("variant", "default"), r["price_version"]): r
                      for r in catalog.raw["entries"]}
    out = []
    for entry in _in_force(catalog, when):
        if entry.variant == "fine-tuned" and entry.inherits:  # compared as priced: over its base in force
            base = catalog.find(entry.inherits, when)
            entry = inherit(entry, base) if base is not None else entry
        found = _litellm_entries_for(entry, catalog)
        if not found:
            out.append(EntryDiff(entry.key, entry.price_version, None))
            continue
        raw = raw_by_version.get((entry.provider, entry.model, entry.variant, entry.price_version), {})
        explained = raw.get("differs_from_litellm", {})
        for litellm_key, theirs in found:
            rows = tuple(Disagreement(f, a, b, _explanation(explained, f)) for f, a, b in compare(entry, theirs))
            out.append(EntryDiff(entry.key, entry.price_version, litellm_key, rows))
    out.extend(_premium_diffs(catalog, when))
    return out


def _premium_diffs(catalog: Catalog, when: _dt.datetime) -> list[EntryDiff]:
    """Fine-tunes priced by a provider premium (2x a mini base...), as billed, against LiteLLM's `ft:` records of
    the same bases; keyed `<base>@fine-tuned (premium)`, explained by the premium's own `differs_from_litellm`."""
    out = []
    explicit = {model_family(split_model(e.inherits)[1]) for e in catalog.entries
                if e.variant == "fine-tuned" and e.inherits}
    for entry in _in_force(catalog, when):
        if entry.variant != "default" or model_family(entry.model) in explicit:
            continue
        premium = next((p for p in reversed(catalog.premiums) if p.covers(entry.provider, entry.model, when)), None)
        if premium is None:
            continue
        priced = with_premium(entry, premium)
        for name in (entry.model, *entry.aliases):
            found = litellm_record(f"ft:{name}", provider=entry.provider)
            if found is None:
                continue
            theirs = litellm_price_entry(*found, entry.provider, entry.model)
            rows = tuple(Disagreement(f, a, b, _explanation(premium.explained, f))
                         for f, a, b in compare(priced, theirs))
            out.append(EntryDiff(f"{entry.key}@fine-tuned (premium)", entry.price_version, found[0], rows))
            break
    return out


# -- appending LiteLLM's figures -------------------------------------------------------------------------

def _raw_path(field: str) -> list[str]:
    """A `pricing diff` field name -> the keys of a raw catalog entry holding it."""
    parts = field.split(".")
    if parts[0] == "long_context" and parts[-1] != "threshold_input_tokens":
        return ["long_context", "rates", *parts[1:]]
    return parts


def _get_path(raw: Mapping[str, Any], path: list[str]) -> Any:
    node: Any = raw
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = copy.deepcopy(value)


_REPLACED = (*RATE_FIELDS, "tiers", "long_context", "max_output_tokens", "expires_at", "added_at", "note")


def append_litellm_versions(path: Path, diffs: Iterable[EntryDiff], *, effective_at: str,
                            litellm_version: str) -> list[str]:
    """Append LiteLLM's figures as the next `price_version` of each entry with an unexplained disagreement.

    Returns the keys appended. Explained fields keep the catalog's figure. The file is validated by
    loading it before it replaces the old one (see `pricing.editing`).
    """
    from otel_dspy_cost.pricing.editing import now_iso, write_validated

    data = json.loads(path.read_text())
    appended = []
    for diff in diffs:
        if not diff.unexplained or diff.litellm_key is None:
            continue
        provider, _, rest = diff.key.partition("/")
        model, _, variant = rest.partition("@")
        variant = variant or "default"
        versions = [r for r in data["entries"] if r["provider"] == provider and r["model"] == model
                    and r.get("variant", "default") == variant]
        latest = max(versions, key=lambda r: r["price_version"])
        info = litellm_record(diff.litellm_key)
        if info is None:
            continue
        new = {k: copy.deepcopy(v) for k, v in latest.items() if k not in _REPLACED}
        new.update(copy.deepcopy(litellm_entry_fields(info[1], info[0])))
        for row in diff.disagreements:
            if row.explained is not None:
                _set_path(new, _raw_path(row.field), _get_path(latest, _raw_path(row.field)))
        if variant == "default":
            new.pop("inherits", None)  # LiteLLM's figures are complete: nothing left to inherit
        new.update(price_version=latest["price_version"] + 1, effective_at=effective_at, added_at=now_iso(),
                   note=f"from LiteLLM {litellm_version} ({diff.litellm_key}) by `pricing diff --append`")
        data["entries"].append(new)
        appended.append(diff.key)
    if appended:
        today = _dt.datetime.now(_dt.UTC).date().isoformat()
        previous = str(data.get("catalog_version", ""))
        n = int(previous.rsplit(".", 1)[1]) + 1 if previous.startswith(today + ".") else 1
        data["catalog_version"] = f"{today}.{n}"
        write_validated(path, data)
    return appended


def render(diffs: list[EntryDiff]) -> list[str]:
    """Lines for the terminal: one per disagreement, then the models LiteLLM does not list."""
    lines = []
    for d in diffs:
        for row in d.disagreements:
            why = f"  (explained: {row.explained})" if row.explained else ""
            lines.append(f"{d.key} v{d.price_version}  {row.field}: ours {row.ours} | LiteLLM {row.litellm} "
                         f"[{d.litellm_key}]{why}")
    missing = [d.key for d in diffs if d.litellm_key is None]
    if missing:
        lines.append(f"not in LiteLLM's map (not compared): {', '.join(missing)}")
    agree = sum(1 for d in diffs if d.litellm_key is not None and not d.disagreements)
    unexplained = sum(len(d.unexplained) for d in diffs)
    explained = sum(len(d.disagreements) for d in diffs) - unexplained
    lines.append(f"{agree} entries agree, {unexplained} unexplained and {explained} explained disagreements, "
                 f"{len(missing)} not in LiteLLM")
    return lines
