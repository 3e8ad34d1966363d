"""Run artifacts: `costs.jsonl` (one line per LM call, fed by the accounting station) and `summary.json`.

    with otel_dspy_cost.record_run("runs/nightly", estimate=est) as run:
        compiled = optimizer.compile(program, trainset=train)
        run.score = evaluate(compiled).score
    # runs/nightly/costs.jsonl, runs/nightly/summary.json; `otel-dspy-cost report runs/nightly`

The log is fed by the accounting station as each call settles (so sampled-out calls are in it too):
lines are appended in batches (never rewritten) and the file rotates at `max_bytes` keeping `backups`
old files, so a long run cannot fill the disk. The summary is computed from the log itself, so the two
always agree.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from otel_dspy_cost.budgets.accounting import LMCall
from otel_dspy_cost.budgets.spend import SpendAggregator
from otel_dspy_cost.optimizers import runs as optimizer_runs
from otel_dspy_cost.pricing.cost import money
from otel_dspy_cost.reports.run_files import read_costs
from otel_dspy_cost.reports.spend import spend_report

logger = logging.getLogger("otel_dspy_cost")
SUMMARY_VERSION = 1


def _round(value: float | None) -> float | None:
    return None if value is None else money(value)


def _rounded(data: Any) -> Any:
    """Every float of a summary as `money` writes it (token counts are ints and stay as they are)."""
    if isinstance(data, float):
        return money(data)
    if isinstance(data, dict):
        return {k: _rounded(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_rounded(v) for v in data]
    return data


def _line(call: LMCall) -> dict[str, Any]:
    cost, usage = call.cost, call.billed
    unknown = cost is None or cost.unknown
    return {
        "ts": _dt.datetime.fromtimestamp(call.ts or time.time(), _dt.UTC).isoformat(),
        "trace_id": f"{call.trace_id:032x}", "span_id": f"{call.span_id:016x}",
        "module": call.module, "phase": call.phase, "optimizer": call.optimizer or None, "trial": call.trial,
        "role": call.role, "model": call.model, "operation": call.operation,
        "tier": cost.tier if cost is not None else None,
        "input_tokens": usage.input_tokens, "cached_input_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens, "reasoning_tokens": usage.reasoning_tokens,
        "usd": None if unknown else _round(cost.usd), "economic_usd": None if unknown else _round(cost.economic_usd),
        "cache_hit": call.cache_hit, "estimated": call.estimated, "estimate_reason": call.estimate_reason,
        "unknown_cost": unknown, "outcome": call.outcome,
        "unpriced_units": list(cost.unpriced) if cost is not None and cost.unpriced else None,
        "latency_s": round(call.duration_s or 0.0, 6),
        "pricing_source": None if unknown else cost.source, "pricing_version": None if unknown else cost.version,
        "budget": ",".join(call.budget_labels) or None, "error": call.error_type,
    }


class CostLog:
    """Appends one JSON line per settled LM call to `path`; fed by the accounting station, so every call
    is logged whether or not its span was recorded (sampled out, SDK disabled, a foreign provider).

    Lines are buffered and written in batches (at `flush_lines` lines, or a second after the last write,
    and at the end of the run): a write per call would be a syscall on the LM call's path. The file
    rotates at `max_bytes`, keeping `backups` old files, so a long run cannot fill the disk."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 50 * 2**20, backups: int = 3,
                 flush_lines: int = 64, flush_interval_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups = max_bytes, backups
        self.flush_lines, self.flush_interval_s = flush_lines, flush_interval_s
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._last_flush = time.monotonic()

    def __call__(self, call: LMCall) -> None:
        line = json.dumps(_line(call), separators=(",", ":"))
        with self._lock:
            self._pending.append(line)
            due = (len(self._pending) >= self.flush_lines
                   or time.monotonic() - self._last_flush >= self.flush_interval_s)
        if due:
            self.flush()

    def flush(self) -> bool:
        with self._lock:
            lines, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            if not lines:
                return True
            data = ("\n".join(lines) + "\n").encode()
            try:
                self._rotate_if_needed(len(data))
                with open(self.path, "ab") as fh:  # append-only: concurrent writers interleave whole lines
                    fh.write(data)
            except OSError:
                logger.exception("otel-dspy-cost: could not write %s", self.path)
                return False
        return True

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        for i in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if newer.exists():
                os.replace(newer, older)


