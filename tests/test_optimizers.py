"""Optimizer runs: phases, LM roles, a span per trial (MIPROv2, BootstrapFewShot, GEPA), guarded_compile."""

import inspect

import dspy
import pytest
from conftest import MODEL, ResearchAgent, lm_spans

import otel_dspy_cost
from otel_dspy_cost import BudgetExceededError
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


def _trial_traces(exporter, compile_span):
    """Each trial root with its summary span, checked: a trace of its own, linked both ways to a summary
    span that is a child of the compile, with the same number, score and totals and the trial's trace id."""
    spans = exporter.get_finished_spans()
    roots = sorted(_by_kind(exporter, "trial"), key=lambda s: s.attributes[A.OPTIMIZER_TRIAL])
    summaries = {s.context.span_id: s for s in spans if s.attributes.get(A.SPAN_KIND) == "trial_summary"}
    assert len(summaries) == len(roots)
    pairs = []
    for root in roots:
        assert root.parent is None and root.context.trace_id != compile_span.context.trace_id
        (link,) = root.links
        assert link.attributes[A.LINK_RELATION] == "compile"
        summary = summaries[link.context.span_id]
        assert summary.parent.span_id == compile_span.context.span_id
        assert summary.context.trace_id == compile_span.context.trace_id
        (back,) = summary.links
        assert (back.context.trace_id, back.context.span_id) == (root.context.trace_id, root.context.span_id)
        assert back.attributes[A.LINK_RELATION] == "trial"
        assert summary.attributes[A.OPTIMIZER_TRIAL_TRACE_ID] == f"{root.context.trace_id:032x}"
        assert root.attributes[A.OPTIMIZER_COMPILE_TRACE_ID] == f"{compile_span.context.trace_id:032x}"
        for key in (A.OPTIMIZER_TRIAL, A.OPTIMIZER_SCORE, A.TOTAL_USD, A.LM_CALLS):
            assert summary.attributes.get(key) == root.attributes.get(key), key
        # everything the trial did is in its own trace
        inside = [s for s in spans if s.context.trace_id == root.context.trace_id]
        assert sum(s.attributes.get(A.SPAN_KIND) == "lm" for s in inside) == root.attributes.get(A.LM_CALLS, 0)
        pairs.append((root, summary))
    return pairs


