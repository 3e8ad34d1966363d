"""The live spend totals of this process, by module path, model, phase, budget label and trial.

The accounting station records each counted LM call here once (the same figures that settle budgets), so
the report, the budgets and the span roll-ups agree by construction. Memory is bounded: past
`max_keys` distinct values per dimension, new ones are pooled under "(other)".
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

FIELDS = ("calls", "usd", "economic_usd", "input_tokens", "cached_input_tokens", "output_tokens",
           "reasoning_tokens", "unknown_cost_calls", "estimated_calls", "cache_hits", "unpriced_unit_calls")
DIMENSIONS = ("module", "model", "phase", "budget", "trial")


def blank_row() -> dict[str, float]:
    return dict.fromkeys(FIELDS, 0)


class SpendAggregator:
    def __init__(self, max_keys: int = 2000):
        self._lock = threading.Lock()
        self.max_keys = max_keys
        self._by: dict[str, dict[str, dict[str, float]]] = {d: {} for d in DIMENSIONS}
        self._total = blank_row()
        # (module, model, phase, budgets, trial) -> the rows that key adds to (the total and one per dimension).
        self._rows: dict[tuple[Any, ...], list[dict[str, float]]] = {}
        # A call adds its eleven figures to its key's sums only; they are folded into the rows of every dimension
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
                        row = table.setdefault("(other)", blank_row())
                    else:
                        row = table[name] = blank_row()
                rows.append(row)
        if len(self._rows) < 4 * self.max_keys:
            self._rows[key] = rows
        return rows

    def record(self, *, module: str, model: str, phase: str, budgets: Iterable[str], trial: str | None,
               values: dict[str, float]) -> None:
        self.add((module, model, phase, tuple(budgets), trial), *(values.get(f, 0) for f in FIELDS))

    def add(self, key: tuple[Any, ...], calls: int, usd: float, economic_usd: float, input_tokens: int,
            cached_input_tokens: int, output_tokens: int, reasoning_tokens: int, unknown_cost_calls: int,
            estimated_calls: int, cache_hits: int, unpriced_unit_calls: int = 0) -> None:
        """One call's figures in `FIELDS` order, under `key` = (module, model, phase, budgets, trial)."""
        with self._lock:
            sums = self._sums.get(key)
            if sums is None:
                if len(self._sums) >= 4 * self.max_keys:  # bounded: past that, a key's sums are folded at once
                    self._fold()
                sums = self._sums[key] = [0] * len(FIELDS)
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
            if unpriced_unit_calls:
                sums[10] += unpriced_unit_calls

    def _fold(self) -> None:
        """Add every key's sums to its rows and forget them (caller holds the lock)."""
        for key, sums in self._sums.items():
            rows = self._rows.get(key) or self._rows_for(key)
            for f, v in zip(FIELDS, sums, strict=True):
                if v:
                    for row in rows:
                        row[f] += v
        self._sums = {}

    def row(self, dimension: str | None = None, key: str | None = None) -> dict[str, Any]:
        """One row (`"total"` when no dimension is named) without copying the rest: what a compile's projection
        reads after every trial, and a pilot at its end."""
        with self._lock:
            self._fold()
            found = self._total if dimension is None else self._by[dimension].get(key)
            return dict(found) if found is not None else {}

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
            self._total = blank_row()
            self._rows = {}
            self._sums = {}
