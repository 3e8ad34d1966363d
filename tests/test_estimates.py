"""Pre-run estimates: each optimizer run for real inside the projected range; the CLI fails CI over budget."""

import json
import os

import dspy
import pytest
from conftest import MODEL, ResearchAgent, examples, run_cli

import otel_dspy_cost
from otel_dspy_cost.optimizers.estimate import estimate

CASES = {
    "evaluate": (lambda lm: None, {"devset_size": 10}),
    "bootstrap": (lambda lm: dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=4,
                                                   max_labeled_demos=0), {"trainset_size": 10}),
    "mipro": (lambda lm: dspy.MIPROv2(metric=lambda e, p, t=None: float(len(p.answer) % 3 == 0), auto="light",
                                      num_threads=2, verbose=False, prompt_model=lm, task_model=lm),
              {"trainset_size": 10, "valset_size": 8}),
    "gepa": (lambda lm: dspy.GEPA(metric=lambda g, p, t=None, pn=None, pt=None: dspy.Prediction(score=0.5,
                                                                                                feedback="x"),
                                  max_metric_calls=40, reflection_lm=lm, num_threads=2),
             {"trainset_size": 4, "valset_size": 4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_brackets_the_real_run(otel, server, case):
    """Each optimizer for real against the simulator: the actual calls and cost fall inside the range.
    The ranges' width is recorded in docs/estimates.md."""
    import inspect

    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=256, num_retries=0)
    make, sizes = CASES[case]
    optimizer = make(lm)
    program = ResearchAgent()
    est = estimate(program, model=MODEL, optimizer=optimizer, max_tokens=256, input_chars=40, **sizes)
    with dspy.context(lm=lm), otel_dspy_cost.budget(label=case) as b:
        if optimizer is None:
            dspy.Evaluate(devset=examples(10), metric=lambda e, p, t=None: 1, num_threads=2,
                          display_progress=False)(program)
        elif case == "mipro":
            kwargs = {"requires_permission_to_run": False} if "requires_permission_to_run" in \
                inspect.signature(optimizer.compile).parameters else {}
            optimizer.compile(program, trainset=examples(10), valset=examples(8, "v"), **kwargs)
        elif case == "gepa":
            optimizer.compile(program, trainset=examples(4), valset=examples(4, "v"))
        else:
            optimizer.compile(program, trainset=examples(10))
    assert est.calls_low <= b.call_count <= est.calls_high, (est.calls_low, b.call_count, est.calls_high)
    assert est.usd_low <= b.spent_usd <= est.usd_high, (est.usd_low, b.spent_usd, est.usd_high)
    # The range is useful, not just wide: the bounds documented in docs/estimates.md.
    assert b.spent_usd / est.usd_low < 4 and est.usd_high / b.spent_usd < 15
    print(f"ESTIMATE {case}: calls {est.calls_low}..{b.call_count}..{est.calls_high} usd {est.usd_low:.6f}.."
          f"{b.spent_usd:.6f}..{est.usd_high:.6f} actual/low {b.spent_usd / est.usd_low:.2f} "
          f"high/actual {est.usd_high / b.spent_usd:.2f}")


def test_estimate_cli_fails_in_ci_over_budget():
    env = {**os.environ, "CI": "true"}
    over = run_cli("estimate", "--optimizer", "mipro-light", "--trainset", "50", "--budget", "0.01", env=env)
    assert over.returncode == 1 and "MAY EXCEED" in over.stdout and "trials" in over.stdout
    fits = run_cli("estimate", "--devset", "5", "--budget", "5", "--json", env=env)
    assert fits.returncode == 0 and json.loads(fits.stdout)["exceeds_budget"] is False


# -- a forecast from a pilot ------------------------------------------------------------------------------------

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_pilot_forecast_lands_within_25_percent_and_the_real_run_inside_the_range():
    """benchmarks/pilot_forecast.py: Evaluate, BootstrapFewShot, MIPROv2 light and GEPA, each forecast from a
    5-example pilot against the simulator answering at varied length, then run for real (docs/estimates.md)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(BENCH, "pilot_forecast.py"), "--json"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["evaluate", "bootstrap", "mipro", "gepa"]
    for r in rows:
        assert 0.75 <= r["ratio"] <= 1.25, r
        assert r["inside"] and r["usd_low"] <= r["usd_forecast"] <= r["usd_high"], r
        assert r["pilot_runs"] == 5 and 0 < r["pilot_usd"] < 1.0, r
        print(f"PILOT {r['case']}: forecast/actual {r['ratio']:.3f}")


def test_the_pilot_runs_under_its_own_budget_and_says_when_it_stopped(otel, lm):
    program = ResearchAgent()
    with dspy.context(lm=lm):
        est = estimate(program, model=MODEL, devset_size=20, pilot=examples(6, "pilot"), pilot_budget_usd=0.0012)
        with pytest.raises(ValueError, match="before one program run finished: raise pilot_budget_usd"):
            estimate(program, model=MODEL, devset_size=20, pilot=examples(3), pilot_budget_usd=0.00001)
    assert 1 <= est.pilot["runs"] < 6 and est.pilot["usd"] <= 0.0012
    assert est.pilot["input_tokens_per_call"] > 100 and est.pilot["output_tokens_per_call"] > 5
    assert est.pilot["demo_tokens_per_run"] > 0
    assert "stopped it after" in est.pilot["stopped"] and any("stopped it after" in a for a in est.assumptions)
    assert est.usd_low <= est.usd_forecast <= est.usd_high
    # 20 runs at what each pilot run cost
    assert est.usd_forecast == pytest.approx(20 * est.pilot["usd_per_run"], rel=1e-6)


def test_pilot_mistakes_are_said_before_any_call(otel, lm):
    program = ResearchAgent()
    with pytest.raises(ValueError, match="configure its LM first"):
        estimate(program, model=MODEL, devset_size=5, pilot=examples(2))
    with dspy.context(lm=lm):
        with pytest.raises(ValueError, match="at least one example"):
            estimate(program, model=MODEL, devset_size=5, pilot=[])
        with pytest.raises(ValueError, match="pilot_budget_usd"):
            estimate(program, model=MODEL, devset_size=5, pilot=examples(2), pilot_budget_usd=float("nan"))


def test_estimate_cli_pilot_forecasts_with_the_lm_at_api_base(server):
    out = run_cli("estimate", "--devset", "10", "--pilot", "2", "--api-base", server.api_base, "--max-tokens", "128",
                  "--json", env={**os.environ, "OPENAI_API_KEY": "sk-cli-pilot-0000"})
    assert out.returncode == 0, out.stderr
    est = json.loads(out.stdout)
    assert est["pilot"]["runs"] == 2 and est["pilot"]["calls"] >= 2
    assert est["usd_low"] <= est["usd_forecast"] <= est["usd_high"] and est["calls_forecast"] >= 10
    bad = run_cli("estimate", "--devset", "10", "--pilot", "0")
    assert bad.returncode == 2 and "--pilot must be at least 1" in bad.stderr
    # a new user's mistakes: no key for the real provider; a server that is not there (one line, exit 2)
    keyless = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    no_key = run_cli("estimate", "--devset", "10", "--pilot", "1", env=keyless)
    assert no_key.returncode == 2 and "set OPENAI_API_KEY, or point --api-base" in no_key.stderr
    down = run_cli("estimate", "--devset", "10", "--pilot", "1", "--api-base", "http://127.0.0.1:9/v1",
                   env={**keyless, "OPENAI_API_KEY": "sk-cli-pilot-secret-1234567890"})
    assert down.returncode == 2 and "the pilot's run 1 failed" in down.stderr
    assert "sk-cli-pilot-secret-1234567890" not in down.stderr + down.stdout