def test_miprov2_trials_are_traces_numbered_scored_costed_and_sum_to_the_compile(otel, lm):
    exporter, _ = otel
    train, val = _data(8), _data(6, "val")
    optimizer = _mipro(lm)
    with dspy.context(lm=lm):
        best = optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val,
                                 **_mipro_kwargs(optimizer))
        dspy.ChainOfThought("question -> answer")(question="after the compile")
    (compile_span,) = [s for s in _by_kind(exporter, "compile") if s.attributes[A.OPTIMIZER_NAME] == "MIPROv2"]
    pairs = _trial_traces(exporter, compile_span)
    trials = [root for root, _ in pairs]
    numbers = [t.attributes[A.OPTIMIZER_TRIAL] for t in trials]
    assert numbers == list(range(1, 1 + len(trials))) and len(trials) >= 6
    # Trial 1 is the default program's evaluation, as MIPROv2 numbers it (its own trial_logs).
    baseline = trials[0]
    assert baseline.attributes[A.OPTIMIZER_BASELINE] is True
    logs = best.trial_logs
    assert baseline.attributes[A.OPTIMIZER_SCORE] == pytest.approx(logs[1]["full_eval_score"])
    for t in trials[1:]:
        assert isinstance(t.attributes[A.OPTIMIZER_SCORE], float) and t.attributes[A.TOTAL_USD] > 0
        assert t.attributes[A.OPTIMIZER_EVAL] in ("full", "minibatch")
        assert f"{A.OPTIMIZER_PARAM_PREFIX}0_predictor_instruction" in t.attributes
        logged = logs[t.attributes[A.OPTIMIZER_TRIAL]]
        assert t.attributes[A.OPTIMIZER_SCORE] == pytest.approx(logged.get("mb_score", logged.get("full_eval_score")))
    children = _children(exporter, compile_span)
    stages = {c.attributes[A.OPTIMIZER_STAGE] for c in children if c.attributes.get(A.SPAN_KIND) == "stage"}
    assert stages == {"bootstrap", "propose_instructions"}
    # Every LM call of the compile sits under one of its children (stages, trial summaries, MIPROv2's final
    # full evaluation): their costs add up to the compile's, though the trials' calls are in their own traces.
    assert sum(c.attributes.get(A.TOTAL_USD, 0.0) for c in children) == pytest.approx(
        compile_span.attributes[A.TOTAL_USD])
    assert sum(c.attributes.get(A.LM_CALLS, 0) for c in children) == compile_span.attributes[A.LM_CALLS]
    lm_spans = _by_kind(exporter, "lm")
    train_roles = {s.attributes.get(A.LM_ROLE) for s in lm_spans if s.attributes[A.PHASE] == "train"}
    assert {"teacher", "prompt_model", "task_model"} <= train_roles
    assert [s.attributes[A.PHASE] for s in lm_spans if s.end_time > compile_span.end_time] == ["infer"]
    # MIPROv2's own bootstrap (an inner BootstrapFewShot compile) spends for MIPROv2: one optimizer label
    assert {s.attributes.get(A.OPTIMIZER_NAME) for s in lm_spans if s.attributes[A.PHASE] == "train"} == {"MIPROv2"}
    by_trial = otel_dspy_cost.spend_report(by="trial")
    assert by_trial["MIPROv2#2"]["usd"] == pytest.approx(trials[1].attributes[A.TOTAL_USD])
    phases = otel_dspy_cost.spend_report(by="phase")
    assert phases["train"]["usd"] == pytest.approx(compile_span.attributes[A.TOTAL_USD])
    assert phases["infer"]["calls"] == 1
    rows = _run_dashboard_traceql(exporter.get_finished_spans())  # the Grafana trial table
    assert [(r["dspy.optimizer.trial"], r["trace_id"]) for r in rows] == [
        (t.attributes[A.OPTIMIZER_TRIAL], t.context.trace_id) for t in trials]


def test_random_search_candidates_are_trial_traces_and_the_best_is_returned(otel, lm):
    exporter, _ = otel
    optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=_metric, max_bootstrapped_demos=2, max_labeled_demos=2,
                                                      num_candidate_programs=3, num_threads=1)
    with dspy.context(lm=lm):
        result = otel_dspy_cost.guarded_compile(optimizer, dspy.ChainOfThought("question -> answer"), budget=10.0,
                                                trainset=_data(6), valset=_data(4, "val"))
    (compile_span,) = [s for s in _by_kind(exporter, "compile")
                       if s.attributes[A.OPTIMIZER_NAME] == "BootstrapFewShotWithRandomSearch"]
    pairs = _trial_traces(exporter, compile_span)
    trials = [root for root, _ in pairs]
    assert [t.attributes[A.OPTIMIZER_TRIAL] for t in trials] == list(range(1, len(trials) + 1))
    assert len(trials) >= 4 and trials[0].attributes[A.OPTIMIZER_BASELINE] is True
    scores = [t.attributes[A.OPTIMIZER_SCORE] for t in trials]
    assert result.best_score == max(scores) and result.best_trial == scores.index(max(scores)) + 1
    assert sorted(c["score"] for c in result.program.candidate_programs) == sorted(scores)
    # The Grafana trial table (a Tempo TraceQL table) returns one row per trial, each its trial's own trace.
    rows = _run_dashboard_traceql(exporter.get_finished_spans())
    assert [(r["dspy.optimizer.trial"], r["dspy.optimizer.score"], r["dspy.cost.total_usd"]) for r in rows] == [
        (t.attributes[A.OPTIMIZER_TRIAL], t.attributes[A.OPTIMIZER_SCORE], t.attributes[A.TOTAL_USD]) for t in trials]
    assert [r["trace_id"] for r in rows] == [t.context.trace_id for t in trials]


