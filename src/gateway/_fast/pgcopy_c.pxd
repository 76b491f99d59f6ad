# C types for pgcopy_c.py, a symlink to the pure-Python twin pgcopy_py.py:
# Cython compiles the twin's code under this name. Keep the declarations in
# step with the twin's signatures.

cimport cython

cdef int _K_UUID, _K_TEXT, _K_INT4, _K_INT8, _K_FLOAT8, _K_TIMESTAMPTZ, _K_JSONB
cdef bytes HEADER, TRAILER, _NULL, _LENGTH_4, _LENGTH_8, _LENGTH_16, _JSONB_VERSION
cdef long long _PG_EPOCH_ORDINAL
cdef object _UTC, _UUID, _DOUBLE

@cython.locals(width=Py_ssize_t, at=Py_ssize_t, row_number=Py_ssize_t, pieces=list, row=tuple, data=bytes)
cpdef bytes encode(rows, bytes kinds)

@cython.locals(data=bytes, days=cython.longlong, seconds=cython.longlong)
cdef bytes _field(object value, int kind)
