"""Optimizer runs: phases, LM roles, a span per trial (MIPROv2, BootstrapFewShot, GEPA), guarded_compile."""

import inspect

import dspy
import pytest
from conftest import MODEL

import otel_dspy_cost
from otel_dspy_cost import _attributes as A


def _metric(example, pred, trace=None):
    return float(len(pred.answer) % 3 == 0)


def _data(n, prefix="q"):
    return [dspy.Example(question=f"{prefix} {i}", answer="a").with_inputs("question") for i in range(n)]


def _mipro(lm):
    return dspy.MIPROv2(metric=_metric, auto="light", num_threads=2, verbose=False, prompt_model=lm, task_model=lm)


def _mipro_kwargs(optimizer):
    params = inspect.signature(optimizer.compile).parameters
    return {"requires_permission_to_run": False} if "requires_permission_to_run" in params else {}


def _by_kind(exporter, kind):
    return [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == kind]


def _children(exporter, parent):
    return [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == parent.context.span_id]


def test_miprov2_trials_are_numbered_scored_costed_and_sum_to_the_compile(otel, lm):
    exporter, _ = otel
    train, val = _data(8), _data(6, "val")
    optimizer = _mipro(lm)
    with dspy.context(lm=lm):
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val,
                          **_mipro_kwargs(optimizer))
        dspy.ChainOfThought("question -> answer")(question="after the compile")
    (compile_span,) = [s for s in _by_kind(exporter, "compile") if s.attributes[A.OPTIMIZER_NAME] == "MIPROv2"]
    trials = sorted(_by_kind(exporter, "trial"), key=lambda s: s.attributes[A.OPTIMIZER_TRIAL])
    numbers = [t.attributes[A.OPTIMIZER_TRIAL] for t in trials]
    assert numbers == list(range(2, 2 + len(trials))) and len(trials) >= 5
    for t in trials:
        assert t.parent.span_id == compile_span.context.span_id
        assert isinstance(t.attributes[A.OPTIMIZER_SCORE], float) and t.attributes[A.TOTAL_USD] > 0
        assert t.attributes[A.OPTIMIZER_EVAL] in ("full", "minibatch")
        assert f"{A.OPTIMIZER_PARAM_PREFIX}0_predictor_instruction" in t.attributes
    # Trial 1 is the default program's evaluation, as MIPROv2 numbers it; the stages are spans too.
    children = _children(exporter, compile_span)
    (baseline,) = [c for c in children if c.attributes.get(A.OPTIMIZER_BASELINE)]
    assert baseline.attributes[A.OPTIMIZER_TRIAL] == 1 and A.OPTIMIZER_SCORE in baseline.attributes
    stages = {c.attributes[A.OPTIMIZER_STAGE] for c in children if c.attributes.get(A.SPAN_KIND) == "stage"}
    assert stages == {"bootstrap", "propose_instructions"}
    # Every LM call of the compile sits under one of these children: their costs add up to the compile's.
    assert sum(c.attributes.get(A.TOTAL_USD, 0.0) for c in children) == pytest.approx(
        compile_span.attributes[A.TOTAL_USD])
    assert sum(c.attributes.get(A.LM_CALLS, 0) for c in children) == compile_span.attributes[A.LM_CALLS]
    lm_spans = _by_kind(exporter, "lm")
    train_roles = {s.attributes.get(A.LM_ROLE) for s in lm_spans if s.attributes[A.PHASE] == "train"}
    assert {"teacher", "prompt_model", "task_model"} <= train_roles
    assert [s.attributes[A.PHASE] for s in lm_spans if s.end_time > compile_span.end_time] == ["infer"]
    by_trial = otel_dspy_cost.spend_report(by="trial")
    assert by_trial["MIPROv2#2"]["usd"] == pytest.approx(trials[0].attributes[A.TOTAL_USD])
    phases = otel_dspy_cost.spend_report(by="phase")
    assert phases["train"]["usd"] == pytest.approx(compile_span.attributes[A.TOTAL_USD])
    assert phases["infer"]["calls"] == 1


def test_bootstrap_fewshot_attempts_are_spans_with_success(otel, lm):
    exporter, _ = otel
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=3,
                                      max_labeled_demos=0)
    with dspy.context(lm=lm):
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=_data(6))
    attempts = _by_kind(exporter, "bootstrap")
    assert [a.attributes[A.OPTIMIZER_EXAMPLE] for a in attempts] == [0, 1, 2]
    assert all(a.attributes[A.OPTIMIZER_SUCCESS] is True and a.attributes[A.OPTIMIZER_ROUND] == 0 for a in attempts)
    (compile_span,) = _by_kind(exporter, "compile")
    assert sum(a.attributes[A.TOTAL_USD] for a in attempts) == pytest.approx(compile_span.attributes[A.TOTAL_USD])
    assert {s.attributes.get(A.LM_ROLE) for s in _by_kind(exporter, "lm")} == {"teacher"}


def _gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return dspy.Prediction(score=float(len(pred.answer) % 3 == 0), feedback="answer in fewer words")


