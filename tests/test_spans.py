"""instrument(): the span tree, GenAI attributes, parenting across threads and async, robustness."""

import asyncio
import contextlib
import copy
import json
import logging

import dspy
import pytest
from conftest import MODEL, ResearchAgent, tree
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import otel_dspy_cost
from otel_dspy_cost import _attributes as A


def _instrumented(**options):
    """instrument() on a fresh SDK provider exporting in memory: (exporter, provider)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn", **options)
    return exporter, provider


@pytest.fixture
def otel():
    """This module checks the whole span model, adapter spans included: instrument(adapter_spans=True).
    The default (adapter timings as predictor attributes) is checked by its own test below."""
    yield _instrumented(adapter_spans=True)
    otel_dspy_cost.uninstrument()


EXPECTED_AGENT_TREE = [
    ("module ResearchAgent", None, "module"),
    ("module ResearchAgent.planner", "module ResearchAgent", "module"),
    ("predict ResearchAgent.planner.predict", "module ResearchAgent.planner", "predictor"),
    ("format ChatAdapter", "predict ResearchAgent.planner.predict", "adapter.format"),
    ("chat gpt-4o-mini", "predict ResearchAgent.planner.predict", "lm"),
    ("parse ChatAdapter", "predict ResearchAgent.planner.predict", "adapter.parse"),
    ("module ResearchAgent.searcher", "module ResearchAgent", "module"),
    ("predict ResearchAgent.searcher.react", "module ResearchAgent.searcher", "predictor"),
    ("format ChatAdapter", "predict ResearchAgent.searcher.react", "adapter.format"),
    ("chat gpt-4o-mini", "predict ResearchAgent.searcher.react", "lm"),
    ("parse ChatAdapter", "predict ResearchAgent.searcher.react", "adapter.parse"),
    ("execute_tool search", "module ResearchAgent.searcher", "tool"),
    ("predict ResearchAgent.searcher.react", "module ResearchAgent.searcher", "predictor"),
    ("format ChatAdapter", "predict ResearchAgent.searcher.react", "adapter.format"),
    ("chat gpt-4o-mini", "predict ResearchAgent.searcher.react", "lm"),
    ("parse ChatAdapter", "predict ResearchAgent.searcher.react", "adapter.parse"),
    ("execute_tool finish", "module ResearchAgent.searcher", "tool"),
    ("module ResearchAgent.searcher.extract", "module ResearchAgent.searcher", "module"),
    ("predict ResearchAgent.searcher.extract.predict", "module ResearchAgent.searcher.extract", "predictor"),
    ("format ChatAdapter", "predict ResearchAgent.searcher.extract.predict", "adapter.format"),
    ("chat gpt-4o-mini", "predict ResearchAgent.searcher.extract.predict", "lm"),
    ("parse ChatAdapter", "predict ResearchAgent.searcher.extract.predict", "adapter.parse"),
    ("predict ResearchAgent.synthesizer", "module ResearchAgent", "predictor"),
    ("format ChatAdapter", "predict ResearchAgent.synthesizer", "adapter.format"),
    ("chat gpt-4o-mini", "predict ResearchAgent.synthesizer", "lm"),
    ("parse ChatAdapter", "predict ResearchAgent.synthesizer", "adapter.parse"),
]


def shape(spans, root=None):
    """(name, parent name, kind) in start order, for the subtree under `root` (or all)."""
    by_id = {s.context.span_id: s for s in spans}
    ordered = sorted(spans, key=lambda s: s.start_time)
    out = []
    for s in ordered:
        parent = by_id.get(s.parent.span_id) if s.parent else None
        out.append((s.name, parent.name if parent else None, s.attributes.get(A.SPAN_KIND), s, parent))
    if root is not None:
        keep = []
        for row in out:
            node = row[3]
            while node is not None and node is not root:
                node = by_id.get(node.parent.span_id) if node.parent else None
            if node is root:
                keep.append(row)
        out = keep
    return out


def test_nested_program_exact_tree_and_lm_attributes(otel, lm, server):
    exporter, _ = otel
    with dspy.context(lm=lm):
        result = ResearchAgent()(question="What is DSPy?")
    assert result.answer
    spans = exporter.get_finished_spans()
    assert [(n, p, k) for n, p, k, _, _ in shape(spans)] == EXPECTED_AGENT_TREE
    assert len({s.context.trace_id for s in spans}) == 1
    lm_spans = [s for s in spans if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert len(lm_spans) == server.count == 5
    for s in lm_spans:
        a = s.attributes
        assert a[A.GEN_AI_OPERATION] == "chat"
        assert a[A.GEN_AI_PROVIDER] == "openai"
        assert (a[A.GEN_AI_REQUEST_MODEL], a[A.LM_MODEL]) == ("gpt-4o-mini", MODEL)  # name; DSPy's string
        assert s.kind == SpanKind.CLIENT  # the GenAI conventions' kind for a call to a provider
        assert a[A.GEN_AI_RESPONSE_MODEL] in ("gpt-4o-mini", MODEL)
        assert a[A.GEN_AI_REQUEST_MAX_TOKENS] == 512
        assert a[A.GEN_AI_INPUT_TOKENS] > 0 and a[A.GEN_AI_OUTPUT_TOKENS] > 0
        assert a[A.GEN_AI_CACHE_READ_TOKENS] == 0 and a[A.GEN_AI_REASONING_TOKENS] == 0
        assert a[A.GEN_AI_CACHE_CREATION_TOKENS] == 0
        assert list(a[A.GEN_AI_FINISH_REASONS]) == ["stop"]
        assert a[A.CACHE_HIT] is False and a[A.USAGE_MISSING] is False
        assert a[A.PHASE] == "infer"
        assert a[A.COST_USD] > 0
    # token counts are exactly what the server reported
    served = [body for _, body, _ in server.requests]
    assert len(served) == 5
    paths = {s.attributes[A.MODULE_PATH] for s in lm_spans}
    assert paths == {"ResearchAgent.planner.predict", "ResearchAgent.searcher.react",
                     "ResearchAgent.searcher.extract.predict", "ResearchAgent.synthesizer"}
    modules = [s for s in spans if s.attributes.get(A.SPAN_KIND) in ("module", "predictor")]
    assert all(s.attributes[A.MODULE_CLASS] for s in modules)
    assert {s.attributes[A.MODULE_CLASS] for s in modules} >= {"ResearchAgent", "ChainOfThought", "ReAct", "Predict"}


def test_evaluate_threads_one_trace_no_orphans(otel, lm):
    exporter, _ = otel
    devset = [dspy.Example(question=f"q{i}?", answer="x").with_inputs("question") for i in range(6)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: 1.0, num_threads=4,
                             display_progress=False)
    with dspy.context(lm=lm):
        result = evaluate(ResearchAgent())
    assert result.score == 100.0
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["evaluate ResearchAgent"]
    ev = roots[0]
    assert ev.attributes[A.EVAL_SIZE] == 6 and ev.attributes[A.EVAL_THREADS] == 4
    assert ev.attributes[A.EVAL_SCORE] == 100.0
    programs = [s for s in spans if s.name == "module ResearchAgent"]
    assert len(programs) == 6 and all(p.parent.span_id == ev.context.span_id for p in programs)
    for program in programs:
        rows = [(n, p, k) for n, p, k, _, _ in shape(spans, program)]
        assert rows[1:] == EXPECTED_AGENT_TREE[1:] and rows[0][0] == "module ResearchAgent"


def test_async_acall_tree(otel, lm):
    exporter, _ = otel

    async def main():
        with dspy.context(lm=lm):
            return await ResearchAgent().acall(question="What is async DSPy?")

    assert asyncio.run(main()).answer
    spans = exporter.get_finished_spans()
    assert [(n, p, k) for n, p, k, _, _ in shape(spans)] == EXPECTED_AGENT_TREE


def test_parallel_and_streamify_parenting(otel, lm):
    exporter, provider = otel
    tracer = provider.get_tracer("user")
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), tracer.start_as_current_span("user-root") as root:
        outs = dspy.Parallel(num_threads=3)([(predict, {"question": f"q{i}"}) for i in range(4)])
        assert len(outs) == 4
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    predicts = [s for s in spans if s.name == "predict Predict"]
    assert len(predicts) == 4 and all(s.parent.span_id == root.get_span_context().span_id for s in predicts)
    # The user's own span is rolled up too (updated per LM call; ours are written once as they end).
    user_root = next(s for s in spans if s.name == "user-root")
    lm_cost = sum(s.attributes[A.COST_USD] for s in spans if s.attributes.get(A.SPAN_KIND) == "lm")
    assert user_root.attributes[A.LM_CALLS] == 4 and lm_cost > 0
    assert user_root.attributes[A.TOTAL_USD] == pytest.approx(lm_cost, rel=1e-9)
    assert sum(s.attributes[A.TOTAL_USD] for s in predicts) == pytest.approx(lm_cost, rel=1e-9)

    exporter.clear()
    stream_program = dspy.streamify(dspy.Predict("question -> answer"))

    async def consume():
        last = None
        async for value in stream_program(question="stream?"):
            last = value
        return last

    with dspy.context(lm=lm):
        assert isinstance(asyncio.run(consume()), dspy.Prediction)
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    lm_spans = [s for s in spans if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert len(lm_spans) == 1 and lm_spans[0].attributes[A.GEN_AI_INPUT_TOKENS] > 0


def test_user_spans_nest_under_ours(otel, lm):
    exporter, provider = otel
    tracer = provider.get_tracer("user")

    def lookup(topic: str) -> str:
        """Looks a topic up."""
        with tracer.start_as_current_span("user-http-call"):
            return "facts"

    with dspy.context(lm=lm):
        dspy.ReAct("question -> answer", tools=[lookup], max_iters=2)(question="x")
    spans = exporter.get_finished_spans()
    by_id, _ = tree(spans)
    mine = next(s for s in spans if s.name == "user-http-call")
    assert by_id[mine.parent.span_id].name == "execute_tool lookup"


@pytest.mark.parametrize("engine", ["litellm", "native"])
def test_engines_make_real_http_calls(otel, server, engine):
    exporter, _ = otel
    if engine == "native" and not hasattr(dspy.clients, "execution"):
        pytest.skip("DSPy 3.3 has no native engine")
    kwargs = {"engine": "litellm"} if engine == "litellm" and _has_engines() else {}
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-000000000", cache=False, **kwargs)
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="hi")
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert server.count == 1
    assert span.attributes[A.GEN_AI_INPUT_TOKENS] > 0
    assert span.attributes[A.COST_USD] > 0


def _has_engines():
    import inspect

    return "engine" in inspect.signature(dspy.LM.__init__).parameters


class LegacyLM(dspy.BaseLM):
    """A custom LM in the old style: forward() returns an OpenAI-shaped response."""

    def __init__(self, server):
        super().__init__(model="openai/gpt-4o-mini", max_tokens=256)
        self.server = server

    def forward(self, prompt=None, messages=None, **kwargs):
        import httpx
        from litellm import ModelResponse

        body = {"model": "gpt-4o-mini", "messages": messages or [{"role": "user", "content": prompt}]}
        data = httpx.post(self.server.api_base + "/chat/completions", json=body, timeout=10).json()
        return ModelResponse(**data)


def test_legacy_custom_baselm(otel, server):
    exporter, _ = otel
    with dspy.context(lm=LegacyLM(server)):
        out = dspy.Predict("question -> answer")(question="legacy?")
    assert out.answer
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert span.attributes[A.GEN_AI_INPUT_TOKENS] > 0
    assert span.attributes[A.USAGE_MISSING] is False
    assert span.attributes[A.GEN_AI_REQUEST_MAX_TOKENS] == 256


def test_survives_configure_resets_copies_and_reload(otel, lm, tmp_path):
    exporter, _ = otel

    class Noop(dspy.utils.BaseCallback):
        pass

    dspy.configure(callbacks=[Noop()])
    dspy.configure(lm=lm, callbacks=[])
    program = ResearchAgent()
    clone = copy.deepcopy(program)
    program.save(tmp_path / "p.json")
    loaded = ResearchAgent()
    loaded.load(tmp_path / "p.json")
    for p in (program, clone, loaded):
        exporter.clear()
        p(question="still traced?")
        assert [(n, q, k) for n, q, k, _, _ in shape(exporter.get_finished_spans())] == EXPECTED_AGENT_TREE
    dspy.configure(lm=None)


def _patch_points():
    import dspy.clients.base_lm as base_lm
    from dspy.adapters.base import Adapter
    from dspy.adapters.chat_adapter import ChatAdapter
    from dspy.teleprompt.teleprompt import Teleprompter
    from dspy.utils.parallelizer import ParallelExecutor

    owners = [dspy.Module, base_lm.BaseLM, ChatAdapter, dspy.JSONAdapter, dspy.Tool, dspy.Evaluate,
              dspy.BootstrapFewShot, dspy.MIPROv2, ParallelExecutor, dspy.Retrieve, Adapter, Teleprompter]
    return {(o.__qualname__, k): v for o in owners for k, v in vars(o).items()}


def test_uninstrument_restores_dspy_exactly():
    otel_dspy_cost.uninstrument()
    before = _patch_points()
    otel_dspy_cost.instrument()
    first = _patch_points()
    otel_dspy_cost.instrument()  # idempotent: no wrapper of ours wrapped again
    during = _patch_points()
    assert during != before
    assert during.keys() == first.keys() and all(during[k] is first[k] for k in first)
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.uninstrument()  # safe twice
    after = _patch_points()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_a_patch_point_is_wrapped_once_and_restored():
    """Our wrappers are known by identity (not by a wrapper subclass): wrapping a point that already holds
    one of ours is a no-op, another library's wrapper is wrapped, and removal restores what was there."""
    import wrapt

    from otel_dspy_cost.instrumentation.patches import _Patches

    class Owner:
        def f(self, x):
            return x

    original = Owner.__dict__["f"]
    calls = []

    def ours(wrapped, instance, args, kwargs):
        calls.append("ours")
        return wrapped(*args, **kwargs)

    patches = _Patches()
    patches.wrap(Owner, "f", ours)
    first = Owner.__dict__["f"]
    patches.wrap(Owner, "f", ours)
    assert Owner.__dict__["f"] is first and Owner().f(3) == 3 and calls == ["ours"]
    patches.remove()
    assert Owner.__dict__["f"] is original
    theirs = wrapt.FunctionWrapper(original, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))
    Owner.f = theirs
    patches.wrap(Owner, "f", ours)
    assert Owner.__dict__["f"] is not theirs and Owner().f(4) == 4 and calls == ["ours", "ours"]
    patches.remove()
    assert Owner.__dict__["f"] is theirs


