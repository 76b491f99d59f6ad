# The compiled twin of pgcopy_py.py: the same `encode`, with the fields read at C level.
#
# Unlike the other fast modules this one is not the twin compiled under a second
# name: what makes it fast is what plain Python cannot say (a UUID's int as 16
# bytes, a datetime's fields, one growing C buffer), and the twin compiled was
# slower than asyncpg (d1d41a3, reverted). tests/fast/test_pgcopy.py holds the
# two to the same bytes, and to the same errors, under hypothesis.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.datetime cimport (
    PyDateTime_CheckExact, datetime_tzinfo, import_datetime, PyDateTime_GET_YEAR, PyDateTime_GET_MONTH,
    PyDateTime_GET_DAY, PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MINUTE, PyDateTime_DATE_GET_SECOND,
    PyDateTime_DATE_GET_MICROSECOND,
)
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.long cimport PyLong_AsDouble, PyLong_AsLongLong, PyLong_Check
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.string cimport memcpy

from gateway._fast import pgcopy_py as _twin

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    int _PyBytes_Resize(PyObject** value, Py_ssize_t size)
    object PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    unsigned char* PyUnicode_1BYTE_DATA(object text)

cdef extern from *:
    """
    /* A new reference handed over as it is (the caller's to own). */
    static PyObject* gw_steal(PyObject* value) { return value; }
    """
    object _steal "gw_steal" (PyObject* value)

cdef extern from "gw_uuid.h":
    int gw_uuid_int_bytes(object value, unsigned char* out) except -1
    int gw_uuid_read_in_place(object kind, int on)
    int gw_uuid_in_place()
    int gw_held_uuid_bytes(object value, unsigned char* out) noexcept
    void gw_uuid_int_slot(object kind)
    int gw_uuid_16(object value, unsigned char* out) except -1

import_datetime()

import uuid as _uuid

KINDS = _twin.KINDS
HEADER = _twin.HEADER
TRAILER = _twin.TRAILER
uuid_bytes = _twin.uuid_bytes
timestamp_micros = _twin.timestamp_micros

cdef object _UUID = _uuid.UUID
try:
    from asyncpg.pgproto.pgproto import UUID as _asyncpg_uuid
except ImportError:  # pragma: no cover - asyncpg is a dependency
    _asyncpg_uuid = _uuid.UUID
cdef object _PG_UUID = _asyncpg_uuid
# asyncpg's UUID read in place (gw_uuid.h), where its layout is found; uuid.UUID's int read from its slot.
gw_uuid_read_in_place(_PG_UUID, _PG_UUID is not _UUID)
gw_uuid_int_slot(_UUID)
cdef object _UTC = _twin.UTC
cdef object _uuid_bytes = _twin.uuid_bytes
cdef object _timestamp_micros = _twin.timestamp_micros
# Days from 0000-03-01 (proleptic Gregorian) to 2000-01-01, in days_from_civil's count.
cdef int64_t _PG_EPOCH_DAYS = 730425
cdef int64_t _INT16_MIN = -32768, _INT16_MAX = 32767, _INT32_MIN = -2147483648, _INT32_MAX = 2147483647


include "gw_buffer.pxi"
include "gw_time.pxi"


cdef inline void _u16(Buffer* buf, int16_t value) noexcept:
    cdef uint32_t bits = <uint16_t>value
    buf.data[buf.length] = <char>(bits >> 8)
    buf.data[buf.length + 1] = <char>bits
    buf.length += 2


cdef inline void _u32(Buffer* buf, int32_t value) noexcept:
    cdef uint32_t bits = <uint32_t>value
    cdef char* at = buf.data + buf.length
    at[0], at[1], at[2], at[3] = <char>(bits >> 24), <char>(bits >> 16), <char>(bits >> 8), <char>bits
    buf.length += 4


cdef inline void _u64(Buffer* buf, int64_t value) noexcept:
    cdef uint64_t bits = <uint64_t>value
    cdef char* at = buf.data + buf.length
    cdef int i
    for i in range(8):
        at[i] = <char>(bits >> (56 - 8 * i))
    buf.length += 8


cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept:
    # Howard Hinnant's days_from_civil, counted from 0000-03-01.
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe


# The last UUID object written in each of the first _HELD columns and its 16 bytes: a batch's rows share their
# tenant's, user's, key's and server's id objects, and comparing the object saves reading its int. Each is held
# (a reference), so no other object can take its address meanwhile; a UUID is immutable.
cdef enum:
    _HELD = 32
cdef PyObject* _held[_HELD]
cdef unsigned char _held_bytes[_HELD][16]


