# cython: annotation_typing=False, initializedcheck=False
# (Cython reads an `int` annotation as a Python int, which would clash with the
# C ints of fairness_c.pxd: the .pxd alone gives the compiled types. The arrays
# are always set in __init__, so the compiled reads skip that check.)
"""Deficit round robin (DRR): which flow's queued request is served next.

Owns the scheduling arithmetic of the tenant fairness scheduler and nothing
else: no queues of requests, no asyncio, no clock reads. A flow (a tenant) is a
small integer slot holding a weight, a deficit, how many requests it has queued
and the cost of the one at the head. The caller keeps the requests themselves
(limits/fairness.py) and reports each change at a head: `push`, `serve`,
`withdraw`.

The algorithm is Shreedhar and Varghese's DRR (SIGCOMM 1995): active flows
take turns in a ring; each turn adds `weight * quantum` to the flow's deficit,
and the flow's head is served while the deficit covers its cost. Served cost
therefore follows the weights, idle flows are skipped (their share goes to the
busy ones), and a flow that empties loses its deficit, so idling banks nothing.

This file is also the compiled module: `fairness_c.py` is a symlink to it and
`fairness_c.pxd` gives it C types, so keep it to float arithmetic on arrays.
"""

import array

_NO_FLOW = -1
# Bounds that make every turn move a deficit: an ineligible flow's deficit is
# below its head's cost (at most _MAX_COST), whose ulp is far below the
# smallest quantum (_MIN_WEIGHT * _MIN_QUANTUM), so `next_flow` always ends.
_MIN_WEIGHT = 1e-3
_MAX_WEIGHT = 1e6
_MIN_QUANTUM = 1e-3
_MAX_QUANTUM = 1e6
_MAX_COST = 1e6
_INITIAL_SLOTS = 8


def _check_weight(weight: float) -> None:
    # Ranges, so NaN and infinity are refused too.
    if not _MIN_WEIGHT <= weight <= _MAX_WEIGHT:
        raise ValueError(f"weight must be within [{_MIN_WEIGHT}, {_MAX_WEIGHT}], got {weight!r}")


def _check_cost(cost: float) -> None:
    # A NaN cost would never be covered: `next_flow` would spin forever.
    if not 0.0 <= cost <= _MAX_COST:
        raise ValueError(f"cost must be within [0, {_MAX_COST}], got {cost!r}")