def aggregate(lines: list[dict[str, Any]]) -> SpendAggregator:
    """The log's calls fed to the same aggregator the live processor fills, so a report built from a
    run's `costs.jsonl` is `spend_report()` of that run by construction."""
    agg = SpendAggregator()
    for line in lines:
        g = line.get  # lines as `run_files.read_costs` checked them; older lines may lack the newer keys
        trial = None if g("trial") is None else f"{g('optimizer') or 'optimizer'}#{line['trial']}"
        agg.record(module=line["module"] or "(no module)", model=line["model"] or "(unknown model)",
                   phase=line["phase"], budgets=[b for b in str(g("budget") or "").split(",") if b], trial=trial,
                   values={"calls": 1, "usd": g("usd") or 0.0, "economic_usd": g("economic_usd") or 0.0,
                           "input_tokens": g("input_tokens", 0), "cached_input_tokens": g("cached_input_tokens", 0),
                           "output_tokens": g("output_tokens", 0), "reasoning_tokens": g("reasoning_tokens", 0),
                           "unknown_cost_calls": int(bool(g("unknown_cost"))),
                           "estimated_calls": int(bool(g("estimated"))), "cache_hits": int(bool(g("cache_hit"))),
                           "unpriced_unit_calls": int(bool(g("unpriced_units")))})
    return agg


def totals(lines: list[dict[str, Any]], by: str = "module", depth: int | None = None) -> dict[str, dict[str, float]]:
    """`spend_report(by, depth=depth)` of the calls in a log ({key: {...}, "total": {...}})."""
    return spend_report(by, depth=depth or None, aggregator=aggregate(lines))


def build_summary(run_dir: str | os.PathLike[str], *, program_runs: int = 0, program_runs_failed: int = 0,
                  trials: list[dict[str, Any]] = (),
                  budget: Any = None, estimate: Any = None, score: float | None = None,
                  cancelled_reason: str | None = None, started_at: str | None = None,
                  problems: list[str] | None = None, aggregator: SpendAggregator | None = None) -> dict[str, Any]:
    """`aggregator`: the run's cost lines already read (else they are read here, `problems` as in `read_costs`)."""
    agg = aggregator if aggregator is not None else aggregate(read_costs(run_dir, problems))
    by_phase = spend_report("phase", aggregator=agg)
    train, infer = by_phase.get("train", {}), by_phase.get("infer", {})
    total = by_phase["total"]
    summary: dict[str, Any] = {
        "summary_version": SUMMARY_VERSION, "started_at": started_at,
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "calls": total["calls"],
        "train_prompt_tokens": train.get("input_tokens", 0),
        "train_cached_prompt_tokens": train.get("cached_input_tokens", 0),
        "train_completion_tokens": train.get("output_tokens", 0),
        "infer_prompt_tokens": infer.get("input_tokens", 0),
        "infer_cached_prompt_tokens": infer.get("cached_input_tokens", 0),
        "infer_completion_tokens": infer.get("output_tokens", 0),
        "train_cost_usd": train.get("usd", 0.0), "infer_cost_usd": infer.get("usd", 0.0),
        "total_cost_usd": total["usd"],
        "train_economic_cost_usd": train.get("economic_usd", 0.0),
        "inference_economic_cost_usd": infer.get("economic_usd", 0.0),
        "total_economic_cost_usd": total["economic_usd"],
        "unknown_cost_calls": total["unknown_cost_calls"], "estimated_calls": total["estimated_calls"],
        "unpriced_unit_calls": total["unpriced_unit_calls"],
        "program_runs": program_runs, "program_runs_failed": program_runs_failed,
        # per completed run; what failed runs spent is in the numerator: when in doubt, count more
        "program_cost_per_million_runs": (infer.get("usd", 0.0) / program_runs * 1e6) if program_runs else None,
        "by_model": {k: v for k, v in spend_report("model", aggregator=agg).items() if k != "total"},
        "by_module": {k: v for k, v in spend_report("module", depth=2, aggregator=agg).items() if k != "total"},
        "trials": sorted(trials, key=lambda t: (t["optimizer"], t["trial"])),
        "score": score,
    }
    if budget is not None:
        from otel_dspy_cost.budgets.budget import EXCEEDED, STOPPED, WARNED

        status = budget.status
        if cancelled_reason is None and budget.action == "stop" and status in (EXCEEDED, STOPPED):
            cancelled_reason = "budget_exceeded"  # stopped, and the caller caught the stop inside the run
        summary["budget"] = {"label": budget.label, "limit_usd": budget.limit_usd, "spent_usd": budget.spent_usd,
                             "warn_at": budget.warn_at, "status": status,
                             "within_budget": status not in (EXCEEDED, STOPPED),
                             "exceeded_threshold": status in (WARNED, EXCEEDED, STOPPED),
                             "cancelled_reason": cancelled_reason}
        bounds = budget.window_bounds() if hasattr(budget, "window_bounds") else None
        if bounds is not None:
            summary["budget"]["window"] = {"kind": budget.window.describe(), "start": bounds[0].isoformat(),
                                           "end": bounds[1].isoformat()}
    if estimate is not None:
        summary["estimate"] = dataclasses.asdict(estimate) if dataclasses.is_dataclass(estimate) else dict(estimate)
    return summary


