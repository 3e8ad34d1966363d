"""Prices to the cent: hand-computed figures for every provider path, tier, prompt size and date.

Each case's figure is worked out by hand from the provider's list price (USD per 1M tokens), written
next to it, so the test fails if the catalog, the resolver or the arithmetic drifts. The live cases make
real HTTP calls through DSPy's own engines to the simulator speaking OpenAI, Anthropic and Gemini.
"""

import datetime as dt
import json
import logging
import subprocess
import sys

import dspy
import pytest

from otel_dspy_cost import _attributes as A
from otel_dspy_cost.pricing.cost import Usage, compute_cost
from otel_dspy_cost.pricing.resolver import PricingResolver, lookup
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer


def D(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)


def U(inp, out, read=0, write=0, reasoning=0, write_1h=0, audio_in=0, audio_out=0, image_out=0, searches=0):
    return Usage(inp, out, cache_read_tokens=read, cache_creation_tokens=write, reasoning_tokens=reasoning,
                 cache_write_1h_tokens=write_1h, audio_input_tokens=audio_in, audio_output_tokens=audio_out,
                 image_output_tokens=image_out, web_search_requests=searches)


# (model, usage, tier, date or None for now, expected USD, how)
CASES = [
    ("openai/gpt-4o-mini", U(10_000, 1_000, read=8_000), None, None, 0.0015,
     "2,000x0.15 + 8,000x0.075 + 1,000x0.60"),
    ("openai/gpt-4o-mini", U(10_000, 1_000, read=8_000), "batch", None, 0.00105,
     "2,000x0.075 + 8,000x0.075 (no batch cache discount) + 1,000x0.30"),
    ("openai/gpt-4o-mini", U(10_000, 1_000, read=8_000), "priority", None, 0.0025,
     "2,000x0.25 + 8,000x0.125 + 1,000x1.00"),
    ("openai/gpt-4o", U(10_000, 1_000), None, "2024-06-01", 0.065, "v1 launch price: 10,000x5 + 1,000x15"),
    ("openai/gpt-4o", U(10_000, 1_000, read=4_000), None, None, 0.03, "6,000x2.5 + 4,000x1.25 + 1,000x10"),
    ("openai/gpt-4o", U(10_000, 1_000, read=4_000), "priority", None, 0.051,
     "6,000x4.25 + 4,000x2.125 + 1,000x17"),
    ("openai/gpt-4o-2024-05-13", U(10_000, 1_000), None, "2025-01-01", 0.065,
     "the 05-13 snapshot kept $5/$15 after gpt-4o moved on"),
    ("openai/gpt-4o-2024-08-06", U(10_000, 1_000, read=4_000), None, "2024-09-01", 0.03,
     "the 08-06 snapshot at $2.5/$1.25/$10 from its release, before the alias moved"),
    ("openai/gpt-4.1", U(10_000, 2_000, read=2_000), "priority", None, 0.05775,
     "8,000x3.5 + 2,000x0.875 + 2,000x14"),
    ("openai/gpt-4.1", U(10_000, 2_000, read=2_000), "batch", None, 0.017, "8,000x1 + 2,000x0.5 + 2,000x4"),
    ("openai/o3", U(5_000, 3_000, reasoning=2_000), None, "2025-05-01", 0.17, "before the cut: 5,000x10 + 3,000x40"),
    ("openai/o3", U(5_000, 3_000, reasoning=2_000), None, None, 0.034, "5,000x2 + 3,000x8"),
    ("openai/o3", U(5_000, 3_000, read=1_000), "flex", None, 0.01625, "4,000x1 + 1,000x0.25 + 3,000x4"),
    ("openai/o4-mini", U(10_000, 1_000, read=5_000), "flex", None, 0.00564,
     "5,000x0.55 + 5,000x0.138 + 1,000x2.2"),
    ("openai/gpt-5", U(20_000, 5_000, read=10_000, reasoning=4_000), None, None, 0.06375,
     "10,000x1.25 + 10,000x0.125 + 5,000x10 (reasoning at the output rate)"),
    ("openai/gpt-5", U(20_000, 5_000, read=10_000, reasoning=4_000), "priority", None, 0.1275,
     "10,000x2.5 + 10,000x0.25 + 5,000x20"),
    ("openai/gpt-5", U(20_000, 5_000, read=10_000, reasoning=4_000), "batch", None, 0.031875,
     "10,000x0.625 + 10,000x0.0625 + 5,000x5"),
    ("openai/gpt-5.4", U(300_000, 1_000), None, None, 1.5225,
     "LiteLLM fallback, above 272k: 300,000x5 + 1,000x22.5"),
    ("openai/gpt-5.4", U(300_000, 1_000), "batch", None, 0.76125,
     "LiteLLM fallback, batch above 272k: 300,000x2.5 + 1,000x11.25"),
    ("openai/gpt-5.4", U(100_000, 1_000), None, None, 0.265, "below 272k: 100,000x2.5 + 1,000x15"),
    ("anthropic/claude-sonnet-4", U(10_000, 1_500, read=2_000, write=1_000, write_1h=400), None, None, 0.04875,
     "7,000x3 + 2,000x0.3 + 600x3.75 (5m) + 400x6 (1h) + 1,500x15"),
    ("anthropic/claude-sonnet-4", U(250_000, 1_000), "batch", None, 0.76125,
     "batch of the long-context rates: 250,000x3 + 1,000x11.25"),
    ("anthropic/claude-sonnet-4", U(250_000, 2_000, read=50_000, write=10_000, write_1h=10_000), None, None,
     1.335, "long context: 190,000x6 + 50,000x0.6 + 10,000x12 (1h) + 2,000x22.5"),
    ("anthropic/claude-opus-4-1", U(10_000, 1_000), "batch", None, 0.1125, "10,000x7.5 + 1,000x37.5"),
    ("anthropic/claude-opus-4-1", U(10_000, 1_000, write=4_000, write_1h=4_000), "batch", None, 0.1425,
     "6,000x7.5 + 4,000x15 (1h batch) + 1,000x37.5"),
    ("anthropic/claude-3-5-haiku-20241022", U(20_000, 1_000, read=10_000, write=2_000), None, None, 0.0132,
     "8,000x0.8 + 10,000x0.08 + 2,000x1.0 + 1,000x4"),
    ("gemini/gemini-2.5-pro", U(10_000, 1_500, read=2_000, reasoning=500), None, None, 0.02525,
     "8,000x1.25 + 2,000x0.125 + 1,500x10"),
    ("gemini/gemini-2.5-pro", U(10_000, 1_500, read=2_000, reasoning=500), None, "2025-07-01", 0.02562,
     "v1's cached rate then: 8,000x1.25 + 2,000x0.31 + 1,500x10"),
    ("gemini/gemini-2.5-pro", U(300_000, 2_000, read=100_000), None, None, 0.555,
     "above 200k: 200,000x2.5 + 100,000x0.25 + 2,000x15"),
    ("gemini/gemini-2.5-pro", U(300_000, 2_000, read=100_000), "batch", None, 0.29,
     "batch above 200k: 200,000x1.25 + 100,000x0.25 + 2,000x7.5"),
    ("gemini/gemini-2.5-flash", U(10_000, 2_000, read=2_000, reasoning=1_000), "flex", None, 0.00376,
     "8,000x0.15 + 2,000x0.03 + 2,000x1.25"),
    ("gemini/gemini-2.5-flash", U(1_000, 10_000, reasoning=8_000), "batch", None, 0.01265,
     "thinking is output, halved in batch too: 1,000x0.15 + 10,000x1.25"),
    ("gemini/gemini-2.0-flash", U(10_000, 1_000, read=4_000), "batch", None, 0.0006,
     "6,000x0.05 + 4,000x0.025 + 1,000x0.2"),
    ("openai/ft:gpt-4o-mini-2024-07-18:acme::abc123", U(10_000, 1_000, read=8_000), None, None, 0.003,
     "2x premium of a mini base: 2,000x0.3 + 8,000x0.15 + 1,000x1.2"),
    ("openai/ft:gpt-4.1-nano-2025-04-14:acme::abc123", U(10_000, 1_000, read=5_000), None, None, 0.00205,
     "2x premium of a nano base: 5,000x0.2 + 5,000x0.05 + 1,000x0.8"),
    ("openai/ft:gpt-4.1-2025-04-14:acme::abc123", U(10_000, 1_000, read=2_000), None, None, 0.0375,
     "no premium for a full-size base: LiteLLM's ft: price, 8,000x3 + 2,000x0.75 + 1,000x12"),
    ("openai/ft:gpt-4o-2024-08-06:acme::abc123", U(10_000, 1_000), None, None, 0.0525,
     "the catalog's fine-tuned gpt-4o entry: 10,000x3.75 + 1,000x15"),
    ("ollama_chat/llama3.1", U(10_000, 1_000), None, None, 0.0, "a local model spends nothing"),
    # -- price data fixed at its source (issue 29) --
    ("anthropic/claude-sonnet-4-5", U(250_000, 567), None, None, 1.5127575,
     "above 200k input tokens: 250,000x6 + 567x22.5 (Anthropic's long-context rates, not LiteLLM's <=200k)"),
    ("anthropic/claude-opus-4-5", U(10_000, 1_000, write=4_000, write_1h=4_000), "batch", None, 0.0475,
     "LiteLLM-priced, batch halves 1-hour writes too: 6,000x2.5 + 4,000x5 + 1,000x12.5"),
    ("openai/ft:gpt-4o-2024-08-06:acme::abc123", U(10_000, 1_000, read=4_000), "batch", None, 0.02625,
     "as its explanation says: 6,000x1.875 + 4,000x1.875 (cached at the batch input rate) + 1,000x7.5"),
    # -- billed apart from text tokens (issue 29) --
    ("openai/gpt-audio", U(1_500, 800, audio_in=1_000, audio_out=500), None, None, 0.06825,
     "LiteLLM's rates: 500x2.5 + 1,000x32 (audio in) + 300x10 + 500x64 (audio out)"),
    ("openai/gpt-audio", U(1_500, 800, read=200, audio_in=1_000, audio_out=500), None, None, 0.06825,
     "no cached-input rate: the 200 cached text tokens at the input rate, as before"),
    ("gemini/gemini-2.5-flash-image", U(1_000, 1_390, image_out=1_290), None, None, 0.03925,
     "1,000x0.3 + 100x2.5 + 1,290x30 (image out)"),
    ("gemini/gemini-2.5-flash", U(2_000, 200, audio_in=1_000), None, None, 0.0018,
     "1,000x0.3 + 1,000x1.0 (audio in) + 200x2.5"),
    ("gemini/gemini-2.5-flash", U(2_000, 200, audio_in=1_000), "batch", None, 0.0009,
     "1,000x0.15 + 1,000x0.5 (batch audio in) + 200x1.25"),
    ("gemini/gemini-2.5-flash", U(1_000, 200, searches=1), None, None, 0.0358,
     "1,000x0.3 + 200x2.5 + 1 grounded query at $35/1,000"),
    ("anthropic/claude-sonnet-4", U(1_000, 300, searches=3), None, None, 0.0375,
     "1,000x3 + 300x15 + 3 web searches at $10/1,000"),
    ("anthropic/claude-sonnet-4", U(1_000, 300, searches=3), "batch", None, 0.03375,
     "batch halves tokens, not searches: 1,000x1.5 + 300x7.5 + 3x$0.01"),
    ("openai/gpt-4o-mini-search-preview", U(1_000, 300), None, None, 0.02533,
     "1,000x0.15 + 300x0.6 + one request at $25/1,000"),
    ("openai/gpt-4o-mini", U(1_000, 300, searches=2), None, None, 0.05033,
     "web search tool calls: 1,000x0.15 + 300x0.6 + 2 at $25/1,000"),
]


