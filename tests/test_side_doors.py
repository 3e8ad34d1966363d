"""No side doors: other instrumentors, LLM clients called directly, silent providers, bad numbers, pools, secrets.

Each door is tried as an attacker or a careless user would, against the simulator (real HTTP) and the real client
libraries; what the provider billed (the simulator's own usage for each request it saw) stays within the cap.
"""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import multiprocessing
import multiprocessing.pool
import queue
import sys
import threading

import dspy
import pytest
from conftest import MODEL, QA, lm_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_dspy_cost
from otel_dspy_cost import BudgetExceededError
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.errors import CatalogError
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer


def billed_usd(server, model=MODEL):
    """What the simulator billed for every request it saw: its own usage, priced from the catalog."""
    from otel_dspy_cost.pricing.cost import usage_from_openai
    from otel_dspy_cost.pricing.engine import CostEngine
    from otel_dspy_cost.pricing.resolver import PricingResolver

    engine = CostEngine(PricingResolver(), unknown_model="warn")
    sim = SimulatedLM(reasoning_tokens=server.sim.reasoning_tokens, min_cache_tokens=10**9)
    total = 0.0
    for _, body, _ in server.requests:
        if "messages" not in body and "input" not in body:
            continue
        _, usage = sim.complete(body)
        total += engine.cost(model, usage_from_openai(usage)).usd
    return total


# -- bad numbers are refused where they are given ---------------------------------------------------------

BAD_BUDGETS = [
    ({"limit_usd": math.nan}, ValueError, "limit_usd must be a number, not NaN"),
    ({"limit_usd": math.inf}, ValueError, "limit_usd must be finite"),
    ({"limit_usd": -1.0}, ValueError, "limit_usd must be >= 0"),
    ({"limit_usd": "5"}, TypeError, "limit_usd must be a number, not str"),
    ({"max_calls": "3"}, TypeError, "max_calls must be a whole number, not str"),
    ({"max_calls": -1}, ValueError, "max_calls must be >= 0"),
    ({"max_calls": 2.5}, TypeError, "max_calls must be a whole number"),
    ({"max_calls": True}, TypeError, "max_calls must be a whole number"),
    ({"max_infer_usd": math.nan}, ValueError, "max_infer_usd must be a number, not NaN"),
    ({"max_train_usd": -0.5}, ValueError, "max_train_usd must be >= 0"),
    ({"warn_at": math.nan}, ValueError, "warn_at must be a number, not NaN"),
    ({"warn_at": 1.5}, ValueError, "warn_at is a fraction of the limit"),
    ({"window": "0s"}, ValueError, "window must be longer than zero"),
    ({"window": 3600}, TypeError, "window must be a string"),
    ({"drain_timeout_s": None}, TypeError, "drain_timeout_s is required"),
    ({"drain_timeout_s": math.inf}, ValueError, "drain_timeout_s must be finite"),
    ({"wait_timeout_s": -1}, ValueError, "wait_timeout_s must be >= 0"),
    ({"on_unavailable": "bogus"}, ValueError, "on_unavailable must be one of 'fail_closed', 'fail_open'"),
    ({"action": "halt"}, ValueError, "action must be one of 'stop', 'warn'"),
    ({"label": ""}, ValueError, "label must be a non-empty string"),
    ({"ledger": "postgres://db/budgets"}, ValueError, "unknown ledger URL"),
]


@pytest.mark.parametrize("options, error, message", BAD_BUDGETS, ids=[str(o) for o, _, _ in BAD_BUDGETS])
def test_budget_refuses_a_bad_option_before_any_call(options, error, message):
    with pytest.raises(error) as info:
        otel_dspy_cost.budget(**({"limit_usd": 1.0} | options if "limit_usd" not in options else options))
    assert message in str(info.value)


BAD_INSTRUMENT = [
    ({"pricing_overrides": {"openai/gpt-4o-mini": {"input": math.nan, "output": 0.6}}}, CatalogError,
     "'entries[0].input': nan is not a finite number"),
    ({"pricing_overrides": {"openai/gpt-4o-mini": {"input": -0.15, "output": 0.6}}}, CatalogError, "input"),
    ({"unknown_model_price": {"input": -1.0, "output": 2.0}}, ValueError, "unknown_model_price['input'] must be >= 0"),
    ({"unknown_model_price": {"input": math.inf, "output": 2.0}}, ValueError, "must be finite"),
    ({"unknown_model_price": {"input": "1", "output": 2.0}}, TypeError, "must be a number, not str"),
    ({"unknown_model_price": 3.0}, TypeError, "unknown_model_price must be a dict"),
    ({"local_models": {"llama": {"input": math.nan, "output": 0}}}, ValueError, "not a finite number"),
    ({"metrics_module_depth": -1}, ValueError, "metrics_module_depth must be >= 0"),
    ({"metrics_module_depth": "2"}, TypeError, "metrics_module_depth must be a whole number"),
    ({"capture_content": "yes"}, TypeError, "capture_content must be True or False"),
    ({"unknown_model": "ignore"}, ValueError, "unknown_model must be one of"),
    ({"missing_usage": "zero"}, ValueError, "missing_usage must be one of 'worst_case', 'estimate'"),
    ({"tier": ""}, ValueError, "tier must be a non-empty string"),
    ({"pricing_overrides": 42}, TypeError, "pricing_overrides must be a file path or a dict"),
]


