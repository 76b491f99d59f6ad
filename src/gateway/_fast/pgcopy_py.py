"""Record rows as PostgreSQL's binary COPY stream, for the few column types the record tables use.

The writer COPYs every request log row and audit entry. asyncpg's
`copy_records_to_table` encodes each value through its codec dispatch, and
two of the record tables' commonest values are slow there: a `uuid.UUID`
goes through its Python `bytes` property, a timestamp through `astimezone`
and a timedelta (callgrind, per row: about 20k instructions for a
request_logs row, of which 15k for its five ids and its time). `encode`
writes the same stream with each value's bytes taken directly: an id's
`int`, a timestamp's fields.

The stream (PostgreSQL's documentation, "COPY", "Binary Format"): the
11-byte signature, a flags word and a header-extension length, then per row
a 16-bit field count and each field as a 32-bit length (-1: NULL) and its
bytes, then a 16-bit -1. Field bytes by column kind:

- UUID: the 16 bytes (a `uuid.UUID`, asyncpg's UUID, or the text form);
- TEXT (text and varchar): UTF-8;
- INT4 / INT8: two's complement, big-endian;
- FLOAT8: IEEE 754 double, big-endian;
- TIMESTAMPTZ: microseconds since 2000-01-01 00:00 UTC, as an INT8; a naive
  time is read as local time, as asyncpg reads it;
- JSONB: the version byte 1, then the JSON text (the value is that text).

A value its column cannot take is a ValueError naming the row and column and
the value's type, never the value (rows carry user data and errors are
logged); nothing is returned for such a batch. `pgcopy_c.py` is a symlink to
this file and `pgcopy_c.pxd` gives it C types.
"""

import struct
import uuid
from datetime import datetime, timezone

_K_UUID, _K_TEXT, _K_INT4, _K_INT8, _K_FLOAT8, _K_TIMESTAMPTZ, _K_JSONB = 0, 1, 2, 3, 4, 5, 6
UUID, TEXT, INT4, INT8, FLOAT8, TIMESTAMPTZ, JSONB = (  # the column kinds, for `encode`'s `kinds`
    _K_UUID, _K_TEXT, _K_INT4, _K_INT8, _K_FLOAT8, _K_TIMESTAMPTZ, _K_JSONB)
KIND_NAMES = ("uuid", "text", "integer", "bigint", "double precision", "timestamp with time zone", "jsonb")

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_LENGTH_4 = b"\x00\x00\x00\x04"
_LENGTH_8 = b"\x00\x00\x00\x08"
_LENGTH_16 = b"\x00\x00\x00\x10"
_JSONB_VERSION = b"\x01"
_DOUBLE = struct.Struct("!d").pack
_PG_EPOCH_ORDINAL = 730120  # datetime(2000, 1, 1).toordinal(): PostgreSQL's day zero
_UTC = timezone.utc
_UUID = uuid.UUID


def encode(rows, kinds):
    """`rows` (tuples, values in column order) as one binary COPY stream; `kinds[i]` is column i's kind."""
    width = len(kinds)
    count = width.to_bytes(2, "big")
    pieces = [HEADER]
    append = pieces.append
    at = 0
    row_number = 0
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row {row_number} has {len(row)} values for {width} columns")
        append(count)
        at = 0
        while at < width:
            value = row[at]
            if value is None:
                append(_NULL)
            else:
                data = _field(value, kinds[at])
                if data is None:
                    raise ValueError(f"row {row_number}, column {at}: a {type(value).__name__} cannot be "
                                     f"written as {KIND_NAMES[kinds[at]]}")
                append(data)
            at += 1
        row_number += 1
    append(TRAILER)
    return b"".join(pieces)


def _field(value, kind):
    """A field's length and bytes, or None if `value` cannot be written as `kind`."""
    try:
        if kind == _K_TEXT:
            if not isinstance(value, str):
                return None
            data = value.encode()
            return len(data).to_bytes(4, "big") + data
        if kind == _K_UUID:
            if isinstance(value, _UUID):
                return _LENGTH_16 + value.int.to_bytes(16, "big")
            if isinstance(value, str):
                return _LENGTH_16 + _UUID(value).bytes
            return None
        if kind == _K_TIMESTAMPTZ:
            if not isinstance(value, datetime):
                return None
            if value.tzinfo is not _UTC:
                value = value.astimezone(_UTC)
            days = value.toordinal() - _PG_EPOCH_ORDINAL
            seconds = days * 86400 + value.hour * 3600 + value.minute * 60 + value.second
            return _LENGTH_8 + (seconds * 1000000 + value.microsecond).to_bytes(8, "big", signed=True)
        if kind == _K_INT4 or kind == _K_INT8:
            if type(value) is not int:  # what asyncpg takes: anything int() takes but text (a float is cut)
                if isinstance(value, (str, bytes)) or not hasattr(type(value), "__int__"):
                    return None
                value = int(value)
            if kind == _K_INT4:
                return _LENGTH_4 + value.to_bytes(4, "big", signed=True)
            return _LENGTH_8 + value.to_bytes(8, "big", signed=True)
        if kind == _K_FLOAT8:
            if type(value) is not float:
                if not isinstance(value, (int, float)):
                    return None
                value = float(value)
            return _LENGTH_8 + _DOUBLE(value)
        if kind == _K_JSONB:
            if not isinstance(value, str):
                return None
            data = value.encode()
            return (len(data) + 1).to_bytes(4, "big") + _JSONB_VERSION + data
    except (ValueError, OverflowError):  # a lone surrogate, an int past the column's range, a bad id text
        return None
    return None
