"""The fair queue in front of a real token bucket: shares, refusals, cancellation, shutdown.

The source is the gateway's own TokenBucket, wrapped in a ledger that counts
what it granted and how often it was asked, so "never charged" and "never
polls" are counts, not timings. The share tests run real clients against a
600 tokens/s bucket for a few seconds and print Jain's fairness index of each
flow's goodput over its weighted fair share.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest

from gateway._fast.token_bucket import TokenBucket
from gateway.limits.fairness import DeadlineExceeded, FairQueue, FairQueueRefusal, QueueClosed, QueueFull

RATE = 600.0  # tokens/s for the share tests: ~2 s of real time each


class Ledger:
    """A real token bucket that also keeps account of grants, refunds and questions."""

    def __init__(self, capacity: float, rate: float, *, drained: bool = False) -> None:
        self.bucket = TokenBucket(capacity, rate, time.monotonic())
        if drained:
            assert self.bucket.try_acquire(capacity, time.monotonic())
        self.granted = 0.0
        self.refunded = 0.0
        self.asks = 0
        self.on_grant = None

    def try_acquire(self, cost: float, now: float) -> bool:
        self.asks += 1
        if self.bucket.try_acquire(cost, now):
            self.granted += cost
            if self.on_grant is not None:
                self.on_grant()
            return True
        return False

    def retry_after(self, cost: float, now: float) -> float:
        return self.bucket.retry_after(cost, now)

    def refund(self, cost: float) -> None:
        self.refunded += cost
        self.bucket.refund(cost)


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1.0 when all are equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


async def settle() -> None:
    """Let every ready callback and task run (waiters queue, cancellations land)."""
    for _ in range(5):
        await asyncio.sleep(0)


def dispatchers() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "fair-queue-dispatcher"]


async def saturate(fq: FairQueue, flow: uuid.UUID, weight: float, served: dict, clients: int = 8) -> list[asyncio.Task]:
    """`clients` tasks that each send one request after another, for ever."""

    async def client() -> None:
        while True:
            if not fq.try_admit(flow, weight, 1.0, time.monotonic()):
                await fq.wait(flow, weight, 1.0)
            served[flow] += 1
            await asyncio.sleep(0)

    return [asyncio.create_task(client()) for _ in range(clients)]


async def stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results


# --- shares ---------------------------------------------------------------------------------------


async def test_saturating_flows_share_by_weight():
    source = Ledger(10.0, RATE)
    fq = FairQueue(source, max_queue=16, deadline=10.0)
    weights = {uuid.uuid4(): w for w in (1.0, 2.0, 3.0)}
    served = dict.fromkeys(weights, 0)
    tasks = [t for flow, w in weights.items() for t in await saturate(fq, flow, w, served)]
    await asyncio.sleep(0.5)  # past the initial burst
    before, started = dict(served), time.monotonic()
    await asyncio.sleep(2.0)
    after, elapsed = dict(served), time.monotonic() - started
    await stop(tasks)

    goodput = {flow: (after[flow] - before[flow]) / elapsed for flow in weights}
    total = sum(goodput.values())
    total_weight = sum(weights.values())
    ratios = [goodput[flow] / (total * weights[flow] / total_weight) for flow in weights]
    index = jain(ratios)
    print(
        f"\nweights 1:2:3 at {RATE:g} tokens/s over {elapsed:.2f} s: goodput "
        + ", ".join(f"{goodput[f]:.1f}/s" for f in weights)
        + f" (total {total:.1f}/s); goodput/fair share {[round(r, 4) for r in ratios]}; Jain's index {index:.5f}"
    )
    assert index >= 0.99
    assert fq.refused_full == fq.refused_deadline == 0
    assert fq.waited_total > 0.9 * RATE * 2.0  # contended: nearly every request waited its turn
    assert (fq.queued, fq.flows) == (0, 0)
    await settle()
    assert dispatchers() == []


async def test_an_idle_flow_that_wakes_gets_its_share_within_a_second():
    source = Ledger(10.0, RATE)
    fq = FairQueue(source, max_queue=16, deadline=10.0)
    busy = {uuid.uuid4(): 1.0, uuid.uuid4(): 2.0}
    late, late_weight = uuid.uuid4(), 3.0
    served = dict.fromkeys([*busy, late], 0)
    tasks = [t for flow, w in busy.items() for t in await saturate(fq, flow, w, served)]
    await asyncio.sleep(0.5)  # the busy flows have taken everything
    before = dict(served)
    tasks += await saturate(fq, late, late_weight, served)
    await asyncio.sleep(1.0)
    first_second = {flow: served[flow] - before[flow] for flow in served}
    await stop(tasks)

    share = late_weight / (late_weight + sum(busy.values()))
    got = first_second[late] / sum(first_second.values())
    print(f"\nthe waking flow (weight 3 of 6): {got:.3f} of its first second, fair share {share:.3f}")
    assert got >= 0.9 * share


# --- refusals -------------------------------------------------------------------------------------


async def test_fast_path_admits_only_while_nobody_waits():
    source = Ledger(5.0, 100.0)
    fq = FairQueue(source, max_queue=4, deadline=5.0)
    a, b = uuid.uuid4(), uuid.uuid4()
    now = time.monotonic()
    assert all(fq.try_admit(a, 1.0, 1.0, now) for _ in range(5))
    assert not fq.try_admit(a, 1.0, 1.0, now)
    waiter = asyncio.create_task(fq.wait(a, 1.0, 5.0))  # 50 ms of tokens
    await asyncio.sleep(0.02)
    now = time.monotonic()
    assert source.bucket.available(now) >= 1.0
    assert not fq.try_admit(b, 1.0, 1.0, now)  # someone waits: take a turn, do not overtake
    assert fq.queued == 1
    await waiter
    assert (fq.queued, fq.waited_total, source.granted) == (0, 1, 10.0)


async def test_max_queue_zero_never_waits():
    source = Ledger(1.0, 4.0, drained=True)
    fq = FairQueue(source, max_queue=0, deadline=5.0)
    with pytest.raises(QueueFull) as refused:
        await fq.wait(uuid.uuid4(), 1.0, 1.0)
    assert 0.0 < refused.value.retry_after <= 0.25
    assert (fq.refused_full, fq.queued, fq.flows) == (1, 0, 0)


async def test_a_full_queue_refuses_that_flow_only():
    source = Ledger(1.0, 1.0, drained=True)
    fq = FairQueue(source, max_queue=2, deadline=3.0)
    a, b = uuid.uuid4(), uuid.uuid4()
    waiting = [asyncio.create_task(fq.wait(a, 1.0, 1.0)) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as refused:
        await fq.wait(a, 1.0, 1.0)
    # A place opens when the oldest is served, at the latest at its deadline.
    assert 0.0 < refused.value.retry_after <= 3.0
    waiting.append(asyncio.create_task(fq.wait(b, 1.0, 1.0)))  # b has its own queue
    await settle()
    assert (fq.queued, fq.flows, fq.refused_full) == (3, 2, 1)
    fq.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, QueueClosed) for r in results), results


async def test_a_missed_deadline_is_refused_and_charges_nothing():
    source = Ledger(1.0, 0.5, drained=True)  # the next token in 2 s
    fq = FairQueue(source, max_queue=4, deadline=0.05)
    with pytest.raises(DeadlineExceeded) as refused:
        await fq.wait(uuid.uuid4(), 1.0, 1.0)
    assert refused.value.retry_after == 0.05
    assert (fq.refused_deadline, fq.queued, fq.flows, source.granted) == (1, 0, 0, 0.0)
    await settle()
    assert dispatchers() == []


async def test_a_cost_beyond_the_capacity_is_refused_at_once():
    source = Ledger(2.0, 100.0)
    fq = FairQueue(source, max_queue=4, deadline=30.0)
    a = uuid.uuid4()
    assert not fq.try_admit(a, 1.0, 5.0, time.monotonic())
    with pytest.raises(DeadlineExceeded) as refused:
        await asyncio.wait_for(fq.wait(a, 1.0, 5.0), 5.0)
    assert refused.value.retry_after == math.inf
    assert (fq.queued, fq.flows, source.granted) == (0, 0, 0.0)


async def test_bad_weight_or_cost_is_refused_without_leaving_a_flow():
    fq = FairQueue(Ledger(1.0, 1.0, drained=True), max_queue=4, deadline=1.0)
    for weight, cost in ((0.0, 1.0), (math.nan, 1.0), (1.0, math.nan), (1.0, -1.0)):
        with pytest.raises(ValueError):
            await fq.wait(uuid.uuid4(), weight, cost)
    assert (fq.queued, fq.flows) == (0, 0)


# --- cancellation ---------------------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_and_is_never_charged():
    source = Ledger(1.0, 20.0, drained=True)
    fq = FairQueue(source, max_queue=4, deadline=5.0)
    gone = asyncio.create_task(fq.wait(uuid.uuid4(), 1.0, 1.0))
    stays = asyncio.create_task(fq.wait(uuid.uuid4(), 1.0, 1.0))
    await settle()
    assert fq.queued == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await stays
    await asyncio.sleep(0.2)  # time for a wrongly kept waiter to be served
    assert (source.granted, fq.waited_total, fq.cancelled_total) == (1.0, 1, 1)
    assert (fq.queued, fq.flows) == (0, 0)
    await settle()
    assert dispatchers() == []


async def test_cancelling_the_waiter_the_dispatcher_sleeps_for_wakes_it():
    source = Ledger(100.0, 20.0, drained=True)
    fq = FairQueue(source, max_queue=4, deadline=30.0)
    big = asyncio.create_task(fq.wait(uuid.uuid4(), 1.0, 100.0))  # 5 s of tokens
    await settle()
    small = asyncio.create_task(fq.wait(uuid.uuid4(), 1.0, 1.0))
    await settle()
    big.cancel()
    await asyncio.wait_for(small, 2.0)  # not after the 5 s the big one needed
    assert big.cancelled()
    assert (source.granted, fq.cancelled_total, fq.queued) == (1.0, 1, 0)


async def test_served_in_the_instant_of_cancellation_is_refunded():
    source = Ledger(1.0, 20.0, drained=True)
    fq = FairQueue(source, max_queue=4, deadline=5.0)
    waiter = asyncio.create_task(fq.wait(uuid.uuid4(), 1.0, 1.0))
    # Cancelled after the grant, before the waiter runs: the client is gone.
    source.on_grant = lambda: asyncio.get_running_loop().call_soon(waiter.cancel)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (source.granted, source.refunded, fq.waited_total, fq.cancelled_total) == (1.0, 1.0, 1, 1)
    assert (fq.queued, fq.flows) == (0, 0)


# --- the dispatcher -------------------------------------------------------------------------------


async def test_the_dispatcher_sleeps_as_long_as_the_source_says():
    source = Ledger(5.0, 10.0, drained=True)
    fq = FairQueue(source, max_queue=4, deadline=5.0)
    await fq.wait(uuid.uuid4(), 1.0, 5.0)  # half a second of tokens
    # One refusal, one sleep of retry_after, one grant (a timer that fires an
    # instant early may cost one more question, a loaded machine a few): never
    # a poll, which would ask hundreds of times in half a second.
    assert source.asks <= 8, source.asks
    assert source.granted == 5.0


async def test_a_broken_source_fails_the_waiters_promptly():
    class Broken:
        def try_acquire(self, cost: float, now: float) -> bool:
            raise ConnectionError("the shared limiter is unreachable")

        def retry_after(self, cost: float, now: float) -> float:
            return 1.0

    fq = FairQueue(Broken(), max_queue=4, deadline=30.0)
    waiting = [asyncio.create_task(fq.wait(uuid.uuid4(), 1.0, 1.0)) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5.0)
    assert all(type(r) is FairQueueRefusal and isinstance(r.__cause__, ConnectionError) for r in results)
    assert (fq.queued, fq.flows) == (0, 0)


async def test_close_fails_every_waiter_promptly():
    source = Ledger(1.0, 0.1, drained=True)
    fq = FairQueue(source, max_queue=4, deadline=30.0)
    flows = [uuid.uuid4() for _ in range(3)]
    waiting = [asyncio.create_task(fq.wait(flow, 1.0, 1.0)) for flow in flows for _ in range(3)]
    await settle()
    assert fq.queued == 9
    fq.close()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1.0)
    assert all(isinstance(r, QueueClosed) for r in results), results
    assert (fq.queued, fq.flows, fq.closed, source.granted) == (0, 0, True, 0.0)
    assert not fq.try_admit(flows[0], 1.0, 1.0, time.monotonic())
    with pytest.raises(QueueClosed):
        await fq.wait(flows[0], 1.0, 1.0)
    await settle()
    assert dispatchers() == []


async def test_many_flows_are_forgotten_once_served():
    source = Ledger(1.0, 2000.0, drained=True)
    fq = FairQueue(source, max_queue=4, deadline=10.0)
    await asyncio.gather(*(fq.wait(uuid.uuid4(), 1.0 + i % 5, 1.0) for i in range(300)))
    assert (fq.waited_total, fq.queued, fq.flows, fq._drr.open_flows) == (300, 0, 0, 0)


async def test_reconfigure_applies_to_new_arrivals():
    source = Ledger(1.0, 1.0, drained=True)
    fq = FairQueue(source, max_queue=1, deadline=5.0)
    a = uuid.uuid4()
    first = asyncio.create_task(fq.wait(a, 1.0, 1.0))
    await settle()
    with pytest.raises(QueueFull):
        await fq.wait(a, 1.0, 1.0)
    fq.reconfigure(2, 0.05)
    assert (fq.max_queue, fq.deadline) == (2, 0.05)
    with pytest.raises(DeadlineExceeded):
        await fq.wait(a, 2.0, 1.0)  # queued this time, with the new deadline
    for max_queue, deadline in ((-1, 1.0), (1.5, 1.0), (1, 0.0), (1, math.inf), (1, math.nan)):
        with pytest.raises(ValueError):
            fq.reconfigure(max_queue, deadline)
    fq.close()
    with pytest.raises(QueueClosed):
        await first


async def test_the_source_may_come_with_each_call():
    # How the limiter uses it: the shared global bucket is looked up per request.
    fq = FairQueue(max_queue=4, deadline=5.0)
    source = Ledger(1.0, 50.0)
    a = uuid.uuid4()
    assert fq.try_admit(a, 1.0, 1.0, time.monotonic(), source)
    await fq.wait(a, 1.0, 1.0, source)
    assert source.granted == 2.0
    with pytest.raises(TypeError):
        await fq.wait(a, 1.0, 1.0)
