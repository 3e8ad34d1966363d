"""Shared ledgers at fleet scale: reserve + settle latency with 10k, 1M and 10M calls already in the window.

    python benchmarks/ledger_scale.py [--sizes 10000,1000000,10000000] [--ops 2000] [--procs 1,16]
                                      [--backends redis,sqlite]

For each backend (a redis-server started here, without persistence; a SQLite file in a temporary folder) and
each size, a 1-day rolling budget is loaded with that many settled calls spread over the last 23 hours, then
timed: reserve + settle pairs through the same ledger object `budget(ledger=URL)` uses, from 1 process and
from 16 processes at once. The baseline is the same measurement on an empty window in the same run; the
ratio column is latency / baseline (flat = about 1.0x).

Loading: the ledgers keep per-bucket counters, not per-call records, so N settled calls are written as
the buckets N settles leave behind (`_load_*` below); the benchmark then reads them back through the ledger
(calls and spend must equal N and N x amount) and, for 10k, also loads by real reserve + settle calls, whose
timing must match. Memory: the Redis keys' `MEMORY USAGE` and SQLite's file size.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from otel_dspy_cost.ledgers.protocol import NANO, Limits, Refusal, to_nano  # noqa: E402
from otel_dspy_cost.ledgers.urls import ledger_from_url  # noqa: E402
from otel_dspy_cost.ledgers.windows import parse_window

WINDOW = parse_window("1d")
AMOUNT = 0.0002  # USD per call, reserved and settled
SPAN_S = 23 * 3600


def limits() -> Limits:
    return Limits(1e9, None, {}, True, WINDOW)


def _spread(calls: int, now: float) -> list[tuple[int, int]]:
    """(bucket, calls) for `calls` settles spread evenly over the last 23 h."""
    buckets = list(range(WINDOW.bucket(now - SPAN_S), WINDOW.bucket(now) + 1))
    per, extra = divmod(calls, len(buckets))
    return [(b, per + (1 if k < extra else 0)) for k, b in enumerate(buckets) if per or k < extra]


def _load_redis(ledger, account: str, calls: int, now: float) -> None:
    """What `calls` settles spread over the last 23 h leave in Redis: bucket counters and their total."""
    pipe = ledger.inner.client.pipeline(transaction=False)
    pipe.hset(f"{account}:meta", mapping={"win": WINDOW.spec, "v": "2"})
    for b, n in _spread(calls, now):
        nano = n * to_nano(AMOUNT)
        pipe.hset(f"{account}:b:{b}", mapping={"n": nano, "e": nano, "c": n, "p:infer": nano})
        pipe.zadd(f"{account}:bi", {str(b): b})
    total = calls * to_nano(AMOUNT)
    pipe.hset(f"{account}:tot", mapping={"n": total, "e": total, "c": calls, "p:infer": total})
    pipe.execute()


def _load_sqlite(ledger, account: str, calls: int, now: float) -> None:
    """The same in SQLite: bucket rows and the account's total row."""
    import sqlite3

    db = sqlite3.connect(ledger.inner.path)
    db.execute("INSERT OR REPLACE INTO accounts VALUES (?, ?)", (account, WINDOW.spec))
    db.executemany("INSERT INTO buckets VALUES (?,?,?,?,?,?)",
                   [(account, b, "infer", n * to_nano(AMOUNT), n * to_nano(AMOUNT), n) for b, n in _spread(calls, now)])
    total = calls * to_nano(AMOUNT)
    db.execute("INSERT INTO totals VALUES (?,?,?,?,?)", (account, "infer", total, total, calls))
    db.commit()
    db.close()


def pairs(url: str, account: str, ops: int) -> list[float]:
    """Seconds per reserve + settle pair, `ops` times, on a ledger of our own (as one process has)."""
    ledger = ledger_from_url(url)
    ledger.open(account, limits())
    out = []
    for _ in range(ops):
        start = time.perf_counter()
        res = ledger.reserve([account], AMOUNT, "infer")
        if isinstance(res, Refusal):
            raise SystemExit(f"refused: {res}")
        ledger.settle(res, AMOUNT, AMOUNT)
        out.append(time.perf_counter() - start)
    return out


def _worker(url: str, account: str, ops: int, go, results) -> None:
    ledger = ledger_from_url(url)
    ledger.open(account, limits())
    ledger.state(account)  # connect before the start
    go.wait()
    results.put(pairs(url, account, ops))


