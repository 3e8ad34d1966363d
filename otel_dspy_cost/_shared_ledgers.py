"""Ledgers shared across processes and machines (SQLite, Redis), rolling windows, failure policy.

Chosen by URL: `budget(limit_usd=50, window="1d", ledger="sqlite:///path/budgets.db")` or
`ledger="redis://host:6379/0"`; `OTEL_DSPY_COST_LEDGER` sets a process-wide default. On a shared
ledger an account is the budget's *label* (namespaced), so every process using that label spends
from one number. Amounts are stored in integer nano-dollars: sums are exact, no float drift.

Every reservation carries an expiry (`reservation_timeout_s`, default 600 s): a process that crashes
while holding one leaks it only until then. Settling is idempotent per call id, so each call is
counted exactly once, even when its reservation already expired.

When the shared ledger cannot be reached: `on_unavailable="fail_closed"` (default) refuses the provider
call with an error naming the ledger; `"fail_open"` keeps accounting locally with a loud warning (the
local ledger enforces what was left when the shared one was last read) and replays that spend into the
shared ledger once it answers again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
import zoneinfo
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._ledger import AccountState, InProcessLedger, Limits, Refusal, Reservation

logger = logging.getLogger("otel_dspy_cost.budget")
LEDGER_ENV = "OTEL_DSPY_COST_LEDGER"
NANO = 1_000_000_000


def to_nano(usd: float) -> int:
    return int(round(usd * NANO))


# -- windows ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Window:
    """Rolling (`seconds`) or calendar-aligned (`calendar` = day | month in `tz`)."""

    seconds: int | None = None
    calendar: str | None = None
    tz: str = "UTC"

    def bounds(self, now: float) -> tuple[float, float]:
        """(start, end) of the window containing `now` (epoch seconds)."""
        if self.seconds is not None:
            return now - self.seconds, now
        zone = zoneinfo.ZoneInfo(self.tz)
        local = _dt.datetime.fromtimestamp(now, zone)
        if self.calendar == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = start + _dt.timedelta(days=1)
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + _dt.timedelta(days=32)).replace(day=1)
        return start.timestamp(), end.timestamp()

    def describe(self) -> str:
        return f"rolling {self.seconds}s" if self.seconds is not None else f"calendar {self.calendar} ({self.tz})"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(window: str | Window | None, tz: str = "UTC") -> Window | None:
    """'30m', '1h', '1d', '30d' (rolling) or 'day', 'month' (calendar, in `tz`)."""
    if window is None or isinstance(window, Window):
        return window
    text = window.strip().lower()
    if text in ("day", "month"):
        zoneinfo.ZoneInfo(tz)  # a bad time zone fails here, early
        return Window(calendar=text, tz=tz)
    match = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if not match:
        raise ValueError(f"window must look like '1h', '1d', '30d', 'day' or 'month', not {window!r}")
    return Window(seconds=int(match.group(1)) * _UNITS[match.group(2)])


class LedgerUnavailable(ConnectionError):
    """The shared ledger could not be reached."""


class _SharedAccounts:
    """What both shared ledgers keep in this process: each account's limits (they come from this
    process's `budget()` call) and its sticky stop (a stop ends this process's run, not the fleet's)."""

    shared = True

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._limits: dict[str, Limits] = {}
        self._tripped: dict[str, str] = {}

    def open(self, account: str, limits: Limits) -> None:
        self._limits[account] = limits

    def trip(self, account: str, reason: str) -> None:
        self._tripped.setdefault(account, reason)

    def _window_start(self, account: str, now: float) -> float:
        """Spend before this time (epoch seconds) no longer counts; 0 without a window."""
        limits = self._limits.get(account)
        window = limits.window if limits is not None else None
        return window.bounds(now)[0] if window is not None else 0.0


# -- SQLite ---------------------------------------------------------------------------------------------

