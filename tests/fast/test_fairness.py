"""Deficit round robin, the same for the compiled module and its twin.

Examples pin the order of service and the bookkeeping; Hypothesis checks the
DRR fairness bound, agreement with a plain step-by-step DRR written here, and
that both implementations decide identically on the same operations.
"""

import importlib
import itertools
import math
import os
import pathlib
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._fast import is_extension_module

NO_EXTENSIONS = os.environ.get("GATEWAY_NO_EXTENSIONS") == "1"


# The fixture pattern of conftest.py: the compiled parameter fails, never
# skips, unless GATEWAY_NO_EXTENSIONS=1 says the build was skipped on purpose.
@pytest.fixture(scope="session")
def compiled_drr() -> type:
    module = importlib.import_module("gateway._fast.fairness_c")
    if not is_extension_module(module):
        reason = f"gateway._fast.fairness_c loaded from source {module.__file__}: the extension is not built"
        if NO_EXTENSIONS:
            pytest.skip(f"{reason} (GATEWAY_NO_EXTENSIONS=1)")
        pytest.fail(reason, pytrace=False)
    return module.DeficitRoundRobin


@pytest.fixture(scope="session")
def python_drr() -> type:
    return importlib.import_module("gateway._fast.fairness_py").DeficitRoundRobin


@pytest.fixture(scope="session", params=["compiled", "python"])
def drr_impl(request: pytest.FixtureRequest) -> type:
    return request.getfixturevalue(f"{request.param}_drr")


def backlogged(drr, weights, depth=1000, cost=1.0):
    slots = [drr.open_flow(w) for w in weights]
    for slot in slots:
        for _ in range(depth):
            drr.push(slot, cost)
    return slots


def serve_next(drr, cost=1.0) -> int:
    slot = drr.next_flow()
    drr.serve(slot, cost)
    return slot


# --- selection ---------------------------------------------------------------


def test_selector_loads_the_compiled_module_unless_told_not_to():
    fairness = importlib.import_module("gateway._fast.fairness")
    assert fairness.COMPILED is not NO_EXTENSIONS
    assert fairness.DeficitRoundRobin is fairness.implementation.DeficitRoundRobin


def test_compiled_source_is_a_relative_symlink_to_the_twin():
    source = pathlib.Path(__file__).resolve().parents[2] / "src" / "gateway" / "_fast" / "fairness_c.py"
    assert os.readlink(source) == "fairness_py.py"


# --- behaviour ---------------------------------------------------------------


def test_nothing_queued_means_no_flow(drr_impl):
    drr = drr_impl()
    assert drr.next_flow() == -1
    slot = drr.open_flow(1.0)
    assert drr.next_flow() == -1
    assert (drr.active, drr.open_flows, drr.queued(slot)) == (0, 1, 0)


def test_unit_costs_are_served_in_weight_proportion_every_turn(drr_impl):
    drr = drr_impl()
    backlogged(drr, [1.0, 2.0, 3.0])
    order = [serve_next(drr) for _ in range(24)]
    assert order == [0, 1, 1, 2, 2, 2] * 4


def test_quantum_scales_the_turn(drr_impl):
    drr = drr_impl(quantum=2.0)
    assert drr.quantum == 2.0
    backlogged(drr, [1.0, 1.5])
    assert [serve_next(drr) for _ in range(10)] == [0, 0, 1, 1, 1] * 2


def test_next_flow_is_stable_until_served(drr_impl):
    drr = drr_impl()
    a, b = backlogged(drr, [1.0, 1.0], depth=3)
    assert drr.next_flow() == a
    assert drr.next_flow() == a
    assert drr.deficit(a) == 1.0  # one quantum, not two
    drr.serve(a, 1.0)
    assert drr.deficit(a) == 0.0
    assert drr.next_flow() == b


def test_a_costly_head_waits_for_enough_turns(drr_impl):
    drr = drr_impl()
    a = drr.open_flow(1.0)
    b = drr.open_flow(1.0)
    drr.push(a, 3.0)
    for _ in range(10):
        drr.push(b, 1.0)
    # a needs three turns of one quantum each; b is served once per turn.
    order = [serve_next(drr) for _ in range(4)]
    assert order == [b, b, a, b]
    assert drr.queued(a) == 0
    assert drr.deficit(a) == 0.0