def test_a_module_function_is_wrapped_as_a_plain_function_and_restored():
    """Module-level patch points (DSPy 3.4's execution._attempt/finalize, 3.3's LiteLLM helpers) get a plain
    function, not a wrapt proxy: it must still look like the original to introspection, stay a coroutine
    function when the original is one, be wrapped once, and be restored exactly."""
    import asyncio
    import inspect
    import types

    from otel_dspy_cost.instrumentation.patches import _Patches

    module = types.ModuleType("some_provider_client")

    def send(request, *, timeout=1.0):
        """Send it."""
        return ("sent", request, timeout)

    async def asend(request, *, timeout=1.0):
        return ("asent", request, timeout)

    module.send, module.asend = send, asend
    seen = []

    def ours(wrapped, instance, args, kwargs):
        seen.append((instance, args, kwargs))
        return wrapped(*args, **kwargs)

    patches = _Patches()
    for name in ("send", "asend"):
        patches.wrap(module, name, ours)
    wrapped_send = module.send
    patches.wrap(module, "send", ours)
    assert module.send is wrapped_send is not send
    assert wrapped_send.__name__ == "send" and wrapped_send.__doc__ == "Send it."
    # No __wrapped__ (another instrumentation's unwrap would walk through ours to the original); a signature.
    assert not hasattr(wrapped_send, "__wrapped__")
    assert inspect.signature(wrapped_send) == inspect.signature(send)
    assert inspect.iscoroutinefunction(module.asend) and not inspect.iscoroutinefunction(module.send)
    assert module.send("r", timeout=2) == ("sent", "r", 2)
    assert asyncio.run(module.asend("q")) == ("asent", "q", 1.0)
    assert seen == [(None, ("r",), {"timeout": 2}), (None, ("q",), {})]
    patches.remove()
    assert module.send is send and module.asend is asend


