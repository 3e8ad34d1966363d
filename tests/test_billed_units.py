"""What a provider bills beyond a chat's text tokens: embeddings (`dspy.Embedder`) and streamed answers.

Against the simulator over real HTTP, through DSPy's own engines and LiteLLM; figures hand-computed from the
price lists (text-embedding-3-small $0.02 / 1M input tokens, gpt-4o-mini $0.15 / $0.60).
"""

import asyncio
import json

import dspy
import pytest
from conftest import MODEL, QA, lm_spans

import otel_dspy_cost
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer

EMBEDDING_MODEL = "openai/text-embedding-3-small"


def _embedder(server, **kwargs):
    return dspy.Embedder(EMBEDDING_MODEL, api_base=server.api_base, api_key="sk-test-0000000000", caching=False,
                         **kwargs)


def test_an_embedder_call_is_an_lm_call_with_tokens_cost_and_a_cost_log_row(otel, tmp_path):
    exporter, _ = otel
    with SimulatorServer(SimulatedLM(fixed_usage={"prompt_tokens": 1234})) as server:
        with otel_dspy_cost.record_run(tmp_path / "run") as run, otel_dspy_cost.budget(label="embed") as b:
            vectors = _embedder(server)(["what does a trial cost?", "and a compile?"])
    assert vectors.shape[0] == 2
    (span,) = lm_spans(exporter)
    assert span.attributes[A.GEN_AI_OPERATION] == "embeddings"
    assert span.attributes[A.GEN_AI_INPUT_TOKENS] == 1234 and span.attributes[A.GEN_AI_OUTPUT_TOKENS] == 0
    assert span.attributes[A.COST_USD] == pytest.approx(1234 * 0.02 / 1e6, abs=1e-9)  # $0.00002468
    assert span.attributes[A.COST_ESTIMATED] is False
    assert b.spent_usd == pytest.approx(0.00002468, abs=1e-9) and b.call_count == 1
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "costs.jsonl").read_text().splitlines()]
    assert row["operation"] == "embeddings" and row["model"] == EMBEDDING_MODEL
    assert row["input_tokens"] == 1234 and row["usd"] == pytest.approx(0.00002468, abs=1e-9)
    assert run.summary["total_cost_usd"] == pytest.approx(0.00002468, abs=1e-9)


def test_embeddings_under_a_budget_stop_at_the_cap_before_the_request(otel, server):
    embed = _embedder(server)
    texts = [f"passage {i}: " + "the cost of an optimizer run " * 8 for i in range(4)]
    with otel_dspy_cost.budget(label="probe") as probe:
        embed(texts)
    one = probe.spent_usd
    sent = server.count
    with pytest.raises(otel_dspy_cost.BudgetExceededError):
        with otel_dspy_cost.budget(limit_usd=one * 5.5, label="embeddings-cap") as b:
            for _ in range(50):
                embed(texts)
    assert b.spent_usd <= one * 5.5
    assert b.call_count == server.count - sent  # the refused call never reached the provider
    assert b.call_count >= 4  # near the cap the texts are counted by the model's tokenizer, not per byte


async def _stream_once(program):
    async for _ in program(question="What is two plus two?"):
        pass


def _engines():
    return [None, "litellm"] if dspy.__version__.startswith("3.4") else [None]


def _streamed(lm):
    program = dspy.streamify(dspy.Predict(QA),
                             stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])
    with dspy.context(lm=lm):
        asyncio.run(_stream_once(program))


