"""Run artifacts (costs.jsonl, summary.json) and the report command that reads them back."""

import csv
import io
import json

import dspy
import pytest
from conftest import ResearchAgent, examples, run_cli

import otel_dspy_cost
from otel_dspy_cost.reports.artifacts import CostLog, totals
from otel_dspy_cost.reports.run_files import read_costs, read_summary


def _recorded_run(otel, lm, tmp_path, limit=0.006):
    _, provider = otel
    guard = otel_dspy_cost.budget(limit_usd=limit, label="artifact-run")
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, t=None: True, max_bootstrapped_demos=2,
                                      max_labeled_demos=0)
    run_dir = tmp_path / "run"
    with pytest.raises(otel_dspy_cost.BudgetExceededError):
        with otel_dspy_cost.record_run(run_dir, budget=guard, tracer_provider=provider) as run, guard, \
                dspy.context(lm=lm):
            compiled = optimizer.compile(ResearchAgent(), trainset=examples(3))
            run.score = 1.0
            dspy.Evaluate(devset=examples(30, "dev"), metric=lambda e, p, t=None: 1.0, num_threads=4,
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
        guard.spent_usd), "warn_at": 0.8, "status": "stopped", "within_budget": False, "exceeded_threshold": True,
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
    text = run_cli("report", str(run_dir))
    assert text.returncode == 0, text.stderr
    assert "ResearchAgent.searcher" in text.stdout and "spend by phase" in text.stdout
    assert f"{guard.spent_usd:.6f}" in text.stdout
    as_json = json.loads(run_cli("report", str(run_dir), "--json").stdout)
    assert as_json["phase"]["total"]["calls"] == guard.call_count
    rows = list(csv.DictReader(io.StringIO(run_cli("report", str(run_dir), "--csv").stdout)))
    total = next(r for r in rows if r["table"] == "model" and r["name"] == "total")
    assert float(total["usd"]) == pytest.approx(guard.spent_usd)
    both = run_cli("report", str(run_dir), "--compare", str(run_dir))
    assert "runs side by side" in both.stdout and "+0.0%" in both.stdout
    assert run_cli("report", str(tmp_path / "missing")).returncode == 2
