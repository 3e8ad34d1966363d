"""Pricing catalog and per-call cost: worked examples by hand, malformed catalogs, unknown models."""

import datetime as dt
import json

import pytest

from otel_dspy_cost.errors import CatalogError, UnknownModelError, UnpricedModelError
from otel_dspy_cost.pricing.catalog import Catalog, default_catalog_path
from otel_dspy_cost.pricing.cost import Usage, compute_cost
from otel_dspy_cost.pricing.engine import CostEngine
from otel_dspy_cost.pricing.resolver import PricingResolver

UTC = dt.UTC


@pytest.fixture(scope="module")
def resolver():
    return PricingResolver(use_litellm=False, run_started_at=dt.datetime(2026, 1, 1, tzinfo=UTC))


def test_shipped_catalog_validates():
    catalog = Catalog.from_path(default_catalog_path(), source="catalog")
    assert len(catalog.entries) >= 20 and catalog.currency == "USD"


def test_cached_input_worked_example(resolver):
    # gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out per 1M. 10,000 prompt tokens of which 8,000 cached,
    # 1,000 out: 2,000*0.15 + 8,000*0.075 + 1,000*0.60 = 300 + 600 + 600 = 1,500 micro-$ = $0.0015.
    cost = compute_cost(Usage(10_000, 1_000, cache_read_tokens=8_000), resolver.lookup("openai/gpt-4o-mini"))
    assert cost.usd == pytest.approx(0.0015)
    assert cost.cached_input_usd == pytest.approx(0.0006)
    # uncached it would have been 10,000*0.15 + 600 = 2,100 micro-$
    assert cost.economic_usd == pytest.approx(0.0021)


def test_reasoning_tokens_worked_example(resolver):
    # o3-mini: $1.10 in, $4.40 out; 5,000 output tokens of which 4,000 reasoning, billed as output.
    cost = compute_cost(Usage(1_000, 5_000, reasoning_tokens=4_000), resolver.lookup("openai/o3-mini"))
    assert cost.reasoning_usd == pytest.approx(4_000 * 4.40 / 1e6)
    assert cost.output_usd == pytest.approx(1_000 * 4.40 / 1e6)
    assert cost.usd == pytest.approx((1_000 * 1.10 + 5_000 * 4.40) / 1e6)


def test_anthropic_cache_write_and_long_context(resolver):
    entry = resolver.lookup("anthropic/claude-sonnet-4-20250514")
    cost = compute_cost(Usage(3_000, 100, cache_read_tokens=1_000, cache_creation_tokens=1_000), entry)
    assert cost.usd == pytest.approx((1_000 * 3.0 + 1_000 * 0.30 + 1_000 * 3.75 + 100 * 15.0) / 1e6)
    long = compute_cost(Usage(250_000, 1_000), entry)
    assert long.usd == pytest.approx((250_000 * 6.0 + 1_000 * 22.5) / 1e6)


@pytest.mark.parametrize("tier", [None, "batch"])
def test_the_engine_prices_like_the_arithmetic_on_both_sides_of_the_long_context_threshold(resolver, tier):
    """CostEngine keeps each model's rates from its first call: every later call, short or long, in any tier,
    must price exactly as compute_cost/worst_case_usd do from the entry."""
    from otel_dspy_cost.pricing.cost import worst_case_usd

    engine = CostEngine(resolver, unknown_model="error", tier=tier)
    model = "anthropic/claude-sonnet-4-20250514"
    entry = resolver.lookup(model, tier=tier)
    for usage in (Usage(3_000, 100, cache_read_tokens=1_000, cache_creation_tokens=1_000), Usage(250_000, 1_000),
                  Usage(2_000, 50), Usage(300_000, 10, cache_read_tokens=100_000)):
        assert engine.cost(model, usage) == compute_cost(usage, entry, tier=tier)
    for bound, max_tokens in ((1_000, 512), (250_000, 512), (10, None), (199_000, 64_000)):
        total, _, _ = worst_case_usd(entry, bound, max_tokens or entry.max_output_tokens or 16_384, tier)
        assert engine.worst_case(model, bound, max_tokens)[0] == total
        assert engine.worst_case(model, bound, max_tokens, n=3)[0] == total * 3



