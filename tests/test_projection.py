"""A compile's final spend projected while it runs (optimizers/projection.py): on the budget, the compile and
trial summary spans and a metric; `budget(stop_on_projection=True)` stops a compile that cannot fit."""

import inspect

import dspy
import pytest
from conftest import MODEL, metric_points

import otel_dspy_cost
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.errors import ProjectedOverrunError
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer


def _data(n, prefix):
    return [dspy.Example(question=f"{prefix} {i} about the cost of things", answer="a").with_inputs("question")
            for i in range(n)]


def _mipro(lm):
    optimizer = dspy.MIPROv2(metric=lambda e, p, t=None: float(len(p.answer) % 3 == 0), auto="light",
                             num_threads=2, verbose=False, prompt_model=lm, task_model=lm)
    kwargs = ({"requires_permission_to_run": False}
              if "requires_permission_to_run" in inspect.signature(optimizer.compile).parameters else {})
    return optimizer, {"trainset": _data(10, "t"), "valset": _data(8, "v"), **kwargs}


@pytest.fixture
def varied():
    """The simulator answering at varied length (0-150 words more a field), as real models do."""
    with SimulatorServer(SimulatedLM(answer_words=(0, 150))) as srv:
        yield dspy.LM(MODEL, api_base=srv.api_base, api_key="sk-test-not-a-real-key-000", cache=False,
                      max_tokens=256, num_retries=0)


def test_a_miprov2_light_projection_is_within_25_percent_of_the_final_spend_by_half_way(otel_metrics, varied):
    exporter, reader = otel_metrics
    optimizer, kwargs = _mipro(varied)
    from otel_dspy_cost.cli.demo import demo_program

    with dspy.context(lm=varied), otel_dspy_cost.budget(label="projected") as b:
        optimizer.compile(demo_program(), **kwargs)
    final = b.spent_usd
    spans = exporter.get_finished_spans()
    trials = sorted((s.attributes[A.OPTIMIZER_TRIAL], s.attributes.get(A.OPTIMIZER_PROJECTED_USD)) for s in spans
                    if s.attributes.get(A.SPAN_KIND) == "trial_summary")
    planned = len(trials)
    assert planned >= 10 and all(p is not None for n, p in trials if n > 1)
    for number, projected in trials:
        if number >= planned / 2:
            assert abs(projected / final - 1) <= 0.25, (number, projected, final)
    # the last projection is the final spend; it is on the budget, the compile span and the gauge
    assert b.projected_usd == pytest.approx(final, rel=1e-6)
    (compile_span,) = [s for s in spans if s.attributes.get(A.SPAN_KIND) == "compile" and s.parent is None]
    assert compile_span.attributes[A.OPTIMIZER_PROJECTED_USD] == pytest.approx(final, rel=1e-6)
    gauge = metric_points(reader)["dspy.optimizer.projected_cost"]
    assert [(attrs, p.value) for attrs, p in gauge] == [({A.OPTIMIZER_NAME: "MIPROv2"}, pytest.approx(final))]


def test_stop_on_projection_stops_a_compile_that_cannot_fit_before_it_spends_the_cap(otel, varied):
    optimizer, kwargs = _mipro(varied)
    from otel_dspy_cost.cli.demo import demo_program

    guard = otel_dspy_cost.budget(limit_usd=0.3, label="cannot-fit", stop_on_projection=True)
    with dspy.context(lm=varied):
        result = otel_dspy_cost.guarded_compile(optimizer, demo_program(), budget=guard, **kwargs)
    assert result.cut_short and result.reason == "projected_overrun"
    assert isinstance(result.error, ProjectedOverrunError) and result.error.projected_usd > 0.3
    # stopped between trials, well before the cap: the run would have cost about twice it
    assert result.spent_usd < 0.3 * 0.75 and guard.projected_usd > 0.3
    assert result.program is not None and result.best_score is not None
    assert "stop_on_projection=True" in str(result.error)


def test_without_stop_on_projection_a_projection_only_informs(otel, varied):
    optimizer, kwargs = _mipro(varied)
    from otel_dspy_cost.cli.demo import demo_program

    with dspy.context(lm=varied):
        result = otel_dspy_cost.guarded_compile(optimizer, demo_program(), budget=otel_dspy_cost.budget(
            limit_usd=0.3, label="informed"), **kwargs)
    # the budget's own stop, at the cap: no early stop without the opt-in
    assert result.reason == "budget_exceeded" and result.spent_usd > 0.3 * 0.9


def test_stop_on_projection_is_checked_where_given():
    with pytest.raises(TypeError, match="stop_on_projection must be True or False"):
        otel_dspy_cost.budget(limit_usd=1.0, stop_on_projection="yes")


def test_a_gepa_projection_follows_its_metric_call_budget(otel, varied):
    exporter, _ = otel
    optimizer = dspy.GEPA(metric=lambda g, p, t=None, pn=None, pt=None: dspy.Prediction(score=0.5, feedback="x"),
                          max_metric_calls=40, reflection_lm=varied, num_threads=2)
    from otel_dspy_cost.cli.demo import demo_program

    with dspy.context(lm=varied), otel_dspy_cost.budget(label="gepa-projected") as b:
        optimizer.compile(demo_program(), trainset=_data(4, "t"), valset=_data(4, "v"))
    projected = [s.attributes[A.OPTIMIZER_PROJECTED_USD] for s in sorted(
        exporter.get_finished_spans(), key=lambda s: s.start_time)
        if s.attributes.get(A.SPAN_KIND) == "trial_summary" and A.OPTIMIZER_PROJECTED_USD in s.attributes]
    assert len(projected) >= 3
    assert abs(projected[-1] / b.spent_usd - 1) <= 0.25, (projected, b.spent_usd)
    assert b.projected_usd == projected[-1]
