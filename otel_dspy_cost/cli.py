"""`otel-dspy-cost`: the offline demo and the pricing catalog commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

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

    from otel_dspy_cost.pricing import Catalog, CatalogError, PricingResolver, UnknownModelError, default_catalog_path

    try:
        if args.action == "validate":
            path = args.path or str(default_catalog_path())
            catalog = Catalog.from_path(path, source="catalog")
            print(f"{path}: OK, {len(catalog.entries)} entries, catalog_version {catalog.catalog_version}")
            return 0
        resolver = PricingResolver()
        if args.action == "list":
            for entry in resolver.catalog.entries:
                print(f"{entry.key:45s} v{entry.price_version:<3d} in={entry.rates.input} "
                      f"cached={entry.rates.cached_input} out={entry.rates.output} from {entry.effective_at.date()}")
            return 0
        entry = resolver.lookup(args.path, tier=args.tier)
        data = asdict(entry)
        print(json.dumps(data, indent=1, default=str))
        return 0
    except (CatalogError, UnknownModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-dspy-cost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo: a multi-module program under a budget that trips")
    demo.add_argument("--model", default="openai/gpt-4o-mini", help="model name the simulated calls are priced as")
    demo.add_argument("--budget", type=float, default=0.004, help="USD limit (default trips partway)")
    demo.add_argument("--examples", type=int, default=12)
    demo.set_defaults(fn=_demo)
    pricing = sub.add_parser("pricing", help="the pricing catalog: list | lookup MODEL | validate [FILE]")
    pricing.add_argument("action", choices=["list", "lookup", "validate"])
    pricing.add_argument("path", nargs="?", help="model for lookup, file for validate")
    pricing.add_argument("--tier", default=None)
    pricing.set_defaults(fn=_pricing)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
