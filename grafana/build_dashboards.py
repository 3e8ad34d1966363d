"""Builds the Grafana dashboards in `dashboards/` from the panel table below.

    python grafana/build_dashboards.py          # rewrites grafana/dashboards/*.json

Hand-written rather than with grafana-foundation-sdk: its PyPI releases carry a version epoch that
makes pip pick an old Grafana 10.1 schema, and the JSON here is small. Every PromQL expression lives
in this one table; tests parse each with promtool and evaluate it against a live Prometheus.
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

# (title, kind, unit, [PromQL or ("traceql", query)], width)
DASHBOARDS = {
    "spend-overview": ("otel-dspy-cost: spend overview", [
        ("Total spend", "stat", "currencyUSD", [f"sum(dspy_cost_USD_total{{{SEL}}})"], 6),
        ("Economic cost (uncached list price)", "stat", "currencyUSD",
         [f"sum(dspy_cost_economic_USD_total{{{SEL}}})"], 6),
        ("Cache savings (economic - actual)", "stat", "currencyUSD",
         [f"sum(dspy_cost_economic_USD_total{{{SEL}}}) - sum(dspy_cost_USD_total{{{SEL}}})"], 6),
        ("LM calls", "stat", "short", [f"sum(dspy_lm_calls_total{{{SEL}}})"], 6),
        ("Spend rate (USD per hour)", "timeseries", "currencyUSD",
         [f"sum(rate(dspy_cost_USD_total{{{SEL}}}[$__rate_interval])) * 3600"], 12),
        ("Spend by model", "piechart", "currencyUSD",
         [f"sum by (dspy_lm_model) (dspy_cost_USD_total{{{SEL}}})"], 6),
        ("Spend by phase", "piechart", "currencyUSD", [f"sum by (dspy_phase) (dspy_cost_USD_total{{{SEL}}})"], 6),
        ("Tokens by type", "bargauge", "short",
         ['sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum{gen_ai_token_type!=""})'], 12),
        ("Calls with unknown pricing", "stat", "short",
         [f'sum(dspy_lm_calls_total{{{SEL}, dspy_cost_unknown="true"}}) or vector(0)'], 6),
        ("Cache hit calls", "stat", "short",
         [f'sum(dspy_lm_calls_total{{{SEL}, dspy_cache_hit="true"}}) or vector(0)'], 6),
    ]),
    "attribution": ("otel-dspy-cost: attribution by module", [
        ("Spend by module path", "bargauge", "currencyUSD",
         [f"sum by (dspy_module_path) (dspy_cost_USD_total{{{SEL}}})"], 12),
        ("Share of spend by module path", "piechart", "percentunit",
         [f"sum by (dspy_module_path) (dspy_cost_USD_total{{{SEL}}}) / scalar(sum(dspy_cost_USD_total{{{SEL}}}))"],
         12),
        ("Calls by module path", "bargauge", "short", [f"sum by (dspy_module_path) (dspy_lm_calls_total{{{SEL}}})"],
         12),
        ("Spend by module and model", "table", "currencyUSD",
         [f"sum by (dspy_module_path, dspy_lm_model) (dspy_cost_USD_total{{{SEL}}})"], 12),
    ]),
    "optimizer-runs": ("otel-dspy-cost: optimizer runs", [
        ("Training spend by optimizer", "bargauge", "currencyUSD",
         [f'sum by (dspy_optimizer_name) (dspy_cost_USD_total{{{SEL}, dspy_phase="train"}})'], 12),
        ("Train vs infer spend", "piechart", "currencyUSD",
         [f"sum by (dspy_phase) (dspy_cost_USD_total{{{SEL}}})"], 12),
        ("Trials: cost and score (one trace per trial; click a trace id)", "table", "short",
         [("traceql", TRIALS_TRACEQL)], 24),
    ]),
    "budgets": ("otel-dspy-cost: budgets", [
        ("Utilisation vs warn threshold and limit", "timeseries", "percentunit",
         ['dspy_budget_utilization{dspy_budget_label=~"$budget"}',
          'dspy_budget_warn_threshold{dspy_budget_label=~"$budget"}',
          'dspy_budget_limit_USD{dspy_budget_label=~"$budget"} * 0 + 1'], 24),
        ("Spent", "stat", "currencyUSD", [f"sum by (dspy_budget_label) (dspy_budget_spent_USD{{{BSEL}}})"], 8),
        ("Limit", "stat", "currencyUSD", [f"sum by (dspy_budget_label) (dspy_budget_limit_USD{{{BSEL}}})"], 8),
        ("Budget events (warn, exceeded)", "table", "short",
         ['sum by (dspy_budget_label, dspy_budget_event) (dspy_budget_events_total{dspy_budget_label=~"$budget"})'],
         8),
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