@pytest.mark.parametrize("engine", _engines())
def test_a_streamed_answer_asks_for_usage_and_counts_reasoning_and_cached_tokens(otel, engine):
    exporter, _ = otel
    sim = SimulatedLM(fixed_usage={"prompt_tokens": 1639, "completion_tokens": 316, "reasoning_tokens": 300,
                                   "cached_tokens": 1024})
    with SimulatorServer(sim) as server:
        lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=400,
                     **({"engine": engine} if engine else {}))
        _streamed(lm)
        (path, body, _) = server.requests[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    (span,) = lm_spans(exporter)
    attrs = span.attributes
    assert attrs[A.COST_ESTIMATED] is False
    assert attrs[A.GEN_AI_INPUT_TOKENS] == 1639 and attrs[A.GEN_AI_OUTPUT_TOKENS] == 316
    assert attrs[A.GEN_AI_REASONING_TOKENS] == 300 and attrs[A.GEN_AI_CACHE_READ_TOKENS] == 1024
    # 615 uncached input at $0.15, 1,024 cached at $0.075, 316 output at $0.60 (per 1M)
    assert attrs[A.COST_USD] == pytest.approx((615 * 0.15 + 1024 * 0.075 + 316 * 0.60) / 1e6, abs=1e-9)


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("missing_usage", ["worst_case", "estimate"])
def test_a_stream_without_usage_is_never_priced_as_exact(engine, missing_usage):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, missing_usage=missing_usage)
    try:
        with SimulatorServer(SimulatedLM(include_usage=False)) as server:
            lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test-0000000000", cache=False,
                         max_tokens=100, **({"engine": engine} if engine else {}))
            with otel_dspy_cost.budget(label="stream") as b:
                _streamed(lm)
    finally:
        otel_dspy_cost.uninstrument()
    (span,) = lm_spans(exporter)
    attrs = span.attributes
    assert attrs[A.COST_ESTIMATED] is True
    if missing_usage == "worst_case":  # what the request allowed: the prompt bound and 100 output tokens
        bound = attrs[A.INPUT_TOKENS_BOUND]
        assert attrs[A.COST_USD] == pytest.approx((bound * 0.15 + 100 * 0.60) / 1e6, abs=1e-9)
        assert b.spent_usd == pytest.approx(attrs[A.COST_USD], abs=1e-12)
    else:
        assert attrs[A.COST_ESTIMATE_REASON] in ("stream without usage", "usage missing")
        assert 0 < attrs[A.COST_USD] < (attrs[A.INPUT_TOKENS_BOUND] * 0.15 + 100 * 0.60) / 1e6


def test_a_users_own_litellm_stream_is_left_as_they_asked(otel, server):
    """Usage is asked for only inside DSPy's calls: a user's own stream would get an extra chunk it never
    asked for (with no choices), which breaks code that reads `chunk.choices[0]`."""
    import litellm

    stream = litellm.completion(model=MODEL, api_base=server.api_base, api_key="sk-test-0000000000",
                                messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=20)
    for _ in stream:
        pass
    (_, body, _) = server.requests[-1]
    assert "stream_options" not in body


# -- audio, images, searches and per-request fees: hand-computed, live through each engine -----------------------

_LITELLM_ENGINE = {"engine": "litellm"} if dspy.__version__.startswith("3.4") else {}
_NATIVE_TOO = [{"engine": "lm15"}, {"engine": "litellm"}] if dspy.__version__.startswith("3.4") else [{}]

