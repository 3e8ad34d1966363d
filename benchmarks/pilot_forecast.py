"""How close `estimate(pilot=...)` lands: each optimizer's forecast against its own real run, in one process.

    python benchmarks/pilot_forecast.py [--pilot 5] [--cases evaluate,bootstrap,mipro,gepa] [--json]

For each case: `estimate(program, ..., pilot=<N examples>)` runs the program on the pilot examples for real
and forecasts; then the optimizer runs for real on its own data under a budget that counts it. Both against
the built-in simulator (an OpenAI-compatible HTTP server) answering at varied length (0-150 extra words a
field, fixed per prompt), through DSPy's own LM engine, at gpt-4o-mini's catalog price. The baseline is the
real run measured in the same process; the table prints forecast / actual and whether the real run fell in
the estimate's low..high range. docs/estimates.md has the last table; tests/test_estimates.py checks the 25%.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

import otel_dspy_cost  # noqa: E402
from otel_dspy_cost.cli.demo import demo_program  # noqa: E402
from otel_dspy_cost.optimizers.estimate import estimate  # noqa: E402
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer  # noqa: E402

MODEL = "openai/gpt-4o-mini"


def _examples(n: int, prefix: str) -> list[dspy.Example]:
    return [dspy.Example(question=f"{prefix} {i} about the cost of things", answer="a").with_inputs("question")
            for i in range(n)]


def _gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return dspy.Prediction(score=0.5, feedback="be brief")


# case: (optimizer from the LM, estimate's sizes, how the real run is made)
CASES = {
    "evaluate": (lambda lm: None, {"devset_size": 10}),
    "bootstrap": (lambda lm: dspy.BootstrapFewShot(metric=lambda e, p, t=None: len(p.answer) % 3 != 0,
                                                   max_bootstrapped_demos=4, max_labeled_demos=0),
                  {"trainset_size": 10}),
    "mipro": (lambda lm: dspy.MIPROv2(metric=lambda e, p, t=None: float(len(p.answer) % 3 == 0), auto="light",
                                      num_threads=2, verbose=False, prompt_model=lm, task_model=lm),
              {"trainset_size": 10, "valset_size": 8}),
    "gepa": (lambda lm: dspy.GEPA(metric=_gepa_metric, max_metric_calls=40, reflection_lm=lm, num_threads=2),
             {"trainset_size": 4, "valset_size": 4}),
}


def _real_run(case: str, optimizer, program, lm) -> None:
    if optimizer is None:
        dspy.Evaluate(devset=_examples(10, "dev"), metric=lambda e, p, t=None: 1, num_threads=2,
                      display_progress=False)(program)
    elif case == "mipro":
        kwargs = ({"requires_permission_to_run": False}
                  if "requires_permission_to_run" in inspect.signature(optimizer.compile).parameters else {})
        optimizer.compile(program, trainset=_examples(10, "train"), valset=_examples(8, "val"), **kwargs)
    elif case == "gepa":
        optimizer.compile(program, trainset=_examples(4, "train"), valset=_examples(4, "val"))
    else:
        optimizer.compile(program, trainset=_examples(10, "train"))


def measure(case: str, api_base: str, pilot: int) -> dict:
    lm = dspy.LM(MODEL, api_base=api_base, api_key="sk-bench-0000", cache=False, max_tokens=256, num_retries=0)
    make, sizes = CASES[case]
    with dspy.context(lm=lm):
        est = estimate(demo_program(), model=MODEL, optimizer=make(lm), max_tokens=256, input_chars=40,
                       pilot=_examples(pilot, "pilot"), **sizes)
        with otel_dspy_cost.budget(label=f"bench-{case}") as real:
            _real_run(case, make(lm), demo_program(), lm)
    return {"case": case, "pilot_runs": est.pilot["runs"], "pilot_usd": est.pilot["usd"],
            "usd_forecast": est.usd_forecast, "usd_actual": real.spent_usd, "usd_low": est.usd_low,
            "usd_high": est.usd_high, "calls_forecast": est.calls_forecast, "calls_actual": real.call_count,
            "ratio": est.usd_forecast / real.spent_usd, "inside": est.usd_low <= real.spent_usd <= est.usd_high}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", type=int, default=5, help="pilot examples per case")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args(argv)
    from opentelemetry.sdk.trace import TracerProvider

    otel_dspy_cost.instrument(tracer_provider=TracerProvider(), unknown_model="warn")
    rows = []
    with SimulatorServer(SimulatedLM(answer_words=(0, 150))) as server:
        for case in args.cases.split(","):
            rows.append(measure(case, server.api_base, args.pilot))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"{'case':10s} {'pilot $':>10s} {'forecast $':>11s} {'actual $':>10s} {'forecast/actual':>15s} "
              f"{'calls f/a':>11s} {'low..high $':>22s} inside")
        for r in rows:
            print(f"{r['case']:10s} {r['pilot_usd']:10.6f} {r['usd_forecast']:11.6f} {r['usd_actual']:10.6f} "
                  f"{r['ratio']:15.3f} {r['calls_forecast']:5d}/{r['calls_actual']:<5d} "
                  f"{r['usd_low']:10.6f}..{r['usd_high']:<10.6f} {r['inside']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
