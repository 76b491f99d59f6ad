# The compiled twin of ids_py.py: the same ids, the UUID object built at C level (a .pyx of its own, like
# pgcopy_c.pyx: the int from 16 bytes and the slot writes are what plain Python cannot say).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.datetime cimport datetime_new, import_datetime
from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from gateway._fast import ids_py as _twin

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object target, object name, object value) except -1

cdef extern from "gw_uuid.h":
    object gw_int_from_16 "gw_uuid_bytes_int" (const unsigned char* data)
    Py_ssize_t gw_slot_at(object kind, const char* name)

cdef extern from *:
    """
    /* A new object of `type` (no __new__ or __init__ run) with `first` and `second` in the slots at those
       offsets. */
    static PyObject* gw_with_slots(PyObject* type, Py_ssize_t first_at, PyObject* first, Py_ssize_t second_at,
                                   PyObject* second) {
        PyObject* made = ((PyTypeObject*)type)->tp_alloc((PyTypeObject*)type, 0);
        if (made == NULL) return NULL;
        Py_INCREF(first);
        *(PyObject**)((char*)made + first_at) = first;
        Py_INCREF(second);
        *(PyObject**)((char*)made + second_at) = second;
        return made;
    }
    """
    object gw_with_slots(object kind, Py_ssize_t first_at, object first, Py_ssize_t second_at, object second)

import os
import time
import uuid
from datetime import timezone

import_datetime()

BLOCK = _twin.BLOCK
cdef object _UUID = uuid.UUID
cdef object _new = uuid.UUID.__new__
cdef object _UNKNOWN_SAFETY = uuid.SafeUUID.unknown
cdef str _INT = "int", _IS_SAFE = "is_safe"
# Where a uuid.UUID keeps its two slots: an id is then allocated and its slots written at C level, as
# __new__ and object.__setattr__ would leave them (-1: not plain slots here; the calls make it).
cdef Py_ssize_t _INT_AT = gw_slot_at(_UUID, b"int")
cdef Py_ssize_t _IS_SAFE_AT = gw_slot_at(_UUID, b"is_safe")


v7_int = _twin.v7_int
cdef object _TIME_NS = time.time_ns
cdef unsigned long long _NANOSECONDS_CAP = _twin._NANOSECONDS_CAP


cdef class RowIds:
    """A source of version 7 UUIDs; `random(n)` gives the bytes (`os.urandom`, or a test's own), `clock()` the
    time in nanoseconds since the epoch (`time.time_ns`: then the clock is read here, at C level)."""

    cdef bytes _block
    cdef Py_ssize_t _at
    cdef object _random
    cdef object _clock
    cdef bint _own_clock

    def __init__(self, random=os.urandom, clock=_TIME_NS):
        self._random = random
        self._clock = clock
        self._own_clock = clock is _TIME_NS
        self._block = b""
        self._at = 0

    def next(self):
        cdef unsigned char raw[16]
        cdef Py_ssize_t at = self._at
        cdef timespec now
        cdef unsigned long long nanoseconds, milliseconds, fraction
        cdef int i
        if self._own_clock and clock_gettime(CLOCK_REALTIME, &now) == 0 and now.tv_sec >= 0:
            nanoseconds = <unsigned long long>now.tv_sec * 1000000000ULL + <unsigned long long>now.tv_nsec
        else:
            reading = self._clock()
            if not 0 <= reading < _NANOSECONDS_CAP:  # also a TypeError for what is no number
                raise ValueError("a time outside a version 7 id's range")
            nanoseconds = reading
        if at + 16 > PyBytes_GET_SIZE(self._block):
            block = self._random(BLOCK)
            if type(block) is not bytes:
                block = bytes(block)
            self._block, at = block, 0
            if PyBytes_GET_SIZE(self._block) < 16:
                raise ValueError("the random source gave fewer than 16 bytes")
        self._at = at + 16
        memcpy(raw, PyBytes_AS_STRING(self._block) + at, 16)
        # As the twin's v7_int: milliseconds in the first 48 bits, version 7 and the sub-millisecond fraction's
        # 12 bits, the variant over the last 8 bytes' randomness.
        milliseconds = nanoseconds // 1000000ULL
        fraction = (nanoseconds % 1000000ULL) * 4096ULL // 1000000ULL
        for i in range(6):
            raw[i] = <unsigned char>(milliseconds >> (40 - 8 * i))
        raw[6] = <unsigned char>(0x70 | (fraction >> 8))
        raw[7] = <unsigned char>fraction
        raw[8] = (raw[8] & 0x3F) | 0x80  # variant RFC 9562
        if _INT_AT >= 0 and _IS_SAFE_AT >= 0:
            return gw_with_slots(_UUID, _INT_AT, gw_int_from_16(raw), _IS_SAFE_AT, _UNKNOWN_SAFETY)
        made = _new(_UUID)
        PyObject_GenericSetAttr(made, _INT, gw_int_from_16(raw))
        PyObject_GenericSetAttr(made, _IS_SAFE, _UNKNOWN_SAFETY)
        return made


cdef object _UTC = timezone.utc


def utc_now():
    """The time now as an aware UTC datetime, `datetime.now(timezone.utc)`'s value (see the twin's `utc_now`)."""
    cdef timespec now
    if clock_gettime(CLOCK_REALTIME, &now) != 0:
        return _twin.utc_now()
    return utc_at(now.tv_sec, now.tv_nsec)


cpdef utc_at(long long seconds, long nanoseconds):
    """`seconds` since the epoch and `nanoseconds` (0 to 999,999,999, cut to microseconds) as an aware UTC
    datetime (see the twin's `utc_at`)."""
    cdef long long days, era, z, year, day_of_era, year_of_era, day_of_year, mp, month, day, rest
    if not 0 <= nanoseconds < 1_000_000_000:
        raise ValueError("nanoseconds out of range")
    days = seconds // 86400 if seconds >= 0 else -((-seconds + 86399) // 86400)
    rest = seconds - days * 86400
    # The civil date of a day count since 1970-01-01 (proleptic Gregorian, in eras of 400 years).
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    day_of_era = z - era * 146097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    year = year_of_era + era * 400
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    mp = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    if month <= 2:
        year += 1
    if not 1 <= year <= 9999:
        raise OverflowError("a year outside datetime's range")
    return datetime_new(year, month, day, rest // 3600, rest % 3600 // 60, rest % 60, nanoseconds // 1000, _UTC)


__all__ = ("BLOCK", "RowIds", "utc_at", "utc_now", "v7_int")
