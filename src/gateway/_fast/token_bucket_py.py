"""Token bucket arithmetic for the rate limiter's hot path.

Owns one bucket's state and arithmetic, nothing else: no I/O and no clock
reads. Every call takes `now`, a monotonic time in seconds read by the caller,
so one clock read serves every tier of a request and tests need no fake clock.

This file is also the compiled module: `token_bucket_c.py` is a symlink to it
and `token_bucket_c.pxd` gives it C types, so keep it to float arithmetic.
"""

import math

# A module global rather than `math.inf` at the use site: the .pxd makes it a
# C double, so the methods that return it never look anything up.
_NEVER = math.inf


def _check_limits(capacity: float, refill_per_second: float) -> None:
    # Written as ranges so NaN and infinity are refused too: either would turn
    # the arithmetic below into NaN.
    if not 0.0 < capacity < _NEVER:
        raise ValueError(f"capacity must be positive and finite, got {capacity!r}")
    if not 0.0 <= refill_per_second < _NEVER:
        raise ValueError(
            f"refill_per_second must be non-negative and finite, got {refill_per_second!r}"
        )


class TokenBucket:
    """Holds up to `capacity` tokens, refilled continuously at `refill_per_second`.

    Starts full. Refill is lazy: each call first credits the time elapsed
    since the latest `now` seen, so the bucket costs nothing while idle.
    """

    def __init__(self, capacity: float, refill_per_second: float, now: float) -> None:
        _check_limits(capacity, refill_per_second)
        self._capacity = float(capacity)
        self._refill_per_second = float(refill_per_second)
        self._tokens = self._capacity
        self._last = float(now)

    # Read-only: limits change through `reconfigure`, which keeps the tokens
    # within the new capacity.
    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def refill_per_second(self) -> float:
        return self._refill_per_second

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        # A clock that steps back mints nothing, and `_last` keeps the latest
        # time seen so no interval is credited twice.
        if elapsed > 0.0:
            tokens = self._tokens + elapsed * self._refill_per_second
            self._tokens = tokens if tokens < self._capacity else self._capacity
            self._last = now

    def try_acquire(self, cost: float, now: float) -> bool:
        """Take `cost` tokens and return True if the bucket holds them; else take none."""
        self._refill(now)
        # A range, so a negative or NaN cost is refused: it can neither pass
        # nor mint tokens.
        if 0.0 <= cost <= self._tokens:
            self._tokens -= cost
            return True
        return False

    def retry_after(self, cost: float, now: float) -> float:
        """Seconds from `now` until `cost` tokens are held: 0.0 if now, inf if never.

        Exact in the sense that counts: with no other use of the bucket,
        `try_acquire(cost, now + retry_after(cost, now))` succeeds.
        """
        self._refill(now)
        if not 0.0 <= cost <= self._capacity:
            return _NEVER
        missing = cost - self._tokens
        if missing <= 0.0:
            return 0.0
        if self._refill_per_second == 0.0:
            return _NEVER
        # Tokens accrue from `_last`, which is later than `now` if the clock
        # stepped back.
        wait = (self._last - now) + missing / self._refill_per_second
        # Rounding in `now + wait` and in the refill can leave the bucket an ulp
        # short at that instant (about one call in ten). Step forward from about
        # an ulp (2**-52 relative), doubling, until the refill `try_acquire`
        # will compute covers `cost`: it is monotone in `wait`, so this ends,
        # in practice within three steps.
        step = (abs(now) + abs(wait)) * 2.220446049250313e-16 + 5e-324
        while self._tokens + ((now + wait) - self._last) * self._refill_per_second < cost:
            wait += step
            step += step
        return wait

    def available(self, now: float) -> float:
        """Tokens held at `now`, without taking any."""
        self._refill(now)
        return self._tokens

    def refund(self, cost: float) -> None:
        """Give back tokens taken for a request a later tier refused; never beyond capacity."""
        # A negative or NaN refund is ignored rather than allowed to take tokens.
        if cost > 0.0:
            tokens = self._tokens + cost
            self._tokens = tokens if tokens < self._capacity else self._capacity

    def reconfigure(self, capacity: float, refill_per_second: float, now: float) -> None:
        """Change the limits, keeping the tokens held (at most the new capacity)."""
        _check_limits(capacity, refill_per_second)
        # Time up to `now` accrues at the old rate.
        self._refill(now)
        self._capacity = float(capacity)
        self._refill_per_second = float(refill_per_second)
        if self._tokens > self._capacity:
            self._tokens = self._capacity

    def set_available(self, tokens: float, now: float) -> None:
        """Hold `tokens` from `now` on (at most the capacity, at least minus the capacity).

        For a bucket that is one process's share of a shared one
        (limits/shared.py): a synchronization replaces the local count with the
        share of what the shared bucket holds. A negative count is a debt that
        the refill pays back before anything is admitted.
        """
        self._refill(now)
        # A range, so NaN changes nothing.
        if -self._capacity <= tokens <= self._capacity:
            self._tokens = tokens
        elif tokens > self._capacity:
            self._tokens = self._capacity
        elif tokens < -self._capacity:
            self._tokens = -self._capacity