def test_a_wrapped_method_binds_as_the_original_did():
    """A method defined in a class body gets a plain function: the wrapper sees the instance and a bound
    original whether the method is called on an instance, through the class, through super(), or awaited."""
    import asyncio
    import inspect

    from otel_dspy_cost.instrumentation.patches import _Patches

    class Base:
        def f(self, x, *, y=0):
            return (type(self).__name__, x, y)

        async def af(self, x):
            return ("async", type(self).__name__, x)

    class Child(Base):
        def f(self, x, *, y=0):
            return ("child",) + super().f(x, y=y)

    seen = []

    def ours(wrapped, instance, args, kwargs):
        seen.append((type(instance).__name__, args, kwargs))
        return wrapped(*args, **kwargs)

    patches = _Patches()
    patches.wrap(Base, "f", ours)
    patches.wrap(Base, "af", (ours, ours))
    try:
        assert Base().f(1, y=2) == ("Base", 1, 2)
        assert Base.f(Child(), 3) == ("Child", 3, 0)
        assert Child().f(4) == ("child", "Child", 4, 0)
        assert asyncio.run(Child().af(5)) == ("async", "Child", 5)
        assert inspect.iscoroutinefunction(Base.af) and str(inspect.signature(Base.f)) == "(self, x, *, y=0)"
        assert seen == [("Base", (1,), {"y": 2}), ("Child", (3,), {}), ("Child", (4,), {"y": 0}),
                        ("Child", (5,), {})]
    finally:
        patches.remove()
    assert Base.__dict__["f"].__name__ == "f" and not hasattr(Base.__dict__["f"], "__wrapped__")


