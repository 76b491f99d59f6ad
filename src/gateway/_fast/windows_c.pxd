# C types for windows_c.py, a symlink to the pure-Python twin windows_py.py: Cython compiles the twin's code
# under this name. Keep the declarations in step with the twin's signatures.

cimport cython
from libc.math cimport exp, floor, log, log1p

cdef Py_ssize_t _KEEP

cdef double _uniform() except? -1.0


cdef class Window:
    cdef public object tenant_id
    cdef public Py_ssize_t calls
    cdef public Py_ssize_t errors
    cdef public double total
    cdef public list samples
    cdef Py_ssize_t _next
    cdef double _w

    @cython.locals(calls=Py_ssize_t)
    cpdef void add(self, bint ok, double seconds) except *
    @cython.locals(w=double)
    cdef void _skip(self) except *


cdef class CallWindows:
    cdef dict _windows
    cdef object _last_server
    cdef dict _last
    cdef dict _by_address

    @cython.locals(windows=dict, window=Window, known=tuple)
    cpdef void observe(self, object tenant_id, object server_id, object tool, bint ok, double seconds) except *
    @cython.locals(windows=dict)
    cpdef dict take(self)
