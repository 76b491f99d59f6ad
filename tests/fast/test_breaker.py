"""The circuit breaker, the same for the compiled module and its twin.

Examples pin the state machine with binary-exact times; Hypothesis checks its
bounds (trial calls per half-open round, how long an opening lasts, what never
trips and what always does) and that both implementations decide identically
on the same operations.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# window 10 s (buckets of 1 s), trips at 50% of 4 calls or on 3 failures in a
# row, open 1 s x openings up to 4 s, 2 trial calls.
DEFAULTS = {
    "window": 10.0,
    "minimum_calls": 4,
    "failure_rate": 0.5,
    "consecutive_failures": 3,
    "open_seconds": 1.0,
    "max_open_seconds": 4.0,
    "half_open_calls": 2,
}


def make(impl, now=0.0, **values):
    return impl.CircuitBreaker(**{**DEFAULTS, **values}, now=now)


def trip(breaker, now):
    """Open a closed breaker at `now` by failures in a row; True if it opened."""
    return any(breaker.record(False, now) for _ in range(3))


# --- closed ------------------------------------------------------------------


def test_starts_closed_and_admits(breaker_impl):
    breaker = make(breaker_impl)
    assert breaker.state == breaker_impl.CLOSED and breaker.state_name == "closed"
    assert breaker.allow(0.0) == breaker_impl.ADMITTED == 1
    assert breaker.retry_after(0.0) == 0.0
    assert (breaker.opened_count, breaker.open_until, breaker.trials) == (0, 0.0, 0)
    assert breaker_impl.STATE_NAMES == ("closed", "open", "half_open")
    assert (breaker_impl.CLOSED, breaker_impl.OPEN, breaker_impl.HALF_OPEN, breaker_impl.REFUSED) == (0, 1, 2, 0)


def test_consecutive_failures_trip_and_a_success_breaks_the_run(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=100)
    assert [breaker.record(False, 0.0) for _ in range(2)] == [False, False]
    assert breaker.record(True, 0.0) is False
    assert breaker.failures_in_a_row == 0
    assert [breaker.record(False, 0.5) for _ in range(3)] == [False, False, True]
    assert breaker.state == breaker_impl.OPEN
    assert breaker.opened_count == 1
    assert breaker.open_until == 1.5


def test_failure_rate_trips_only_from_the_minimum_volume(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=10, consecutive_failures=100)
    # 4 failures in 9 calls: below the volume. The 10th call, a failure: 5/10.
    for ok in [False, True] * 4 + [True]:
        assert breaker.record(ok, 0.0) is False
    assert breaker.window_counts(0.0) == (9, 4)
    assert breaker.record(False, 0.0) is True
    assert breaker.state == breaker_impl.OPEN


def test_a_success_that_reaches_the_volume_trips_too(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=4, consecutive_failures=100, failure_rate=0.5)
    for ok in (False, False, True):
        assert breaker.record(ok, 0.0) is False
    # 2 failures of 4 calls: the rate is met when the volume is.
    assert breaker.record(True, 0.0) is True


def test_below_the_rate_never_trips(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=4, consecutive_failures=100, failure_rate=0.6)
    # One failure in three calls, for 30 windows.
    assert not any(breaker.record(i % 3 != 2, i * 0.01) for i in range(30_000))
    assert breaker.state == breaker_impl.CLOSED


def test_the_window_forgets_old_results(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=100, consecutive_failures=100)
    breaker.record(False, 0.0)  # bucket [0, 1)
    breaker.record(False, 0.5)
    breaker.record(True, 3.25)  # bucket [3, 4)
    assert breaker.window_counts(9.75) == (3, 2)
    # At 10 the bucket [0, 1) leaves the window (its slot now holds [10, 11)).
    assert breaker.window_counts(10.0) == (1, 0)
    assert breaker.window_counts(12.75) == (1, 0)
    assert breaker.window_counts(13.0) == (0, 0)
    # Long idle: every bucket is stale at once.
    breaker.record(False, 15.0)
    assert breaker.window_counts(1000.0) == (0, 0)


def test_old_failures_do_not_join_new_ones(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=4, consecutive_failures=100, failure_rate=0.75)
    breaker.record(False, 0.0)
    breaker.record(False, 0.0)
    breaker.record(True, 5.0)
    # 20 s later the two failures are gone: 3 failures of 4 calls would trip.
    assert [breaker.record(False, 20.0) for _ in range(2)] == [False, False]
    assert breaker.window_counts(20.0) == (2, 2)


def test_a_clock_that_steps_back_counts_into_the_latest_bucket(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=100, consecutive_failures=100)
    breaker.record(False, 5.0)
    breaker.record(False, 2.0)
    assert breaker.window_counts(14.5) == (2, 2)
    assert breaker.window_counts(15.0) == (0, 0)


# --- open --------------------------------------------------------------------


def test_open_refuses_until_open_until_then_turns_half_open(breaker_impl):
    breaker = make(breaker_impl)
    assert trip(breaker, 10.0)
    assert breaker.allow(10.0) == breaker_impl.REFUSED
    assert breaker.allow(10.75) == breaker_impl.REFUSED
    assert breaker.retry_after(10.25) == 0.75
    assert breaker.state == breaker_impl.OPEN
    ticket = breaker.allow(11.0)
    assert ticket > breaker_impl.ADMITTED
    assert breaker.state == breaker_impl.HALF_OPEN and breaker.state_name == "half_open"
    assert breaker.retry_after(11.0) == 0.0


def test_a_nan_clock_never_ends_an_opening(breaker_impl):
    breaker = make(breaker_impl)
    trip(breaker, 0.0)
    assert breaker.allow(math.nan) == breaker_impl.REFUSED
    assert breaker.state == breaker_impl.OPEN


def test_results_while_open_are_ignored(breaker_impl):
    breaker = make(breaker_impl)
    trip(breaker, 0.0)
    assert breaker.record(True, 0.5) is False
    assert breaker.record(False, 0.5) is False
    assert (breaker.state, breaker.opened_count, breaker.open_until) == (breaker_impl.OPEN, 1, 1.0)


# --- half-open ---------------------------------------------------------------


def test_half_open_admits_at_most_the_trial_calls(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=2)
    trip(breaker, 0.0)
    first, second = breaker.allow(1.0), breaker.allow(1.0)
    assert first == second > 1
    assert breaker.trials == 2
    assert breaker.allow(1.0) == breaker_impl.REFUSED
    # A success frees no slot: the round is `half_open_calls` trials in all.
    assert breaker.record(True, 1.25) is False
    assert breaker.allow(1.25) == breaker_impl.REFUSED
    # Every trial is out: a verdict is pending, retry in open_seconds.
    assert breaker.retry_after(1.25) == 1.0


def test_half_open_successes_close_with_fresh_counts(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=2)
    trip(breaker, 0.0)
    breaker.allow(1.0)
    breaker.allow(1.0)
    assert breaker.record(True, 1.5) is False
    assert breaker.record(True, 1.5) is True
    assert breaker.state == breaker_impl.CLOSED
    assert (breaker.opened_count, breaker.trials, breaker.failures_in_a_row) == (0, 0, 0)
    assert breaker.window_counts(1.5) == (0, 0)
    assert breaker.allow(1.5) == breaker_impl.ADMITTED
    # Closed again, the next trip is a first opening: open_seconds, not more.
    trip(breaker, 2.0)
    assert (breaker.opened_count, breaker.open_until) == (1, 3.0)


def test_a_half_open_failure_reopens_for_longer_up_to_the_cap(breaker_impl):
    breaker = make(breaker_impl, open_seconds=1.0, max_open_seconds=2.5)
    trip(breaker, 0.0)
    assert breaker.open_until == 1.0
    breaker.allow(1.0)
    assert breaker.record(False, 1.0) is True
    assert (breaker.state, breaker.opened_count, breaker.open_until) == (breaker_impl.OPEN, 2, 3.0)
    breaker.allow(3.0)
    breaker.record(False, 3.0)
    assert (breaker.opened_count, breaker.open_until) == (3, 5.5)  # 3 s capped at 2.5 s
    breaker.allow(5.5)
    breaker.record(False, 5.5)
    assert (breaker.opened_count, breaker.open_until) == (4, 8.0)


def test_release_gives_back_a_trial_slot(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=1)
    trip(breaker, 0.0)
    ticket = breaker.allow(1.0)
    assert breaker.allow(1.0) == breaker_impl.REFUSED
    breaker.release(breaker_impl.ADMITTED)  # not a trial: releases nothing
    breaker.release(ticket + 1)  # not this round's
    assert breaker.allow(1.0) == breaker_impl.REFUSED
    breaker.release(ticket)
    assert breaker.trials == 0
    assert breaker.allow(1.0) == ticket
    # Released twice, counted once: a slot is never given back beyond zero.
    breaker.release(ticket)
    breaker.release(ticket)
    assert breaker.trials == 0


def test_a_ticket_of_an_earlier_round_releases_nothing(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=1)
    trip(breaker, 0.0)
    old = breaker.allow(1.0)
    breaker.record(False, 1.0)  # reopens until 3
    new = breaker.allow(3.0)
    assert new == old + 1
    breaker.release(old)
    assert breaker.trials == 1
    assert breaker.allow(3.0) == breaker_impl.REFUSED


def test_a_round_without_a_verdict_starts_afresh_after_max_open_seconds(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=1, max_open_seconds=4.0)
    trip(breaker, 0.0)
    leaked = breaker.allow(1.0)  # never answered, never released
    assert breaker.allow(4.75) == breaker_impl.REFUSED
    assert breaker.retry_after(4.5) == 0.5
    fresh = breaker.allow(5.0)
    assert fresh == leaked + 1
    assert breaker.trials == 1
    breaker.release(leaked)
    assert breaker.trials == 1


def test_a_result_from_before_the_round_counts_as_evidence(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=1)
    trip(breaker, 0.0)
    breaker.allow(1.0)
    # A call admitted while closed answers now: the upstream works.
    assert breaker.record(True, 1.5) is True
    assert breaker.state == breaker_impl.CLOSED


# --- from outside --------------------------------------------------------------


def test_force_open_and_force_closed(breaker_impl):
    breaker = make(breaker_impl)
    breaker.record(False, 0.0)
    breaker.force_open(2.5, 3, 1.0)
    assert (breaker.state, breaker.open_until, breaker.opened_count) == (breaker_impl.OPEN, 2.5, 3)
    assert breaker.allow(2.0) == breaker_impl.REFUSED
    assert breaker.retry_after(2.0) == 0.5
    # The next local opening continues the count.
    breaker.allow(2.5)
    breaker.record(False, 2.5)
    assert (breaker.opened_count, breaker.open_until) == (4, 6.5)
    breaker.force_closed(3.0)
    assert (breaker.state, breaker.opened_count) == (breaker_impl.CLOSED, 0)
    assert breaker.window_counts(3.0) == (0, 0)
    assert breaker.allow(3.0) == breaker_impl.ADMITTED


def test_force_open_is_bounded(breaker_impl):
    breaker = make(breaker_impl, max_open_seconds=4.0)
    breaker.force_open(100.0, 0, 1.0)
    assert (breaker.open_until, breaker.opened_count) == (5.0, 1)
    breaker.force_open(math.nan, 2, 1.0)
    assert breaker.open_until == 5.0
    breaker.force_open(math.inf, 2, 1.0)
    assert breaker.open_until == 5.0
    # Already over: open until the next allow, which starts a round.
    breaker.force_open(0.5, 2, 1.0)
    assert breaker.state == breaker_impl.OPEN
    assert breaker.allow(1.0) > 1
    assert breaker.state == breaker_impl.HALF_OPEN


def test_force_open_ends_a_half_open_round(breaker_impl):
    breaker = make(breaker_impl, half_open_calls=1)
    trip(breaker, 0.0)
    ticket = breaker.allow(1.0)
    breaker.force_open(3.0, 2, 1.5)
    assert breaker.trials == 0
    assert breaker.record(True, 2.0) is False  # ignored while open
    assert breaker.allow(3.0) == ticket + 1


# --- settings ------------------------------------------------------------------


def test_reconfigure_keeps_the_state(breaker_impl):
    breaker = make(breaker_impl, minimum_calls=100)
    breaker.record(False, 0.0)
    breaker.record(False, 0.0)
    breaker.reconfigure(**{**DEFAULTS, "minimum_calls": 100, "consecutive_failures": 5}, now=1.0)
    assert breaker.window_counts(1.0) == (2, 2)
    assert breaker.failures_in_a_row == 2
    assert [breaker.record(False, 1.0) for _ in range(3)] == [False, False, True]
    assert breaker.open_until == 2.0
    # A shorter cap shortens an opening in force; a new window empties the counts.
    breaker.force_open(50.0, 5, 1.0)
    breaker.reconfigure(**{**DEFAULTS, "window": 20.0, "max_open_seconds": 2.0}, now=1.5)
    assert (breaker.state, breaker.open_until, breaker.opened_count) == (breaker_impl.OPEN, 3.5, 5)
    breaker.force_closed(4.0)
    breaker.record(False, 4.0)
    breaker.reconfigure(**{**DEFAULTS, "window": 30.0}, now=4.0)
    assert breaker.window_counts(4.0) == (0, 0)


@pytest.mark.parametrize(
    "name, value",
    [
        ("window", 0.0), ("window", -1.0), ("window", math.inf), ("window", math.nan),
        ("minimum_calls", 0), ("minimum_calls", 2**40),
        ("failure_rate", 0.0), ("failure_rate", 1.5), ("failure_rate", math.nan),
        ("consecutive_failures", 0),
        ("open_seconds", 0.0), ("open_seconds", math.nan), ("open_seconds", 5.0),  # above max_open_seconds
        ("max_open_seconds", 0.5), ("max_open_seconds", math.inf), ("max_open_seconds", math.nan),
        ("half_open_calls", 0),
    ],
)
def test_bad_settings_are_refused(breaker_impl, name, value):
    with pytest.raises(ValueError, match=name):
        make(breaker_impl, **{name: value})
    breaker = make(breaker_impl)
    with pytest.raises(ValueError, match=name):
        breaker.reconfigure(**{**DEFAULTS, name: value}, now=0.0)
    # A refused change changes nothing.
    assert breaker.allow(0.0) == breaker_impl.ADMITTED


# --- properties ----------------------------------------------------------------

breaker_settings = st.fixed_dictionaries(
    {
        "window": st.floats(0.01, 100.0),
        "minimum_calls": st.integers(1, 20),
        "failure_rate": st.floats(0.01, 1.0),
        "consecutive_failures": st.integers(1, 8),
        "open_seconds": st.floats(0.01, 10.0),
        "max_open_ratio": st.floats(1.0, 10.0),
        "half_open_calls": st.integers(1, 5),
    }
)


def build(impl, values, now):
    values = dict(values)
    ratio = values.pop("max_open_ratio")
    values["max_open_seconds"] = values["open_seconds"] * ratio
    return impl.CircuitBreaker(**values, now=now)


# Time steps, mostly small, sometimes long, sometimes backwards (a clock that steps back).
steps = st.one_of(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 100.0), st.floats(-1.0, 0.0))
# Mostly calls and results, so that every state and transition is visited often.
calls = st.tuples(st.just("allow"), steps)
results = st.tuples(st.just("record"), steps, st.booleans())
operations = st.lists(
    st.one_of(
        calls, calls, results, results, results,
        st.tuples(st.just("record"), steps, st.just(False)),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("retry_after"), steps),
        st.tuples(st.just("force_open"), st.floats(-5.0, 500.0), st.integers(0, 6)),
        st.tuples(st.just("force_closed"),),
    ),
    min_size=20,
    max_size=200,
)


def observe(breaker, now):
    return (
        breaker.state, breaker.opened_count, breaker.open_until, breaker.trials,
        breaker.failures_in_a_row, breaker.window_counts(now), breaker.retry_after(now),
    )


@settings(max_examples=300)
@given(values=breaker_settings, start=st.floats(-1e3, 1e6), ops=operations)
def test_compiled_and_python_decide_identically(compiled_breaker, python_breaker, values, start, ops):
    compiled = build(compiled_breaker, values, start)
    python = build(python_breaker, values, start)
    now = start
    tickets = [0]
    for op in ops:
        kind = op[0]
        if kind in ("allow", "record", "retry_after"):
            now += op[1]
        if kind == "allow":
            answer = compiled.allow(now)
            assert python.allow(now) == answer
            tickets.append(answer)
        elif kind == "record":
            assert compiled.record(op[2], now) == python.record(op[2], now)
        elif kind == "release":
            ticket = tickets[op[1] % len(tickets)]
            compiled.release(ticket)
            python.release(ticket)
        elif kind == "force_open":
            compiled.force_open(now + op[1], op[2], now)
            python.force_open(now + op[1], op[2], now)
        elif kind == "force_closed":
            compiled.force_closed(now)
            python.force_closed(now)
        else:
            assert compiled.retry_after(now) == python.retry_after(now)
        assert observe(compiled, now) == observe(python, now)


@settings(max_examples=200)
@given(values=breaker_settings, ops=operations)
def test_never_more_trials_in_a_round_than_half_open_calls(breaker_impl, values, ops):
    breaker = build(breaker_impl, values, 0.0)
    limit = values["half_open_calls"]
    now = 0.0
    admitted: dict[int, int] = {}  # trial ticket (its round) -> admitted less released
    outstanding: list[int] = []
    for op in ops:
        kind = op[0]
        if kind in ("allow", "record", "retry_after"):
            now += abs(op[1])
        if kind == "allow":
            ticket = breaker.allow(now)
            if ticket > breaker_impl.ADMITTED:
                admitted[ticket] = admitted.get(ticket, 0) + 1
                assert admitted[ticket] <= limit
                outstanding.append(ticket)
            assert breaker.trials <= limit
        elif kind == "record":
            breaker.record(op[2], now)
        elif kind == "release" and outstanding:
            ticket = outstanding.pop(op[1] % len(outstanding))
            breaker.release(ticket)
            admitted[ticket] -= 1
        elif kind == "force_open":
            breaker.force_open(now + op[1], op[2], now)
        elif kind == "force_closed":
            breaker.force_closed(now)


@settings(max_examples=200)
@given(values=breaker_settings, ops=operations)
def test_an_opening_lasts_open_seconds_at_least_and_max_open_seconds_at_most(breaker_impl, values, ops):
    breaker = build(breaker_impl, values, 0.0)
    shortest = values["open_seconds"]
    longest = values["open_seconds"] * values["max_open_ratio"]
    now = 0.0

    def slack() -> float:
        # Rounding in `now + duration` and in `open_until - now` may move the
        # length by a few ulps of the larger of the two times.
        return 4 * math.ulp(max(now, breaker.open_until, longest))

    for op in ops:
        kind = op[0]
        if kind in ("allow", "record", "retry_after"):
            now += abs(op[1])
        if kind == "allow":
            breaker.allow(now)
        elif kind == "record":
            was = breaker.state
            if breaker.record(op[2], now) and breaker.state == breaker_impl.OPEN:
                assert was != breaker_impl.OPEN
                assert shortest - slack() <= breaker.open_until - now <= longest + slack()
                assert 0.0 < breaker.retry_after(now) <= longest + slack()
        elif kind == "force_open":
            breaker.force_open(now + op[1], op[2], now)
            assert breaker.open_until - now <= longest + slack()
            assert breaker.opened_count >= 1
        if breaker.state == breaker_impl.OPEN:
            assert breaker.retry_after(now) <= longest + slack()


@given(values=breaker_settings, times=st.lists(st.floats(0.0, 50.0), max_size=200))
def test_successes_alone_never_trip(breaker_impl, values, times):
    breaker = build(breaker_impl, values, 0.0)
    now = 0.0
    for step in times:
        now += step
        assert breaker.allow(now) == breaker_impl.ADMITTED
        assert breaker.record(True, now) is False
    assert breaker.state == breaker_impl.CLOSED


@given(values=breaker_settings, start=st.floats(0.0, 1e6), successes=st.integers(0, 50))
def test_consecutive_failures_always_trip(breaker_impl, values, start, successes):
    breaker = build(breaker_impl, values, start)
    for _ in range(successes):
        breaker.record(True, start)
    verdicts = [breaker.record(False, start) for _ in range(values["consecutive_failures"])]
    assert any(verdicts)
    assert breaker.state == breaker_impl.OPEN
    assert breaker.allow(start) == breaker_impl.REFUSED
