# cython: annotation_typing=False
# (Cython reads an `int` annotation as a Python int, which would clash with the
# C integers of breaker_c.pxd: the .pxd alone gives the compiled types.)
"""One upstream's circuit breaker: whether a call may go out, and what its results say.

Owns the state machine and its counts, nothing else: no I/O, no clock reads
(every call takes `now`, the caller's monotonic time in seconds), no knowledge
of Redis or of other processes (registry/breakers.py shares the transitions).

States:
- CLOSED: every call goes out. Results are counted in a sliding window of
  `window` seconds, kept as `_BUCKETS` buckets of (calls, failures), so the
  window covers the last 9/10 to 10/10 of `window`. It trips (opens) when the
  window holds at least `minimum_calls` calls of which at least
  `failure_rate` failed, or on `consecutive_failures` failures in a row.
- OPEN: every call is refused until `open_until`. It stays open
  `open_seconds` x the times it opened in a row (`opened_count`), at most
  `max_open_seconds` (Envoy's outlier ejection: 30 s x ejections, capped).
  Results that arrive while open (calls that went out before) are ignored.
- HALF_OPEN: the first `allow` at or after `open_until` starts a round of at
  most `half_open_calls` trial calls. Any failure opens it again (for longer);
  `half_open_calls` successes close it, with fresh counts and `opened_count`
  back to 0. A result counts whoever made the call: a call that went out
  before the breaker opened and answers during the round is evidence too.

Admission tickets: `allow` answers 0 (REFUSED), 1 (ADMITTED, closed) or a
trial ticket above 1, the number of its half-open round. A call that ends
without a result (cancelled) hands its ticket to `release`, so its trial slot
is not lost; a ticket of a round that is over, or ADMITTED, releases nothing.
As a safety net against a slot that leaks anyway, a round that has handed out
every trial and reached no verdict within `max_open_seconds` starts afresh.

What counts as a failure is the caller's classification: transport errors,
timeouts and HTTP 5xx answers from the upstream are failures; a tool's own
`isError` result, or any JSON-RPC answer the upstream gave in time, is not (the
upstream is working; the tool said no).

This file is also the compiled module: `breaker_c.py` is a symlink to it and
`breaker_c.pxd` gives it C types, so keep it to integer and float arithmetic.
"""

import math

CLOSED = 0
OPEN = 1
HALF_OPEN = 2
STATE_NAMES = ("closed", "open", "half_open")
REFUSED = 0
ADMITTED = 1

# The same constants, for the methods: the .pxd makes these C integers, which
# the public names above (Python objects, importable) cannot be.
_CLOSED = 0
_OPEN = 1
_HALF_OPEN = 2
_REFUSED = 0
_ADMITTED = 1
# The window's buckets: the .pxd sizes its C arrays with the same number.
_BUCKETS = 10
# Counts (calls, failures in a row, trials) are at most this: a C long long on
# both sides, and no setting comes near it.
_MAX_COUNT = 2147483647.0
_NEVER = math.inf


def _check_settings(
    window: float,
    minimum_calls: float,
    failure_rate: float,
    consecutive_failures: float,
    open_seconds: float,
    max_open_seconds: float,
    half_open_calls: float,
) -> None:
    # Ranges, so NaN and infinity are refused too.
    if not 0.0 < window < _NEVER:
        raise ValueError(f"window must be positive and finite, got {window!r}")
    if not 1.0 <= minimum_calls <= _MAX_COUNT:
        raise ValueError(f"minimum_calls must be within [1, {_MAX_COUNT:.0f}], got {minimum_calls!r}")
    if not 0.0 < failure_rate <= 1.0:
        raise ValueError(f"failure_rate must be within (0, 1], got {failure_rate!r}")
    if not 1.0 <= consecutive_failures <= _MAX_COUNT:
        raise ValueError(
            f"consecutive_failures must be within [1, {_MAX_COUNT:.0f}], got {consecutive_failures!r}"
        )
    if not 0.0 < open_seconds < _NEVER:
        raise ValueError(f"open_seconds must be positive and finite, got {open_seconds!r}")
    if not open_seconds <= max_open_seconds < _NEVER:
        raise ValueError(
            f"max_open_seconds must be finite and at least open_seconds ({open_seconds!r}), got {max_open_seconds!r}"
        )
    if not 1.0 <= half_open_calls <= _MAX_COUNT:
        raise ValueError(f"half_open_calls must be within [1, {_MAX_COUNT:.0f}], got {half_open_calls!r}")


