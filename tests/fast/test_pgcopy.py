"""The binary COPY encoder (gateway._fast.pgcopy): both twins write the same bytes, and PostgreSQL stores
from them exactly what it stores from asyncpg's own COPY of the same rows."""

from __future__ import annotations

import asyncio
import math
import struct
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
from asyncpg.pgproto.pgproto import UUID as AsyncpgUUID
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

UTC = timezone.utc
KINDS = "UTJSILFBZ"

# -- values of each kind: what the record tables hold, their edges, and what a column must refuse ----------------
def _json(text):
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False) | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text.map(lambda t: t[:5]), inner, max_size=3),
        max_leaves=8,
    )


_ZONES = st.none() | st.just(UTC) | st.timedeltas(timedelta(hours=-23), timedelta(hours=23)).map(timezone) \
    | st.timezones()
_RANGE = {"S": 2**15, "I": 2**31, "L": 2**63}


def _valid(kind: str, text=st.text()):
    if kind == "U":
        # asyncpg's own UUID too: the ids of keys, users and tenants read from the database.
        return (st.uuids() | st.uuids().map(str) | st.uuids().map(lambda u: u.hex.upper())
                | st.uuids().map(lambda u: AsyncpgUUID(str(u))))
    if kind == "T":
        return text
    if kind == "J":  # as text, or as its UTF-8 (the audit entries' details)
        return _json(text).map(lambda value: orjson.dumps(value).decode()) | _json(text).map(orjson.dumps)
    if kind in _RANGE:
        bound = _RANGE[kind]
        return st.integers(-bound, bound - 1) | st.sampled_from((-bound, bound - 1, 0, -1)) | st.booleans()
    if kind == "F":
        return st.floats() | st.integers(-(2**60), 2**60)
    if kind == "B":
        return st.booleans()
    return st.datetimes(timezones=_ZONES) | st.sampled_from(
        (datetime.max, datetime.min, datetime(2000, 1, 1, tzinfo=UTC), datetime(1999, 12, 31, 23, 59, 59, 999999),
         datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)))


def _invalid(kind: str):
    wrong = st.sampled_from((b"bytes", 1.5, [1], object(), "text", 7, datetime(2020, 1, 1)))
    if kind == "U":
        return wrong.filter(lambda v: not isinstance(v, str)) | st.text(max_size=40)
    if kind in _RANGE:
        bound = _RANGE[kind]
        return wrong.filter(lambda v: not isinstance(v, int)) | st.integers(bound, bound * 4) \
            | st.integers(-bound * 4, -bound - 1)
    if kind == "T" or kind == "J":  # bytes are a jsonb's UTF-8, never a text's
        return wrong.filter(lambda v: not isinstance(v, str) and (kind == "T" or type(v) is not bytes)) \
            | st.just("\ud800 lone surrogate")
    if kind == "Z":
        return wrong.filter(lambda v: not isinstance(v, datetime)) | st.just(datetime(1, 1, 1, tzinfo=timezone(
            timedelta(hours=1))))  # before year 1 in UTC
    return wrong.filter(lambda v: type(v) not in (bool, int, float) or kind == "B" and type(v) is not bool)


@st.composite
def _batch(draw, with_invalid: bool):
    kinds = draw(st.text(alphabet=KINDS, min_size=1, max_size=12))
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        row = []
        for kind in kinds:
            choice = draw(st.integers(0, 9))
            if choice == 0:
                row.append(None)
            elif choice == 1 and with_invalid:
                row.append(draw(_invalid(kind)))
            else:
                row.append(draw(_valid(kind)))
        rows.append(tuple(row) if draw(st.booleans()) else row)
    return kinds, rows


def _outcome(module, kinds, rows, header=True, trailer=True):
    try:
        return module.encode(kinds, rows, header, trailer)
    except Exception as exc:  # noqa: BLE001 - the exception's type is what is compared
        return type(exc)


