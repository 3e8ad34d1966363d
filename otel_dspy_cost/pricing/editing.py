"""Writing catalogs: append a price (`pricing add`, the `prompt` policy) and import LiteLLM's price map.

Every write is append-only (a change is a new `price_version`, never an edit) and is validated by
loading the result with `Catalog` before the file is replaced, so a bad rate never lands on disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from otel_dspy_cost.errors import CatalogError
from otel_dspy_cost.pricing.catalog import Catalog, split_model
from otel_dspy_cost.pricing.litellm_prices import litellm_entry_fields

_BILLING_FIELDS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning", "audio_input",
                   "audio_output", "image_output", "web_search", "request", "tiers",
                   "long_context", "max_output_tokens")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _empty(version: str) -> dict[str, Any]:
    return {"schema_version": 1, "catalog_version": version, "currency": "USD", "entries": []}


def write_validated(path: Path, data: Mapping[str, Any]) -> Catalog:
    """Validate, then replace the file atomically (a crash mid-write leaves the old file intact)."""
    catalog = Catalog(data, origin=str(path), source="override")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return catalog


def _load_raw(path: Path, version: str) -> dict[str, Any]:
    if not path.exists():
        return _empty(version)
    Catalog.from_path(path)  # refuse to append to a file that is already malformed
    return json.loads(path.read_text())


def add_entry(path: Path, model: str, rates: Mapping[str, float | None], *, effective_at: str | None = None,
              max_output_tokens: int | None = None, local: bool = False, note: str | None = None) -> dict[str, Any]:
    """Append a price for `model` (next `price_version`) to the catalog at `path`, creating it if needed.

    The first price of a model is in force from the epoch, so runs already started can use it; a
    later one from now (or `effective_at`), so runs dated before the change keep the old price.
    """
    provider, name = split_model(model)
    if provider is None:
        raise CatalogError(f"{model!r}: give the model as provider/model (e.g. openai/gpt-4o-mini)")
    data = _load_raw(path, "user")
    versions = [e["price_version"] for e in data["entries"] if e["model"] == name and e["provider"] == provider]
    effective = effective_at or (now_iso() if versions else "1970-01-01T00:00:00Z")
    entry: dict[str, Any] = {"provider": provider, "model": name, "price_version": max(versions, default=0) + 1,
                             "effective_at": effective, "added_at": now_iso()}
    entry.update({k: float(v) for k, v in rates.items() if v is not None})
    if max_output_tokens:
        entry["max_output_tokens"] = int(max_output_tokens)
    if local:
        entry["local"] = True
    if note:
        entry["note"] = note
    data["entries"].append(entry)
    write_validated(path, data)
    return entry


def import_litellm(path: Path, *, providers: Iterable[str] = (), models: Iterable[str] = ()) -> tuple[int, int]:
    """Append LiteLLM's bundled prices (chat models) to the catalog at `path`; returns (added, unchanged).

    A model already in the file gets a new `price_version` only when a rate differs from its latest
    entry, so re-running the import after a LiteLLM upgrade records exactly the price changes.
    """
    import litellm

    providers, models = set(providers), set(models)
    data = _load_raw(path, f"litellm-import-{now_iso()[:10]}")
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for e in data["entries"]:
        key = (e["provider"], e["model"])
        if key not in latest or e["price_version"] > latest[key]["price_version"]:
            latest[key] = e
    added = unchanged = 0
    now = now_iso()
    imported: set[tuple[str, str]] = set()  # LiteLLM lists some models under two names for one provider/model
    for name, info in sorted(litellm.model_cost.items()):
        if not isinstance(info, Mapping) or info.get("mode") not in ("chat", "completion", "responses"):
            continue
        provider = str(info.get("litellm_provider") or "")
        model = name.split("/", 1)[1] if name.startswith(provider + "/") else name
        if (providers and provider not in providers) or (models and name not in models and model not in models):
            continue
        fields = litellm_entry_fields(info, name)
        if "input" not in fields or "output" not in fields or "/" in model:
            continue  # not priced per token, or a routed name we cannot key by provider/model
        if (provider, model) in imported:  # the first name sorted wins (one price per model and import)
            continue
        imported.add((provider, model))
        prev = latest.get((provider, model))
        if prev is not None and all(prev.get(f) == fields.get(f) for f in _BILLING_FIELDS):
            unchanged += 1
            continue
        entry: dict[str, Any] = {"provider": provider, "model": model,
                                 "price_version": prev["price_version"] + 1 if prev else 1,
                                 "effective_at": now if prev else "1970-01-01T00:00:00Z", **fields,
                                 "added_at": now, "note": f"imported from LiteLLM's price map ({name})"}
        data["entries"].append(entry)
        added += 1
    data["catalog_version"] = f"litellm-import-{now[:10]}"
    write_validated(path, data)
    return added, unchanged