def test_planted_secret_never_exported(server, caplog):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    secret = "sk-planted-SECRET-0123456789abcdef"
    userinfo_secret = "hunter2-userinfo-password"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, capture_content=True, unknown_model="warn")
    try:
        base = server.api_base.replace("http://", f"http://user:{userinfo_secret}@")
        lm = dspy.LM(MODEL, api_base=base, api_key=secret, cache=False,
                     extra_headers={"Authorization": f"Bearer {secret}"})
        caplog.set_level(logging.DEBUG)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question=f"please repeat {secret}")
        dump = "".join(s.to_json() for s in exporter.get_finished_spans())
        assert "gen_ai.input.messages" in dump  # content capture was on
        assert secret not in dump and userinfo_secret not in dump
        ours = "".join(r.getMessage() for r in caplog.records if r.name.startswith("otel_dspy_cost"))
        assert secret not in ours and userinfo_secret not in ours
    finally:
        otel_dspy_cost.uninstrument()


def test_content_off_by_default(otel, lm):
    exporter, _ = otel
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="private words")
    dump = "".join(s.to_json() for s in exporter.get_finished_spans())
    assert "private words" not in dump and A.GEN_AI_INPUT_MESSAGES not in dump


def test_user_exception_propagates_unchanged_with_error_type(otel, lm):
    exporter, _ = otel

    class Boom(dspy.Module):
        def forward(self, x):
            raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        Boom()(x=1)
    (span,) = exporter.get_finished_spans()
    assert span.attributes[A.ERROR_TYPE] == "KeyError"
    assert span.status.status_code.name == "ERROR"


