"""`otel-dspy-cost`: demo, pricing, estimate, report and budget commands (argument parsing and dispatch)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from otel_dspy_cost._redact import scrub
from otel_dspy_cost.optimizers import registry
from otel_dspy_cost.pricing.cost import money


def _demo(args: argparse.Namespace) -> int:
    from otel_dspy_cost.cli.demo import run

    if args.examples < 1:  # before any work: the compile would run first and the evaluation then fail
        raise _UsageError(f"--examples must be at least 1, not {args.examples}")
    if args.budget is not None and not (args.budget > 0 and args.budget < float("inf")):
        raise _UsageError(f"--budget must be a positive number of USD, not {args.budget}")
    return run(args)


def _entry_json(entry: Any, input_tokens: int = 0) -> dict[str, Any]:
    """A price entry as the CLI shows it: `rates` are what a call is billed at (the entry's tier, and the
    long-context rates when `input_tokens` passes the threshold), with the standard rates and every tier."""
    from dataclasses import asdict

    def rates(r: Any) -> dict[str, float]:
        return {k: v for k, v in asdict(r).items() if v is not None}

    out: dict[str, Any] = {
        "key": entry.key, "provider": entry.provider, "model": entry.model, "variant": entry.variant,
        "price_version": entry.price_version, "effective_at": entry.effective_at.isoformat(),
        "expires_at": entry.expires_at.isoformat() if entry.expires_at else None, "currency": entry.currency,
        "source": entry.source, "catalog_version": entry.catalog_version, "tier": entry.tier or "standard",
        "rates": rates(entry.rates_for(None, input_tokens)), "standard_rates": rates(entry.standard_rates),
        "tiers": {name: rates(entry.rates_for(name, input_tokens)) for name in sorted(entry.tiers)},
        "long_context": ({"threshold_input_tokens": entry.long_context_threshold,
                          "rates": rates(entry.rates_for(None, entry.long_context_threshold + 1))}
                         if entry.long_context_threshold else None),
        "max_output_tokens": entry.max_output_tokens, "aliases": list(entry.aliases), "inherits": entry.inherits,
        "local": entry.local}
    if input_tokens:
        out["input_tokens"] = input_tokens
    if entry.fallback:
        out["fallback"] = entry.fallback
    return out


def _pricing_diff(args: argparse.Namespace) -> int:
    from otel_dspy_cost.pricing import diff as catalog_diff
    from otel_dspy_cost.pricing.catalog import Catalog, default_catalog_path
    from otel_dspy_cost.pricing.litellm_prices import litellm_version

    path = Path(args.file) if args.file else default_catalog_path()
    catalog = Catalog.from_path(path, source="catalog")
    diffs = catalog_diff.diff_catalog(catalog)
    for line in catalog_diff.render(diffs):
        print(line)
    if not args.append:
        return 1 if any(d.unexplained for d in diffs) else 0
    effective = args.effective_at or _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")
    appended = catalog_diff.append_litellm_versions(path, diffs, effective_at=effective,
                                                     litellm_version=litellm_version())
    print(f"{path}: {len(appended)} new price versions appended, effective {effective}"
          + (f": {', '.join(appended)}" if appended else ""))
    return 0


def _pricing(args: argparse.Namespace) -> int:
    from otel_dspy_cost.errors import CatalogError, UnknownModelError
    from otel_dspy_cost.pricing import editing
    from otel_dspy_cost.pricing.catalog import Catalog, default_catalog_path, split_model, user_catalog_path
    from otel_dspy_cost.pricing.resolver import PricingResolver

    try:
        if args.action == "validate":
            path = args.path or str(default_catalog_path())
            catalog = Catalog.from_path(path, source="catalog")
            print(f"{path}: OK, {len(catalog.entries)} entries, catalog_version {catalog.catalog_version}")
            return 0
        if args.action == "add":
            rates = {"input": args.input, "cached_input": args.cached_input, "cache_write": args.cache_write,
                     "cache_write_1h": args.cache_write_1h, "output": args.output, "reasoning": args.reasoning}
            if not args.local and (args.input is None or args.output is None):
                print("error: --input and --output are required (USD per 1M tokens)", file=sys.stderr)
                return 2
            path = Path(args.file) if args.file else user_catalog_path()
            entry = editing.add_entry(path, args.model, rates, effective_at=args.effective_at,
                                            max_output_tokens=args.max_output_tokens, local=args.local,
                                            note=args.note)
            print(f"{path}: added {entry['provider']}/{entry['model']} v{entry['price_version']} "
                  f"effective {entry['effective_at']}")
            return 0
        if args.action == "import-litellm":
            out = Path(args.out)
            if not out.parent.is_dir() or not os.access(out.parent, os.W_OK) or (out.exists()
                                                                                 and not os.access(out, os.W_OK)):
                raise _UsageError(f"--out {args.out}: cannot write there (its folder must exist and be writable)")
            added, unchanged = editing.import_litellm(out, providers=args.provider, models=args.only)
            print(f"{args.out}: {added} entries added, {unchanged} unchanged (from LiteLLM's bundled price map)")
            return 0
        if args.action == "diff":
            return _pricing_diff(args)
        if args.action == "export-phoenix":
            from otel_dspy_cost.cli import phoenix_prices

            return phoenix_prices.run(args.url, args.model)
        resolver = PricingResolver()
        if args.action == "list":
            for catalog in resolver.catalogs:
                for entry in catalog.entries:
                    print(f"{entry.key:45s} v{entry.price_version:<3d} in={entry.rates.input} "
                          f"cached={entry.rates.cached_input} out={entry.rates.output} "
                          f"from {entry.effective_at.date()} [{entry.source}]")
            return 0
        if args.action == "show":
            provider, name = split_model(args.model)
            history = [_entry_json(e) for c in resolver.catalogs for e in c.entries
                       if (provider is None or e.provider == provider) and (e.model == name or name in e.aliases)]
            if not history:
                raise UnknownModelError(args.model, resolver.suggest(args.model))
            print(json.dumps(history, indent=1, default=str))
            return 0
        when = _dt.datetime.fromisoformat(args.when) if args.when else None
        entry = resolver.lookup(args.model, tier=args.tier, when=when, price_version=args.price_version,
                                fine_tuned=args.fine_tuned)
        print(json.dumps(_entry_json(entry, args.input_tokens), indent=1, default=str))
        if entry.fallback:
            print(f"note: {entry.fallback}", file=sys.stderr)
        return 0
    except (CatalogError, UnknownModelError, KeyError, ValueError) as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 2


def _pricing_parser(sub: Any) -> None:
    pricing = sub.add_parser("pricing", help="the pricing catalog: list | show | lookup | diff | add | "
                                             "import-litellm | validate | export-phoenix")
    actions = pricing.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every entry of every catalog in use (overrides, user, shipped)")
    show = actions.add_parser("show", help="the full price history of a model")
    show.add_argument("model")
    look = actions.add_parser("lookup", help="the entry in force for a model")
    look.add_argument("model")
    look.add_argument("--when", help="ISO-8601 date/time (default: now)")
    look.add_argument("--tier", help="batch | flex | priority ...")
    look.add_argument("--price-version", type=int)
    look.add_argument("--fine-tuned", action="store_true")
    look.add_argument("--input-tokens", type=int, default=0,
                      help="prompt size: above the long-context threshold `rates` are the long-context ones")
    diff = actions.add_parser("diff", help="compare a catalog with the installed LiteLLM price map, field by field "
                                           "(exit 1 on an unexplained disagreement)")
    diff.add_argument("--file", help="catalog to compare (default: the shipped catalog)")
    diff.add_argument("--append", action="store_true",
                      help="append LiteLLM's figures as a new price_version of each entry that disagrees")
    diff.add_argument("--effective-at", help="ISO-8601 start of the appended versions (default: now)")
    add = actions.add_parser("add", help="append a price to your catalog (a new price_version; never edits)")
    add.add_argument("model", help="provider/model")
    for rate in ("input", "cached-input", "cache-write", "cache-write-1h", "output", "reasoning"):
        add.add_argument(f"--{rate}", type=float, help="USD per 1M tokens (cache-write: 5-minute writes; "
                                                       "cache-write-1h: 1-hour writes)" if rate == "cache-write"
                         else "USD per 1M tokens")
    add.add_argument("--max-output-tokens", type=int)
    add.add_argument("--effective-at", help="ISO-8601 (default: epoch for a new model, now for a price change)")
    add.add_argument("--local", action="store_true", help="self-hosted: actual cost 0, these rates are economic")
    add.add_argument("--note")
    add.add_argument("--file", help="catalog to append to (default: the user catalog, "
                                    "$OTEL_DSPY_COST_USER_CATALOG or ~/.config/otel-dspy-cost/pricing.json)")
    imp = actions.add_parser("import-litellm", help="append LiteLLM's bundled prices to a catalog file "
                                                    "(only changed prices get a new version)")
    imp.add_argument("--out", required=True)
    imp.add_argument("--provider", action="append", default=[], help="repeatable, e.g. openai")
    imp.add_argument("--only", action="append", default=[], help="repeatable model name")
    phx = actions.add_parser("export-phoenix", help="write the prices in force into a Phoenix server's model store, "
                                                    "so its costs match ours for list-price calls")
    phx.add_argument("url", help="Phoenix's base URL, e.g. http://localhost:6006 ($PHOENIX_API_KEY if it asks)")
    phx.add_argument("--model", action="append", help="repeatable provider/model (default: every catalog model)")
    val = actions.add_parser("validate", help="check a catalog file against the schema and the overlap rule")
    val.add_argument("path", nargs="?")
    pricing.set_defaults(fn=_pricing)


OPTIMIZERS = registry.cli_names()


class _UsageError(Exception):
    """A command-line mistake: one line on stderr, exit 2."""


def _estimate(args: argparse.Namespace) -> int:
    from otel_dspy_cost.cli.estimate_command import run

    return run(args)


def _check_ledger_url(url: str, *, creating: bool) -> None:
    """Reading a ledger that is not there must say so, not create it and report $0."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        path = path[1:] if path.startswith("/") else path
        if path and path != ":memory:" and not Path(path).exists() and not creating:
            raise _UsageError(f"no ledger at {path} (nothing was recorded there; check the URL: sqlite:///relative "
                              f"or sqlite:////absolute)")
    elif url.startswith(("redis://", "rediss://", "unix://")):
        try:
            import redis  # noqa: F401
        except ImportError:
            raise _UsageError("redis:// ledgers need the redis client: pip install 'otel-dspy-cost[redis]'") from None