class _TruthyZero(int):
    """0 that tests true: sends a usage down compute_cost's general arithmetic with nothing cached or reasoned."""

    def __bool__(self) -> bool:
        return True


@pytest.mark.parametrize("tier", [None, "batch"])
def test_the_usual_calls_shortcut_prices_exactly_like_the_general_arithmetic(resolver, tier):
    """compute_cost skips the zero cache/reasoning terms for the usual call: every field must be the same floats
    the general arithmetic gives, for every priced catalog entry and a spread of token counts."""
    catalog = Catalog.from_path(default_catalog_path(), source="catalog")
    models = sorted({f"{e.provider}/{e.model}" for e in catalog.entries})
    checked = 0
    for model in models:
        try:
            entry = resolver.lookup(model, tier=tier)
        except (UnknownModelError, UnpricedModelError):
            continue
        for inputs, outputs in ((1, 1), (137, 20), (10_000, 1_000), (123_457, 7), (0, 4_097)):
            fast = compute_cost(Usage(inputs, outputs), entry, tier=tier)
            general = compute_cost(Usage(inputs, outputs, cache_read_tokens=_TruthyZero(0)), entry, tier=tier)
            assert fast == general, (model, inputs, outputs)
            checked += 1
    assert checked > 50
def test_batch_tier(resolver):
    entry = resolver.lookup("openai/gpt-4o-mini", tier="batch")
    cost = compute_cost(Usage(1_000_000, 1_000_000), entry, tier="batch")
    assert cost.usd == pytest.approx(0.075 + 0.30)
    with pytest.raises(KeyError, match="no 'flex' tier"):
        resolver.lookup("openai/gpt-4o-mini", tier="flex")


def test_price_change_mid_history_and_pinned_version(resolver):
    before = resolver.lookup("openai/gpt-4o", when=dt.datetime(2024, 6, 1, tzinfo=UTC))
    after = resolver.lookup("openai/gpt-4o", when=dt.datetime(2025, 1, 1, tzinfo=UTC))
    assert (before.price_version, before.rates.input) == (1, 5.0)
    assert (after.price_version, after.rates.input) == (2, 2.5)
    assert resolver.lookup("openai/o3").rates.input == 2.0  # default `when`: the run's start
    pinned = resolver.lookup("openai/o3", price_version=1)
    assert pinned.rates.input == 10.0 and pinned.price_version == 1


def test_fine_tuned_models(resolver):
    premium = resolver.lookup("openai/ft:gpt-4o-mini-2024-07-18:acme::abc123")
    assert premium.variant == "fine-tuned" and premium.rates.input == pytest.approx(0.30)
    assert premium.rates.output == pytest.approx(1.20)
    explicit = resolver.lookup("openai/ft:gpt-4o-2024-08-06:acme::xyz")
    assert explicit.rates.input == 3.75 and explicit.rates.output == 15.0  # entry override beats the premium
    assert resolver.training_price("openai/gpt-4o-mini").per_1m_training_tokens == 3.0


def test_local_model_actual_zero_economic_from_rates():
    resolver = PricingResolver(use_litellm=False, local_models={"ollama_chat/llama3": {"input": 0.2, "output": 0.4}})
    cost = compute_cost(Usage(1_000_000, 1_000_000), resolver.lookup("ollama_chat/llama3"))
    assert cost.usd == 0.0 and cost.economic_usd == pytest.approx(0.6) and cost.source == "local"
    assert compute_cost(Usage(10, 10), resolver.lookup("hosted_vllm/anything")).usd == 0.0


def test_localhost_endpoint_is_priced_by_model_name(resolver):
    assert resolver.lookup("openai/gpt-4o-mini").source == "catalog"  # api_base plays no part


def test_unknown_model_error_names_nearest(resolver):
    with pytest.raises(UnknownModelError) as info:
        resolver.lookup("openai/gpt-4o-mimi")
    assert "gpt-4o-mimi" in str(info.value) and "openai/gpt-4o-mini" in str(info.value)