@pytest.mark.parametrize("options, error, message", BAD_INSTRUMENT, ids=[str(o)[:60] for o, _, _ in BAD_INSTRUMENT])
def test_instrument_refuses_a_bad_option(options, error, message):
    otel_dspy_cost.uninstrument()
    try:
        with pytest.raises(error) as info:
            otel_dspy_cost.instrument(tracer_provider=TracerProvider(), **options)
        assert message in str(info.value)
    finally:
        otel_dspy_cost.uninstrument()


def test_a_pricing_file_with_nan_is_refused_naming_the_file_and_field(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"schema_version": 1, "catalog_version": "x", "currency": "USD", "entries": [{"provider": '
                    '"openai", "model": "gpt-4o-mini", "price_version": 1, "effective_at": "2024-01-01T00:00:00Z", '
                    '"input": NaN, "output": 0.6}]}')
    otel_dspy_cost.uninstrument()
    try:
        with pytest.raises(CatalogError) as info:
            otel_dspy_cost.instrument(tracer_provider=TracerProvider(), pricing_overrides=str(path))
    finally:
        otel_dspy_cost.uninstrument()
    assert str(path) in str(info.value) and "entries[0].input" in str(info.value)


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_unusable_ledger_path_fails_closed(otel, server, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = f"{blocker}/budgets.db" if where == "under a file" else "/proc/otel-dspy-cost/budgets.db"
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    with pytest.raises(otel_dspy_cost.LedgerUnavailableError):
        with otel_dspy_cost.budget(limit_usd=1.0, label="bad-path", ledger=f"sqlite:///{path}"), \
                dspy.context(lm=lm):
            dspy.Predict(QA)(question="where is the ledger?")
    assert server.count == 0


# -- other instrumentors cannot take the admission off the call path ----------------------------------------

def _other(which):
    if which == "openinference":
        from openinference.instrumentation.dspy import DSPyInstrumentor
    else:
        from opentelemetry.instrumentation.genai.dspy import DSPyInstrumentor
    return DSPyInstrumentor()


@pytest.fixture
def dspy_restored():
    """DSPy's classes and module functions exactly as before the test: an instrumentor that uninstruments before
    us leaves its wrapper under ours, and ours puts back what it found (theirs), which would outlive the test."""
    def owners():
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "dspy" or name.startswith("dspy.")):
                continue
            yield module
            yield from (v for v in vars(module).values()
                        if isinstance(v, type) and getattr(v, "__module__", "").startswith("dspy"))

    saved = {id(owner): (owner, dict(vars(owner))) for owner in owners()}
    yield
    for owner, before in saved.values():
        now = vars(owner)
        for key in [k for k in now if k not in before]:
            with contextlib.suppress(AttributeError, TypeError):
                delattr(owner, key)
        for key, value in before.items():
            if now.get(key) is not value:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(owner, key, value)


@pytest.mark.parametrize("which", ["openinference", "genai-dspy"])
@pytest.mark.parametrize("order", ["ours first", "theirs first"])
def test_another_instrumentors_uninstrument_leaves_budgets_enforcing(server, which, order, dspy_restored):
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    other = _other(which)
    try:
        if order == "ours first":
            otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
            other.instrument(tracer_provider=provider)
        else:
            other.instrument(tracer_provider=provider)
            otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
        other.uninstrument()
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                     num_retries=0)
        cap = 0.0005
        with pytest.raises(BudgetExceededError):
            with otel_dspy_cost.budget(limit_usd=cap, label=f"{which}-{order}") as b, dspy.context(lm=lm):
                for i in range(150):
                    dspy.Predict(QA)(question=f"question {i}")
        assert b.call_count == server.count > 0
        assert billed_usd(server) <= cap and b.spent_usd == pytest.approx(billed_usd(server))
        assert len(lm_spans(exporter)) == b.call_count
    finally:
        other.uninstrument()
        otel_dspy_cost.uninstrument()


def test_a_request_without_admission_under_a_budget_is_refused_loudly(otel, server):
    """Whatever else takes our wrapper off dspy.LM: the send point refuses instead of spending unbudgeted."""
    import dspy.clients.base_lm as base_lm

    from otel_dspy_cost.instrumentation import patches

    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    if dspy.__version__.startswith("3.3"):
        pytest.skip("DSPy 3.3's send points are LiteLLM's helpers, reached only through our wrapper; 3.4 covers it")
    original = next(o for owner, name, o in patches._patches.applied if owner is base_lm.BaseLM and name == "__call__")
    saved = {cls: cls.__dict__["__call__"] for cls in dspy.LM.__mro__ if "__call__" in cls.__dict__}
    for cls in saved:  # as a careless unwrap would leave it
        cls.__call__ = original
    try:
        with pytest.raises(otel_dspy_cost.AdmissionBypassedError), otel_dspy_cost.budget(limit_usd=1.0), \
                dspy.context(lm=lm):
            lm("hello")
    finally:
        for cls, attribute in saved.items():
            cls.__call__ = attribute
    assert server.count == 0


# -- LLM clients called directly ------------------------------------------------------------------------

def _openai(server):
    import openai

    return openai.OpenAI(base_url=server.api_base, api_key="sk-test-0000000000", max_retries=0)


def test_sixteen_concurrent_direct_openai_calls_with_long_prompts_stay_under_the_cap(otel, server):
    client = _openai(server)
    long_prompt = "Summarise the following notes. " + "The quarterly numbers moved sideways. " * 400
    cap = 0.02  # ~30 calls; one call's worst case is ~$0.0024

    def ask(i):
        try:
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=256,
                                           messages=[{"role": "user", "content": f"{i}: {long_prompt}"}])
        except BudgetExceededError:
            return "stopped"
        return "ok"

    with otel_dspy_cost.budget(limit_usd=cap, label="direct-16") as b:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(ask, range(64)))
    assert "stopped" in outcomes and b.call_count == server.count > 0
    assert billed_usd(server) <= cap
    assert b.spent_usd == pytest.approx(billed_usd(server))
    assert otel_dspy_cost.spend_report()["total"]["calls"] == b.call_count