@pytest.mark.parametrize(("model", "usage", "tier", "when", "expected", "how"), CASES,
                         ids=[f"{c[0]}-{c[2] or 'standard'}-{c[3] or 'now'}-{c[1].input_tokens}" for c in CASES])
def test_price_to_the_cent(model, usage, tier, when, expected, how):
    entry = PricingResolver().lookup(model, tier=tier, when=D(when) if when else None)
    cost = compute_cost(usage, entry)
    assert cost.usd == pytest.approx(expected, rel=1e-9, abs=1e-12), how


def test_there_are_at_least_thirty_cases_over_three_providers():
    assert len(CASES) >= 30
    assert {c[0].split("/")[0] for c in CASES} >= {"openai", "anthropic", "gemini"}


def test_economic_cost_is_every_input_token_at_the_input_rate():
    # claude-sonnet-4: 10,000x3 + 1,500x15, whatever was cached or written
    entry = PricingResolver().lookup("anthropic/claude-sonnet-4")
    cost = compute_cost(U(10_000, 1_500, read=2_000, write=1_000, write_1h=400), entry, cache_hit=True)
    assert (cost.usd, cost.economic_usd) == (0.0, pytest.approx(0.0525))


# -- the entry says which tier and which history it priced from ---------------------------------------------

def test_lookup_of_a_tier_returns_that_tiers_rates():
    entry = lookup("openai/gpt-4o-mini", tier="batch")
    assert (entry.tier, entry.rates.input, entry.rates.output) == ("batch", 0.075, 0.30)
    assert entry.standard_rates.input == 0.15
    assert lookup("openai/gpt-4o-mini").rates.input == 0.15


