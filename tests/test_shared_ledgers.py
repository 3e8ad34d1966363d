"""Budgets shared across processes (real SQLite file, real redis-server) and rolling/calendar windows."""

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dspy
import pytest
from conftest import MODEL, QA, free_port

import otel_dspy_cost
from otel_dspy_cost.ledgers.in_process import InProcessLedger
from otel_dspy_cost.ledgers.protocol import Limits, Refusal
from otel_dspy_cost.ledgers.urls import ledger_from_url

WORKER = str(Path(__file__).resolve().parent / "ledger_worker.py")
PER_CALL = (40 * 0.15 + 10 * 0.6) / 1e6  # TinyLM's usage at gpt-4o-mini prices


class RedisServer:
    def __init__(self, tmp_path):
        if shutil.which("redis-server") is None:
            pytest.skip("Debian package redis-server missing (tests/install-system-deps.sh installs it)")
        self.port, self.dir, self.proc = free_port(), tmp_path, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        # Append-only file on: data survives a kill and restart, as a production Redis would keep it.
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                                      "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture(params=["sqlite", "redis"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'budgets.db'}"
    else:
        server = RedisServer(tmp_path).start()
        yield server.url
        server.kill()


def test_eight_processes_share_one_cap_and_every_call_counts_once(ledger_url):
    cap = PER_CALL * 8 * 500 / 2  # half the calls fit
    procs = [subprocess.Popen([sys.executable, WORKER, ledger_url, repr(cap), "500"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    made = sum(r["made"] for r in results)
    ledger = ledger_from_url(ledger_url)
    account = ledger.key("fleet")
    ledger.open(account, Limits(cap, None, {}, False))
    state = ledger.inner.state(account)
    assert state.calls == made  # every call made is in the ledger, once
    assert state.spent_usd == pytest.approx(made * PER_CALL)
    assert state.spent_usd <= cap  # one number for all eight processes: never overshot
    # The cap was reached (a process that finished its 500 calls early was never refused): what is left
    # is less than one more call's worst-case reservation.
    assert made < 8 * 500 and any(r["refused"] for r in results) and cap - state.spent_usd < 1e-4
    assert state.reserved_usd == 0


def test_a_killed_process_reservation_is_released_after_the_timeout(ledger_url):
    p = subprocess.Popen([sys.executable, WORKER, "--hold", ledger_url, "1.5"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    ledger = ledger_from_url(ledger_url)
    account = ledger.key("held")
    ledger.open(account, Limits(1.0, None, {}, True))
    assert ledger.inner.state(account).reserved_usd == pytest.approx(0.25)  # held by a dead process...
    time.sleep(1.8)
    assert ledger.inner.state(account).reserved_usd == 0  # ...until its reservation expires
    assert not isinstance(ledger.reserve([account], 1.0, "infer"), Refusal)


def test_redis_killed_fail_closed_refuses_naming_the_ledger(otel, redis_server, server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=64, num_retries=0)
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="closed", ledger=redis_server.url)
    with guard, dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="before")
        redis_server.kill()
        sent = server.count
        with pytest.raises(otel_dspy_cost.LedgerUnavailableError) as info:
            dspy.Predict("question -> answer")(question="while down")
    assert redis_server.url in str(info.value) and "fail_open" in str(info.value)
    assert server.count == sent  # no provider call without accounting
    redis_server.start()
    with guard, dspy.context(lm=lm):  # not sticky: once the ledger is back, calls go on
        dspy.Predict("question -> answer")(question="after")
    assert guard.call_count == 2


def test_redis_killed_fail_open_counts_locally_and_replays(otel, redis_server, server, caplog):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=64, num_retries=0)
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="open", ledger=redis_server.url, on_unavailable="fail_open")
    with guard, dspy.context(lm=lm):
        for i in range(2):
            dspy.Predict("question -> answer")(question=f"before {i}")
        redis_server.kill()
        for i in range(3):
            dspy.Predict("question -> answer")(question=f"while down {i}")
        assert "unreachable" in caplog.text
        redis_server.start()
        dspy.Predict("question -> answer")(question="after")
    fresh = ledger_from_url(redis_server.url)
    account = fresh.key("open")
    fresh.open(account, Limits(1.0, None, {}, False))
    state = fresh.inner.state(account)
    assert state.calls == 6 == server.count  # nothing lost, nothing counted twice
    assert state.spent_usd == pytest.approx(guard.spent_usd)


def test_rolling_window_rolls_over_with_an_injected_clock(tmp_path):
    now = [1_700_000_000.0]
    ledger = ledger_from_url(f"sqlite:///{tmp_path / 'w.db'}", clock=lambda: now[0])
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="hourly", ledger=ledger, window="1h")
    account = guard.account
    res = ledger.reserve([account], 0.9, "infer")
    ledger.settle(res, 0.9, 0.9)
    now[0] += 59 * 60
    assert guard.spent_usd == pytest.approx(0.9)
    assert isinstance(ledger.reserve([account], 0.2, "infer"), Refusal)
    now[0] += 2 * 60  # 61 minutes after the spend: it no longer counts
    assert guard.spent_usd == 0
    # The refusal stopped the budget for the fleet, for one window length after the stop: this process and
    # another on the same file are refused until then, and both have the window again after.
    assert ledger.reserve([account], 0.2, "infer").reason == "tripped"
    other = ledger_from_url(f"sqlite:///{tmp_path / 'w.db'}", clock=lambda: now[0])
    otel_dspy_cost.budget(limit_usd=1.0, label="hourly", ledger=other, window="1h")
    assert other.reserve([account], 0.2, "infer").reason == "tripped"
    now[0] += 58 * 60 + 1  # one hour after the stop
    assert not isinstance(other.reserve([account], 0.2, "infer"), Refusal)
    assert not isinstance(ledger.reserve([account], 0.2, "infer"), Refusal)
    start, end = guard.window_bounds()
    assert end - start == dt.timedelta(hours=1)


