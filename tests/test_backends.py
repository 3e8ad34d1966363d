"""A real MLflow tracking server and a real Phoenix server (PyPI packages, in the venvs `tests/run-all.sh` makes
under $OTEL_DSPY_COST_BACKENDS) receive a small compile over standard OTLP/HTTP, with a 10x price
override, and show our spans, kinds, sessions and cost; Phoenix's own cost equals ours after
`pricing export-phoenix`."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dspy
import pytest
from conftest import MODEL, free_port, run_cli
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_dspy_cost
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.pricing.catalog import USER_CATALOG_ENV

BACKENDS = os.environ.get("OTEL_DSPY_COST_BACKENDS")  # mlflow/ and phoenix/ venvs
pytestmark = pytest.mark.skipif(not BACKENDS, reason="OTEL_DSPY_COST_BACKENDS unset: tests/run-all.sh sets it")
OVERRIDE = {MODEL: {"input": 1.5, "output": 6.0}}  # 10x gpt-4o-mini's list price: no backend's own list has it


def _wait(url, proc, log, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {Path(log).read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout_s}s: {Path(log).read_text()[-2000:]}")


def _server(argv, health, tmp, env=None):
    log = tmp / "server.log"
    proc = subprocess.Popen(argv, cwd=tmp, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        _wait(health, proc, log)
    except BaseException:
        proc.kill()
        raise
    return proc


def _json(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = _server([str(Path(BACKENDS) / "mlflow" / "bin" / "mlflow"), "server", "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db"],
                   f"http://127.0.0.1:{port}/health", tmp)
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def phoenix_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phoenix")
    port = free_port()
    proc = _server([str(Path(BACKENDS) / "phoenix" / "bin" / "phoenix"), "serve"],
                   f"http://127.0.0.1:{port}/healthz", tmp, {
        "PHOENIX_WORKING_DIR": str(tmp), "PHOENIX_PORT": str(port), "PHOENIX_GRPC_PORT": str(free_port()),
        "PHOENIX_HOST": "127.0.0.1", "PHOENIX_TELEMETRY_ENABLED": "false"})
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, 9)


def _phoenix(url, query):
    body = _json(f"{url}/graphql", {"query": query})
    assert not body.get("errors"), body["errors"]
    return body["data"]


def _phoenix_spans(url, project):
    data = _phoenix(url, """{ projects { edges { node { name spans(first: 1000) { edges { node {
        name spanKind context { traceId spanId } attributes costSummary { total { cost } }
        trace { session { sessionId } } } } } } } } }""")
    nodes = [e["node"] for e in data["projects"]["edges"] if e["node"]["name"] == project]
    assert len(nodes) == 1, f"no project {project} yet"  # made by the first span Phoenix stores
    return [e["node"] for e in nodes[0]["spans"]["edges"]]


def _send(project, endpoints, program, **instrument):
    """instrument() on a provider exporting over OTLP/HTTP to every endpoint (and to memory), run `program`."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "backends-test",
                                                        "openinference.project.name": project}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for endpoint, headers in endpoints:
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, headers=headers)))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, **instrument)
    try:
        program()
    finally:
        otel_dspy_cost.uninstrument()
        provider.shutdown()
    return memory.get_finished_spans()


def _metric(example, pred, trace=None):
    return float(len(pred.answer) % 3 == 0)


def _data(n, prefix):
    return [dspy.Example(question=f"{prefix} {i}", answer="a").with_inputs("question") for i in range(n)]


def _compile(lm):
    optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=_metric, max_bootstrapped_demos=1, max_labeled_demos=1,
                                                      num_candidate_programs=1, num_threads=1)
    with dspy.context(lm=lm):
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=_data(3, "q"), valset=_data(2, "v"))


def _otlp_value(value):
    """An OTLP AnyValue as MLflow's REST API returns it, as a Python value."""
    (kind, v), = value.items()
    if kind == "kvlist_value":
        return {x["key"]: _otlp_value(x["value"]) for x in v.get("values", [])}
    if kind == "array_value":
        return [_otlp_value(x) for x in v.get("values", [])]
    return int(v) if kind == "int_value" else v


def _hex(trace_id):
    return f"{trace_id:032x}"