def test_unknown_model_policies(resolver, caplog, monkeypatch):
    with pytest.raises(UnpricedModelError):
        CostEngine(resolver, unknown_model="error").worst_case("acme/mystery-1", 10, 10)
    warn = CostEngine(resolver, unknown_model="warn")
    cost = warn.cost("acme/mystery-1", Usage(10, 10))
    assert cost.unknown and cost.source == "unknown"
    warn.cost("acme/mystery-1", Usage(10, 10))
    assert caplog.text.count("recorded as unknown") == 1
    monkeypatch.setenv("CI", "true")
    with pytest.raises(UnpricedModelError):  # prompt never prompts in CI: it refuses
        CostEngine(resolver, unknown_model="prompt").entry_for("acme/mystery-2")


def test_litellm_fallback_is_local_and_labelled():
    resolver = PricingResolver()
    entry = resolver.lookup("openai/gpt-3.5-turbo")
    assert entry.source == "litellm" and entry.rates.input > 0


def test_overrides_win(tmp_path):
    resolver = PricingResolver({"openai/gpt-4o-mini": {"input": 1.0, "output": 2.0}}, use_litellm=False)
    entry = resolver.lookup("openai/gpt-4o-mini")
    assert entry.source == "override" and entry.rates.input == 1.0


def _catalog(tmp_path, entries, name="cat.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"schema_version": 1, "catalog_version": "t", "currency": "USD", "entries": entries}))
    return path


GOOD = {"provider": "p", "model": "m", "price_version": 1, "effective_at": "2025-01-01T00:00:00Z",
        "input": 1.0, "output": 2.0}


def test_malformed_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"entries": [')
    with pytest.raises(CatalogError, match=r"bad\.json: invalid JSON at line 1"):
        Catalog.from_path(path)


def test_malformed_missing_rate(tmp_path):
    entry = {k: v for k, v in GOOD.items() if k != "output"}
    with pytest.raises(CatalogError, match=r"cat\.json: entries\[0\] \(p/m v1\): field 'output': missing rate"):
        Catalog.from_path(_catalog(tmp_path, [entry]))


def test_malformed_negative_price(tmp_path):
    with pytest.raises(CatalogError, match=r"entries\[1\] \(p/m v2\): field 'input': -1 is less than the minimum"):
        Catalog.from_path(_catalog(tmp_path, [GOOD, {**GOOD, "price_version": 2, "input": -1}]))


def test_malformed_overlapping_ranges(tmp_path):
    with pytest.raises(CatalogError, match=r"p/m v1: field 'effective_at': overlapping effective ranges"):
        Catalog.from_path(_catalog(tmp_path, [GOOD, {**GOOD, "effective_at": "2025-06-01T00:00:00Z"}]))


def test_malformed_override_reported_at_instrument(tmp_path):
    import otel_dspy_cost

    otel_dspy_cost.uninstrument()
    with pytest.raises(CatalogError, match="cat.json"):
        otel_dspy_cost.instrument(pricing_overrides=str(_catalog(tmp_path, [{**GOOD, "input": "cheap"}])))
    otel_dspy_cost.uninstrument()


def test_every_attribute_is_documented():
    from pathlib import Path

    from otel_dspy_cost import _attributes as A
    from otel_dspy_cost.telemetry import viewers

    doc = (Path(__file__).resolve().parent.parent / "docs" / "attributes.md").read_text()
    names = [v for module in (A, viewers) for k, v in vars(module).items() if k.isupper() and isinstance(v, str)]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, missing


def _cli(*args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_add_appends_versions_and_show_lists_history(tmp_path, monkeypatch):
    import os

    user = tmp_path / "user.json"
    env = {**os.environ, "OTEL_DSPY_COST_USER_CATALOG": str(user)}
    assert _cli("pricing", "add", "acme/writer-1", "--input", "2", "--output", "8", env=env).returncode == 0
    change = _cli("pricing", "add", "acme/writer-1", "--input", "1", "--output", "4",
                  "--effective-at", "2026-06-01T00:00:00Z", env=env)
    assert change.returncode == 0 and "v2" in change.stdout
    history = json.loads(_cli("pricing", "show", "acme/writer-1", env=env).stdout)
    assert [(h["price_version"], h["rates"]["input"], h["source"]) for h in history] == [(1, 2.0, "user"),
                                                                                       (2, 1.0, "user")]
    before = json.loads(_cli("pricing", "lookup", "acme/writer-1", "--when", "2026-01-01", env=env).stdout)
    after = json.loads(_cli("pricing", "lookup", "acme/writer-1", "--when", "2026-07-01", env=env).stdout)
    assert (before["rates"]["input"], after["rates"]["input"]) == (2.0, 1.0)
    # The user catalog is read by every resolver (so by instrument()), after overrides, before the shipped one.
    monkeypatch.setenv("OTEL_DSPY_COST_USER_CATALOG", str(user))
    assert PricingResolver(use_litellm=False).lookup("acme/writer-1").rates.output == 4.0
    # A bad rate is refused with the field named, and the file is left as it was.
    saved = user.read_text()
    bad = _cli("pricing", "add", "acme/writer-1", "--input", "-1", "--output", "4", env=env)
    assert bad.returncode == 2 and "field 'input'" in bad.stderr and user.read_text() == saved


def test_cli_import_litellm_appends_only_changed_prices(tmp_path):
    import litellm

    out = tmp_path / "imported.json"
    first = _cli("pricing", "import-litellm", "--out", str(out), "--provider", "openai", "--only", "gpt-4o-mini",
                 "--only", "gpt-4o")
    assert first.returncode == 0, first.stderr
    data = json.loads(out.read_text())
    mini = next(e for e in data["entries"] if e["model"] == "gpt-4o-mini")
    info = litellm.model_cost["gpt-4o-mini"]
    assert mini["input"] == pytest.approx(info["input_cost_per_token"] * 1e6)
    assert mini["cached_input"] == pytest.approx(info["cache_read_input_token_cost"] * 1e6)
    assert mini["tiers"]["batch"]["output"] == pytest.approx(info["output_cost_per_token_batches"] * 1e6)
    # A price change in the file's latest entry is detected: re-import appends v2 for that model only.
    mini["input"] = 9.99
    out.write_text(json.dumps(data))
    again = _cli("pricing", "import-litellm", "--out", str(out), "--provider", "openai", "--only", "gpt-4o-mini",
                 "--only", "gpt-4o")
    assert "1 entries added, 1 unchanged" in again.stdout
    entries = [e for e in json.loads(out.read_text())["entries"] if e["model"] == "gpt-4o-mini"]
    assert [e["price_version"] for e in entries] == [1, 2]
    resolver = PricingResolver(out, use_litellm=False)
    assert resolver.lookup("openai/gpt-4o-mini").rates.input == pytest.approx(info["input_cost_per_token"] * 1e6)
    assert _cli("pricing", "validate", str(out)).returncode == 0


def test_prompt_policy_asks_on_a_tty_and_appends_to_the_user_catalog(tmp_path):
    """Run in a child process whose stdin is a real pseudo-terminal, as a user at a shell would be."""
    import os
    import pty
    import subprocess
    import sys

    user = tmp_path / "user.json"
    code = ("import datetime as dt\n"
            "from otel_dspy_cost.pricing.engine import CostEngine\n"
            "from otel_dspy_cost.pricing import PricingResolver\n"
            "engine = CostEngine(PricingResolver(use_litellm=False), unknown_model='prompt')\n"
            "entry = engine.entry_for('acme/asked-1')\n"
            "print('GOT', entry.rates.input, entry.rates.output, entry.source)\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["OTEL_DSPY_COST_USER_CATALOG"] = str(user)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=secondary, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    os.close(secondary)
    os.write(primary, b"3\n1.5\n12\n")
    out, err = proc.communicate(timeout=60)
    os.close(primary)
    assert proc.returncode == 0, err
    assert "GOT 3.0 12.0 user" in out and "no price known for 'acme/asked-1'" in err
    entry = json.loads(user.read_text())["entries"][0]
    assert (entry["model"], entry["cached_input"]) == ("asked-1", 1.5) and entry["added_at"].endswith("Z")