def test_calendar_day_window_follows_the_time_zone(tmp_path):
    berlin = dt.timezone(dt.timedelta(hours=1))  # 2026-01-15 is winter time in Europe/Berlin
    now = [dt.datetime(2026, 1, 15, 23, 30, tzinfo=berlin).timestamp()]
    ledger = ledger_from_url(f"sqlite:///{tmp_path / 'c.db'}", clock=lambda: now[0])
    guard = otel_dspy_cost.budget(limit_usd=5.0, label="daily", ledger=ledger, window="day", tz="Europe/Berlin")
    ledger.settle(ledger.reserve([guard.account], 3.0, "train"), 3.0, 3.0)
    start, end = guard.window_bounds()
    assert start == dt.datetime(2026, 1, 14, 23, 0, tzinfo=dt.UTC) and end - start == dt.timedelta(days=1)
    now[0] += 20 * 60  # 23:50 local: same day
    assert guard.spent_usd == 3.0 and guard.spent_by_phase() == {"train": 3.0}
    now[0] += 20 * 60  # 00:10 local, next day: a fresh budget
    assert guard.spent_usd == 0


def test_labels_are_namespaced_and_amounts_exact(redis_server):
    a = otel_dspy_cost.budget(limit_usd=1.0, label="project-a", ledger=redis_server.url)
    b = otel_dspy_cost.budget(limit_usd=1.0, label="project-b", ledger=redis_server.url)
    for _ in range(1000):
        a.ledger.settle(a.ledger.reserve([a.account], 0.0000001, "infer"), 0.0000001, 0.0000001)
    assert a.spent_usd == 0.0001 and b.spent_usd == 0  # integer nano-dollars: no float drift
    keys = {k.decode() for k in a.ledger.inner.client.keys("*")}
    assert keys and all(k.startswith("otel-dspy-cost:{project-a}") for k in keys)


