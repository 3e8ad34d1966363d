"""The SQLite ledger: processes on one machine share a budget through one file; spend survives restarts.

Spend is kept as per-bucket counters (see `ledgers.windows`) plus a running total per account and phase, so a
reservation reads a handful of rows whatever the number of calls in the window. Reservations are rows
with an expiry; one that expires (its process died, or the call outlived `reservation_timeout_s`) moves
to `expired`, where a late settle still finds it: every call is counted exactly once, by consuming its
reservation. Amounts are integer nano-dollars.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from otel_dspy_cost.errors import LedgerUnavailable
from otel_dspy_cost.ledgers.protocol import NANO, AccountState, Limits, Refusal, Reservation, check_limits, to_nano
from otel_dspy_cost.ledgers.shared_accounts import SharedAccounts, stored_window
from otel_dspy_cost.ledgers.windows import Window, window_spec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (account TEXT PRIMARY KEY, window TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (account TEXT, bucket INTEGER, phase TEXT, nano INTEGER, econ INTEGER,
    calls INTEGER, PRIMARY KEY (account, bucket, phase)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (account TEXT, phase TEXT, nano INTEGER, econ INTEGER, calls INTEGER,
    PRIMARY KEY (account, phase)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (id TEXT, account TEXT, nano INTEGER, phase TEXT, expires REAL, owner TEXT,
    calls INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (id, account));
CREATE INDEX IF NOT EXISTS reservations_by_account ON reservations (account, expires);
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations (expires);
CREATE TABLE IF NOT EXISTS expired (id TEXT, account TEXT, nano INTEGER, phase TEXT, at REAL,
    PRIMARY KEY (id, account));
CREATE INDEX IF NOT EXISTS expired_by_time ON expired (at);
CREATE TABLE IF NOT EXISTS replayed (id TEXT, account TEXT, at REAL, PRIMARY KEY (id, account));
CREATE TABLE IF NOT EXISTS trips (account TEXT PRIMARY KEY, reason TEXT NOT NULL, until REAL);
CREATE INDEX IF NOT EXISTS replayed_by_time ON replayed (at);
"""

# How long an expired reservation waits for its late settle, and a replayed call's id is remembered.
_KEEP_S = 7 * 86400


