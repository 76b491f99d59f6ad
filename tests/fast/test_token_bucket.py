"""The token bucket's behaviour, the same for the compiled module and its twin.

Example tests pin the contract with binary-exact numbers; Hypothesis checks the
rate-limit bound, the token invariants, the retry_after promise and that both
implementations decide identically on the same operations.
"""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

# --- behaviour ---------------------------------------------------------------


def test_starts_full(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 100.0)
    assert bucket.capacity == 10.0
    assert bucket.refill_per_second == 1.0
    assert bucket.available(100.0) == 10.0
    assert bucket.try_acquire(10.0, 100.0)
    assert not bucket.try_acquire(0.5, 100.0)


@pytest.mark.parametrize(
    ("capacity", "refill_per_second"),
    [
        (0.0, 1.0),
        (-1.0, 1.0),
        (math.nan, 1.0),
        (math.inf, 1.0),
        (1.0, -0.5),
        (1.0, math.nan),
        (1.0, math.inf),
    ],
)
def test_rejects_bad_limits(bucket_impl, capacity, refill_per_second):
    with pytest.raises(ValueError):
        bucket_impl(capacity, refill_per_second, 0.0)


def test_accepts_integer_limits_as_floats(bucket_impl):
    bucket = bucket_impl(10, 2, 0)
    assert (bucket.capacity, bucket.refill_per_second) == (10.0, 2.0)
    assert type(bucket.capacity) is float


def test_limits_are_read_only(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 0.0)
    with pytest.raises(AttributeError):
        bucket.capacity = 20.0
    with pytest.raises(AttributeError):
        bucket.refill_per_second = 2.0


def test_refills_at_the_configured_rate(bucket_impl):
    bucket = bucket_impl(10.0, 4.0, 0.0)
    assert bucket.try_acquire(10.0, 0.0)
    assert bucket.available(0.25) == 1.0
    assert bucket.available(1.0) == 4.0
    assert bucket.try_acquire(4.0, 1.0)
    assert not bucket.try_acquire(0.25, 1.0)


def test_refill_stops_at_capacity(bucket_impl):
    bucket = bucket_impl(10.0, 4.0, 0.0)
    assert bucket.try_acquire(3.0, 0.0)
    assert bucket.available(1000.0) == 10.0
    assert not bucket.try_acquire(10.5, 1000.0)


def test_refusal_takes_nothing(bucket_impl):
    bucket = bucket_impl(10.0, 0.0, 0.0)
    assert bucket.try_acquire(7.0, 0.0)
    assert not bucket.try_acquire(5.0, 0.0)
    assert bucket.available(0.0) == 3.0


def test_cost_above_capacity_is_never_admitted(bucket_impl):
    bucket = bucket_impl(10.0, 100.0, 0.0)
    assert not bucket.try_acquire(10.5, 1e6)
    assert bucket.retry_after(10.5, 1e6) == math.inf
    assert bucket.available(1e6) == 10.0


@pytest.mark.parametrize("cost", [-1.0, math.nan])
def test_malformed_cost_is_refused_and_mints_nothing(bucket_impl, cost):
    bucket = bucket_impl(10.0, 1.0, 0.0)
    assert bucket.try_acquire(4.0, 0.0)
    assert not bucket.try_acquire(cost, 0.0)
    assert bucket.retry_after(cost, 0.0) == math.inf
    bucket.refund(cost)
    assert bucket.available(0.0) == 6.0


def test_retry_after_is_exact(bucket_impl):
    bucket = bucket_impl(10.0, 2.0, 0.0)
    assert bucket.try_acquire(10.0, 0.0)
    assert bucket.retry_after(4.0, 0.0) == 2.0
    assert bucket.retry_after(4.0, 0.5) == 1.5
    assert not bucket.try_acquire(4.0, 1.999)
    assert bucket.try_acquire(4.0, 2.0)


def test_retry_after_is_zero_when_available(bucket_impl):
    bucket = bucket_impl(10.0, 2.0, 0.0)
    assert bucket.retry_after(10.0, 0.0) == 0.0
    assert bucket.available(0.0) == 10.0


