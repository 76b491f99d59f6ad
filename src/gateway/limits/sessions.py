"""At most `sessions.max_per_key` open sessions per API key, counted across every gateway process.

A session here is a 2025-era upstream session opened through
`/servers/{name}/mcp` (the client holds its sealed id) or a bridged SSE or
WebSocket connection. Sealed session ids carry their own state, so the
gateway does not otherwise know which sessions are alive; this module keeps
the count:

- A session is counted from the moment its `initialize` is admitted (a
  provisional entry, so concurrent initializes cannot overshoot the cap) to
  its `DELETE`, its upstream's 404, or `sessions.idle_timeout` seconds
  without a request, whichever comes first.
- With Redis: one sorted set per key (`<prefix>sessions:<key id>`), member =
  a digest of the session, score = last seen, on Redis' clock. Admission is
  one Lua script (drop the idle, count, add if there is room), so the cap
  holds across processes exactly. Being seen is written at most every
  `idle_timeout / 4` per session and process, off the request path.
- Without Redis (or while it is unreachable, logged once per outage): the
  same bookkeeping in this process, so the cap is per process.

The cap is checked when a session opens; a session that idled out and is then
used again is counted again without a check (refusing a session the client
already holds would break it mid-use).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid

log = logging.getLogger("gateway.sessions")

# Drop the idle, count, and add the member if there is room. Returns 1 (admitted) or 0.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 60)
return 1
"""
# Replace the provisional member by the session's own (ARGV[1] -> ARGV[2]), or refresh a member.
_SEEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
return 1
"""


class SessionCounter:
    def __init__(self, *, max_per_key: int, idle_timeout: float, redis=None, prefix: str = "gw:") -> None:
        self.max_per_key = max_per_key  # 0: no cap (nothing is counted)
        self.idle_timeout = idle_timeout
        self.redis = redis
        self.prefix = prefix
        self._local: dict[uuid.UUID, dict[str, float]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._last: asyncio.Task | None = None  # the Redis write asked for last (each waits for the one before)
        self._redis_down = False
        if redis is not None:
            self._admit = redis.register_script(_ADMIT)
            self._seen = redis.register_script(_SEEN)

    @property
    def enabled(self) -> bool:
        return self.max_per_key > 0

    # -- the interface ----------------------------------------------------------------------------
    async def admit(self, key_id: uuid.UUID) -> str | None:
        """Room for one more session of this key: a provisional ticket, or None when the key is at its cap."""
        ticket = "pending:" + secrets.token_hex(8)
        if self.redis is not None:
            try:
                admitted = await self._admit(keys=[self._key(key_id)], args=[self.idle_timeout, self.max_per_key, ticket])
                self._redis_back()
                return ticket if admitted else None
            except Exception as exc:  # noqa: BLE001 - any Redis failure: count here instead
                self._redis_failed(exc)
        sessions = self._live(key_id)
        if len(sessions) >= self.max_per_key:
            return None
        sessions[ticket] = time.monotonic()
        return ticket

    def opened(self, key_id: uuid.UUID, ticket: str, session: str) -> None:
        """The upstream gave the admitted session its id: count it under that id from now on."""
        self._touched[session] = time.monotonic()
        self._write(key_id, ticket, _member(session))

    def abandoned(self, key_id: uuid.UUID, ticket: str) -> None:
        """The admitted session never opened (initialize failed): give its place back."""
        self._remove(key_id, ticket)

    def seen(self, key_id: uuid.UUID, session: str) -> None:
        """A request of this session arrived: keep it counted (written at most every idle_timeout / 4)."""
        now = time.monotonic()
        last = self._touched.get(session)
        if last is not None and now - last < self.idle_timeout / 4:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[session] = now
        self._write(key_id, "", _member(session))

    def ended(self, key_id: uuid.UUID, session: str) -> None:
        self._touched.pop(session, None)
        self._remove(key_id, _member(session))

    async def count(self, key_id: uuid.UUID) -> int:
        """Sessions of this key now counted (for tests and the admin view)."""
        if self.redis is not None and not self._redis_down:
            key = self._key(key_id)
            now = (await self.redis.time())
            await self.redis.zremrangebyscore(key, "-inf", now[0] + now[1] / 1e6 - self.idle_timeout)
            return await self.redis.zcard(key)
        return len(self._live(key_id))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _key(self, key_id: uuid.UUID) -> str:
        return f"{self.prefix}sessions:{key_id}"

    def _live(self, key_id: uuid.UUID) -> dict[str, float]:
        sessions = self._local.setdefault(key_id, {})
        cutoff = time.monotonic() - self.idle_timeout
        for member in [m for m, seen in sessions.items() if seen < cutoff]:
            del sessions[member]
        return sessions

    def _write(self, key_id: uuid.UUID, replaced: str, member: str) -> None:
        sessions = self._local.get(key_id)
        if sessions is not None or self.redis is None or self._redis_down:
            sessions = self._live(key_id)
            sessions.pop(replaced, None)
            sessions[member] = time.monotonic()
        if self.redis is not None:
            self._spawn(self._seen(keys=[self._key(key_id)], args=[replaced, member, self.idle_timeout]))

    def _remove(self, key_id: uuid.UUID, member: str) -> None:
        sessions = self._local.get(key_id)
        if sessions is not None:
            sessions.pop(member, None)
        if self.redis is not None:
            self._spawn(self.redis.zrem(self._key(key_id), member))

    def _spawn(self, coro) -> None:
        # In the order they were asked for: a DELETE arriving at a process that had not seen its session
        # writes the session as seen, then removes it; run side by side on two of the pool's connections
        # the removal could land first and leave an ended session counted until it idles out.
        task = asyncio.ensure_future(self._after(self._last, coro))
        self._last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after(self, previous: asyncio.Task | None, coro) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # its outcome is its own (_quietly noted any failure)
        await self._quietly(coro)

    async def _quietly(self, coro) -> None:
        try:
            await coro
            self._redis_back()
        except Exception as exc:  # noqa: BLE001
            self._redis_failed(exc)

    def _redis_failed(self, exc: Exception) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning("Redis is unreachable (%s): session caps are counted per process until it is back", exc)

    def _redis_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("Redis is back: session caps are shared again")


def _member(session: str) -> str:
    # A digest, not the id: the count needs no session id, and Redis should not hold usable ones.
    return hashlib.blake2b(session.encode(), digest_size=16).hexdigest()
