"""The violation counts behind per-address bans, the same for the compiled module and its twin.

Example tests pin the contract with binary-exact numbers; Hypothesis checks the
count's bounds, the ban bound (a pace at the allowed rate never bans, a burst
of `threshold` always does), the memory bound, and that both implementations
decide identically on the same operations.
"""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

# --- behaviour ---------------------------------------------------------------


def test_threshold_violations_at_once_reach_the_threshold(violations_impl):
    counts = violations_impl(5, 60.0)
    assert (counts.threshold, counts.window) == (5.0, 60.0)
    assert [counts.add("198.51.100.7", 100.0) for _ in range(5)] == [False] * 4 + [True]
    assert counts.count("198.51.100.7", 100.0) == 5.0
    # Addresses are counted apart.
    assert counts.add("198.51.100.8", 100.0) is False
    assert len(counts) == 2


def test_count_drains_at_threshold_per_window(violations_impl):
    counts = violations_impl(4, 2.0)  # drains 2 a second
    for _ in range(3):
        counts.add("a", 0.0)
    assert counts.count("a", 0.5) == 2.0
    assert counts.count("a", 1.0) == 1.0
    assert counts.count("a", 10.0) == 0.0  # never below zero
    assert counts.add("a", 10.0) is False
    assert counts.count("a", 10.0) == 1.0


def test_the_allowed_pace_never_bans(violations_impl):
    counts = violations_impl(4, 2.0)  # 2 a second is the allowed pace
    assert not any(counts.add("a", i * 0.5) for i in range(1000))
    assert counts.count("a", 499.5) == 1.0


def test_a_faster_pace_bans(violations_impl):
    counts = violations_impl(4, 2.0)
    # 4 a second: +1 and -0.5 every quarter second, so the count climbs 0.5 a step
    # (1, 1.5, ... 3.5): the sixth passes threshold - 1.
    verdicts = [counts.add("a", i * 0.25) for i in range(6)]
    assert verdicts == [False] * 5 + [True]


def test_unknown_address_counts_zero(violations_impl):
    counts = violations_impl(3, 1.0)
    assert counts.count("nobody", 5.0) == 0.0
    assert len(counts) == 0
    counts.forget("nobody")


def test_forget_starts_over(violations_impl):
    counts = violations_impl(2, 10.0)
    counts.add("a", 0.0)
    assert counts.add("a", 0.0) is True
    counts.forget("a")
    assert counts.count("a", 0.0) == 0.0
    assert counts.add("a", 0.0) is False


def test_backwards_clock_drains_nothing(violations_impl):
    counts = violations_impl(4, 4.0)  # drains 1 a second
    counts.add("a", 100.0)
    counts.add("a", 100.0)
    assert counts.count("a", 50.0) == 2.0
    # The 50 s "regained" by stepping back are not drained again.
    assert counts.count("a", 100.0) == 2.0
    assert counts.count("a", 101.0) == 1.0


def test_sweep_forgets_only_drained_counts(violations_impl):
    counts = violations_impl(4, 4.0)
    counts.add("old", 0.0)
    counts.add("new", 5.0)
    assert counts.sweep(5.0) == 1
    assert len(counts) == 1 and counts.count("new", 5.0) == 1.0
    assert counts.sweep(6.0) == 1
    assert len(counts) == 0


def test_a_full_table_makes_room(violations_impl):
    counts = violations_impl(10, 1000.0, 64)
    for i in range(64):
        counts.add(f"10.0.0.{i}", 0.0)
    assert len(counts) == 64
    # Nothing has drained: the 4 tracked longest (1/16) are forgotten.
    assert counts.add("10.0.1.0", 0.0) is False
    assert len(counts) == 61
    assert [counts.count(f"10.0.0.{i}", 0.0) for i in range(5)] == [0.0] * 4 + [1.0]
    assert counts.count("10.0.1.0", 0.0) == 1.0


def test_a_full_table_sweeps_before_forgetting_live_counts(violations_impl):
    counts = violations_impl(10, 10.0, 32)  # drains 1 a second
    for i in range(32):
        counts.add(f"a{i}", 0.0 if i < 16 else 5.0)
    # At t=5 the first 16 drained to 0: the sweep frees them, no live count is lost.
    counts.add("new", 5.0)
    assert len(counts) == 17
    assert all(counts.count(f"a{i}", 5.0) == 1.0 for i in range(16, 32))


@pytest.mark.parametrize(
    ("threshold", "window"),
    [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (math.inf, 1.0), (1.0, 0.0), (1.0, -1.0), (1.0, math.nan),
     (1.0, math.inf)],
)
def test_rejects_bad_limits(violations_impl, threshold, window):
    with pytest.raises(ValueError):
        violations_impl(threshold, window)


def test_rejects_a_tiny_table(violations_impl):
    with pytest.raises(ValueError):
        violations_impl(1, 1.0, 8)


