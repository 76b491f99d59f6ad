"""Benchmark: the compiled deficit round robin against its pure-Python twin.

    pytest bench/bench_fairness.py --benchmark-only -p no:cacheprovider
    python bench/bench_fairness.py

The first prints pytest-benchmark's table, one group per shape, so the two
implementations sit side by side; the second prints ns per decision for each,
the ratio twin/compiled and the conditions. A decision is what the fair
queue's dispatcher does per request served: `next_flow()`, `serve(slot,
next_cost)`, and one `push` to keep the flow backlogged. A round is 1000
decisions over FLOWS backlogged flows with weights 1..FLOWS (so some turns
serve several requests, some rotate the ring). Times include the Python calls,
as every caller pays them. Needs the extension built (pip install -e .).
"""

import os
import platform
import sys
import timeit

import pytest

from gateway._fast import fairness_c, fairness_py, is_extension_module

if not is_extension_module(fairness_c):
    # Otherwise the "compiled" column would time the twin under another name.
    raise ImportError(f"gateway._fast.fairness_c is not built ({fairness_c.__file__}); run pip install -e .")

IMPLEMENTATIONS = {
    "compiled": fairness_c.DeficitRoundRobin,
    "python": fairness_py.DeficitRoundRobin,
}
DECISIONS = 1000
FLOW_COUNTS = (3, 100)
BACKLOG = 2
COST = 1.0


def backlogged(drr_class: type, flows: int):
    """A scheduler with `flows` flows, weights 1..flows, each BACKLOG requests deep."""
    drr = drr_class()
    for weight in range(1, flows + 1):
        slot = drr.open_flow(float(weight))
        for _ in range(BACKLOG):
            drr.push(slot, COST)
    return drr


def decide_round(drr) -> int:
    """Run one round of decisions; return a checksum of the slots served."""
    next_flow, serve, push = drr.next_flow, drr.serve, drr.push
    checksum = 0
    for _ in range(DECISIONS):
        slot = next_flow()
        serve(slot, COST)
        push(slot, COST)
        checksum += slot
    return checksum


@pytest.mark.parametrize("flows", FLOW_COUNTS)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_decisions(benchmark, implementation, flows):
    benchmark.group = f"next_flow+serve+push x{DECISIONS}, {flows} flows"
    drr = backlogged(IMPLEMENTATIONS[implementation], flows)
    # The same scheduler carries on from round to round: the steady state.
    checksum = benchmark(decide_round, drr)
    assert isinstance(checksum, int)
    # Both implementations serve the same slots in the same order.
    fresh = [backlogged(cls, flows) for cls in IMPLEMENTATIONS.values()]
    assert decide_round(fresh[0]) == decide_round(fresh[1])


def _ns_per_decision(drr_class: type, flows: int, repeat: int = 7, number: int = 200) -> float:
    # Best of `repeat`: the least disturbed measurement of the same work.
    drr = backlogged(drr_class, flows)
    seconds = min(timeit.repeat(lambda: decide_round(drr), repeat=repeat, number=number))
    return seconds / number / DECISIONS * 1e9


def main() -> None:
    try:
        import Cython

        cython_version = Cython.__version__
    except ImportError:
        cython_version = "not installed"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Python {platform.python_version()} ({sys.implementation.name}), Cython {cython_version}")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs ({cpus} usable), {platform.platform()}")
    print(f"{DECISIONS} decisions (next_flow + serve + push) per round, best of 7 x 200 rounds")
    for flows in FLOW_COUNTS:
        compiled = _ns_per_decision(IMPLEMENTATIONS["compiled"], flows)
        python = _ns_per_decision(IMPLEMENTATIONS["python"], flows)
        print(f"{flows:4d} flows, weights 1..{flows}:")
        print(f"  compiled: {compiled:7.1f} ns/decision")
        print(f"  python:   {python:7.1f} ns/decision")
        print(f"  ratio python/compiled: {python / compiled:.1f}x")


if __name__ == "__main__":
    main()
