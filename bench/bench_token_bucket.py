"""Benchmark: the compiled token bucket against its pure-Python twin.

    pytest bench/bench_token_bucket.py --benchmark-only -p no:cacheprovider
    python bench/bench_token_bucket.py

The first prints pytest-benchmark's table, one group per operation, so the two
implementations sit side by side; the second prints ns per decision for each,
the ratio twin/compiled and the conditions. A round is 1000 `try_acquire`
calls on a fresh bucket, the clock advancing so that about half are refused:
both branches run. Times include the Python call, as every caller pays it.
Needs the extension built (pip install -e .).
"""

import os
import platform
import sys
import timeit

import pytest

from gateway._fast import is_extension_module, token_bucket_c, token_bucket_py

if not is_extension_module(token_bucket_c):
    # Otherwise the "compiled" column would time the twin under another name.
    raise ImportError(
        f"gateway._fast.token_bucket_c is not built ({token_bucket_c.__file__});"
        " run pip install -e ."
    )

IMPLEMENTATIONS = {
    "compiled": token_bucket_c.TokenBucket,
    "python": token_bucket_py.TokenBucket,
}
DECISIONS = 1000
CAPACITY = 100.0
REFILL_PER_SECOND = 500.0
COST = 1.0
# 1 ms apart: half a token per call, so once the burst is spent every other
# call is refused.
TIMES = [i * 0.001 for i in range(DECISIONS)]


def decide_round(bucket_class: type) -> int:
    """Run one round of decisions on a fresh bucket; return how many were admitted."""
    bucket = bucket_class(CAPACITY, REFILL_PER_SECOND, 0.0)
    try_acquire = bucket.try_acquire
    admitted = 0
    for now in TIMES:
        if try_acquire(COST, now):
            admitted += 1
    return admitted


@pytest.mark.benchmark(group=f"try_acquire x{DECISIONS}")
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_try_acquire(benchmark, implementation):
    admitted = benchmark(decide_round, IMPLEMENTATIONS[implementation])
    assert admitted == decide_round(token_bucket_py.TokenBucket)


def _ns_per_decision(bucket_class: type, repeat: int = 7, number: int = 200) -> float:
    # Best of `repeat`: the least disturbed measurement of the same work.
    seconds = min(timeit.repeat(lambda: decide_round(bucket_class), repeat=repeat, number=number))
    return seconds / number / DECISIONS * 1e9


def main() -> None:
    try:
        import Cython

        cython_version = Cython.__version__
    except ImportError:
        cython_version = "not installed"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    python_version = f"{platform.python_version()} ({sys.implementation.name})"
    print(f"Python {python_version}, Cython {cython_version}")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs ({cpus} usable), {platform.platform()}")
    print(f"{DECISIONS} try_acquire per round, best of 7 x 200 rounds")
    compiled = _ns_per_decision(IMPLEMENTATIONS["compiled"])
    python = _ns_per_decision(IMPLEMENTATIONS["python"])
    print(f"compiled: {compiled:7.1f} ns/decision")
    print(f"python:   {python:7.1f} ns/decision")
    print(f"ratio python/compiled: {python / compiled:.1f}x")


if __name__ == "__main__":
    main()
