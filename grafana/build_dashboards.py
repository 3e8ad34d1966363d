"""Builds the Grafana dashboards in `dashboards/` from the panel table below.

    python grafana/build_dashboards.py          # rewrites grafana/dashboards/*.json

Hand-written rather than with grafana-foundation-sdk, decided with the diff in front of us (December 2026):
the same table built with the SDK (pinned `grafana-foundation-sdk==1769699379!11.6.0`; unpinned, its version
epochs make pip pick the Grafana 10.1 schema) took as many lines as `_panel`/`_variable`/`build` below, and its
JSON differed only in defaults the SDK spells out (`transparent`, `repeatDirection`, the variables' `auto*`,
schemaVersion 41) and in what it leaves out unless asked (panel ids, dashboard links, per-target datasources,
variable refresh). A build-time dependency with an epoch pin buys nothing here; the tests pin the JSON instead.

Every PromQL expression lives in this one table; tests parse each with promtool and evaluate it against a live
Prometheus.
Metric names are those of the Prometheus pull exporter and of the Collector's `prometheus` exporter
(counter `dspy.cost` with unit USD -> `dspy_cost_USD_total`).
"""

from __future__ import annotations

import json
from pathlib import Path

PROM = {"type": "prometheus", "uid": "otel-dspy-cost-prometheus"}
TEMPO = {"type": "tempo", "uid": "otel-dspy-cost-tempo"}
BSEL = 'dspy_budget_label=~"$budget"'
SEL = 'dspy_lm_model=~"$model", dspy_phase=~"$phase", dspy_budget_label=~"$budget"'
# Each optimizer trial is the root of its own trace: one row per trial trace, linked to it by Tempo's table.
TRIALS_TRACEQL = ('{ span.dspy.span.kind = "trial" } | select(span.dspy.optimizer.name, span.dspy.optimizer.trial, '
                  'span.dspy.optimizer.score, span.dspy.cost.total_usd, span.dspy.lm.calls)')

def total(metric: str, sel: str = SEL, by: str = "", extra: str = "") -> str:
    """A counter's total over the dashboard's time range, which still answers after a batch job has exited.

    An instant `sum(counter)` goes blank once the job's series go stale (Prometheus marks them at the first
    failed scrape), and `increase()` misses a series whose first scrape already holds the job's spend and
    extrapolates the rest. So: the last value in the range, less the value at the range's start where the
    series existed then (a long-running process). A process that restarts within the range with the same
    labels counts from its restart: its counter reset.
    """
    grouping = f"sum by ({by}) " if by else "sum "
    selector = f"{metric}{{{sel}{extra}}}"
    last = f"{grouping}(last_over_time({selector}[$__range]))"
    return f"({last} - {grouping}({selector} offset $__range)) or {last}"


def last(metric: str, sel: str = BSEL, by: str = "") -> str:
    """A gauge's last value in the range (a finished job's final utilisation, spend and limit)."""
    grouping = f"sum by ({by}) " if by else "sum "
    return f"{grouping}(last_over_time({metric}{{{sel}}}[$__range]))"


UNKNOWN, CACHE_HIT = ', dspy_cost_unknown="true"', ', dspy_cache_hit="true"'