# (name, model, usage the provider reports, request kwargs, engines, expected USD, span attributes, how)
UNITS = [
    ("openai audio", "openai/gpt-audio",
     {"prompt_tokens": 1500, "completion_tokens": 800, "audio_input_tokens": 1000, "audio_output_tokens": 500},
     {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, [_LITELLM_ENGINE], 0.06825,
     {A.AUDIO_INPUT_TOKENS: 1000, A.AUDIO_OUTPUT_TOKENS: 500, A.COST_MEDIA_USD: 0.064},
     "500x2.5 + 1,000x32 (audio in) + 300x10 + 500x64 (audio out), per 1M"),
    ("gemini image output", "gemini/gemini-2.5-flash-image",
     {"prompt_tokens": 1000, "completion_tokens": 1390, "image_output_tokens": 1290}, {}, _NATIVE_TOO, 0.03925,
     {A.IMAGE_OUTPUT_TOKENS: 1290, A.COST_MEDIA_USD: 0.0387}, "1,000x0.3 + 100x2.5 + 1,290x30 (image out)"),
    ("gemini audio input", "gemini/gemini-2.5-flash",
     {"prompt_tokens": 2000, "completion_tokens": 200, "audio_input_tokens": 1000}, {}, _NATIVE_TOO, 0.0018,
     {A.AUDIO_INPUT_TOKENS: 1000, A.COST_MEDIA_USD: 0.001}, "1,000x0.3 + 1,000x1.0 (audio in) + 200x2.5"),
    ("gemini grounding", "gemini/gemini-2.5-flash",
     {"prompt_tokens": 1000, "completion_tokens": 200, "web_search_requests": 1}, {"tools": [{"googleSearch": {}}]},
     [_LITELLM_ENGINE], 0.0358, {A.WEB_SEARCH_REQUESTS: 1, A.COST_SEARCH_USD: 0.035},
     "1,000x0.3 + 200x2.5 + 1 grounded query at $35/1,000"),
    ("anthropic web search", "anthropic/claude-sonnet-4",
     {"prompt_tokens": 1000, "completion_tokens": 300, "web_search_requests": 3},
     {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}, [_LITELLM_ENGINE], 0.0375,
     {A.WEB_SEARCH_REQUESTS: 3, A.COST_SEARCH_USD: 0.03}, "1,000x3 + 300x15 + 3 searches at $10/1,000"),
    ("openai search preview", "openai/gpt-4o-mini-search-preview",
     {"prompt_tokens": 1000, "completion_tokens": 300}, {}, _NATIVE_TOO, 0.02533, {A.COST_SEARCH_USD: 0.025},
     "1,000x0.15 + 300x0.6 + $25/1,000 requests"),
]


def _units_cases():
    for name, model, usage, kwargs, engines, usd, attrs, how in UNITS:
        for engine in engines:
            yield pytest.param(model, usage, kwargs, engine, usd, attrs, how,
                               id=f"{name}-{engine.get('engine', 'default')}")


@pytest.mark.parametrize(("model", "usage", "kwargs", "engine", "usd", "attrs", "how"), list(_units_cases()))
def test_each_billed_unit_is_priced_to_the_nano_dollar(otel, model, usage, kwargs, engine, usd, attrs, how):
    exporter, _ = otel
    with SimulatorServer(SimulatedLM(fixed_usage=usage)) as server:
        lm = dspy.LM(model, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=2000,
                     num_retries=0, **engine, **kwargs)
        with dspy.context(lm=lm), otel_dspy_cost.budget(limit_usd=5.0, label="units") as b:
            dspy.Predict(QA)(question="What is in the picture?")
    (span,) = lm_spans(exporter)
    assert span.attributes[A.COST_USD] == pytest.approx(usd, abs=1e-9), how
    for key, value in attrs.items():
        assert span.attributes[key] == pytest.approx(value, abs=1e-9), (key, how)
    assert span.attributes[A.COST_ESTIMATED] is False and A.COST_UNPRICED_UNITS not in span.attributes
    assert b.spent_usd == pytest.approx(usd, abs=1e-9)
    # the worst case covered it: what was reserved is at least what was billed
    assert span.attributes[A.BUDGET_RESERVED_USD] >= usd


@pytest.mark.parametrize(("model", "usage", "kwargs", "engine", "usd", "attrs", "how"), list(_units_cases()))
def test_a_run_of_each_kind_stops_at_its_cap_as_billed(otel, model, usage, kwargs, engine, usd, attrs, how):
    with SimulatorServer(SimulatedLM(fixed_usage=usage)) as server:
        lm = dspy.LM(model, api_base=server.api_base, api_key="sk-test-0000000000", cache=False, max_tokens=2000,
                     num_retries=0, **engine, **kwargs)
        cap = usd * 12.5
        with pytest.raises(otel_dspy_cost.BudgetExceededError), dspy.context(lm=lm):
            with otel_dspy_cost.budget(limit_usd=cap, label="units-cap") as b:
                for i in range(100):
                    dspy.Predict(QA)(question=f"question {i}")
        assert b.spent_usd <= cap + 1e-12 and b.call_count == server.count >= 1
        assert b.spent_usd == pytest.approx(usd * b.call_count, abs=1e-9)  # each call as the simulator billed it


def test_a_request_that_can_cause_an_unpriced_unit_is_refused_before_it_is_sent(otel, server):
    """gemini-2.5-pro has no audio input price (ours or LiteLLM's): with audio in the prompt, no USD cap can be
    kept, so the call is refused before it leaves; outside a budget it goes, and is flagged (below)."""
    lm = dspy.LM("gemini/gemini-2.5-pro", api_base=server.api_base, api_key="sk-test-0000000000", cache=False,
                 max_tokens=100, num_retries=0, **_LITELLM_ENGINE)
    part = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    audio = [{"role": "user", "content": [{"type": "text", "text": "transcribe"}, part]}]
    with pytest.raises(otel_dspy_cost.UnpricedModelError, match="audio_input"):
        with otel_dspy_cost.budget(limit_usd=1.0, label="audio"):
            lm(messages=audio)
    assert server.count == 0


def test_a_unit_billed_without_a_price_is_never_zero_and_is_counted(otel, tmp_path):
    """The provider reports audio input for a model with no audio price: the span names the unit, the call
    counts its worst case (more than its text tokens), and the run's summary counts it."""
    exporter, _ = otel
    usage = {"prompt_tokens": 2000, "completion_tokens": 100, "audio_input_tokens": 1000}
    with SimulatorServer(SimulatedLM(fixed_usage=usage)) as server:
        lm = dspy.LM("gemini/gemini-2.5-pro", api_base=server.api_base, api_key="sk-test-0000000000", cache=False,
                     max_tokens=100, num_retries=0)
        with otel_dspy_cost.record_run(tmp_path / "run") as run, dspy.context(lm=lm), \
                otel_dspy_cost.budget(limit_usd=1.0, label="unpriced") as b:
            dspy.Predict(QA)(question="what was said?")
    (span,) = lm_spans(exporter)
    attrs = span.attributes
    assert attrs[A.COST_UNPRICED_UNITS] == ("audio_input_tokens",)
    assert attrs[A.COST_ESTIMATED] is True and "unpriced unit: audio_input_tokens" in attrs[A.COST_ESTIMATE_REASON]
    text_only = (2000 * 1.25 + 100 * 10) / 1e6
    # the audio at the highest token rate ($10 output), or the reserved worst case if more
    assert attrs[A.COST_USD] >= (1000 * 1.25 + 1000 * 10 + 100 * 10) / 1e6 > text_only
    assert attrs[A.COST_USD] >= attrs[A.BUDGET_RESERVED_USD] - 1e-12
    assert b.spent_usd == pytest.approx(attrs[A.COST_USD], abs=1e-12)
    assert run.summary["unpriced_unit_calls"] == 1
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "costs.jsonl").read_text().splitlines()]
    assert row["unpriced_units"] == ["audio_input_tokens"]


