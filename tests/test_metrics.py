"""Cost metrics from the library itself: counted once per call, bounded labels, the GenAI histograms."""

import subprocess
import sys

import dspy
import pytest
from conftest import MODEL, ResearchAgent, lm_spans
from opentelemetry.sdk.trace import TracerProvider

import otel_dspy_cost
from otel_dspy_cost import _attributes as A

_LATE_GLOBAL_METRICS = r"""
import os
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import dspy
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
import otel_dspy_cost
from otel_dspy_cost.simulator import SimulatorServer

with SimulatorServer() as server:
    otel_dspy_cost.instrument(tracer_provider=TracerProvider())  # no meter provider anywhere yet
    dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", api_base=server.api_base, api_key="sk-test", cache=False))
    qa = dspy.Predict("question -> answer")
    qa(question="before any meter provider")
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    qa(question="one")
    qa(question="two")
    data = reader.get_metrics_data()
    points = {m.name: m.data.data_points for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics}
    print("calls", sum(p.value for p in points["dspy.lm.calls"]))
    print("token_records", sum(p.count for p in points["gen_ai.client.token.usage"]))
    print("requests", server.count)
"""


def test_metrics_count_each_call_once_and_the_warn_crossing(otel_metrics, lm):
    from conftest import metric_points

    exporter, reader = otel_metrics
    with otel_dspy_cost.budget(limit_usd=0.0004, warn_at=0.5, action="warn", label="nightly") as b, \
            dspy.context(lm=lm):
        for i in range(4):
            ResearchAgent()(question=f"metric {i}")
    points = metric_points(reader)
    spans = lm_spans(exporter)
    assert b.call_count == len(spans) == 20 and b.status == "exceeded"
    cost = points["dspy.cost"]
    assert sum(p.value for _, p in cost) == pytest.approx(b.spent_usd)
    assert {a[A.MODULE_PATH] for a, _ in cost} == {"ResearchAgent.planner", "ResearchAgent.searcher",
                                                   "ResearchAgent.synthesizer"}
    assert {(a[A.BUDGET_LABEL], a[A.PHASE], a[A.LM_MODEL]) for a, _ in cost} == {
        ("nightly", "infer", MODEL)}
    assert sum(p.value for _, p in points["dspy.lm.calls"]) == 20
    assert sum(p.value for _, p in points["dspy.cost.economic"]) == pytest.approx(b.economic_usd)
    tokens = {a["gen_ai.token.type"]: p for a, p in points["gen_ai.client.token.usage"]}
    assert tokens["input"].sum == sum(s.attributes[A.GEN_AI_INPUT_TOKENS] for s in spans)
    assert tokens["output"].count == 20 and points["gen_ai.client.operation.duration"][0][1].count == 20
    events = {a["dspy.budget.event"]: p.value for a, p in points["dspy.budget.events"]}
    assert events == {"warn": 1, "exceeded": 1}
    gauges = {name: points[name][0] for name in ("dspy.budget.spent", "dspy.budget.limit",
                                                  "dspy.budget.utilization", "dspy.budget.warn_threshold")}
    assert all(a == {A.BUDGET_LABEL: "nightly"} for a, _ in gauges.values())
    assert gauges["dspy.budget.spent"][1].value == pytest.approx(b.spent_usd)
    assert gauges["dspy.budget.utilization"][1].value == pytest.approx(b.spent_usd / 0.0004)
    assert (gauges["dspy.budget.limit"][1].value, gauges["dspy.budget.warn_threshold"][1].value) == (0.0004, 0.5)


def test_metric_labels_stay_bounded():
    from conftest import metric_points
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_dspy_cost.telemetry.metrics import OVERFLOW, CostMetrics

    reader = InMemoryMetricReader()
    m = CostMetrics.create(MeterProvider(metric_readers=[reader]), max_label_values=5)
    for i in range(50):
        m.record_call(module=f"Prog.step{i}.inner.deep", model=f"openai/m{i}", provider="openai", operation="chat",
                      phase="infer", budget_label=f"req-{i}", optimizer="", usd=0.01, economic_usd=0.01,
                      input_tokens=1, output_tokens=1, cache_hit=False, unknown=False, duration_s=0.1)
    cost = metric_points(reader)["dspy.cost"]
    assert len(cost) == 6 and sum(p.value for _, p in cost) == pytest.approx(0.5)
    assert {a[A.MODULE_PATH] for a, _ in cost} == {f"Prog.step{i}" for i in range(5)} | {OVERFLOW}


