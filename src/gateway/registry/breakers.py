"""Circuit breakers per upstream server, decided locally, shared by every process through Redis.

What it owns: one compiled CircuitBreaker (gateway._fast.breaker) per server
whose settings enable it, built from that server's `UpstreamSettings`, and
the sharing of their transitions. What it must not do: talk to Redis on the
request path, or fail a request because Redis does not answer.

The request path (`allow`, `record`, `release`, `retry_after`, `available`,
`state`) is synchronous and reads only this process' memory. The data plane
calls `allow` before forwarding a call (0 refuses: answer 503 with
`retry_after`), then exactly one of `record(ok)` with the call's result or
`release(ticket)` when it ended without one (cancelled). A transport error, a
timeout or an HTTP 5xx from the upstream is `ok=False`; any JSON-RPC answer in
time, a tool's `isError` result included, is `ok=True`.

Shared (Redis given): the transitions, never the counts. Failures are counted
per process, so with n processes a rate trip needs `minimum_calls` calls on
one of them; consecutive failures trip on the process that sees them.
- A breaker that opens or closes on this process is queued here and written
  by the background task at once (it is woken), with one Lua script on Redis'
  clock: the record `<prefix>{breaker}:<server id>` (a hash: `v`, `state`,
  `until` and `openings`) and a message on `<prefix>breakers`.
  - open: `until` = Redis TIME + what is left of this opening. An opening
    already recorded is never shortened: the later end and the higher count
    win.
  - closed (a half-open round succeeded): written only if the record is still
    the one this process last saw; if another process opened it since, that
    newer opening is adopted here instead.
  - `v`, the record's version, is Redis TIME in ms (or one more than the
    previous version): it only grows, even across an expired record.
- Every process applies each message whose version is newer than the one it
  last applied: open -> `force_open` until its clock + the milliseconds left
  (so no two processes' clocks are ever compared), closed -> `force_closed`.
- Every `reconcile_interval` (0.5 s) one script reads the records of every
  known server (on Redis' clock) and applies the newer ones: the safety net
  for a message lost. Bound: a transition reaches every other process within
  one pub/sub delivery, at worst one reconcile interval (plus a Redis round
  trip) when the message is lost.
- OPEN turns HALF_OPEN on each process by itself when the shared `until`
  passes, so each process runs its own trial round: at most n x
  `half_open_calls` trial calls in the deployment. The first round to succeed
  closes the breaker everywhere; a failure reopens it everywhere, for longer.
- Records outlive their opening by a day (then expire), so a process that
  starts meanwhile learns of an opening and its count.

Redis unreachable (logged once per outage, and once when it is back): every
breaker keeps deciding on this process alone; the latest transition of each
breaker is kept and written when Redis answers again (an opening that ended
meanwhile is not), and every record is read afresh then. Without Redis (the
embedded default) the breakers are this process' only.

Times: `now` on the request path is the caller's monotonic clock, the same
clock as `clock` (time.monotonic by default).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable
from typing import NamedTuple

import orjson

from gateway._fast.breaker import ADMITTED, CLOSED, OPEN, CircuitBreaker
from gateway.config import UpstreamSettings
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.breakers")

# Record an opening and announce it. KEYS[1]: the record. ARGV: ms left, openings, channel, server, keep ms.
# Answers the record as it now stands: {v, state, ms left, openings}.
_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 'v', 'state', 'until', 'openings')
local v = tonumber(cur[1]) or 0
local ends = now + tonumber(ARGV[1])
local openings = tonumber(ARGV[2])
if cur[2] == 'open' then
  local u, o = tonumber(cur[3]), tonumber(cur[4])
  if u and u > ends then
    ends = u
  end
  if o and o > openings then
    openings = o
  end
end
v = math.max(now, v + 1)
redis.call('HSET', KEYS[1], 'v', string.format('%d', v), 'state', 'open', 'until', string.format('%d', ends),
           'openings', string.format('%d', openings))
redis.call('PEXPIRE', KEYS[1], ends - now + tonumber(ARGV[5]))
redis.call('PUBLISH', ARGV[3], cjson.encode({server = ARGV[4], v = v, state = 'open', ms = ends - now,
                                             openings = openings}))
return {v, 'open', ends - now, openings}
"""
# Record a close, unless the record changed since version ARGV[1]. KEYS[1]: the record.
# ARGV: the version this process last saw, channel, server, keep ms. Answers as _OPEN.
_CLOSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 'v', 'state', 'until', 'openings')
local v = tonumber(cur[1])
if v and v ~= tonumber(ARGV[1]) then
  local ms = 0
  if cur[2] == 'open' then
    ms = (tonumber(cur[3]) or now) - now
  end
  return {v, cur[2] or 'closed', ms, tonumber(cur[4]) or 0}
