"""`otel-dspy-cost`: the offline demo and the pricing catalog commands."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _demo(args: argparse.Namespace) -> int:
    """A planner / ReAct searcher / synthesizer program evaluated under a budget that trips partway,
    against the built-in OpenAI-compatible simulator on 127.0.0.1 (no API key, no network)."""
    import dspy

    import otel_dspy_cost
    from otel_dspy_cost.simulator import SimulatorServer

    def search(query: str) -> str:
        """Searches the knowledge base."""
        return f"Three documents mention {query}."

    class ResearchAgent(dspy.Module):
        def __init__(self):
            super().__init__()
            self.planner = dspy.ChainOfThought("question -> plan")
            self.searcher = dspy.ReAct("plan -> findings", tools=[search], max_iters=3)
            self.synthesizer = dspy.ChainOfThought("question, findings -> answer")

        def forward(self, question):
            plan = self.planner(question=question).plan
            findings = self.searcher(plan=plan).findings
            return self.synthesizer(question=question, findings=findings)

    otel_dspy_cost.instrument(unknown_model="warn")
    questions = [f"What drives cost in DSPy optimizer run {i}?" for i in range(args.examples)]
    devset = [dspy.Example(question=q, answer="cost").with_inputs("question") for q in questions]
    with SimulatorServer() as server:
        lm = dspy.LM(args.model, api_base=server.api_base, api_key="sim-no-key", cache=False, max_tokens=400)
        print(f"simulated provider on {server.api_base}, priced as {args.model}; budget ${args.budget:.4f}")
        evaluate = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 1.0, num_threads=2,
                                 display_progress=False)
        try:
            with otel_dspy_cost.budget(limit_usd=args.budget, label="demo", warn_at=0.75) as b, dspy.context(lm=lm):
                evaluate(ResearchAgent())
            print(f"finished within budget: ${b.spent_usd:.6f} of ${args.budget:.4f}")
        except otel_dspy_cost.BudgetExceededError as stop:
            print(f"BUDGET STOP: {stop}")
        print(f"provider requests made: {server.count}; budget status: {b.status}; "
              f"spent ${b.spent_usd:.6f} of ${args.budget:.4f} in {b.call_count} calls")
    otel_dspy_cost.spend_report(depth=2, print_table=True)
    otel_dspy_cost.spend_report(by="model", print_table=True)
    return 0


def _pricing(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from otel_dspy_cost import _catalog_edit
    from otel_dspy_cost.pricing import (
        Catalog,
        CatalogError,
        PricingResolver,
        UnknownModelError,
        default_catalog_path,
        split_model,
        user_catalog_path,
    )

    try:
        if args.action == "validate":
            path = args.path or str(default_catalog_path())
            catalog = Catalog.from_path(path, source="catalog")
            print(f"{path}: OK, {len(catalog.entries)} entries, catalog_version {catalog.catalog_version}")
            return 0
        if args.action == "add":
            rates = {"input": args.input, "cached_input": args.cached_input, "cache_write": args.cache_write,
                     "output": args.output, "reasoning": args.reasoning}
            if not args.local and (args.input is None or args.output is None):
                print("error: --input and --output are required (USD per 1M tokens)", file=sys.stderr)
                return 2
            path = Path(args.file) if args.file else user_catalog_path()
            entry = _catalog_edit.add_entry(path, args.model, rates, effective_at=args.effective_at,
                                            max_output_tokens=args.max_output_tokens, local=args.local,
                                            note=args.note)
            print(f"{path}: added {entry['provider']}/{entry['model']} v{entry['price_version']} "
                  f"effective {entry['effective_at']}")
            return 0
        if args.action == "import-litellm":
            added, unchanged = _catalog_edit.import_litellm(Path(args.out), providers=args.provider,
                                                            models=args.only)
            print(f"{args.out}: {added} entries added, {unchanged} unchanged (from LiteLLM's bundled price map)")
            return 0
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
            history = [asdict(e) for c in resolver.catalogs for e in c.entries
                       if (provider is None or e.provider == provider) and (e.model == name or name in e.aliases)]
            if not history:
                raise UnknownModelError(args.model, resolver.suggest(args.model))
            print(json.dumps(history, indent=1, default=str))
            return 0
        when = _dt.datetime.fromisoformat(args.when) if args.when else None
        entry = resolver.lookup(args.model, tier=args.tier, when=when, price_version=args.price_version,
                                fine_tuned=args.fine_tuned)
        print(json.dumps(asdict(entry), indent=1, default=str))
        return 0
    except (CatalogError, UnknownModelError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _pricing_parser(sub: Any) -> None:
    pricing = sub.add_parser("pricing", help="the pricing catalog: list | show | lookup | add | import-litellm | "
                                             "validate")
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
    add = actions.add_parser("add", help="append a price to your catalog (a new price_version; never edits)")
    add.add_argument("model", help="provider/model")
    for rate in ("input", "cached-input", "cache-write", "output", "reasoning"):
        add.add_argument(f"--{rate}", type=float, help="USD per 1M tokens")
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
    val = actions.add_parser("validate", help="check a catalog file against the schema and the overlap rule")
    val.add_argument("path", nargs="?")
    pricing.set_defaults(fn=_pricing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-dspy-cost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo: a multi-module program under a budget that trips")
    demo.add_argument("--model", default="openai/gpt-4o-mini", help="model name the simulated calls are priced as")
    demo.add_argument("--budget", type=float, default=0.004, help="USD limit (default trips partway)")
    demo.add_argument("--examples", type=int, default=12)
    demo.set_defaults(fn=_demo)
    _pricing_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
