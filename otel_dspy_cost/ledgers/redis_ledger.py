"""The Redis ledger: a fleet shares a budget; each reservation and settle is one Lua script, atomic on
the server, and O(1) in the number of calls in the window.

Keys of one account `p` (all under one hash tag, so one cluster slot):
  p:meta   hash  win (the window spec, stored by the first reservation), v (layout version)
  p:tot    hash  the running total of the buckets still in the window: n (nano-USD), e (economic), c (calls),
                 p:<phase> (nano-USD per phase)
  p:bi     zset  bucket numbers;  p:b:<n>  hash, that bucket's counters (same fields as p:tot)
  p:res    hash  reservation id -> "nano|phase|expires";  p:rexp  zset of ids by expiry;  p:rtot  their totals
  p:late   hash  expired reservations a late settle may still consume (kept 7 days);  p:lexp  zset by time
  p:trip   string the fleet's stop: the first refusal's reason, expiring when the stop ends (no expiry: for good)
  p:rep:<id>     a replayed call's id (kept 7 days), so a replay counts once
Eviction takes each bucket out of the total once, when it leaves the window; a settled call is counted by
consuming its reservation (live or expired), so the ledger holds no per-call state for settled calls.
The per-call layout of earlier versions (`p:ts`, `p:amt`) is folded into buckets on first use.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from otel_dspy_cost.errors import LedgerUnavailable
from otel_dspy_cost.ledgers.protocol import NANO, AccountState, Refusal, Reservation, to_nano
from otel_dspy_cost.ledgers.shared_accounts import SharedAccounts, stored_window
from otel_dspy_cost.ledgers.windows import Window, window_spec

# Hand-written Lua: the check and the hold must be one atomic step on the server, which only a script gives.
# Amounts travel as decimal strings (a Lua number prints 1e14 as "1e+14", which HINCRBY rejects).
_LIB = """
local KEEP = 604800
local function neg(v) if v == '0' then return '0' elseif string.sub(v, 1, 1) == '-' then return string.sub(v, 2) end
  return '-' .. v end
local function bump(key, nano, econ, ph, calls)
  redis.call('HINCRBY', key, 'n', nano); redis.call('HINCRBY', key, 'e', econ)
  redis.call('HINCRBY', key, 'c', calls); redis.call('HINCRBY', key, 'p:' .. ph, nano)
end
local function add(p, width, ts, nano, econ, ph)
  if width > 0 then
    local b = string.format('%d', math.floor(ts / width))
    bump(p .. ':b:' .. b, nano, econ, ph, 1)
    redis.call('ZADD', p .. ':bi', b, b)
  end
  bump(p .. ':tot', nano, econ, ph, 1)
end
local function hold(p, nano, ph, calls)
  redis.call('HINCRBY', p .. ':rtot', 'n', nano); redis.call('HINCRBY', p .. ':rtot', 'c', calls)
  redis.call('HINCRBY', p .. ':rtot', 'p:' .. ph, nano)
end
local function held_calls(v)  -- "nano|phase|expires|calls" (calls absent before retries were held: 1)
  return -(tonumber(string.match(v, '^%d+|[^|]*|[^|]*|(%d+)$') or 1))
end
local function unreserve(p, rid)  -- a live reservation given back; true if there was one
  local v = redis.call('HGET', p .. ':res', rid)
  if not v then return false end
  local nano, ph = string.match(v, '^(%d+)|([^|]*)|')
  hold(p, neg(nano), ph, held_calls(v))
  redis.call('HDEL', p .. ':res', rid); redis.call('ZREM', p .. ':rexp', rid)
  return true