@settings(max_examples=600, deadline=None)
@given(_batch(with_invalid=True), st.booleans(), st.booleans())
def test_the_twins_write_the_same_bytes_and_refuse_the_same_values(compiled_pgcopy, python_pgcopy, batch, header,
                                                                   trailer):
    kinds, rows = batch
    assert _outcome(compiled_pgcopy, kinds, rows, header, trailer) == _outcome(python_pgcopy, kinds, rows, header,
                                                                              trailer)


def test_a_stream_has_the_header_the_rows_and_the_trailer(pgcopy_impl):
    at = datetime(2000, 1, 1, 0, 0, 1, 5, tzinfo=UTC)
    data = pgcopy_impl.encode("UTJIZ", [(uuid.UUID(int=1), "é", "{}", -2, at), (None,) * 5])
    assert data == (
        b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
        + b"\x00\x05" + struct.pack(">i", 16) + uuid.UUID(int=1).bytes + struct.pack(">i", 2) + "é".encode()
        + struct.pack(">ib", 3, 1) + b"{}" + struct.pack(">ii", 4, -2) + struct.pack(">iq", 8, 1_000_005)
        + b"\x00\x05" + struct.pack(">i", -1) * 5
        + b"\xff\xff"
    )
    assert pgcopy_impl.encode("T", []) == b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + b"\xff\xff"
    # The pieces of a stream sent as several messages: the header only in the first, the trailer in the last.
    assert pgcopy_impl.encode("I", [(1,)], False, False) == b"\x00\x01" + struct.pack(">ii", 4, 1)
    assert pgcopy_impl.encode("I", [(1,)], header=False) == b"\x00\x01" + struct.pack(">ii", 4, 1) + b"\xff\xff"


@pytest.mark.parametrize(("kinds", "row", "error"), [
    ("II", (1,), ValueError),  # a short row
    ("I", (1, 2), ValueError),
    ("X", (1,), ValueError),  # a kind without an encoding
    ("I", (2**31,), OverflowError),
    ("S", (-(2**15) - 1,), OverflowError),
    ("L", (2**64,), OverflowError),
    ("I", ("SECRET-1",), TypeError),
    ("U", ("SECRET-2",), ValueError),
    ("U", (b"SECRET-3",), TypeError),
    ("T", (b"SECRET-4",), TypeError),
    ("Z", ("SECRET-5",), TypeError),
    ("F", ("SECRET-6",), TypeError),
])
def test_a_value_a_column_cannot_take_is_refused_without_quoting_it(pgcopy_impl, kinds, row, error):
    with pytest.raises(error) as caught:
        pgcopy_impl.encode(kinds, [row])
    assert "SECRET" not in str(caught.value)