def _sqlite_errors_as_unavailable(method: Callable[..., Any]) -> Callable[..., Any]:
    """A locked, unreadable or vanished database is an unavailable ledger: the failure policy applies
    (instead of the processor logging it as our bug and letting the call through unbudgeted)."""
    import functools

    @functools.wraps(method)
    def wrapper(self: SqliteLedger, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"{self.url}: {exc}") from exc

    return wrapper


class SqliteLedger(_SharedAccounts):
    """One machine: processes share a budget through one SQLite file; spend survives restarts.

    Each reserve/settle is one `BEGIN IMMEDIATE` transaction (SQLite's write lock), so the check
    and the hold are atomic across processes. WAL mode keeps readers from blocking writers.
    """

    def __init__(self, path: str, *, namespace: str = "", reservation_timeout_s: float = 600.0,
                 clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0):
        super().__init__(clock)
        self.url = f"sqlite:///{path}"
        self.busy_timeout_s = busy_timeout_s
        self.path = path
        self.namespace = namespace
        self.timeout = reservation_timeout_s
        self._local = threading.local()
        self._pid = os.getpid()
        # An in-memory database is one connection shared by every thread, so its use is serialised;
        # a file gets a connection per thread and SQLite's own locking.
        memory = path == ":memory:"
        self._serial: Any = threading.Lock() if memory else contextlib.nullcontext()
        # Nothing touches the file here: a corrupt, read-only or unreachable database shows up on the first
        # reservation, as an unavailable ledger, where `on_unavailable` decides (never a raw sqlite3 error).
        self._shared_conn = self._connect() if memory else None

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS spend (call_id TEXT, account TEXT, ts REAL, nano INTEGER,
                    econ_nano INTEGER, phase TEXT, PRIMARY KEY (call_id, account));
                CREATE INDEX IF NOT EXISTS spend_account_ts ON spend (account, ts);
                CREATE TABLE IF NOT EXISTS reservations (id TEXT, account TEXT, nano INTEGER, phase TEXT,
                    expires REAL, owner TEXT, PRIMARY KEY (id, account));
            """)
        except BaseException:
            db.close()
            raise
        return db

    def _db(self) -> sqlite3.Connection:
        if self._shared_conn is not None:
            return self._shared_conn
        if self._pid != os.getpid():  # a forked child: SQLite connections must not cross fork, open new ones
            self._local, self._pid = threading.local(), os.getpid()
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._serial:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def key(self, label: str) -> str:
        return f"{self.namespace}{label}"

    def _totals(self, db: sqlite3.Connection, account: str, now: float) -> dict[str, Any]:
        start = self._window_start(account, now)
        spent, econ, calls = db.execute("SELECT COALESCE(SUM(nano),0), COALESCE(SUM(econ_nano),0), COUNT(*) FROM "
                                        "spend WHERE account=? AND ts>=?", (account, start)).fetchone()
        reserved, rcalls = db.execute("SELECT COALESCE(SUM(nano),0), COUNT(*) FROM reservations WHERE account=? AND "
                                      "expires>?", (account, now)).fetchone()
        phases = dict(db.execute("SELECT phase, SUM(nano) FROM spend WHERE account=? AND ts>=? GROUP BY phase",
                                 (account, start)).fetchall())
        rphases = dict(db.execute("SELECT phase, SUM(nano) FROM reservations WHERE account=? AND expires>? GROUP BY "
                                  "phase", (account, now)).fetchall())
        return {"spent": spent, "econ": econ, "calls": calls, "reserved": reserved, "rcalls": rcalls,
                "phases": phases, "rphases": rphases}

    @_sqlite_errors_as_unavailable
    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str) -> Reservation | Refusal:
        amount = to_nano(amount_usd)
        now = self.clock()
        rid = uuid.uuid4().hex
        seen: dict[str, tuple[float, int]] = {}
        with self._tx() as db:
            db.execute("DELETE FROM reservations WHERE expires<=?", (now,))
            for name in accounts:
                lim = self._limits[name]
                if not lim.enforce:
                    continue
                if name in self._tripped:
                    return Refusal(name, "tripped", 0.0, 0.0, lim.limit_usd or 0.0)
                t = self._totals(db, name, now)
                seen[name] = ((t["spent"] + t["reserved"] + amount) / NANO, t["calls"] + t["rcalls"] + 1)
                if lim.max_calls is not None and t["calls"] + t["rcalls"] + 1 > lim.max_calls:
                    return Refusal(name, "max_calls", t["calls"], t["rcalls"], lim.max_calls)
                if lim.limit_usd is not None and t["spent"] + t["reserved"] + amount > to_nano(lim.limit_usd):
                    return Refusal(name, "limit_usd", t["spent"] / NANO, t["reserved"] / NANO, lim.limit_usd)
                cap = lim.phase_limits.get(phase)
                if cap is not None and (t["phases"].get(phase, 0) + t["rphases"].get(phase, 0) + amount
                                        > to_nano(cap)):
                    return Refusal(name, f"max_{phase}_usd", t["phases"].get(phase, 0) / NANO,
                                   t["rphases"].get(phase, 0) / NANO, cap)
            db.executemany("INSERT INTO reservations VALUES (?,?,?,?,?,?)",
                           [(rid, name, amount, phase, now + self.timeout, str(os.getpid())) for name in accounts])
        return Reservation(tuple(accounts), amount_usd, phase, reservation_id=rid, seen=seen)

    @_sqlite_errors_as_unavailable
    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        now = self.clock()
        with self._tx() as db:
            db.execute("DELETE FROM reservations WHERE id=?", (reservation.reservation_id,))
            db.executemany("INSERT OR IGNORE INTO spend VALUES (?,?,?,?,?,?)",
                           [(reservation.reservation_id, name, now, to_nano(actual_usd), to_nano(economic_usd),
                             reservation.phase) for name in reservation.accounts])

    @_sqlite_errors_as_unavailable
    def release(self, reservation: Reservation) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        with self._tx() as db:
            db.execute("DELETE FROM reservations WHERE id=?", (reservation.reservation_id,))

    @_sqlite_errors_as_unavailable
    def state(self, account: str) -> AccountState:
        with self._serial:
            t = self._totals(self._db(), account, self.clock())
        return AccountState(t["spent"] / NANO, t["econ"] / NANO, t["reserved"] / NANO, t["calls"], t["rcalls"],
                            {k: v / NANO for k, v in t["phases"].items()},
                            {k: v / NANO for k, v in t["rphases"].items()}, self._tripped.get(account))

    @_sqlite_errors_as_unavailable
    def reset(self, account: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM spend WHERE account=?", (account,))
            db.execute("DELETE FROM reservations WHERE account=?", (account,))
        self._tripped.pop(account, None)

    @_sqlite_errors_as_unavailable
    def record(self, call_id: str, accounts: Sequence[str], phase: str, actual_usd: float, economic_usd: float,
               ts: float) -> None:
        """Replay one call counted elsewhere (fail-open spend), idempotently."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO spend VALUES (?,?,?,?,?,?)",
                           [(call_id, name, ts, to_nano(actual_usd), to_nano(economic_usd), phase)
                            for name in accounts])