def _run_dashboard_traceql(spans):
    """The optimizer dashboard's trial table, run over OTLP spans as Tempo would: its TraceQL must be the
    form `{ span.K = "V" } | select(span.A, ...)`; one row per matching trace, sorted by trial."""
    import json
    import re
    from pathlib import Path

    board = json.loads((Path(__file__).parent.parent / "grafana" / "dashboards" / "optimizer-runs.json").read_text())
    (query,) = [t["query"] for p in board["panels"] for t in p.get("targets", []) if t.get("queryType") == "traceql"]
    m = re.fullmatch(r'\{ span\.([\w.]+) = "(\w+)" \} \| select\(((?:span\.[\w.]+(?:, )?)+)\)', query)
    assert m, query
    key, value, selected = m.group(1), m.group(2), [f.strip()[len("span."):] for f in m.group(3).split(",")]
    rows = {}
    for s in spans:
        if s.attributes.get(key) == value:
            rows[s.context.trace_id] = {"trace_id": s.context.trace_id, **{f: s.attributes.get(f) for f in selected}}
    return sorted(rows.values(), key=lambda r: r["dspy.optimizer.trial"])


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


def test_gepa_iterations_are_trial_traces_scored_as_gepa_logs_them(otel, lm, server, caplog):
    import logging
    import re

    exporter, _ = otel
    caplog.set_level(logging.INFO)
    reflection = dspy.LM("openai/gpt-4o", api_base=server.api_base, api_key="sk-x-0000", cache=False,
                         max_tokens=256, num_retries=0)
    data = _data(8)
    optimizer = dspy.GEPA(metric=_gepa_metric, max_metric_calls=40, reflection_lm=reflection, num_threads=2)
    with dspy.context(lm=lm):
        optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=data[:4], valset=data[4:])
    (compile_span,) = _by_kind(exporter, "compile")
    trials = [root for root, _ in _trial_traces(exporter, compile_span)]
    assert [t.attributes[A.OPTIMIZER_TRIAL] for t in trials] == list(range(1, len(trials) + 1))
    baseline, iterations = trials[0], trials[1:]
    assert baseline.attributes[A.OPTIMIZER_BASELINE] is True and len(iterations) >= 2
    # GEPA's own numbers: iteration N is our trial N + 1 (the seed's evaluation is trial 1)
    assert [t.attributes[A.OPTIMIZER_ITERATION] for t in iterations] == list(range(1, len(iterations) + 1))
    assert all(t.name == f"iteration {t.attributes[A.OPTIMIZER_ITERATION]}" for t in iterations)
    logged = {}
    for line in caplog.messages:
        m = re.match(r"Iteration (\d+): (?:Accepted candidate \(subsample score \S+ -> (\S+)\)|"
                     r"New subsample score (\S+) is not better)", line)
        if m:
            logged[int(m.group(1))] = float(m.group(2) or m.group(3))
    assert logged, caplog.messages[:20]
    for t in iterations:
        if t.attributes[A.OPTIMIZER_ITERATION] in logged:
            assert t.attributes[A.OPTIMIZER_SCORE] == pytest.approx(logged[t.attributes[A.OPTIMIZER_ITERATION]])
            assert A.OPTIMIZER_PARENT in t.attributes
    assert sum(A.OPTIMIZER_SCORE in t.attributes for t in iterations) == len(logged)
    roles = {(s.attributes.get(A.LM_ROLE), s.attributes[A.LM_MODEL]) for s in _by_kind(exporter, "lm")}
    assert ("reflection", "openai/gpt-4o") in roles
    assert all(model == MODEL for role, model in roles if role != "reflection")
    assert "callbacks" not in optimizer.gepa_kwargs  # our callback is removed after the compile
    rows = _run_dashboard_traceql(exporter.get_finished_spans())  # the Grafana trial table
    assert [(r["dspy.optimizer.trial"], r["dspy.optimizer.score"]) for r in rows] == [
        (t.attributes[A.OPTIMIZER_TRIAL], t.attributes.get(A.OPTIMIZER_SCORE)) for t in trials]


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


