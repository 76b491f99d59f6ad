"""Record row ids (gateway._fast.ids): version 7 UUIDs (RFC 9562) that behave as any uuid.UUID does, ordered by the
time they were drawn, the same from both twins for the same random bytes and clock readings, one read of
randomness per 4096 ids; and the rows' time, `utc_now`, the same civil time from both twins for the same clock
reading."""

from __future__ import annotations

import pickle
import time
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

NOW_NS = 1_764_236_400_123_456_789  # 2025-11-27T09:40:00.123456789Z


def ticking(start: int, step: int):
    """A clock for RowIds that moves `step` nanoseconds (0: stands still) at each reading."""
    readings = [start]

    def read():
        readings[0] += step
        return readings[0] - step

    return read


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=16, max_size=80), min_size=1, max_size=6), st.integers(1, 40),
       st.integers(0, (1 << 63) - 10**12), st.integers(0, 10**9))
def test_the_twins_make_the_same_ids_from_the_same_random_bytes_and_clock(compiled_ids, python_ids, blocks, draws,
                                                                        start, step):
    def source():
        pending = list(blocks)
        return lambda n: pending.pop(0) if pending else b"\xff" * n

    ours = compiled_ids.RowIds(source(), ticking(start, step))
    theirs = python_ids.RowIds(source(), ticking(start, step))
    for _ in range(draws):
        made, expected = ours.next(), theirs.next()
        assert made == expected and made.int == expected.int


def test_an_id_is_a_version_7_uuid_that_behaves_as_any_uuid(ids_impl):
    made = ids_impl.RowIds().next()
    assert type(made) is uuid.UUID
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert made.is_safe is uuid.SafeUUID.unknown
    parsed = uuid.UUID(str(made))
    assert parsed == made and hash(parsed) == hash(made) and parsed.bytes == made.bytes
    assert pickle.loads(pickle.dumps(made)) == made
    assert sorted([made, parsed]) == [made, parsed]
    with pytest.raises(TypeError):
        made.int = 1  # as immutable as any UUID


def test_the_layout_is_milliseconds_version_fraction_variant_random(ids_impl):
    block = bytes(range(16)) + b"\xff" * 16 + b"\x00" * 16
    ids = ids_impl.RowIds(lambda n: block, iter([NOW_NS, 0, (1 << 63) - 1]).__next__)
    made = ids.next()
    milliseconds, within = divmod(NOW_NS, 1_000_000)
    assert made.int >> 80 == milliseconds
    assert made.int >> 64 & 0xFFF == within * 4096 // 1_000_000  # the sub-millisecond fraction, 12 bits
    assert made.bytes[8:] == bytes([0x80 | 0x08]) + bytes(range(9, 16))  # the variant over the random bytes
    assert ids.next().bytes == bytes.fromhex("0000000000007000bfffffffffffffff")  # the epoch
    last = ids.next()  # the clock's last reading: 2262-04-11T23:47:16.854775807Z
    assert last.int >> 80 == ((1 << 63) - 1) // 1_000_000 and last.bytes[8:] == b"\x80" + bytes(7)


def test_a_clock_reading_outside_the_ids_range_is_refused(ids_impl):
    for reading in (-1, 1 << 63):
        with pytest.raises(ValueError):
            ids_impl.RowIds(clock=lambda reading=reading: reading).next()


def test_ids_drawn_in_turn_sort_in_the_order_drawn_and_carry_the_time(ids_impl):
    before = time.time_ns()
    ids = ids_impl.RowIds()
    made = [ids.next() for _ in range(20_000)]
    after = time.time_ns()
    assert len(set(made)) == len(made)
    for first, second in zip(made, made[1:]):
        # In the order drawn, unless two share a 244 ns step of the fraction (then the random bits decide).
        assert first.int >> 64 <= second.int >> 64
    assert before // 1_000_000 <= made[0].int >> 80 <= made[-1].int >> 80 <= after // 1_000_000
    # Ids of a fast clock sort exactly in the order drawn: each reading a step later.
    stepped = ids_impl.RowIds(clock=ticking(NOW_NS, 250))
    drawn = [stepped.next() for _ in range(1000)]
    assert sorted(drawn) == drawn


def test_randomness_is_read_once_per_4096_ids_and_ids_do_not_repeat(ids_impl):
    import os

    reads = []

    def counted(n):
        reads.append(n)
        return os.urandom(n)

    # One clock reading for every id: uniqueness rests on the 62 random bits alone.
    ids = ids_impl.RowIds(counted, lambda: NOW_NS)
    made = {ids.next() for _ in range(3 * 4096 + 1)}
    assert len(made) == 3 * 4096 + 1
    assert reads == [16 * 4096] * 4


def test_a_source_that_gives_too_few_bytes_is_an_error(ids_impl):
    with pytest.raises(ValueError):
        ids_impl.RowIds(lambda n: b"short").next()


@settings(max_examples=2000, deadline=None)
@given(seconds=st.integers(-62135596800, 253402300799) | st.integers(-86400 * 3, 86400 * 3)
       | st.sampled_from([0, -1, 951782400, 951868800, 4107542400, 1767225599, 1767225600]),
       nanoseconds=st.integers(0, 999_999_999))
def test_the_twins_give_the_same_utc_time_for_the_same_clock_reading(compiled_ids, python_ids, seconds, nanoseconds):
    made, expected = compiled_ids.utc_at(seconds, nanoseconds), python_ids.utc_at(seconds, nanoseconds)
    assert made == expected and made.tzinfo is timezone.utc and made.microsecond == nanoseconds // 1000
    assert (made.year, made.month, made.day, made.hour, made.minute, made.second) == (
        expected.year, expected.month, expected.day, expected.hour, expected.minute, expected.second)


def test_a_clock_reading_outside_datetimes_range_is_refused(ids_impl):
    with pytest.raises(OverflowError):
        ids_impl.utc_at(253402300800, 0)  # 10000-01-01
    with pytest.raises(ValueError):
        ids_impl.utc_at(0, 1_000_000_000)


def test_now_is_the_systems_utc_time(ids_impl):
    before = datetime.now(timezone.utc)
    made = ids_impl.utc_now()
    after = datetime.now(timezone.utc)
    assert made.tzinfo is timezone.utc and before <= made <= after
