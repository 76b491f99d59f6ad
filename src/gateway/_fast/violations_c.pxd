# C types for violations_c.py, a symlink to the pure-Python twin
# violations_py.py: Cython compiles the twin's code under this name. Keep the
# declarations in step with the twin's signatures.

cimport cython

cdef double _NEVER

cdef void _check_limits(double threshold, double window) except *


cdef class _Entry:
    cdef double count
    cdef double last


cdef class ViolationCounts:
    cdef double _threshold
    cdef double _window
    cdef double _drain
    cdef Py_ssize_t _max
    cdef dict _entries

    # noexcept: pure double arithmetic on a typed entry, nothing here can raise.
    @cython.locals(elapsed=double, count=double)
    cdef double _drained(self, _Entry entry, double now) noexcept
    # The dict methods may raise (MemoryError): these propagate.
    @cython.locals(entry=_Entry)
    cpdef bint add(self, str address, double now) except -1
    @cython.locals(entry=_Entry)
    cpdef double count(self, str address, double now) except? -1.0
    cpdef void forget(self, str address) except *
    @cython.locals(entry=_Entry)
    cpdef Py_ssize_t sweep(self, double now) except -1
    @cython.locals(excess=Py_ssize_t)
    cdef void _make_room(self, double now) except *
    @cython.locals(entry=_Entry)
    cpdef void reconfigure(self, double threshold, double window, double now) except *
