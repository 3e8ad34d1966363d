"""`spend_report()`: totals by module path, model, phase and budget label for this process.

The processor records each counted LM call here once (the same figures that settle budgets), so the
report, the budgets and the span roll-ups agree by construction. Memory is bounded: past
`max_keys` distinct values per dimension, new ones are pooled under "(other)".
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from ._cost import money

_FIELDS = ("calls", "usd", "economic_usd", "input_tokens", "cached_input_tokens", "output_tokens",
           "reasoning_tokens", "unknown_cost_calls", "estimated_calls", "cache_hits")
DIMENSIONS = ("module", "model", "phase", "budget", "trial")


def _blank() -> dict[str, float]:
    return dict.fromkeys(_FIELDS, 0)


class SpendAggregator:
    def __init__(self, max_keys: int = 2000):
        self._lock = threading.Lock()
        self.max_keys = max_keys
        self._by: dict[str, dict[str, dict[str, float]]] = {d: {} for d in DIMENSIONS}
        self._total = _blank()
        # (module, model, phase, budgets, trial) -> the rows that key adds to (the total and one per dimension).
        self._rows: dict[tuple[Any, ...], list[dict[str, float]]] = {}
        # A call adds its ten figures to its key's sums only; they are folded into the rows of every dimension
        # when the report is read. Reads are rare and calls are many: one row per call instead of six.
        self._sums: dict[tuple[Any, ...], list[float]] = {}

    def _rows_for(self, key: tuple[Any, ...]) -> list[dict[str, float]]:
        module, model, phase, budgets, trial = key
        names = {"module": (module,), "model": (model,), "phase": (phase,), "budget": budgets,
                 "trial": (trial,) if trial is not None else ()}
        rows = [self._total]
        for dim, keys in names.items():
            table = self._by[dim]
            for name in keys:
                row = table.get(name)
                if row is None:
                    if len(table) >= self.max_keys:
                        row = table.setdefault("(other)", _blank())
                    else:
                        row = table[name] = _blank()
                rows.append(row)
        if len(self._rows) < 4 * self.max_keys:
            self._rows[key] = rows
        return rows

    def record(self, *, module: str, model: str, phase: str, budgets: Iterable[str], trial: str | None,
               values: dict[str, float]) -> None:
        self.add((module, model, phase, tuple(budgets), trial), *(values.get(f, 0) for f in _FIELDS))

    def add(self, key: tuple[Any, ...], calls: int, usd: float, economic_usd: float, input_tokens: int,
            cached_input_tokens: int, output_tokens: int, reasoning_tokens: int, unknown_cost_calls: int,
            estimated_calls: int, cache_hits: int) -> None:
        """One call's figures in `_FIELDS` order, under `key` = (module, model, phase, budgets, trial)."""
        with self._lock:
            sums = self._sums.get(key)
            if sums is None:
                if len(self._sums) >= 4 * self.max_keys:  # bounded: past that, a key's sums are folded at once
                    self._fold()
                sums = self._sums[key] = [0] * len(_FIELDS)
            sums[0] += calls
            sums[1] += usd
            sums[2] += economic_usd
            sums[3] += input_tokens
            sums[4] += cached_input_tokens
            sums[5] += output_tokens
            sums[6] += reasoning_tokens
            sums[7] += unknown_cost_calls
            sums[8] += estimated_calls
            sums[9] += cache_hits

    def _fold(self) -> None:
        """Add every key's sums to its rows and forget them (caller holds the lock)."""
        for key, sums in self._sums.items():
            rows = self._rows.get(key) or self._rows_for(key)
            for f, v in zip(_FIELDS, sums, strict=True):
                if v:
                    for row in rows:
                        row[f] += v
        self._sums = {}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._fold()
            return {"by_module": {k: dict(v) for k, v in self._by["module"].items()},
                    "by_model": {k: dict(v) for k, v in self._by["model"].items()},
                    "by_phase": {k: dict(v) for k, v in self._by["phase"].items()},
                    "by_budget": {k: dict(v) for k, v in self._by["budget"].items()},
                    "by_trial": {k: dict(v) for k, v in self._by["trial"].items()},
                    "total": dict(self._total)}

    def reset(self) -> None:
        with self._lock:
            self._by = {d: {} for d in DIMENSIONS}
            self._total = _blank()
            self._rows = {}
            self._sums = {}


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
    from . import _runtime

    agg = aggregator or _runtime.aggregator()
    snap = agg.snapshot()
    if by not in DIMENSIONS:
        raise ValueError(f"by must be one of {DIMENSIONS}")
    rows: dict[str, dict[str, float]] = {}
    for name, row in snap[f"by_{by}"].items():
        key = collapse_module(name, depth) if by == "module" else name
        target = rows.setdefault(key, _blank())
        for f in _FIELDS:
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
