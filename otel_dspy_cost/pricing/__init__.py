"""Pricing: the versioned catalog, the price in force for a model, and token usage -> USD.

The public catalog API (`otel_dspy_cost.pricing.lookup`, `PricingResolver`, `Catalog`, ...) is re-exported
here. Modules: `catalog` (load, validate, entries), `resolver` (overrides -> catalog -> LiteLLM, by date),
`litellm_prices` (LiteLLM's bundled map, never fetched online), `cost` (arithmetic and worst cases),
`engine` (an LM call's price card and the unknown-model policy), `editing` and `diff` (the `pricing`
commands that write catalogs).
"""

from otel_dspy_cost.errors import CatalogError, UnknownModelError
from otel_dspy_cost.pricing.catalog import (
    LOCAL_PROVIDERS,
    PRICING_FILE_ENV,
    USER_CATALOG_ENV,
    Catalog,
    PriceEntry,
    Rates,
    TrainingPrice,
    default_catalog_path,
    entry_from_raw,
    inherit,
    split_model,
    user_catalog_path,
)
from otel_dspy_cost.pricing.litellm_prices import (
    LITELLM_TIERS,
    litellm_entry_fields,
    litellm_price_entry,
    litellm_rates,
    litellm_record,
)
from otel_dspy_cost.pricing.resolver import PricingResolver, default_resolver, lookup, set_default_resolver

__all__ = [
    "LITELLM_TIERS", "LOCAL_PROVIDERS", "PRICING_FILE_ENV", "USER_CATALOG_ENV", "Catalog", "CatalogError",
    "PriceEntry", "PricingResolver", "Rates", "TrainingPrice", "UnknownModelError", "default_catalog_path",
    "default_resolver", "entry_from_raw", "inherit", "litellm_entry_fields", "litellm_price_entry",
    "litellm_rates", "litellm_record", "lookup", "set_default_resolver", "split_model", "user_catalog_path",
]