def test_a_tools_own_openai_client_inside_react_counts_against_the_budget(otel, server):
    exporter, _ = otel
    client = _openai(server)

    def research(topic: str) -> str:
        """Asks another model about a topic."""
        reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=64,
                                               messages=[{"role": "user", "content": f"about {topic}"}])
        return reply.choices[0].message.content

    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=128,
                 num_retries=0)
    with otel_dspy_cost.budget(limit_usd=1.0, label="react-tool") as b, dspy.context(lm=lm):
        dspy.ReAct("question -> answer", tools=[research], max_iters=2)(question="what do tools cost?")
    assert b.call_count == server.count >= 3
    assert b.spent_usd == pytest.approx(billed_usd(server))
    tool_calls = [s for s in lm_spans(exporter) if s.attributes.get(A.MODULE_PATH, "").startswith("ReAct")
                  and s.parent is not None]
    assert tool_calls


def test_direct_litellm_and_anthropic_calls_sync_async_and_streaming_are_counted(otel, server):
    import anthropic
    import litellm
    import openai

    exporter, _ = otel
    messages = [{"role": "user", "content": "a direct call"}]
    with otel_dspy_cost.budget(limit_usd=1.0, label="direct-kinds") as b:
        litellm.completion(model=MODEL, api_base=server.api_base, api_key="sk-test-0000000000", messages=messages,
                           max_tokens=32)
        anthropic.Anthropic(base_url=server.api_base.removesuffix("/v1"), api_key="sk-ant-test-0000000000",
                            max_retries=0).messages.create(model="claude-sonnet-4-20250514", max_tokens=32,
                                                           messages=messages)
        stream = _openai(server).chat.completions.create(model="gpt-4o-mini", max_tokens=32, messages=messages,
                                                         stream=True, stream_options={"include_usage": True})
        chunks = list(stream)

        async def async_calls():
            client = openai.AsyncOpenAI(base_url=server.api_base, api_key="sk-test-0000000000", max_retries=0)
            await client.chat.completions.create(model="gpt-4o-mini", max_tokens=32, messages=messages)
            await litellm.acompletion(model=MODEL, api_base=server.api_base, api_key="sk-test-0000000000",
                                      messages=messages, max_tokens=32)

        asyncio.run(async_calls())
    assert chunks and b.call_count == server.count == 5
    spans = lm_spans(exporter)
    assert len(spans) == 5 and all(s.attributes[A.GEN_AI_INPUT_TOKENS] > 0 for s in spans)
    assert all(not s.attributes[A.COST_ESTIMATED] for s in spans)
    assert {s.attributes[A.LM_MODEL] for s in spans} == {MODEL, "anthropic/claude-sonnet-4-20250514"}