def test_times_count_from_2000_in_utc_whatever_their_offset(pgcopy_impl):
    def micros(value):
        return struct.unpack(">q", pgcopy_impl.encode("Z", [(value,)])[-10:-2])[0]

    utc = datetime(2026, 11, 26, 13, 45, 7, 123456, tzinfo=UTC)
    expected = round((utc - datetime(2000, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    assert micros(utc) == expected
    assert micros(utc.astimezone(timezone(timedelta(hours=-7, minutes=-30)))) == expected
    assert micros(datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1
    assert micros(datetime.max) == 2**63 - 1 and micros(datetime.min) == -(2**63)


# -- against PostgreSQL: what it stores from our stream is what it stores from asyncpg's ------------------------
_COLUMNS = ("n", "u", "t", "v", "j", "s", "i", "l", "f", "b", "z")
_TABLE = "(n int, u uuid, t text, v varchar(64), j jsonb, s smallint, i int, l bigint, f float8, b bool, z timestamptz)"
_STORABLE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@st.composite
def _storable_rows(draw):
    rows = []
    for n in range(draw(st.integers(1, 6))):
        row = [n]
        for kind in "UTTJSILFBZ":
            if draw(st.integers(0, 7)) == 0:
                row.append(None)
                continue
            strategy = _valid(kind, _STORABLE_TEXT)
            if kind == "T" and len(row) == 3:  # the varchar(64) column
                strategy = _STORABLE_TEXT.map(lambda text: text[:64])
            if kind == "Z":  # in UTC between the years 1 and 9999 (asyncpg and ours both refuse the rest)
                strategy = strategy.filter(lambda at: datetime(1, 1, 2) < at.replace(tzinfo=None) < datetime(9999, 12, 30)
                                           if at.tzinfo is None else
                                           datetime(1, 1, 2, tzinfo=UTC) < at < datetime(9999, 12, 30, tzinfo=UTC))
            row.append(draw(strategy))
        rows.append(tuple(row))
    return rows


def _comparable(record) -> tuple:
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else orjson.loads(v) if k == "j" and v else v
                 for k, v in zip(_COLUMNS, record))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_storable_rows())
def test_postgresql_stores_what_it_stores_from_asyncpgs_copy(pg_url, pgcopy_impl, rows):
    async def check():
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f"CREATE TABLE IF NOT EXISTS ours {_TABLE}; CREATE TABLE IF NOT EXISTS theirs {_TABLE};"
                               "TRUNCATE ours, theirs")
            # asyncpg's jsonb codec takes str only.
            await conn.copy_records_to_table("theirs", columns=_COLUMNS, records=[
                tuple(v.decode() if type(v) is bytes else v for v in row) for row in rows])
            await conn.copy_to_table("ours", source=memoryview(pgcopy_impl.encode("IUTTJSILFBZ", rows)),
                                     columns=_COLUMNS, format="binary")
            ours = [_comparable(r) for r in await conn.fetch("SELECT * FROM ours ORDER BY n")]
            theirs = [_comparable(r) for r in await conn.fetch("SELECT * FROM theirs ORDER BY n")]
        finally:
            await conn.close()
        assert ours == theirs and len(ours) == len(rows)

    asyncio.run(check())


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12),
       pool=st.lists(st.uuids(), min_size=4, max_size=4, unique=True))
def test_an_id_object_repeated_down_a_column_is_written_as_itself(compiled_pgcopy, python_pgcopy, picks, pool):
    """The compiled encoder remembers each column's last id object and its bytes: a batch's rows share their
    tenant's and key's. Objects repeated, alternating, equal but distinct, asyncpg's and uuid's, in two batches
    one after the other: the same bytes as the twin's."""
    objects = [pool[0], uuid.UUID(int=pool[0].int), AsyncpgUUID(str(pool[1])), pool[2], pool[3]]
    rows = [(objects[a], objects[b + 1], objects[a]) for a, b in picks]
    for batch in (rows, rows[::-1]):
        assert compiled_pgcopy.encode("UUU", batch, True, True) == python_pgcopy.encode("UUU", batch, True, True)
    fresh = [(uuid.uuid4(), uuid.uuid4(), uuid.uuid4()) for _ in range(3)]  # new objects, perhaps at old addresses
    assert compiled_pgcopy.encode("UUU", fresh, True, True) == python_pgcopy.encode("UUU", fresh, True, True)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.uuids(), min_size=1, max_size=6))
def test_asyncpgs_uuids_are_read_in_place_and_give_their_bytes(compiled_pgcopy, ids):
    """asyncpg's UUID keeps its 16 bytes in the object: the compiled encoder finds where once (gw_uuid.h) and
    copies them from there, instead of asking `.bytes` for a new bytes object each time. Read in place or
    through the attribute, each id gives its own bytes."""
    assert compiled_pgcopy.uuids_in_place(), "asyncpg's UUID layout was not found: ids go through .bytes (slower)"
    rows = [(AsyncpgUUID(str(value)), value) for value in ids]
    expected = b"".join(b"\x00\x02\x00\x00\x00\x10" + value.bytes + b"\x00\x00\x00\x10" + value.bytes
                        for value in ids)
    try:
        for in_place in (True, False):
            compiled_pgcopy._read_in_place(in_place)
            assert compiled_pgcopy.uuids_in_place() is in_place
            assert compiled_pgcopy.encode("UU", rows, False, False) == expected
    finally:
        compiled_pgcopy._read_in_place(True)


