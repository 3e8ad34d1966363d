"""The cap holds whatever the tracer does: sampling, a disabled or foreign SDK, a concurrent processor, plain
threads, executors, fork, budgets without instrument(), a second instrument(), and the drain after a stop.

Every test runs real DSPy programs against the simulator over HTTP; the request count the simulator saw
is the truth the budget, spend_report(), the metrics and costs.jsonl are checked against.
"""

import asyncio
import concurrent.futures
import logging
import os
import threading
import time

import dspy
import pytest
from conftest import MODEL, QA, ResearchAgent, metric_points
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ConcurrentMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

import otel_dspy_cost
from otel_dspy_cost import BudgetExceededError, ForkedBudgetError
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.reports.run_files import read_costs

LIMIT = 0.002  # a few dozen one-Predict calls at gpt-4o-mini prices with max_tokens=512
VARIANTS = ("full", "always_off", "env_always_off", "ratio_0.01", "sdk_disabled", "noop_provider", "concurrent_multi")


def _provider(variant, monkeypatch):
    if variant == "full":
        return TracerProvider()
    if variant == "always_off":
        return TracerProvider(sampler=ALWAYS_OFF)
    if variant == "env_always_off":
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
        return TracerProvider()
    if variant == "ratio_0.01":
        return TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    if variant == "sdk_disabled":
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        return TracerProvider()
    if variant == "noop_provider":
        return trace.NoOpTracerProvider()
    if variant == "concurrent_multi":
        return TracerProvider(active_span_processor=ConcurrentMultiSpanProcessor(2))
    raise AssertionError(variant)


def _one(lm, i):
    with dspy.context(lm=lm):
        return dspy.Predict(QA)(question="what does a sampled-out call cost?")


def _run(mode, lm, n=200):
    """n identical one-Predict calls, sync, awaited one by one, or from a plain ThreadPoolExecutor."""
    if mode == "sync":
        for i in range(n):
            _one(lm, i)
    elif mode == "async":
        async def main():
            with dspy.context(lm=lm):
                for _ in range(n):
                    await dspy.Predict("question -> answer").acall(question="what does a sampled-out call cost?")

        asyncio.run(main())
    elif mode == "threads":
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda i: _one(lm, i), range(n)))


def _lm_calls_metric(reader):
    return sum(p.value for _, p in metric_points(reader).get("dspy.lm.calls", []))


def _budgeted_run(variant, mode, lm, server, monkeypatch, tmp_path):
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])  # made before OTEL_SDK_DISABLED: the metrics are the check
    provider = _provider(variant, monkeypatch)
    exporter = InMemorySpanExporter()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, meter_provider=meters, unknown_model="warn")
    try:
        before = server.count
        with otel_dspy_cost.record_run(tmp_path / f"{variant}-{mode}") as run:
            with pytest.raises(BudgetExceededError):
                with otel_dspy_cost.budget(limit_usd=LIMIT, label=f"{variant}-{mode}") as b:
                    _run(mode, lm)
        sent = server.count - before
        return {"sent": sent, "counted": b.call_count, "spent": b.spent_usd,
                "report": otel_dspy_cost.spend_report()["total"]["calls"], "metric": _lm_calls_metric(reader),
                "log": len(read_costs(run.directory)), "summary": run.summary["calls"], "spans": exporter}
    finally:
        otel_dspy_cost.uninstrument()
        if isinstance(provider, TracerProvider):  # now, not at exit: a concurrent processor's pool is gone then
            provider.shutdown()
        meters.shutdown()


@pytest.mark.parametrize("mode", ["sync", "async", "threads"])
def test_budget_holds_whatever_the_tracer_does(mode, lm, server, monkeypatch, tmp_path):
    reference = None
    for variant in VARIANTS:
        with monkeypatch.context() as patch:
            got = _budgeted_run(variant, mode, lm, server, patch, tmp_path)
        assert got["spent"] <= LIMIT, variant
        assert got["sent"] == got["counted"] == got["report"] == got["metric"] == got["log"] == got["summary"], \
            (variant, got)
        if mode != "threads":  # four threads race for the last reservations: the count may differ by a few
            if reference is None:
                reference = got["sent"]
            assert got["sent"] == reference, (variant, got["sent"], reference)
        assert got["sent"] > 5
    # with full tracing the spans say the same; sampled out, none of ours were exported
    assert reference is None or reference > 5


def test_sampled_out_spans_export_nothing_but_every_call_counts(lm, server, monkeypatch, tmp_path):
    got = _budgeted_run("always_off", "sync", lm, server, monkeypatch, tmp_path)
    assert got["spans"].get_finished_spans() == ()
    assert got["counted"] == got["sent"] > 5