def test_reconfigure_drains_at_the_old_rate_until_now(violations_impl):
    counts = violations_impl(4, 4.0)  # 1 a second
    for _ in range(3):
        counts.add("a", 0.0)
    counts.reconfigure(8, 2.0, 1.0)  # from t=1: 4 a second
    assert (counts.threshold, counts.window) == (8.0, 2.0)
    assert counts.count("a", 1.0) == 2.0
    assert counts.count("a", 1.25) == 1.0


def test_failed_reconfigure_changes_nothing(violations_impl):
    counts = violations_impl(4, 4.0)
    counts.add("a", 0.0)
    with pytest.raises(ValueError):
        counts.reconfigure(0, 4.0, 0.0)
    assert (counts.threshold, counts.window) == (4.0, 4.0)
    assert counts.count("a", 0.0) == 1.0


# --- properties --------------------------------------------------------------

thresholds = st.integers(min_value=1, max_value=1000)
windows = st.floats(min_value=1e-3, max_value=1e5)
start_times = st.floats(min_value=0.0, max_value=1e7)
forward_steps = st.floats(min_value=0.0, max_value=100.0)
clock_steps = st.one_of(forward_steps, st.floats(min_value=-10.0, max_value=0.0))
addresses = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"])

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), clock_steps, addresses),
        st.tuples(st.just("count"), clock_steps, addresses),
        st.tuples(st.just("forget"), addresses),
        st.tuples(st.just("sweep"), clock_steps),
        st.tuples(st.just("reconfigure"), clock_steps, thresholds, windows),
    ),
    max_size=80,
)


def replay(counts, start, ops):
    """Apply `ops` to `counts`, yielding (now, result, size) after each."""
    now = start
    for op in ops:
        name = op[0]
        if name == "forget":
            yield now, counts.forget(op[1]), len(counts)
            continue
        now += op[1]
        if name == "reconfigure":
            result = counts.reconfigure(op[2], op[3], now)
        elif name == "sweep":
            result = counts.sweep(now)
        else:
            result = getattr(counts, name)(op[2], now)
        yield now, result, len(counts)


@given(threshold=thresholds, window=windows, start=start_times, ops=operations)
def test_counts_stay_within_zero_and_the_violations_seen(violations_impl, threshold, window, start, ops):
    counts = violations_impl(threshold, window)
    seen = dict.fromkeys(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"], 0)
    for now, _, _ in replay(counts, start, ops):
        pass
    for op in ops:
        if op[0] == "add":
            seen[op[2]] += 1
    for address, total in seen.items():
        assert 0.0 <= counts.count(address, start) <= total


@given(threshold=thresholds, window=windows, start=start_times)
def test_a_burst_of_threshold_always_bans(violations_impl, threshold, window, start):
    counts = violations_impl(threshold, window)
    verdicts = [counts.add("a", start) for _ in range(threshold)]
    assert verdicts == [False] * (threshold - 1) + [True]


def test_a_burst_with_round_trips_between_still_bans(violations_impl):
    counts = violations_impl(3, 60.0)
    # Three refusals 50 ms apart: 0.005 has drained, which must not save the address.
    assert [counts.add("a", 10.0 + i * 0.05) for i in range(3)] == [False, False, True]


@given(threshold=thresholds, window=windows, start=st.floats(min_value=0.0, max_value=1e6),
       n=st.integers(min_value=1, max_value=300), slack=st.floats(min_value=1.0, max_value=10.0))
def test_a_pace_at_or_under_the_allowed_rate_bans_only_a_threshold_of_one(
    violations_impl, threshold, window, start, n, slack
):
    counts = violations_impl(threshold, window)
    # A hair slower than the allowed rate: `start + i * gap` rounds by up to
    # about 1e-4 of the gap here, which the hair covers.
    gap = window / threshold * slack * (1 + 1e-3)
    verdicts = [counts.add("a", start + i * gap) for i in range(n)]
    assert any(verdicts) == (threshold == 1)


@given(max_addresses=st.integers(min_value=16, max_value=64), n=st.integers(min_value=0, max_value=300))
def test_the_table_never_exceeds_its_size(violations_impl, max_addresses, n):
    counts = violations_impl(1000, 1e6, max_addresses)
    for i in range(n):
        counts.add(f"10.{i // 256}.{i % 256}.1", float(i))
        assert len(counts) <= max_addresses


@given(threshold=thresholds, window=windows, start=start_times, ops=operations)
def test_compiled_and_python_decide_identically(compiled_violations, python_violations, threshold, window, start,
                                                ops):
    compiled = compiled_violations(threshold, window, 16)
    python = python_violations(threshold, window, 16)
    # Exact equality: both are IEEE doubles doing the same operations in order.
    assert list(replay(compiled, start, ops)) == list(replay(python, start, ops))
