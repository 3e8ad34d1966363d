"""Other instrumentations' LM spans: the budget gate counts and stops them, and each call is counted once."""

import dspy
import pytest
from conftest import MODEL, ResearchAgent, catalog_usd, genai_chat, raw_client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_dspy_cost
from otel_dspy_cost import BudgetExceededError, UnpricedModelError
from otel_dspy_cost import _attributes as A


def test_budgets_lm_spans_of_the_official_genai_instrumentation(server):
    """LM spans made by opentelemetry-instrumentation-genai-dspy (no cost on them) are priced and budgeted,
    and with both instrumentations on, each call counts once."""
    pytest.importorskip("opentelemetry.instrumentation.genai.dspy")
    from opentelemetry.instrumentation.genai.dspy import DSPyInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_dspy_cost.pricing.engine import CostEngine
    from otel_dspy_cost.pricing.resolver import PricingResolver

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    processor = otel_dspy_cost.BudgetSpanProcessor(CostEngine(PricingResolver(), unknown_model="warn"))
    provider.add_span_processor(processor)
    official = DSPyInstrumentor()
    official.instrument(tracer_provider=provider)
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="x", cache=False, max_tokens=128, num_retries=0)
    try:
        with pytest.raises(BudgetExceededError):
            with otel_dspy_cost.budget(limit_usd=1.0, max_calls=4, label="foreign") as b, dspy.context(lm=lm):
                for _ in range(20):
                    dspy.Predict("question -> answer")(question="foreign spans")
        assert b.call_count == server.count == 4
        assert b.spent_usd > 0
        # budget() without instrument() switched our accounting on: it counts each call once, and the gate
        # gives the foreign LM spans' calls to it instead of counting them a second time
        assert otel_dspy_cost.spend_report()["total"]["calls"] == server.count
        assert processor.aggregator.snapshot()["total"]["calls"] == 0
        # and with ours on as well, still one count per call
        otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
        before = server.count
        with otel_dspy_cost.budget(limit_usd=1.0, label="both") as both, dspy.context(lm=lm):
            for _ in range(3):
                dspy.Predict("question -> answer")(question="both on")
        assert server.count - before == 3 == both.call_count
        lm_like = [s for s in exporter.get_finished_spans() if s.attributes.get(A.GEN_AI_OPERATION) == "chat"]
        assert len(lm_like) > 3  # two spans per call exist, counted once
    finally:
        otel_dspy_cost.uninstrument()
        official.uninstrument()


def test_openinference_alongside_ours_counts_each_call_once(otel, server):
    """openinference-instrumentation-dspy on the same provider (its LLM spans use its own attribute names,
    not the GenAI ones): every call is priced, budgeted and rolled up once, from our LM span."""
    pytest.importorskip("openinference.instrumentation.dspy")
    from openinference.instrumentation.dspy import DSPyInstrumentor

    exporter, provider = otel
    openinference = DSPyInstrumentor()
    openinference.instrument(tracer_provider=provider)
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-not-a-real-key-000", cache=False,
                 max_tokens=128, num_retries=0)
    try:
        with otel_dspy_cost.budget(limit_usd=1.0, label="with-openinference") as b, dspy.context(lm=lm):
            for i in range(3):
                assert ResearchAgent()(question=f"coexist {i}").answer
        spans = exporter.get_finished_spans()
        theirs = [s for s in spans if s.instrumentation_scope.name != A.SCOPE_NAME]
        ours_lm = [s for s in spans if s.attributes.get(A.SPAN_KIND) == "lm"]
        assert theirs, "OpenInference made no spans: the test would prove nothing"
        assert any(s.attributes.get("openinference.span.kind") == "LLM" for s in theirs)
        assert b.call_count == len(ours_lm) == server.count
        assert b.spent_usd == pytest.approx(sum(s.attributes[A.COST_USD] for s in ours_lm), rel=1e-9)
        roots = [s for s in spans if s.attributes.get(A.SPAN_KIND) == "module" and
                 s.attributes.get(A.MODULE_PATH) == "ResearchAgent"]
        assert len(roots) == 3 and sum(s.attributes[A.LM_CALLS] for s in roots) == server.count
    finally:
        openinference.uninstrument()


