"""Benchmark: the compiled circuit breaker against its pure-Python twin.

    pytest bench/bench_breaker.py --benchmark-only -p no:cacheprovider
    python bench/bench_breaker.py

The first prints pytest-benchmark's table, one group per operation, so the two
implementations sit side by side; the second prints ns per call for each, the
ratio twin/compiled and the conditions. Operations:
- pair: `allow` then `record` on a closed breaker, 1000 per round, the clock
  advancing 1 ms per call (the 10 buckets of a 1 s window roll over), every
  fourth result a failure (25%, below the 50% rate; never 5 in a row), so
  it stays closed and counts every call: the cost a healthy upstream's call pays;
- refused: `allow` on an open breaker, 1000 per round: the cost of a refusal;
- board pair: the same pair through BreakerBoard (no Redis) by a UUID server
  id, as the data plane calls it: the dict lookup and method calls included
  (a UUID hashes in Python on every lookup, twice per pair);
- board pair, str id: the same by `str(server_id)`, whose hash CPython caches.
Times include the Python calls, as every caller pays them. Needs the extension
built (pip install -e .).
"""

import os
import platform
import sys
import timeit
import uuid

import pytest

from gateway._fast import breaker_c, breaker_py, is_extension_module
from gateway.config import UpstreamSettings
from gateway.registry import breakers as board_module

if not is_extension_module(breaker_c):
    # Otherwise the "compiled" column would time the twin under another name.
    raise ImportError(f"gateway._fast.breaker_c is not built ({breaker_c.__file__}); run pip install -e .")

IMPLEMENTATIONS = {"compiled": breaker_c, "python": breaker_py}
CALLS = 1000
# The defaults of [upstreams] but a 1 s window, so that buckets roll within a round.
SETTINGS = UpstreamSettings(breaker_window=1.0)
ARGS = board_module.breaker_settings(SETTINGS)
TIMES = [i * 0.001 for i in range(CALLS)]
RESULTS = [i % 4 != 3 for i in range(CALLS)]
SERVER = uuid.uuid4()
SERVER_NAME = str(SERVER)


def pair_round(module) -> int:
    """allow + record on a fresh, closed breaker; returns how many were admitted."""
    breaker = module.CircuitBreaker(*ARGS, 0.0)
    allow, record = breaker.allow, breaker.record
    admitted = 0
    for now, ok in zip(TIMES, RESULTS):
        if allow(now):
            admitted += 1
            record(ok, now)
    return admitted


def refused_round(module) -> int:
    breaker = module.CircuitBreaker(*ARGS, 0.0)
    breaker.force_open(1e9, 1, 0.0)
    allow = breaker.allow
    return sum(1 for now in TIMES if allow(now))


def board_round(module, server=SERVER) -> int:
    board = board_module.BreakerBoard(None, "bench:")
    board.configure([(server, SETTINGS)])
    # The board holds the selected implementation; put the one measured in its place.
    board._breakers[server] = module.CircuitBreaker(*ARGS, 0.0)
    allow, record = board.allow, board.record
    admitted = 0
    for now, ok in zip(TIMES, RESULTS):
        if allow(server, now):
            admitted += 1
            record(server, ok, now)
    return admitted


def board_round_str(module) -> int:
    return board_round(module, SERVER_NAME)


ROUNDS = {"pair": pair_round, "refused": refused_round, "board pair": board_round, "board str": board_round_str}


@pytest.mark.benchmark(group=f"allow+record x{CALLS}")
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_allow_and_record(benchmark, implementation):
    assert benchmark(pair_round, IMPLEMENTATIONS[implementation]) == CALLS


@pytest.mark.benchmark(group=f"allow refused x{CALLS}")
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_allow_refused(benchmark, implementation):
    assert benchmark(refused_round, IMPLEMENTATIONS[implementation]) == 0


@pytest.mark.benchmark(group=f"BreakerBoard allow+record x{CALLS}")
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_board_allow_and_record(benchmark, implementation):
    assert benchmark(board_round, IMPLEMENTATIONS[implementation]) == CALLS


def _ns_per_call(round_, module, repeat: int = 7, number: int = 200) -> float:
    # Best of `repeat`: the least disturbed measurement of the same work.
    seconds = min(timeit.repeat(lambda: round_(module), repeat=repeat, number=number))
    return seconds / number / CALLS * 1e9


def main() -> None:
    try:
        import Cython

        cython_version = Cython.__version__
    except ImportError:
        cython_version = "not installed"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Python {platform.python_version()} ({sys.implementation.name}), Cython {cython_version}")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs ({cpus} usable), {platform.platform()}")
    print(f"{CALLS} calls per round (1 ms apart, 25% failures, window 1 s), best of 7 x 200 rounds;"
          " a round includes building its breaker")
    for name, round_ in ROUNDS.items():
        compiled = _ns_per_call(round_, IMPLEMENTATIONS["compiled"])
        python = _ns_per_call(round_, IMPLEMENTATIONS["python"])
        print(f"{name:10} compiled: {compiled:7.1f} ns   python: {python:7.1f} ns"
              f"   ratio python/compiled: {python / compiled:.1f}x")


if __name__ == "__main__":
    main()