def test_a_sampler_that_may_record_is_still_asked_per_trace(lm, server):
    """ALWAYS_OFF makes no span of ours at all (accounting only); a parent-based sampler whose root is ALWAYS_OFF
    is not the same: under a sampled remote parent (a request the caller traces) our spans record there."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from otel_dspy_cost import _runtime

    never = TracerProvider(sampler=ALWAYS_OFF)
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=never, unknown_model="warn")
    assert _runtime.active().records is False  # like a no-op tracer: no span made, no sampler asked
    otel_dspy_cost.uninstrument()
    never.shutdown()

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
    assert _runtime.active().records is True
    try:
        with otel_dspy_cost.budget(limit_usd=1.0, label="parent-based") as b:
            _one(lm, 0)  # a root: dropped
            assert exporter.get_finished_spans() == ()
            remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
            with trace.use_span(NonRecordingSpan(remote)):
                _one(lm, 1)
        spans = exporter.get_finished_spans()
        kinds = sorted(s.attributes.get(A.SPAN_KIND) for s in spans)
        assert kinds == ["lm", "predictor"], kinds
        assert {s.context.trace_id for s in spans} == {0x1234}
        lm_span = next(s for s in spans if s.attributes.get(A.SPAN_KIND) == "lm")
        assert lm_span.attributes[A.COST_USD] > 0
        assert b.call_count == 2  # both calls counted, recorded or not
    finally:
        otel_dspy_cost.uninstrument()
        provider.shutdown()


def test_thread_pool_and_run_in_executor_stay_under_the_budget(otel, lm, server):
    exporter, _ = otel
    with pytest.raises(BudgetExceededError):
        with otel_dspy_cost.budget(limit_usd=LIMIT, label="pool") as b:
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                futures = [pool.submit(_one, lm, i) for i in range(300)]
                for f in futures:
                    f.result()
    assert b.spent_usd <= LIMIT and b.call_count == server.count > 0
    first = server.count

    async def main():
        loop = asyncio.get_running_loop()
        with otel_dspy_cost.budget(limit_usd=LIMIT, label="executor") as inner:
            await asyncio.gather(*(loop.run_in_executor(None, _one, lm, i) for i in range(300)))
        return inner

    with pytest.raises(BudgetExceededError):
        asyncio.run(main())
    assert "executor" in _budgets_seen(exporter)
    assert otel_dspy_cost.spend_report(by="budget")["executor"]["usd"] <= LIMIT
    assert otel_dspy_cost.spend_report(by="budget")["executor"]["calls"] == server.count - first > 0
    # the OTel context crossed too: LM spans made in pool threads sit under the pool's caller's trace
    lm_spans = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert all(s.parent is not None for s in lm_spans)


def _budgets_seen(exporter):
    return {label for s in exporter.get_finished_spans() for label in
            str(s.attributes.get(A.BUDGET_LABEL, "")).split(",") if label}


def test_plain_thread_carries_the_budget(otel, lm, server):
    errors = []

    def worker():
        try:
            for i in range(200):
                _one(lm, i)
        except BudgetExceededError as exc:
            errors.append(exc)

    with otel_dspy_cost.budget(limit_usd=LIMIT, label="thread") as b:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert errors and errors[0].label == "thread"
    assert b.spent_usd <= LIMIT and b.call_count == server.count > 0


def test_uninstrument_stops_carrying_context_into_threads(otel, lm, server):
    import concurrent.futures as cf

    otel_dspy_cost.uninstrument()
    assert type(cf.ThreadPoolExecutor.__dict__["submit"]).__name__ == "function"
    assert type(threading.Thread.__dict__["start"]).__name__ == "function"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_never_multiplies_an_in_process_budget(otel, lm, server, tmp_path):
    with otel_dspy_cost.budget(limit_usd=1.0, label="parent-budget") as b:
        _one(lm, 0)
        pid = os.fork()
        if pid == 0:  # the child: its copy of the in-process budget must refuse, loudly
            code = 1
            try:
                _one(lm, 1)
            except ForkedBudgetError as exc:
                code = 3 if "parent-budget" in str(exc) and "shared ledger" in str(exc) else 2
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 3
    assert server.count == 1 == b.call_count

    # a shared ledger is the way: the child's spend counts in the parent's number
    url = f"sqlite:///{tmp_path / 'fork.db'}"
    with otel_dspy_cost.budget(limit_usd=1.0, label="shared-fork", ledger=url) as shared:
        _one(lm, 2)
        pid = os.fork()
        if pid == 0:
            try:
                _one(lm, 3)
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert shared.call_count == 2


def test_budget_without_instrument_is_enforced(lm, server, caplog):
    otel_dspy_cost.uninstrument()
    caplog.set_level(logging.WARNING)
    try:
        with pytest.raises(BudgetExceededError):
            with otel_dspy_cost.budget(limit_usd=0.0004, label="no-instrument") as b:
                for i in range(20):
                    _one(lm, i)
        assert b.spent_usd <= 0.0004 and b.call_count == server.count < 20
        assert "before instrument()" in caplog.text and "enforced" in caplog.text
        # a later explicit instrument() replaces the accounting-only set-up
        exporter, provider = InMemorySpanExporter(), TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
        _one(lm, 99)
        assert any(s.attributes.get(A.SPAN_KIND) == "lm" for s in exporter.get_finished_spans())
    finally:
        otel_dspy_cost.uninstrument()


def test_second_instrument_with_other_options_applies_them(lm, server, caplog):
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    caplog.set_level(logging.INFO)
    try:
        otel_dspy_cost.instrument()  # as opentelemetry-instrument would, with no options
        otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn",
                                  pricing_overrides={MODEL: {"input": 100.0, "output": 100.0}})
        assert "applying them" in caplog.text
        _one(lm, 0)
        (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
        assert span.attributes[A.PRICING_SOURCE] == "override"
        expected = (span.attributes[A.GEN_AI_INPUT_TOKENS] + span.attributes[A.GEN_AI_OUTPUT_TOKENS]) * 100 / 1e6
        assert span.attributes[A.COST_USD] == pytest.approx(expected)
        assert otel_dspy_cost.spend_report()["total"]["calls"] == 1
    finally:
        otel_dspy_cost.uninstrument()


def test_record_run_follows_the_instrumented_provider(lm, server, tmp_path):
    exporter, provider = InMemorySpanExporter(), TracerProvider()  # not the global provider
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
    try:
        with otel_dspy_cost.record_run(tmp_path / "run") as run, dspy.context(lm=lm):
            ResearchAgent()(question="which provider?")
        assert len(read_costs(tmp_path / "run")) == server.count == run.summary["calls"] == 5
        assert run.summary["program_runs"] == 1  # recorded by the wrappers, whatever the provider
    finally:
        otel_dspy_cost.uninstrument()


def test_no_request_after_a_stop_left_the_budget(otel, lm, server):
    server.sim.latency_s = 0.05  # calls are in flight in DSPy's workers when the stop unwinds the caller
    devset = [dspy.Example(question=f"question number {i}", answer="a").with_inputs("question") for i in range(96)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 1, num_threads=16, display_progress=False)
    with pytest.raises(BudgetExceededError):
        with otel_dspy_cost.budget(limit_usd=0.01, label="drain") as b, dspy.context(lm=lm):
            evaluate(ResearchAgent())
    at_exit = (server.count, b.spent_usd, b.call_count, otel_dspy_cost.spend_report()["total"]["calls"])
    time.sleep(2.0)
    assert (server.count, b.spent_usd, b.call_count, otel_dspy_cost.spend_report()["total"]["calls"]) == at_exit
    assert b.spent_usd <= 0.01 and b.call_count == server.count




def test_our_bug_in_admission_never_breaks_the_call(otel, lm, server, monkeypatch, caplog):
    from otel_dspy_cost.ledgers.in_process import InProcessLedger

    def broken(self, *a, **k):
        raise RuntimeError("planted ledger bug")

    monkeypatch.setattr(InProcessLedger, "reserve", broken)
    caplog.set_level(logging.WARNING)
    with otel_dspy_cost.budget(limit_usd=1.0, label="bug"):
        assert _one(lm, 0).answer
    assert "planted ledger bug" in caplog.text and "internal error" in caplog.text
    assert server.count == 1 == otel_dspy_cost.spend_report()["total"]["calls"]  # still counted


def test_our_bug_in_pricing_counts_the_call_at_its_worst_case(otel, lm, server, monkeypatch, caplog):
    from otel_dspy_cost.instrumentation import lm_call

    def broken(*a, **k):
        raise RuntimeError("planted pricing bug")

    monkeypatch.setattr(lm_call, "price", broken)
    caplog.set_level(logging.WARNING)
    with otel_dspy_cost.budget(limit_usd=1.0, label="pricing-bug") as b:
        assert _one(lm, 0).answer
    assert "planted pricing bug" in caplog.text
    (span,) = [s for s in otel[0].get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert b.spent_usd == pytest.approx(span.attributes[A.BUDGET_RESERVED_USD]) and b.spent_usd > 0
    assert span.attributes[A.COST_ESTIMATE_REASON] == "internal error"