def test_budget_cli_status_and_reset(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    guard = otel_dspy_cost.budget(limit_usd=2.0, label="nightly", ledger=url)
    guard.ledger.settle(guard.ledger.reserve([guard.account], 0.5, "train"), 0.5, 0.5)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", "budget", *args], capture_output=True,
                              text=True, timeout=60, env={**os.environ})

    status = json.loads(cli("status", url, "nightly", "--limit", "2", "--window", "1d").stdout)
    assert status["spent_usd"] == 0.5 and status["remaining_usd"] == 1.5 and "start" in status["window"]
    assert cli("reset", url, "nightly").returncode == 0
    after = cli("status", url, "nightly")  # reset removes the label's records: nothing is there any more
    assert after.returncode == 2 and "no budget labelled 'nightly'" in after.stderr and "none yet" in after.stderr
    bad = cli("status", "ftp://nowhere", "x")
    assert bad.returncode == 2 and "sqlite:///" in bad.stderr


def test_a_locked_sqlite_ledger_is_unavailable_not_ignored(otel, server, tmp_path):
    """Another process holding the database's write lock past the busy timeout: the policy applies."""
    import sqlite3

    path = tmp_path / "locked.db"
    ledger = ledger_from_url(f"sqlite:///{path}", busy_timeout_s=0.2)
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="locked", ledger=ledger)
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=64, num_retries=0)
    try:
        with pytest.raises(otel_dspy_cost.LedgerUnavailableError) as info, guard, dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="locked?")
        assert "locked.db" in str(info.value) and server.count == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with guard, dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="unlocked")
    assert guard.call_count == 1 == server.count


@pytest.mark.parametrize("where", ["in-process", "sqlite", "redis"])
def test_a_refusal_is_sticky_from_the_ledger_step_that_refused(where, tmp_path):
    """The stop is taken in the same locked step as the refusal, not when the budget gets round to tripping
    the account: a smaller call from another thread right after the refusal is refused as well (it fits
    under the cap, so without the sticky step it would be admitted after the breach)."""
    if where == "in-process":
        ledger: Any = InProcessLedger()
    elif where == "sqlite":
        ledger = ledger_from_url(f"sqlite:///{tmp_path / 'sticky.db'}").inner
    else:
        server = RedisServer(tmp_path).start()
        ledger = ledger_from_url(server.url).inner
    try:
        account = ledger.key("sticky") if hasattr(ledger, "key") else "sticky"
        ledger.open(account, Limits(1.0, None, {}, True))
        spent = ledger.reserve([account], 0.6, "infer")
        ledger.settle(spent, 0.6, 0.6)
        refused = ledger.reserve([account], 0.5, "infer")  # 0.6 spent + 0.5 > 1.0 with nothing in flight
        assert isinstance(refused, Refusal) and refused.reason == "limit_usd" and not refused.wait
        after = ledger.reserve([account], 0.1, "infer")  # fits in the 0.4 left
        assert isinstance(after, Refusal) and after.reason == "tripped", after
    finally:
        if where == "redis":
            server.kill()


def test_threads_opening_a_new_sqlite_ledger_at_once_all_get_in(tmp_path):
    """Five pool threads and a plain one make their first reservation on a fresh file together (the start of
    any parallel evaluate): SQLite refuses the losers' switch to WAL at once, without its busy timeout, which
    must not read as an unavailable ledger (fail_closed would refuse a healthy run)."""
    import threading

    failures: list[Refusal] = []
    for trial in range(120):  # the race loses in ~1 first open of 20 without the retry
        ledger = ledger_from_url(f"sqlite:///{tmp_path / f'fresh{trial}.db'}")
        ledger.open(ledger.key("fresh"), Limits(1.0, None, {}, False))  # in memory: the file is untouched
        start = threading.Barrier(6)

        def first(ledger=ledger, start=start):
            start.wait()
            held = ledger.reserve([ledger.key("fresh")], 0.001, "infer")
            if isinstance(held, Refusal):
                failures.append(held)
            else:
                ledger.release(held)

        threads = [threading.Thread(target=first) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures[:3]


def test_a_redis_account_in_the_per_call_layout_is_folded_into_buckets(redis_server):
    """Spend written by earlier versions (a sorted set and a hash per call, one live reservation) still
    counts after an upgrade: folded into buckets on first use, more calls than Lua's unpack() limit."""
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="many", ledger=redis_server.url, window="1d")
    inner = guard.ledger.inner
    pipe = inner.client.pipeline()
    now = time.time()
    for i in range(12000):
        pipe.hsetnx(f"{guard.account}:amt", f"c{i}", "50|50|infer")
        pipe.zadd(f"{guard.account}:ts", {f"c{i}": now - 3600})
    pipe.hsetnx(f"{guard.account}:amt", "old", "7|7|infer")  # two days old: outside the window
    pipe.zadd(f"{guard.account}:ts", {"old": now - 2 * 86400})
    pipe.hset(f"{guard.account}:res", "held", f"1000|infer|{now + 600}")
    pipe.execute()
    reader = ledger_from_url(redis_server.url).inner  # e.g. `budget status` without --window: claims nothing
    assert reader.state(guard.account).calls == 12001 and not inner.client.exists(f"{guard.account}:meta")
    assert guard.spent_usd == pytest.approx(12000 * 50 / 1e9) and guard.call_count == 12000
    assert inner.state(guard.account).reserved_usd == pytest.approx(1e-6)
    assert not inner.client.exists(f"{guard.account}:ts", f"{guard.account}:amt")
    res = guard.ledger.reserve([guard.account], 0.001, "infer")
    assert not isinstance(res, Refusal)
    refused = guard.ledger.reserve([guard.account], 1.0, "infer")
    assert isinstance(refused, Refusal) and refused.spent_usd == pytest.approx(0.0006)
    assert refused.reserved_usd == pytest.approx(0.001 + 1e-6)