def test_retry_after_is_infinite_without_refill(bucket_impl):
    bucket = bucket_impl(10.0, 0.0, 0.0)
    assert bucket.try_acquire(8.0, 0.0)
    assert bucket.retry_after(2.0, 0.0) == 0.0
    assert bucket.retry_after(3.0, 1e9) == math.inf


def test_retry_after_rounds_up_to_a_time_that_admits(bucket_impl):
    # 0.1 and 0.3 are not binary-exact: the plain quotient lands an ulp short.
    bucket = bucket_impl(1.0, 3.0, 0.0)
    assert bucket.try_acquire(0.9, 0.0)
    wait = bucket.retry_after(1.0, 0.0)
    assert wait == pytest.approx(0.3, rel=1e-12)
    assert not bucket.try_acquire(1.0, wait * (1 - 1e-9))
    assert bucket.try_acquire(1.0, wait)


def test_backwards_clock_mints_nothing(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 100.0)
    assert bucket.try_acquire(10.0, 100.0)
    assert bucket.available(50.0) == 0.0
    assert not bucket.try_acquire(1.0, 50.0)
    # The 50 s "regained" by stepping back are not credited again.
    assert bucket.available(100.0) == 0.0
    assert bucket.available(101.0) == 1.0


def test_retry_after_counts_from_the_latest_time_seen(bucket_impl):
    bucket = bucket_impl(10.0, 2.0, 10.0)
    assert bucket.try_acquire(10.0, 10.0)
    # Tokens accrue from t=10, so 4 are held at t=12: 3 s after t=9.
    assert bucket.retry_after(4.0, 9.0) == 3.0
    assert bucket.try_acquire(4.0, 12.0)


def test_reconfigure_keeps_the_tokens_held(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 0.0)
    assert bucket.try_acquire(6.0, 0.0)
    bucket.reconfigure(20.0, 4.0, 2.0)  # 2 s at the old rate: 4 + 2 tokens
    assert (bucket.capacity, bucket.refill_per_second) == (20.0, 4.0)
    assert bucket.available(2.0) == 6.0
    assert bucket.available(3.0) == 10.0


def test_reconfigure_clamps_to_a_smaller_capacity(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 0.0)
    bucket.reconfigure(4.0, 1.0, 0.0)
    assert bucket.available(0.0) == 4.0
    assert bucket.available(100.0) == 4.0


def test_failed_reconfigure_changes_nothing(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 0.0)
    assert bucket.try_acquire(6.0, 0.0)
    with pytest.raises(ValueError):
        bucket.reconfigure(0.0, 1.0, 5.0)
    with pytest.raises(ValueError):
        bucket.reconfigure(10.0, -1.0, 5.0)
    assert (bucket.capacity, bucket.refill_per_second) == (10.0, 1.0)
    assert bucket.available(0.0) == 4.0


def test_refund_gives_back_up_to_capacity(bucket_impl):
    bucket = bucket_impl(10.0, 0.0, 0.0)
    assert bucket.try_acquire(6.0, 0.0)
    bucket.refund(6.0)
    assert bucket.available(0.0) == 10.0
    bucket.refund(5.0)
    assert bucket.available(0.0) == 10.0


def test_set_available_replaces_the_count_within_minus_and_plus_capacity(bucket_impl):
    bucket = bucket_impl(10.0, 2.0, 0.0)
    bucket.set_available(3.0, 1.0)
    assert bucket.available(1.0) == 3.0
    bucket.set_available(50.0, 1.0)
    assert bucket.available(1.0) == 10.0
    # A debt: the refill pays it back before anything is admitted.
    bucket.set_available(-4.0, 1.0)
    assert not bucket.try_acquire(1.0, 3.0)
    assert bucket.retry_after(1.0, 3.0) == 0.5
    bucket.set_available(-99.0, 4.0)
    assert bucket.available(4.0) == -10.0
    bucket.set_available(float("nan"), 4.0)
    assert bucket.available(4.0) == -10.0


def test_set_available_credits_the_time_before_it_at_the_old_count(bucket_impl):
    bucket = bucket_impl(10.0, 1.0, 0.0)
    assert bucket.try_acquire(10.0, 0.0)
    bucket.set_available(2.0, 5.0)  # the 5 s before are credited first, then replaced
    assert bucket.available(6.0) == 3.0


