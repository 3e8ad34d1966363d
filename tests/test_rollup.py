"""The roll-up tree: every span carries the totals of the LM calls below it, across threads and tasks."""

import asyncio
import logging
import threading

import dspy
import pytest
from conftest import MODEL, ResearchAgent, assert_rollups_match, catalog_usd, genai_chat, lm_spans, raw_client
from opentelemetry import context as otel_context
from opentelemetry import trace

import otel_dspy_cost
from otel_dspy_cost import _attributes as A


def test_rollup_nested_program(otel, lm):
    exporter, _ = otel
    with dspy.context(lm=lm):
        ResearchAgent()(question="roll me up")
    assert_rollups_match(exporter)


def test_rollup_evaluate_8_threads(otel, lm):
    exporter, _ = otel
    devset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(16)]
    with dspy.context(lm=lm):
        dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 1, num_threads=8, display_progress=False)(
            ResearchAgent())
    assert_rollups_match(exporter)
    total = otel_dspy_cost.spend_report()["total"]
    assert total["calls"] == 16 * 5
    assert total["usd"] == pytest.approx(sum(s.attributes[A.COST_USD] for s in lm_spans(exporter)))


def test_rollup_async(otel, lm):
    exporter, _ = otel

    async def main():
        with dspy.context(lm=lm):
            await asyncio.gather(*(ResearchAgent().acall(question=f"a{i}") for i in range(3)))

    asyncio.run(main())
    assert_rollups_match(exporter)


def test_processor_bug_is_logged_program_continues(otel, lm, monkeypatch, caplog):
    def broken(self, *a, **k):
        raise RuntimeError("planted processor bug")

    monkeypatch.setattr("otel_dspy_cost.telemetry.rollup.RollupTree.track", broken)
    caplog.set_level(logging.WARNING)
    with otel_dspy_cost.budget(limit_usd=1.0), dspy.context(lm=lm):
        assert ResearchAgent()(question="bug?").answer
    assert "planted processor bug" in caplog.text


# -- the roll-up tree on SDK spans alone: no DSPy call, no server -----------------------------------------------

def _by_name(exporter):
    return {s.name: s for s in exporter.get_finished_spans() if s.name != "chat"}


def test_each_span_carries_the_totals_of_the_lm_calls_below_it_across_threads():
    exporter, tracer, _ = raw_client(unknown_model="warn")
    with tracer.start_as_current_span("root"):
        with tracer.start_as_current_span("a"):
            genai_chat(tracer, (100, 10))
            genai_chat(tracer, (200, 20))
        with tracer.start_as_current_span("b"):
            ctx = otel_context.get_current()
            worker = threading.Thread(target=lambda: (otel_context.attach(ctx), genai_chat(tracer, (400, 40))))
            worker.start()
            worker.join()
    spans = _by_name(exporter)
    assert [spans[name].attributes[A.LM_CALLS] for name in ("a", "b", "root")] == [2, 1, 3]
    root = spans["root"].attributes
    assert (root[A.TOTAL_INPUT_TOKENS], root[A.TOTAL_OUTPUT_TOKENS]) == (700, 70)
    assert spans["root"].attributes[A.TOTAL_USD] == pytest.approx(
        spans["a"].attributes[A.TOTAL_USD] + spans["b"].attributes[A.TOTAL_USD])
    assert spans["a"].attributes[A.TOTAL_USD] == pytest.approx(catalog_usd((300, 30)))


def test_a_call_ending_after_its_parent_rolls_up_to_the_nearest_open_ancestor():
    exporter, tracer, _ = raw_client(unknown_model="warn")
    with tracer.start_as_current_span("root"):
        parent = tracer.start_span("parent")
        straggler = tracer.start_span("chat", context=trace.set_span_in_context(parent), attributes={
            A.GEN_AI_OPERATION: "chat", A.GEN_AI_REQUEST_MODEL: MODEL})
        parent.end()  # e.g. a worker thread still running when the caller's span closed
        straggler.set_attributes({A.GEN_AI_INPUT_TOKENS: 50, A.GEN_AI_OUTPUT_TOKENS: 5})
        straggler.end()
    spans = _by_name(exporter)
    assert A.LM_CALLS not in spans["parent"].attributes
    assert spans["root"].attributes[A.LM_CALLS] == 1 and spans["root"].attributes[A.TOTAL_INPUT_TOKENS] == 50


def test_an_unpriced_call_is_counted_as_unknown_never_as_free_money():
    exporter, tracer, _ = raw_client(unknown_model="warn")
    with tracer.start_as_current_span("root"):
        genai_chat(tracer, (100, 10), model="openai/no-such-model-anywhere")
        genai_chat(tracer, (100, 10))
    root = _by_name(exporter)["root"]
    assert root.attributes[A.LM_CALLS] == 2 and root.attributes[A.TOTAL_UNKNOWN_CALLS] == 1