def test_process_wide_default_ledger_from_the_environment(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'default.db'}"
    monkeypatch.setenv("OTEL_DSPY_COST_LEDGER", url)
    first = otel_dspy_cost.budget(limit_usd=1.0, label="from-env")
    second = otel_dspy_cost.budget(limit_usd=1.0, label="from-env")  # e.g. another process: same account
    first.ledger.settle(first.ledger.reserve([first.account], 0.3, "infer"), 0.3, 0.3)
    assert first.ledger.url == url and second.spent_usd == pytest.approx(0.3)
    monkeypatch.delenv("OTEL_DSPY_COST_LEDGER")
    assert otel_dspy_cost.budget(limit_usd=1.0, label="from-env").spent_usd == 0  # in-process again


def test_fail_open_enforces_what_was_left_when_the_ledger_went_away(otel, redis_server, server):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=32, num_retries=0)
    guard = otel_dspy_cost.budget(limit_usd=0.001, label="left", ledger=redis_server.url, on_unavailable="fail_open")
    with guard, dspy.context(lm=lm):
        for i in range(4):
            dspy.Predict("question -> answer")(question=f"before {i}")
    spent_before = guard.spent_usd  # read from Redis: the last shared totals this process saw
    redis_server.kill()
    with pytest.raises(otel_dspy_cost.BudgetExceededError), guard, dspy.context(lm=lm):
        for i in range(100):
            dspy.Predict("question -> answer")(question=f"while down {i}")
    assert spent_before < guard.spent_usd <= 0.001  # the local ledger started from what was left
    redis_server.start()
    fresh = ledger_from_url(redis_server.url)
    account = fresh.key("left")
    fresh.open(account, Limits(0.001, None, {}, False))
    guard.ledger.flush()
    assert fresh.inner.state(account).calls == server.count and fresh.inner.state(account).spent_usd <= 0.001


def _clocked(url, now, **kwargs):
    """Two ledger objects on one store behave as two processes would (each keeps its own limits)."""
    return ledger_from_url(url, clock=lambda: now[0], **kwargs)


def test_spend_leaves_a_rolling_window_late_by_at_most_one_bucket(ledger_url):
    """A 1-day window keeps 60 s buckets: spend stops counting between 1 d and 1 d + 60 s after it was
    settled, never before."""
    t0 = 1_700_000_000 // 60 * 60 + 30.0  # 30 s into a bucket
    now = [t0]
    ledger = _clocked(ledger_url, now)
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="daily-rolling", ledger=ledger, window="1d")
    ledger.settle(ledger.reserve([guard.account], 0.4, "infer"), 0.4, 0.4)
    for later, counted in [(86400 - 1, True), (86400 + 29, True), (86400 + 31, False)]:
        now[0] = t0 + later
        assert guard.spent_usd == pytest.approx(0.4 if counted else 0), later
    ledger.settle(ledger.reserve([guard.account], 0.2, "infer"), 0.2, 0.2)
    assert guard.spent_usd == pytest.approx(0.2) and guard.call_count == 1


