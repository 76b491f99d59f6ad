"""Shared buckets (limits/shared.py) across processes on one real Redis.

Each `SharedBuckets` here stands for one gateway process (its own Redis
connection and process id); the load runs on one event loop, so the figures
are those of the synchronization, not of CPU contention.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from gateway.limits.shared import SharedBuckets
from tcp_relay import TcpRelay

pytestmark = pytest.mark.asyncio


async def _processes(url: str, prefix: str, count: int, **options) -> list[SharedBuckets]:
    groups = [SharedBuckets(redis.from_url(url), prefix, **options) for _ in range(count)]
    for group in groups:
        await group.start()
    for group in groups:
        await group._count_alive()  # each sees all of them alive before the load starts
    return groups


async def _stop(groups: list[SharedBuckets]) -> None:
    for group in groups:
        await group.stop()
        await group.redis.aclose()


async def _saturate(groups, capacity: float, rate: float, duration: float, weights=None) -> tuple[list[int], float]:
    """Every process tries far more than the limit for `duration`; returns admissions per process and the time."""
    admitted = [0] * len(groups)
    start = time.monotonic()

    async def drive(i: int) -> None:
        group = groups[i]
        tries = (weights or [20] * len(groups))[i]
        while time.monotonic() - start < duration:
            now = time.monotonic()
            bucket = group.bucket("global", capacity, rate, now)
            for _ in range(tries):
                if bucket.try_acquire(1.0, now):
                    admitted[i] += 1
            await asyncio.sleep(0.001)

    await asyncio.gather(*(drive(i) for i in range(len(groups))))
    return admitted, time.monotonic() - start


async def test_three_processes_admit_the_shared_limit_within_one_percent(redis_url, redis_prefix):
    groups = await _processes(redis_url, redis_prefix, 3)
    try:
        capacity, rate = 250.0, 250.0  # 15,000 a minute, a 1 s burst
        admitted, elapsed = await _saturate(groups, capacity, rate, 4.0, weights=[40, 20, 5])
    finally:
        await _stop(groups)
    allowed = capacity + rate * elapsed
    total = sum(admitted)
    error = (total - allowed) / allowed
    print(f"\n3 processes, uneven load {admitted}: admitted {total} of {allowed:.0f} allowed ({error:+.2%})")
    # Never more than the limit; a little less when a busy machine leaves a process unscheduled long
    # enough for its part to fill (about -0.7% on a quiet one).
    assert -0.02 < error < 0.01
    # The least loaded process still got its turn: shares follow use, not an even split.
    assert min(admitted) > 0


async def test_a_process_alone_on_a_bucket_gets_all_of_it(redis_url, redis_prefix):
    groups = await _processes(redis_url, redis_prefix, 3)
    try:
        assert groups[0].alive == 3
        now = time.monotonic()
        bucket = groups[0].bucket(("user", 1), 30.0, 0.001, now)
        # Before its first report a process holds a full part of capacity / processes alive.
        assert sum(bucket.try_acquire(1.0, now) for _ in range(30)) == 10
        await groups[0].sync()  # the bucket learns it is used here alone
        now = time.monotonic()
        assert bucket.n == 1
        assert sum(bucket.try_acquire(1.0, now) for _ in range(30)) == 20
    finally:
        await _stop(groups)


async def test_spend_is_charged_to_every_process(redis_url, redis_prefix):
    groups = await _processes(redis_url, redis_prefix, 2)
    try:
        now = time.monotonic()
        first = groups[0].bucket("k", 10.0, 0.001, now)
        second = groups[1].bucket("k", 10.0, 0.001, now)
        assert sum(first.try_acquire(1.0, now) for _ in range(5)) == 5
        await groups[0].sync()
        # A process reports only buckets it used since its last report: a refusal counts as use.
        assert not second.try_acquire(100.0, now)
        await groups[1].sync()  # both active now: the 5 left are split between them
        assert not first.try_acquire(100.0, now)
        await groups[0].sync()
        now = time.monotonic()
        assert first.n == second.n == 2
        together = sum(first.try_acquire(1.0, now) for _ in range(10)) + sum(
            second.try_acquire(1.0, now) for _ in range(10)
        )
        # 2.5 each: never more than the 5 left, whole requests only.
        assert 4 <= together <= 5
    finally:
        await _stop(groups)


async def test_redis_outage_falls_back_to_a_share_per_process_and_reconciles(redis_url, redis_prefix, caplog):
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    relays = [await TcpRelay(host, int(port)).start() for _ in range(3)]
    groups = [
        SharedBuckets(redis.from_url(f"redis://127.0.0.1:{relay.port}/0", socket_timeout=0.5), redis_prefix)
        for relay in relays
    ]
    for group in groups:
        await group.start()
    for group in groups:
        await group._count_alive()
    capacity, rate = 60.0, 150.0
    try:
        before, t1 = await _saturate(groups, capacity, rate, 1.5)
        for relay in relays:
            relay.cut()
        during, t2 = await _saturate(groups, capacity, rate, 1.5)
        assert all(group.redis_down for group in groups)
        assert "Redis is unreachable" in caplog.text
        for relay in relays:
            relay.restore()
        after, t3 = await _saturate(groups, capacity, rate, 2.5)
        assert not any(group.redis_down for group in groups)
    finally:
        await _stop(groups)
        for relay in relays:
            await relay.stop()
    total = sum(before) + sum(during) + sum(after)
    allowed = capacity + rate * (t1 + t2 + t3)
    error = (total - allowed) / allowed
    print(f"\nRedis cut for {t2:.1f} s of {t1 + t2 + t3:.1f}: admitted {total} of {allowed:.0f} allowed ({error:+.2%});"
          f" during the outage {sum(during)} for {capacity + rate * t2:.0f}")
    # During the outage each process admits its share (limit / 3): together about the limit.
    assert 0.8 * rate * t2 <= sum(during) <= capacity + 1.1 * rate * t2
    # What was admitted during the outage is reported when Redis is back, against a level that
    # refilled meanwhile: the deployment may fall short by up to one capacity, never exceed.
    # (On a busy machine a process left unscheduled also lets its part fill: a little less again.)
    assert allowed - capacity - 0.03 * allowed <= total <= allowed * 1.01


async def test_closed_policy_refuses_while_redis_is_unreachable(redis_url, redis_prefix):
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    relay = await TcpRelay(host, int(port)).start()
    group = SharedBuckets(redis.from_url(f"redis://127.0.0.1:{relay.port}/0", socket_timeout=0.5), redis_prefix,
                          down_policy="closed")
    await group.start()
    try:
        now = time.monotonic()
        bucket = group.bucket("k", 100.0, 10.0, now)
        assert bucket.try_acquire(1.0, now)
        relay.cut()
        await group.sync()
        assert group.closed
        assert not bucket.try_acquire(1.0, time.monotonic())
        assert bucket.retry_after(1.0, time.monotonic()) == 1.0
        relay.restore()
        await group.sync()
        assert not group.closed
        assert bucket.try_acquire(1.0, time.monotonic())
    finally:
        await group.stop()
        await group.redis.aclose()
        await relay.stop()


async def test_without_redis_one_process_owns_every_bucket():
    group = SharedBuckets(None)
    await group.start()
    now = time.monotonic()
    bucket = group.bucket("k", 5.0, 1.0, now)
    assert sum(bucket.try_acquire(1.0, now) for _ in range(10)) == 5
    assert bucket.retry_after(1.0, now) == pytest.approx(1.0)
    # New limits apply to the bucket already there.
    assert group.bucket("k", 8.0, 1.0, now) is bucket
    assert bucket.capacity == 8.0
    await group.stop()
