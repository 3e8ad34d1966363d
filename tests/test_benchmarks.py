"""The benchmark scripts run (tiny sizes, nothing timed here): they must not rot between measurements.

The contention benchmark also asserts zero overshoot under 16 threads, so it is a real check.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,args,expect", [
    ("overhead.py", ["--calls", "5", "--rounds", "1"], "accounting alone (sampled out, budget active)"),
    ("breakdown.py", ["--calls", "5", "--rounds", "1"], "+ metrics (full)"),
    ("memory.py", ["--calls", "300"], "attributable to instrumentation"),
    ("budget_contention.py", ["--calls-per-thread", "10"], "overshoot"),
    ("pricing_lookup.py", ["--n", "200"], "lookup, cached"),
    ("span_cost.py", ["--spans", "200"], "BudgetSpanProcessor"),
    ("ledger_scale.py", ["--sizes", "1000", "--ops", "32", "--procs", "1,4", "--rounds", "1"], "p50 vs empty"),
    ("budget_utilisation.py", ["--threads", "4", "--ledgers", "memory"], "utilisation"),
])
def test_benchmark_runs(script, args, expect):
    if script == "ledger_scale.py" and shutil.which("redis-server") is None:
        args = [*args, "--backends", "sqlite"]  # tests/install-system-deps.sh installs redis-server for the rest
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                         timeout=300, cwd=BENCH)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout


@pytest.mark.timeout(1500)  # ~4.5 min alone on the 2-core CI machine: past the suite's 300 s default when shared
def test_instruction_count_benchmark_runs():
    """benchmarks/instructions.py under valgrind (tests/install-system-deps.sh installs it): one variant, one
    program, two calls, and two of each accounting piece. Starting Python under valgrind takes minutes, hence
    the one small run."""
    assert shutil.which("valgrind"), "valgrind is missing: tests/install-system-deps.sh installs it"
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    out = subprocess.run([sys.executable, str(BENCH / "instructions.py"), "--calls", "2", "--programs", "one Predict",
                          "--only", "ours, sampled out", "--parts", "2"], capture_output=True, text=True, env=env,
                         timeout=1500, cwd=BENCH)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ours, sampled out" in out.stdout and "of the baseline call" in out.stdout, out.stdout
    assert "the accounting station's pieces" in out.stdout and "admission (reserve the worst case)" in out.stdout
    per_call = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("  baseline")}
    assert float(per_call["baseline"][1].replace(",", "")) > 100_000  # a DSPy call is millions of instructions