end
v = math.max(now, (v or 0) + 1)
redis.call('HSET', KEYS[1], 'v', string.format('%d', v), 'state', 'closed', 'until', '0', 'openings', '0')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[2], cjson.encode({server = ARGV[3], v = v, state = 'closed', ms = 0, openings = 0}))
return {v, 'closed', 0, 0}
"""
# Every record of KEYS, each {v, state, ms left, openings}, or {} when there is none.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], 'v', 'state', 'until', 'openings')
  local v = tonumber(cur[1])
  if v then
    local ms = 0
    if cur[2] == 'open' then
      ms = (tonumber(cur[3]) or now) - now
    end
    out[i] = {v, cur[2] or 'closed', ms, tonumber(cur[4]) or 0}
  else
    out[i] = {}
  end
end
return out
"""
# Records read by one script call.
_BATCH = 500
# A record outlives its opening (or its close) this long.
_KEEP_MS = 86_400_000
# One Redis conversation of the background task may take this long before Redis counts as lost.
_REDIS_TIMEOUT = 2.0

_SETTINGS = (
    "breaker_window",
    "breaker_minimum_calls",
    "breaker_failure_rate",
    "breaker_consecutive_failures",
    "breaker_open_seconds",
    "breaker_max_open_seconds",
    "breaker_half_open_calls",
)


def breaker_settings(settings: UpstreamSettings) -> tuple:
    """The arguments of CircuitBreaker (less `now`) that `settings` give, in order."""
    return tuple(getattr(settings, name) for name in _SETTINGS)


class BreakerStatus(NamedTuple):
    """One breaker as metrics show it."""

    state: str  # "closed", "open" or "half_open" (open until an allow after its end turns it half-open)
    opened_count: int  # openings in a row since it last closed