class DeficitRoundRobin:
    """Deficit round robin over flows numbered by slot.

    `open_flow(weight)` gives a slot; `push(slot, cost)` queues a request on
    it; `next_flow()` names the slot whose head is served next; the caller
    then reports `serve(slot, next_cost)`, or `withdraw(slot, head_cost)` when
    a request leaves unserved (never charged). `close_flow` frees an empty slot
    for reuse, so memory follows the flows open, not every flow ever seen.
    """

    def __init__(self, quantum: float = 1.0) -> None:
        if not _MIN_QUANTUM <= quantum <= _MAX_QUANTUM:
            raise ValueError(f"quantum must be within [{_MIN_QUANTUM}, {_MAX_QUANTUM}], got {quantum!r}")
        self._quantum = float(quantum)
        self._capacity = 0
        self._open = 0
        self._free = _NO_FLOW
        self._head = _NO_FLOW
        self._active = 0
        self._granted = False
        # Per slot. A slot is open when its weight is positive; free slots are
        # chained through `_next`.
        self._weight = array.array("d")
        self._deficit = array.array("d")
        self._cost = array.array("d")
        self._queued = array.array("i")
        self._next = array.array("i")
        self._prev = array.array("i")
        self._grow(_INITIAL_SLOTS)

    @property
    def quantum(self) -> float:
        return self._quantum

    @property
    def active(self) -> int:
        """Flows with at least one request queued."""
        return self._active

    @property
    def open_flows(self) -> int:
        return self._open

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        weight = array.array("d", [0.0]) * capacity
        deficit = array.array("d", [0.0]) * capacity
        cost = array.array("d", [0.0]) * capacity
        queued = array.array("i", [0]) * capacity
        next_ = array.array("i", [0]) * capacity
        prev = array.array("i", [0]) * capacity
        for i in range(old):
            weight[i] = self._weight[i]
            deficit[i] = self._deficit[i]
            cost[i] = self._cost[i]
            queued[i] = self._queued[i]
            next_[i] = self._next[i]
            prev[i] = self._prev[i]
        # The new slots join the free chain, lowest first.
        for i in range(old, capacity - 1):
            next_[i] = i + 1
        next_[capacity - 1] = self._free
        self._free = old
        self._weight = weight
        self._deficit = deficit
        self._cost = cost
        self._queued = queued
        self._next = next_
        self._prev = prev
        self._capacity = capacity

    def _check_slot(self, slot: int) -> None:
        # Also what keeps the compiled module's unchecked array reads in bounds.
        if not (0 <= slot < self._capacity and self._weight[slot] > 0.0):
            raise ValueError(f"no open flow in slot {slot!r}")

    def open_flow(self, weight: float) -> int:
        """A new, empty flow with `weight`; returns its slot (the lowest free one)."""
        _check_weight(weight)
        if self._free == _NO_FLOW:
            self._grow(2 * self._capacity)
        slot = self._free
        self._free = self._next[slot]
        self._weight[slot] = weight
        self._deficit[slot] = 0.0
        self._cost[slot] = 0.0
        self._queued[slot] = 0
        self._open += 1
        return slot

    def close_flow(self, slot: int) -> None:
        """Free an empty flow's slot; the slot may be handed out again."""
        self._check_slot(slot)
        if self._queued[slot] != 0:
            raise ValueError(f"flow in slot {slot} still has {self._queued[slot]} queued")
        self._weight[slot] = 0.0
        self._next[slot] = self._free
        self._free = slot
        self._open -= 1

    def set_weight(self, slot: int, weight: float) -> None:
        """Change a flow's weight; it applies from the flow's next turn."""
        self._check_slot(slot)
        _check_weight(weight)
        self._weight[slot] = weight

    def weight(self, slot: int) -> float:
        self._check_slot(slot)
        return self._weight[slot]

    def deficit(self, slot: int) -> float:
        self._check_slot(slot)
        return self._deficit[slot]

    def queued(self, slot: int) -> int:
        self._check_slot(slot)
        return self._queued[slot]

    def head_cost(self, slot: int) -> float:
        """Cost of the request at the head of the flow's queue (0.0 when empty)."""
        self._check_slot(slot)
        return self._cost[slot]

    def push(self, slot: int, cost: float) -> None:
        """A request of `cost` joins the tail of the flow's queue.

        A flow that was empty becomes active and takes its first turn after
        every flow already active has had its turn.
        """
        self._check_slot(slot)
        _check_cost(cost)
        self._queued[slot] += 1
        if self._queued[slot] == 1:
            self._cost[slot] = cost
            self._activate(slot)

    def serve(self, slot: int, next_cost: float) -> None:
        """The flow's head was served: charge its cost; `next_cost` is the new head's.

        Meant for the slot `next_flow` named. A flow left empty leaves the ring
        and its deficit returns to 0.
        """
        self._check_slot(slot)
        _check_cost(next_cost)
        if self._queued[slot] == 0:
            raise ValueError(f"flow in slot {slot} has nothing queued to serve")
        self._deficit[slot] -= self._cost[slot]
        self._pop(slot, next_cost)

    def withdraw(self, slot: int, head_cost: float) -> None:
        """One of the flow's requests left unserved (cancelled, expired): no charge.

        `head_cost` is the cost at the head afterwards: the same as before
        unless the one that left was the head.
        """
        self._check_slot(slot)
        _check_cost(head_cost)
        if self._queued[slot] == 0:
            raise ValueError(f"flow in slot {slot} has nothing queued to withdraw")
        self._pop(slot, head_cost)

    def next_flow(self) -> int:
        """The slot whose head is served next, or -1 when nothing is queued.

        Advances the ring as DRR does and is stable: asked again before a
        `serve` or `withdraw`, it names the same slot and grants nothing more.
        """
        if self._active == 0:
            return _NO_FLOW
        slot = self._head
        if not self._granted:
            self._deficit[slot] += self._weight[slot] * self._quantum
            self._granted = True
        visits = 1
        while self._deficit[slot] < self._cost[slot]:
            if visits >= self._active:
                # A whole turn of the ring served nobody: skip the turns that
                # would serve nobody either, at once, instead of one by one.
                self._skip_turns()
                visits = 0
            slot = self._next[slot]
            self._head = slot
            self._deficit[slot] += self._weight[slot] * self._quantum
            visits += 1
        return slot

    def _skip_turns(self) -> None:
        # Every active flow has had its turn and none is served. The turns
        # needed before flow i is: ceil((cost - deficit) / (weight * quantum)),
        # at least 1; the least of them minus one are turns that serve nobody,
        # so they are added to every flow now. Exact for whole turns; `% 1.0`
        # is the same on both implementations (positive operands), unlike a
        # call to math.ceil, which the compiled module would make a Python call.
        fewest = -1.0
        slot = self._head
        for _ in range(self._active):
            turns = (self._cost[slot] - self._deficit[slot]) / (self._weight[slot] * self._quantum)
            if fewest < 0.0 or turns < fewest:
                fewest = turns
            slot = self._next[slot]
        fraction = fewest % 1.0
        skip = fewest - fraction if fraction > 0.0 else fewest - 1.0
        if skip >= 1.0:
            for _ in range(self._active):
                self._deficit[slot] += skip * (self._weight[slot] * self._quantum)
                slot = self._next[slot]

    def _pop(self, slot: int, head_cost: float) -> None:
        self._queued[slot] -= 1
        if self._queued[slot] == 0:
            self._cost[slot] = 0.0
            self._deactivate(slot)
        else:
            self._cost[slot] = head_cost

    def _activate(self, slot: int) -> None:
        # The ring is circular and doubly linked; the tail is the head's prev,
        # so a new flow goes last in the current turn of the ring.
        if self._active == 0:
            self._next[slot] = slot
            self._prev[slot] = slot
            self._head = slot
            self._granted = False
        else:
            tail = self._prev[self._head]
            self._next[tail] = slot
            self._prev[slot] = tail
            self._next[slot] = self._head
            self._prev[self._head] = slot
        self._active += 1

    def _deactivate(self, slot: int) -> None:
        # Idle flows bank nothing: DRR resets an emptied flow's deficit.
        self._deficit[slot] = 0.0
        self._active -= 1
        if self._active == 0:
            self._head = _NO_FLOW
            self._granted = False
            return
        following = self._next[slot]
        previous = self._prev[slot]
        self._next[previous] = following
        self._prev[following] = previous
        if slot == self._head:
            self._head = following
            self._granted = False
