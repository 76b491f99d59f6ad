"""bench/proxy.py's interval for the median of the paired on/off ratios (`--pairs`): distribution-free, so it must
cover the true median at least 95% of the time whatever the noise looks like, and not much more (an interval
one order statistic too wide would still cover, but would tell less)."""

import importlib.util
import random
import statistics
import sys
from pathlib import Path

import pytest

# Loaded from its file: bench/ is not put on sys.path (its conftest.py would shadow the tests' own).
_SPEC = importlib.util.spec_from_file_location("proxy_bench", Path(__file__).resolve().parent.parent / "bench" / "proxy.py")
proxy = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = proxy  # its dataclasses look their module up while it loads
_SPEC.loader.exec_module(proxy)


def test_the_interval_is_made_of_order_statistics():
    assert proxy.median_interval([float(x) for x in range(20, 0, -1)]) == (10.5, 6.0, 15.0)
    assert proxy.median_interval([1.0, 5.0, 2.0, 4.0, 3.0, 6.0]) == (3.5, 1.0, 6.0)
    with pytest.raises(ValueError):
        proxy.median_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # 5 values: even the widest covers only 94%


@pytest.mark.parametrize("n", [proxy.PAIRS_MIN, 11, 20, 31])
def test_the_interval_covers_the_median_of_skewed_noise_95_percent_of_the_time(n):
    draw = random.Random(n)
    # A VM's noise: mostly small, sometimes a slow spell. The true median of 1.1 * lognormal(0, 0.3) is 1.1.
    trials, covered, widths = 4000, 0, []
    for _ in range(trials):
        ratios = [1.1 * draw.lognormvariate(0.0, 0.3) for _ in range(n)]
        median, low, high = proxy.median_interval(ratios)
        assert low <= median <= high
        covered += low <= 1.1 <= high
        widths.append(high - low)
    coverage = covered / trials
    assert coverage >= 0.94, coverage  # 95% less the simulation's own error (about 0.3% here)
    assert coverage <= 0.995 or n == proxy.PAIRS_MIN, coverage  # not needlessly wide
    assert statistics.median(widths) > 0


def test_the_pairs_report_what_the_kernel_adds(capsys):
    """Each run's CPU is read as user and system time; the report gives the system time a request adds, so that
    a cost in syscalls (a socket, a log file) is told from one in the gateway's own code."""

    def run(rps, cpu_pct, kernel_pct):
        return proxy.Load(requests=int(rps * 3), seconds=3.0, rps=rps, p50_ms=1.0, p99_ms=2.0, non_2xx=0,
                          socket_errors=0, cpu_pct=cpu_pct, kernel_pct=kernel_pct)

    # 10,000 req/s at 100% CPU: 100 us a request, 25 of them in the kernel; the on gateway adds 20 us, 4 there.
    pairs = [(run(8_333.3 + i, 100.0, 100.0 * 29 / 120), run(10_000.0 + i, 100.0, 25.0)) for i in range(8)]
    assert pairs[0][1].kernel_us_per_request == pytest.approx(25.0)
    summary = proxy.report_pairs(pairs, 3.0)
    kernel = summary["extra_kernel_us_per_request"]
    assert kernel["low"] <= kernel["median"] <= kernel["high"]
    assert kernel["median"] == pytest.approx(4.0, abs=0.05)
    assert summary["extra_cpu_us_per_request"]["median"] == pytest.approx(20.0, abs=0.05)
    assert "in the kernel: +4.0 us/request" in capsys.readouterr().out
