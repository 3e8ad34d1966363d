"""`otel-dspy-cost pricing export-phoenix URL`: our catalog's prices written into a Phoenix server's model store.

Why: Phoenix prices every LLM span itself, from token counts and its model store, and ignores a cost on the
span (`../shared/notes/backends-and-dspy-facts.md`). With our prices in its store (as user-defined models,
which Phoenix prefers to its built-in ones), its figure equals ours for calls at list price. It still differs
where we bill what a token price cannot say: `pricing_overrides`, tiers (batch, flex), long-context rates, audio
and search fees, and calls charged at their worst case (docs/backends/phoenix.md).

Hand-written over Phoenix's GraphQL API (`createModel`, `updateModel`) with the standard library: its Python
client has no model-store calls, and this is two mutations.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

from otel_dspy_cost.pricing.catalog import PriceEntry
from otel_dspy_cost.pricing.resolver import PricingResolver

NAME_PREFIX = "otel-dspy-cost "  # our models in Phoenix's store are told from the user's by this name prefix
_API_KEY_ENV = "PHOENIX_API_KEY"

_MODELS = """query($after: String) { generativeModels(first: 200, after: $after) {
  edges { node { id name } } pageInfo { hasNextPage endCursor } } }"""
_CREATE = """mutation($input: CreateModelMutationInput!) { createModel(input: $input) { model { id } } }"""
_UPDATE = """mutation($input: UpdateModelMutationInput!) { updateModel(input: $input) { model { id } } }"""


class PhoenixError(Exception):
    """Phoenix refused a request or could not be reached: the message says which and why."""


def token_prices(entry: PriceEntry) -> list[dict[str, Any]]:
    """The entry's standard rates as Phoenix token prices (USD per 1M tokens). Phoenix names the parts of a
    prompt and a completion as our spans report them (`llm.token_count.prompt_details.cache_read`, ...)."""
    r = entry.standard_rates
    prices = [("input", r.input, "PROMPT"), ("output", r.output, "COMPLETION"),
              ("cache_read", r.cached_input, "PROMPT"), ("cache_write", r.cache_write, "PROMPT"),
              ("reasoning", r.reasoning, "COMPLETION"), ("audio", r.audio_input, "PROMPT")]
    return [{"tokenType": name, "costPerMillionTokens": float(rate), "kind": kind}
            for name, rate, kind in prices if rate is not None]


def phoenix_model(entry: PriceEntry) -> dict[str, Any]:
    """One model-store entry, matched on `llm.model_name` as Phoenix derives it from our LM spans'
    `gen_ai.request.model` (the model without DSPy's provider prefix, or an alias). Provider-agnostic: Phoenix
    renames providers on the way in (`gcp.vertex_ai` becomes `google`, `aws.bedrock` `aws`), and a
    user-defined model whose provider differs from the span's would not be chosen."""
    names = "|".join(re.escape(n) for n in (entry.model, *entry.aliases))
    return {"name": f"{NAME_PREFIX}{entry.provider}/{entry.model}", "provider": None,
            "namePattern": f"^({names})$", "costs": token_prices(entry)}


def entries_in_force(resolver: PricingResolver, models: list[str] | None) -> list[PriceEntry]:
    """The entries in force now for `models` (all the catalogs' standard entries when None); local models
    cost nothing and are left out. Raises `UnknownModelError` for a model no catalog knows."""
    if models:
        return [resolver.lookup(m) for m in models]
    seen: dict[str, PriceEntry] = {}
    for catalog in resolver.catalogs:
        for entry in catalog.entries:
            if entry.variant == "default" and not entry.local and entry.key not in seen:
                seen[entry.key] = resolver.lookup(f"{entry.provider}/{entry.model}")
    return [e for e in seen.values() if e.standard_rates.input is not None and e.standard_rates.output is not None]


def export(url: str, entries: list[PriceEntry], timeout_s: float = 30.0) -> tuple[int, int]:
    """Create or update one Phoenix model per entry; (created, updated). Our earlier exports are updated in
    place (same name), so running it again after a price change moves Phoenix to the new prices."""
    endpoint = url.rstrip("/") + "/graphql"
    existing: dict[str, str] = {}
    after = None
    while True:
        page = _graphql(endpoint, _MODELS, {"after": after}, timeout_s)["generativeModels"]
        existing.update({e["node"]["name"]: e["node"]["id"] for e in page["edges"]
                         if e["node"]["name"].startswith(NAME_PREFIX)})
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    created = updated = 0
    for entry in entries:
        model = phoenix_model(entry)
        if model["name"] in existing:
            _graphql(endpoint, _UPDATE, {"input": {"id": existing[model["name"]], **model}}, timeout_s)
            updated += 1
        else:
            _graphql(endpoint, _CREATE, {"input": model}, timeout_s)
            created += 1
    return created, updated


def _graphql(endpoint: str, query: str, variables: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(_API_KEY_ENV)
    if key:  # Phoenix with authentication on: its API keys are bearer tokens (never printed)
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(endpoint, json.dumps({"query": query, "variables": variables}).encode(),
                                     headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        hint = f" (set {_API_KEY_ENV})" if exc.code in (401, 403) else ""
        raise PhoenixError(f"{endpoint}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PhoenixError(f"{endpoint}: {getattr(exc, 'reason', exc)} (is Phoenix running there?)") from None
    if body.get("errors"):
        raise PhoenixError(f"{endpoint}: {'; '.join(e.get('message', '?') for e in body['errors'])}")
    return body["data"]


def run(url: str, models: list[str] | None) -> int:
    """The CLI command: exit 0 exported, 1 Phoenix refused or unreachable, 2 a model no catalog knows."""
    import sys

    from otel_dspy_cost.errors import UnknownModelError

    try:
        entries = entries_in_force(PricingResolver(), models)
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        created, updated = export(url, entries)
    except PhoenixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    count = f"{len(entries)} model{'' if len(entries) == 1 else 's'}"
    print(f"{url}: {count} exported to Phoenix's model store ({created} created, {updated} updated, named "
          f"'{NAME_PREFIX}provider/model'). Phoenix prices spans it receives from about 5 s on with them (it "
          "reloads its model store every 5 s); spans it already holds keep the cost they had.")
    return 0
