"""PostgreSQL's binary COPY format for the record tables' rows (the pure-Python twin of `pgcopy_c.pyx`).

The records writer COPYs every request log row and audit entry. asyncpg's
`copy_records_to_table` encodes each field through its general codec
machinery, which cost about as much as everything else the writer does to a
request log row (bench/records_cost.py); `encode` writes the whole COPY
stream for a batch in one call instead, for the few column types the record
tables use, and the sink hands the bytes to `copy_to_table(format="binary")`.

`kinds` names each column's type by one byte:

    U uuid         a uuid.UUID (its 16 bytes), a str in any form uuid.UUID reads, or an object with a
                   16-byte `bytes` (asyncpg's own UUID)
    T text/varchar a str, as UTF-8 (a lone surrogate is a UnicodeEncodeError)
    J jsonb        JSON text, a str or its UTF-8 bytes (taken as they are): version byte 1, then the text
    S int2, I int4, L int8
                   an int (bool included) in the type's range, else OverflowError
    F float8       a float, or an int
    B bool         a bool
    Z timestamptz  a datetime: microseconds since 2000-01-01 UTC; a naive one is local time and
                   datetime.max / datetime.min (naive) are +/-infinity, as asyncpg reads them

None is NULL in every column. A value of another type is a TypeError and a
row of the wrong length a ValueError: the sink refuses the batch as asyncpg
would (records/sinks.py `_PG_REJECTIONS`). No message quotes a value.

The compiled twin reads the same values at C level (a UUID's int, a
datetime's fields); tests/fast/test_pgcopy.py holds the two to the same bytes
and PostgreSQL to storing what asyncpg's own COPY stores.

`sqlite_rows` is the SQLite sink's counterpart: the values of a batch as
SQLite stores them, a UUID as its 32 hex digits and a UTC or naive time as
"YYYY-MM-DD HH:MM:SS.ffffff" written here, any other value (and every value of
a column without one of those two kinds) by the column's own conversion.
"""

from __future__ import annotations

import struct
import uuid
from datetime import datetime, timedelta, timezone

KINDS = "UTJSILFBZ"
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
UTC = timezone.utc
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_INFINITY, _NEG_INFINITY = datetime.max, datetime.min  # naive: what asyncpg writes as 'infinity' / '-infinity'
_INT64_MAX, _INT64_MIN = 2**63 - 1, -(2**63)
_RANGES = {"S": (-(2**15), 2**15 - 1, ">ih"), "I": (-(2**31), 2**31 - 1, ">ii"), "L": (_INT64_MIN, _INT64_MAX, ">iq")}
_NULL = struct.pack(">i", -1)
_FIELDS = struct.Struct(">h")
_UUID_FIELD, _FLOAT_FIELD, _TIME_FIELD = struct.Struct(">i16s"), struct.Struct(">id"), struct.Struct(">iq")


def encode(kinds: str, rows, header: bool = True, trailer: bool = True) -> bytes:
    """The COPY stream (header, `rows`, trailer) for columns of types `kinds` (see the module's doc); without the
    header or the trailer, a piece of one (a long stream is sent as several CopyData messages)."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"no binary COPY encoding for column kind {kind!r}")
    width = len(kinds)
    count = _FIELDS.pack(width)
    out = [HEADER] if header else []
    for row in rows:
        if len(row) != width:
            raise ValueError(f"a row of {len(row)} values for {width} columns")
        out.append(count)
        for at, value in enumerate(row):
            if value is None:
                out.append(_NULL)
            else:
                out.append(_field(kinds[at], value, at))
    if trailer:
        out.append(TRAILER)
    return b"".join(out)


def _field(kind: str, value, at: int) -> bytes:
    if kind == "U":
        return _UUID_FIELD.pack(16, uuid_bytes(value))
    if kind == "J" and type(value) is bytes:
        return struct.pack(">ib", len(value) + 1, 1) + value
    if kind == "T" or kind == "J":
        if not isinstance(value, str):
            raise TypeError(f"column {at}: expected str, got {type(value).__name__}")
        data = value.encode("utf-8")
        if kind == "J":
            return struct.pack(">ib", len(data) + 1, 1) + data
        return struct.pack(">i", len(data)) + data
    if kind == "F":
        if not isinstance(value, (float, int)):
            raise TypeError(f"column {at}: expected a float, got {type(value).__name__}")
        return _FLOAT_FIELD.pack(8, float(value))
    if kind == "B":
        if not isinstance(value, bool):
            raise TypeError(f"column {at}: expected a bool, got {type(value).__name__}")
        return b"\x00\x00\x00\x01\x01" if value else b"\x00\x00\x00\x01\x00"
    if kind == "Z":
        return _TIME_FIELD.pack(8, timestamp_micros(value))
    low, high, layout = _RANGES[kind]
    if not isinstance(value, int):
        raise TypeError(f"column {at}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise OverflowError(f"column {at}: an int out of its column's range")
    return struct.pack(layout, struct.calcsize(layout) - 4, value)


try:
    from asyncpg.pgproto.pgproto import UUID as _PG_UUID
except ImportError:  # pragma: no cover - asyncpg is a dependency
    _PG_UUID = uuid.UUID


def sqlite_rows(rows, steps: tuple) -> list[tuple]:
    """`rows` as tuples of what SQLite stores: each `steps` entry (position, kind, convert) changes one value.

    kind "X": a uuid.UUID or asyncpg's UUID as its 32 lowercase hex digits (what SQLAlchemy's Uuid stores on
    SQLite); "D": a datetime in UTC or naive as "YYYY-MM-DD HH:MM:SS.ffffff" (SQLAlchemy's SQLite DATETIME
    text, its offset dropped); None stays None under both; any other value, or any value under another kind,
    is `convert(value)`, which may raise (the sink rejects the batch)."""
    converted = []
    for row in rows:
        values = list(row)
        for at, kind, convert in steps:
            value = values[at]
            if kind == "X" and (type(value) is uuid.UUID or type(value) is _PG_UUID):
                values[at] = value.hex
            elif kind == "D" and type(value) is datetime and (value.tzinfo is None or value.tzinfo is UTC):
                values[at] = (f"{value.year:04d}-{value.month:02d}-{value.day:02d} {value.hour:02d}:"
                              f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}")
            elif value is not None or kind not in "XD":
                values[at] = convert(value)
        converted.append(tuple(values))
    return converted


def uuid_bytes(value) -> bytes:
    """A uuid column value's 16 bytes."""
    if type(value) is uuid.UUID:
        return value.int.to_bytes(16, "big")
    if isinstance(value, str):
        return uuid.UUID(value).bytes
    try:
        data = value.bytes
    except AttributeError:
        raise TypeError(f"expected a UUID or a str, got {type(value).__name__}") from None
    if type(data) is not bytes or len(data) != 16:
        raise ValueError("a UUID whose bytes are not 16 bytes")
    return data


def timestamp_micros(value) -> int:
    """A timestamptz column value as microseconds since 2000-01-01 UTC (or the infinities)."""
    if type(value) is not datetime:
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        if value == _INFINITY:
            return _INT64_MAX
        if value == _NEG_INFINITY:
            return _INT64_MIN
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    delta: timedelta = value - _PG_EPOCH
    return delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds


__all__ = ("HEADER", "KINDS", "TRAILER", "encode", "sqlite_rows", "timestamp_micros", "uuid_bytes")