def _until(check, timeout_s=30):
    """Both servers write what they receive asynchronously: poll until `check` holds (its last error if not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_compile_in_mlflow_and_phoenix(mlflow_url, phoenix_url, lm):
    experiment = _json(f"{mlflow_url}/api/2.0/mlflow/experiments/create", {"name": "compile"})["experiment_id"]
    spans = _send("compile", [(f"{mlflow_url}/v1/traces", {"x-mlflow-experiment-id": experiment}),
                              (f"{phoenix_url}/v1/traces", {})], lambda: _compile(lm),
                  pricing_overrides=OVERRIDE)
    ours = {(_hex(s.context.trace_id), f"{s.context.span_id:016x}"): s for s in spans}
    traces = {}
    for s in spans:
        traces.setdefault(_hex(s.context.trace_id), []).append(s)
    (compile_span,) = [s for s in spans if s.attributes[A.SPAN_KIND] == "compile" and s.parent is None]
    session = _hex(compile_span.context.trace_id)
    trials = [s for s in spans if s.attributes[A.SPAN_KIND] == "trial"]
    assert len(trials) >= 3 and len(traces) == len(trials) + 1

    def mlflow_traces():
        found = _json(f"{mlflow_url}/api/3.0/mlflow/traces/search", {
            "locations": [{"mlflow_experiment": {"experiment_id": experiment}}], "max_results": 100})["traces"]
        assert len(found) == len(traces)
        return found

    for info in _until(mlflow_traces):
        trace_id = info["trace_id"].removeprefix("tr-")
        ours_in_trace = traces[trace_id]
        (root,) = [s for s in ours_in_trace if s.parent is None]
        # every span arrived
        stored = _json(f"{mlflow_url}/api/3.0/mlflow/traces/get?trace_id={info['trace_id']}")["trace"]["spans"]
        assert len(stored) == len(ours_in_trace)
        # each LM span as MLflow stored it (its translation applied): typed, its cost ours to the digit
        for span in stored:
            attrs = {a["key"]: _otlp_value(a["value"]) for a in span["attributes"]}
            if attrs.get(A.SPAN_KIND) == "lm":
                assert attrs["mlflow.spanType"] == "CHAT_MODEL"  # from gen_ai.operation.name=chat
                assert attrs["mlflow.llm.cost"]["total_cost"] == attrs[A.COST_USD] > 0
                assert attrs["mlflow.llm.cost"]["input_cost"] + attrs["mlflow.llm.cost"]["output_cost"] == \
                    pytest.approx(attrs[A.COST_USD], abs=1e-12)
        # MLflow's cost is ours (the override's 10x), not its own list price: the sum of its LM spans' costs
        lm_usd = sum(s.attributes.get(A.COST_USD, 0.0) for s in ours_in_trace if s.attributes[A.SPAN_KIND] == "lm")
        cost = json.loads(info["trace_metadata"]["mlflow.trace.cost"])
        assert cost["total_cost"] == pytest.approx(lm_usd, abs=1e-9) and lm_usd > 0
        # the trace list shows a name, what the trace was and what it cost; a trial's session is its compile's
        assert info["tags"]["mlflow.traceName"] == root.name
        assert json.loads(info["request_preview"])["span.kind"] == root.attributes[A.SPAN_KIND]
        assert json.loads(info["response_preview"])["cost_usd"] == root.attributes[A.TOTAL_USD]
        assert info["trace_metadata"]["mlflow.trace.session"] == session

    def phoenix_spans():
        found = _phoenix_spans(phoenix_url, "compile")
        assert len(found) == len(spans)
        return found

    found = _until(phoenix_spans)
    for s in found:
        mine = ours[(s["context"]["traceId"], s["context"]["spanId"])]
        assert s["spanKind"] != "unknown", s["name"]
        assert s["trace"]["session"]["sessionId"] == session, s["name"]
        if mine.attributes[A.SPAN_KIND] == "lm":
            assert s["spanKind"] == "llm"
            attrs = json.loads(s["attributes"])
            assert attrs["llm"]["token_count"]["prompt"] == mine.attributes[A.GEN_AI_INPUT_TOKENS]
    assert {s["spanKind"] for s in found} >= {"chain", "llm", "evaluator"}


def test_phoenix_cost_equals_ours_after_the_price_export(phoenix_url, lm, server, tmp_path, monkeypatch):
    # A model only our catalog knows (added as a user would): Phoenix cannot price it until the export.
    catalog = tmp_path / "pricing.json"
    monkeypatch.setenv(USER_CATALOG_ENV, str(catalog))
    assert run_cli("pricing", "add", "openai/acme-mini", "--input", "2", "--output", "8", "--cached-input", "0.5",
                   "--file", str(catalog)).returncode == 0
    acme = dspy.LM("openai/acme-mini", api_base=server.api_base, api_key="sk-test-not-a-real-key-000", cache=False,
                   max_tokens=256, num_retries=0)

    def run():
        with dspy.context(lm=lm):
            dspy.Evaluate(devset=_data(2, "e"), metric=_metric, num_threads=1)(dspy.Predict("question -> answer"))
        with dspy.context(lm=acme):
            dspy.Predict("question -> answer")(question="x")

    endpoint = [(f"{phoenix_url}/v1/traces", {})]
    before = _send("before", endpoint, run)
    assert sum(s.attributes[A.SPAN_KIND] == "lm" for s in before) == 3
    unpriced = [s for s in _until(lambda: _llm_spans(phoenix_url, "before", 3)) if "acme" in s["name"]]
    assert len(unpriced) == 1 and (unpriced[0]["costSummary"] or {}).get("total", {}).get("cost") in (None, 0)

    out = run_cli("pricing", "export-phoenix", phoenix_url, env={**os.environ, USER_CATALOG_ENV: str(catalog)})
    assert out.returncode == 0, out.stderr
    assert "exported to Phoenix's model store" in out.stdout
    again = run_cli("pricing", "export-phoenix", phoenix_url, "--model", "openai/acme-mini",
                    env={**os.environ, USER_CATALOG_ENV: str(catalog)})
    assert "(0 created, 1 updated" in again.stdout
    time.sleep(6)  # Phoenix reloads its model store every 5 s (phoenix/server/daemons/generative_model_store.py)
    after = _send("after", endpoint, run)
    ours = {f"{s.context.span_id:016x}": s.attributes[A.COST_USD] for s in after if s.attributes[A.SPAN_KIND] == "lm"}
    found = _until(lambda: _llm_spans(phoenix_url, "after", 3, priced=True))
    assert {s["context"]["spanId"]: pytest.approx(s["costSummary"]["total"]["cost"], abs=1e-12) for s in found} == ours
    assert len(ours) == 3 and all(ours.values())


def _llm_spans(url, project, n, priced=False):
    spans = [s for s in _phoenix_spans(url, project) if s["spanKind"] == "llm"]
    assert len(spans) == n
    assert not priced or all(s["costSummary"] is not None for s in spans)
    return spans


def test_export_phoenix_says_what_went_wrong(tmp_path):
    port = free_port()
    out = run_cli("pricing", "export-phoenix", f"http://127.0.0.1:{port}")
    assert out.returncode == 1 and "Connection refused (is Phoenix running there?)" in out.stderr
    out = run_cli("pricing", "export-phoenix", f"http://127.0.0.1:{port}", "--model", "openai/gpt-9")
    assert out.returncode == 2 and "No price known for model 'openai/gpt-9'" in out.stderr


def test_the_backends_venv_is_there():
    """run-all.sh installs the servers: a missing one must fail here, not skip everything above."""
    assert shutil.which("mlflow", path=Path(BACKENDS) / "mlflow" / "bin")
    assert shutil.which("phoenix", path=Path(BACKENDS) / "phoenix" / "bin")


_ENV_RUN = """
import time, dspy, otel_dspy_cost
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer
otel_dspy_cost.instrument()
with SimulatorServer(SimulatedLM()) as srv:
    lm = dspy.LM("openai/gpt-4o-mini", api_base=srv.api_base, api_key="sk-x", cache=False, max_tokens=64)
    with dspy.context(lm=lm):
        for i in range(4):
            dspy.Predict("question -> answer")(question=f"q{i}")
            time.sleep(0.5)  # several metric export intervals pass