def _errors_as_unavailable(method: Callable[..., Any]) -> Callable[..., Any]:
    """A locked, unreadable or vanished database is an unavailable ledger: the failure policy applies
    (instead of the processor logging it as our bug and letting the call through unbudgeted)."""

    @functools.wraps(method)
    def wrapper(self: SqliteLedger, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:  # OSError: a path under a file, in /proc, unwritable
            raise LedgerUnavailable(f"{self.url}: {exc}") from exc

    return wrapper


def _in_nano(lim: Limits) -> Limits:
    """The limits in nano-dollars, so `check_limits` compares exact integers."""
    return Limits(None if lim.limit_usd is None else to_nano(lim.limit_usd), lim.max_calls,
                  {k: to_nano(v) for k, v in lim.phase_limits.items()}, lim.enforce, lim.window)


class SqliteLedger(SharedAccounts):
    """Each reserve/settle is one `BEGIN IMMEDIATE` transaction (SQLite's write lock), so the check and
    the hold are atomic across processes. WAL mode keeps readers from blocking writers."""

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
        self._migrated: set[str] = set()
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
                self._set_wal(db)
                db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            if "calls" not in {row[1] for row in db.execute("PRAGMA table_info(reservations)")}:
                # a file of an earlier version: each reservation was one call
                db.execute("ALTER TABLE reservations ADD COLUMN calls INTEGER NOT NULL DEFAULT 1")
        except BaseException:
            db.close()
            raise
        return db

    def _set_wal(self, db: sqlite3.Connection) -> None:
        """Threads opening a new file at once race to switch it to WAL, and SQLite answers the loser's switch
        with "database is locked" at once, without waiting through the busy timeout (seen in ~1 of 10 first
        opens from 6 threads). Hand-written retry, because no setting makes SQLite wait here: the same
        patience as any other lock, `busy_timeout_s`."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

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
                self._migrated.clear()  # a fold of the per-call layout may have been rolled back with it
                raise
            db.execute("COMMIT")

    def key(self, label: str) -> str:
        return f"{self.namespace}{label}"

    # -- inside a transaction -------------------------------------------------------------------------

    def _window(self, db: sqlite3.Connection, account: str, *, claim: bool) -> tuple[Window | None, str]:
        """The window this ledger keeps the account under and its spec: stored with the account's first
        reservation (`claim`), so one label has one window in every process."""
        row = db.execute("SELECT window FROM accounts WHERE account=?", (account,)).fetchone()
        if row is None:
            wanted = window_spec(self._window_of(account))
            # A read claims an account only to fold spend of the per-call layout into buckets, and only when it
            # knows the window (a `budget status` without --window must not store "none" for a windowed budget).
            if not (claim or (wanted != "none" and self._has_legacy(db, account))):
                return self._window_of(account), wanted
            db.execute("INSERT INTO accounts VALUES (?, ?)", (account, wanted))
            stored = wanted
        else:
            stored = row[0]
        window = stored_window(stored)
        if account not in self._migrated:
            self._migrate(db, account, window)
        return window, stored

    @staticmethod
    def _has_legacy(db: sqlite3.Connection, account: str) -> bool:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='spend'").fetchone() is None:
            return False
        return db.execute("SELECT 1 FROM spend WHERE account=? LIMIT 1", (account,)).fetchone() is not None

    def _migrate(self, db: sqlite3.Connection, account: str, window: Window | None) -> None:
        """Folds spend written by the per-call schema (0.x: one `spend` row per call) into buckets, once."""
        self._migrated.add(account)
        if not self._has_legacy(db, account):
            return
        rows = db.execute("SELECT ts, nano, econ_nano, phase FROM spend WHERE account=?", (account,)).fetchall()
        for ts, nano, econ, phase in rows:
            self._add(db, account, window, ts, nano, econ, phase or "infer")
        db.execute("DELETE FROM spend WHERE account=?", (account,))

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("INSERT OR IGNORE INTO expired SELECT id, account, nano, phase, ? FROM reservations "
                   "WHERE expires<=?", (now, now))
        db.execute("DELETE FROM reservations WHERE expires<=?", (now,))
        db.execute("DELETE FROM expired WHERE at<?", (now - _KEEP_S,))
        db.execute("DELETE FROM replayed WHERE at<?", (now - _KEEP_S,))

    def _evict(self, db: sqlite3.Connection, account: str, window: Window | None, now: float) -> None:
        """Takes the buckets that left the window out of the running total (each bucket once)."""
        if window is None:
            return
        first = window.first_bucket(now)
        gone = db.execute("SELECT phase, SUM(nano), SUM(econ), SUM(calls) FROM buckets WHERE account=? AND bucket<? "
                          "GROUP BY phase", (account, first)).fetchall()
        if not gone:
            return
        db.executemany("UPDATE totals SET nano=nano-?, econ=econ-?, calls=calls-? WHERE account=? AND phase=?",
                       [(n, e, c, account, ph) for ph, n, e, c in gone])
        db.execute("DELETE FROM buckets WHERE account=? AND bucket<?", (account, first))

    def _add(self, db: sqlite3.Connection, account: str, window: Window | None, ts: float, nano: int, econ: int,
             phase: str) -> None:
        if window is not None:
            db.execute("INSERT INTO buckets VALUES (?,?,?,?,?,1) ON CONFLICT (account, bucket, phase) DO UPDATE SET "
                       "nano=nano+excluded.nano, econ=econ+excluded.econ, calls=calls+1",
                       (account, window.bucket(ts), phase, nano, econ))
        db.execute("INSERT INTO totals VALUES (?,?,?,?,1) ON CONFLICT (account, phase) DO UPDATE SET "
                   "nano=nano+excluded.nano, econ=econ+excluded.econ, calls=calls+1", (account, phase, nano, econ))

    def _totals(self, db: sqlite3.Connection, account: str, now: float) -> AccountState:
        """Spend (after eviction) and live reservations, in nano-dollars."""
        tripped = self._tripped_now(account, now) or self._stored_trip(db, account, now)
        st = AccountState(0, 0, 0, 0, 0, {}, {}, tripped)
        for phase, nano, econ, calls in db.execute("SELECT phase, nano, econ, calls FROM totals WHERE account=?",
                                                   (account,)):
            st.spent_usd += nano
            st.economic_usd += econ
            st.calls += calls
            if calls:
                st.phase_spent[phase] = nano
        for phase, nano, calls in db.execute("SELECT phase, SUM(nano), SUM(calls) FROM reservations WHERE account=? "
                                             "AND expires>? GROUP BY phase", (account, now)):
            st.reserved_usd += nano
            st.reserved_calls += calls
            st.phase_reserved[phase] = nano
        return st

    def _stored_trip(self, db: sqlite3.Connection, account: str, now: float) -> str | None:
        """A stop another process (or this one) stored for the account, while it holds."""
        row = db.execute("SELECT reason, until FROM trips WHERE account=? AND (until IS NULL OR until>?)",
                         (account, now)).fetchone()
        if row is None:
            return None
        self._tripped.setdefault(account, (row[0], row[1]))
        return row[0]

    def _store_trip(self, db: sqlite3.Connection, account: str, reason: str, now: float) -> None:
        until = self._stop_here(account, reason, now)
        db.execute("INSERT INTO trips VALUES (?,?,?) ON CONFLICT (account) DO UPDATE SET reason=excluded.reason, "
                   "until=excluded.until WHERE trips.until IS NOT NULL AND trips.until<=?",
                   (account, reason, until, now))

    def _count(self, db: sqlite3.Connection, call_id: str, accounts: Sequence[str], phase: str, actual: int,
               econ: int, ts: float, now: float) -> None:
        """Counts a settled call once per account: only by consuming its reservation, live or expired."""
        for name in accounts:
            window, _ = self._window(db, name, claim=True)
            if not db.execute("DELETE FROM reservations WHERE id=? AND account=?", (call_id, name)).rowcount:
                if not db.execute("DELETE FROM expired WHERE id=? AND account=?", (call_id, name)).rowcount:
                    continue  # settled already (e.g. a settle whose reply was lost, replayed)
            self._add(db, name, window, ts, actual, econ, phase)

    # -- the ledger -------------------------------------------------------------------------------------

    @_errors_as_unavailable
    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str,
                calls: int = 1) -> Reservation | Refusal:
        amount = to_nano(amount_usd)
        now = self.clock()
        rid = uuid.uuid4().hex
        seen: dict[str, tuple[float, int]] = {}
        with self._tx() as db:
            self._expire(db, now)
            for name in accounts:
                lim = self._limits[name]
                window, stored = self._window(db, name, claim=True)
                if stored != window_spec(lim.window):
                    return self._mismatch(name, stored)
                if not lim.enforce:
                    continue
                self._evict(db, name, window, now)
                st = self._totals(db, name, now)
                refusal = check_limits(name, _in_nano(lim), amount, phase, st, calls)
                if refusal is not None:
                    # Sticky in this process from inside the write lock, which this process's other threads
                    # wait on: none is admitted between the refusal and the budget's trip. A call that only
                    # waits for calls in flight stops nothing.
                    if not refusal.wait and refusal.reason != "tripped":
                        self._store_trip(db, name, refusal.reason, now)
                    if refusal.reason == "max_calls":
                        return refusal
                    return Refusal(name, refusal.reason, refusal.spent_usd / NANO, refusal.reserved_usd / NANO,
                                   refusal.limit / NANO if refusal.reason != "tripped" else lim.limit_usd or 0.0,
                                   wait=refusal.wait)
                seen[name] = ((st.spent_usd + st.reserved_usd + amount) / NANO, st.calls + st.reserved_calls + calls)
            db.executemany("INSERT INTO reservations (id, account, nano, phase, expires, owner, calls) "
                           "VALUES (?,?,?,?,?,?,?)", [(rid, name, amount, phase, now + self.timeout,
                                                       str(os.getpid()), calls) for name in accounts])
        return Reservation(tuple(accounts), amount_usd, phase, reservation_id=rid, seen=seen, calls=calls)

    @_errors_as_unavailable
    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        now = self.clock()
        with self._tx() as db:
            self._count(db, reservation.reservation_id, reservation.accounts, reservation.phase, to_nano(actual_usd),
                        to_nano(economic_usd), now, now)

    @_errors_as_unavailable
    def release(self, reservation: Reservation) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        with self._tx() as db:
            db.execute("DELETE FROM reservations WHERE id=?", (reservation.reservation_id,))

    @_errors_as_unavailable
    def record(self, call_id: str, accounts: Sequence[str], phase: str, actual_usd: float, economic_usd: float,
               ts: float, *, reserved: bool = False) -> None:
        """Replays one call counted elsewhere, exactly once: `reserved` for a settle that may or may not have
        landed (counted only if its reservation is still there), else a call made while the ledger was away."""
        now = self.clock()
        with self._tx() as db:
            if reserved:
                self._count(db, call_id, accounts, phase, to_nano(actual_usd), to_nano(economic_usd), ts, now)
                return
            for name in accounts:
                if db.execute("INSERT OR IGNORE INTO replayed VALUES (?,?,?)", (call_id, name, now)).rowcount:
                    window, _ = self._window(db, name, claim=True)
                    self._add(db, name, window, ts, to_nano(actual_usd), to_nano(economic_usd), phase)

    @_errors_as_unavailable
    def trip(self, account: str, reason: str) -> None:
        """The budget's trip after a refusal (the refusing step stored it already; this covers any other)."""
        if self._tripped_now(account, self.clock()) is not None:
            return
        now = self.clock()
        with self._tx() as db:
            self._store_trip(db, account, reason, now)

    @_errors_as_unavailable
    def state(self, account: str) -> AccountState:
        now = self.clock()
        with self._tx() as db:
            window, stored = self._window(db, account, claim=False)
            self._evict(db, account, window, now)
            st = self._totals(db, account, now)
            if stored == "none" and self._has_legacy(db, account):  # unclaimed per-call rows: all of them count
                for phase, nano, econ, calls in db.execute("SELECT phase, SUM(nano), SUM(econ_nano), COUNT(*) FROM "
                                                           "spend WHERE account=? GROUP BY phase", (account,)):
                    st.spent_usd += nano
                    st.economic_usd += econ
                    st.calls += calls
                    st.phase_spent[phase] = st.phase_spent.get(phase, 0) + nano
        return AccountState(st.spent_usd / NANO, st.economic_usd / NANO, st.reserved_usd / NANO, st.calls,
                            st.reserved_calls, {k: v / NANO for k, v in st.phase_spent.items()},
                            {k: v / NANO for k, v in st.phase_reserved.items()}, st.tripped)

    @_errors_as_unavailable
    def labels(self) -> list[str]:
        """The budget labels this ledger has accounts for (`budget status` tells a misspelt label by it)."""
        with self._tx() as db:
            rows = db.execute("SELECT account FROM accounts UNION SELECT account FROM totals").fetchall()
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='spend'").fetchone():
                rows += db.execute("SELECT DISTINCT account FROM spend").fetchall()  # the per-call layout
        n = len(self.namespace)
        return sorted({a[n:] for (a,) in rows if a.startswith(self.namespace)})

    @_errors_as_unavailable
    def reset(self, account: str) -> None:
        with self._tx() as db:
            for table in ("accounts", "buckets", "totals", "reservations", "expired", "replayed", "trips"):
                db.execute(f"DELETE FROM {table} WHERE account=?", (account,))  # noqa: S608 (our table names)
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='spend'").fetchone():
                db.execute("DELETE FROM spend WHERE account=?", (account,))
        self._tripped.pop(account, None)
