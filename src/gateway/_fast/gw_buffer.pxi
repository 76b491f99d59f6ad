# A growing byte buffer for the compiled core's .pyx modules (`include "gw_buffer.pxi"`: pgcopy_c,
# auditentry_c). It starts on the caller's stack (`_start` with a `char[_STACK]`) and moves to the heap
# only when it outgrows it; `_release` in a `finally` frees what is ours.

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcpy


cdef struct Buffer:
    char* data
    Py_ssize_t length
    Py_ssize_t size
    bint heap  # data is ours to free (else the caller's stack array)


cdef enum:
    _STACK = 2048  # bytes of a buffer on the caller's stack: a head or a line fits


cdef inline void _start(Buffer* buf, char* stack) noexcept:
    buf.data, buf.length, buf.size, buf.heap = stack, 0, _STACK, False


cdef inline void _release(Buffer* buf) noexcept:
    if buf.heap:
        PyMem_Free(buf.data)


cdef inline int _reserve(Buffer* buf, Py_ssize_t extra) except -1:
    if buf.length + extra <= buf.size:
        return 0
    return _grow(buf, extra)


cdef int _grow(Buffer* buf, Py_ssize_t extra) except -1:
    cdef Py_ssize_t size
    cdef char* grown
    size = buf.size * 2
    while size < buf.length + extra:
        size *= 2
    if buf.heap:
        grown = <char*>PyMem_Realloc(buf.data, size)
    else:
        grown = <char*>PyMem_Malloc(size)
        if grown != NULL:
            memcpy(grown, buf.data, buf.length)
    if grown == NULL:
        raise MemoryError()
    buf.data, buf.size, buf.heap = grown, size, True
    return 0


cdef inline void _put(Buffer* buf, const char* text, Py_ssize_t size) noexcept:
    memcpy(buf.data + buf.length, text, size)
    buf.length += size
