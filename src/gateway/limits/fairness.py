"""The fair queue: tenants wait their weighted turn for contended capacity.

When a capacity source (the global token bucket, later an upstream's
concurrency limit) cannot grant a request now, the request waits in its flow's
queue (a flow is a tenant) and one dispatcher task serves the queues by
deficit round robin (gateway._fast.fairness, compiled): each flow gets the
capacity in proportion to its weight, and what an idle flow does not use goes
to the busy ones. Only a full queue (`max_queue` per flow) or a missed
`deadline` is a refusal; a waiter whose client went away leaves its queue and
is never charged.

Owns the waiting, not the limits: a source is any object with the two
TokenBucket methods `try_acquire(cost, now)` and `retry_after(cost, now)` (and
optionally `refund(cost)`), so a Redis-synchronized bucket fits as is. Nothing
here polls: the dispatcher sleeps exactly as long as the source says, and runs
only while something is queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from gateway._fast.fairness import DeficitRoundRobin

log = logging.getLogger(__name__)

# The shortest sleep after a refusal: a source that refuses yet says no wait is
# needed, or a wait shorter than the event loop's timer resolution (uvloop:
# 1 ms), must not turn the dispatcher into a busy loop.
_MIN_SLEEP = 0.001
# Retry-After offered to waiters failed by close() or by a broken source.
_RETRY_AFTER_UNAVAILABLE = 1.0


class CapacitySource(Protocol):
    def try_acquire(self, cost: float, now: float) -> bool: ...

    def retry_after(self, cost: float, now: float) -> float: ...


class FairQueueRefusal(Exception):
    """A waiter was refused; `retry_after` is a hint in seconds (inf: waiting will not help)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(FairQueueRefusal):
    """The flow already has `max_queue` requests waiting (or `max_queue` is 0)."""


class DeadlineExceeded(FairQueueRefusal):
    """Not served within the deadline (or never servable: the cost exceeds the source)."""


class QueueClosed(FairQueueRefusal):
    """The queue was closed (shutting down)."""


class _Flow:
    __slots__ = ("key", "slot", "weight", "waiters")

    def __init__(self, key: Hashable, slot: int, weight: float) -> None:
        self.key = key
        self.slot = slot
        self.weight = weight
        self.waiters: deque[_Waiter] = deque()


class _Waiter:
    __slots__ = ("future", "cost", "flow", "source", "timer", "queued")

    def __init__(self, future: asyncio.Future, cost: float, flow: _Flow, source: CapacitySource) -> None:
        self.future = future
        self.cost = cost
        self.flow = flow
        self.source = source
        self.timer: asyncio.TimerHandle | None = None
        self.queued = True


def _check_settings(max_queue: int, deadline: float) -> None:
    if not (isinstance(max_queue, int) and max_queue >= 0):
        raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
    if not 0.0 < deadline < math.inf:
        raise ValueError(f"deadline must be positive and finite, got {deadline!r}")