# -- Redis ----------------------------------------------------------------------------------------------------

# Reserve atomically on the server. KEYS: per account, its key prefix. ARGV: now, amount, phase, id,
# expires, then per account: enforce, limit (-1 none), max_calls (-1), phase cap (-1), window start.
# Spend is kept per call in a sorted set (score = time) plus a hash of amounts, so a rolling window is
# a score range; reservations are a hash id -> "nano|phase|expires".
_RESERVE = """
local now, amount, phase, rid, expires = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local n = #KEYS
local seen = {}  -- per account: spend + reservations + this call (committed at most), calls likewise
for i = 1, n do
  local p = KEYS[i]
  local base = 5 + (i - 1) * 5
  local enforce, limit, maxcalls, cap, start = ARGV[base+1], tonumber(ARGV[base+2]), tonumber(ARGV[base+3]),
    tonumber(ARGV[base+4]), tonumber(ARGV[base+5])
  local reserved, rcalls, rphase = 0, 0, 0
  local spent, calls = -1, -1
  local res = redis.call('HGETALL', p .. ':res')
  for j = 1, #res, 2 do
    local nano, ph, exp = string.match(res[j+1], '(%d+)|([^|]*)|([%d%.]+)')
    if tonumber(exp) <= now then redis.call('HDEL', p .. ':res', res[j]) else
      reserved = reserved + tonumber(nano); rcalls = rcalls + 1
      if ph == phase then rphase = rphase + tonumber(nano) end
    end
  end
  if enforce == '1' then
    local ids = redis.call('ZRANGEBYSCORE', p .. ':ts', start, '+inf')
    local pspent = 0
    spent, calls = 0, #ids
    for s = 1, #ids, 1000 do  -- in chunks: unpack() has a stack limit of a few thousand values
      local chunk = {}
      for k = s, math.min(s + 999, #ids) do chunk[#chunk + 1] = ids[k] end
      local vals = redis.call('HMGET', p .. ':amt', unpack(chunk))
      for j = 1, #vals do
        local nano, ph = string.match(vals[j] or '0||0', '(%d+)|[^|]*|([^|]*)')
        spent = spent + tonumber(nano)
        if ph == phase then pspent = pspent + tonumber(nano) end
      end
    end
    if maxcalls >= 0 and calls + rcalls + 1 > maxcalls then return {i, 'max_calls', calls, rcalls} end
    if limit >= 0 and spent + reserved + amount > limit then return {i, 'limit_usd', spent, reserved} end
    if cap >= 0 and pspent + rphase + amount > cap then return {i, 'max_' .. phase .. '_usd', pspent, rphase} end
    seen[#seen + 1] = tostring(spent + reserved + amount)
    seen[#seen + 1] = tostring(calls + rcalls + 1)
  else
    seen[#seen + 1] = '-1'
    seen[#seen + 1] = '-1'
  end
end
for i = 1, n do
  redis.call('HSET', KEYS[i] .. ':res', rid, ARGV[2] .. '|' .. phase .. '|' .. expires)
end
return {0, unpack(seen)}
"""