def fleet(url: str, account: str, procs: int, ops: int) -> tuple[list[float], float]:
    """(per-pair latencies of all processes, pairs per second overall)."""
    if procs == 1:
        start = time.perf_counter()
        lat = pairs(url, account, ops)
        return lat, ops / (time.perf_counter() - start)
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    per = max(1, ops // procs)
    workers = [ctx.Process(target=_worker, args=(url, account, per, go, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    start = time.perf_counter()
    go.set()
    lat: list[float] = []
    for _ in workers:
        lat += results.get(timeout=600)
    elapsed = time.perf_counter() - start
    for w in workers:
        w.join(timeout=60)
    return lat, len(lat) / elapsed


def p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def start_redis(folder: str) -> tuple[subprocess.Popen, str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server missing: bash tests/install-system-deps.sh installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def footprint(ledger, account: str) -> str:
    """What the store holds for one account: Redis keys and their MEMORY USAGE, or SQLite rows."""
    inner = ledger.inner
    if hasattr(inner, "client"):
        keys = list(inner.client.scan_iter(f"{account}*"))
        return f"{len(keys)} keys, {sum(inner.client.memory_usage(k) or 0 for k in keys) / 1024:.0f} KiB"
    import sqlite3

    db = sqlite3.connect(inner.path)
    rows = sum(db.execute(f"SELECT COUNT(*) FROM {t} WHERE account=?", (account,)).fetchone()[0]
               for t in ("buckets", "totals", "reservations", "expired"))
    db.close()
    return f"{rows} rows"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,1000000,10000000")
    ap.add_argument("--ops", type=int, default=2000, help="reserve+settle pairs per measurement (all processes)")
    ap.add_argument("--procs", default="1,16")
    ap.add_argument("--rounds", type=int, default=3, help="cases take turns round by round; medians printed")
    ap.add_argument("--backends", default="redis,sqlite")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(s) for s in args.procs.split(",")]
    folder = tempfile.mkdtemp(prefix="ledger-scale-")
    redis_proc = None
    try:
        for backend in args.backends.split(","):
            if backend == "redis":
                redis_proc, url = start_redis(folder)
                load = _load_redis
            else:
                url, load = f"sqlite:///{folder}/budgets.db", _load_sqlite
            ledger = ledger_from_url(url)
            cases = [("empty", 0, False)] + [(f"{n:,}", n, False) for n in sizes]
            if sizes and sizes[0] <= 20000:
                cases.insert(2, (f"{sizes[0]:,} (real settles)", sizes[0], True))
            accounts = {}
            for name, n, real in cases:
                account = accounts[name] = ledger.key(f"scale-{name.replace(',', '').replace(' ', '-')}")
                ledger.open(account, limits())
                if real:
                    pairs(url, account, n)
                elif n:
                    load(ledger, account, n, time.time())
                state = ledger.state(account)  # read back through the ledger: what the load wrote is what it counts
                assert state.calls == n and abs(state.spent_usd - n * AMOUNT) < 1e-6, (state, n)
            samples: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            for _ in range(args.rounds):
                for name, _n, _real in cases:
                    for k in procs:
                        lat, rate = fleet(url, accounts[name], k, args.ops)
                        samples.setdefault((name, k), []).append((p(lat, 0.5), p(lat, 0.99), rate))
            print(f"\n{backend}: 1-day rolling window ({WINDOW.bucket_s} s buckets), {args.ops} reserve+settle pairs "
                  f"per measurement, median of {args.rounds} interleaved rounds")
            print(f"  {'calls in window':>22} {'procs':>5} {'p50 us':>8} {'p99 us':>8} {'pairs/s':>8} "
                  f"{'p50 vs empty':>12}  store for the account")
            for name, n, _real in cases:
                for k in procs:
                    got = samples[(name, k)]
                    p50, p99, rate = (statistics.median(x[i] for x in got) for i in range(3))
                    base = statistics.median(x[0] for x in samples[("empty", k)])
                    print(f"  {name:>22} {k:>5} {p50 * 1e6:>8.0f} {p99 * 1e6:>8.0f} {rate:>8.0f} "
                          f"{p50 / base:>11.2f}x  {footprint(ledger, accounts[name])}", flush=True)
                after = ledger.state(accounts[name])
                assert after.reserved_usd == 0 and after.calls >= n, after
                assert round(after.spent_usd * NANO) == after.calls * to_nano(AMOUNT), after  # exact, every pair
            if redis_proc is not None:
                redis_proc.kill()
                redis_proc.wait()
                redis_proc = None
    finally:
        if redis_proc is not None:
            redis_proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