def test_internal_errors_are_logged_never_raised(otel, lm, monkeypatch, caplog):
    from otel_dspy_cost.instrumentation import lm_call
    exporter, provider = otel

    def broken(*a, **k):
        raise RuntimeError("planted bug in end_attributes")

    monkeypatch.setattr(lm_call, "end_attributes", broken)
    monkeypatch.setattr("otel_dspy_cost.telemetry.processor.BudgetSpanProcessor._end_lm", broken)
    caplog.set_level(logging.WARNING)
    with dspy.context(lm=lm):
        out = dspy.Predict("question -> answer")(question="still works?")
    assert out.answer
    assert "planted bug" in caplog.text and "internal error" in caplog.text
    assert any(s.attributes.get(A.SPAN_KIND) == "lm" for s in exporter.get_finished_spans())


def test_cache_hit_is_free_and_economic_is_kept(otel, server, tmp_path):
    exporter, _ = otel
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000000000", cache=True, max_tokens=300)
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        predict(question=f"cache me {tmp_path.name}")
        predict(question=f"cache me {tmp_path.name}")
    first, second = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert server.count == 1
    assert first.attributes[A.CACHE_HIT] is False and second.attributes[A.CACHE_HIT] is True
    assert second.attributes[A.COST_USD] == 0.0
    assert second.attributes[A.GEN_AI_INPUT_TOKENS] == 0
    assert second.attributes[A.COST_ECONOMIC_USD] == pytest.approx(first.attributes[A.COST_ECONOMIC_USD])
    report = otel_dspy_cost.spend_report()
    assert report["total"]["calls"] == 2 and report["total"]["cache_hits"] == 1
    assert report["total"]["usd"] == pytest.approx(first.attributes[A.COST_USD])


