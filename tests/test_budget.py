"""BudgetSpanProcessor: roll-ups, reservations, hard stops that DSPy cannot swallow, no overshoot."""

import asyncio
import logging
import threading

import dspy
import pytest
from conftest import MODEL, QA, ResearchAgent

import otel_dspy_cost
from otel_dspy_cost import BudgetExceededError, ScopeExhaustedError
from otel_dspy_cost import _attributes as A


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


def test_budget_tracks_spend_and_report(otel, lm):
    exporter, _ = otel
    with otel_dspy_cost.budget(limit_usd=1.0, label="inference") as b, dspy.context(lm=lm):
        ResearchAgent()(question="how much?")
    spans = lm_spans(exporter)
    assert b.call_count == 5
    assert b.spent_usd == pytest.approx(sum(s.attributes[A.COST_USD] for s in spans))
    assert b.remaining_usd == pytest.approx(1.0 - b.spent_usd)
    assert b.status == "within_budget"
    report = otel_dspy_cost.spend_report(by="budget")
    assert report["inference"]["calls"] == 5 and report["inference"]["usd"] == pytest.approx(b.spent_usd)
    by_module = otel_dspy_cost.spend_report(depth=2)
    assert set(by_module) == {"ResearchAgent.planner", "ResearchAgent.searcher", "ResearchAgent.synthesizer", "total"}
    assert by_module["ResearchAgent.searcher"]["calls"] == 3


def test_stop_inside_evaluate_8_threads_no_request_after_breach(otel, lm, server):
    exporter, _ = otel
    devset = [dspy.Example(question=f"question number {i}", answer="a").with_inputs("question") for i in range(64)]
    limit = 0.004  # a handful of ResearchAgent runs at gpt-4o-mini prices with max_tokens=512
    evaluate = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 1, num_threads=8, display_progress=False)
    with pytest.raises(BudgetExceededError) as info:
        with otel_dspy_cost.budget(limit_usd=limit, label="eval-cap") as b, dspy.context(lm=lm):
            evaluate(ResearchAgent())
    err = info.value
    assert err.label == "eval-cap" and err.limit == limit and err.spent_usd <= limit
    assert "eval-cap" in str(err)
    assert b.status == "stopped"  # refused the next worst case before spend reached the limit
    assert b.spent_usd <= limit
    # Queued work keeps running in DSPy's pool after the error; calls already in flight may finish.
    import time

    time.sleep(1.5)
    refused = [s for s in exporter.get_finished_spans() if s.attributes.get(A.BUDGET_REFUSED)]
    sent = lm_spans(exporter)
    # Every request the server saw was reserved before the first refusal: none started after the breach.
    # What spans can show of that: a sent span starts before its reservation, and every refused span ends
    # after its refusal, which is no earlier than the first (the ledger trips in the refusing step).
    refusals_over = min(s.end_time for s in refused)
    assert server.count == len(sent) == b.call_count
    assert all(s.start_time < refusals_over for s in sent)
    assert refused and all(s.status.status_code.name == "ERROR" for s in refused)


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


def test_sixteen_threads_never_overshoot(otel, server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    limit = 0.01
    stops = []

    def worker(b):
        predict = dspy.Predict(QA)
        try:
            with dspy.context(lm=lm):
                for i in range(1000):
                    predict(question=f"{threading.get_ident()} {i}")
        except BudgetExceededError as exc:
            stops.append(exc)

    with otel_dspy_cost.budget(limit_usd=limit, label="contended") as b:
        import contextvars

        threads = [threading.Thread(target=contextvars.copy_context().run, args=(worker, b)) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(stops) == 16
    report = otel_dspy_cost.spend_report()["total"]
    assert report["calls"] == server.count == b.call_count > 50
    assert report["usd"] == pytest.approx(b.spent_usd)
    assert b.spent_usd <= limit


def test_nested_budgets_inner_stops_first(otel, lm):
    with otel_dspy_cost.budget(limit_usd=1.0, label="daily") as daily:
        with pytest.raises(BudgetExceededError) as info:
            with otel_dspy_cost.budget(limit_usd=0.0004, label="request"), dspy.context(lm=lm):
                for _ in range(10):
                    dspy.Predict("question -> answer")(question="nested")
        assert info.value.label == "request"
        inner_calls = daily.call_count
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="daily still open")
    assert daily.call_count == inner_calls + 1 and daily.status == "within_budget"


def test_scope_sub_limit_stops_only_the_scope(otel, lm):
    with otel_dspy_cost.budget(limit_usd=1.0, label="run") as run, dspy.context(lm=lm):
        reached_after = 0
        for _ in range(5):
            with otel_dspy_cost.scope("retrieve", limit_usd=0.0003) as s:
                dspy.Predict("question -> answer")(question="scoped")
            reached_after += 1
        dspy.Predict("question -> answer")(question="outside scope")
    assert reached_after == 5  # the with-scope swallowed its own stop each time
    assert s.exhausted and s.spent_usd <= 0.0003
    assert run.call_count == s.call_count + 1
    assert run.spent_usd == pytest.approx(s.spent_usd + (run.spent_usd - s.spent_usd))
    assert run.status == "within_budget"


def test_scope_error_is_a_budget_error():
    assert issubclass(ScopeExhaustedError, BudgetExceededError)
    assert issubclass(BudgetExceededError, BaseException) and not issubclass(BudgetExceededError, Exception)


def test_warn_only_and_thresholds_fire_once(otel, lm, caplog):
    exporter, _ = otel
    warned, exceeded = [], []
    caplog.set_level(logging.WARNING)
    with otel_dspy_cost.budget(limit_usd=0.00015, warn_at=0.5, action="warn", label="soft",
                               on_warn=warned.append, on_exceed=exceeded.append) as b, dspy.context(lm=lm):
        for _ in range(6):
            dspy.Predict("question -> answer")(question="soft limit")
    assert b.call_count == 6 and b.spent_usd > 0.00015
    assert b.status == "exceeded" and len(warned) == 1 and len(exceeded) == 1
    assert [k for k, _ in b.events] == ["warn", "exceeded"]
    assert caplog.text.count("passed its warn threshold") == 1
    events = [e.name for s in exporter.get_finished_spans() for e in s.events]
    assert events.count("dspy.budget.warn") == 1 and events.count("dspy.budget.exceeded") == 1


def test_call_cap_for_local_models(otel, server):
    lm = dspy.LM("openai/gpt-4o-mini", api_base=server.api_base, api_key="x", cache=False, max_tokens=64)
    with pytest.raises(BudgetExceededError) as info:
        with otel_dspy_cost.budget(max_calls=3, label="calls") as b, dspy.context(lm=lm):
            for _ in range(10):
                dspy.Predict("question -> answer")(question="count me")
    assert info.value.reason == "max_calls" and b.call_count == 3 == server.count


def test_phase_cap(otel, lm, server):
    train = [dspy.Example(question=f"t{i}", answer="x").with_inputs("question") for i in range(10)]
    with pytest.raises(BudgetExceededError) as info:
        with otel_dspy_cost.budget(limit_usd=1.0, max_train_usd=0.0005, label="phases") as b, dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="inference first")
            dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=10,
                                  max_labeled_demos=0).compile(dspy.Predict("question -> answer"), trainset=train)
    assert info.value.reason == "max_train_usd"
    phases = b.spent_by_phase()
    assert phases["infer"] > 0 and phases["train"] <= 0.0005


