"""What a new user trips over: one run per folder, honest per-run figures, CLI errors as one line with a
documented exit code, the demo on a terminal and with other providers, a dead collector at exit."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time

import dspy
import pytest
from conftest import MODEL

import otel_dspy_cost
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.reports.run_files import read_costs

ENV = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}


def _cli(*args, cwd=None, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or ENV)


def _one_line_error(result, code=2):
    assert result.returncode == code, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- run folders ---------------------------------------------------------------------------------------------

def _spent_and_calls(stdout):
    after = stdout.split("BUDGET STOP")[1] if "BUDGET STOP" in stdout else stdout
    spent = float(re.search(r"spent \$([0-9.]+) of", after).group(1))
    calls = int(re.search(r"provider requests made: (\d+)", stdout).group(1))
    return spent, calls


def test_the_demo_run_twice_in_one_folder_reports_each_runs_own_numbers(tmp_path):
    out = tmp_path / "demo"
    first = _cli("demo", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    second = _cli("demo", "--out", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "was moved to" in second.stdout
    spent, calls = _spent_and_calls(second.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"] == calls == len(read_costs(out))
    assert summary["total_cost_usd"] == pytest.approx(spent, abs=1e-6)
    report = json.loads(_cli("report", str(out), "--json").stdout)
    assert report["model"]["total"]["calls"] == calls
    (previous,) = (out / "previous").iterdir()
    first_spent, first_calls = _spent_and_calls(first.stdout)
    assert json.loads((previous / "summary.json").read_text())["calls"] == first_calls == len(read_costs(previous))


def test_record_run_starts_a_new_run_in_a_used_folder_or_appends_when_asked(otel, lm, tmp_path):
    folder = tmp_path / "nightly"
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        for i in range(3):
            with otel_dspy_cost.record_run(folder) as run:
                predict(question=f"run {i}")
            assert run.summary["calls"] == 1
            assert (run.previous is None) == (i == 0)
        with otel_dspy_cost.record_run(folder, append=True) as run:
            predict(question="appended")
    assert run.previous is None and run.summary["calls"] == 2 and len(read_costs(folder)) == 2
    assert len(list((folder / "previous").iterdir())) == 2


def test_program_cost_per_million_runs_counts_only_runs_that_were_made(otel, lm, tmp_path):
    predict = dspy.Predict("question -> answer")
    made = refused = 0
    with dspy.context(lm=lm), otel_dspy_cost.record_run(tmp_path / "runs") as run:
        with otel_dspy_cost.budget(limit_usd=0.0006, label="serve") as b:
            for i in range(12):
                try:
                    predict(question=f"serve {i}")
                    made += 1
                except otel_dspy_cost.BudgetExceededError:
                    refused += 1
    assert made >= 1 and refused >= 1 and b.call_count == made
    summary = run.summary
    assert (summary["program_runs"], summary["program_runs_failed"]) == (made, refused)
    assert summary["program_cost_per_million_runs"] == pytest.approx(summary["infer_cost_usd"] / made * 1e6)


def _floats(data):
    if isinstance(data, float):
        yield data
    elif isinstance(data, dict):
        for v in data.values():
            yield from _floats(v)
    elif isinstance(data, list):
        for v in data:
            yield from _floats(v)


def test_usd_figures_carry_no_float_noise(otel, lm, tmp_path):
    exporter, _ = otel
    with dspy.context(lm=lm), otel_dspy_cost.record_run(tmp_path / "r") as run:
        for i in range(7):  # sums of seven per-call costs: noise like 2.6099999999999997e-05 without rounding
            dspy.ChainOfThought("question -> answer")(question=f"noise {i}")
    for value in _floats(run.summary):
        assert value == round(value, 12) and len(repr(value)) <= 18, value
    for span in exporter.get_finished_spans():
        for key, value in span.attributes.items():
            if key.endswith("usd") or key == A.GEN_AI_COST_AMOUNT:
                assert value == round(value, 12) and len(repr(value)) <= 18, (key, value)
    for value in _floats(otel_dspy_cost.spend_report(by="module")):
        assert value == round(value, 12)


# -- CLI errors -------------------------------------------------------------------------------------------------

def test_cli_version_and_documented_exit_codes():
    version = _cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"otel-dspy-cost \S+\n", version.stdout)
    helptext = _cli("--help").stdout
    assert "exit codes: 0" in helptext and "2 bad input" in helptext


def test_an_unknown_optimizer_is_a_usage_error():
    line = _one_line_error(_cli("estimate", "--optimizer", "copro"))
    assert "copro" in line and "mipro-light" in line


def test_estimate_takes_a_module_class_or_a_builder_from_the_scripts_own_folder(tmp_path):
    (tmp_path / "my_app.py").write_text(textwrap.dedent("""
        import dspy

        class QA(dspy.Module):
            def __init__(self):
                super().__init__()
                self.answer = dspy.ChainOfThought("question -> answer")

            def forward(self, question):
                return self.answer(question=question)

        def build():
            return QA()
    """))
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    for spec in ("my_app:QA", "my_app:build"):
        result = _cli("estimate", "--program", spec, "--devset", "10", "--json", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["calls_low"] == 10
    assert "not_there" in _one_line_error(_cli("estimate", "--program", "my_app:not_there", cwd=tmp_path, env=env))


def test_budget_status_of_a_missing_sqlite_ledger_says_so_and_creates_nothing(tmp_path):
    line = _one_line_error(_cli("budget", "status", "sqlite:///missing/dir/b.db", "label", cwd=tmp_path))
    assert "no ledger at missing/dir/b.db" in line
    assert not (tmp_path / "missing").exists()


def test_a_redis_ledger_without_the_redis_client_names_the_extra(tmp_path):
    blocked = "import sys; sys.modules['redis'] = None; from otel_dspy_cost.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", blocked, "budget", "status", "redis://127.0.0.1:1/0", "x"],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert "pip install 'otel-dspy-cost[redis]'" in _one_line_error(result)


def test_report_compare_with_a_missing_run_is_an_error(otel, lm, tmp_path):
    with dspy.context(lm=lm), otel_dspy_cost.record_run(tmp_path / "a"):
        dspy.Predict("question -> answer")(question="one")
    line = _one_line_error(_cli("report", str(tmp_path / "a"), "--compare", str(tmp_path / "missing")))
    assert "missing" in line and "not a run folder" in line


def test_pricing_list_into_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "otel_dspy_cost.cli", "pricing", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_demo_with_a_misspelt_model_is_one_line_naming_the_nearest(tmp_path):
    line = _one_line_error(_cli("demo", "--model", "openai/gpt-4o-mni", "--out", str(tmp_path / "d")))
    assert "gpt-4o-mini" in line
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("model", ["anthropic/claude-3-5-haiku", "gemini/gemini-2.0-flash"])
def test_demo_runs_against_the_simulator_for_anthropic_and_gemini_models(tmp_path, model):
    result = _cli("demo", "--model", model, "--budget", "0.02", "--out", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr[-2000:]
    spent, calls = _spent_and_calls(result.stdout)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert calls > 3 and summary["calls"] == calls and summary["total_cost_usd"] == pytest.approx(spent, abs=1e-6)
    assert list(summary["by_model"]) == [model] and summary["unknown_cost_calls"] == 0


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4", "gemini/gemini-2.5-pro"])
def test_demo_with_its_default_cap_reaches_the_trial_table_for_each_provider(tmp_path, model):
    """The default cap is scaled by the model's price: an expensive model trips at the same point (issue 27:
    claude-sonnet-4 stopped after 1 call, gemini-2.5-pro after 2, under gpt-4o-mini's $0.012)."""
    result = _cli("demo", "--model", model, "--out", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr[-2000:]
    spent, calls = _spent_and_calls(result.stdout)
    limit = float(re.search(r"budget \$([0-9.]+)", result.stdout).group(1))
    assert calls > 20 and spent <= limit and "trials: cost next to score" in result.stdout
    assert spent / limit > 0.8


def test_miprov2_without_optuna_is_refused_before_any_lm_call():
    script = textwrap.dedent(f"""
        import sys
        sys.modules["optuna"] = None
        import dspy, otel_dspy_cost
        from otel_dspy_cost.simulator import SimulatorServer
        otel_dspy_cost.instrument()
        with SimulatorServer() as server:
            lm = dspy.LM("{MODEL}", api_base=server.api_base, api_key="x", cache=False, max_tokens=64)
            data = [dspy.Example(question=f"q {{i}}", answer="a").with_inputs("question") for i in range(6)]
            try:
                with dspy.context(lm=lm):
                    dspy.MIPROv2(metric=lambda e, p, t=None: 1.0, auto="light", prompt_model=lm, task_model=lm,
                                 verbose=False).compile(dspy.Predict("question -> answer"), trainset=data)
            except ImportError as exc:
                print("REFUSED", server.count, exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=ENV)
    assert "REFUSED 0 " in result.stdout and "otel-dspy-cost[mipro]" in result.stdout, result.stderr[-2000:]


# -- the demo on a terminal ---------------------------------------------------------------------------------------

def _screen(raw: str) -> list[str]:
    """What a terminal shows for `raw`: carriage returns go back to the line start, ESC[K clears the rest."""
    lines, current, col = [], [], 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if raw.startswith("\x1b[K", i):
            del current[col:]
            i += 3
            continue
        if raw.startswith("\x1b[", i):  # other escapes (colours from rich): skip to the final letter
            m = re.match(r"\x1b\[[0-9;?]*[A-Za-z]", raw[i:])
            i += len(m.group(0)) if m else 1
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(current))
            current, col = [], 0
        else:
            if col < len(current):
                current[col] = ch
            else:
                current.append(ch)
            col += 1
        i += 1
    lines.append("".join(current))
    return lines


def test_demo_on_a_terminal_shows_one_progress_line_that_never_shares_a_line(tmp_path):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "otel_dspy_cost.cli", "demo", "--out", str(tmp_path / "d")],
                            stdin=follower, stdout=follower, stderr=follower, env={**ENV, "COLUMNS": "160"},
                            close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 150
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    raw = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    assert proc.returncode == 0, raw[-3000:]
    progress = re.compile(r"  \[[#.]{20}\] +\d+%  \$[0-9.]+ of \$[0-9.]+, \d+ calls(, compile projected \$[0-9.]+)?")
    assert "\r\x1b[K  [" in raw  # redrawn in place while the run went on
    screen = _screen(raw)
    shown = [line for line in screen if "calls" in line and "[" in line and "$" in line and "#" in line
             or progress.search(line)]
    assert shown, screen[-40:]
    for line in shown:  # the progress line alone on its line: nothing printed into it, nor it into others
        assert progress.fullmatch(line.rstrip()), repr(line)
    assert "%|" not in raw  # DSPy's tqdm bars are off in the demo
    assert any("spend by module" in line for line in screen) and "trials: cost next to score" in raw
    # the random search's projection (its candidate seeds done so far) shows on the line once a trial ended
    assert any("compile projected $" in line for line in shown), shown


# -- a dead collector at exit ------------------------------------------------------------------------------------

_PREDICT_ONCE = textwrap.dedent(f"""
    import dspy, otel_dspy_cost
    from otel_dspy_cost.simulator import SimulatorServer
    otel_dspy_cost.instrument()
    with SimulatorServer() as server:
        lm = dspy.LM("{MODEL}", api_base=server.api_base, api_key="x", cache=False, max_tokens=64)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="is the collector up?")
    print("done", flush=True)
""")


def _timed(env):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _PREDICT_ONCE], capture_output=True, text=True, timeout=120,
                            env=env)
    return time.monotonic() - start, result


def test_a_dead_collector_delays_exit_by_at_most_the_shutdown_bound():
    baseline, ok = _timed({k: v for k, v in ENV.items() if not k.startswith("OTEL_EXPORTER_OTLP")})
    assert ok.returncode == 0 and "done" in ok.stdout
    dead = {**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_DSPY_COST_SHUTDOWN_TIMEOUT_S": "1"}
    elapsed, result = _timed(dead)
    assert result.returncode == 0 and "done" in result.stdout
    assert elapsed - baseline < 4.0, (elapsed, baseline)  # the SDK alone retried for 11-15 s here
    said = [line for line in result.stderr.splitlines() if "export" in line or "telemetry" in line]
    assert len(said) <= 2 and any("not delivered within" in line for line in said), result.stderr


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


def test_a_slow_collector_at_exit_is_told_apart_from_a_dead_one():
    """The collector takes the spans but answers after the exit bound: the message says they were being exported
    with no answer yet (they may still be stored), not that they were dropped."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest.FromString(body)
            received.append(sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans))
            time.sleep(3)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
               "OTEL_DSPY_COST_SHUTDOWN_TIMEOUT_S": "1", "OTEL_METRICS_EXPORTER": "none"}
        _, result = _timed(env)
    finally:
        server.shutdown()
    assert result.returncode == 0 and "done" in result.stdout
    (line,) = [line for line in result.stderr.splitlines() if "not delivered within" in line]
    assert f"0 spans acknowledged; {sum(received)} being exported with no answer yet" in line, line
    assert sum(received) >= 2  # the predictor and LM spans reached the collector
