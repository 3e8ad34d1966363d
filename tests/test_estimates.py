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