cdef int _field(Buffer* buf, char kind, object value, Py_ssize_t at) except -1:
    cdef const char* text
    cdef Py_ssize_t size
    cdef long long number
    cdef double real
    cdef int64_t micros
    cdef bytes raw
    cdef bint holds = 0 <= at < _HELD
    if kind == b"U":
        _reserve(buf, 20)
        _u32(buf, 16)
        if gw_held_uuid_bytes(value, <unsigned char*>(buf.data + buf.length)):
            buf.length += 16
            return 0
        if holds and _held[at] == <PyObject*>value:
            memcpy(buf.data + buf.length, _held_bytes[at], 16)
            buf.length += 16
            return 0
        if gw_uuid_16(value, <unsigned char*>(buf.data + buf.length)):
            pass
        elif type(value) is _UUID:
            gw_uuid_int_bytes(value.int, <unsigned char*>(buf.data + buf.length))
        else:
            # asyncpg's own UUID (ids read from the database) gives its 16 bytes as they are.
            raw = value.bytes if type(value) is _PG_UUID else _uuid_bytes(value)
            if len(raw) != 16:
                raise ValueError("a UUID whose bytes are not 16 bytes")
            memcpy(buf.data + buf.length, <const char*>raw, 16)
        if holds and (type(value) is _UUID or type(value) is _PG_UUID):
            Py_INCREF(value)
            Py_XDECREF(_held[at])
            _held[at] = <PyObject*>value
            memcpy(_held_bytes[at], buf.data + buf.length, 16)
        buf.length += 16
    elif kind == b"T" or kind == b"J":
        if kind == b"J" and type(value) is bytes:  # JSON text's UTF-8 already (the audit entries' details)
            text = PyBytes_AS_STRING(value)
            size = PyBytes_GET_SIZE(value)
        elif not PyUnicode_Check(value):
            raise TypeError(f"column {at}: expected str, got {type(value).__name__}")
        else:
            text = PyUnicode_AsUTF8AndSize(value, &size)
        if size > 0x7FFFFFF0:
            raise ValueError(f"column {at}: a text over 2 GiB")
        _reserve(buf, size + 5)
        if kind == b"J":
            _u32(buf, <int32_t>(size + 1))
            buf.data[buf.length] = 1
            buf.length += 1
        else:
            _u32(buf, <int32_t>size)
        memcpy(buf.data + buf.length, text, size)
        buf.length += size
    elif kind == b"F":
        if PyFloat_Check(value):
            real = PyFloat_AS_DOUBLE(value)
        elif PyLong_Check(value):
            real = PyLong_AsDouble(value)
        else:
            raise TypeError(f"column {at}: expected a float, got {type(value).__name__}")
        _reserve(buf, 12)
        _u32(buf, 8)
        memcpy(&micros, &real, 8)  # the double's bits, written big-endian
        _u64(buf, micros)
    elif kind == b"Z":
        if PyDateTime_CheckExact(value) and datetime_tzinfo(value) is _UTC:
            micros = ((_days_from_civil(PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value),
                                        PyDateTime_GET_DAY(value)) - _PG_EPOCH_DAYS) * 86400
                      + PyDateTime_DATE_GET_HOUR(value) * 3600 + PyDateTime_DATE_GET_MINUTE(value) * 60
                      + PyDateTime_DATE_GET_SECOND(value)) * 1000000 + PyDateTime_DATE_GET_MICROSECOND(value)
        else:
            micros = _timestamp_micros(value)
        _reserve(buf, 12)
        _u32(buf, 8)
        _u64(buf, micros)
    elif kind == b"B":
        if value is True or value is False:
            _reserve(buf, 5)
            _u32(buf, 1)
            buf.data[buf.length] = 1 if value is True else 0
            buf.length += 1
        else:
            raise TypeError(f"column {at}: expected a bool, got {type(value).__name__}")
    else:  # S, I, L
        if not PyLong_Check(value):
            raise TypeError(f"column {at}: expected an int, got {type(value).__name__}")
        try:
            number = PyLong_AsLongLong(value)
        except OverflowError:
            raise OverflowError(f"column {at}: an int out of its column's range") from None
        _reserve(buf, 12)
        if kind == b"S":
            if number < _INT16_MIN or number > _INT16_MAX:
                raise OverflowError(f"column {at}: an int out of its column's range")
            _u32(buf, 2)
            _u16(buf, <int16_t>number)
        elif kind == b"I":
            if number < _INT32_MIN or number > _INT32_MAX:
                raise OverflowError(f"column {at}: an int out of its column's range")
            _u32(buf, 4)
            _u32(buf, <int32_t>number)
        else:
            _u32(buf, 8)
            _u64(buf, <int64_t>number)
    return 0


def uuids_in_place():
    """Whether asyncpg's UUIDs are read in place (their layout found), not through `.bytes`."""
    return gw_uuid_in_place() != 0


def _read_in_place(bint on):
    """Tests: read asyncpg's UUIDs in place (where the layout is found) or through `.bytes`."""
    gw_uuid_read_in_place(_PG_UUID, on and _PG_UUID is not _UUID)