def test_a_date_before_the_history_uses_the_first_price_and_says_so(caplog):
    caplog.set_level(logging.WARNING)
    resolver = PricingResolver()
    entry = resolver.lookup("openai/gpt-4o", when=D("2020-01-01"))
    assert (entry.source, entry.price_version, entry.rates.input) == ("catalog", 1, 5.0)
    assert entry.fallback.startswith("before_history")
    resolver.lookup("openai/gpt-4o", when=D("2019-01-01"))
    assert caplog.text.count("is before the first price of openai/gpt-4o") == 1  # once per model


def test_a_past_date_on_litellms_price_says_it_is_todays():
    entry = PricingResolver().lookup("openai/gpt-5.4", when=D("2020-01-01"))
    assert entry.source == "litellm" and entry.fallback.startswith("no_history")
    as_of = PricingResolver(run_started_at=D("2020-01-01")).lookup("openai/gpt-5.4")  # instrument(prices_as_of=)
    assert as_of.fallback.startswith("no_history")
    assert PricingResolver().lookup("openai/gpt-5.4").fallback is None  # today's run: today's price, no caveat


def test_a_gap_in_the_history_uses_the_last_price_before_it(tmp_path):
    path = tmp_path / "gap.json"
    path.write_text(json.dumps({"schema_version": 1, "catalog_version": "t", "currency": "USD", "entries": [
        {"provider": "acme", "model": "m", "price_version": 1, "effective_at": "2025-01-01T00:00:00Z",
         "expires_at": "2025-02-01T00:00:00Z", "input": 1.0, "output": 2.0},
        {"provider": "acme", "model": "m", "price_version": 2, "effective_at": "2025-03-01T00:00:00Z",
         "input": 3.0, "output": 4.0}]}))
    entry = PricingResolver(path, use_litellm=False).lookup("acme/m", when=D("2025-02-15"))
    assert (entry.price_version, entry.rates.input) == (1, 1.0) and entry.fallback.startswith("history_gap")