@pytest.mark.parametrize("engine", _NATIVE_TOO, ids=lambda e: e.get("engine", "default"))
def test_deepseek_cache_hits_are_billed_at_the_hit_rate_on_every_engine(otel, engine):
    """DeepSeek reports hits as `prompt_cache_hit_tokens` (no `prompt_tokens_details`): LiteLLM maps them, DSPy
    3.4's native engine does not, and we read them from its answer."""
    exporter, _ = otel
    usage = {"prompt_tokens": 10_000, "completion_tokens": 500, "cached_tokens": 8_000}
    with SimulatorServer(SimulatedLM(fixed_usage=usage)) as server:
        lm = dspy.LM("deepseek/deepseek-chat", api_base=server.api_base, api_key="sk-test-0000000000", cache=False,
                     max_tokens=600, num_retries=0, **engine)
        with dspy.context(lm=lm):
            dspy.Predict(QA)(question="what is cached?")
    (span,) = lm_spans(exporter)
    assert span.attributes[A.GEN_AI_CACHE_READ_TOKENS] == 8_000
    # LiteLLM's deepseek-chat rates: 2,000x0.28 + 8,000x0.028 (hits) + 500x0.42, per 1M
    assert span.attributes[A.COST_USD] == pytest.approx(0.000994, abs=1e-9)
