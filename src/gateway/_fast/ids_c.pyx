# The compiled twin of ids_py.py: the same ids, the UUID object built at C level (a .pyx of its own, like
# pgcopy_c.pyx: the int from 16 bytes and the slot writes are what plain Python cannot say).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy

from gateway._fast import ids_py as _twin

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object target, object name, object value) except -1

cdef extern from *:
    """
    /* 16 big-endian bytes as a non-negative int. */
    static PyObject* gw_int_from_16(const unsigned char* bytes) {
    #if PY_VERSION_HEX >= 0x030D0000
        return PyLong_FromUnsignedNativeBytes(bytes, 16, Py_ASNATIVEBYTES_BIG_ENDIAN);
    #else
        return _PyLong_FromByteArray(bytes, 16, 0, 0);
    #endif
    }
    """
    object gw_int_from_16(const unsigned char* data)

import os
import uuid

BLOCK = _twin.BLOCK
cdef object _UUID = uuid.UUID
cdef object _new = uuid.UUID.__new__
cdef object _UNKNOWN_SAFETY = uuid.SafeUUID.unknown
cdef str _INT = "int", _IS_SAFE = "is_safe"


cdef class RowIds:
    """A source of version 4 UUIDs; `random(n)` gives the bytes (`os.urandom`, or a test's own)."""

    cdef bytes _block
    cdef Py_ssize_t _at
    cdef object _random

    def __init__(self, random=os.urandom):
        self._random = random
        self._block = b""
        self._at = 0

    def next(self):
        cdef unsigned char raw[16]
        cdef Py_ssize_t at = self._at
        if at + 16 > PyBytes_GET_SIZE(self._block):
            block = self._random(BLOCK)
            if type(block) is not bytes:
                block = bytes(block)
            self._block, at = block, 0
            if PyBytes_GET_SIZE(self._block) < 16:
                raise ValueError("the random source gave fewer than 16 bytes")
        self._at = at + 16
        memcpy(raw, PyBytes_AS_STRING(self._block) + at, 16)
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # variant RFC 4122
        made = _new(_UUID)
        PyObject_GenericSetAttr(made, _INT, gw_int_from_16(raw))
        PyObject_GenericSetAttr(made, _IS_SAFE, _UNKNOWN_SAFETY)
        return made


__all__ = ("BLOCK", "RowIds")