def test_an_unknown_fine_tune_is_priced_at_its_base_and_says_so():
    entry = PricingResolver().lookup("openai/ft:gpt-5-2025-08-07:acme::xyz")
    assert entry.rates.input == 1.25 and entry.fallback.startswith("fine_tune_at_base")


def test_a_fine_tune_inherits_the_base_price_in_force():
    # ft:gpt-4o priced by the catalog's fine-tuned entry, over gpt-4o as it is now (not v1: 4,096 tokens, no tiers)
    entry = PricingResolver().lookup("openai/ft:gpt-4o-2024-08-06:acme::abc")
    assert entry.max_output_tokens == 16_384 and "batch" in entry.tiers
    assert entry.rates_for("batch").input == pytest.approx(1.875)  # half of 3.75


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_lookup_prints_the_tiers_rates_and_the_fallback():
    batch = _cli("pricing", "lookup", "openai/gpt-4o-mini", "--tier", "batch")
    assert batch.returncode == 0, batch.stderr
    shown = json.loads(batch.stdout)
    assert shown["tier"] == "batch" and shown["rates"]["input"] == 0.075 and shown["standard_rates"]["input"] == 0.15
    long = json.loads(_cli("pricing", "lookup", "anthropic/claude-sonnet-4", "--tier", "batch",
                           "--input-tokens", "250000").stdout)
    assert long["rates"]["input"] == 3.0 and long["rates"]["output"] == 11.25
    old = _cli("pricing", "lookup", "openai/gpt-5.4", "--when", "2020-01-01")
    assert old.returncode == 0 and "no_history" in old.stderr and json.loads(old.stdout)["fallback"]