end
local function claim(p, spec, width, force)
  local stored = redis.call('HGET', p .. ':meta', 'win')
  if stored then return stored end
  local legacy = redis.call('EXISTS', p .. ':ts', p .. ':res') > 0
  -- a read claims only to fold the per-call layout, and only knowing the window (not a status without one)
  if not (force or (legacy and spec ~= 'none')) then return false end
  redis.call('HSET', p .. ':meta', 'win', spec, 'v', '2')
  if legacy then  -- the per-call layout: fold settled calls into buckets, index live reservations
    local ids = redis.call('ZRANGE', p .. ':ts', 0, -1, 'WITHSCORES')
    for j = 1, #ids, 2 do
      local v = redis.call('HGET', p .. ':amt', ids[j])
      if v then
        local nano, econ, ph = string.match(v, '^(%d+)|(%d+)|(.*)$')
        add(p, width, tonumber(ids[j + 1]), nano, econ, ph)
      end
    end
    redis.call('DEL', p .. ':ts', p .. ':amt')
    local res = redis.call('HGETALL', p .. ':res')
    for j = 1, #res, 2 do
      local nano, ph, exp = string.match(res[j + 1], '^(%d+)|([^|]*)|(.*)$')
      redis.call('ZADD', p .. ':rexp', exp, res[j]); hold(p, nano, ph, 1)
    end
  end
  return spec
end
local function expire(p, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':rexp', '-inf', now)) do
    local v = redis.call('HGET', p .. ':res', id)
    if v then
      local nano, ph = string.match(v, '^(%d+)|([^|]*)|')
      hold(p, neg(nano), ph, held_calls(v))
      redis.call('HDEL', p .. ':res', id); redis.call('HSET', p .. ':late', id, v)
      redis.call('ZADD', p .. ':lexp', now, id)
    end
    redis.call('ZREM', p .. ':rexp', id)
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':lexp', '-inf', tonumber(now) - KEEP)) do
    redis.call('HDEL', p .. ':late', id); redis.call('ZREM', p .. ':lexp', id)
  end
end
local function evict(p, first)
  if first == 'none' then return end
  local gone = redis.call('ZRANGEBYSCORE', p .. ':bi', '-inf', '(' .. first)
  for _, b in ipairs(gone) do
    local f = redis.call('HGETALL', p .. ':b:' .. b)
    for j = 1, #f, 2 do redis.call('HINCRBY', p .. ':tot', f[j], neg(f[j + 1])) end
    redis.call('DEL', p .. ':b:' .. b)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':bi', '-inf', '(' .. first) end
end
local function num(v) return tonumber(v or 0) or 0 end
"""

# KEYS: account prefixes. ARGV: now, amount, phase, id, expires, calls (0: room for a retry), then per account:
# enforce, limit (-1 none), max_calls (-1), phase cap (-1), first bucket still in the window ('none'), bucket
# width (0 none), window spec, how long a stop taken now holds in ms (-1: for good).
_RESERVE = _LIB + """
local now, amount, phase, rid, expires, ncalls = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local seen = {}  -- per account: spend + reservations + this call (committed at most), calls likewise
local function stop(p, reason, hold)  -- the fleet's stop, stored with the account (see shared_accounts)
  if tonumber(hold) > 0 then redis.call('SET', p .. ':trip', reason, 'PX', hold)
  else redis.call('SET', p .. ':trip', reason) end