def test_foreign_lm_spans_are_budgeted_while_they_record(server):
    """An LM call DSPy does not make (a raw client under another instrumentation) written as GenAI spans:
    the processor's gate reserves and settles it through the same station, inside our budgets."""
    from otel_dspy_cost.pricing.engine import CostEngine
    from otel_dspy_cost.pricing.resolver import PricingResolver

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gate = otel_dspy_cost.BudgetSpanProcessor(CostEngine(PricingResolver(), unknown_model="warn"))
    provider.add_span_processor(gate)
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
    tracer = provider.get_tracer("raw-client-instrumentation")
    made = 0
    try:
        with pytest.raises(BudgetExceededError):
            with otel_dspy_cost.budget(limit_usd=0.001, label="foreign") as b, \
                    tracer.start_as_current_span("user request"):
                for _ in range(100):
                    with tracer.start_as_current_span("chat gpt-4o-mini", attributes={
                            A.GEN_AI_OPERATION: "chat", A.GEN_AI_REQUEST_MODEL: MODEL,
                            A.GEN_AI_REQUEST_MAX_TOKENS: 256}) as span:
                        made += 1
                        span.set_attributes({A.GEN_AI_INPUT_TOKENS: 100, A.GEN_AI_OUTPUT_TOKENS: 200})
        assert 0 < b.call_count == made and b.spent_usd <= 0.001
        # the roll-up tree put the settled calls on the user's span around them
        (request,) = [s for s in exporter.get_finished_spans() if s.name == "user request"]
        assert request.attributes[A.LM_CALLS] == made
        assert request.attributes[A.TOTAL_USD] == pytest.approx(b.spent_usd)
    finally:
        otel_dspy_cost.uninstrument()


# -- the budget gate on SDK spans alone: no DSPy call, no server, only a tracer and our processor -------------

def test_the_gate_reserves_the_worst_case_and_settles_the_actual_cost():
    exporter, tracer, gate = raw_client()
    try:
        with otel_dspy_cost.budget(limit_usd=1.0, label="gate-settle") as b:
            genai_chat(tracer, (100, 50), max_tokens=256)
            assert b.spent_usd == pytest.approx(catalog_usd((100, 50)))  # the actual usage, not the reservation
            assert b.call_count == 1 and gate.accountant.wait_idle(0)  # nothing left reserved or in flight
            # A foreign span says nothing of its prompt's size when it starts: the reservation is its output
            # bound (max_tokens at the output rate), 256 tokens here, of which 50 were billed.
            assert b.max_reserved_usd == pytest.approx(catalog_usd((0, 256)))
    finally:
        otel_dspy_cost.uninstrument()


def test_the_gate_refuses_a_call_whose_worst_case_does_not_fit_before_it_is_made():
    exporter, tracer, gate = raw_client()
    worst = catalog_usd((0, 4096))  # the output bound alone, at the output rate
    try:
        with otel_dspy_cost.budget(limit_usd=worst * 0.5, label="gate-refuse") as b:
            with pytest.raises(BudgetExceededError) as stop:
                genai_chat(tracer, (100, 200), max_tokens=4096)
        assert stop.value.label == "gate-refuse" and stop.value.requested_usd >= worst
        assert b.spent_usd == 0 and b.call_count == 0
        (refused,) = exporter.get_finished_spans()  # closed at once, marked, still exported
        assert refused.attributes[A.BUDGET_REFUSED] is True and refused.status.status_code.name == "ERROR"
    finally:
        otel_dspy_cost.uninstrument()


def test_the_gate_refuses_an_unpriced_model_under_a_usd_budget():
    exporter, tracer, gate = raw_client(unknown_model="warn")
    try:
        with otel_dspy_cost.budget(limit_usd=1.0, label="gate-unpriced") as b:
            with pytest.raises(UnpricedModelError):
                genai_chat(tracer, (100, 200), model="openai/no-such-model-anywhere", max_tokens=256)
        assert b.call_count == 0 and b.spent_usd == 0
    finally:
        otel_dspy_cost.uninstrument()


def test_nested_lm_spans_of_one_call_count_once_at_the_outermost():
    exporter, tracer, gate = raw_client()
    try:
        with otel_dspy_cost.budget(limit_usd=1.0, label="gate-nested") as b:
            with tracer.start_as_current_span("request"):
                with tracer.start_as_current_span("chat outer", attributes={
                        A.GEN_AI_OPERATION: "chat", A.GEN_AI_REQUEST_MODEL: MODEL, A.GEN_AI_REQUEST_MAX_TOKENS: 64}) \
                        as outer:
                    genai_chat(tracer, (10, 20), max_tokens=256)  # a client library's own span inside the framework's
                    outer.set_attributes({A.GEN_AI_INPUT_TOKENS: 10, A.GEN_AI_OUTPUT_TOKENS: 20})
        assert b.call_count == 1 and b.spent_usd == pytest.approx(catalog_usd((10, 20)))
        (request,) = [s for s in exporter.get_finished_spans() if s.name == "request"]
        assert request.attributes[A.LM_CALLS] == 1
    finally:
        otel_dspy_cost.uninstrument()