def test_dspy_through_litellm_is_counted_once(otel, server):
    kwargs = {"engine": "litellm"} if dspy.__version__.startswith("3.4") else {}
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0, **kwargs)
    with otel_dspy_cost.budget(limit_usd=1.0, label="once") as b, dspy.context(lm=lm):
        for i in range(3):
            dspy.Predict(QA)(question=f"once {i}")
    assert b.call_count == server.count == 3 and len(lm_spans(otel[0])) == 3


def test_a_stream_dropped_unread_gives_its_reservation_back_as_a_worst_case(otel, server):
    import gc

    with otel_dspy_cost.budget(limit_usd=1.0, label="dropped") as b:
        stream = _openai(server).chat.completions.create(model="gpt-4o-mini", max_tokens=32, stream=True,
                                                         messages=[{"role": "user", "content": "never read"}])
        assert b.in_flight.count == 1
        del stream
        gc.collect()
    assert b.in_flight.count == 0 and b.call_count == 1 and b.spent_usd > 0


# -- providers that do not report what they bill ----------------------------------------------------------

def test_a_provider_hiding_reasoning_and_reporting_no_usage_stays_under_the_cap(otel):
    with SimulatorServer(SimulatedLM(include_usage=False, reasoning_tokens=7000)) as server:
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=8000,
                     num_retries=0)
        cap = 0.05
        with pytest.raises(BudgetExceededError):
            with otel_dspy_cost.budget(limit_usd=cap, label="silent") as b, dspy.context(lm=lm):
                for i in range(100):
                    dspy.Predict(QA)(question=f"hidden {i}")
        assert b.call_count == server.count > 0
        assert billed_usd(server) <= b.spent_usd <= cap


# -- pools and workers the run does not know about --------------------------------------------------------

def test_a_thread_pool_made_before_the_budget_runs_its_tasks_under_it(otel, server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)

    def ask(i):
        with dspy.context(lm=lm):
            return dspy.Predict(QA)(question=f"pooled {i}")

    with multiprocessing.pool.ThreadPool(4) as mp_pool, concurrent.futures.ThreadPoolExecutor(4) as executor:
        with otel_dspy_cost.budget(limit_usd=1.0, label="early-pools") as b:
            mp_pool.map(ask, range(4))
            list(mp_pool.imap_unordered(ask, range(4)))
            mp_pool.apply_async(ask, (99,)).get()
            list(executor.map(ask, range(4)))
    assert b.call_count == server.count == 13


def test_a_queue_worker_started_before_the_budget_is_said_once(otel, server, caplog):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    jobs: queue.Queue = queue.Queue()

    def consumer():
        with dspy.context(lm=lm):
            while (item := jobs.get()) is not None:
                dspy.Predict(QA)(question=item)

    worker = threading.Thread(target=consumer)
    worker.start()
    caplog.set_level(logging.WARNING, "otel_dspy_cost")
    with otel_dspy_cost.budget(limit_usd=1.0, label="queued"):
        for i in range(3):
            jobs.put(f"queued {i}")
        jobs.put(None)
        worker.join()
    said = [r for r in caplog.records if "ran outside budget(s) 'queued'" in r.getMessage()]
    assert len(said) == 1


def test_a_spawn_process_pool_under_a_budget_is_said_and_can_be_counted(otel, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "otel_dspy_cost")
    ctx = multiprocessing.get_context("spawn")
    with otel_dspy_cost.budget(limit_usd=1.0, label="spawned"):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            assert pool.submit(math.sqrt, 4.0).result() == 2.0
            pool.submit(math.sqrt, 9.0).result()
    said = [r for r in caplog.records if "'spawn'-started process pool" in r.getMessage()]
    assert len(said) == 1 and "process_initializer" in said[0].getMessage()
    with pytest.raises(ValueError, match="needs a shared ledger URL"):
        otel_dspy_cost.process_initializer("memory://", "x")