# Settle: drop the reservation, count the call once (HSETNX on the amounts hash is the idempotency).
_SETTLE = """
for i = 1, #KEYS do
  redis.call('HDEL', KEYS[i] .. ':res', ARGV[1])
  if redis.call('HSETNX', KEYS[i] .. ':amt', ARGV[1], ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5]) == 1 then
    redis.call('ZADD', KEYS[i] .. ':ts', ARGV[2], ARGV[1])
  end
end
return 1
"""


class RedisLedger(_SharedAccounts):
    """Fleets: reservations and settlements are single Lua scripts, atomic on the Redis server."""

    def __init__(self, url: str, *, namespace: str = "otel-dspy-cost:", reservation_timeout_s: float = 600.0,
                 clock: Callable[[], float] = time.time, socket_timeout: float = 2.0):
        import redis

        super().__init__(clock)
        self.url = url
        self.namespace = namespace
        self.timeout = reservation_timeout_s
        self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)

    def _call(self, fn: Callable[[], Any]) -> Any:
        import redis

        try:
            return fn()
        except (redis.RedisError, OSError) as exc:  # any failure: the policy applies, never silently unbudgeted
            raise LedgerUnavailable(f"{self.url}: {exc}") from exc

    def key(self, label: str) -> str:
        return f"{self.namespace}{{{label}}}"  # hash tag: one account's keys on one cluster slot

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str) -> Reservation | Refusal:
        now = self.clock()
        rid = uuid.uuid4().hex
        args: list[Any] = [now, to_nano(amount_usd), phase, rid, now + self.timeout]
        for name in accounts:
            lim = self._limits[name]
            if lim.enforce and name in self._tripped:
                return Refusal(name, "tripped", 0.0, 0.0, lim.limit_usd or 0.0)
            args += ["1" if lim.enforce else "0", to_nano(lim.limit_usd) if lim.limit_usd is not None else -1,
                     lim.max_calls if lim.max_calls is not None else -1,
                     to_nano(lim.phase_limits[phase]) if phase in lim.phase_limits else -1,
                     self._window_start(name, now)]
        out = self._call(lambda: self._reserve(keys=list(accounts), args=args))
        if int(out[0]) == 0:
            seen = {name: (int(out[1 + 2 * i]) / NANO, int(out[2 + 2 * i])) for i, name in enumerate(accounts)
                    if len(out) > 2 + 2 * i and int(out[1 + 2 * i]) >= 0}
            return Reservation(tuple(accounts), amount_usd, phase, reservation_id=rid, seen=seen)
        name = accounts[int(out[0]) - 1]
        reason = out[1].decode() if isinstance(out[1], bytes) else out[1]
        lim = self._limits[name]
        limit = {"max_calls": lim.max_calls, "limit_usd": lim.limit_usd}.get(reason, lim.phase_limits.get(phase))
        if reason == "max_calls":
            return Refusal(name, reason, int(out[2]), int(out[3]), float(limit or 0))
        return Refusal(name, reason, int(out[2]) / NANO, int(out[3]) / NANO, float(limit or 0))

    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        self._write(reservation.reservation_id, reservation.accounts, reservation.phase, actual_usd, economic_usd,
                    self.clock())

    def _write(self, call_id: str, accounts: Sequence[str], phase: str, actual: float, econ: float, ts: float) -> None:
        self._call(lambda: self._settle(keys=list(accounts), args=[call_id, ts, to_nano(actual), to_nano(econ),
                                                                   phase]))

    def record(self, call_id: str, accounts: Sequence[str], phase: str, actual_usd: float, economic_usd: float,
               ts: float) -> None:
        self._write(call_id, accounts, phase, actual_usd, economic_usd, ts)

    def release(self, reservation: Reservation) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        self._call(lambda: [self.client.hdel(f"{a}:res", reservation.reservation_id) for a in reservation.accounts])

    def state(self, account: str) -> AccountState:
        now = self.clock()
        start = self._window_start(account, now)

        def read() -> tuple[list, dict]:
            ids = self.client.zrangebyscore(f"{account}:ts", start, "+inf")
            vals = self.client.hmget(f"{account}:amt", ids) if ids else []
            return vals, self.client.hgetall(f"{account}:res")

        vals, res = self._call(read)
        spent = econ = 0
        phases: dict[str, float] = {}
        for v in vals:
            nano, e, ph = (v.decode() if isinstance(v, bytes) else v).split("|")
            spent += int(nano)
            econ += int(e)
            phases[ph] = phases.get(ph, 0.0) + int(nano) / NANO
        reserved = rcalls = 0
        for v in res.values():
            nano, _, exp = v.decode().split("|")
            if float(exp) > now:
                reserved += int(nano)
                rcalls += 1
        return AccountState(spent / NANO, econ / NANO, reserved / NANO, len(vals), rcalls, phases, {},
                            self._tripped.get(account))

    def reset(self, account: str) -> None:
        self._call(lambda: self.client.delete(f"{account}:ts", f"{account}:amt", f"{account}:res"))
        self._tripped.pop(account, None)


