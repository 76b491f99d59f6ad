# C types for intake_c.py, a symlink to the pure-Python twin intake_py.py: Cython compiles the twin's code
# under this name. Keep the declarations in step with the twin's signatures.

cimport cython


@cython.final
cdef class Intake:
    cdef readonly dict lanes
    cdef str _audit_table
    cdef readonly object audit_lane
    cdef readonly Py_ssize_t audit_width
    cdef public Py_ssize_t batch_size
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t queued
    cdef public Py_ssize_t refused
    cdef public bint stopped
    cdef object _wake
    cdef object _after_stop

    @cython.locals(queued=Py_ssize_t)
    cdef bint _queue(self, object lane, Py_ssize_t width, str table, object row) except -1
    cdef object _audit(self, object row)


@cython.final
cdef class CallRecorder:
    cdef Intake _intake
    cdef object _log_lane
    cdef Py_ssize_t _log_width
    cdef object _new_id
    cdef object _audit_row
    cdef object _details_type
    cdef public bint request_logs
    cdef public bint audit