def test_metrics_follow_a_global_meter_provider_set_after_instrument(tmp_path):
    """No meter provider at instrument(): per-call metric work is skipped; once the app sets a global
    MeterProvider the same instruments report, from then on."""
    script = tmp_path / "late.py"
    script.write_text(_LATE_GLOBAL_METRICS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OTEL_DSPY_COST_UNKNOWN_MODEL": "warn"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split() for line in out.stdout.splitlines() if line.split()[0] in
                 ("calls", "token_records", "requests"))
    assert lines == {"calls": "2", "token_records": "4", "requests": "3"}, out.stdout


def test_genai_histograms_are_recorded_at_collection_with_the_calls_exemplars(otel_metrics, server):
    """An LM call only buffers its histogram values; a collection records them into the SDK instruments
    (cumulative across collections), each with its LM span as context, so exemplars point at the call."""
    from conftest import metric_points

    exporter, reader = otel_metrics
    lm_ = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x", cache=False, max_tokens=64, num_retries=0)
    with dspy.context(lm=lm_):
        for i in range(3):
            dspy.Predict("question -> answer")(question=f"histogram {i}")
        points = metric_points(reader)
        dspy.Predict("question -> answer")(question="after the first collection")
    tokens = {a["gen_ai.token.type"]: p for a, p in points["gen_ai.client.token.usage"]}
    assert tokens["input"].count == 3 and tokens["output"].count == 3
    lm = [s for s in exporter.get_finished_spans() if s.attributes.get("dspy.span.kind") == "lm"]
    assert tokens["input"].sum == sum(s.attributes["gen_ai.usage.input_tokens"] for s in lm[:3])
    lm_spans = {s.context.span_id for s in lm}
    exemplar_spans = {e.span_id for _, p in points["gen_ai.client.token.usage"] for e in p.exemplars}
    assert exemplar_spans and exemplar_spans <= lm_spans
    again = metric_points(reader)
    assert {a["gen_ai.token.type"]: p.count for a, p in again["gen_ai.client.token.usage"]} == {"input": 4, "output": 4}
    assert again["gen_ai.client.operation.duration"][0][1].count == 4


def test_genai_histogram_values_past_the_buffer_are_recorded_as_they_come(otel_metrics, server, monkeypatch):
    from conftest import metric_points

    from otel_dspy_cost.telemetry import metrics as _metrics

    monkeypatch.setattr(_metrics, "_MAX_PENDING", 2)  # nothing collects for longer than the buffer holds
    _, reader = otel_metrics
    lm_ = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x", cache=False, max_tokens=64, num_retries=0)
    with dspy.context(lm=lm_):
        for i in range(5):
            dspy.Predict("question -> answer")(question=f"overflow {i}")
    counts = {a["gen_ai.token.type"]: p.count for a, p in metric_points(reader)["gen_ai.client.token.usage"]}
    assert counts == {"input": 5, "output": 5}  # none lost, none twice


def test_genai_histograms_can_be_turned_off(server):
    from conftest import metric_points
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=TracerProvider(), meter_provider=MeterProvider(metric_readers=[reader]),
                              unknown_model="warn", genai_metrics=False)
    try:
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x", cache=False, max_tokens=64, num_retries=0)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="no histograms")
        points = metric_points(reader)
        assert "gen_ai.client.token.usage" not in points and "gen_ai.client.operation.duration" not in points
        assert sum(p.value for _, p in points["dspy.lm.calls"]) == 1  # the cost metrics stay
        with pytest.raises(ValueError, match="did you mean 'genai_metrics'"):
            otel_dspy_cost.instrument(genai_metric=False)
    finally:
        otel_dspy_cost.uninstrument()