def test_an_emptied_flow_banks_nothing(drr_impl):
    drr = drr_impl()
    a = drr.open_flow(1.0)
    b = drr.open_flow(1.0)
    drr.push(a, 0.25)
    assert serve_next(drr, 0.0) == a
    # 0.75 of a's quantum was left when it emptied: reset, not kept.
    assert drr.deficit(a) == 0.0
    assert drr.active == 0
    for _ in range(3):
        drr.push(b, 1.0)
    drr.push(a, 1.0)
    drr.push(a, 1.0)
    assert [serve_next(drr) for _ in range(5)] == [b, a, b, a, b]


def test_a_waking_flow_takes_its_turn_after_the_active_ones(drr_impl):
    drr = drr_impl()
    a, b = backlogged(drr, [1.0, 1.0])
    c = drr.open_flow(1.0)
    assert serve_next(drr) == a
    drr.push(c, 1.0)
    assert [serve_next(drr) for _ in range(4)] == [b, c, a, b]


def test_withdraw_charges_nothing(drr_impl):
    drr = drr_impl()
    a = drr.open_flow(1.0)
    drr.push(a, 2.0)
    drr.push(a, 1.0)
    drr.push(a, 5.0)
    assert drr.next_flow() == a  # two turns: deficit 2.0 covers the head
    deficit = drr.deficit(a)
    assert deficit == 2.0
    drr.withdraw(a, 2.0)  # the tail left: head unchanged
    assert (drr.queued(a), drr.head_cost(a), drr.deficit(a)) == (2, 2.0, deficit)
    drr.withdraw(a, 1.0)  # the head left: the next one is at the head
    assert (drr.queued(a), drr.head_cost(a), drr.deficit(a)) == (1, 1.0, deficit)
    drr.withdraw(a, 0.0)
    assert (drr.queued(a), drr.deficit(a), drr.active) == (0, 0.0, 0)


def test_weight_changes_apply_from_the_next_turn(drr_impl):
    drr = drr_impl()
    a, b = backlogged(drr, [1.0, 1.0])
    assert [serve_next(drr) for _ in range(2)] == [a, b]
    drr.set_weight(b, 3.0)
    assert drr.weight(b) == 3.0
    assert [serve_next(drr) for _ in range(8)] == [a, b, b, b, a, b, b, b]


def test_slots_are_reused_lowest_first_and_grow(drr_impl):
    drr = drr_impl()
    slots = [drr.open_flow(1.0) for _ in range(100)]
    assert slots == list(range(100))
    drr.close_flow(7)
    drr.close_flow(3)
    assert drr.open_flows == 98
    assert {drr.open_flow(2.0), drr.open_flow(2.0)} == {3, 7}
    for slot in slots:
        drr.push(slot, 1.0)
    served = sorted(serve_next(drr, 0.0) for _ in range(100))
    assert served == slots
    assert drr.active == 0


def test_close_refuses_a_flow_with_requests(drr_impl):
    drr = drr_impl()
    a = drr.open_flow(1.0)
    drr.push(a, 1.0)
    with pytest.raises(ValueError):
        drr.close_flow(a)
    serve_next(drr, 0.0)
    drr.close_flow(a)
    with pytest.raises(ValueError):
        drr.push(a, 1.0)  # closed
    with pytest.raises(ValueError):
        drr.close_flow(a)


@pytest.mark.parametrize("slot", [-1, 8, 1000, 2**31 - 1])
def test_bad_slots_are_refused(drr_impl, slot):
    drr = drr_impl()
    drr.open_flow(1.0)
    for call in (drr.push, drr.serve, drr.withdraw, drr.set_weight):
        with pytest.raises(ValueError):
            call(slot, 1.0)
    for call in (drr.close_flow, drr.weight, drr.deficit, drr.queued, drr.head_cost):
        with pytest.raises(ValueError):
            call(slot)