# --- properties --------------------------------------------------------------

capacities = st.floats(min_value=1e-3, max_value=1e6)
refill_rates = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e6))
start_times = st.floats(min_value=0.0, max_value=1e7)
forward_steps = st.floats(min_value=0.0, max_value=100.0)
clock_steps = st.one_of(forward_steps, st.floats(min_value=-10.0, max_value=0.0))
# Costs as fractions of capacity, so they stay comparable to it; negative and
# over-capacity costs are in range on purpose.
cost_fractions = st.floats(min_value=-0.25, max_value=1.5)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("try_acquire"), clock_steps, cost_fractions),
        st.tuples(st.just("retry_after"), clock_steps, cost_fractions),
        st.tuples(st.just("available"), clock_steps),
        st.tuples(st.just("refund"), cost_fractions),
        st.tuples(st.just("reconfigure"), clock_steps, capacities, refill_rates),
    ),
    max_size=60,
)


def replay(bucket, start, ops):
    """Apply `ops` to `bucket`, yielding (now, result) after each."""
    now = start
    for op in ops:
        name = op[0]
        if name == "refund":
            bucket.refund(op[1] * bucket.capacity)
            yield now, None
            continue
        now += op[1]
        if name == "reconfigure":
            yield now, bucket.reconfigure(op[2], op[3], now)
        elif name == "available":
            yield now, bucket.available(now)
        else:
            yield now, getattr(bucket, name)(op[2] * bucket.capacity, now)


@given(
    capacity=capacities,
    refill_per_second=refill_rates,
    start=start_times,
    requests=st.lists(st.tuples(forward_steps, cost_fractions), max_size=60),
)
def test_admitted_cost_never_exceeds_burst_plus_refill(
    bucket_impl, capacity, refill_per_second, start, requests
):
    bucket = bucket_impl(capacity, refill_per_second, start)
    admitted = []  # (time, cost) of each admitted request
    now = start
    for step, fraction in requests:
        now += step
        cost = fraction * capacity
        if bucket.try_acquire(cost, now):
            admitted.append((now, cost))
    # Every window between two admissions, which covers the whole run too.
    for i, (window_start, _) in enumerate(admitted):
        total = 0.0
        for window_end, cost in admitted[i:]:
            total += cost
            bound = capacity + refill_per_second * (window_end - window_start)
            assert total <= bound + 1e-9 * (bound + total)


@given(capacity=capacities, refill_per_second=refill_rates, start=start_times, ops=operations)
def test_tokens_stay_within_zero_and_capacity(
    bucket_impl, capacity, refill_per_second, start, ops
):
    bucket = bucket_impl(capacity, refill_per_second, start)
    for now, _ in replay(bucket, start, ops):
        assert 0.0 <= bucket.available(now) <= bucket.capacity


@given(
    capacity=capacities,
    refill_per_second=refill_rates,
    start=start_times,
    ops=operations,
    step=clock_steps,
    fraction=cost_fractions,
)
def test_acquiring_after_retry_after_succeeds(
    bucket_impl, capacity, refill_per_second, start, ops, step, fraction
):
    bucket = bucket_impl(capacity, refill_per_second, start)
    now = start
    for now, _ in replay(bucket, start, ops):
        pass
    now += step
    cost = fraction * bucket.capacity
    wait = bucket.retry_after(cost, now)
    if wait == math.inf:
        assert not bucket.try_acquire(cost, now)
    else:
        assert bucket.try_acquire(cost, now + wait)


@given(capacity=capacities, refill_per_second=refill_rates, start=start_times, ops=operations)
def test_compiled_and_python_decide_identically(
    compiled_bucket, python_bucket, capacity, refill_per_second, start, ops
):
    compiled = compiled_bucket(capacity, refill_per_second, start)
    python = python_bucket(capacity, refill_per_second, start)
    # Exact equality: both are IEEE doubles doing the same operations in order.
    assert list(replay(compiled, start, ops)) == list(replay(python, start, ops))
    assert compiled.available(start + 1e3) == python.available(start + 1e3)