def test_process_initializer_counts_spawned_workers_against_the_shared_budget(server, tmp_path):
    ledger = f"sqlite:///{tmp_path}/spawned.db"
    ctx = multiprocessing.get_context("spawn")
    from test_side_doors_worker import ask  # importable in the spawned child: a module of its own

    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=otel_dspy_cost.process_initializer,
                                                initargs=(ledger, "spawned-shared", 1.0)) as pool:
        results = list(pool.map(ask, [server.api_base] * 4))
    assert results == ["ok"] * 4
    reader = otel_dspy_cost.budget(limit_usd=1.0, label="spawned-shared", ledger=ledger)
    assert reader.call_count == server.count == 4


# -- instrumentation never changes what DSPy computes -------------------------------------------------------

def _usage_per_task(lm, instrumented):
    """DSPy's own usage tracking in `dspy.Parallel`: each task's prediction reports its own usage only."""
    otel_dspy_cost.uninstrument()
    if instrumented:
        otel_dspy_cost.instrument(tracer_provider=TracerProvider(), unknown_model="warn")
    try:
        predict = dspy.Predict(QA)
        with dspy.context(lm=lm, track_usage=True):
            outputs = dspy.Parallel(num_threads=4)([(predict, {"question": f"usage {i}"}) for i in range(8)])
            in_context = dspy.Parallel(num_threads=2)(
                [(lambda: dspy.settings.lm.model, {}) for _ in range(2)])  # dspy.context reaches tasks
    finally:
        otel_dspy_cost.uninstrument()
    return [json.dumps(o.get_lm_usage(), sort_keys=True) for o in outputs], in_context


def test_dspy_usage_tracking_in_parallel_is_the_same_with_and_without_instrument(server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    plain, plain_ctx = _usage_per_task(lm, instrumented=False)
    ours, ours_ctx = _usage_per_task(lm, instrumented=True)
    assert ours == plain and ours_ctx == plain_ctx == [MODEL, MODEL]
    for usage in map(json.loads, ours):  # one call each, not the sum of the others'
        assert [u["prompt_tokens"] for u in usage.values()][0] < 400


# -- secrets ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["user name of api_base", "password of api_base", "per-call api_key",
                                   "header"])
def test_a_planted_secret_never_leaves_the_process(server, tmp_path, caplog, where):
    secret = "tok-PLANTED-5eCr3t-9911"
    server.sim.error_status = 401
    server.sim.echo_credentials = True
    host = server.api_base.split("://", 1)[1]
    api_base, call_kwargs, lm_kwargs = server.api_base, {}, {}
    if where == "user name of api_base":
        api_base = f"http://{secret}@{host}"
    elif where == "password of api_base":
        api_base = f"http://user:{secret}@{host}"
    elif where == "per-call api_key":
        call_kwargs = {"api_key": secret}
    else:
        lm_kwargs = {"extra_headers": {"X-Team-Auth": secret}}
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")
    caplog.set_level(logging.DEBUG, "otel_dspy_cost")
    try:
        lm = dspy.LM(MODEL, api_base=api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                     num_retries=0, **lm_kwargs)
        with otel_dspy_cost.record_run(tmp_path / "runs"), \
                otel_dspy_cost.budget(limit_usd=1.0), dspy.context(lm=lm):
            with pytest.raises(Exception):  # noqa: B017 - the provider's 401, as DSPy raises it
                dspy.Predict(QA)(question="who am I?", config=call_kwargs)
    finally:
        otel_dspy_cost.uninstrument()
    text = json.dumps([{"name": s.name, "attributes": dict(s.attributes), "events": [
        {"name": e.name, "attributes": dict(e.attributes)} for e in s.events], "status": s.status.description}
        for s in exporter.get_finished_spans()], default=str)
    assert exporter.get_finished_spans() and secret not in text
    assert secret not in caplog.text
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


def test_a_direct_call_that_times_out_after_sending_counts_its_worst_case(otel):
    """The provider may have billed a request it did not answer in time: counted at the worst case, not $0."""
    import openai

    with SimulatorServer(SimulatedLM(latency_s=2.0)) as slow:
        client = openai.OpenAI(base_url=slow.api_base, api_key="sk-test-0000000000", max_retries=0, timeout=0.3)
        with otel_dspy_cost.budget(limit_usd=1.0, label="direct-timeout") as b:
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(model="gpt-4o-mini", max_tokens=64,
                                               messages=[{"role": "user", "content": "slow"}])
    span = lm_spans(otel[0])[-1]
    assert span.attributes[A.LM_OUTCOME] == "unknown" and span.attributes[A.COST_ESTIMATE_REASON] == "timeout"
    assert b.spent_usd == pytest.approx(span.attributes[A.BUDGET_RESERVED_USD]) and b.spent_usd > 0
