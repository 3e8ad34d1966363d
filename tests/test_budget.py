"""Budgets: spend tracked and reported, nested budgets and scopes, warn and call caps, hard stops under threads."""

import asyncio
import logging
import threading

import dspy
import pytest
from conftest import MODEL, QA, ResearchAgent, lm_spans

import otel_dspy_cost
from otel_dspy_cost import BudgetExceededError, ScopeExhaustedError
from otel_dspy_cost import _attributes as A


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
