"""Record row ids (gateway._fast.ids): version 4 UUIDs that behave as uuid.uuid4()'s do, the same from both
twins for the same random bytes, one read of randomness per 4096 ids; and the rows' time, `utc_now`, the same
civil time from both twins for the same clock reading."""

from __future__ import annotations

import pickle
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=16, max_size=80), min_size=1, max_size=6), st.integers(1, 40))
def test_the_twins_make_the_same_ids_from_the_same_random_bytes(compiled_ids, python_ids, blocks, draws):
    def source():
        pending = list(blocks)
        return lambda n: pending.pop(0) if pending else b"\xff" * n

    ours, theirs = compiled_ids.RowIds(source()), python_ids.RowIds(source())
    for _ in range(draws):
        made, expected = ours.next(), theirs.next()
        assert made == expected and made.int == expected.int


def test_an_id_is_a_version_4_uuid_like_uuid4s(ids_impl):
    made = ids_impl.RowIds().next()
    assert type(made) is uuid.UUID
    assert made.version == 4 and made.variant == uuid.RFC_4122
    assert made.is_safe is uuid.SafeUUID.unknown
    parsed = uuid.UUID(str(made))
    assert parsed == made and hash(parsed) == hash(made) and parsed.bytes == made.bytes
    assert pickle.loads(pickle.dumps(made)) == made
    assert sorted([made, parsed]) == [made, parsed]
    with pytest.raises(TypeError):
        made.int = 1  # as immutable as any UUID


def test_the_bits_outside_version_and_variant_are_the_random_ones(ids_impl):
    block = bytes(range(16)) + b"\xff" * 16 + b"\x00" * 16
    ids = ids_impl.RowIds(lambda n: block)
    assert ids.next() == uuid.UUID(bytes=bytes(range(16)), version=4)
    assert ids.next().bytes == bytes.fromhex("ffffffffffff4fffbfffffffffffffff")
    assert ids.next().bytes == bytes.fromhex("00000000000040008000000000000000")


def test_randomness_is_read_once_per_4096_ids_and_ids_do_not_repeat(ids_impl):
    import os

    reads = []

    def counted(n):
        reads.append(n)
        return os.urandom(n)

    ids = ids_impl.RowIds(counted)
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