def _budget(args: argparse.Namespace) -> int:
    """Status or reset of a label on a shared ledger (what every process using it counts against)."""
    from otel_dspy_cost.errors import LedgerUnavailable
    from otel_dspy_cost.ledgers.protocol import Limits
    from otel_dspy_cost.ledgers.urls import ledger_from_url
    from otel_dspy_cost.ledgers.windows import parse_window

    _check_ledger_url(args.ledger_url, creating=args.action == "reset")
    try:
        ledger = ledger_from_url(args.ledger_url)
        account = ledger.key(args.label)
        known = getattr(ledger.inner, "labels", None)
        labels = known() if callable(known) and args.action == "status" else None
        if labels is not None and args.label not in labels:  # a typo would otherwise read as $0 spent
            raise _UsageError(f"no budget labelled {args.label!r} on {scrub(args.ledger_url)} (labels are exact); "
                              f"labels there: {', '.join(repr(x) for x in labels) or 'none yet'}")
        window = parse_window(args.window, args.tz)
        ledger.open(account, Limits(args.limit, None, {}, False, window))
        if args.action == "reset":
            ledger.reset(account)
            print(f"{scrub(args.ledger_url)} {args.label!r}: reset (spend and reservations removed)")
            return 0
        state = ledger.inner.state(account)
    except (LedgerUnavailable, ValueError) as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    data = {"ledger": scrub(args.ledger_url), "label": args.label, "spent_usd": money(state.spent_usd),
            "economic_usd": money(state.economic_usd), "calls": state.calls, "reserved_usd": money(state.reserved_usd),
            "reserved_calls": state.reserved_calls, "by_phase": {k: money(v) for k, v in state.phase_spent.items()}}
    if window is not None:
        import datetime as dt
        import time

        start, end = window.bounds(time.time())
        data["window"] = {"kind": window.describe(), "start": dt.datetime.fromtimestamp(start, dt.UTC).isoformat(),
                          "end": dt.datetime.fromtimestamp(end, dt.UTC).isoformat()}
    if args.limit is not None:
        data["limit_usd"], data["remaining_usd"] = args.limit, money(max(0.0, args.limit - state.spent_usd))
    print(json.dumps(data, indent=1))
    return 0


