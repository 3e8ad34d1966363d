"""Budget windows, and the time buckets that make a window's sum O(1) on a shared ledger.

A shared ledger keeps spend in per-bucket counters plus a running total of the buckets still in the
window: a reservation reads one total and evicts the buckets that left (each bucket is added once and
evicted once), so its cost does not grow with the number of calls in the window.

Bucket width: a rolling window of W seconds uses buckets of max(1 s, W/1440) (1 h: 2 s, 1 d: 60 s,
30 d: 30 min); the bucket holding the window's start is kept whole, so spend leaves a rolling window
between W and W + one bucket width after it was settled (late, never early: it counts more, never less).
Calendar windows (day, month in a time zone) use 15-minute buckets, which every UTC offset in use is a
multiple of, so they are exact.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
import zoneinfo

_CALENDAR_BUCKET_S = 900
_ROLLING_BUCKETS = 1440


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

    @property
    def spec(self) -> str:
        """What a shared ledger stores with an account: one label, one window, in every process."""
        return f"rolling:{self.seconds}" if self.seconds is not None else f"{self.calendar}:{self.tz}"

    @property
    def bucket_s(self) -> int:
        if self.seconds is not None:
            return max(1, self.seconds // _ROLLING_BUCKETS)
        return _CALENDAR_BUCKET_S

    def bucket(self, ts: float) -> int:
        return math.floor(ts / self.bucket_s)

    def first_bucket(self, now: float) -> int:
        """The oldest bucket that still counts at `now`: older ones are evicted from the total."""
        return self.bucket(self.bounds(now)[0])


def window_spec(window: Window | None) -> str:
    return window.spec if window is not None else "none"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(window: str | Window | None, tz: str = "UTC") -> Window | None:
    """'30m', '1h', '1d', '30d' (rolling) or 'day', 'month' (calendar, in `tz`)."""
    if window is None or isinstance(window, Window):
        return window
    if not isinstance(window, str):
        raise TypeError(f"window must be a string such as '1h', '1d', 'day' or 'month', not {window!r}")
    text = window.strip().lower()
    if text in ("day", "month"):
        zoneinfo.ZoneInfo(tz)  # a bad time zone fails here, early
        return Window(calendar=text, tz=tz)
    match = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if not match:
        raise ValueError(f"window must look like '1h', '1d', '30d', 'day' or 'month', not {window!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"window must be longer than zero, not {window!r}")
    return Window(seconds=seconds)