# -- pricing diff ---------------------------------------------------------------------------------------------

def test_pricing_diff_finds_no_unexplained_disagreement_in_the_shipped_catalog():
    result = _cli("pricing", "diff")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 unexplained" in result.stdout


def test_pricing_diff_compares_cloud_keys_and_premium_fine_tunes_and_says_why():
    """Claude models LiteLLM lists only under Bedrock's key are compared there, and fine-tunes priced by the
    premium against LiteLLM's ft: records; every disagreement kept is printed with its reason."""
    result = _cli("pricing", "diff")
    out = result.stdout
    assert "[anthropic.claude-sonnet-4-20250514-v1:0]" in out and "[anthropic.claude-opus-4-1-20250805-v1:0]" in out
    assert "openai/gpt-4o-mini@fine-tuned (premium)" in out and "[ft:gpt-4o-mini-2024-07-18]" in out
    disagreements = [line for line in out.splitlines() if "| LiteLLM" in line]
    assert disagreements and all("(explained: " in line for line in disagreements)
    assert "not in LiteLLM's map (not compared): gemini/gemini-2.0-flash" in out


def test_pricing_diff_lists_each_field_and_appends_litellms_figures(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"schema_version": 1, "catalog_version": "t", "currency": "USD", "entries": [
        {"provider": "openai", "model": "gpt-4o-mini", "price_version": 1, "effective_at": "2024-07-18T00:00:00Z",
         "input": 0.15, "cached_input": 0.1, "output": 0.6, "max_output_tokens": 16384,
         "tiers": {"batch": {"input": 0.075, "output": 0.3}}},
        {"provider": "openai", "model": "gpt-4.1", "price_version": 1, "effective_at": "2025-04-14T00:00:00Z",
         "input": 2.0, "cached_input": 0.5, "output": 9.0, "max_output_tokens": 32768, "web_search": 25.0,
         "tiers": {"batch": {"input": 1.0, "output": 4.0}, "priority": {"input": 3.5, "cached_input": 0.875,
                                                                         "output": 14.0}},
         "differs_from_litellm": {"output": "a negotiated price"}}]}))
    before = _cli("pricing", "diff", "--file", str(path))
    assert before.returncode == 1
    assert "openai/gpt-4o-mini v1  cached_input: ours 0.1 | LiteLLM 0.075" in before.stdout
    assert "openai/gpt-4o-mini v1  tiers.priority: ours None | LiteLLM present" in before.stdout
    assert "(explained: a negotiated price)" in before.stdout
    appended = _cli("pricing", "diff", "--file", str(path), "--append", "--effective-at", "2026-01-01T00:00:00Z")
    assert appended.returncode == 0 and "1 new price versions" in appended.stdout
    data = json.loads(path.read_text())
    new = data["entries"][-1]
    assert (new["model"], new["price_version"], new["effective_at"]) == ("gpt-4o-mini", 2, "2026-01-01T00:00:00Z")
    assert new["cached_input"] == 0.075 and new["tiers"]["priority"]["input"] == 0.25
    assert new["web_search"] == 25.0  # every field we bill: web search tool calls, $25 per 1,000
    assert data["entries"][0]["cached_input"] == 0.1  # append-only: v1 untouched
    after = _cli("pricing", "diff", "--file", str(path))
    assert after.returncode == 0 and " 0 unexplained" in after.stdout
    resolver = PricingResolver(path, use_litellm=False)
    assert resolver.lookup("openai/gpt-4o-mini", when=D("2025-06-01")).rates.cached_input == 0.1
    assert resolver.lookup("openai/gpt-4o-mini", when=D("2026-06-01")).rates.cached_input == 0.075