def _report(args: argparse.Namespace) -> int:
    from otel_dspy_cost.reports.run_report import main as report_main

    return report_main(args)


_EXIT_CODES = """exit codes: 0 done; 1 a check failed (estimate over budget in CI or with --strict, pricing diff
found an unexplained disagreement); 2 bad input (arguments, files, unknown model); 3 internal error; 130 interrupted"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("otel-dspy-cost")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-dspy-cost", description=__doc__, epilog=_EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo: a multi-module program under a budget that trips")
    demo.add_argument("--model", default=None, help="model to price the simulated calls as (default "
                      "openai/gpt-4o-mini); with that provider's API key set (e.g. OPENAI_API_KEY), a real run")
    demo.add_argument("--budget", type=float, default=None, help="USD limit (default: trips partway; $0.012 for "
                      "gpt-4o-mini, scaled by the model's price for another)")
    demo.add_argument("--examples", type=int, default=12)
    demo.add_argument("--out", default="otel-dspy-cost-demo", help="run directory for costs.jsonl and summary.json")
    demo.set_defaults(fn=_demo)
    _pricing_parser(sub)
    est = sub.add_parser("estimate", help="project LM calls and USD before a run (exit 1 in CI over budget)")
    est.add_argument("--program", default="demo", help="module:attr of a dspy.Module (or a function making one); "
                                                       "'demo' for the demo's program")
    est.add_argument("--model", default="openai/gpt-4o-mini")
    est.add_argument("--optimizer", default="evaluate", help=" | ".join(OPTIMIZERS))
    est.add_argument("--trainset", type=int, default=0)
    est.add_argument("--valset", type=int, default=None)
    est.add_argument("--devset", type=int, default=0)
    est.add_argument("--max-tokens", type=int, default=None)
    est.add_argument("--input-chars", type=int, default=200, help="typical characters per input field")
    est.add_argument("--cache-hit-rate", type=float, default=0.0)
    est.add_argument("--demos", type=int, default=4, help="max bootstrapped demos")
    est.add_argument("--max-metric-calls", type=int, default=None, help="GEPA budget")
    est.add_argument("--budget", type=float, default=None, help="USD to compare against")
    est.add_argument("--strict", action="store_true", help="exit 1 over budget even outside CI")
    est.add_argument("--json", action="store_true")
    est.add_argument("--pilot", type=int, default=None, metavar="N",
                     help="run the program for real on N synthetic examples first: a point forecast")
    est.add_argument("--pilot-budget", type=float, default=1.0, help="USD the pilot may spend (default 1)")
    est.add_argument("--api-base", help="the LM's endpoint for --pilot (when the program configures none)")
    est.set_defaults(fn=_estimate)
    bud = sub.add_parser("budget", help="status | reset of a budget label on a shared ledger")
    bud.add_argument("action", choices=["status", "reset"])
    bud.add_argument("ledger_url", help="sqlite:///path/budgets.db or redis://host:6379/0")
    bud.add_argument("label")
    bud.add_argument("--window", default=None, help="1h | 1d | 30d | day | month: count spend in this window")
    bud.add_argument("--tz", default="UTC")
    bud.add_argument("--limit", type=float, default=None, help="show remaining against this limit")
    bud.set_defaults(fn=_budget)
    rep = sub.add_parser("report", help="tables from a run's costs.jsonl / summary.json")
    rep.add_argument("run_dir")
    rep.add_argument("--depth", type=int, default=2, help="module path levels (0: full paths)")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--csv", action="store_true")
    rep.add_argument("--compare", help="a second run directory, side by side")
    rep.add_argument("--html", metavar="FILE", help="also write one self-contained page (spend over time against "
                                                    "the budget, trials' score against cost, modules); needs "
                                                    "pip install 'otel-dspy-cost[report]'")
    rep.set_defaults(fn=_report)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except _UsageError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `otel-dspy-cost pricing list | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, LookupError) as exc:
        print(f"error: {scrub(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - our bug: one line, not a traceback of our internals
        print(f"error: internal error ({scrub(f'{type(exc).__name__}: {exc}')}); run with "
              f"OTEL_DSPY_COST_DEBUG=1 for the traceback", file=sys.stderr)
        if os.environ.get("OTEL_DSPY_COST_DEBUG"):
            raise
        return 3