def test_stop_escapes_bootstrap_fewshot(otel, lm, server):
    train = [dspy.Example(question=f"train q{i}", answer="x").with_inputs("question") for i in range(20)]
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=20,
                                      max_labeled_demos=0, max_rounds=1)
    with pytest.raises(BudgetExceededError) as info:
        with otel_dspy_cost.budget(limit_usd=0.0015, label="compile") as b, dspy.context(lm=lm):
            optimizer.compile(ResearchAgent(), trainset=train)
    assert info.value.label == "compile"
    assert b.spent_usd <= 0.0015 and b.call_count == server.count > 0
    assert otel_dspy_cost.spend_report(by="phase")["train"]["calls"] == server.count


def test_stop_escapes_miprov2_candidate_evaluation(otel, lm, server):
    """MIPROv2 (auto="light", Optuna) catches Exception in eval_candidate_program; the stop must get out."""
    import inspect

    exporter, _ = otel
    train = [dspy.Example(question=f"mipro question {i}", answer="a").with_inputs("question") for i in range(12)]
    optimizer = dspy.MIPROv2(metric=lambda e, p, t=None: float(len(p.answer) % 3 == 0), auto="light",
                             num_threads=2, verbose=False, prompt_model=lm, task_model=lm)
    kwargs = {"requires_permission_to_run": False} \
        if "requires_permission_to_run" in inspect.signature(optimizer.compile).parameters else {}
    limit = 0.006  # a full light run against the simulator costs ~$0.0086: the cap lands in the trials
    with pytest.raises(BudgetExceededError) as info:
        with otel_dspy_cost.budget(limit_usd=limit, label="mipro-compile") as b, dspy.context(lm=lm):
            optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=train, **kwargs)
    refused = _assert_stopped_cleanly(exporter, server, b, limit, info.value)
    # The first refusal happened inside a candidate evaluation of the compile, in the train phase.
    first = min(refused, key=lambda s: s.start_time)
    assert "evaluate" in _ancestor_kinds(exporter, first) and "compile" in _ancestor_kinds(exporter, first)
    assert first.attributes[A.PHASE] == "train"


def test_stop_escapes_gepa(otel, lm, server):
    exporter, _ = otel
    data = [dspy.Example(question=f"gepa question {i}", answer="a").with_inputs("question") for i in range(8)]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return dspy.Prediction(score=float(len(pred.answer) % 3 == 0), feedback="answer in fewer words")

    optimizer = dspy.GEPA(metric=metric, max_metric_calls=60, reflection_lm=lm, num_threads=2)
    limit = 0.003  # a full run here costs ~$0.007
    with pytest.raises(BudgetExceededError) as info:
        with otel_dspy_cost.budget(limit_usd=limit, label="gepa-compile") as b, dspy.context(lm=lm):
            optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=data[:4], valset=data[4:])
    _assert_stopped_cleanly(exporter, server, b, limit, info.value)
    assert otel_dspy_cost.spend_report(by="phase")["train"]["calls"] == b.call_count


def _ancestor_kinds(exporter, span):
    """Kinds up the tree; a trial's trace continues, through its link, at its summary in the compile trace."""
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    kinds = []
    while True:
        up = span.parent or next((link.context for link in span.links
                                  if link.attributes.get(A.LINK_RELATION) == "compile"), None)
        if up is None or up.span_id not in by_id:
            return kinds
        span = by_id[up.span_id]
        kinds.append(span.attributes.get(A.SPAN_KIND))


def _assert_stopped_cleanly(exporter, server, b, limit, err):
    """The error names the budget; spend <= limit; the server saw exactly the calls the budget counted,
    all reserved before the first refusal; nothing more arrives afterwards."""
    import time

    assert err.label == b.label and err.limit == limit and err.spent_usd <= limit and b.spent_usd <= limit
    seen = server.count
    time.sleep(1.0)
    assert server.count == seen == b.call_count > 0
    refused = [s for s in exporter.get_finished_spans() if s.attributes.get(A.BUDGET_REFUSED)]
    # A refused call's span starts before its admission (which may wait for calls in flight), and ends at its
    # refusal: every sent call started before the first refusal.
    assert refused and all(s.start_time < min(r.end_time for r in refused) for s in lm_spans(exporter))
    return refused