def test_streams_of_every_size_in_turn_are_the_twins(compiled_pgcopy, python_pgcopy):
    """The compiled encoder writes a stream into a bytes object sized from the rows before it: batches whose rows
    grow past that guess (moved to the heap), shrink far below it (cut to length), one row, none, and a tuple of
    rows, one after another, are each the twin's bytes."""
    def batch(count, size):
        return [(uuid.UUID(int=i), "x" * size, i) for i in range(count)]

    for rows in (batch(300, 10), batch(300, 4000), batch(2000, 1), batch(1, 50_000), batch(0, 0),
                 tuple(batch(500, 300)), batch(40, 300) + batch(40, 9000), batch(3000, 20)):
        for header, trailer in ((True, True), (False, True), (True, False)):
            assert compiled_pgcopy.encode("UTL", rows, header, trailer) == python_pgcopy.encode("UTL", rows, header,
                                                                                                trailer)


@pytest.mark.parametrize("number", [0, 1, 255, 2**30 - 1, 2**30, 2**60, 2**90 - 1, 2**120 - 1, 2**120, 2**127,
                                    2**128 - 1])
def test_a_uuids_int_of_every_digit_count_gives_its_16_bytes(compiled_pgcopy, python_pgcopy, number):
    """The compiled encoder shifts a UUID's int out of CPython's 30-bit digits (gw_uuid.h): ints of one to five
    digits, and the edges of each, give the bytes `int.to_bytes` gives."""
    row = [(uuid.UUID(int=number),)]
    expected = python_pgcopy.encode("U", row, False, False)
    assert expected == b"\x00\x01\x00\x00\x00\x10" + number.to_bytes(16, "big")
    assert compiled_pgcopy.encode("U", row, False, False) == expected


@pytest.mark.parametrize("number", [2**128, 2**150, -1])
def test_a_uuid_whose_int_is_out_of_range_is_refused(pgcopy_impl, number):
    value = uuid.UUID(int=1)
    object.__setattr__(value, "int", number)  # only a damaged UUID holds such an int
    with pytest.raises(OverflowError):
        pgcopy_impl.encode("U", [(value,)], False, False)


# -- the SQLite sink's values (`sqlite_rows`) -----------------------------------------------------------------------
def _sa_uuid(value):
    return value.hex  # SQLAlchemy's Uuid bind processor where there is no native UUID: its 32 hex digits


def _sa_time(value):
    # SQLAlchemy's SQLite DATETIME text, after the sink's conversion of an aware time to UTC.
    if value.tzinfo is not None and value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (value.year, value.month, value.day, value.hour, value.minute,
                                                  value.second, value.microsecond)


_SQLITE_STEPS = ((0, "X", _sa_uuid), (1, "D", _sa_time), (2, "C", lambda value: f"<{value!r}>"))
_ANY = st.none() | st.integers() | st.text(max_size=5) | st.just(object)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(
    st.none() | st.uuids() | st.uuids().map(lambda u: AsyncpgUUID(str(u))) | st.uuids().map(str) | _ANY,
    st.none() | st.datetimes(timezones=_ZONES) | st.sampled_from((datetime.min, datetime.max)) | _ANY,
    _ANY, _ANY), max_size=6))
def test_the_twins_give_sqlite_the_values_the_conversions_would(compiled_pgcopy, python_pgcopy, rows):
    # The UUIDs' and times' text written in C is what the columns' own conversions give; the rest is theirs.
    def expected(row):
        out = list(row)
        for at, _, convert in _SQLITE_STEPS:
            try:
                out[at] = None if row[at] is None and at < 2 else convert(row[at])
            except (AttributeError, TypeError, ValueError) as exc:
                return type(exc)
        return tuple(out)

    for impl in (compiled_pgcopy, python_pgcopy):
        for row in rows:
            want = expected(row)
            if isinstance(want, type):
                with pytest.raises(want):
                    impl.sqlite_rows([row], _SQLITE_STEPS)
            else:
                assert impl.sqlite_rows([row], _SQLITE_STEPS) == [want]