# Bytes a row of each column kinds (a table's) took lately, the largest average of its last streams: the next
# stream is written straight into a bytes object of its rows' likely size, cut to its length at the end. A
# growing buffer copied into a bytes object cost a realloc's copy or two and the final copy (callgrind: about
# 2k instructions a request's two rows); a stream that outgrows the guess moves to the heap and is copied
# once, as before.
cdef dict _row_bytes = {}
cdef enum:
    _FIRST_GUESS = 256
    _KINDS_KEPT = 64  # column kinds remembered (a gateway COPYs into three record tables)
    _GUESS_CAP = 64 << 20  # the largest bytes object made up front


def encode(str kinds, rows, bint header=True, bint trailer=True):
    """The COPY stream (header, `rows`, trailer) for columns of types `kinds`, or a piece of one (see pgcopy_py)."""
    cdef Buffer buf
    cdef char stack[_STACK]
    cdef bytes kind_bytes
    cdef const char* kind_of
    cdef Py_ssize_t width = len(kinds), at, count = 0, guess, row_bytes
    cdef tuple row
    cdef bytes start = HEADER
    cdef object out = None
    cdef PyObject* resized
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"no binary COPY encoding for column kind {kind!r}")
    kind_bytes = kinds.encode("ascii")
    kind_of = kind_bytes
    _start(&buf, stack)
    row_bytes = <Py_ssize_t>_row_bytes.get(kinds, _FIRST_GUESS)
    if type(rows) is list or type(rows) is tuple:
        guess = len(rows) * (row_bytes + row_bytes // 4) + 64
        if _STACK < guess <= _GUESS_CAP:
            out = PyBytes_FromStringAndSize(NULL, guess)
            buf.data, buf.size = PyBytes_AS_STRING(out), guess  # not heap: _release leaves it to `out`
    try:
        if header:
            memcpy(buf.data, <const char*>start, len(start))
            buf.length = len(start)
        for item in rows:
            row = item if type(item) is tuple else tuple(item)
            if len(row) != width:
                raise ValueError(f"a row of {len(row)} values for {width} columns")
            _reserve(&buf, 2)
            _u16(&buf, <int16_t>width)
            for at in range(width):
                value = row[at]
                if value is None:
                    _reserve(&buf, 4)
                    _u32(&buf, -1)
                else:
                    _field(&buf, kind_of[at], value, at)
            count += 1
        if trailer:
            _reserve(&buf, 2)
            _u16(&buf, -1)
        if count:
            if len(_row_bytes) >= _KINDS_KEPT and kinds not in _row_bytes:
                _row_bytes.clear()
            _row_bytes[kinds] = max(buf.length // count, row_bytes - row_bytes // 8, 16)
        if out is not None and buf.data == PyBytes_AS_STRING(out):
            resized = <PyObject*>out
            Py_INCREF(out)
            out = None
            if _PyBytes_Resize(&resized, buf.length) < 0:
                raise MemoryError()
            return <object>_steal(resized)
        return PyBytes_FromStringAndSize(buf.data, buf.length)
    finally:
        _release(&buf)


cdef const char* _HEX = b"0123456789abcdef"


cdef object _sqlite_value(char kind, object value, object convert):
    """One value as SQLite stores it (see the twin's `sqlite_rows`)."""
    cdef unsigned char raw[16]
    cdef unsigned char* out
    cdef int i
    if kind == b"X":
        if not gw_uuid_16(value, raw):  # None, or any UUID whose bytes are not at hand: the column's conversion
            return None if value is None else convert(value)
        text = PyUnicode_New(32, 127)
        out = PyUnicode_1BYTE_DATA(text)
        for i in range(16):
            out[2 * i] = _HEX[raw[i] >> 4]
            out[2 * i + 1] = _HEX[raw[i] & 15]
        return text
    if kind == b"D":
        if not PyDateTime_CheckExact(value) or not (datetime_tzinfo(value) is None or datetime_tzinfo(value) is _UTC):
            return None if value is None else convert(value)
        text = PyUnicode_New(26, 127)
        out = PyUnicode_1BYTE_DATA(text)
        _civil(<char*>out, value, b" ")
        out[19] = b"."
        _digits(<char*>out + 20, PyDateTime_DATE_GET_MICROSECOND(value), 6)
        return text
    return convert(value)


def sqlite_rows(rows, tuple steps):
    """`rows` as tuples of what SQLite stores (see the twin's `sqlite_rows`)."""
    cdef list converted = []
    cdef list values
    cdef tuple step
    cdef Py_ssize_t at, count = len(steps), k
    cdef bytes kinds = b"".join([(<str>(<tuple>step)[1]).encode("ascii") for step in steps])
    cdef const char* kind_of = kinds
    for row in rows:
        values = list(row)
        for k in range(count):
            step = <tuple>steps[k]
            at = step[0]
            values[at] = _sqlite_value(kind_of[k], values[at], step[2])
        converted.append(tuple(values))
    return converted


__all__ = ("HEADER", "KINDS", "TRAILER", "encode", "sqlite_rows", "timestamp_micros", "uuid_bytes")
