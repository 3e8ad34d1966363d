"""Run artifacts: `costs.jsonl` (one line per LM call, written by a span exporter) and `summary.json`.

    with otel_dspy_cost.record_run("runs/nightly", estimate=est) as run:
        compiled = optimizer.compile(program, trainset=train)
        run.score = evaluate(compiled).score
    # runs/nightly/costs.jsonl, runs/nightly/summary.json; `otel-dspy-cost report runs/nightly`

The log is written by an OpenTelemetry exporter behind a BatchSpanProcessor: the SDK's bounded queue
keeps memory flat, lines are appended (never rewritten) and flushed per batch and at exit, and the
file rotates at `max_bytes` keeping `backups` old files, so a long run cannot fill the disk.
The summary is computed from the log itself, so the two always agree.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from . import _attributes as A
from .report import SpendAggregator, spend_report

logger = logging.getLogger("otel_dspy_cost")
SUMMARY_VERSION = 1
_MODULE_KINDS = ("module", "predictor")


def _line(span: ReadableSpan) -> dict[str, Any]:
    a = span.attributes or {}
    return {
        "ts": _dt.datetime.fromtimestamp((span.start_time or 0) / 1e9, _dt.UTC).isoformat(),
        "trace_id": f"{span.context.trace_id:032x}", "span_id": f"{span.context.span_id:016x}",
        "module": a.get(A.MODULE_PATH, ""), "phase": a.get(A.PHASE, "infer"),
        "optimizer": a.get(A.OPTIMIZER_NAME), "trial": a.get(A.OPTIMIZER_TRIAL), "role": a.get(A.LM_ROLE),
        "model": a.get(A.GEN_AI_REQUEST_MODEL, ""), "tier": a.get(A.PRICING_TIER),
        "input_tokens": int(a.get(A.GEN_AI_INPUT_TOKENS, 0)),
        "cached_input_tokens": int(a.get(A.GEN_AI_CACHE_READ_TOKENS, 0)),
        "output_tokens": int(a.get(A.GEN_AI_OUTPUT_TOKENS, 0)),
        "reasoning_tokens": int(a.get(A.GEN_AI_REASONING_TOKENS, 0)),
        "usd": a.get(A.COST_USD), "economic_usd": a.get(A.COST_ECONOMIC_USD),
        "cache_hit": bool(a.get(A.CACHE_HIT, False)), "estimated": bool(a.get(A.COST_ESTIMATED, False)),
        "unknown_cost": bool(a.get(A.COST_UNKNOWN, False)),
        "latency_s": round(((span.end_time or 0) - (span.start_time or 0)) / 1e9, 6),
        "pricing_source": a.get(A.PRICING_SOURCE), "pricing_version": a.get(A.PRICING_VERSION),
        "budget": a.get(A.BUDGET_LABEL), "error": a.get(A.ERROR_TYPE),
    }


class CostLogExporter(SpanExporter):
    """Appends one JSON line per LM call of ours (refused calls, never sent, are not calls) to `path`."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 50 * 2**20, backups: int = 3):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        self.program_runs = 0  # top-level module calls in the infer phase (for cost per program run)
        self.trials: dict[tuple[str, int], dict[str, Any]] = {}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            scope = span.instrumentation_scope
            if scope is None or scope.name != A.SCOPE_NAME:  # another instrumentation's span
                continue
            a = span.attributes or {}
            kind = a.get(A.SPAN_KIND)
            if kind == "lm" and not a.get(A.BUDGET_REFUSED):
                lines.append(json.dumps(_line(span), separators=(",", ":")))
            elif kind in _MODULE_KINDS and a.get(A.PHASE) == "infer" and "." not in str(a.get(A.MODULE_PATH, ".")):
                self.program_runs += 1
            if A.OPTIMIZER_SCORE in a and A.OPTIMIZER_TRIAL in a:
                key = (str(a.get(A.OPTIMIZER_NAME, "")), int(a[A.OPTIMIZER_TRIAL]))
                self.trials[key] = {"optimizer": key[0], "trial": key[1], "score": a[A.OPTIMIZER_SCORE],
                                    "usd": a.get(A.TOTAL_USD, 0.0), "calls": a.get(A.LM_CALLS, 0),
                                    "eval": a.get(A.OPTIMIZER_EVAL), "trace_id": f"{span.context.trace_id:032x}"}
        if not lines:
            return SpanExportResult.SUCCESS
        data = ("\n".join(lines) + "\n").encode()
        try:
            with self._lock:
                self._rotate_if_needed(len(data))
                with open(self.path, "ab") as fh:  # append-only: concurrent writers interleave whole lines
                    fh.write(data)
        except OSError:
            logger.exception("otel-dspy-cost: could not write %s", self.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

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

    def shutdown(self) -> None:
        return None


def read_costs(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every LM-call line of a run, oldest first (rotated files included)."""
    base = Path(run_dir) / "costs.jsonl"
    files = sorted(base.parent.glob("costs.jsonl.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit()
                   else 0) + [base]
    out = []
    for path in files:
        if path.exists():
            out.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return out


def aggregate(lines: list[dict[str, Any]]) -> SpendAggregator:
    """The log's calls fed to the same aggregator the live processor fills, so a report built from a
    run's `costs.jsonl` is `spend_report()` of that run by construction."""
    agg = SpendAggregator()
    for line in lines:
        trial = None if line["trial"] is None else f"{line['optimizer'] or 'optimizer'}#{line['trial']}"
        agg.record(module=line["module"] or "(no module)", model=line["model"] or "(unknown model)",
                   phase=line["phase"], budgets=[b for b in (line.get("budget") or "").split(",") if b], trial=trial,
                   values={"calls": 1, "usd": line["usd"] or 0.0, "economic_usd": line["economic_usd"] or 0.0,
                           "input_tokens": line["input_tokens"], "cached_input_tokens": line["cached_input_tokens"],
                           "output_tokens": line["output_tokens"], "reasoning_tokens": line["reasoning_tokens"],
                           "unknown_cost_calls": int(line["unknown_cost"]), "estimated_calls": int(line["estimated"]),
                           "cache_hits": int(line["cache_hit"])})
    return agg


def totals(lines: list[dict[str, Any]], by: str = "module", depth: int | None = None) -> dict[str, dict[str, float]]:
    """`spend_report(by, depth=depth)` of the calls in a log ({key: {...}, "total": {...}})."""
    return spend_report(by, depth=depth or None, aggregator=aggregate(lines))


def build_summary(run_dir: str | os.PathLike[str], *, program_runs: int = 0, trials: list[dict[str, Any]] = (),
                  budget: Any = None, estimate: Any = None, score: float | None = None,
                  cancelled_reason: str | None = None, started_at: str | None = None) -> dict[str, Any]:
    agg = aggregate(read_costs(run_dir))
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
        "program_runs": program_runs,
        "program_cost_per_million_runs": (infer.get("usd", 0.0) / program_runs * 1e6) if program_runs else None,
        "by_model": {k: v for k, v in spend_report("model", aggregator=agg).items() if k != "total"},
        "by_module": {k: v for k, v in spend_report("module", depth=2, aggregator=agg).items() if k != "total"},
        "trials": sorted(trials, key=lambda t: (t["optimizer"], t["trial"])),
        "score": score,
    }
    if budget is not None:
        if cancelled_reason is None and budget.action == "stop" and budget.status == "exceeded":
            cancelled_reason = "budget_exceeded"  # stopped, and the caller caught the stop inside the run
        summary["budget"] = {"label": budget.label, "limit_usd": budget.limit_usd, "spent_usd": budget.spent_usd,
                             "status": budget.status, "within_budget": budget.status != "exceeded",
                             "exceeded_threshold": budget.status in ("warned", "exceeded"),
                             "cancelled_reason": cancelled_reason}
        bounds = budget.window_bounds() if hasattr(budget, "window_bounds") else None
        if bounds is not None:
            summary["budget"]["window"] = {"kind": budget.window.describe(), "start": bounds[0].isoformat(),
                                           "end": bounds[1].isoformat()}
    if estimate is not None:
        summary["estimate"] = dataclasses.asdict(estimate) if dataclasses.is_dataclass(estimate) else dict(estimate)
    return summary


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's summary; older summaries without cost fields read as zero cost, never as an error."""
    path = Path(run_dir) / "summary.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for key in ("train_cost_usd", "infer_cost_usd", "total_cost_usd", "inference_economic_cost_usd"):
        data.setdefault(key, 0.0)
    data.setdefault("trials", [])
    data.setdefault("by_model", {})
    data.setdefault("by_module", {})
    return data


@dataclasses.dataclass
class Run:
    """The run being recorded: set `score` (e.g. the final Evaluate score) to put it next to cost."""

    directory: Path
    exporter: CostLogExporter
    budget: Any = None
    estimate: Any = None
    score: float | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


@contextmanager
def record_run(run_dir: str | os.PathLike[str], *, budget: Any = None, estimate: Any = None,
               tracer_provider: Any = None, max_bytes: int = 50 * 2**20,
               drain_timeout_s: float = 10.0) -> Iterator[Run]:
    """Write `costs.jsonl` during the block and `summary.json` at its end (also when a budget stops it)."""
    provider = tracer_provider or trace.get_tracer_provider()
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    exporter = CostLogExporter(directory / "costs.jsonl", max_bytes=max_bytes)
    processor = BatchSpanProcessor(exporter, max_queue_size=8192, schedule_delay_millis=1000)
    if not hasattr(provider, "add_span_processor"):
        raise TypeError("record_run() needs an OpenTelemetry SDK TracerProvider (instrument() sets one up)")
    provider.add_span_processor(processor)
    run = Run(directory, exporter, budget, estimate)
    started = _dt.datetime.now(_dt.UTC).isoformat()
    cancelled = None
    try:
        yield run
    except BaseException as exc:
        from .budget import BudgetExceededError

        cancelled = "budget_exceeded" if isinstance(exc, BudgetExceededError) else type(exc).__name__
        raise
    finally:
        from . import _runtime

        _runtime.wait_for_calls(drain_timeout_s)  # so calls still in flight are in the log and the summary
        processor.force_flush()
        _detach(provider, processor)
        try:
            run.summary = build_summary(directory, program_runs=exporter.program_runs,
                                        trials=list(exporter.trials.values()), budget=budget, estimate=estimate,
                                        score=run.score, cancelled_reason=cancelled, started_at=started)
            (directory / "summary.json").write_text(json.dumps(run.summary, indent=1, default=str) + "\n")
        except Exception:  # our bug must not mask the user's outcome
            logger.exception("otel-dspy-cost: could not write %s/summary.json", directory)


def _detach(provider: Any, processor: BatchSpanProcessor) -> None:
    """The SDK cannot remove a span processor; take ours out of its (private) list if it can, else stop it."""
    multi = getattr(provider, "_active_span_processor", None)
    procs = getattr(multi, "_span_processors", None)
    lock = getattr(multi, "_lock", None)
    if isinstance(procs, tuple) and lock is not None:
        with lock:
            multi._span_processors = tuple(p for p in procs if p is not processor)
    processor.shutdown()