def test_missing_usage_counts_the_worst_case_and_warns_once(otel, server, caplog):
    """A provider that reports no usage cannot set its own price: each call counts at its worst case."""
    exporter, _ = otel
    server.sim.include_usage = False
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000000000", cache=False, max_tokens=300)
    caplog.set_level(logging.WARNING)
    with otel_dspy_cost.budget(limit_usd=1.0, label="silent") as b, dspy.context(lm=lm):
        for i in range(3):
            dspy.Predict("question -> answer")(question=f"no usage {i}")
    spans = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert len(spans) == 3
    for s in spans:
        assert s.attributes[A.USAGE_MISSING] is True and s.attributes[A.COST_ESTIMATED] is True
        assert s.attributes[A.COST_ESTIMATE_REASON] == "usage missing"
        assert s.attributes[A.COST_USD] == pytest.approx(s.attributes[A.BUDGET_RESERVED_USD])
    assert b.spent_usd == pytest.approx(sum(s.attributes[A.BUDGET_RESERVED_USD] for s in spans))
    assert caplog.text.count("reported no token usage") == 1 and "missing_usage='estimate'" in caplog.text


def test_missing_usage_estimated_from_the_text_when_asked(server, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn", missing_usage="estimate")
    try:
        server.sim.include_usage = False
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000000000", cache=False, max_tokens=300)
        caplog.set_level(logging.WARNING)
        with dspy.context(lm=lm):
            for i in range(3):
                dspy.Predict("question -> answer")(question=f"no usage {i}")
    finally:
        otel_dspy_cost.uninstrument()
    spans = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert len(spans) == 3
    for s in spans:
        assert s.attributes[A.USAGE_MISSING] is True and s.attributes[A.COST_ESTIMATED] is True
        assert s.attributes[A.GEN_AI_INPUT_TOKENS] > 0 and 0 < s.attributes[A.COST_USD]
    assert caplog.text.count("reported no token usage") == 1


def test_entry_point_registered():
    from importlib.metadata import entry_points

    eps = entry_points(group="opentelemetry_instrumentor")
    assert any(ep.value == "otel_dspy_cost.instrumentation.instrumentor:DSPyCostInstrumentor" for ep in eps)


def test_no_provider_no_endpoint_works_offline_without_hanging(tmp_path, server):
    """A fresh process with no provider and no endpoint: instrument() configures one from OTEL_* and
    never dials localhost:4317."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "app.py"
    script.write_text(f"""
import dspy, otel_dspy_cost
from opentelemetry import trace
otel_dspy_cost.instrument()
provider = trace.get_tracer_provider()
print(provider.resource.attributes["service.name"], provider.resource.attributes.get("team"))
lm = dspy.LM("{MODEL}", api_base="{server.api_base}", api_key="sk-x-000000000", cache=False, max_tokens=100)
with dspy.context(lm=lm), otel_dspy_cost.budget(limit_usd=1.0) as b:
    dspy.Predict("q -> a")(q="hi")
print(b.call_count, otel_dspy_cost.spend_report()["total"]["calls"])
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_SERVICE_NAME="svc-under-test", OTEL_RESOURCE_ATTRIBUTES="team=cost")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svc-under-test", "cost", "1", "1"]
    assert "4317" not in proc.stderr and time.monotonic() - started < 30


