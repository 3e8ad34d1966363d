"""A ledger from its URL (`sqlite:///path.db`, `redis://host:6379/0`), one object per URL in a process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from otel_dspy_cost.errors import LedgerUnavailable
from otel_dspy_cost.ledgers.failure_policy import GuardedLedger
from otel_dspy_cost.ledgers.redis_ledger import RedisLedger
from otel_dspy_cost.ledgers.sqlite_ledger import SqliteLedger
from otel_dspy_cost.ledgers.windows import Window, parse_window

__all__ = ["LEDGER_ENV", "GuardedLedger", "LedgerUnavailable", "RedisLedger", "SqliteLedger", "Window",
           "ledger_from_url", "parse_window", "shared_ledger"]

logger = logging.getLogger("otel_dspy_cost")
LEDGER_ENV = "OTEL_DSPY_COST_LEDGER"


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
