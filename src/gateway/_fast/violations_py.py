"""Violation counting for per-address bans: how close each address is to a ban.

Owns the counts of the addresses seen violating and their arithmetic, nothing
else: no I/O, no clock reads (every call takes `now`, the caller's monotonic
time), no knowledge of bans, Redis or CIDR ranges (limits/bans.py has those).

Each address holds a decaying count: a violation adds 1 and the count drains
continuously at `threshold / window` per second, never below 0. A count that
rises above `threshold - 1` is the verdict "ban". So `threshold` violations in
a burst ban (even with a little drained between them, as a client's round
trips take time), and so does violating faster than `threshold` per `window`
for long enough; a pace at or below that rate never accumulates (it is the
sustained rate allowed).

Memory is bounded: `sweep` forgets the counts that drained to 0, and a table
holding `max_addresses` makes room for a new address by sweeping and then
forgetting the longest-tracked addresses (1/16 of the table at once, so the
cost is amortized over the next inserts).

This file is also the compiled module: `violations_c.py` is a symlink to it and
`violations_c.pxd` gives it C types, so keep it to float arithmetic and dicts.
"""

import itertools
import math

# A module global rather than `math.inf` at the use site: the .pxd makes it a C double.
_NEVER = math.inf


def _check_limits(threshold: float, window: float) -> None:
    # Ranges, so NaN and infinity are refused too.
    if not 0.0 < threshold < _NEVER:
        raise ValueError(f"threshold must be positive and finite, got {threshold!r}")
    if not 0.0 < window < _NEVER:
        raise ValueError(f"window must be positive and finite, got {window!r}")


class _Entry:
    """One address's count and the latest time it was drained to."""

    def __init__(self, count: float, last: float) -> None:
        self.count = count
        self.last = last


class ViolationCounts:
    """Decaying violation counts per address: +1 a violation, draining at `threshold / window` per second."""

    def __init__(self, threshold: float, window: float, max_addresses: int = 65_536) -> None:
        _check_limits(threshold, window)
        if max_addresses < 16:
            raise ValueError(f"max_addresses must be at least 16, got {max_addresses!r}")
        self._threshold = float(threshold)
        self._window = float(window)
        self._drain = self._threshold / self._window
        self._max = max_addresses
        self._entries = {}

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def window(self) -> float:
        return self._window

    def __len__(self) -> int:
        return len(self._entries)

    def _drained(self, entry: _Entry, now: float) -> float:
        elapsed = now - entry.last
        # A clock that steps back drains nothing, and `last` keeps the latest
        # time seen so no interval is drained twice.
        if elapsed > 0.0:
            count = entry.count - elapsed * self._drain
            entry.count = count if count > 0.0 else 0.0
            entry.last = now
        return entry.count

    def add(self, address: str, now: float) -> bool:
        """Count one violation of `address`; True when its count has reached the threshold."""
        entry = self._entries.get(address)
        if entry is None:
            if len(self._entries) >= self._max:
                self._make_room(now)
            entry = _Entry(1.0, now)
            self._entries[address] = entry
        else:
            entry.count = self._drained(entry, now) + 1.0
        # Within one violation of the threshold, not at it: what drained between
        # the violations of a burst (a request's round trip) must not save it.
        return entry.count > self._threshold - 1.0

    def count(self, address: str, now: float) -> float:
        """The count of `address` at `now` (0.0 for an address not tracked)."""
        entry = self._entries.get(address)
        if entry is None:
            return 0.0
        return self._drained(entry, now)

    def forget(self, address: str) -> None:
        """Drop the count of `address` (it was banned, or its ban lifted)."""
        self._entries.pop(address, None)

    def sweep(self, now: float) -> int:
        """Forget every count that drained to 0 by `now`; how many were forgotten."""
        drained = [address for address, entry in self._entries.items() if self._drained(entry, now) == 0.0]
        for address in drained:
            del self._entries[address]
        return len(drained)

    def _make_room(self, now: float) -> None:
        self.sweep(now)
        # Still nearly full: forget the addresses tracked longest (dicts keep
        # insertion order). Their shared count in Redis, if any, still stands.
        excess = len(self._entries) - (self._max - self._max // 16)
        if excess > 0:
            for address in list(itertools.islice(self._entries, excess)):
                del self._entries[address]

    def reconfigure(self, threshold: float, window: float, now: float) -> None:
        """Change the threshold and window; counts drain at the old rate up to `now`."""
        _check_limits(threshold, window)
        for entry in self._entries.values():
            self._drained(entry, now)
        self._threshold = float(threshold)
        self._window = float(window)
        self._drain = self._threshold / self._window
