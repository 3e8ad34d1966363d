"""The OpenInference and MLflow names written beside ours (telemetry/viewers.py), on a real SDK pipeline.

The real MLflow and Phoenix servers read them in tests/test_backends.py; here each rule is checked on every
span of a compile, an evaluation and a plain call, and turned off with `backend_attributes=False`."""

import json

import dspy
import pytest
from conftest import lm_spans

import otel_dspy_cost
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.telemetry import viewers as V


def _metric(example, pred, trace=None):
    return float(len(pred.answer) % 3 == 0)


def _data(n, prefix="q"):
    return [dspy.Example(question=f"{prefix} {i}", answer="a").with_inputs("question") for i in range(n)]


def _compile(lm):
    optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=_metric, max_bootstrapped_demos=2, max_labeled_demos=2,
                                                      num_candidate_programs=2, num_threads=1)
    with dspy.context(lm=lm):
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=_data(4), valset=_data(3, "v"))


def test_every_span_has_a_kind_and_lm_spans_carry_our_cost_under_mlflows_name(otel, lm):
    exporter, _ = otel
    _compile(lm)
    spans = exporter.get_finished_spans()
    kinds = {(s.attributes[A.SPAN_KIND], s.attributes.get(V.OI_KIND)) for s in spans}
    assert {("compile", "CHAIN"), ("trial", "CHAIN"), ("evaluate", "EVALUATOR"), ("predictor", "CHAIN"),
            ("lm", None)} <= kinds
    # LM and tool spans are typed by both backends from gen_ai.operation.name; every other span of ours has a kind
    assert all((V.OI_KIND in s.attributes) != (A.GEN_AI_OPERATION in s.attributes) for s in spans)
    calls = lm_spans(exporter)
    assert calls
    for s in calls:
        a = s.attributes
        assert not any(k.startswith("llm.token_count") or k == "llm.model_name" for k in a)  # not twice
        cost = json.loads(a[V.MLFLOW_COST])
        assert cost["total_cost"] == a[A.COST_USD] > 0
        assert cost["input_cost"] + cost["output_cost"] == pytest.approx(a[A.COST_USD], abs=1e-9)
        assert cost["output_cost"] == pytest.approx(a[A.COST_OUTPUT_USD] + a[A.COST_REASONING_USD], abs=1e-9)


def test_roots_describe_themselves_and_a_compile_shares_its_session_with_its_trials(otel, lm):
    exporter, _ = otel
    _compile(lm)
    spans = exporter.get_finished_spans()
    (compile_span,) = [s for s in spans if s.attributes[A.SPAN_KIND] == "compile" and s.parent is None]
    session = f"{compile_span.context.trace_id:032x}"
    assert compile_span.attributes[V.SESSION_ID] == session
    trials = [s for s in spans if s.attributes[A.SPAN_KIND] == "trial"]
    assert len(trials) >= 3
    for trial in trials:
        a = trial.attributes
        assert trial.parent is None and a[V.SESSION_ID] == session == a[A.OPTIMIZER_COMPILE_TRACE_ID]
        assert a[V.MLFLOW_TRACE_NAME] == trial.name
        described = json.loads(a[V.OI_INPUT])
        assert described["optimizer.trial"] == a[A.OPTIMIZER_TRIAL] and described["span.kind"] == "trial"
        out = json.loads(a[V.OI_OUTPUT])
        assert out == {"cost_usd": a[A.TOTAL_USD], "lm_calls": a[A.LM_CALLS], "input_tokens": a[A.TOTAL_INPUT_TOKENS],
                       "output_tokens": a[A.TOTAL_OUTPUT_TOKENS], "score": a[A.OPTIMIZER_SCORE]}
    # only trace roots are described; no span inside a trace carries a session of another trace
    for s in spans:
        assert (V.OI_INPUT in s.attributes) == (s.parent is None), s.name
        if V.SESSION_ID in s.attributes:
            assert s.attributes[V.SESSION_ID] == session


def test_a_plain_call_and_an_evaluation_outside_a_compile(otel, lm):
    exporter, _ = otel
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="hi")
        dspy.Evaluate(devset=_data(2), metric=_metric, num_threads=1)(dspy.Predict("question -> answer"))
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [r.attributes[A.SPAN_KIND] for r in roots] == ["predictor", "evaluate"]
    call, evaluation = roots
    assert V.SESSION_ID not in call.attributes
    assert json.loads(call.attributes[V.OI_OUTPUT])["lm_calls"] == 1
    assert evaluation.attributes[V.SESSION_ID] == f"{evaluation.context.trace_id:032x}"
    assert json.loads(evaluation.attributes[V.OI_OUTPUT])["score"] == evaluation.attributes[A.EVAL_SCORE]


def test_backend_attributes_false_writes_only_ours(otel, lm):
    exporter, provider = otel
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn", backend_attributes=False)
    _compile(lm)
    for s in exporter.get_finished_spans():
        assert not any(k.startswith(("openinference.", "input.", "output.", "mlflow.", "session."))
                       for k in s.attributes), s.name
    with pytest.raises(ValueError, match="backend_attributes must be True or False"):
        otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn", backend_attributes="yes")