class FairQueue:
    """Per-flow queues in front of a capacity source, served by weight.

    `source` is the default capacity source; `try_admit` and `wait` may name
    another per call (each waiter is charged to the source it came with).
    Weights may change from call to call. A flow with nothing queued is
    forgotten, so memory follows the flows waiting now.
    """

    def __init__(
        self,
        source: CapacitySource | None = None,
        *,
        max_queue: int,
        deadline: float,
        quantum: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_settings(max_queue, deadline)
        self._source = source
        self._max_queue = max_queue
        self._deadline = float(deadline)
        self._clock = clock
        self._drr = DeficitRoundRobin(quantum)
        self._flows: dict[Hashable, _Flow] = {}
        self._by_slot: list[_Flow | None] = []
        self._queued = 0
        self._closed = False
        self._dispatcher: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None
        self.waited_total = 0  # served after waiting
        self.refused_full = 0
        self.refused_deadline = 0
        self.cancelled_total = 0  # waiters whose client went away

    @property
    def queued(self) -> int:
        """Requests waiting now, over every flow."""
        return self._queued

    @property
    def flows(self) -> int:
        """Flows with something waiting now."""
        return len(self._flows)

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def closed(self) -> bool:
        return self._closed

    def reconfigure(self, max_queue: int, deadline: float) -> None:
        """New limits for requests that arrive from now on; waiters keep their deadline."""
        _check_settings(max_queue, deadline)
        self._max_queue = max_queue
        self._deadline = float(deadline)

    def try_admit(
        self, flow: Hashable, weight: float, cost: float, now: float, source: CapacitySource | None = None
    ) -> bool:
        """The fast path, no waiting: True when nobody is queued and the source grants `cost` now.

        `flow` and `weight` take no part while nobody waits; they are here so a
        caller passes the same arguments on to `wait` when this says False.
        """
        if self._queued or self._closed:
            # Someone is waiting: capacity is contended, so this request takes
            # its turn rather than overtake the queues.
            return False
        return self._source_of(source).try_acquire(cost, now)

    async def wait(self, flow: Hashable, weight: float, cost: float, source: CapacitySource | None = None) -> None:
        """Wait in `flow`'s queue until the dispatcher has taken `cost` from the source for it.

        Raises QueueFull, DeadlineExceeded or QueueClosed (each with a
        `retry_after` hint), or ValueError for a weight or cost out of range.
        Cancelled (the client went away), the request leaves the queue
        uncharged; if it was served in the same instant, the cost is refunded
        when the source has `refund`.
        """
        source = self._source_of(source)
        if self._closed:
            raise QueueClosed("the fair queue is closed", _RETRY_AFTER_UNAVAILABLE)
        state = self._flows.get(flow)
        if state is None:
            if self._max_queue == 0:
                self.refused_full += 1
                raise QueueFull("queueing is off", source.retry_after(cost, self._clock()))
            state = self._open(flow, weight)
        elif weight != state.weight:
            self._drr.set_weight(state.slot, weight)
            state.weight = weight
        loop = asyncio.get_running_loop()
        if len(state.waiters) >= self._max_queue:
            self.refused_full += 1
            raise QueueFull("this flow's queue is full", self._full_retry_after(state, source, cost, loop))
        try:
            self._drr.push(state.slot, cost)
        except ValueError:
            if not state.waiters:
                self._forget(state)
            raise
        waiter = _Waiter(loop.create_future(), cost, state, source)
        state.waiters.append(waiter)
        self._queued += 1
        waiter.timer = loop.call_later(self._deadline, self._expire, waiter)
        if self._dispatcher is None:
            self._dispatcher = loop.create_task(self._dispatch(loop), name="fair-queue-dispatcher")
        future = waiter.future
        try:
            await future
        except asyncio.CancelledError:
            if waiter.queued:
                self._remove(waiter)
            if future.cancelled():
                self.cancelled_total += 1
            elif future.exception() is None:
                # Served, and cancelled before it could run: give the cost back.
                self.cancelled_total += 1
                refund = getattr(waiter.source, "refund", None)
                if refund is not None:
                    refund(waiter.cost)
            raise

    def close(self) -> None:
        """Refuse every waiter with QueueClosed now, and every later `wait`."""
        self._closed = True
        for state in list(self._flows.values()):
            for waiter in list(state.waiters):
                self._remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(QueueClosed("the fair queue is closed", _RETRY_AFTER_UNAVAILABLE))
        self._wake()

    # -- internals ---------------------------------------------------------------------------------

    def _source_of(self, source: CapacitySource | None) -> CapacitySource:
        source = source if source is not None else self._source
        if source is None:
            raise TypeError("no capacity source: give one to FairQueue() or to this call")
        return source

    def _open(self, key: Hashable, weight: float) -> _Flow:
        slot = self._drr.open_flow(weight)
        state = self._flows[key] = _Flow(key, slot, weight)
        by_slot = self._by_slot
        if slot >= len(by_slot):
            by_slot.extend([None] * (slot + 1 - len(by_slot)))
        by_slot[slot] = state
        return state

    def _forget(self, state: _Flow) -> None:
        del self._flows[state.key]
        self._by_slot[state.slot] = None
        self._drr.close_flow(state.slot)

    def _full_retry_after(
        self, state: _Flow, source: CapacitySource, cost: float, loop: asyncio.AbstractEventLoop
    ) -> float:
        # A place opens when the oldest waiter is served, at the latest when
        # its deadline passes; never sooner than the source could grant `cost`.
        oldest = state.waiters[0].timer
        left = oldest.when() - loop.time() if oldest is not None else 0.0
        # min: the loop's clock arithmetic can leave a hair over the deadline itself.
        return max(source.retry_after(cost, self._clock()), min(left, self._deadline), 0.0)

    def _remove(self, waiter: _Waiter) -> None:
        """Take a waiter out of its queue unserved: nothing is charged."""
        state = waiter.flow
        waiters = state.waiters
        if waiters[0] is waiter:
            waiters.popleft()
        else:
            waiters.remove(waiter)
        waiter.queued = False
        waiter.timer.cancel()
        self._queued -= 1
        self._drr.withdraw(state.slot, waiters[0].cost if waiters else 0.0)
        if not waiters:
            self._forget(state)
        # The dispatcher may be sleeping for this waiter's tokens.
        self._wake()

    def _serve(self, waiter: _Waiter) -> None:
        state = waiter.flow
        waiters = state.waiters
        waiters.popleft()
        waiter.queued = False
        waiter.timer.cancel()
        self._queued -= 1
        self.waited_total += 1
        self._drr.serve(state.slot, waiters[0].cost if waiters else 0.0)
        if not waiters:
            self._forget(state)
        waiter.future.set_result(None)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.queued or waiter.future.done():
            return  # served, or cancelled: `wait` cleans up
        self._remove(waiter)
        self.refused_deadline += 1
        waiter.future.set_exception(
            DeadlineExceeded(f"not served within {self._deadline:g} s", self._deadline)
        )

    def wake(self) -> None:
        """The source has capacity again (a slot freed): the dispatcher tries at once instead of sleeping on."""
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        # A sleep `_wake` can end early.
        wakeup = self._wakeup = loop.create_future()
        timer = loop.call_later(delay, _resolve, wakeup)
        try:
            await wakeup
        finally:
            timer.cancel()
            self._wakeup = None

    async def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the queues while anything is queued, in DRR order; then end."""
        drr = self._drr
        by_slot = self._by_slot
        clock = self._clock
        try:
            while self._queued:
                state = by_slot[drr.next_flow()]
                waiter = state.waiters[0]
                if waiter.future.done():
                    # Cancelled; its task has not run yet to leave the queue.
                    self._remove(waiter)
                    continue
                source = waiter.source
                now = clock()
                if source.try_acquire(waiter.cost, now):
                    self._serve(waiter)
                    continue
                delay = source.retry_after(waiter.cost, now)
                if delay == math.inf:
                    # The cost exceeds what the source can ever hold.
                    self._remove(waiter)
                    self.refused_deadline += 1
                    waiter.future.set_exception(
                        DeadlineExceeded("the request costs more than the capacity can ever grant", math.inf)
                    )
                    continue
                # At least _MIN_SLEEP: uvloop's timers count whole milliseconds, so a shorter
                # sleep fires at once and the dispatcher would spin until the token arrives.
                await self._sleep(loop, max(delay, _MIN_SLEEP))
        except Exception as exc:
            # A broken source (say, Redis gone wrong) must not leave waiters
            # hanging until their deadlines: fail them now, and say why.
            log.exception("fair queue dispatcher failed; refusing every waiter")
            for state in list(self._flows.values()):
                for waiter in list(state.waiters):
                    self._remove(waiter)
                    if not waiter.future.done():
                        refusal = FairQueueRefusal("the capacity source failed", _RETRY_AFTER_UNAVAILABLE)
                        refusal.__cause__ = exc
                        waiter.future.set_exception(refusal)
        finally:
            self._dispatcher = None


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