class CircuitBreaker:
    """Closed, open or half-open, decided from the results of the calls (see the module docstring).

    Starts closed with empty counts at `now`.
    """

    def __init__(
        self,
        window: float,
        minimum_calls: int,
        failure_rate: float,
        consecutive_failures: int,
        open_seconds: float,
        max_open_seconds: float,
        half_open_calls: int,
        now: float,
    ) -> None:
        # A literal length: Cython fills the .pxd's C arrays from it (and the
        # twin's lists must be as long).
        self._calls = [0] * 10
        self._failures = [0] * 10
        self._set(window, minimum_calls, failure_rate, consecutive_failures, open_seconds, max_open_seconds,
                  half_open_calls)
        self._state = _CLOSED
        self._openings = 0
        self._open_until = 0.0
        self._round = _ADMITTED  # the next round's tickets are 2, 3, ...: never ADMITTED, never REFUSED
        self._round_started = 0.0
        self._trials = 0
        self._successes = 0
        self._clear(now)

    def _set(self, window, minimum_calls, failure_rate, consecutive_failures, open_seconds, max_open_seconds,
             half_open_calls) -> None:
        _check_settings(window, minimum_calls, failure_rate, consecutive_failures, open_seconds, max_open_seconds,
                        half_open_calls)
        self._window = float(window)
        self._width = self._window / _BUCKETS
        # int(): a fraction is cut the same way on both sides (the compiled
        # fields are C integers).
        self._minimum_calls = int(minimum_calls)
        self._failure_rate = float(failure_rate)
        self._consecutive_limit = int(consecutive_failures)
        self._open_seconds = float(open_seconds)
        self._max_open_seconds = float(max_open_seconds)
        self._half_open_calls = int(half_open_calls)

    # -- state, for callers and metrics -----------------------------------------------------------

    @property
    def state(self) -> int:
        """CLOSED, OPEN or HALF_OPEN as last decided (OPEN turns HALF_OPEN on the first `allow` after `open_until`)."""
        return self._state

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self._state]

    @property
    def opened_count(self) -> int:
        """Times it opened in a row since it last closed (0 while it has not opened since)."""
        return self._openings

    @property
    def open_until(self) -> float:
        """When the current or latest opening ends (the caller's clock); 0.0 if it never opened."""
        return self._open_until

    @property
    def trials(self) -> int:
        """Trial calls of the current half-open round out and not released (0 outside HALF_OPEN)."""
        return self._trials if self._state == _HALF_OPEN else 0

    @property
    def failures_in_a_row(self) -> int:
        return self._in_a_row

    def window_counts(self, now: float) -> tuple:
        """(calls, failures) counted in the window at `now`; counting happens only while CLOSED."""
        self._advance(now)
        return (self._total_calls, self._total_failures)

    # -- the request path -------------------------------------------------------------------------

    def allow(self, now: float) -> int:
        """May a call go out at `now`? 0 (REFUSED): no; otherwise its ticket (see the module docstring)."""
        state = self._state
        if state == _CLOSED:
            return _ADMITTED
        if state == _OPEN:
            # Written so that a NaN `now` refuses rather than ends the opening.
            if not now >= self._open_until:
                return _REFUSED
            self._state = _HALF_OPEN
            self._start_round(now)
        if self._trials < self._half_open_calls:
            self._trials += 1
            return self._round
        # Every trial is out and none has answered: a slot that leaked must not
        # hold the breaker half-open (and refusing) forever.
        if now - self._round_started >= self._max_open_seconds:
            self._start_round(now)
            self._trials = 1
            return self._round
        return _REFUSED

    def record(self, success: bool, now: float) -> bool:
        """Count one call's result; True when it changed the state (opened or closed the breaker).

        `success`: the upstream answered in time (see the module docstring for
        what counts as a failure).
        """
        state = self._state
        if state == _CLOSED:
            self._advance(now)
            head = self._head
            self._calls[head] += 1
            self._total_calls += 1
            if success:
                self._in_a_row = 0
            else:
                self._failures[head] += 1
                self._total_failures += 1
                self._in_a_row += 1
            if self._in_a_row >= self._consecutive_limit or (
                self._total_calls >= self._minimum_calls
                and self._total_failures >= self._failure_rate * self._total_calls
            ):
                self._open(now)
                return True
            return False
        if state == _OPEN:
            return False
        if not success:
            self._open(now)
            return True
        self._successes += 1
        if self._successes >= self._half_open_calls:
            self._close(now)
            return True
        return False

    def release(self, ticket: int) -> None:
        """A call admitted with `ticket` ended without a result: give back its trial slot, if it held one."""
        if self._state == _HALF_OPEN and ticket == self._round and self._trials > 0:
            self._trials -= 1

    def retry_after(self, now: float) -> float:
        """Seconds from `now` until a call may be allowed: 0.0 if now.

        Open: until `open_until`. Half-open with every trial out: the verdict is
        pending, so `open_seconds` (no later than the round's safety net).
        """
        state = self._state
        if state == _CLOSED:
            return 0.0
        if state == _OPEN:
            wait = self._open_until - now
            return wait if wait > 0.0 else 0.0
        if self._trials < self._half_open_calls:
            return 0.0
        wait = self._round_started + self._max_open_seconds - now
        if wait > self._open_seconds:
            return self._open_seconds
        return wait if wait > 0.0 else 0.0

    # -- from outside: another process decided (registry/breakers.py) ----------------------------

    def force_open(self, until: float, openings: int, now: float) -> None:
        """Open until `until` (the caller's clock), as the `openings`-th opening in a row.

        Never beyond `now + max_open_seconds`; `openings` is at least 1. An
        `until` already past leaves it open only until the next `allow`, which
        starts a half-open round.
        """
        latest = now + self._max_open_seconds
        # A range, so NaN means the longest opening, not a never-ending one.
        self._open_until = until if until <= latest else latest
        self._openings = openings if openings > 1 else 1
        self._state = _OPEN
        self._trials = 0
        self._successes = 0

    def force_closed(self, now: float) -> None:
        """Close with fresh counts, as after a successful half-open round."""
        self._close(now)

    def reconfigure(
        self,
        window: float,
        minimum_calls: int,
        failure_rate: float,
        consecutive_failures: int,
        open_seconds: float,
        max_open_seconds: float,
        half_open_calls: int,
        now: float,
    ) -> None:
        """Change the settings, keeping the state; the counts start afresh only if `window` changed.

        An opening in force ends no later than `now + max_open_seconds`; the
        next opening is timed by the new settings.
        """
        old_window = self._window
        self._set(window, minimum_calls, failure_rate, consecutive_failures, open_seconds, max_open_seconds,
                  half_open_calls)
        if self._window != old_window:
            self._clear(now)
        if self._state == _OPEN and self._open_until > now + self._max_open_seconds:
            self._open_until = now + self._max_open_seconds

    # -- internals --------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        # Moves the head bucket forward to the one holding `now`, emptying the
        # buckets that left the window. A clock that steps back counts into the
        # head bucket.
        if not now >= self._bucket_end:
            return
        if now >= self._bucket_end + self._window:
            # Every bucket is stale: start over aligned on `now`.
            self._clear(now)
            return
        # At most _BUCKETS steps (`for`, not `while`: a width below the
        # resolution of `now` must not spin).
        for _ in range(_BUCKETS):
            head = self._head + 1
            if head == _BUCKETS:
                head = 0
            self._head = head
            self._total_calls -= self._calls[head]
            self._total_failures -= self._failures[head]
            self._calls[head] = 0
            self._failures[head] = 0
            self._bucket_end += self._width
            if now < self._bucket_end:
                return
        # Rounding left `now` past the last bucket: every bucket was emptied.
        self._bucket_end = now + self._width

    def _clear(self, now: float) -> None:
        for i in range(_BUCKETS):
            self._calls[i] = 0
            self._failures[i] = 0
        self._head = 0
        self._bucket_end = now + self._width
        self._total_calls = 0
        self._total_failures = 0
        self._in_a_row = 0

    def _start_round(self, now: float) -> None:
        self._round += 1
        self._round_started = now
        self._trials = 0
        self._successes = 0

    def _open(self, now: float) -> None:
        self._openings += 1
        duration = self._open_seconds * self._openings
        if duration > self._max_open_seconds:
            duration = self._max_open_seconds
        self._open_until = now + duration
        self._state = _OPEN
        self._trials = 0
        self._successes = 0

    def _close(self, now: float) -> None:
        self._state = _CLOSED
        self._openings = 0
        self._trials = 0
        self._successes = 0
        self._clear(now)
