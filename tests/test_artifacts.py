"""Run artifacts (costs.jsonl, summary.json), the report CLI, pre-run estimates and the demo."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import time

import dspy
import pytest
from conftest import MODEL, ResearchAgent

import otel_dspy_cost
from otel_dspy_cost.artifacts import CostLog, read_costs, read_summary, totals
from otel_dspy_cost.estimate import estimate


def _data(n, prefix="q"):
    return [dspy.Example(question=f"{prefix} {i} about the cost of things", answer="a").with_inputs("question")
            for i in range(n)]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _recorded_run(otel, lm, tmp_path, limit=0.006):
    _, provider = otel
    guard = otel_dspy_cost.budget(limit_usd=limit, label="artifact-run")
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=2,
                                      max_labeled_demos=0)
    run_dir = tmp_path / "run"
    with pytest.raises(otel_dspy_cost.BudgetExceededError):
        with otel_dspy_cost.record_run(run_dir, budget=guard, tracer_provider=provider) as run, guard, \
                dspy.context(lm=lm):
            compiled = optimizer.compile(ResearchAgent(), trainset=_data(3))
            run.score = 1.0
            dspy.Evaluate(devset=_data(30, "dev"), metric=lambda e, p, t=None: 1.0, num_threads=4,
                          display_progress=False)(compiled)
    return run_dir, guard, run


def test_report_from_costs_jsonl_equals_spend_report(otel, lm, tmp_path):
    run_dir, guard, _ = _recorded_run(otel, lm, tmp_path)
    lines = read_costs(run_dir)
    assert len(lines) == guard.call_count > 0
    for by, depth in (("module", 2), ("module", None), ("model", None), ("phase", None), ("trial", None)):
        ours = totals(lines, by, depth=depth)
        live = otel_dspy_cost.spend_report(by=by, depth=depth)
        assert set(ours) == set(live), by
        for key, row in live.items():
            for field in ("calls", "input_tokens", "cached_input_tokens", "output_tokens"):
                assert ours[key][field] == row[field], (by, key, field)
            assert ours[key]["usd"] == pytest.approx(row["usd"]) and \
                ours[key]["economic_usd"] == pytest.approx(row["economic_usd"])
    line = lines[0]
    assert {"ts", "trace_id", "span_id", "module", "phase", "trial", "model", "tier", "input_tokens",
            "cached_input_tokens", "output_tokens", "reasoning_tokens", "usd", "economic_usd", "cache_hit",
            "estimated", "latency_s", "pricing_source", "pricing_version"} <= set(line)
    assert "sk-test" not in (run_dir / "costs.jsonl").read_text()


def test_summary_splits_phases_budget_status_and_cost_per_million_runs(otel, lm, tmp_path):
    run_dir, guard, run = _recorded_run(otel, lm, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = otel_dspy_cost.spend_report(by="phase")
    assert summary["train_cost_usd"] == pytest.approx(phases["train"]["usd"])
    assert summary["infer_cost_usd"] == pytest.approx(phases["infer"]["usd"])
    assert summary["total_cost_usd"] == pytest.approx(guard.spent_usd)
    assert summary["train_prompt_tokens"] == phases["train"]["input_tokens"]
    assert summary["train_completion_tokens"] == phases["train"]["output_tokens"]
    assert summary["inference_economic_cost_usd"] == pytest.approx(phases["infer"]["economic_usd"])
    assert summary["budget"] == {"label": "artifact-run", "limit_usd": 0.006, "spent_usd": pytest.approx(
        guard.spent_usd), "status": "stopped", "within_budget": False, "exceeded_threshold": True,
        "cancelled_reason": "budget_exceeded"}
    assert summary["program_runs"] > 0 and summary["program_cost_per_million_runs"] == pytest.approx(
        summary["infer_cost_usd"] / summary["program_runs"] * 1e6)
    assert summary["score"] == 1.0 and run.summary == summary
    # An older summary without cost fields still reads.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"accuracy": 0.8}))
    old = read_summary(tmp_path / "old")
    assert old["total_cost_usd"] == 0.0 and old["accuracy"] == 0.8


def test_cost_log_rotates_and_keeps_every_line(otel, lm, tmp_path):
    from otel_dspy_cost import _runtime

    log = CostLog(tmp_path / "costs.jsonl", max_bytes=3000, backups=50, flush_lines=1)
    _runtime.active().accountant.add_sink(log)
    with dspy.context(lm=lm):
        for i in range(12):
            dspy.Predict("question -> answer")(question=f"rotate {i}")
    _runtime.active().accountant.remove_sink(log)
    assert len(list(tmp_path.glob("costs.jsonl.*"))) >= 2
    assert all(p.stat().st_size <= 3000 for p in tmp_path.glob("costs.jsonl*"))
    lines = read_costs(tmp_path)
    assert len(lines) == 12 and [ln["ts"] for ln in lines] == sorted(ln["ts"] for ln in lines)


def test_report_cli_tables_json_csv_and_compare(otel, lm, tmp_path):
    run_dir, guard, _ = _recorded_run(otel, lm, tmp_path)
    text = _cli("report", str(run_dir))
    assert text.returncode == 0, text.stderr
    assert "ResearchAgent.searcher" in text.stdout and "spend by phase" in text.stdout
    assert f"{guard.spent_usd:.6f}" in text.stdout
    as_json = json.loads(_cli("report", str(run_dir), "--json").stdout)
    assert as_json["phase"]["total"]["calls"] == guard.call_count
    rows = list(csv.DictReader(io.StringIO(_cli("report", str(run_dir), "--csv").stdout)))
    total = next(r for r in rows if r["table"] == "model" and r["name"] == "total")
    assert float(total["usd"]) == pytest.approx(guard.spent_usd)
    both = _cli("report", str(run_dir), "--compare", str(run_dir))
    assert "runs side by side" in both.stdout and "+0.0%" in both.stdout
    assert _cli("report", str(tmp_path / "missing")).returncode == 2


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
            dspy.Evaluate(devset=_data(10), metric=lambda e, p, t=None: 1, num_threads=2,
                          display_progress=False)(program)
        elif case == "mipro":
            kwargs = {"requires_permission_to_run": False} if "requires_permission_to_run" in \
                inspect.signature(optimizer.compile).parameters else {}
            optimizer.compile(program, trainset=_data(10), valset=_data(8, "v"), **kwargs)
        elif case == "gepa":
            optimizer.compile(program, trainset=_data(4), valset=_data(4, "v"))
        else:
            optimizer.compile(program, trainset=_data(10))
    assert est.calls_low <= b.call_count <= est.calls_high, (est.calls_low, b.call_count, est.calls_high)
    assert est.usd_low <= b.spent_usd <= est.usd_high, (est.usd_low, b.spent_usd, est.usd_high)
    # The range is useful, not just wide: the bounds documented in docs/estimates.md.
    assert b.spent_usd / est.usd_low < 4 and est.usd_high / b.spent_usd < 15
    print(f"ESTIMATE {case}: calls {est.calls_low}..{b.call_count}..{est.calls_high} usd {est.usd_low:.6f}.."
          f"{b.spent_usd:.6f}..{est.usd_high:.6f} actual/low {b.spent_usd / est.usd_low:.2f} "
          f"high/actual {est.usd_high / b.spent_usd:.2f}")


def test_estimate_cli_fails_in_ci_over_budget():
    env = {**os.environ, "CI": "true"}
    over = _cli("estimate", "--optimizer", "mipro-light", "--trainset", "50", "--budget", "0.01", env=env)
    assert over.returncode == 1 and "MAY EXCEED" in over.stdout and "trials" in over.stdout
    fits = _cli("estimate", "--devset", "5", "--budget", "5", "--json", env=env)
    assert fits.returncode == 0 and json.loads(fits.stdout)["exceeds_budget"] is False


def test_demo_runs_fast_and_matches_its_artifacts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", "demo", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert elapsed < 60
    text = out.stdout
    assert "estimate, compile" in text and "BUDGET STOP" in text and "trials: cost next to score" in text
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    spent = float(re.search(r"spent \$([0-9.]+) of", text.split("BUDGET STOP")[1]).group(1))
    requests = int(re.search(r"provider requests made: (\d+)", text).group(1))
    assert summary["total_cost_usd"] == pytest.approx(spent, abs=1e-6)  # printed with 6 decimals: one unit of the last
    assert summary["calls"] == requests == len(read_costs(tmp_path / "demo"))
    assert summary["budget"]["cancelled_reason"] == "budget_exceeded" and summary["total_cost_usd"] <= 0.012
    assert len(summary["trials"]) >= 2
    estimate_ = summary["estimate"]
    # The budget cut the run short, so the actual sits below the projection, which warned it might not fit.
    assert summary["calls"] <= estimate_["calls_high"] and estimate_["exceeds_budget"] is True
    assert "estimate, whole run" in text
