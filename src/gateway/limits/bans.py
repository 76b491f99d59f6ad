"""Per-address bans, shared by every gateway process, decided locally.

An address that keeps being refused (`ban_violations` violations within
`ban_window`, as a decaying count: gateway._fast.violations) is banned for
`ban_seconds`, then released on its own. Addresses in `ip_allow` are never
counted nor banned; `ip_deny` ranges are answered by `is_denied`. The operator
lists, adds and lifts bans through the admin API (`list`, `ban`, `lift`).

The request path (`check`, `violation`, `is_allowed_range`, `is_denied`) is
synchronous and reads only this process' memory: a violation is counted here
and, at the threshold, banned here at once. Everything shared happens in a
background task:

- Every `flush_interval` (100 ms) the violations and bans queued since the last
  flush go to Redis in one Lua script per batch, on Redis' clock. The script
  keeps a decaying count per address shared by every process (so a flood
  spread over several processes is banned too), writes each ban as a key with
  its TTL, and publishes it.
- Every process subscribes to `<prefix>bans` and mirrors each ban and lift as
  it is published; it reads every ban at start, and again after each
  reconnection (what was published while it was not listening).

Redis layout (the `{bans}` hash tag keeps every key in one Cluster slot, so one
script may touch them all):
  `<prefix>{bans}:ban:<address>`    the ban: its reason, expiring with it
  `<prefix>{bans}:count:<address>`  the shared count: hash {c, t}, expiring once drained
  `<prefix>{bans}:index`            sorted set of banned addresses by end (ms), for listing
  channel `<prefix>bans`            JSON {"op": "ban", "address", "ms", "reason"} or {"op": "lift", "address"}

Without Redis (or while it is unreachable, logged once per outage) bans and
counts are this process' own; what was queued meanwhile (violations up to the
table size, bans, lifts) is written when Redis answers again, and the bans are
then read afresh.

Times: `now` on the request path is the caller's monotonic clock (the one given
as `clock`, `time.monotonic` by default); `Ban.until` is wall-clock epoch
seconds, for people and Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from gateway._fast.violations import ViolationCounts
from gateway.netaddr import networks, parse_ip
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.bans")

# Violations, bans by this process ('b': at least this long) and by the
# operator ('B': exactly this long), in one batch.
# KEYS[1]: the index; then per entry KEYS[2i] its ban, KEYS[2i+1] its count.
# ARGV: threshold, window, ban ms, channel, reason of a ban by count; then per
# entry address, op, n (violations, or ms), reason.
# Answers the bans made: {address, ms, reason, ...}.
_FLUSH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local threshold, window, ban_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local channel, by_count = ARGV[4], ARGV[5]
local out = {}
local function ban(i, address, ms, reason)
  redis.call('SET', KEYS[2 * i], reason, 'PX', ms)
  redis.call('ZADD', KEYS[1], now_ms + ms, address)
  redis.call('DEL', KEYS[2 * i + 1])
  redis.call('PUBLISH', channel, cjson.encode({op = 'ban', address = address, ms = ms, reason = reason}))
  out[#out + 1] = address
  out[#out + 1] = ms
  out[#out + 1] = reason
end
for i = 1, (#KEYS - 1) / 2 do
  local j = 6 + (i - 1) * 4
  local address, op, n, reason = ARGV[j], ARGV[j + 1], tonumber(ARGV[j + 2]), ARGV[j + 3]
  if op == 'B' then
    ban(i, address, n, reason)
  elseif op == 'b' then
    if redis.call('PTTL', KEYS[2 * i]) < n then
      ban(i, address, n, reason)
    end
  elseif threshold > 0 and redis.call('EXISTS', KEYS[2 * i]) == 0 then
    local state = redis.call('HMGET', KEYS[2 * i + 1], 'c', 't')
    local c, last = tonumber(state[1]) or 0, tonumber(state[2]) or now
    if now > last then
      c = c - (now - last) * threshold / window
      if c < 0 then
        c = 0
      end
      last = now
    end
    c = c + n
    if c > threshold - 1 then
      ban(i, address, ban_ms, by_count)
    else
      redis.call('HSET', KEYS[2 * i + 1], 'c', tostring(c), 't', tostring(last))
      redis.call('PEXPIRE', KEYS[2 * i + 1], math.ceil(window * 1000) + 1000)
    end
  end
end
return out
"""
# Every ban in force: {address, ms left, reason, ...}. KEYS[1]: the index; ARGV[1]: the ban key prefix.
_LIST = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local out = {}
for _, address in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. address
  local ms = redis.call('PTTL', key)
  if ms > 0 then
    out[#out + 1] = address
    out[#out + 1] = ms
    out[#out + 1] = redis.call('GET', key)
  else
    redis.call('ZREM', KEYS[1], address)
  end
end
return out
"""
# Lift one ban: 1 if there was one. KEYS: the index, the ban, the count. ARGV: channel, address.
_LIFT = """
local existed = redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[1], cjson.encode({op = 'lift', address = ARGV[2]}))
return existed
"""
# Addresses per script call.
_BATCH = 500
# Remembered classifications of the addresses seen (normalized form, allowed, denied).
_ADDRESS_CACHE = 65_536
# How often expired bans and drained counts are dropped, and a lost Redis is tried.
_SWEEP_EVERY = 1.0
# One Redis operation of the background task may take this long before Redis counts as lost.
_REDIS_TIMEOUT = 5.0
# The longest ban the admin API may set (as `limits.ban_seconds` allows).
MAX_BAN_SECONDS = 30 * 86_400.0


@dataclass(frozen=True, slots=True)
class Ban:
    """One banned address: until when (epoch seconds) and why."""

    address: str
    until: float  # wall clock (time.time()): for people and Retry-After
    reason: str
    # The same moment on the clock the request path passes as `now` (time.monotonic).
    ends_at: float = field(repr=False, compare=False)

    def seconds_left(self) -> float:
        return max(0.0, self.until - time.time())


class NeverBanned(ValueError):
    """The address is in an `ip_allow` range: it is never banned."""


class BanList:
    """Bans by client address: decided locally, shared through Redis (see the module docstring)."""

    def __init__(
        self,
        redis,
        prefix: str,
        settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        flush_interval: float = 0.1,
        max_addresses: int = 65_536,
    ) -> None:
        """`redis`: a redis.asyncio client, or None (this process only); `settings`: a LimitSettings."""
        self.redis = redis
        self.prefix = prefix
        self.channel = f"{prefix}bans"
        self.flush_interval = flush_interval
        self._clock = clock
        self._max_addresses = max_addresses
        self._ban_key = f"{prefix}{{bans}}:ban:"
        self._count_key = f"{prefix}{{bans}}:count:"
        self._index_key = f"{prefix}{{bans}}:index"
        self._bans: dict[str, Ban] = {}
        self._counts: ViolationCounts | None = None
        self._addresses: dict[str, tuple[str, bool, bool]] = {}
        # Queued for Redis: violations by address, bans ('b' or 'B', see _FLUSH), lifts.
        self._pending_hits: dict[str, int] = {}
        self._pending_bans: dict[str, tuple[str, Ban]] = {}
        self._pending_lifts: set[str] = set()
        self._lock = asyncio.Lock()  # one Redis conversation at a time: flush, load, admin operations
        self._tasks: list[asyncio.Task] = []
        self._redis_down = False
        self._tried = -math.inf  # when Redis was last tried while down
        # While a load is on its way: the addresses whose ban changed meanwhile (newer than what it reads).
        self._changed_while_loading: set[str] | None = None
        if redis is not None:
            self._flush_script = redis.register_script(_FLUSH)
            self._list_script = redis.register_script(_LIST)
            self._lift_script = redis.register_script(_LIFT)
        self.reconfigure(settings)

    def reconfigure(self, settings) -> None:
        """Apply changed limits (a LimitSettings): thresholds, ban length, allow and deny ranges."""
        allow = networks(settings.ip_allow, "ip_allow")
        deny = networks(settings.ip_deny, "ip_deny")
        self.threshold = settings.ban_violations  # 0: violations ban nothing
        self.window = float(settings.ban_window)
        self.ban_seconds = float(settings.ban_seconds)
        self._allow, self._deny = allow, deny
        self._addresses = {}
        if not self.threshold:
            self._counts = None
        elif self._counts is None:
            self._counts = ViolationCounts(self.threshold, self.window, self._max_addresses)
        else:
            self._counts.reconfigure(self.threshold, self.window, self._clock())
        self._reason = f"{self.threshold} refused requests within {self.window:g} s"

    # -- the request path: synchronous, local ---------------------------------------------------------

    def check(self, address: str, now: float) -> Ban | None:
        """The ban in force on `address` at `now` (monotonic), or None. Allowed ranges are never banned."""
        key, allowed, _ = self._address(address)
        if allowed:
            return None
        return self.ban_of(key, now)

    def classify(self, address: str) -> tuple[str, bool, bool]:
        """(the address as bans know it, in an allowed range, in a denied range): one cached lookup.

        A caller may keep the answer until the next `reconfigure`.
        """
        return self._address(address)

    def ban_of(self, key: str, now: float) -> Ban | None:
        """The ban in force on an address `classify` named `key`, or None (not for allowed ranges)."""
        ban = self._bans.get(key)
        if ban is None:
            return None
        if ban.ends_at <= now:
            self._bans.pop(key, None)
            return None
        return ban

    def violation(self, address: str, now: float) -> Ban | None:
        """Count a refusal of `address`; the ban it earned (or is under), or None.

        At the threshold the address is banned here at once; the violation
        and the ban go to Redis with the next flush.
        """
        counts = self._counts
        if counts is None:
            return None
        key, allowed, _ = self._address(address)
        if allowed:
            return None
        ban = self._bans.get(key)
        if ban is not None and ban.ends_at > now:
            return ban
        shared = self.redis is not None
        if shared and (key in self._pending_hits or len(self._pending_hits) < self._max_addresses):
            self._pending_hits[key] = self._pending_hits.get(key, 0) + 1
        if not counts.add(key, now):
            return None
        counts.forget(key)
        ban = Ban(key, time.time() + self.ban_seconds, self._reason, now + self.ban_seconds)
        self._bans[key] = ban
        if shared:
            self._pending_hits.pop(key, None)
            self._pending_lifts.discard(key)
            self._pending_bans[key] = ("b", ban)
        log.warning("banned %s for %g s: %s", key, self.ban_seconds, self._reason)
        return ban

    def is_allowed_range(self, address: str) -> bool:
        """Whether `address` is in an `ip_allow` range (never limited by address, never banned)."""
        return self._address(address)[1]

    def is_denied(self, address: str) -> bool:
        """Whether `address` is in an `ip_deny` range (always refused)."""
        return self._address(address)[2]

    def _address(self, address: str) -> tuple[str, bool, bool]:
        known = self._addresses.get(address)
        if known is None:
            known = self._classify(address)
            if len(self._addresses) >= _ADDRESS_CACHE:
                self._addresses.clear()
            self._addresses[address] = known
        return known

    def _classify(self, address: str) -> tuple[str, bool, bool]:
        try:
            ip = parse_ip(address)
        except ValueError:
            return address, False, False  # not an IP (a Unix socket's peer): matches no range
        return str(ip), any(ip in net for net in self._allow), any(ip in net for net in self._deny)

    # -- the operator's operations ------------------------------------------------------------------

    async def ban(self, address: str, seconds: float, reason: str) -> Ban:
        """Ban one address for `seconds` (replacing a ban in force), in every process.

        ValueError: not a single IP address, or `seconds` out of range;
        NeverBanned: the address is in an allowed range.
        """
        key = self._operator_address(address)
        if not 0.0 < seconds <= MAX_BAN_SECONDS:
            raise ValueError(f"seconds must be more than 0 and at most {MAX_BAN_SECONDS:g}, got {seconds!r}")
        ban = Ban(key, time.time() + seconds, reason, self._clock() + seconds)
        self._bans[key] = ban
        if self._counts is not None:
            self._counts.forget(key)
        if self.redis is not None:
            self._pending_hits.pop(key, None)
            self._pending_lifts.discard(key)
            self._pending_bans[key] = ("B", ban)
            await self._flush_now()
        log.warning("banned %s for %g s by the operator: %s", key, seconds, reason)
        return ban

    async def lift(self, address: str) -> bool:
        """End the ban on one address in every process; False if it was not banned. ValueError: not an IP address."""
        key = self._operator_address(address, lifting=True)
        ban = self._bans.pop(key, None)
        existed = ban is not None and ban.ends_at > self._clock()
        if self._counts is not None:
            self._counts.forget(key)
        if self.redis is not None:
            self._pending_hits.pop(key, None)
            queued = self._pending_bans.pop(key, None)
            existed = existed or queued is not None
            self._pending_lifts.add(key)
            async with self._lock:
                try:
                    async with asyncio.timeout(_REDIS_TIMEOUT):
                        if await self._lift_pending(key):
                            existed = True
                    self._redis_back()
                except Exception as exc:  # noqa: BLE001 - lifted here; the lift is written when Redis is back
                    self._redis_failed(exc)
        if existed:
            log.warning("ban on %s lifted by the operator", key)
        return existed

    async def list(self) -> list[Ban]:
        """Every ban in force, by address: Redis' list when it answers, else this process'."""
        if self.redis is not None:
            async with self._lock:
                try:
                    async with asyncio.timeout(_REDIS_TIMEOUT):
                        await self._flush_pending()
                        await self._load()
                    self._redis_back()
                except Exception as exc:  # noqa: BLE001 - answer from what this process holds
                    self._redis_failed(exc)
        now = self._clock()
        return sorted((b for b in self._bans.values() if b.ends_at > now), key=lambda b: b.address)

    def _operator_address(self, address: str, lifting: bool = False) -> str:
        if "/" in address:
            raise ValueError(
                f"{address!r} is a range: bans are per address (refuse a range with limits.ip_deny)"
            )
        try:
            ip = parse_ip(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IPv4 or IPv6 address") from None
        key = str(ip)
        if not lifting and self._address(key)[1]:
            raise NeverBanned(f"{key} is in an allowed range (limits.ip_allow): it is never banned")
        return key

    # -- the background task ------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the bans in force, then flush, sweep and listen in the background."""
        if self.redis is not None:
            async with self._lock:
                try:
                    async with asyncio.timeout(_REDIS_TIMEOUT):
                        await self._load()
                except Exception as exc:  # noqa: BLE001 - start on local state; the flush task retries
                    self._redis_failed(exc)
            self._tasks.append(asyncio.create_task(self._listen(), name="bans-listen"))
        self._tasks.append(asyncio.create_task(self._run(), name="bans-flush"))

    async def stop(self) -> None:
        """Stop the background tasks, writing what is queued if Redis answers."""
        # The pub/sub read can swallow a cancellation (Python 3.11 wait_for, gh-86296): cancel_all insists.
        await cancel_all(self._tasks)
        self._tasks.clear()
        if self.redis is not None and not self._redis_down:
            await self._tick()

    async def _run(self) -> None:
        swept = self._clock()
        while True:
            await asyncio.sleep(self.flush_interval)
            now = self._clock()
            if now - swept >= _SWEEP_EVERY:
                swept = now
                self._sweep(now)
            if self.redis is not None and (not self._redis_down or now - self._tried >= _SWEEP_EVERY):
                await self._tick()

    async def _tick(self) -> None:
        """Write what is queued; after an outage, also read the bans afresh."""
        self._tried = self._clock()
        async with self._lock:
            try:
                async with asyncio.timeout(_REDIS_TIMEOUT):
                    await self._flush_pending()
                    if self._redis_down:
                        await self._load()
                self._redis_back()
            except Exception as exc:  # noqa: BLE001 - keep deciding locally
                self._redis_failed(exc)

    async def _flush_now(self) -> None:
        async with self._lock:
            try:
                async with asyncio.timeout(_REDIS_TIMEOUT):
                    await self._flush_pending()
                self._redis_back()
            except Exception as exc:  # noqa: BLE001 - applied here; written when Redis is back
                self._redis_failed(exc)

    async def _flush_pending(self) -> None:
        """Write the queued lifts, bans and violations (the lock held); what fails stays queued."""
        for address in list(self._pending_lifts):
            await self._lift_pending(address)
        if self._redis_down:
            await self.redis.ping()  # nothing queued must still prove Redis is back
        while self._pending_bans or self._pending_hits:
            entries: list[tuple[str, str, int, str]] = []
            for address in list(self._pending_bans)[:_BATCH]:
                op, ban = self._pending_bans.pop(address)
                ms = math.ceil((ban.ends_at - self._clock()) * 1000)
                if ms > 0:
                    entries.append((address, op, ms, ban.reason))
            for address in list(self._pending_hits)[: _BATCH - len(entries)]:
                entries.append((address, "v", self._pending_hits.pop(address), ""))
            try:
                made = await self._flush_script(keys=self._flush_keys(entries), args=self._flush_args(entries))
            except BaseException:
                self._requeue(entries)
                raise
            for i in range(0, len(made), 3):
                address, ms, reason = _text(made[i]), int(made[i + 1]), _text(made[i + 2])
                if address not in self._bans:
                    log.warning("banned %s for %g s: %s (counted across processes)", address, ms / 1000, reason)
                self._mirror_ban(address, ms, reason)

    async def _lift_pending(self, address: str) -> bool:
        existed = await self._lift_script(
            keys=[self._index_key, self._ban_key + address, self._count_key + address], args=[self.channel, address]
        )
        self._pending_lifts.discard(address)
        return bool(existed)

    def _flush_keys(self, entries) -> list[str]:
        keys = [self._index_key]
        for address, *_ in entries:
            keys += (self._ban_key + address, self._count_key + address)
        return keys

    def _flush_args(self, entries) -> list:
        args: list = [self.threshold, self.window, math.ceil(self.ban_seconds * 1000), self.channel, self._reason]
        for entry in entries:
            args += entry
        return args

    def _requeue(self, entries) -> None:
        now = self._clock()
        for address, op, n, reason in entries:
            if op == "v":
                if address in self._pending_hits or len(self._pending_hits) < self._max_addresses:
                    self._pending_hits[address] = self._pending_hits.get(address, 0) + n
            elif address not in self._pending_bans:
                self._pending_bans[address] = (op, Ban(address, time.time() + n / 1000, reason, now + n / 1000))

    async def _load(self) -> None:
        """Replace the bans held here by Redis' (the lock held), keeping those not yet written."""
        self._changed_while_loading = changed = set()
        try:
            found = await self._list_script(keys=[self._index_key], args=[self._ban_key])
        finally:
            self._changed_while_loading = None
        wall, now = time.time(), self._clock()
        bans: dict[str, Ban] = {}
        for i in range(0, len(found), 3):
            address, seconds = _text(found[i]), int(found[i + 1]) / 1000
            bans[address] = Ban(address, wall + seconds, _text(found[i + 2]), now + seconds)
        for address, (_, ban) in self._pending_bans.items():
            bans.setdefault(address, ban)
        for address in self._pending_lifts:
            bans.pop(address, None)
        for address in changed:  # a message mirrored while the answer was on its way is newer
            if address in self._bans:
                bans[address] = self._bans[address]
            else:
                bans.pop(address, None)
        self._bans = bans

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                # What was published while this process was not listening.
                async with self._lock:
                    async with asyncio.timeout(_REDIS_TIMEOUT):
                        await self._flush_pending()
                        await self._load()
                    self._redis_back()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._mirror(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - decide locally until Redis is back
                self._redis_failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _SWEEP_EVERY)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass

    def _mirror(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            op, address = event["op"], event["address"]
            if op == "ban":
                self._mirror_ban(address, int(event["ms"]), str(event["reason"]))
            elif op == "lift":
                self._bans.pop(address, None)
                if self._counts is not None:
                    self._counts.forget(address)
                if self._changed_while_loading is not None:
                    self._changed_while_loading.add(address)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignored a malformed message on %s: %s", self.channel, exc)

    def _mirror_ban(self, address: str, ms: int, reason: str) -> None:
        ends_at = self._clock() + ms / 1000
        held = self._bans.get(address)
        # The same ban heard again (this process' own, echoed by Redis): keep the one held.
        if held is None or held.reason != reason or abs(held.ends_at - ends_at) >= 1.0:
            self._bans[address] = Ban(address, time.time() + ms / 1000, reason, ends_at)
        if self._counts is not None:
            self._counts.forget(address)
        if self._changed_while_loading is not None:
            self._changed_while_loading.add(address)

    def _sweep(self, now: float) -> None:
        for address in [a for a, ban in self._bans.items() if ban.ends_at <= now]:
            del self._bans[address]
        if self._counts is not None:
            self._counts.sweep(now)

    def _redis_failed(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning("Redis is unreachable (%s): bans are counted and kept per process until it is back",
                        exc or type(exc).__name__)

    def _redis_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("Redis is back: bans are shared again")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
