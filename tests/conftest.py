"""Fixtures: a real OpenTelemetry SDK pipeline and a real OpenAI-compatible HTTP server on 127.0.0.1."""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dspy-cache-"))
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
# Never read or write the developer's own ~/.config/otel-dspy-cost/pricing.json from tests.
os.environ["OTEL_DSPY_COST_USER_CATALOG"] = os.path.join(tempfile.mkdtemp(prefix="user-catalog-"), "pricing.json")

import dspy  # noqa: E402
import pytest  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import otel_dspy_cost  # noqa: E402
from otel_dspy_cost import _attributes as A  # noqa: E402
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer  # noqa: E402

MODEL = "openai/gpt-4o-mini"
# A string signature is parsed with ast.parse, which on CPython before 3.11.8 can raise "SystemError: AST
# constructor recursion depth mismatch" when threads parse at once (python/cpython#106905; this machine has
# 3.11.7). Tests that build predictors inside threads use this one parsed signature.
QA = dspy.Signature("question -> answer")


@pytest.fixture
def server():
    with SimulatorServer(SimulatedLM()) as srv:
        yield srv


@pytest.fixture
def otel():
    """instrument() on a fresh SDK provider; yields (exporter, provider); uninstruments after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
    yield exporter, provider
    _let_abandoned_workers_finish()
    otel_dspy_cost.uninstrument()


def free_port():
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _let_abandoned_workers_finish(timeout_s=5.0):
    """After a budget stop, DSPy's pool runs the queued examples anyway (refused at once while instrumented).
    Uninstrumenting under them would let them call the provider unbudgeted, into the next test: wait for them."""
    import threading
    import time

    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith("ThreadPoolExecutor") and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture
def otel_metrics():
    """instrument() with a real SDK MeterProvider read in memory; yields (span exporter, metric reader)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader]),
                              unknown_model="warn")
    yield exporter, reader
    otel_dspy_cost.uninstrument()


def metric_points(reader):
    """{metric name: [(attributes dict, point)]} from one collection."""
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend((dict(p.attributes), p) for p in metric.data.data_points)
    return out


@pytest.fixture
def lm(server):
    return dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-not-a-real-key-000", cache=False,
                   max_tokens=512, num_retries=0)


def search(query: str) -> str:
    """Looks a topic up and returns what it found."""
    return f"notes about {query}"


class ResearchAgent(dspy.Module):
    def __init__(self):
        super().__init__()
        self.planner = dspy.ChainOfThought("question -> plan")
        self.searcher = dspy.ReAct("plan -> findings", tools=[search], max_iters=3)
        self.synthesizer = dspy.Predict("question, findings -> answer")

    def forward(self, question):
        plan = self.planner(question=question).plan
        findings = self.searcher(plan=plan).findings
        return self.synthesizer(question=question, findings=findings)

    async def aforward(self, question):
        plan = (await self.planner.acall(question=question)).plan
        findings = (await self.searcher.acall(plan=plan)).findings
        return await self.synthesizer.acall(question=question, findings=findings)


def tree(spans):
    """{span_id: span} and a list of (name, parent name) pairs in end order."""
    by_id = {s.context.span_id: s for s in spans}
    return by_id, [(s.name, by_id[s.parent.span_id].name if s.parent and s.parent.span_id in by_id else None)
                   for s in spans]


def lm_spans(exporter):
    return [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"
            and not s.attributes.get(A.BUDGET_REFUSED)]


def assert_rollups_match(exporter):
    """Every span's roll-up equals the sum of the LM spans below it."""
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    below: dict[int, list] = {s.context.span_id: [] for s in spans}
    for s in spans:
        if s.attributes.get(A.SPAN_KIND) != "lm":
            continue
        parent = by_id.get(s.parent.span_id) if s.parent else None
        while parent is not None:
            below[parent.context.span_id].append(s)
            parent = by_id.get(parent.parent.span_id) if parent.parent else None
    checked = 0
    for s in spans:
        lms = below[s.context.span_id]
        if not lms:
            continue
        checked += 1
        assert s.attributes[A.LM_CALLS] == len(lms), s.name
        assert s.attributes[A.TOTAL_USD] == pytest.approx(sum(x.attributes[A.COST_USD] for x in lms)), s.name
        assert s.attributes[A.TOTAL_ECONOMIC_USD] == pytest.approx(
            sum(x.attributes[A.COST_ECONOMIC_USD] for x in lms))
        assert s.attributes[A.TOTAL_INPUT_TOKENS] == sum(x.attributes[A.GEN_AI_INPUT_TOKENS] for x in lms)
        assert s.attributes[A.TOTAL_OUTPUT_TOKENS] == sum(x.attributes[A.GEN_AI_OUTPUT_TOKENS] for x in lms)
    assert checked > 0


def examples(n, prefix="q"):
    """`n` training examples of one question each, as the artifact and estimate tests use them."""
    return [dspy.Example(question=f"{prefix} {i} about the cost of things", answer="a").with_inputs("question")
            for i in range(n)]


def run_cli(*args, env=None):
    """The `otel-dspy-cost` command in a child process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def raw_client(**engine_options):
    """(exporter, tracer, gate): a provider with our processor and no instrument(), and the tracer of a raw
    LM client's own instrumentation, for the roll-up tree and the budget gate on SDK spans alone."""
    from otel_dspy_cost.pricing.engine import CostEngine
    from otel_dspy_cost.pricing.resolver import PricingResolver

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    gate = otel_dspy_cost.BudgetSpanProcessor(CostEngine(PricingResolver(), **engine_options))
    provider.add_span_processor(gate)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("a-raw-client"), gate


def genai_chat(tracer, usage, model=MODEL, max_tokens=None):
    """One LM call as a GenAI `chat` span of that client: request attributes at start, usage at the end."""
    attributes = {A.GEN_AI_OPERATION: "chat", A.GEN_AI_REQUEST_MODEL: model}
    if max_tokens is not None:
        attributes[A.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    with tracer.start_as_current_span("chat", attributes=attributes) as span:
        span.set_attributes({A.GEN_AI_INPUT_TOKENS: usage[0], A.GEN_AI_OUTPUT_TOKENS: usage[1]})


def catalog_usd(usage, model=MODEL):
    """(input, output) tokens at the shipped catalog's standard rates (USD per 1M tokens)."""
    rates = otel_dspy_cost.pricing.lookup(model).standard_rates
    return (usage[0] * rates.input + usage[1] * rates.output) / 1e6
