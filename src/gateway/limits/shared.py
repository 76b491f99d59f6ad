"""Token buckets shared by every gateway process, decided locally.

A shared bucket holds `capacity` tokens and refills at `rate` per second for
the whole deployment. Each process keeps its part as a compiled TokenBucket of
capacity/n refilled at rate/n, where n is the number of processes using that
bucket, and decides every request on it alone: no network on the request path.

Every `sync_interval` (50 ms) a process reports what it admitted on each bucket
it touched since the last report: one Lua script per batch of buckets, on
Redis' clock. The script refills the shared level, takes the reported tokens
off it (down to -capacity: a debt the refill pays back), notes the process as
active on the bucket (active: reported within `active_window`), and answers
the level and n. The process then holds level/n, less what it admitted while
the answer was on its way.

Bounds, with n processes on one bucket (docs/architecture.md states them):
- Long run: every admitted token is reported and taken off the shared level,
  so over any period T the deployment admits at most capacity + rate*T plus a
  debt of at most one capacity, repaid before the level grows again.
- Between reports a process can spend only its own part (<= capacity/n, plus
  rate/n per second), so the parts of all processes never hold more than the
  level they were cut from, give or take what the others admitted in one sync
  interval and had not yet reported.
- A process that sees a bucket for the first time starts with a full part of
  capacity/N, N the processes alive, before its first report tells it better.

Redis unreachable (logged once per outage): policy "local" keeps each part as it
is, capacity/N and rate/N with N the processes last seen alive, so the
deployment still admits about the limit; unreported spend is kept and reported
when Redis answers again. Policy "closed" refuses every request a shared
bucket decides until Redis answers. Without Redis (the embedded default) the
one process owns every bucket whole.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Hashable

from gateway._fast.token_bucket import TokenBucket
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.limits")

# Report spend, count the active processes, answer {level, n} per bucket.
# KEYS: the buckets. ARGV: process id, active window, then capacity, rate, spent per bucket.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local me = 'p:' .. ARGV[1]
local window = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  local j = 3 + (i - 1) * 3
  local cap, rate, spent = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local fields = redis.call('HGETALL', KEYS[i])
  local level, at, n = cap, now, 1
  for k = 1, #fields, 2 do
    local f = fields[k]
    if f == 'level' then
      level = tonumber(fields[k + 1])
    elseif f == 'at' then
      at = tonumber(fields[k + 1])
    elseif f ~= me and string.sub(f, 1, 2) == 'p:' then
      if tonumber(fields[k + 1]) >= now - window then
        n = n + 1
      else
        redis.call('HDEL', KEYS[i], f)
      end
    end
  end
  if now > at then
    level = level + (now - at) * rate
  end
  if level > cap then
    level = cap
  end
  level = level - spent
  if level < -cap then
    level = -cap
  end
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', tostring(now), me, tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((2 * cap / rate + window + 10) * 1000))
  out[i] = {tostring(level), n}
end
return out
"""
# Note this process alive; answer how many are.
_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2000))
return redis.call('ZCARD', KEYS[1])
"""
# Buckets reported in one script call.
_BATCH = 500
# A bucket untouched this long is forgotten here (it is full again by then).
_FORGET_AFTER = 120.0
# A process not heard from this long is no longer counted alive.
_ALIVE_WINDOW = 5.0


class SharedBucket:
    """One process's part of a shared bucket: `try_acquire`, `retry_after` and `refund` as on a TokenBucket."""

    __slots__ = ("name", "capacity", "rate", "n", "local", "spent", "reported", "touched", "owner")

    def __init__(self, owner: SharedBuckets, name: str, capacity: float, rate: float, n: int, now: float) -> None:
        self.owner = owner
        self.name = name  # its Redis key, less the prefix
        self.capacity = capacity
        self.rate = rate
        self.n = n
        self.local = TokenBucket(capacity / n, rate / n, now)
        self.spent = 0.0  # admitted since the last report was sent
        self.reported = 0.0  # in the report on its way
        self.touched = now

    def try_acquire(self, cost: float, now: float) -> bool:
        owner = self.owner
        self.touched = now
        if owner.redis is not None:
            owner._dirty.add(self)
        if owner.closed:
            return False
        if self.local.try_acquire(cost, now):
            self.spent += cost
            return True
        return False

    def retry_after(self, cost: float, now: float) -> float:
        if self.owner.closed:
            return 1.0
        if cost > self.capacity:
            return math.inf
        wait = self.local.retry_after(cost, now)
        if wait == math.inf:
            # More than this process's part: the whole bucket's refill brings it within reach.
            return cost / self.rate if self.rate > 0 else math.inf
        return wait

    def refund(self, cost: float) -> None:
        """Give back what a later tier refused (never more than was taken since the last report)."""
        if cost > 0.0:
            self.local.refund(cost)
            self.spent = max(0.0, self.spent - cost)

    def remaining(self, now: float) -> float:
        return max(0.0, self.local.available(now))

    def _resize(self, capacity: float, rate: float, n: int, now: float) -> None:
        if (capacity, rate, n) != (self.capacity, self.rate, self.n):
            self.capacity, self.rate, self.n = capacity, rate, n
            self.local.reconfigure(capacity / n, rate / n, now)


