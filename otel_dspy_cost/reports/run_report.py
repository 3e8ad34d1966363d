"""`otel-dspy-cost report RUN_DIR`: tables (module, model, phase, trial) from a run's artifacts.

Built from `costs.jsonl`, so it equals `spend_report()` of the same run; `--json` and `--csv` for
machines; `--compare OTHER_RUN` puts two runs' totals side by side.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from otel_dspy_cost.pricing.cost import usd_text
from otel_dspy_cost.reports.artifacts import aggregate
from otel_dspy_cost.reports.run_files import read_costs, read_summary
from otel_dspy_cost.reports.spend import format_table, render_table, spend_report


def run_report(run_dir: str | Path, *, depth: int | None = 2, problems: list[str] | None = None,
               costs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's tables from its cost lines (`costs`, else read here), and its summary (rebuilt from the cost
    lines, and marked `incomplete`, when the run left none or an unreadable one). Damaged lines are skipped:
    said in `problems` when given, else logged."""
    agg = aggregate(read_costs(run_dir, problems) if costs is None else costs)
    summary = read_summary(run_dir, problems, aggregator=agg)
    tables = {by: spend_report(by, depth=(depth or None) if by == "module" else None, aggregator=agg)
              for by in ("module", "model", "phase", "trial")}
    return {"run": str(run_dir), **tables, "trials": summary.get("trials", []),
            "summary": {k: v for k, v in summary.items() if not k.startswith("by_") and k != "trials"}}


def _trials_table(trials: list[dict[str, Any]]) -> str:
    from rich.table import Table

    table = Table(title="trials: cost next to score")
    for col in ("optimizer", "trial", "eval", "score", "calls", "USD", "trace"):
        table.add_column(col, justify="left" if col in ("optimizer", "eval", "trace") else "right")
    for t in trials:
        table.add_row(t["optimizer"], str(t["trial"]), str(t.get("eval") or "-"), f"{t['score']:.2f}",
                      str(t.get("calls", 0)), f"{t.get('usd', 0.0):.6f}", t.get("trace_id", "")[:16])
    return render_table(table)


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    out = [f"run {report['run']} did not finish: {s['incomplete']}"] if s.get("incomplete") else []
    out += [f"run {report['run']}: ${s.get('total_cost_usd', 0.0):.6f} actual "
           f"(${s.get('total_economic_cost_usd', s.get('total_cost_usd', 0.0)):.6f} uncached), "
           f"{s.get('calls', 0)} LM calls; train ${s.get('train_cost_usd', 0.0):.6f}, "
           f"infer ${s.get('infer_cost_usd', 0.0):.6f}"]
    if s.get("score") is not None:
        out.append(f"score {s['score']:.2f} for ${s.get('total_cost_usd', 0.0):.6f}")
    if s.get("program_cost_per_million_runs") is not None:
        out.append(f"program cost per million runs: ${s['program_cost_per_million_runs']:,.2f} "
                   f"({s.get('program_runs')} inference runs measured)")
    budget = s.get("budget")
    if budget:
        out.append(f"budget {budget['label']!r}: {budget['status']}, ${budget['spent_usd']:.6f} of "
                   f"${usd_text(budget['limit_usd'])}" + (f", cancelled: {budget['cancelled_reason']}"
                                                if budget.get("cancelled_reason") else ""))
    estimate = s.get("estimate")
    if estimate:
        out.append(f"estimate: ${estimate['usd_low']:.6f} .. ${estimate['usd_high']:.6f} "
                   f"({estimate['calls_low']}..{estimate['calls_high']} calls); "
                   f"actual ${s.get('total_cost_usd', 0):.6f}")
    for by in ("module", "model", "phase"):  # spend_report() rows: largest spend first, total last
        out.append(format_table(report[by], title=f"spend by {by}"))
    if report["trials"]:
        out.append(_trials_table(report["trials"]))
    return "\n".join(out)


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["table", "name", "calls", "input_tokens", "cached_input_tokens", "output_tokens", "usd",
                     "economic_usd", "score"])
    for table in ("module", "model", "phase", "trial"):
        for name, row in report[table].items():
            writer.writerow([table, name, row["calls"], row["input_tokens"], row["cached_input_tokens"],
                             row["output_tokens"], row["usd"], row["economic_usd"], ""])
    for t in report["trials"]:
        writer.writerow(["trials", f"{t['optimizer']}#{t['trial']}", t.get("calls", 0), "", "", "",
                         t.get("usd", 0.0), "", t["score"]])
    return buf.getvalue()


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    from rich.table import Table

    table = Table(title="runs side by side")
    for col in ("", a["run"], b["run"], "change"):
        table.add_column(col, justify="left" if not col else "right")
    for key in ("total_cost_usd", "train_cost_usd", "infer_cost_usd", "total_economic_cost_usd", "calls", "score",
                "program_cost_per_million_runs"):
        x, y = a["summary"].get(key), b["summary"].get(key)
        change = f"{(y - x) / x:+.1%}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else "-"
        table.add_row(key, "-" if x is None else f"{x:.6g}", "-" if y is None else f"{y:.6g}", change)
    return render_table(table)


def _is_run(run_dir: str) -> bool:
    return (Path(run_dir) / "costs.jsonl").exists() or (Path(run_dir) / "summary.json").exists()


def main(args: Any) -> int:
    for run_dir in (args.run_dir, *([args.compare] if args.compare else [])):
        if not _is_run(run_dir):  # comparing against a missing run would compare against zeros
            print(f"error: {run_dir} is not a run folder (it has neither costs.jsonl nor summary.json)",
                  file=sys.stderr, flush=True)
            return 2
    html_out = getattr(args, "html", None)
    if html_out:
        out = Path(html_out)
        if not out.parent.is_dir() or (out.exists() and not out.is_file()):
            print(f"error: --html {html_out}: cannot write there (its folder must exist)", file=sys.stderr, flush=True)
            return 2
    problems: list[str] = []
    costs = read_costs(args.run_dir, problems) if html_out else None
    report = run_report(args.run_dir, depth=args.depth, problems=problems, costs=costs)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    elif args.csv:
        print(to_csv(report), end="")
    else:
        print(render(report))
    if args.compare:
        other: list[str] = []
        print(compare(report, run_report(args.compare, depth=args.depth, problems=other)))
        for problem in other:
            print(f"warning: {problem}", file=sys.stderr, flush=True)
    if html_out:
        from otel_dspy_cost.reports.html_report import ReportDependencyError, write_html

        try:
            path = write_html(html_out, report, costs or [])
        except ReportDependencyError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        except OSError as exc:
            print(f"error: --html {html_out}: {exc.strerror or exc}", file=sys.stderr, flush=True)
            return 2
        print(f"wrote {path}", file=sys.stderr, flush=True)
    return 0
