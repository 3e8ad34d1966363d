"""`otel-dspy-cost report RUN --html FILE`: one self-contained page to look at a run with.

Three views of the run's own files (`costs.jsonl`, `summary.json`, read as `report` reads them):
spend over time against the budget's limit and warn line, each trial's score against what it cost, and the
module table. Plotly draws the charts (a maintained library; `pip install "otel-dspy-cost[report]"`), with its
JavaScript inlined: the page opens offline, with nothing fetched at view time. About 5 MB for that reason.
"""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Any

from otel_dspy_cost.pricing.cost import usd_text


class ReportDependencyError(Exception):
    """The HTML report needs plotly: the message says how to install it."""


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ReportDependencyError('--html needs plotly: pip install "otel-dspy-cost[report]"') from None
    return go


def spend_over_time(costs: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """(time, cumulative USD) per priced call, in time order: the spend line. A call of unknown cost adds 0
    here (the report's headline counts them)."""
    rows = sorted((c for c in costs if c.get("ts")), key=lambda c: c["ts"])
    times, totals, total = [], [], 0.0
    for row in rows:
        total += row.get("usd") or 0.0
        times.append(row["ts"])
        totals.append(total)
    return times, totals


def _spend_figure(go: Any, costs: list[dict[str, Any]], budget: dict[str, Any] | None) -> Any:
    times, totals = spend_over_time(costs)
    fig = go.Figure(go.Scatter(x=times, y=totals, mode="lines", name="spent", line={"shape": "hv"}))
    if budget and budget.get("limit_usd"):
        limit = budget["limit_usd"]
        fig.add_hline(y=limit, line={"color": "firebrick"}, annotation_text=f"limit ${usd_text(limit)}")
        if budget.get("warn_at"):
            warn = limit * budget["warn_at"]
            fig.add_hline(y=warn, line={"color": "orange", "dash": "dash"},
                          annotation_text=f"warn at {budget['warn_at']:.0%} (${usd_text(round(warn, 9))})")
    fig.update_layout(title="Spend over time", xaxis_title="time (UTC)", yaxis_title="USD, cumulative",
                      yaxis={"rangemode": "tozero"}, height=420, margin={"t": 50})
    return fig


def _trials_figure(go: Any, trials: list[dict[str, Any]]) -> Any | None:
    scored = [t for t in trials if isinstance(t.get("score"), (int, float))]
    if not scored:
        return None
    fig = go.Figure()
    for optimizer in sorted({t["optimizer"] for t in scored}):
        mine = [t for t in scored if t["optimizer"] == optimizer]
        fig.add_trace(go.Scatter(
            x=[t.get("usd", 0.0) for t in mine], y=[t["score"] for t in mine], mode="markers+text", name=optimizer,
            text=[str(t["trial"]) for t in mine], textposition="top center",
            customdata=[[t["trial"], t.get("eval") or "-", t.get("calls", 0), t.get("trace_id") or "-"]
                        for t in mine],
            hovertemplate="trial %{customdata[0]} (%{customdata[1]})<br>score %{y}<br>$%{x}"
                          "<br>%{customdata[2]} calls<br>trace %{customdata[3]}<extra></extra>"))
    fig.update_layout(title="Trials: score against cost", xaxis_title="USD spent by the trial",
                      yaxis_title="score", height=420, margin={"t": 50})
    return fig


def _module_table(rows: dict[str, dict[str, Any]]) -> str:
    total = rows.get("total", {}).get("usd") or 0.0
    body = []
    for name, row in rows.items():
        share = f"{row['usd'] / total:.1%}" if total and name != "total" else ""
        cells = [html.escape(name), str(row["calls"]), f"{row['input_tokens']:,}", f"{row['output_tokens']:,}",
                 f"${usd_text(row['usd'])}", share]
        tag = "th" if name == "total" else "td"
        body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in ("module", "LM calls", "input tokens", "output tokens", "USD", "share"))
    return f'<table id="modules"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(report: dict[str, Any], costs: list[dict[str, Any]]) -> str:
    """The page for `run_report()`'s result and the run's cost lines."""
    go = _plotly()
    s = report["summary"]
    budget = s.get("budget")
    figures = [_spend_figure(go, costs, budget), _trials_figure(go, report["trials"])]
    charts = []
    for i, fig in enumerate(f for f in figures if f is not None):
        # The first chart carries plotly.js inline (offline); the others reuse it.
        charts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"chart{i}"))
    headline = (f"${usd_text(round(s.get('total_cost_usd', 0.0), 9))} actual, {s.get('calls', 0)} LM calls; "
                f"train ${usd_text(round(s.get('train_cost_usd', 0.0), 9))}, "
                f"infer ${usd_text(round(s.get('infer_cost_usd', 0.0), 9))}")
    notes = []
    if s.get("incomplete"):
        notes.append(f"The run did not finish: {s['incomplete']}")
    if budget:
        notes.append(f"Budget {budget['label']!r}: {budget['status']}, ${usd_text(round(budget['spent_usd'], 9))} "
                     f"of ${usd_text(budget['limit_usd'])}")
    if s.get("score") is not None:
        notes.append(f"Score {s['score']:.2f}")
    title = f"otel-dspy-cost report: {report['run']}"
    made = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="headline">{html.escape(headline)}</p>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
{"".join(charts)}
<h2>Spend by module</h2>
{_module_table(report["module"])}
<p><small>Made {made} from {html.escape(report['run'])}/costs.jsonl and summary.json.</small></p>
</body></html>
"""


def write_html(out: str | Path, report: dict[str, Any], costs: list[dict[str, Any]]) -> Path:
    path = Path(out)
    path.write_text(render_html(report, costs), encoding="utf-8")
    return path