@pytest.mark.parametrize("weight", [0.0, -1.0, 1e-4, 2e6, math.nan, math.inf])
def test_bad_weights_are_refused(drr_impl, weight):
    drr = drr_impl()
    with pytest.raises(ValueError):
        drr.open_flow(weight)
    slot = drr.open_flow(1.0)
    with pytest.raises(ValueError):
        drr.set_weight(slot, weight)
    assert drr.weight(slot) == 1.0


@pytest.mark.parametrize("cost", [-1.0, 2e6, math.nan, math.inf])
def test_bad_costs_are_refused(drr_impl, cost):
    drr = drr_impl()
    slot = drr.open_flow(1.0)
    with pytest.raises(ValueError):
        drr.push(slot, cost)
    assert drr.queued(slot) == 0
    drr.push(slot, 1.0)
    drr.push(slot, 1.0)
    for call in (drr.serve, drr.withdraw):
        with pytest.raises(ValueError):
            call(slot, cost)
    assert drr.queued(slot) == 2


@pytest.mark.parametrize("quantum", [0.0, -1.0, 1e-4, 2e6, math.nan, math.inf])
def test_bad_quantum_is_refused(drr_impl, quantum):
    with pytest.raises(ValueError):
        drr_impl(quantum)


def test_serving_an_empty_flow_is_refused(drr_impl):
    drr = drr_impl()
    slot = drr.open_flow(1.0)
    with pytest.raises(ValueError):
        drr.serve(slot, 1.0)
    with pytest.raises(ValueError):
        drr.withdraw(slot, 1.0)


def test_extreme_weights_and_costs_end_quickly(drr_impl):
    # Without skipping idle turns this would take a billion turns.
    drr = drr_impl()
    small = drr.open_flow(1e-3)
    big = drr.open_flow(1e6)
    drr.push(small, 1e6)
    drr.push(big, 1e6)
    assert drr.next_flow() == big
    drr.serve(big, 0.0)
    assert drr.next_flow() == small
    assert drr.deficit(small) >= 1e6


# --- properties ----------------------------------------------------------------

# Dyadic weights and costs: every sum is exact, so the skipping of idle turns
# must give exactly the order of the plain DRR below.
DYADIC_WEIGHTS = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
DYADIC_COSTS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 8.0])


class PlainDRR:
    """DRR as the paper states it, one turn at a time: the reference."""

    def __init__(self) -> None:
        self.weight: dict[int, float] = {}
        self.deficit: dict[int, float] = {}
        self.costs: dict[int, list[float]] = {}
        self.ring: list[int] = []  # active flows, the one taking its turn first
        self.granted = False

    def open_flow(self, slot: int, weight: float) -> None:
        self.weight[slot], self.deficit[slot], self.costs[slot] = weight, 0.0, []

    def push(self, slot: int, cost: float) -> None:
        self.costs[slot].append(cost)
        if len(self.costs[slot]) == 1:
            self.ring.append(slot)
            if len(self.ring) == 1:
                self.granted = False

    def next_flow(self) -> int:
        if not self.ring:
            return -1
        while True:
            slot = self.ring[0]
            if not self.granted:
                self.deficit[slot] += self.weight[slot]
                self.granted = True
            if self.deficit[slot] >= self.costs[slot][0]:
                return slot
            self.ring.append(self.ring.pop(0))
            self.granted = False

    def remove(self, slot: int, index: int, charge: bool) -> None:
        cost = self.costs[slot].pop(index)
        if charge:
            self.deficit[slot] -= cost
        if not self.costs[slot]:
            self.deficit[slot] = 0.0
            if self.ring[0] == slot:
                self.granted = False
            self.ring.remove(slot)


OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["push", "serve", "withdraw", "weight"]), st.integers(0, 4), DYADIC_COSTS,
              DYADIC_WEIGHTS),
    max_size=200,
)


