"""Reports of damaged runs: a truncated or garbage cost line, a run killed before its summary, a summary that is
not JSON. `report` skips what it cannot read (naming file and line), rebuilds the summary from the cost lines,
and says the run did not finish; it never prints $0 above tables that show the calls."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dspy
import pytest
from conftest import MODEL, QA, run_cli

import otel_dspy_cost
from otel_dspy_cost.reports.run_files import read_costs
from otel_dspy_cost.reports.run_report import run_report


@pytest.fixture
def finished_run(otel, lm, tmp_path):
    """A small finished run: 6 calls in costs.jsonl and a summary."""
    run_dir = tmp_path / "run"
    with otel_dspy_cost.record_run(run_dir) as run, dspy.context(lm=lm):
        for i in range(6):
            dspy.Predict(QA)(question=f"question {i}")
    return run_dir, run.summary


def test_a_truncated_and_a_garbage_line_are_skipped_and_named(finished_run):
    run_dir, summary = finished_run
    path = run_dir / "costs.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    lines.insert(2, "\x00\x00garbage from a bad disk")
    lines.append(lines[-1][: len(lines[-1]) // 2])  # a write cut off by a kill
    lines.append(json.dumps({**first, "usd": float("nan")}).replace("NaN", "NaN"))
    lines.append(json.dumps({**first, "input_tokens": "many"}))
    path.write_text("\n".join(lines) + "\n")
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    warnings = [w for w in result.stderr.splitlines() if w.startswith("warning: ")]
    assert len(warnings) == 4, result.stderr
    assert f"{path}:3: not a JSON line" in warnings[0]
    assert f"{path}:8: not a JSON line" in warnings[1] and "truncated" in warnings[1]
    assert f"{path}:9: not a cost line (usd is nan)" in warnings[2]
    assert f"{path}:10: not a cost line (input_tokens is 'many')" in warnings[3]
    assert "6 LM calls" in result.stdout and "JSONDecodeError" not in result.stdout + result.stderr
    assert f"${summary['total_cost_usd']:.6f} actual" in result.stdout


def test_a_run_without_its_summary_is_rebuilt_from_its_cost_lines(finished_run):
    run_dir, summary = finished_run
    (run_dir / "summary.json").unlink()
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"run {run_dir} did not finish: no summary.json")
    assert f"${summary['total_cost_usd']:.6f} actual" in result.stdout and "6 LM calls" in result.stdout
    report = run_report(run_dir, problems=[])
    assert report["summary"]["calls"] == 6 and report["summary"]["incomplete"]
    assert report["summary"]["total_cost_usd"] == pytest.approx(summary["total_cost_usd"], abs=1e-12)


def test_a_summary_that_is_not_json_is_rebuilt_and_said(finished_run):
    run_dir, summary = finished_run
    (run_dir / "summary.json").write_text('{"calls": 6, "total_cost_u')
    result = run_cli("report", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["calls"] == 6 and "unreadable" in report["summary"]["incomplete"]
    assert f"warning: {run_dir / 'summary.json'} is unreadable" in result.stderr


def test_a_run_killed_with_sigkill_reports_its_real_calls(server, tmp_path):
    """A process killed mid-run: no summary.json, maybe a half-written line; the report counts what was
    written, with the same figures as the cost lines."""
    run_dir = tmp_path / "killed"
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import dspy, otel_dspy_cost, sys
        otel_dspy_cost.instrument()
        lm = dspy.LM("{MODEL}", api_base="{server.api_base}", api_key="sk-test-0000000000", cache=False,
                     max_tokens=64)
        with otel_dspy_cost.record_run({str(run_dir)!r}), dspy.context(lm=lm):
            for i in range(10_000):
                dspy.Predict("question -> answer")(question=f"q{{i}}")
                if i == 30:
                    print("running", flush=True)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "running"
    time.sleep(2.5)  # the cost log writes its lines at least once a second
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "summary.json").exists()
    written = read_costs(run_dir, problems=[])
    assert written, "the cost log flushes at least once a second"
    result = run_cli("report", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["calls"] == len(written) > 0
    assert report["summary"]["total_cost_usd"] == pytest.approx(sum(r["usd"] for r in written), abs=1e-9)
    assert report["summary"]["incomplete"].startswith("no summary.json")
