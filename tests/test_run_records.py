"""Trial records and program runs in `summary.json` do not depend on tracing: the same with spans recorded,
sampled out (ALWAYS_OFF) and the SDK disabled, as cost and budgets already were."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import MODEL

_SCRIPT = textwrap.dedent("""
    import inspect, json, sys
    import dspy, otel_dspy_cost
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    mode, api_base, out = sys.argv[1:4]
    if mode == "disabled":
        otel_dspy_cost.instrument(unknown_model="warn")
    else:
        otel_dspy_cost.instrument(tracer_provider=TracerProvider(sampler=ALWAYS_OFF if mode == "sampled_out"
                                                                 else ALWAYS_ON), unknown_model="warn")
    lm = dspy.LM("{model}", api_base=api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    metric = lambda e, p, t=None: float(len(p.answer) % 3 == 0)
    data = lambda n, k: [dspy.Example(question=f"{{k}} {{i}}", answer="a").with_inputs("question") for i in range(n)]
    optimizer = dspy.MIPROv2(metric=metric, auto="light", num_threads=1, verbose=False, prompt_model=lm,
                             task_model=lm)
    kwargs = ({{"requires_permission_to_run": False}}
              if "requires_permission_to_run" in inspect.signature(optimizer.compile).parameters else {{}})
    with dspy.context(lm=lm), otel_dspy_cost.record_run(out) as run:
        best = optimizer.compile(dspy.Predict("question -> answer"), trainset=data(8, "t"), valset=data(6, "v"),
                                 seed=3, **kwargs)
        for i in range(3):
            best(question=f"served {{i}}")
    print(json.dumps({{"trials": run.summary["trials"], "program_runs": run.summary["program_runs"],
                      "calls": run.summary["calls"]}}))
""").format(model=MODEL)


def _run(mode, server, tmp_path):
    script = tmp_path / "app.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if mode == "disabled":
        env["OTEL_SDK_DISABLED"] = "true"
    out = subprocess.run([sys.executable, str(script), mode, server.api_base, str(tmp_path / mode)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trials_and_program_runs_are_recorded_whatever_the_tracer_does(server, tmp_path):
    recorded = _run("recorded", server, tmp_path)
    assert len(recorded["trials"]) >= 4 and recorded["program_runs"] >= 3
    assert all(t["trace_id"] for t in recorded["trials"])
    for mode in ("sampled_out", "disabled"):
        other = _run(mode, server, tmp_path)
        assert other["program_runs"] == recorded["program_runs"], mode
        assert other["calls"] == recorded["calls"], mode
        strip = lambda ts: [(t["optimizer"], t["trial"], t["score"], t["eval"], t["calls"],  # noqa: E731
                             pytest.approx(t["usd"], abs=1e-12)) for t in ts]
        assert strip(other["trials"]) == strip(recorded["trials"]), mode
        assert not any(t["trace_id"] for t in other["trials"]), mode  # no trace was recorded to point at


def test_miprov2_minibatch_and_full_evaluations_are_trials_numbered_as_dspy_logs_them(otel, lm, tmp_path, caplog):
    """With minibatches (valset above 35), DSPy runs a full evaluation every few trials inside the trial before
    it and logs it as a trial of its own: each is one here too, with its own calls and `eval`."""
    import inspect
    import logging
    import re

    import dspy

    import otel_dspy_cost

    caplog.set_level(logging.INFO, logger="dspy.teleprompt.mipro_optimizer_v2")
    metric = lambda e, p, t=None: float(len(p.answer) % 3 == 0)  # noqa: E731
    data = lambda n, k: [dspy.Example(question=f"{k} {i}", answer="a").with_inputs("question")  # noqa: E731
                         for i in range(n)]
    optimizer = dspy.MIPROv2(metric=metric, auto=None, num_candidates=3, num_threads=2, verbose=False,
                             prompt_model=lm, task_model=lm)
    kwargs = ({"requires_permission_to_run": False}
              if "requires_permission_to_run" in inspect.signature(optimizer.compile).parameters else {})
    with dspy.context(lm=lm), otel_dspy_cost.record_run(tmp_path / "run") as run:
        optimizer.compile(dspy.Predict("question -> answer"), trainset=data(8, "t"), valset=data(40, "v"),
                          num_trials=7, minibatch_size=35, minibatch_full_eval_steps=3, seed=3, **kwargs)
    logged = [(int(n), "minibatch" if kind.startswith("Minibatch") else "full")
              for n, kind in re.findall(r"Trial (\d+) / \d+ - ([A-Za-z ]+?) ?=", caplog.text)]
    ours = [(t["trial"], t["eval"]) for t in run.summary["trials"]]
    assert ours == logged and ("full") in {k for _, k in logged} and len(logged) >= 8
    for t in run.summary["trials"]:  # a full evaluation is the 40 examples, a minibatch 35: nothing folded in
        assert t["calls"] == (40 if t["eval"] == "full" else 35), t
    # each trial points at its own trace: the root span of kind `trial` with its number
    exporter, _ = otel
    roots = {s.attributes["dspy.optimizer.trial"]: f"{s.context.trace_id:032x}" for s in exporter.get_finished_spans()
             if s.attributes.get("dspy.span.kind") == "trial" and s.parent is None}
    assert [t["trace_id"] for t in run.summary["trials"]] == [roots[t["trial"]] for t in run.summary["trials"]]