def test_a_settle_counts_its_call_once_however_it_arrives(ledger_url):
    now = [1_700_000_000.0]
    ledger = _clocked(ledger_url, now, reservation_timeout_s=10)
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="once", ledger=ledger)
    inner, account = ledger.inner, guard.account
    first = inner.reserve([account], 0.1, "infer")
    inner.settle(first, 0.05, 0.05)
    # A settle whose reply was lost is replayed with the same id: its reservation is gone, so not again.
    inner.record(first.reservation_id, [account], "infer", 0.05, 0.05, now[0], reserved=True)
    assert inner.state(account).calls == 1
    late = inner.reserve([account], 0.1, "infer")
    now[0] += 11  # the call outlives its reservation: the hold is given back...
    assert inner.state(account).reserved_usd == 0
    inner.settle(late, 0.07, 0.07)  # ...and its settle still counts it, once
    inner.record(late.reservation_id, [account], "infer", 0.07, 0.07, now[0], reserved=True)
    for _ in range(2):  # a call counted locally while the ledger was away, replayed twice
        inner.record("local-1", [account], "infer", 0.01, 0.01, now[0])
    state = inner.state(account)
    assert state.calls == 3 and state.spent_usd == pytest.approx(0.13) and state.reserved_usd == 0
    released = inner.reserve([account], 0.5, "infer")
    inner.release(released)
    assert inner.state(account).reserved_usd == 0 and inner.state(account).calls == 3


def _footprint(ledger, account):
    """What the store holds for one account: Redis keys, or SQLite rows."""
    inner = ledger.inner
    if hasattr(inner, "client"):
        return len(inner.client.keys(f"{account}*"))
    import sqlite3

    db = sqlite3.connect(inner.path)
    tables = ["accounts", "buckets", "totals", "reservations", "expired", "replayed"]
    return sum(db.execute(f"SELECT COUNT(*) FROM {t} WHERE account=?", (account,)).fetchone()[0] for t in tables)


def test_settled_calls_leave_no_per_call_state(ledger_url):
    """The store grows with time buckets, not with calls: what makes a reservation O(1) in the calls."""
    now = [1_700_000_000.0]
    ledger = _clocked(ledger_url, now)
    guard = otel_dspy_cost.budget(limit_usd=100.0, label="flat", ledger=ledger, window="1h", max_train_usd=50.0)
    sizes = []
    for n in (10, 1000):
        for i in range(n):
            ledger.settle(ledger.reserve([guard.account], 0.002, "train" if i % 2 else "infer"), 0.001, 0.002)
        sizes.append(_footprint(ledger, guard.account))
    assert sizes[0] == sizes[1] and sizes[0] <= 8
    assert guard.call_count == 1010 and guard.spent_usd == pytest.approx(1.01)
    assert guard.spent_by_phase() == pytest.approx({"train": 0.505, "infer": 0.505})


def test_one_label_has_one_window_on_a_shared_ledger(otel, server, ledger_url):
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=32, num_retries=0)
    daily = otel_dspy_cost.budget(limit_usd=1.0, label="team", ledger=ledger_from_url(ledger_url), window="1d")
    with daily, dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="first")
    hourly = otel_dspy_cost.budget(limit_usd=1.0, label="team", ledger=ledger_from_url(ledger_url), window="1h")
    with pytest.raises(otel_dspy_cost.BudgetExceededError) as info, hourly, dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="another window")
    assert info.value.reason == "window_mismatch" and "'rolling:86400'" in str(info.value)
    assert "budget reset" in str(info.value) and server.count == 1
    assert daily.spent_usd > 0 and hourly.spent_usd == pytest.approx(daily.spent_usd)  # by the ledger's window
    with daily, dspy.context(lm=lm):  # the budget it belongs to goes on
        dspy.Predict("question -> answer")(question="second")
    assert daily.call_count == 2