@dataclasses.dataclass
class Run:
    """The run being recorded: set `score` (e.g. the final Evaluate score) to put it next to cost.
    `previous` is where an earlier run found in the folder was moved (None if there was none)."""

    directory: Path
    cost_log: CostLog
    budget: Any = None
    estimate: Any = None
    score: float | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    previous: Path | None = None


_RUN_FILES = ("costs.jsonl", "costs.jsonl.*", "summary.json")


def _move_previous_run(directory: Path) -> Path | None:
    """One folder, one run: an earlier run's files move to `previous/<its start>/` before a new run starts,
    so neither the new summary nor `report` adds the old run's calls in (a folder re-used by a nightly job or
    the demo would otherwise report 10, 20, 30 calls)."""
    found = [p for pattern in _RUN_FILES for p in directory.glob(pattern) if p.is_file()]
    if not found:
        return None
    try:
        stamp = _dt.datetime.fromisoformat(json.loads((directory / "summary.json").read_text())["started_at"])
    except (OSError, ValueError, TypeError, KeyError):  # no summary (a run that died), or not ours: file times
        stamp = _dt.datetime.fromtimestamp(min(p.stat().st_mtime for p in found), _dt.UTC)
    name = stamp.astimezone(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = directory / "previous" / name
    n = 1
    while target.exists():
        target, n = directory / "previous" / f"{name}-{n}", n + 1
    target.mkdir(parents=True)
    for path in found:
        path.rename(target / path.name)
    logger.info("otel-dspy-cost: %s held an earlier run; moved it to %s", directory, target)
    return target


@contextmanager
def record_run(run_dir: str | os.PathLike[str], *, budget: Any = None, estimate: Any = None,
               tracer_provider: Any = None, max_bytes: int = 50 * 2**20,
               drain_timeout_s: float = 10.0, append: bool = False) -> Iterator[Run]:
    """Write `costs.jsonl` during the block and `summary.json` at its end (also when a budget stops it).

    A folder holds one run: an earlier run found there is moved to `previous/<its start>/` first
    (`run.previous`). `append=True` adds to the run already there instead (one run recorded by several
    processes or steps), and the summary then covers every call in the folder.

    Every LM call settled during the block is logged, sampled or not; program runs and trial scores are
    recorded by the wrappers the same way (a disabled or sampled-out tracer changes none of them), with each
    trial's trace id where its trace was recorded. `tracer_provider` is accepted for compatibility: nothing
    here reads spans any more."""
    from otel_dspy_cost import _runtime
    from otel_dspy_cost.instrumentation.instrumentor import ensure_accounting

    ensure_accounting()
    rt = _runtime.active()
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    previous = None if append else _move_previous_run(directory)
    cost_log = CostLog(directory / "costs.jsonl", max_bytes=max_bytes)
    accountant = rt.accountant if rt is not None else None
    if accountant is not None:
        accountant.add_sink(cost_log)
    records = optimizer_runs.RunRecords()  # trials and program runs, whatever the tracer does
    optimizer_runs.watch(records)
    run = Run(directory, cost_log, budget, estimate, previous=previous)
    started = _dt.datetime.now(_dt.UTC).isoformat()
    cancelled = None
    try:
        yield run
    except BaseException as exc:
        from otel_dspy_cost.errors import BudgetExceededError

        cancelled = "budget_exceeded" if isinstance(exc, BudgetExceededError) else type(exc).__name__
        raise
    finally:
        _runtime.wait_for_calls(drain_timeout_s)  # so calls still in flight are in the log and the summary
        optimizer_runs.unwatch(records)
        if accountant is not None:
            accountant.remove_sink(cost_log)
        cost_log.flush()
        try:
            agg = aggregate(read_costs(directory))  # read once: the trials' costs and the summary's totals
            run.summary = build_summary(directory, program_runs=records.program_runs,
                                        program_runs_failed=records.program_runs_failed,
                                        trials=_trials(agg, records), budget=budget, estimate=estimate,
                                        score=run.score, cancelled_reason=cancelled, started_at=started,
                                        aggregator=agg)
            run.summary = _rounded(run.summary)
            (directory / "summary.json").write_text(json.dumps(run.summary, indent=1, default=str) + "\n")
        except Exception:  # our bug must not mask the user's outcome
            logger.exception("otel-dspy-cost: could not write %s/summary.json", directory)


def _trials(agg: SpendAggregator, records: Any) -> list[dict[str, Any]]:
    """Each scored trial: its score, evaluation kind and trace id from the always-on records, its calls and USD
    from the cost lines (the trial each call was made in)."""
    by_trial = spend_report("trial", aggregator=agg)
    out = []
    with records.lock:
        rows = [dict(r) for r in records.trials.values() if r["score"] is not None]
    for row in rows:
        spent = by_trial.get(f"{row['optimizer'] or 'optimizer'}#{row['trial']}", {})
        row.update(usd=spent.get("usd", 0.0), calls=spent.get("calls", 0))
        out.append(row)
    return out