end
for i = 1, #KEYS do
  local p, base = KEYS[i], 6 + (i - 1) * 8
  local enforce, limit, maxcalls, cap = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
    tonumber(ARGV[base + 4])
  local first, width, spec, hold = ARGV[base + 5], tonumber(ARGV[base + 6]), ARGV[base + 7], ARGV[base + 8]
  local stored = claim(p, spec, width, true)
  if stored ~= spec then return {i, 'window_mismatch', stored} end
  expire(p, now)
  local tripped = enforce == '1' and redis.call('GET', p .. ':trip')
  if tripped then return {i, 'tripped', '0', '0', 0, tripped, redis.call('PTTL', p .. ':trip')} end
  if enforce == '1' then
    evict(p, first)
    local t = redis.call('HMGET', p .. ':tot', 'n', 'c', 'p:' .. phase)
    local r = redis.call('HMGET', p .. ':rtot', 'n', 'c', 'p:' .. phase)
    local spent, calls, pspent, reserved, rcalls, rphase = num(t[1]), num(t[2]), num(t[3]), num(r[1]), num(r[2]),
      num(r[3])
    local amt = tonumber(amount)
    -- the fifth value: 1 while other calls are in flight (the call waits for them, stops nothing)
    local refused, wait, a, b = false, 0, 0, 0
    if ncalls > 0 and maxcalls >= 0 and calls + rcalls + ncalls > maxcalls then
      refused, wait, a, b = 'max_calls', (rcalls > 0) and 1 or 0, calls, rcalls
    elseif limit >= 0 and spent + reserved + amt > limit then
      refused, wait, a, b = 'limit_usd', (reserved > 0) and 1 or 0, spent, reserved
    elseif cap >= 0 and pspent + rphase + amt > cap then
      refused, wait, a, b = 'max_' .. phase .. '_usd', (rphase > 0) and 1 or 0, pspent, rphase
    end
    if refused then
      if wait == 0 then stop(p, refused, hold) end
      return {i, refused, string.format('%d', a), string.format('%d', b), wait}
    end
    seen[#seen + 1] = string.format('%d', spent + reserved + amt)
    seen[#seen + 1] = string.format('%d', calls + rcalls + ncalls)
  else
    seen[#seen + 1] = '-1'
    seen[#seen + 1] = '-1'
  end
end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i] .. ':res', rid, amount .. '|' .. phase .. '|' .. expires .. '|' .. ncalls)
  redis.call('ZADD', KEYS[i] .. ':rexp', expires, rid)
  hold(KEYS[i], amount, phase, ncalls)
end
return {0, unpack(seen)}
"""

# Count a call once per account. ARGV: id, ts, actual, economic, phase, mode, then per account: width, spec.
# mode 'settle': only by consuming its reservation (live or expired): a settle replayed after a lost reply is
# not counted twice. Mode 'replay': a call counted locally while the ledger was away, once per id.
_SETTLE = _LIB + """
local rid, ts, actual, econ, phase, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
for i = 1, #KEYS do
  local p, width, spec = KEYS[i], tonumber(ARGV[5 + 2 * i]), ARGV[6 + 2 * i]
  claim(p, spec, width, true)
  local counted = false
  if mode == 'settle' then
    if unreserve(p, rid) then
      counted = true
    elseif redis.call('HDEL', p .. ':late', rid) == 1 then
      redis.call('ZREM', p .. ':lexp', rid)
      counted = true
    end
  else
    counted = redis.call('SET', p .. ':rep:' .. rid, '1', 'NX', 'EX', KEEP) ~= false
  end
  if counted then add(p, width, ts, actual, econ, phase) end
end
return 1
"""

_RELEASE = _LIB + """
for i = 1, #KEYS do unreserve(KEYS[i], ARGV[1]) end
return 1
"""

# KEYS[1]: the account. ARGV: now, first bucket ('none'), width, spec (claimed only over a legacy layout).
_STATE = _LIB + """
local p = KEYS[1]
local stored = claim(p, ARGV[4], tonumber(ARGV[3]), false)
if not stored then
  if redis.call('EXISTS', p .. ':ts') == 0 then return {false, {}, {}, redis.call('GET', p .. ':trip')} end
  local n, e, c, tot = 0, 0, 0, {}  -- unclaimed per-call layout, read without a window: all of it counts
  for _, v in ipairs(redis.call('HVALS', p .. ':amt')) do
    local nano, econ, ph = string.match(v, '^(%d+)|(%d+)|(.*)$')
    n, e, c = n + tonumber(nano), e + tonumber(econ), c + 1
    tot['p:' .. ph] = (tot['p:' .. ph] or 0) + tonumber(nano)
  end
  local flat = {'n', string.format('%d', n), 'e', string.format('%d', e), 'c', tostring(c)}
  for k, v in pairs(tot) do flat[#flat + 1] = k; flat[#flat + 1] = string.format('%d', v) end
  return {'none', flat, {}, redis.call('GET', p .. ':trip')}
end
expire(p, ARGV[1])
if stored == ARGV[4] then evict(p, ARGV[2]) end
return {stored, redis.call('HGETALL', p .. ':tot'), redis.call('HGETALL', p .. ':rtot'),
  redis.call('GET', p .. ':trip')}
"""

_RESET = """
for _, b in ipairs(redis.call('ZRANGE', KEYS[1] .. ':bi', 0, -1)) do redis.call('DEL', KEYS[1] .. ':b:' .. b) end
for _, k in ipairs({'meta', 'tot', 'bi', 'res', 'rexp', 'rtot', 'late', 'lexp', 'ts', 'amt', 'trip'}) do
  redis.call('DEL', KEYS[1] .. ':' .. k)
end
return 1
"""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fields(flat: Sequence[Any]) -> dict[str, int]:
    return {_text(flat[j]): int(flat[j + 1]) for j in range(0, len(flat), 2)}


class RedisLedger(SharedAccounts):
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
        self._release = self.client.register_script(_RELEASE)
        self._state = self.client.register_script(_STATE)
        self._reset = self.client.register_script(_RESET)
        self._stored: dict[str, str] = {}  # account -> the window spec the ledger keeps it under

    def _call(self, fn: Callable[[], Any]) -> Any:
        import redis

        try:
            return fn()
        except (redis.RedisError, OSError) as exc:  # any failure: the policy applies, never silently unbudgeted
            raise LedgerUnavailable(f"{self.url}: {exc}") from exc

    def key(self, label: str) -> str:
        return f"{self.namespace}{{{label}}}"  # hash tag: one account's keys on one cluster slot

    @staticmethod
    def _buckets(window: Window | None, now: float) -> tuple[str, int, str]:
        """(first bucket still in the window, bucket width, spec) as the scripts take them."""
        if window is None:
            return "none", 0, "none"
        return str(window.first_bucket(now)), window.bucket_s, window_spec(window)

    def reserve(self, accounts: Sequence[str], amount_usd: float, phase: str,
                calls: int = 1) -> Reservation | Refusal:
        now = self.clock()
        rid = uuid.uuid4().hex
        args: list[Any] = [repr(now), str(to_nano(amount_usd)), phase, rid, repr(now + self.timeout), str(calls)]
        for name in accounts:
            lim = self._limits[name]
            if lim.enforce and self._tripped_now(name, now) is not None:
                return Refusal(name, "tripped", 0.0, 0.0, lim.limit_usd or 0.0)
            until = self._trip_until(name, now)
            args += ["1" if lim.enforce else "0", to_nano(lim.limit_usd) if lim.limit_usd is not None else -1,
                     lim.max_calls if lim.max_calls is not None else -1,
                     to_nano(lim.phase_limits[phase]) if phase in lim.phase_limits else -1,
                     *self._buckets(lim.window, now), -1 if until is None else max(1, int((until - now) * 1000))]
        out = self._call(lambda: self._reserve(keys=list(accounts), args=args))
        if int(out[0]) == 0:
            for name in accounts:
                self._stored.setdefault(name, window_spec(self._limits[name].window))
            seen = {name: (int(out[1 + 2 * i]) / NANO, int(out[2 + 2 * i])) for i, name in enumerate(accounts)
                    if len(out) > 2 + 2 * i and int(out[1 + 2 * i]) >= 0}
            return Reservation(tuple(accounts), amount_usd, phase, reservation_id=rid, seen=seen, calls=calls)
        name = accounts[int(out[0]) - 1]
        reason = _text(out[1])
        if reason == "window_mismatch":
            return self._mismatch(name, _text(out[2]))
        # Sticky in this process at once (the budget trips it too, a little later). A thread whose script is
        # already on its way to the server can still be admitted by a cap it fits under. A call that only
        # waits for calls in flight stops nothing.
        wait = len(out) > 4 and int(out[4]) == 1
        if reason == "tripped":  # stopped by a refusal in this or another process: remembered while it holds
            ttl = int(out[6]) if len(out) > 6 else -1
            self._tripped.setdefault(name, (_text(out[5]), None if ttl < 0 else now + ttl / 1000))
        elif not wait:
            self._stop_here(name, reason, now)
        lim = self._limits[name]
        limit = {"max_calls": lim.max_calls, "limit_usd": lim.limit_usd}.get(reason, lim.phase_limits.get(phase))
        if reason == "max_calls":
            return Refusal(name, reason, int(out[2]), int(out[3]), float(limit or 0), wait=wait)
        return Refusal(name, reason, int(out[2]) / NANO, int(out[3]) / NANO, float(limit or 0), wait=wait)

    def _write(self, call_id: str, accounts: Sequence[str], phase: str, actual: float, econ: float, ts: float,
               mode: str) -> None:
        args: list[Any] = [call_id, repr(ts), str(to_nano(actual)), str(to_nano(econ)), phase, mode]
        for name in accounts:
            _, width, spec = self._buckets(self._window_of(name), ts)
            args += [width, spec]
        self._call(lambda: self._settle(keys=list(accounts), args=args))

    def settle(self, reservation: Reservation, actual_usd: float, economic_usd: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        self._write(reservation.reservation_id, reservation.accounts, reservation.phase, actual_usd, economic_usd,
                    self.clock(), "settle")

    def record(self, call_id: str, accounts: Sequence[str], phase: str, actual_usd: float, economic_usd: float,
               ts: float, *, reserved: bool = False) -> None:
        """Replays one call counted elsewhere, exactly once: `reserved` for a settle that may or may not have
        landed (counted only if its reservation is still there), else a call made while the ledger was away."""
        self._write(call_id, accounts, phase, actual_usd, economic_usd, ts, "settle" if reserved else "replay")

    def release(self, reservation: Reservation) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        self._call(lambda: self._release(keys=list(reservation.accounts), args=[reservation.reservation_id]))

    def _stored_spec(self, account: str) -> str | None:
        spec = self._stored.get(account)
        if spec is None:
            raw = self._call(lambda: self.client.hget(f"{account}:meta", "win"))
            if raw is not None:
                spec = self._stored[account] = _text(raw)
        return spec

    def state(self, account: str) -> AccountState:
        now = self.clock()
        stored = self._stored_spec(account)
        # The ledger's window decides what still counts (a status read from the CLI need not repeat it).
        first, width, spec = self._buckets(stored_window(stored) if stored else self._window_of(account), now)
        out = self._call(lambda: self._state(keys=[account], args=[repr(now), first, width, spec]))
        tripped = self._tripped_now(account, now)
        if tripped is None and len(out) > 3 and out[3]:  # the fleet's stop, stored by another process
            tripped = _text(out[3])
        if not out[0]:
            return AccountState(tripped=tripped)
        if _text(out[0]) != spec:  # claimed meanwhile under another window: read again by that one
            self._stored[account] = _text(out[0])
            return self.state(account)
        tot, rtot = _fields(out[1]), _fields(out[2])
        phases = {k[2:]: v / NANO for k, v in tot.items() if k.startswith("p:") and v}
        rphases = {k[2:]: v / NANO for k, v in rtot.items() if k.startswith("p:") and v}
        return AccountState(tot.get("n", 0) / NANO, tot.get("e", 0) / NANO, rtot.get("n", 0) / NANO,
                            tot.get("c", 0), rtot.get("c", 0), phases, rphases, tripped)

    def trip(self, account: str, reason: str) -> None:
        """The budget's trip after a refusal (the refusing script stored it already; this covers any other)."""
        now = self.clock()
        if self._tripped_now(account, now) is not None:
            return
        until = self._stop_here(account, reason, now)
        ms = None if until is None else max(1, int((until - now) * 1000))
        self._call(lambda: self.client.set(f"{account}:trip", reason, px=ms, nx=True))

    def labels(self) -> list[str]:
        """The budget labels this ledger has accounts for (`budget status` tells a misspelt label by it)."""
        prefix = f"{self.namespace}{{"
        keys = self._call(lambda: list(self.client.scan_iter(match=f"{prefix}*}}:*", count=1000)))
        found = set()
        for key in keys:
            text = key.decode() if isinstance(key, bytes) else str(key)
            if text.startswith(prefix) and "}:" in text:
                found.add(text[len(prefix):text.rindex("}:")])
        return sorted(found)

    def reset(self, account: str) -> None:
        self._call(lambda: self._reset(keys=[account]))
        self._stored.pop(account, None)
        self._tripped.pop(account, None)
