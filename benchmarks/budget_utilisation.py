"""How much of its cap a budget lets a parallel run spend before it stops (and that it never spends more).

    python benchmarks/budget_utilisation.py [--threads 1 4 8 16] [--ledgers memory sqlite redis] [--json]

`dspy.Evaluate` over 400 questions of varied length (`max_tokens=64`) against the local simulator (real HTTP,
DSPy's own engine, gpt-4o-mini prices), under a cap of about 40 calls: the cap is 40 x the mean cost of a call,
measured by a pilot of 20 examples in the same run (the baseline). In process, a budget's ledger is in memory;
on SQLite and Redis, 4 processes run the same Evaluate each, sharing one budget by label. For each row:
utilisation = spend at stop / cap (the issue's aim: >= 0.90 at every thread count), overshoot = spend - cap
(must be <= 0), and the requests that reached the provider and the change in `b.spent_usd`/`b.call_count`
during the 2 s after the `with budget(...)` block exited (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings

warnings.simplefilter("ignore")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dspy-cache-"))

import dspy  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import otel_dspy_cost  # noqa: E402
from otel_dspy_cost.simulator import SimulatedLM, SimulatorServer  # noqa: E402

MODEL = "openai/gpt-4o-mini"
CAP_CALLS = 40
EXAMPLES = 400
PROCESSES = 4
_WORDS = "how much does the cost of a long optimizer run grow when every trial adds demos".split()


def questions(n: int = EXAMPLES) -> list[dspy.Example]:
    """Questions of 3 to ~120 words: prompts, and so worst cases and actual costs, vary call to call."""
    out = []
    for i in range(n):
        length = 3 + (i * 37) % 118
        text = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(length))
        out.append(dspy.Example(question=f"q{i}: {text}?", answer="a").with_inputs("question"))
    return out


def _lm(api_base: str) -> dspy.LM:
    return dspy.LM(MODEL, api_base=api_base, api_key="sk-bench-not-a-real-key", cache=False, max_tokens=64,
                   num_retries=0)


def _program() -> dspy.Module:
    return dspy.Predict(dspy.Signature("question -> answer"))


def _evaluate(program: dspy.Module, devset: list[dspy.Example], threads: int) -> None:
    dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: 1.0, num_threads=threads,
                  display_progress=False, max_errors=10_000, provide_traceback=False)(program)


def pilot_call_usd(api_base: str) -> float:
    """Mean cost of one call over 20 questions spread across the set: the cap's unit."""
    devset = questions()[:: EXAMPLES // 20]
    with dspy.context(lm=_lm(api_base)), otel_dspy_cost.budget(label="pilot") as b:
        _evaluate(_program(), devset, 1)
    return b.spent_usd / b.call_count


def run_one(api_base: str, cap: float, threads: int, ledger: str | None, label: str,
            count_requests=None, wait_timeout_s: float = 300.0) -> dict[str, float]:
    """One Evaluate under the cap; returns spend, calls and what moved after the block exited.
    `wait_timeout_s=0`: a call that would have to wait for calls in flight is refused at once (the baseline:
    admission as it was before it waited)."""
    with dspy.context(lm=_lm(api_base)):
        b = otel_dspy_cost.budget(limit_usd=cap, label=label, ledger=ledger, warn_at=None,
                                  wait_timeout_s=wait_timeout_s)
        try:
            with b:
                _evaluate(_program(), questions(), threads)
            stopped = False
        except otel_dspy_cost.BudgetExceededError:
            stopped = True
    spent, calls = b.spent_usd, b.call_count
    before = count_requests() if count_requests else 0
    time.sleep(2.0)
    after = count_requests() if count_requests else 0
    return {"spent": spent, "calls": calls, "stopped": stopped, "late_requests": after - before,
            "late_spend": b.spent_usd - spent, "late_calls": b.call_count - calls}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_server() -> tuple[subprocess.Popen | None, str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def shared_rows(api_base: str, cap: float, threads: int, url: str, label: str, server: SimulatorServer
                ) -> dict[str, float]:
    """4 processes, each an Evaluate with `threads` threads, one budget (by label) on a shared ledger."""
    cmd = [sys.executable, __file__, "--worker", api_base, str(cap), str(threads), url, label]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    # After the last process left its block: nothing more reaches the provider or the shared ledger.
    reader = otel_dspy_cost.budget(limit_usd=cap, label=label, ledger=url, warn_at=None)
    spent, calls, requests = reader.spent_usd, reader.call_count, server.count
    time.sleep(2.0)
    return {"spent": spent, "calls": calls, "stopped": all(o["stopped"] for o in outs),
            "late_requests": server.count - requests, "late_spend": reader.spent_usd - spent,
            "late_calls": reader.call_count - calls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--ledgers", nargs="+", default=["memory", "sqlite", "redis"])
    parser.add_argument("--latency-ms", type=float, default=20.0, help="the simulator's answer time per call")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    otel_dspy_cost.instrument(tracer_provider=TracerProvider(), unknown_model="warn")
    if args.worker:  # one of the shared-ledger processes
        api_base, cap, threads, url, label = args.worker
        print(json.dumps(run_one(api_base, float(cap), int(threads), url, label)), flush=True)
        return
    rows = []
    redis_proc = None
    tmp = tempfile.mkdtemp(prefix="utilisation-")
    with SimulatorServer(SimulatedLM(latency_s=args.latency_ms / 1000)) as server:
        unit = pilot_call_usd(server.api_base)
        cap = CAP_CALLS * unit
        try:
            for ledger in args.ledgers:
                url = None
                if ledger == "sqlite":
                    url = f"sqlite:///{tmp}/budgets.db"
                elif ledger == "redis":
                    redis_proc, url = _redis_server()
                    if url is None:
                        print("(redis-server not installed: redis rows skipped)", file=sys.stderr)
                        continue
                for threads in args.threads:
                    label = f"util-{ledger}-{threads}"
                    variants = [("waits", 300.0)] + ([("no wait", 0.0)] if url is None else [])
                    for admission, wait_s in variants:
                        if url is None:
                            row = run_one(server.api_base, cap, threads, None, f"{label}-{wait_s:g}",
                                          lambda: server.count, wait_timeout_s=wait_s)
                        else:
                            row = shared_rows(server.api_base, cap, threads, url, label, server)
                        row.update(ledger=ledger, threads=threads, processes=1 if url is None else PROCESSES,
                                   cap=cap, admission=admission, utilisation=row["spent"] / cap,
                                   overshoot=row["spent"] - cap)
                        rows.append(row)
                        if args.json:
                            print(json.dumps(row), flush=True)
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
    if not args.json:
        print(f"cap ${cap:.6f} = {CAP_CALLS} x ${unit:.8f} (mean call, pilot of 20 in this run)")
        print("admission 'no wait' (wait_timeout_s=0) is the baseline: a call is refused as soon as the calls in "
              "flight leave it no room")
        print(f"{'ledger':8} {'admission':9} {'procs':>5} {'threads':>7} {'calls':>6} {'spent':>10} "
              f"{'utilisation':>11} {'overshoot':>11} {'late req':>8} {'late $':>8}")
        for r in rows:
            print(f"{r['ledger']:8} {r['admission']:9} {r['processes']:>5} {r['threads']:>7} {r['calls']:>6} "
                  f"{r['spent']:>10.6f} {r['utilisation']:>11.1%} {r['overshoot']:>11.6f} {r['late_requests']:>8} "
                  f"{r['late_spend']:>8.6f}")


if __name__ == "__main__":
    main()