def test_opentelemetry_instrument_cli_picks_us_up(tmp_path, server):
    import os
    import shutil
    import subprocess
    import sys

    cli = shutil.which("opentelemetry-instrument", path=os.path.dirname(sys.executable))
    if cli is None:
        pytest.skip("opentelemetry-instrument not installed")
    script = tmp_path / "plain_app.py"
    script.write_text(f"""
import dspy
lm = dspy.LM("{MODEL}", api_base="{server.api_base}", api_key="sk-x-000000000", cache=False, max_tokens=100)
with dspy.context(lm=lm):
    dspy.Predict("q -> a")(q="hi")
import otel_dspy_cost
print(otel_dspy_cost.spend_report()["total"]["calls"])
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    proc = subprocess.run([cli, sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "1"


def test_spans_export_as_json(otel, lm):
    exporter, _ = otel
    with dspy.context(lm=lm):
        dspy.ChainOfThought("question -> answer")(question="json?")
    for s in exporter.get_finished_spans():
        json.loads(s.to_json())


def test_lean_mode_drops_only_the_adapter_spans(server):
    exporter, _ = _instrumented(adapter_spans=False)
    try:
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=64)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="lean?")
        spans = exporter.get_finished_spans()
        assert [s.attributes[A.SPAN_KIND] for s in spans] == ["lm", "predictor"]
        lm_span, predictor = spans
        assert lm_span.parent.span_id == predictor.context.span_id and lm_span.attributes[A.COST_USD] > 0
        assert predictor.attributes[A.TOTAL_USD] == lm_span.attributes[A.COST_USD]
    finally:
        otel_dspy_cost.uninstrument()


def test_adapter_timings_as_attributes_of_the_predictor_span(server):
    """The default, adapter_spans="attributes": two spans per Predict call, format/parse still visible as
    durations."""
    otel_dspy_cost.uninstrument()
    with pytest.raises(ValueError, match="adapter_spans"):
        otel_dspy_cost.instrument(adapter_spans="events")
    exporter, _ = _instrumented()  # the default span model

    class Strict(dspy.ChatAdapter):  # defined after instrument(): wrapped as it is made
        def parse(self, signature, completion):
            raise ValueError("cannot parse")

    try:
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=64)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="timed?")
        spans = exporter.get_finished_spans()
        assert [s.attributes[A.SPAN_KIND] for s in spans] == ["lm", "predictor"]
        predictor = spans[1].attributes
        assert predictor["dspy.adapter.name"] == "ChatAdapter"
        assert 0 < predictor["dspy.adapter.format.duration_s"] < 1
        assert 0 < predictor["dspy.adapter.parse.duration_s"] < 1
        exporter.clear()
        with dspy.context(lm=lm, adapter=Strict()), contextlib.suppress(Exception):
            # DSPy 3.3 catches the failure and falls back to JSONAdapter, 3.4 raises: the event shows it either way
            dspy.Predict("question -> answer")(question="unparseable")
        predictor_span = [s for s in exporter.get_finished_spans() if s.attributes[A.SPAN_KIND] == "predictor"][0]
        assert "dspy.adapter.parse.error" in [e.name for e in predictor_span.events]
    finally:
        otel_dspy_cost.uninstrument()


def test_adapter_timings_outside_a_module_go_onto_the_current_span():
    """An adapter called directly (no module span of ours around it) times onto whatever span is current,
    at once; two formats sum."""
    exporter, provider = _instrumented()
    try:
        signature = dspy.Signature("question -> answer")
        adapter = dspy.ChatAdapter()
        key = "dspy.adapter.format.duration_s"
        with provider.get_tracer("user").start_as_current_span("user work") as live:
            adapter.format(signature, demos=[], inputs={"question": "one"})
            first = live.attributes[key]  # written at once, not when the span ends
            adapter.format(signature, demos=[], inputs={"question": "two"})
            assert live.attributes[key] > first
        (span,) = exporter.get_finished_spans()
        assert span.name == "user work" and span.attributes["dspy.adapter.name"] == "ChatAdapter"
        assert 0 < span.attributes["dspy.adapter.format.duration_s"] < 1
        assert "dspy.adapter.parse.duration_s" not in span.attributes
        exporter.clear()
        adapter.format(signature, demos=[], inputs={"question": "no span"})  # nothing current: nothing written
        assert exporter.get_finished_spans() == ()
    finally:
        otel_dspy_cost.uninstrument()


def test_evaluate_counts_examples_that_raised(otel, lm):
    exporter, _ = otel

    class Flaky(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict("question -> answer")

        def forward(self, question):
            if question.endswith("3") or question.endswith("7"):
                raise ValueError("flaky example")
            return self.answer(question=question)

    devset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(10)]
    with dspy.context(lm=lm):
        dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 1.0, num_threads=4, display_progress=False,
                      max_errors=100)(Flaky())
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "evaluate"]
    assert span.attributes[A.EVAL_ERRORS] == 2 and span.attributes[A.EVAL_SIZE] == 10
    assert span.attributes["dspy.evaluate.metric"] == "<lambda>"