# -- failure policy ------------------------------------------------------------------------------------------

class GuardedLedger:
    """Applies the unavailable-ledger policy around a shared ledger.

    fail_closed: a reservation the ledger cannot make is refused (`ledger_unavailable`), naming the ledger.
    fail_open: calls are accounted in a local ledger meanwhile (warned once per outage) and replayed
    into the shared ledger, each exactly once, as soon as it answers again.
    """

    shared = True

    def __init__(self, inner: Any, policy: str = "fail_closed"):
        if policy not in ("fail_closed", "fail_open"):
            raise ValueError("on_unavailable must be 'fail_closed' or 'fail_open'")
        self.inner, self.policy, self.url = inner, policy, inner.url
        self.local = InProcessLedger()
        self._pending: list[tuple[str, tuple[str, ...], str, float, float, float]] = []
        self._lock = threading.Lock()
        self._down = False
        self._limits: dict[str, Limits] = {}
        self._last_seen: dict[str, AccountState] = {}  # the shared totals last read, per account

    def key(self, label: str) -> str:
        return self.inner.key(label)

    def open(self, account: str, limits: Limits) -> None:
        self.inner.open(account, limits)
        self.local.open(account, limits)
        self._limits[account] = limits

    def _outage(self, exc: Exception) -> None:
        if not self._down:
            self._down = True
            # Failing open, a fresh local ledger enforces what was left when the shared one was last read,
            # so a process does not start from a full budget. (Other processes' spend meanwhile is unknown.)
            self.local = InProcessLedger()
            for account, lim in self._limits.items():
                seen = self._last_seen.get(account)
                if seen is None:
                    self.local.open(account, lim)
                    continue
                left = None if lim.limit_usd is None else max(0.0, lim.limit_usd - seen.spent_usd)
                calls = None if lim.max_calls is None else max(0, lim.max_calls - seen.calls)
                phases = {k: max(0.0, v - seen.phase_spent.get(k, 0.0)) for k, v in lim.phase_limits.items()}
                self.local.open(account, dataclasses.replace(lim, limit_usd=left, max_calls=calls,
                                                             phase_limits=phases))
            logger.error("otel-dspy-cost: shared budget ledger %s is unreachable (%s); policy %s%s", self.url, exc,
                         self.policy, ": counting locally against what was left at the last ledger read"
                         if self.policy == "fail_open" else ": refusing calls")
            from . import _runtime

            _runtime.ledger_outage(self.url, self.policy, str(exc))

    def _replay(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for i, item in enumerate(pending):
            try:
                self.inner.record(*item)
            except LedgerUnavailable:
                with self._lock:
                    self._pending[:0] = pending[i:]
                raise
        if self._down:
            self._down = False
            logger.warning("otel-dspy-cost: shared budget ledger %s is back; %d calls counted locally were replayed",
                           self.url, len(pending))

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str) -> Reservation | Refusal:
        try:
            if self._pending:
                self._replay()
            out = self.inner.reserve(accounts, amount_usd, phase)
            if self._down:
                self._down = False
                logger.warning("otel-dspy-cost: shared budget ledger %s is back", self.url)
            for account, (committed, calls) in (getattr(out, "seen", None) or {}).items():
                # What this reservation read, plus everything held (ours included): the most that can be spent
                # as of now. An outage then starts from it, not from a stale read (or a full budget).
                prev = self._last_seen.get(account)
                phases = dict(prev.phase_spent) if prev is not None else {}
                phases[phase] = phases.get(phase, 0.0) + amount_usd
                self._last_seen[account] = AccountState(committed, 0.0, 0.0, calls, phase_spent=phases)
            return out
        except LedgerUnavailable as exc:
            self._outage(exc)
            if self.policy == "fail_closed":
                return Refusal(accounts[0], "ledger_unavailable", 0.0, 0.0, 0.0, detail=str(exc))
            res = self.local.reserve(accounts, amount_usd, phase)
            if isinstance(res, Reservation):
                res.local = True
            return res

    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        if getattr(reservation, "local", False):
            self.local.settle(reservation, actual_usd, economic_usd)
            with self._lock:
                self._pending.append((uuid.uuid4().hex, reservation.accounts, reservation.phase, actual_usd,
                                      economic_usd, time.time()))
            return
        try:
            self.inner.settle(reservation, actual_usd, economic_usd)
        except LedgerUnavailable as exc:
            # The money is spent: keep the call and write it when the ledger is back (same id: counted once).
            self._outage(exc)
            with self._lock:
                self._pending.append((reservation.reservation_id, reservation.accounts, reservation.phase,
                                      actual_usd, economic_usd, time.time()))

    def release(self, reservation: Reservation) -> None:
        if getattr(reservation, "local", False):
            self.local.release(reservation)
            return
        try:
            self.inner.release(reservation)
        except LedgerUnavailable as exc:
            self._outage(exc)  # the reservation expires on its own

    def trip(self, account: str, reason: str) -> None:
        self.inner.trip(account, reason)
        self.local.trip(account, reason)

    def state(self, account: str) -> AccountState:
        try:
            if self._pending:
                self._replay()
            shared = self.inner.state(account)
        except LedgerUnavailable:
            local = self.local.state(account)  # best knowledge while the shared ledger is away
            seen = self._last_seen.get(account)
            if seen is not None:
                local.spent_usd += seen.spent_usd
                local.economic_usd += seen.economic_usd
                local.calls += seen.calls
            return local
        seen = self._last_seen.get(account)
        if seen is None or shared.spent_usd + shared.reserved_usd >= seen.spent_usd:
            self._last_seen[account] = AccountState(shared.spent_usd + shared.reserved_usd, shared.economic_usd, 0.0,
                                                    shared.calls + shared.reserved_calls,
                                                    phase_spent=dict(shared.phase_spent))
        with self._lock:
            pending = [p for p in self._pending if account in p[1]]
        if pending:
            shared.spent_usd += sum(p[3] for p in pending)
            shared.economic_usd += sum(p[4] for p in pending)
            shared.calls += len(pending)
        return shared

    def reset(self, account: str) -> None:
        self.inner.reset(account)

    def flush(self) -> None:
        """Write spend counted during an outage now (raises LedgerUnavailable if still down)."""
        self._replay()