# -- cache hits: the economic cost of a hit is the uncached price of the first call's usage ------------------

_FIXED = {"prompt_tokens": 10_000, "completion_tokens": 1_500, "cached_tokens": 2_000, "reasoning_tokens": 500}
LIVE = [
    # model, usage the provider reports, billed USD of the live call, economic USD (live and cached), how
    ("openai/gpt-4o-mini", _FIXED, 0.00225, 0.0024,
     "billed 8,000x0.15 + 2,000x0.075 + 1,500x0.6; economic 10,000x0.15 + 1,500x0.6"),
    ("anthropic/claude-sonnet-4", {"prompt_tokens": 10_000, "completion_tokens": 1_500, "cached_tokens": 2_000,
                                   "cache_write_tokens": 1_000, "cache_write_1h_tokens": 400}, 0.04875, 0.0525,
     "billed 7,000x3 + 2,000x0.3 + 600x3.75 + 400x6 + 1,500x15; economic 10,000x3 + 1,500x15"),
    ("gemini/gemini-2.5-pro", _FIXED, 0.02525, 0.0275,
     "billed 8,000x1.25 + 2,000x0.125 + 1,500x10 (thoughts are output); economic 10,000x1.25 + 1,500x10"),
]
_ENGINES = ["lm15", "litellm"] if dspy.__version__.startswith("3.4") else [None]


@pytest.mark.parametrize("engine", _ENGINES)
@pytest.mark.parametrize(("model", "usage", "billed", "economic", "how"), LIVE, ids=[c[0] for c in LIVE])
def test_a_cache_hit_is_worth_the_uncached_price_of_its_first_call(otel, tmp_path, engine, model, usage, billed,
                                                                     economic, how):
    exporter, _ = otel
    options = {"engine": engine} if engine else {}
    with SimulatorServer(SimulatedLM(fixed_usage=usage)) as srv:
        lm = dspy.LM(model, api_base=srv.api_base, api_key="sk-x-00000000", cache=True, max_tokens=2_000,
                     num_retries=0, **options)
        with dspy.context(lm=lm):
            for _ in range(2):
                dspy.Predict("question -> answer")(question=f"cache me {tmp_path.name} {engine}")
        assert srv.count == 1
    live, hit = [s.attributes for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert (live[A.CACHE_HIT], hit[A.CACHE_HIT]) == (False, True)
    assert live[A.COST_USD] == pytest.approx(billed, rel=1e-9), how
    assert live[A.COST_ECONOMIC_USD] == pytest.approx(economic, rel=1e-9), how
    assert hit[A.COST_USD] == 0.0 and hit[A.GEN_AI_INPUT_TOKENS] == 0
    assert hit[A.COST_ECONOMIC_USD] == pytest.approx(economic, rel=1e-9), how
    assert not hit[A.COST_ESTIMATED] and hit[A.PRICING_SOURCE] == "catalog"
    assert live[A.GEN_AI_COST_AMOUNT] == live[A.COST_USD] and live[A.GEN_AI_COST_CURRENCY] == "USD"
    if usage.get("cache_write_1h_tokens"):
        assert live[A.CACHE_WRITE_1H_TOKENS] == usage["cache_write_1h_tokens"]


def test_a_past_dated_run_marks_its_spans_with_the_fallback(server):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import otel_dspy_cost

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, prices_as_of="2020-01-01")
    try:
        lm = dspy.LM("openai/gpt-4o", api_base=server.api_base, api_key="sk-x-00000000", cache=False,
                     max_tokens=64, num_retries=0)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="how much?")
    finally:
        otel_dspy_cost.uninstrument()
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get(A.SPAN_KIND) == "lm"]
    assert span.attributes[A.PRICING_FALLBACK] == "before_history" and span.attributes[A.PRICING_VERSION] == 1
