"""OTEL_METRICS_EXPORTER, honoured by plain `instrument()` in a fresh process (the SDK's global providers are set
once per process): prometheus serves a scrape endpoint, console prints, none and bogus values are said."""

import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import free_port

SCRIPT = textwrap.dedent("""
    import os, sys, urllib.request
    import dspy, otel_dspy_cost
    from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer
    otel_dspy_cost.instrument()
    with SimulatorServer(SimulatedLM()) as srv:
        lm = dspy.LM("openai/gpt-4o-mini", api_base=srv.api_base, api_key="sk-x", cache=False, max_tokens=64)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="hi")
    port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT")
    if os.environ.get("SCRAPE"):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        print("\\n".join(line for line in body.splitlines() if line.startswith("dspy_")))
    """)


def _run(**env):
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean.update(LITELLM_LOCAL_MODEL_COST_MAP="True", OTEL_TRACES_EXPORTER="none", **env)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=clean, capture_output=True, text=True, timeout=120)


def test_prometheus_serves_our_metrics_on_the_configured_port():
    port = free_port()
    out = _run(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
               OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1", SCRAPE="1")
    assert out.returncode == 0, out.stderr
    calls = [line for line in out.stdout.splitlines() if line.startswith("dspy_lm_calls") and " 1.0" in line]
    assert calls, out.stdout
    assert any(line.startswith("dspy_cost_USD_total") for line in out.stdout.splitlines()), out.stdout


def test_prometheus_port_taken_is_one_warning_and_the_program_runs():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
                   OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1")
    assert out.returncode == 0
    assert out.stderr.count("cannot serve Prometheus metrics on 127.0.0.1") == 1, out.stderr


def test_console_prints_our_metrics_at_exit():
    out = _run(OTEL_METRICS_EXPORTER="console")
    assert out.returncode == 0, out.stderr
    assert '"name": "dspy.lm.calls"' in out.stdout


@pytest.mark.parametrize("value, said", [("none", None), ("promethus", "OTEL_METRICS_EXPORTER=promethus is not one of"),
                                         ("otlp", "OTEL_METRICS_EXPORTER=otlp but no OTEL_EXPORTER_OTLP_ENDPOINT")])
def test_none_is_silent_and_mistakes_are_said_once(value, said):
    out = _run(OTEL_METRICS_EXPORTER=value)
    assert out.returncode == 0, out.stderr
    assert "dspy.lm.calls" not in out.stdout
    if said is None:
        assert "otel-dspy-cost" not in out.stderr, out.stderr
    else:
        assert out.stderr.count(said) == 1, out.stderr