# (title, kind, unit, [PromQL or ("traceql", query)], width). Every panel but the time series answers for the
# dashboard's time range (see `total`), so a finished job's figures stay on screen.
DASHBOARDS = {
    "spend-overview": ("otel-dspy-cost: spend overview", [
        ("Total spend", "stat", "currencyUSD", [total("dspy_cost_USD_total")], 6),
        ("Economic cost (uncached list price)", "stat", "currencyUSD", [total("dspy_cost_economic_USD_total")], 6),
        ("Cache savings (economic - actual)", "stat", "currencyUSD",
         [f"({total('dspy_cost_economic_USD_total')}) - ({total('dspy_cost_USD_total')})"], 6),
        ("LM calls", "stat", "short", [total("dspy_lm_calls_total")], 6),
        ("Spend rate (USD per hour)", "timeseries", "currencyUSD",
         [f"sum(rate(dspy_cost_USD_total{{{SEL}}}[$__rate_interval])) * 3600"], 12),
        ("Spend by model", "piechart", "currencyUSD", [total("dspy_cost_USD_total", by="dspy_lm_model")], 6),
        ("Spend by phase", "piechart", "currencyUSD", [total("dspy_cost_USD_total", by="dspy_phase")], 6),
        ("Tokens by type", "bargauge", "short",
         [total("gen_ai_client_token_usage_sum", 'gen_ai_token_type!=""', by="gen_ai_token_type")], 12),
        ("Calls with unknown pricing", "stat", "short",
         [f"({total('dspy_lm_calls_total', extra=UNKNOWN)}) or vector(0)"], 6),
        ("Cache hit calls", "stat", "short",
         [f"({total('dspy_lm_calls_total', extra=CACHE_HIT)}) or vector(0)"], 6),
    ]),
    "attribution": ("otel-dspy-cost: attribution by module", [
        ("Spend by module path", "bargauge", "currencyUSD", [total("dspy_cost_USD_total", by="dspy_module_path")], 12),
        ("Share of spend by module path", "piechart", "percentunit",
         [f"({total('dspy_cost_USD_total', by='dspy_module_path')}) / scalar({total('dspy_cost_USD_total')})"], 12),
        ("Calls by module path", "bargauge", "short", [total("dspy_lm_calls_total", by="dspy_module_path")], 12),
        ("Spend by module and model", "table", "currencyUSD",
         [total("dspy_cost_USD_total", by="dspy_module_path, dspy_lm_model")], 12),
    ]),
    "optimizer-runs": ("otel-dspy-cost: optimizer runs", [
        # An optimizer's inner compiles (MIPROv2's bootstrap) are labelled with the outer optimizer.
        ("Training spend by optimizer", "bargauge", "currencyUSD",
         [total("dspy_cost_USD_total", by="dspy_optimizer_name", extra=', dspy_phase="train"')], 12),
        ("Train vs infer spend", "piechart", "currencyUSD", [total("dspy_cost_USD_total", by="dspy_phase")], 12),
        ("Trials: cost and score (one trace per trial; click a trace id)", "table", "short",
         [("traceql", TRIALS_TRACEQL)], 24),
    ]),
    "budgets": ("otel-dspy-cost: budgets", [
        ("Utilisation vs warn threshold and limit", "timeseries", "percentunit",
         ['dspy_budget_utilization{dspy_budget_label=~"$budget"}',
          'dspy_budget_warn_threshold{dspy_budget_label=~"$budget"}',
          'dspy_budget_limit_USD{dspy_budget_label=~"$budget"} * 0 + 1'], 24),
        ("Spent", "stat", "currencyUSD", [last("dspy_budget_spent_USD", by="dspy_budget_label")], 8),
        ("Limit", "stat", "currencyUSD", [last("dspy_budget_limit_USD", by="dspy_budget_label")], 8),
        ("Budget events (warn, exceeded)", "table", "short",
         [total("dspy_budget_events_total", BSEL, by="dspy_budget_label, dspy_budget_event")], 8),
    ]),
}

VARIABLES = [
    ("model", "label_values(dspy_cost_USD_total, dspy_lm_model)"),
    ("phase", "label_values(dspy_cost_USD_total, dspy_phase)"),
    ("budget", "label_values(dspy_cost_USD_total, dspy_budget_label)"),
]


def _variable(name: str, query: str) -> dict:
    return {"name": name, "type": "query", "datasource": PROM, "query": {"query": query, "refId": name},
            "definition": query, "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"text": "All", "value": "$__all"}}


def _panel(pid: int, title: str, kind: str, unit: str, queries: list, width: int, x: int, y: int) -> dict:
    targets, ds = [], PROM
    for i, q in enumerate(queries):
        ref = chr(ord("A") + i)
        if isinstance(q, tuple):
            ds = TEMPO
            targets.append({"refId": ref, "datasource": TEMPO, "queryType": "traceql", "query": q[1], "limit": 50})
        else:
            targets.append({"refId": ref, "datasource": PROM, "expr": q, "instant": kind != "timeseries",
                            "range": kind == "timeseries"})
    panel = {"id": pid, "title": title, "type": kind, "datasource": ds, "targets": targets,
             "gridPos": {"h": 8, "w": width, "x": x, "y": y},
             "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}
    if ds is TEMPO:
        panel["links"] = [{"title": "Open trace", "url": "/explore?left={\"datasource\":\"otel-dspy-cost-tempo\","
                                                         "\"queries\":[{\"query\":\"${__data.fields.traceID}\"}]}"}]
    return panel


def build() -> dict[str, dict]:
    out = {}
    for uid, (title, panels) in DASHBOARDS.items():
        x = y = 0
        built = []
        for pid, (ptitle, kind, unit, queries, width) in enumerate(panels, start=1):
            if x + width > 24:
                x, y = 0, y + 8
            built.append(_panel(pid, ptitle, kind, unit, queries, width, x, y))
            x += width
        links = [{"title": "otel-dspy-cost", "type": "dashboards", "tags": ["otel-dspy-cost"], "asDropdown": True}]
        out[uid] = {"uid": f"otel-dspy-cost-{uid}", "title": title, "tags": ["otel-dspy-cost"], "schemaVersion": 39,
                    "version": 1, "editable": True, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
                    "templating": {"list": [_variable(n, q) for n, q in VARIABLES]}, "links": links,
                    "panels": built}
    return out


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, dashboard in build().items():
        path = directory / f"{uid}.json"
        path.write_text(json.dumps(dashboard, indent=1) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(__file__).resolve().parent / "dashboards"):
        print(p)