class BreakerBoard:
    """The breakers of every upstream server, decided here, shared through Redis (see the module docstring)."""

    def __init__(
        self,
        redis,
        prefix: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        reconcile_interval: float = 0.5,
    ) -> None:
        """`redis`: a redis.asyncio client, or None (this process only); `prefix`: the configured key prefix."""
        self.redis = redis
        self.prefix = prefix
        self.channel = f"{prefix}breakers"
        self.reconcile_interval = reconcile_interval
        self._clock = clock
        self._key = f"{prefix}{{breaker}}:"
        self._breakers: dict[Hashable, CircuitBreaker] = {}
        self._settings: dict[Hashable, tuple] = {}
        self._ids: dict[str, Hashable] = {}  # the name in Redis -> the server id
        self._seen: dict[Hashable, int] = {}  # version of the record last applied or written
        # The latest transition of each breaker not yet written: ("open", until, openings) or ("closed",).
        self._pending: dict[Hashable, tuple] = {}
        self._wake = asyncio.Event()
        self._reconcile_soon = False
        self._tasks: list[asyncio.Task] = []
        self._redis_down = False
        if redis is not None:
            self._open_script = redis.register_script(_OPEN)
            self._close_script = redis.register_script(_CLOSE)
            self._read_script = redis.register_script(_READ)

    # -- configuration ----------------------------------------------------------------------------------

    def configure(self, servers: Iterable[tuple[Hashable, UpstreamSettings]]) -> None:
        """Hold a breaker for each server whose settings enable one, and none for the others.

        A server already held keeps its state (changed settings apply to it
        through `reconfigure`); a server new here starts closed, and its shared
        record is read at the next reconcile, which this asks for at once.
        """
        now = self._clock()
        wanted = {
            server_id: breaker_settings(settings) for server_id, settings in servers if settings.breaker_enabled
        }
        for server_id in [s for s in self._breakers if s not in wanted]:
            del self._breakers[server_id]
            del self._settings[server_id]
            self._ids.pop(str(server_id), None)
            self._seen.pop(server_id, None)
            self._pending.pop(server_id, None)
        added = False
        for server_id, values in wanted.items():
            breaker = self._breakers.get(server_id)
            try:
                if breaker is None:
                    self._breakers[server_id] = CircuitBreaker(*values, now)
                    self._ids[str(server_id)] = server_id
                    added = True
                elif self._settings[server_id] != values:
                    breaker.reconfigure(*values, now)
            except ValueError as exc:  # UpstreamSettings validates them; a breaker less, never a failed reload
                log.error("no circuit breaker for upstream %s: %s", server_id, exc)
                continue
            self._settings[server_id] = values
        if added and self.redis is not None:
            self._reconcile_soon = True
            self._wake.set()

    # -- the request path: synchronous, local -----------------------------------------------------------

    def allow(self, server_id: Hashable, now: float) -> int:
        """May a call to `server_id` go out at `now`? 0: no (503); otherwise its ticket, for `release`.

        A server without a breaker (unknown, or disabled in its settings) is always allowed.
        """
        breaker = self._breakers.get(server_id)
        if breaker is None:
            return ADMITTED
        return breaker.allow(now)

    def record(self, server_id: Hashable, ok: bool, now: float) -> None:
        """Count the result of a call `allow` let through: `ok` False for a transport error, timeout or 5xx."""
        breaker = self._breakers.get(server_id)
        if breaker is not None and breaker.record(ok, now):
            self._transition(server_id, breaker, now)

    def release(self, server_id: Hashable, ticket: int) -> None:
        """A call let through with `ticket` ended without a result (cancelled): free its trial slot, if any."""
        breaker = self._breakers.get(server_id)
        if breaker is not None:
            breaker.release(ticket)

    def retry_after(self, server_id: Hashable, now: float) -> float:
        """Seconds from `now` until `server_id` may be called again (0.0: now), for Retry-After."""
        breaker = self._breakers.get(server_id)
        return 0.0 if breaker is None else breaker.retry_after(now)

    def available(self, server_id: Hashable, now: float) -> bool:
        """Whether `allow` would let a call through now, without taking a trial slot (for choosing a replica)."""
        return self.retry_after(server_id, now) == 0.0

    def state(self, server_id: Hashable) -> int:
        """CLOSED, OPEN or HALF_OPEN (gateway._fast.breaker); CLOSED for a server without a breaker."""
        breaker = self._breakers.get(server_id)
        return CLOSED if breaker is None else breaker.state

    def states(self) -> dict[Hashable, BreakerStatus]:
        """Every breaker's state and openings in a row, by server id (for metrics)."""
        return {s: BreakerStatus(b.state_name, b.opened_count) for s, b in self._breakers.items()}

    def breaker(self, server_id: Hashable) -> CircuitBreaker | None:
        """The breaker of `server_id` itself (None: it has none), for a caller that keeps it between
        calls to skip the lookups; valid until the next `configure`. A caller that `record`s on it
        directly passes a True answer on to `transition`."""
        return self._breakers.get(server_id)

    def transition(self, server_id: Hashable, breaker: CircuitBreaker, now: float) -> None:
        """`breaker` (from `breaker()`) just opened or closed: log it and share it."""
        self._transition(server_id, breaker, now)

    def _transition(self, server_id: Hashable, breaker: CircuitBreaker, now: float) -> None:
        if breaker.state == OPEN:
            log.warning(
                "circuit breaker of upstream %s opened for %.3g s (opening %d in a row)",
                server_id, breaker.open_until - now, breaker.opened_count,
            )
            transition = ("open", breaker.open_until, breaker.opened_count)
        else:
            log.warning("circuit breaker of upstream %s closed: its trial calls succeeded", server_id)
            transition = ("closed",)
        if self.redis is not None:
            self._pending[server_id] = transition
            self._wake.set()

    # -- the background tasks -----------------------------------------------------------------------

    async def start(self) -> None:
        """Read the shared records (bounded by a timeout), then share and reconcile in the background."""
        if self.redis is None:
            return
        await self._sync(reconcile=True)
        self._tasks = [
            asyncio.create_task(self._run(), name="breakers-sync"),
            asyncio.create_task(self._listen(), name="breakers-listen"),
        ]

    async def close(self) -> None:
        """Stop the background tasks, writing the transitions queued if Redis answers. The client stays open."""
        # The pub/sub read can swallow a cancellation (Python 3.11 wait_for, gh-86296): cancel_all insists.
        await cancel_all(self._tasks)
        self._tasks = []
        if self.redis is not None and self._pending and not self._redis_down:
            await self._sync(reconcile=False)

    async def _run(self) -> None:
        next_reconcile = self._clock() + self.reconcile_interval
        while True:
            wait = next_reconcile - self._clock()
            if wait > 0.0 and not self._wake.is_set():
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            now = self._clock()
            due = now >= next_reconcile
            if due:
                next_reconcile = now + self.reconcile_interval
            elif self._redis_down:
                continue  # while Redis is lost, try it once per interval, not once per transition
            reconcile = due or self._reconcile_soon
            self._reconcile_soon = False
            await self._sync(reconcile)

    async def _sync(self, reconcile: bool) -> None:
        """Write what is queued; read every record when asked to, or when Redis was lost until now."""
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                await self._flush()
                if reconcile or self._redis_down:
                    await self._reconcile()
            self._redis_back()
        except Exception as exc:  # noqa: BLE001 - keep deciding locally
            self._redis_failed(exc)

    async def _flush(self) -> None:
        for server_id, transition in list(self._pending.items()):
            key = self._key + str(server_id)
            if transition[0] == "open":
                ms = math.ceil((transition[1] - self._clock()) * 1000)
                if ms <= 0:  # over here while it waited (Redis was lost): nothing left to tell
                    if self._pending.get(server_id) is transition:
                        del self._pending[server_id]
                    continue
                answer = await self._open_script(
                    keys=[key], args=[ms, transition[2], self.channel, str(server_id), _KEEP_MS]
                )
            else:
                answer = await self._close_script(
                    keys=[key], args=[self._seen.get(server_id, 0), self.channel, str(server_id), _KEEP_MS]
                )
            v, state, ms, openings = _record(answer)
            if self._pending.get(server_id) is transition:
                del self._pending[server_id]
                self._apply(server_id, v, state, ms, openings)
            elif server_id in self._breakers:
                # A newer transition came meanwhile: it goes next, and knows this version.
                self._seen[server_id] = max(self._seen.get(server_id, 0), v)

    async def _reconcile(self) -> None:
        ids = list(self._breakers)
        if not ids:
            await self.redis.ping()  # nothing to read must still prove Redis answers
            return
        for i in range(0, len(ids), _BATCH):
            batch = ids[i : i + _BATCH]
            found = await self._read_script(keys=[self._key + str(server_id) for server_id in batch])
            for server_id, record in zip(batch, found, strict=True):
                if record:
                    self._apply(server_id, *_record(record))

    def _apply(self, server_id: Hashable, v: int, state: str, ms: int, openings: int) -> None:
        """Make the shared record `v` this process' state, if it is newer than what was applied here."""
        breaker = self._breakers.get(server_id)
        # A transition of this process not yet written is newer than any record: its answer decides.
        if breaker is None or server_id in self._pending or v <= self._seen.get(server_id, 0):
            return
        self._seen[server_id] = v
        now = self._clock()
        if state == "open":
            if breaker.state != OPEN and ms > 0:
                log.warning("circuit breaker of upstream %s opened by another process for %.3g s", server_id,
                            ms / 1000)
            breaker.force_open(now + ms / 1000, openings, now)
        elif breaker.state != CLOSED:
            log.warning("circuit breaker of upstream %s closed by another process", server_id)
            breaker.force_closed(now)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                # What was published while this process was not listening.
                self._reconcile_soon = True
                self._wake.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._hear(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reconcile keeps the breakers shared meanwhile
                self._redis_failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass

    def _hear(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            server_id = self._ids.get(event["server"])
            if server_id is not None:
                self._apply(server_id, int(event["v"]), str(event["state"]), int(event["ms"]),
                            int(event["openings"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignored a malformed message on %s: %s", self.channel, exc)

    def _redis_failed(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning("Redis is unreachable (%s): circuit breakers decide per process until it is back",
                        exc or type(exc).__name__)

    def _redis_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.warning("Redis answers again: circuit breakers are shared across processes again")


def _record(answer) -> tuple[int, str, int, int]:
    v, state, ms, openings = answer
    return int(v), state.decode() if isinstance(state, bytes) else str(state), int(ms), int(openings)