def ledger_from_url(url: str, *, on_unavailable: str = "fail_closed", reservation_timeout_s: float = 600.0,
                    namespace: str | None = None, clock: Callable[[], float] = time.time,
                    busy_timeout_s: float = 30.0) -> GuardedLedger:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, `sqlite://:memory:`, `redis://host:port/db`."""
    if url.startswith("sqlite://"):
        # SQLAlchemy's convention: sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite://:memory:
        path = url[len("sqlite://"):]
        path = path[1:] if path.startswith("/") else path
        inner: Any = SqliteLedger(path or ":memory:", namespace=namespace or "",
                                  reservation_timeout_s=reservation_timeout_s, clock=clock,
                                  busy_timeout_s=busy_timeout_s)
    elif url.startswith(("redis://", "rediss://", "unix://")):
        inner = RedisLedger(url, namespace=namespace if namespace is not None else "otel-dspy-cost:",
                            reservation_timeout_s=reservation_timeout_s, clock=clock)
    else:
        raise ValueError(f"unknown ledger URL {url!r}: use sqlite:///path/budgets.db or redis://host:6379/0")
    return GuardedLedger(inner, on_unavailable)


_by_url: dict[tuple[str, str], GuardedLedger] = {}
_by_url_lock = threading.Lock()


def shared_ledger(url: str, on_unavailable: str = "fail_closed") -> GuardedLedger:
    """One ledger object per URL and policy in this process (connections are reused)."""
    with _by_url_lock:
        key = (url, on_unavailable)
        if key not in _by_url:
            _by_url[key] = ledger_from_url(url, on_unavailable=on_unavailable)
        return _by_url[key]
