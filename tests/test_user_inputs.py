"""A new user's mistakes, at the CLI and in Python: each is one clear line (exit 2 at the CLI) before any work,
never a negative forecast, a $0 status, an internal error or an unrelated message."""

import logging
import os

import pytest
from conftest import run_cli

import otel_dspy_cost
from otel_dspy_cost.cli.demo import demo_program
from otel_dspy_cost.ledgers.protocol import Limits
from otel_dspy_cost.ledgers.urls import ledger_from_url
from otel_dspy_cost.optimizers.estimate import estimate

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def _error(result):
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "says"), [
    (["--devset", "-5"], "--devset must be >= 0, not -5"),
    (["--devset", "5", "--cache-hit-rate", "7"], "--cache-hit-rate is a fraction of calls, 0..1"),
    (["--devset", "5", "--budget", "-3"], "--budget must be > 0"),
    (["--devset", "5", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--optimizer", "mipro-bogus", "--trainset", "5"], "unknown optimizer 'mipro-bogus'"),
    (["--optimizer", "mipro-light"], "--trainset must be > 0"),
    ([], "nothing to estimate"),
    (["--program", "dspy:ChainOfThought", "--devset", "3"], "calling dspy:ChainOfThought with no arguments failed"),
])
def test_estimate_refuses_what_it_cannot_mean(args, says):
    assert says in _error(run_cli("estimate", *args, env=ENV))


def test_estimate_in_python_takes_the_clis_optimizer_names_and_refuses_the_rest():
    program = demo_program()
    by_name = estimate(program, model="openai/gpt-4o-mini", optimizer="mipro-light", trainset_size=20)
    assert "MIPROv2" in " ".join(by_name.stages) or by_name.calls_low > 20
    for bad, error in (("mipro-lite", ValueError), ("copro", ValueError)):
        with pytest.raises(error, match="unknown optimizer"):
            estimate(program, model="openai/gpt-4o-mini", optimizer=bad, trainset_size=20)
    with pytest.raises(ValueError, match="nothing to estimate"):
        estimate(program, model="openai/gpt-4o-mini", optimizer=None)
    with pytest.raises(ValueError, match="cache_hit_rate"):
        estimate(program, model="openai/gpt-4o-mini", devset_size=5, cache_hit_rate=1.5)
    with pytest.raises(TypeError, match="devset_size must be a whole number"):
        estimate(program, model="openai/gpt-4o-mini", devset_size="5")
    assert estimate(program, model="openai/gpt-4o-mini", optimizer="evaluate", devset_size=5).calls_low > 0


def test_demo_checks_its_arguments_before_any_work():
    assert "--examples must be at least 1" in _error(run_cli("demo", "--examples", "0", env=ENV))
    assert "--budget must be a positive number" in _error(run_cli("demo", "--budget", "nan", env=ENV))


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_budget_status_of_a_misspelt_label_names_the_labels_there(tmp_path, kind):
    if kind == "redis":
        from test_shared_ledgers import RedisServer

        server = RedisServer(tmp_path).start()
        url = server.url
    else:
        server, url = None, f"sqlite:///{tmp_path}/budgets.db"
    try:
        _misspelt_label(url)
    finally:
        if server is not None:
            server.kill()


def _misspelt_label(url):
    ledger = ledger_from_url(url)
    account = ledger.key("nightly")
    ledger.open(account, Limits(1.0, None, {}, True))
    ledger.settle(ledger.reserve([account], 0.1, "infer"), 0.048803000000000006, 0.05)
    line = _error(run_cli("budget", "status", url, "nightyl", env=ENV))
    assert "no budget labelled 'nightyl'" in line and "'nightly'" in line
    status = run_cli("budget", "status", url, "nightly", "--limit", "0.0976", env=ENV)
    assert status.returncode == 0, status.stderr
    assert '"remaining_usd": 0.048797' in status.stdout and '"spent_usd": 0.048803,' in status.stdout


def test_pricing_commands_say_what_is_wrong(tmp_path):
    assert "cannot write there" in _error(run_cli("pricing", "import-litellm", "--out", str(tmp_path / "no" / "x.json"),
                                                  "--provider", "openai", env=ENV))
    line = _error(run_cli("pricing", "lookup", "openai/gpt-4o-mini", "--price-version", "99", env=ENV))
    assert "has no price_version 99 (its versions: 1, 2, 3" in line and "Nearest" not in line
    everything = run_cli("pricing", "import-litellm", "--out", str(tmp_path / "all.json"), env=ENV)
    assert everything.returncode == 0, everything.stderr  # two LiteLLM names for one model: imported once
    assert "entries added" in everything.stdout


def test_budget_messages_print_money_without_float_noise(otel, caplog):
    caplog.set_level(logging.WARNING, logger="otel_dspy_cost")
    b = otel_dspy_cost.budget(limit_usd=0.0015456000000000003, label="noise")  # 40 x a call's mean cost
    b.ledger.settle(b.ledger.reserve([b.account], 0.001, "infer"), 0.0015069999999999999, 0.0015)
    b._fire("exceeded")
    assert "$0.001507 spent of $0.0015456 limit" in caplog.text


def test_without_max_tokens_the_estimate_bounds_answers_by_the_configured_lm_and_says_what_dominates():
    import dspy

    program = demo_program()
    unbounded = estimate(program, model="openai/gpt-4o-mini", devset_size=10)
    assert any("98% output at max_tokens=16384" in n or "output at max_tokens=16384" in n
               for n in unbounded.assumptions)
    with dspy.context(lm=dspy.LM("openai/gpt-4o-mini", max_tokens=300)):
        bounded = estimate(program, model="openai/gpt-4o-mini", devset_size=10)
    assert any("max_tokens=300 (high: the configured LM's)" in n for n in bounded.assumptions)
    assert bounded.usd_high < unbounded.usd_high / 10 and bounded.usd_low == unbounded.usd_low
    with dspy.context(lm=dspy.LM("openai/gpt-4.1", max_tokens=300)):  # another model: its bound is not ours
        other = estimate(program, model="openai/gpt-4o-mini", devset_size=10)
    assert other.usd_high == unbounded.usd_high