class SharedBuckets:
    def __init__(
        self,
        redis=None,
        prefix: str = "gw:",
        *,
        sync_interval: float = 0.05,
        down_policy: str = "local",
        active_window: float = 1.0,
        clock=time.monotonic,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.sync_interval = sync_interval
        self.down_policy = down_policy
        self.active_window = active_window
        self.clock = clock
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._buckets: dict[Hashable, SharedBucket] = {}
        # Moves whenever a bucket is forgotten: a caller holding SharedBucket
        # objects across requests (limits/limiter.py) must look them up again.
        self.epoch = 0
        self._dirty: set[SharedBucket] = set()
        self._task: asyncio.Task | None = None
        # Processes alive, as last counted in Redis (1 until then, or without Redis).
        self.alive = 1
        self.redis_down = False
        # "closed" policy while Redis is unreachable: every shared decision refuses.
        self.closed = False
        self.syncs = 0
        self.sync_failures = 0
        if redis is not None:
            self._sync = redis.register_script(_SYNC)
            self._alive = redis.register_script(_ALIVE)

    def bucket(self, key: Hashable, capacity: float, rate: float, now: float) -> SharedBucket:
        """The bucket `key` (a string or a tuple), made or brought to these limits.

        Its Redis key is `<prefix>rl:` and the key's parts joined by ":", made
        only when the bucket is, not on every decision.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if self.redis is None and len(self._buckets) >= 4096:
                self._forget_idle(now)  # with Redis, each synchronization does this
            name = ":".join(map(str, key)) if isinstance(key, tuple) else str(key)
            bucket = self._buckets[key] = SharedBucket(self, name, capacity, rate, self.alive, now)
        elif bucket.capacity != capacity or bucket.rate != rate:
            bucket._resize(capacity, rate, bucket.n, now)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)

    # -- synchronization --------------------------------------------------------------------------

    async def start(self) -> None:
        if self.redis is not None and self._task is None:
            await self._count_alive()
            self._task = asyncio.create_task(self._run(), name="shared-buckets")

    async def stop(self) -> None:
        """Stop synchronizing, after reporting what was admitted since the last report."""
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
            await self.sync()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_alive = loop.time()
        while True:
            await asyncio.sleep(self.sync_interval)
            if loop.time() >= next_alive:
                next_alive = loop.time() + 1.0
                await self._count_alive()
            await self.sync()

    async def _count_alive(self) -> None:
        try:
            alive = int(await self._alive(keys=[f"{self.prefix}rl-processes"], args=[self.process_id, _ALIVE_WINDOW]))
        except Exception as exc:  # noqa: BLE001 - any failure to reach Redis is an outage here
            self._down(exc)
            return
        if alive != self.alive:
            self.alive = max(1, alive)
            if self.redis_down:
                self._apply_down_policy()

    async def sync(self) -> None:
        """Report spend on every bucket touched since the last report; take each one's new part."""
        if self.redis is None:
            return
        now = self.clock()
        dirty = list(self._dirty)
        self._dirty.clear()
        self._forget_idle(now)
        for start in range(0, len(dirty), _BATCH):
            batch = dirty[start : start + _BATCH]
            keys: list[str] = []
            args: list = [self.process_id, self.active_window]
            for bucket in batch:
                bucket.reported, bucket.spent = bucket.spent, 0.0
                keys.append(f"{self.prefix}rl:{bucket.name}")
                args += (repr(bucket.capacity), repr(bucket.rate), repr(bucket.reported))
            try:
                answers = await self._sync(keys=keys, args=args)
            except Exception as exc:  # noqa: BLE001
                for bucket in batch:
                    bucket.spent += bucket.reported  # reported when Redis answers again
                    bucket.reported = 0.0
                    self._dirty.add(bucket)
                self._down(exc)
                return
            now = self.clock()
            for bucket, (level, n) in zip(batch, answers, strict=True):
                bucket.reported = 0.0
                bucket._resize(bucket.capacity, bucket.rate, max(1, int(n)), now)
                # What was admitted while the answer was on its way is not in `level` yet.
                bucket.local.set_available(float(level) / bucket.n - bucket.spent, now)
        self.syncs += 1
        if self.redis_down:
            self.redis_down = self.closed = False
            log.warning("Redis answers again: shared limits are synchronized across processes again")

    def _down(self, exc: BaseException) -> None:
        self.sync_failures += 1
        if not self.redis_down:
            self.redis_down = True
            log.warning(
                "Redis is unreachable (%s): limits are decided %s until it answers", exc,
                f"per process (each admits 1/{self.alive} of every shared limit)" if self.down_policy == "local"
                else "closed (every request a shared limit decides is refused)",
            )
            self._apply_down_policy()

    def _apply_down_policy(self) -> None:
        if self.down_policy == "closed":
            self.closed = True
            return
        now = self.clock()
        for bucket in self._buckets.values():
            bucket._resize(bucket.capacity, bucket.rate, self.alive, now)

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) < 1024:
            return
        for key, bucket in list(self._buckets.items()):
            # With Redis, spend not yet reported keeps a bucket; without, nothing is ever reported.
            unreported = self.redis is not None and (bucket.spent != 0.0 or bucket in self._dirty)
            if now - bucket.touched > _FORGET_AFTER and not unreported:
                del self._buckets[key]
                self.epoch += 1