print("done", flush=True)
"""


@pytest.mark.parametrize("backend", ["phoenix", "mlflow"])
def test_metrics_to_a_traces_only_backend_are_one_warning_and_traces_still_arrive(backend, request):
    url = request.getfixturevalue(f"{backend}_url")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_METRIC_EXPORT_INTERVAL="200",
               OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name=env-{backend}")
    if backend == "mlflow":
        experiment = _json(f"{url}/api/2.0/mlflow/experiments/create", {"name": "env"})["experiment_id"]
        env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = f"x-mlflow-experiment-id={experiment}"
    out = subprocess.run([sys.executable, "-c", _ENV_RUN], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    assert out.stderr.count("does not take metrics (it looks traces-only") == 1, out.stderr
    assert "Failed to export metrics" not in out.stderr.replace("(Failed to export metrics", "")
    if backend == "phoenix":
        _until(lambda: _llm_spans(url, "env-phoenix", 4))
    else:
        found = _until(lambda: _assert_len(_json(f"{url}/api/3.0/mlflow/traces/search", {
            "locations": [{"mlflow_experiment": {"experiment_id": experiment}}], "max_results": 10})["traces"], 4))
        assert all(json.loads(t["trace_metadata"]["mlflow.trace.cost"])["total_cost"] > 0 for t in found)


def _assert_len(items, n):
    assert len(items) == n
    return items