def test_gepa_iterations_are_trial_spans_and_reflection_calls_are_labelled(otel, lm, server):
    exporter, _ = otel
    reflection = dspy.LM("openai/gpt-4o", api_base=server.api_base, api_key="sk-x-0000", cache=False,
                         max_tokens=256, num_retries=0)
    data = _data(8)
    optimizer = dspy.GEPA(metric=_gepa_metric, max_metric_calls=40, reflection_lm=reflection, num_threads=2)
    with dspy.context(lm=lm):
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=data[:4], valset=data[4:])
    iterations = _by_kind(exporter, "trial")
    assert [s.attributes[A.OPTIMIZER_TRIAL] for s in iterations] == list(range(1, len(iterations) + 1))
    assert len(iterations) >= 2 and all(A.OPTIMIZER_PARENT in s.attributes for s in iterations)
    roles = {(s.attributes.get(A.LM_ROLE), s.attributes[A.GEN_AI_REQUEST_MODEL]) for s in _by_kind(exporter, "lm")}
    assert ("reflection", "openai/gpt-4o") in roles
    assert all(model == MODEL for role, model in roles if role != "reflection")
    assert "callbacks" not in optimizer.gepa_kwargs  # our callback is removed after the compile


def test_guarded_miprov2_returns_the_best_trial_and_it_saves_and_loads(otel, lm, server, tmp_path):
    exporter, _ = otel
    train, val = _data(8), _data(6, "val")
    with dspy.context(lm=lm), otel_dspy_cost.budget(label="measure") as full:  # the simulator is deterministic
        optimizer = _mipro(lm)
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val,
                          **_mipro_kwargs(optimizer))
    exporter.clear()
    cap = full.spent_usd * 0.75  # lands among the trials
    optimizer = _mipro(lm)
    with dspy.context(lm=lm):
        result = otel_dspy_cost.guarded_compile(optimizer, dspy.ChainOfThought("question -> answer"), budget=cap,
                                                trainset=train, valset=val, **_mipro_kwargs(optimizer))
    assert result.cut_short and result.reason == "budget_exceeded" and result.error is not None
    import time

    time.sleep(1.0)  # a call already in flight in another worker when the stop came may still finish
    assert result.budget.spent_usd <= cap and result.budget.call_count == server.count - full.call_count
    assert result.trials_evaluated >= 2
    scored = [s for s in exporter.get_finished_spans() if A.OPTIMIZER_SCORE in s.attributes
              and s.attributes.get(A.OPTIMIZER_EVAL, "full") == "full" and s.attributes.get(A.OPTIMIZER_TRIAL)]
    assert scored and result.best_score == max(s.attributes[A.OPTIMIZER_SCORE] for s in scored)
    evaluate = dspy.Evaluate(devset=val, metric=_metric, num_threads=1, display_progress=False)
    with dspy.context(lm=lm):
        assert evaluate(result.program).score == pytest.approx(result.best_score)
        path = tmp_path / "best.json"
        result.program.save(str(path))
        loaded = dspy.ChainOfThought("question -> answer")
        loaded.load(str(path))
        assert evaluate(loaded).score == pytest.approx(result.best_score)


def test_guarded_gepa_stops_gracefully_through_its_stop_callbacks(otel, lm, server):
    reflection = dspy.LM("openai/gpt-4o", api_base=server.api_base, api_key="sk-x-0000", cache=False,
                         max_tokens=256, num_retries=0)
    data = _data(8)
    optimizer = dspy.GEPA(metric=_gepa_metric, max_metric_calls=400, reflection_lm=reflection, num_threads=2)
    with dspy.context(lm=lm):
        result = otel_dspy_cost.guarded_compile(optimizer, dspy.ChainOfThought("question -> answer"), budget=0.03,
                                                trainset=data[:4], valset=data[4:])
    assert result.cut_short and result.error is None  # GEPA stopped itself: no hard stop was needed
    assert result.spent_usd <= 0.03 and result.best_score is not None
    assert isinstance(result.program, dspy.ChainOfThought) and "stop_callbacks" not in optimizer.gepa_kwargs


def test_guarded_bootstrap_keeps_the_demos_gathered(otel, server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=64, num_retries=0)
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=8,
                                      max_labeled_demos=0)
    with dspy.context(lm=lm):
        result = otel_dspy_cost.guarded_compile(optimizer, dspy.ChainOfThought("question -> answer"),
                                                budget=0.00018, trainset=_data(8))
        assert result.cut_short
        (predictor,) = result.program.predictors()
        assert 0 < len(predictor.demos) < 8
        assert result.program(question="with demos").answer


def test_guarded_compile_with_nothing_usable_raises(otel, lm):
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=4,
                                      max_labeled_demos=0)
    with pytest.raises(otel_dspy_cost.NothingUsableError), dspy.context(lm=lm):
        otel_dspy_cost.guarded_compile(optimizer, dspy.ChainOfThought("question -> answer"), budget=0.00001,
                                       trainset=_data(4))


def test_guarded_compile_does_not_absorb_an_enclosing_budgets_stop(otel, lm):
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=8,
                                      max_labeled_demos=0)
    with pytest.raises(otel_dspy_cost.BudgetExceededError) as info, dspy.context(lm=lm), \
            otel_dspy_cost.budget(limit_usd=0.0005, label="daily"):
        otel_dspy_cost.guarded_compile(optimizer, dspy.ChainOfThought("question -> answer"), budget=10.0,
                                       trainset=_data(8))
    assert info.value.label == "daily"
