"""`spend_report()`: this process's spend totals as a dict or a printed table."""

from __future__ import annotations

from typing import Any

from otel_dspy_cost import _runtime
from otel_dspy_cost.budgets.spend import DIMENSIONS, FIELDS, SpendAggregator, blank_row
from otel_dspy_cost.pricing.cost import money


def collapse_module(path: str, depth: int | None) -> str:
    """`Agent.searcher.react` at depth 2 -> `Agent.searcher`; None keeps the predictor-level path."""
    if depth is None or not path:
        return path
    return ".".join(path.split(".")[:depth])


def spend_report(by: str = "module", *, depth: int | None = None, print_table: bool = False,
                 aggregator: SpendAggregator | None = None) -> dict[str, dict[str, float]]:
    """Totals for one dimension (`module`, `model`, `phase`, `budget` or `trial`) plus `"total"`.

    `{"ResearchAgent.searcher": {"calls": 3, "usd": ..., "input_tokens": ..., ...}, ..., "total": {...}}`.
    `depth` folds module paths (depth=2 gives `Agent.searcher` for `Agent.searcher.react`).
    `print_table=True` also prints the per-row table with each row's share of the spend.
    """
    if aggregator is None:
        rt = _runtime.active()
        aggregator = rt.accountant.aggregator if rt is not None else SpendAggregator()  # nothing counted yet
    snap = aggregator.snapshot()
    if by not in DIMENSIONS:
        raise ValueError(f"by must be one of {DIMENSIONS}")
    rows: dict[str, dict[str, float]] = {}
    for name, row in snap[f"by_{by}"].items():
        key = collapse_module(name, depth) if by == "module" else name
        target = rows.setdefault(key, blank_row())
        for f in FIELDS:
            target[f] += row[f]
    result = {k: _money_fields(v) for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["usd"])}
    result["total"] = _money_fields(snap["total"])
    if print_table:
        print(format_table(result, title=f"spend by {by}"))
    return result


def _money_fields(row: dict[str, float]) -> dict[str, float]:
    return {k: money(v) if isinstance(v, float) else v for k, v in row.items()}


def format_table(report: dict[str, dict[str, float]], *, title: str = "spend by module") -> str:
    """The per-module table of the seed document: module | calls | input | output | total | USD | share."""
    from rich.table import Table

    total_usd = report.get("total", {}).get("usd", 0.0) or 0.0
    table = Table(title=title)
    for col, justify in (("name", "left"), ("calls", "right"), ("input", "right"), ("output", "right"),
                         ("total tokens", "right"), ("USD", "right"), ("share", "right")):
        table.add_column(col, justify=justify)
    for name, row in report.items():
        if name == "total":
            continue
        share = f"{100 * row['usd'] / total_usd:.1f}%" if total_usd else "-"
        table.add_row(name, f"{int(row['calls'])}", f"{int(row['input_tokens'])}", f"{int(row['output_tokens'])}",
                      f"{int(row['input_tokens'] + row['output_tokens'])}", f"{row['usd']:.6f}", share)
    t = report.get("total")
    if t:
        table.add_row("total", f"{int(t['calls'])}", f"{int(t['input_tokens'])}", f"{int(t['output_tokens'])}",
                      f"{int(t['input_tokens'] + t['output_tokens'])}", f"{t['usd']:.6f}", "100%" if total_usd else "-",
                      style="bold")
    return render_table(table)


def render_table(table: Any) -> str:
    """A rich Table as aligned plain text (120 columns), for print() and for tests to read."""
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    Console(file=buf, width=120, force_terminal=False).print(table)
    return buf.getvalue()
