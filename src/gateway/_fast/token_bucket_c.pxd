# C types for token_bucket_c.py, a symlink to the pure-Python twin
# token_bucket_py.py: Cython compiles the twin's code under this name. Keep the
# declarations in step with the twin's signatures.

cimport cython

cdef double _NEVER

cdef void _check_limits(double capacity, double refill_per_second) except *


cdef class TokenBucket:
    cdef double _capacity
    cdef double _refill_per_second
    cdef double _tokens
    cdef double _last

    # noexcept: pure double arithmetic, nothing here can raise, so callers
    # skip the error check.
    @cython.locals(elapsed=double, tokens=double)
    cdef void _refill(self, double now) noexcept
    cpdef bint try_acquire(self, double cost, double now) noexcept
    # Declared, not inferred: inference leaves `wait` and `step` Python floats.
    @cython.locals(missing=double, wait=double, step=double)
    cpdef double retry_after(self, double cost, double now) noexcept
    cpdef double available(self, double now) noexcept
    @cython.locals(tokens=double)
    cpdef void refund(self, double cost) noexcept
    # Raises ValueError on bad limits.
    cpdef void reconfigure(self, double capacity, double refill_per_second, double now) except *
    cpdef void set_available(self, double tokens, double now) noexcept