@given(weights=st.lists(DYADIC_WEIGHTS, min_size=1, max_size=5), operations=OPERATIONS)
@settings(max_examples=200)
def test_same_order_as_the_plain_drr(drr_impl, weights, operations):
    drr, plain = drr_impl(), PlainDRR()
    slots = [drr.open_flow(w) for w in weights]
    for slot, w in zip(slots, weights, strict=True):
        plain.open_flow(slot, w)
    for op, index, cost, weight in operations:
        slot = slots[index % len(slots)]
        queue = plain.costs[slot]
        if op == "push":
            drr.push(slot, cost)
            plain.push(slot, cost)
        elif op == "serve":
            chosen = drr.next_flow()
            assert chosen == plain.next_flow()
            if chosen >= 0:
                rest = plain.costs[chosen]
                drr.serve(chosen, rest[1] if len(rest) > 1 else 0.0)
                plain.remove(chosen, 0, charge=True)
        elif op == "withdraw" and queue:
            position = index % len(queue)
            after = queue[1] if position == 0 and len(queue) > 1 else queue[0] if position else 0.0
            drr.withdraw(slot, after)
            plain.remove(slot, position, charge=False)
        elif op == "weight":
            drr.set_weight(slot, weight)
            plain.weight[slot] = weight
        assert drr.active == len(plain.ring)
        for s in slots:
            assert drr.queued(s) == len(plain.costs[s])
            assert drr.deficit(s) == plain.deficit[s]
    assert drr.next_flow() == plain.next_flow()


@given(
    weights=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=6),
    costs=st.lists(st.floats(0.0, 50.0), min_size=1, max_size=20),
    quantum=st.floats(1e-3, 10.0),
    decisions=st.integers(1, 300),
)
@settings(max_examples=100)
def test_served_cost_follows_the_weights(drr_impl, weights, costs, quantum, decisions):
    # With every flow backlogged, after k turns a flow has been served its k
    # quanta less a deficit that is never negative and below one quantum plus
    # the largest cost; turn counts of two flows differ by at most one.
    drr = drr_impl(quantum)
    slots = [drr.open_flow(w) for w in weights]
    queues = {slot: deque() for slot in slots}
    arrivals = itertools.cycle(costs)

    def push(slot):
        cost = next(arrivals)
        queues[slot].append(cost)
        drr.push(slot, cost)

    for slot in slots:
        push(slot)
        push(slot)
    served = dict.fromkeys(slots, 0.0)
    for _ in range(decisions):
        slot = drr.next_flow()
        served[slot] += queues[slot].popleft()
        drr.serve(slot, queues[slot][0])
        push(slot)
    largest = max(costs)
    share = {slot: w * quantum for slot, w in zip(slots, weights, strict=True)}
    for a, b in itertools.combinations(slots, 2):
        bound = 2.0 + largest / share[a] + largest / share[b]
        assert abs(served[a] / share[a] - served[b] / share[b]) <= bound * (1 + 1e-9)


@given(
    weights=st.lists(st.floats(1e-3, 1e6), min_size=1, max_size=6),
    operations=st.lists(
        st.tuples(st.sampled_from(["push", "serve", "withdraw", "weight", "close"]), st.integers(0, 5),
                  st.floats(0.0, 1e6), st.floats(1e-3, 1e6)),
        max_size=200,
    ),
    quantum=st.floats(1e-3, 1e6),
)
@settings(max_examples=200)
def test_compiled_and_twin_agree(compiled_drr, python_drr, weights, operations, quantum):
    compiled, twin = compiled_drr(quantum), python_drr(quantum)
    slots = [compiled.open_flow(w) for w in weights]
    assert slots == [twin.open_flow(w) for w in weights]
    for op, index, cost, weight in operations:
        slot = slots[index % len(slots)]
        for drr in (compiled, twin):
            if op == "push":
                drr.push(slot, cost)
            elif op == "serve":
                chosen = drr.next_flow()
                if chosen >= 0:
                    drr.serve(chosen, cost)
            elif op == "withdraw" and drr.queued(slot):
                drr.withdraw(slot, cost)
            elif op == "weight":
                drr.set_weight(slot, weight)
            elif op == "close" and not drr.queued(slot):
                drr.close_flow(slot)
                drr.open_flow(weight)
        assert compiled.next_flow() == twin.next_flow()
        assert compiled.active == twin.active
        for s in slots:
            state = (s, compiled.deficit(s), compiled.queued(s), compiled.head_cost(s), compiled.weight(s))
            assert state == (s, twin.deficit(s), twin.queued(s), twin.head_cost(s), twin.weight(s))
