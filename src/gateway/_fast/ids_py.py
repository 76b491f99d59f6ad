"""Time-ordered (version 7) UUIDs for record rows, drawn from blocks of randomness, and the rows' time (the twin
of `ids_c.pyx`).

Every request log row and audit entry gets a new id, and each is the primary
key of a table that only grows. A random (version 4) id lands anywhere in the
key's B-tree: once the index outgrows the database's cache, most inserts read
and dirty a page no recent insert touched (bench/row_ids.py, 300,000
request_logs rows in batches of 2,000, the last 100,000: SQLite 24.7 us a row
with version 4 ids, 11.8 with these; PostgreSQL's backend 9.7 and 6.4 us). A
version 7 id (RFC 9562) starts with the Unix time in milliseconds, so a batch's
ids go in side by side at the right edge of the index, as its `created_at`
values do in theirs.

Layout: 48 bits of milliseconds, the version (7), 12 bits of the sub-millisecond
fraction (RFC 9562's "increased clock precision", about 244 ns a step: ids a
process draws in turn sort in the order drawn unless they share a step), the
variant, then 62 random bits. `RowIds.next` reads 64 KiB of randomness once per
4096 ids (8 bytes of each 16 are used) and builds the UUID object directly,
without `uuid.UUID`'s checking constructor. The compiled twin reads the clock
and builds it at C level (the int from the 16 bytes, the two slots set).

`utc_now` is `datetime.now(timezone.utc)`; the compiled twin reads the clock
and builds the datetime itself (the civil date from the day count, no gmtime
and no time zone conversion): about 230 -> 55 ns (timeit), once per request.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone

BLOCK = 16 * 4096
_RANDOM_BITS = (1 << 62) - 1  # rand_b: the low 62 bits
_V7 = (0x7000 << 64) | (0x8000 << 48)  # version 7, variant RFC 9562 (10)
_NANOSECONDS_CAP = 1 << 63  # what the clock gives (time.time_ns, a signed 64-bit count): until 2262
_new, _set = uuid.UUID.__new__, object.__setattr__  # UUID forbids ordinary attribute writes
# Looked up once: reading an enum member off its class runs Python code in 3.11 (callgrind: ~5k instructions).
_UNKNOWN_SAFETY = uuid.SafeUUID.unknown


def v7_int(nanoseconds: int, random_bits: int) -> int:
    """The 128-bit value of a version 7 id drawn at `nanoseconds` since the epoch, with `random_bits` (only the
    low 62 are used): milliseconds, version, the sub-millisecond fraction in 12 bits, variant, random bits."""
    if not 0 <= nanoseconds < _NANOSECONDS_CAP:
        raise ValueError("a time outside a version 7 id's range")
    milliseconds, within = divmod(nanoseconds, 1_000_000)
    fraction = within * 4096 // 1_000_000
    return milliseconds << 80 | fraction << 64 | _V7 | random_bits & _RANDOM_BITS


class RowIds:
    """A source of version 7 UUIDs; `random(n)` gives the bytes (`os.urandom`, or a test's own), `clock()` the
    time in nanoseconds since the epoch (`time.time_ns`, or a test's own)."""

    __slots__ = ("_block", "_at", "_random", "_clock")

    def __init__(self, random=os.urandom, clock=time.time_ns) -> None:
        self._random = random
        self._clock = clock
        self._block = b""
        self._at = 0

    def next(self) -> uuid.UUID:
        at = self._at
        if at + 16 > len(self._block):
            self._block, at = bytes(self._random(BLOCK)), 0
            if len(self._block) < 16:
                raise ValueError("the random source gave fewer than 16 bytes")
        self._at = at + 16
        made = _new(uuid.UUID)
        _set(made, "int", v7_int(self._clock(), int.from_bytes(self._block[at + 8 : at + 16], "big")))
        _set(made, "is_safe", _UNKNOWN_SAFETY)
        return made


def utc_now() -> datetime:
    """The time now as an aware UTC datetime (microseconds, the system clock)."""
    return datetime.now(timezone.utc)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def utc_at(seconds: int, nanoseconds: int) -> datetime:
    """`seconds` since the epoch and `nanoseconds` (0 to 999,999,999, cut to microseconds) as an aware UTC
    datetime (what the compiled `utc_now` builds from the clock's reading)."""
    if not 0 <= nanoseconds < 1_000_000_000:
        raise ValueError("nanoseconds out of range")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanoseconds // 1000)


__all__ = ("BLOCK", "RowIds", "utc_at", "utc_now", "v7_int")