def test_a_sqlite_ledger_in_the_per_call_layout_is_folded_into_buckets(tmp_path):
    """A budgets.db written by earlier versions (one `spend` row per call) keeps counting after an upgrade."""
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE spend (call_id TEXT, account TEXT, ts REAL, nano INTEGER, econ_nano INTEGER, phase TEXT,
            PRIMARY KEY (call_id, account));
        CREATE TABLE reservations (id TEXT, account TEXT, nano INTEGER, phase TEXT, expires REAL, owner TEXT,
            PRIMARY KEY (id, account));
    """)
    now = time.time()
    old.executemany("INSERT INTO spend VALUES (?,?,?,?,?,?)",
                    [(f"c{i}", "legacy", now - 60 * i, 100_000_000, 100_000_000, "train" if i % 2 else "infer")
                     for i in range(5)] + [("gone", "legacy", now - 3 * 86400, 10**9, 10**9, "infer")])
    old.commit()
    old.close()
    url = f"sqlite:///{path}"

    def status():
        out = subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", "budget", "status", url, "legacy"],
                             capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)["spent_usd"]

    assert status() == pytest.approx(1.5)  # read first, without a window: every old row counts, nothing claimed
    guard = otel_dspy_cost.budget(limit_usd=0.7, label="legacy", ledger=url, window="1d")
    assert guard.spent_usd == pytest.approx(0.5) and guard.call_count == 5
    assert guard.spent_by_phase() == pytest.approx({"train": 0.2, "infer": 0.3})
    assert isinstance(guard.ledger.reserve([guard.account], 0.3, "infer"), Refusal)
    assert status() == pytest.approx(0.5)  # without --window: by the window the ledger now keeps


def test_a_ledger_password_never_reaches_the_refusal(otel, server):
    pytest.importorskip("redis")
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-x-0000", cache=False, max_tokens=32, num_retries=0)
    guard = otel_dspy_cost.budget(limit_usd=1.0, label="pw", ledger=f"redis://:hunter2pw@127.0.0.1:{free_port()}/0")
    with pytest.raises(otel_dspy_cost.LedgerUnavailableError) as info, guard, dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="down")
    assert "hunter2pw" not in str(info.value) and "127.0.0.1" in str(info.value) and server.count == 0


def test_a_shared_budget_holds_sampled_out_in_a_pool_and_a_plain_thread(ledger_url, server, lm):
    """The accounting-without-tracing matrix of test_accounting, on the shared ledgers: an ALWAYS_OFF sampler
    (no span of ours records), calls from a thread pool and from a plain thread. Every request the simulator
    saw is counted once in the ledger, and spend never passes the cap."""
    import concurrent.futures
    import threading

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    limit = 0.004  # room for the five callers' worst cases at once (0.0004 each); spend fills the rest
    provider = TracerProvider(sampler=ALWAYS_OFF)
    otel_dspy_cost.uninstrument()
    otel_dspy_cost.instrument(tracer_provider=provider, unknown_model="warn")

    def one(_):
        with dspy.context(lm=lm):
            dspy.Predict(QA)(question="what does a sampled-out call cost?")

    try:
        before = server.count
        with pytest.raises(otel_dspy_cost.BudgetExceededError) as raised:
            with otel_dspy_cost.budget(limit_usd=limit, label="sampled-out", ledger=ledger_url) as b:
                stopped: list[BaseException] = []

                def plain():
                    try:
                        for i in range(100):
                            one(i)
                    except otel_dspy_cost.BudgetExceededError as exc:
                        stopped.append(exc)

                thread = threading.Thread(target=plain)
                thread.start()
                with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                    list(pool.map(one, range(400)))
                thread.join()
                assert stopped, "the plain thread was stopped by the same cap"
        sent = server.count - before
        assert raised.value.reason in ("limit_usd", "tripped"), raised.value
        assert sent > 5 and b.call_count == sent, str(raised.value)
        assert b.spent_usd <= limit
    finally:
        otel_dspy_cost.uninstrument()
        provider.shutdown()