def test_refusal_names_max_tokens_when_unset(otel, server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="x", cache=False)  # no max_tokens
    if lm.kwargs.get("max_tokens"):
        pytest.skip("this DSPy version sets a default max_tokens")
    with pytest.raises(BudgetExceededError, match="max_tokens is not set"):
        with otel_dspy_cost.budget(limit_usd=0.001, label="tiny"), dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="q")
    assert server.count == 0


def test_processor_bug_is_logged_program_continues(otel, lm, monkeypatch, caplog):
    def broken(self, *a, **k):
        raise RuntimeError("planted processor bug")

    monkeypatch.setattr("otel_dspy_cost._rollup.RollupTree.track", broken)
    caplog.set_level(logging.WARNING)
    with otel_dspy_cost.budget(limit_usd=1.0), dspy.context(lm=lm):
        assert ResearchAgent()(question="bug?").answer
    assert "planted processor bug" in caplog.text


def test_budgets_lm_spans_of_the_official_genai_instrumentation(server):
    """LM spans made by opentelemetry-instrumentation-genai-dspy (no cost on them) are priced and budgeted,
    and with both instrumentations on, each call counts once."""
    pytest.importorskip("opentelemetry.instrumentation.genai.dspy")
    from opentelemetry.instrumentation.genai.dspy import DSPyInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_dspy_cost._costing import CostEngine
    from otel_dspy_cost.pricing import PricingResolver

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

    from otel_dspy_cost._metrics import OVERFLOW, CostMetrics

    reader = InMemoryMetricReader()
    m = CostMetrics.create(MeterProvider(metric_readers=[reader]), max_label_values=5)
    for i in range(50):
        m.record_call(module=f"Prog.step{i}.inner.deep", model=f"openai/m{i}", provider="openai", operation="chat",
                      phase="infer", budget_label=f"req-{i}", optimizer="", usd=0.01, economic_usd=0.01,
                      input_tokens=1, output_tokens=1, cache_hit=False, unknown=False, duration_s=0.1)
    cost = metric_points(reader)["dspy.cost"]
    assert len(cost) == 6 and sum(p.value for _, p in cost) == pytest.approx(0.5)
    assert {a[A.MODULE_PATH] for a, _ in cost} == {f"Prog.step{i}" for i in range(5)} | {OVERFLOW}


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
    assert refused and all(s.start_time < min(r.start_time for r in refused) for s in lm_spans(exporter))
    return refused


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


def test_one_budget_entered_in_many_threads_and_tasks_at_once(otel, lm, server):
    """Sharing one Budget object across workers (`with b:` in each) must keep each context's state apart."""
    import threading

    b = otel_dspy_cost.budget(limit_usd=1.0, label="shared")
    errors = []

    def worker(k):
        try:
            for i in range(3):
                with b, dspy.context(lm=lm):
                    dspy.Predict(QA)(question=f"thread {k} call {i}")
        except BaseException as exc:  # noqa: BLE001 - any escape is the failure we look for
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    async def tasks():
        async def one(k):
            async with b:
                await dspy.Predict("question -> answer").acall(question=f"task {k}")
        with dspy.context(lm=lm):
            await asyncio.gather(*(one(k) for k in range(8)))

    asyncio.run(tasks())
    assert errors == [] and b.call_count == 8 * 3 + 8 == server.count
    assert otel_dspy_cost._context.current().budgets == ()
