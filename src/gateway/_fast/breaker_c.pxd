# C types for breaker_c.py, a symlink to the pure-Python twin breaker_py.py:
# Cython compiles the twin's code under this name. Keep the declarations in
# step with the twin's signatures.

cimport cython

# The private constants the methods compare with; the public CLOSED, OPEN, ...
# stay Python objects so that callers can import them.
cdef long long _CLOSED
cdef long long _OPEN
cdef long long _HALF_OPEN
cdef long long _REFUSED
cdef long long _ADMITTED
cdef int _BUCKETS
cdef double _MAX_COUNT
cdef double _NEVER

# Doubles, so an int too large for C is refused by the range checks (a
# ValueError, as in the twin) rather than by the conversion.
cdef void _check_settings(double window, double minimum_calls, double failure_rate, double consecutive_failures,
                          double open_seconds, double max_open_seconds, double half_open_calls) except *


# final: no Python subclass can override a cpdef method, so calls skip that check.
@cython.final
cdef class CircuitBreaker:
    # Settings.
    cdef double _window
    cdef double _width
    cdef long long _minimum_calls
    cdef double _failure_rate
    cdef long long _consecutive_limit
    cdef double _open_seconds
    cdef double _max_open_seconds
    cdef long long _half_open_calls
    # State.
    cdef long long _state
    cdef long long _openings
    cdef double _open_until
    cdef long long _round
    cdef double _round_started
    cdef long long _trials
    cdef long long _successes
    # The window: _BUCKETS (10) buckets, the head holding the latest results.
    cdef long long _calls[10]
    cdef long long _failures[10]
    cdef int _head
    cdef double _bucket_end
    cdef long long _total_calls
    cdef long long _total_failures
    cdef long long _in_a_row

    # Raises ValueError on bad settings.
    cdef void _set(self, window, minimum_calls, failure_rate, consecutive_failures, open_seconds,
                   max_open_seconds, half_open_calls) except *
    cpdef tuple window_counts(self, double now)
    # noexcept: integer and double arithmetic on the object's own fields only.
    @cython.locals(state="long long")
    cpdef long long allow(self, double now) noexcept
    @cython.locals(state="long long", head=int)
    cpdef bint record(self, bint success, double now) noexcept
    cpdef void release(self, long long ticket) noexcept
    @cython.locals(state="long long", wait=double)
    cpdef double retry_after(self, double now) noexcept
    @cython.locals(latest=double)
    cpdef void force_open(self, double until, long long openings, double now) noexcept
    cpdef void force_closed(self, double now) noexcept
    @cython.locals(old_window=double)
    cpdef void reconfigure(self, window, minimum_calls, failure_rate, consecutive_failures, open_seconds,
                           max_open_seconds, half_open_calls, double now) except *
    @cython.locals(head=int, _=int)
    cdef void _advance(self, double now) noexcept
    @cython.locals(i=int)
    cdef void _clear(self, double now) noexcept
    cdef void _start_round(self, double now) noexcept
    @cython.locals(duration=double)
    cdef void _open(self, double now) noexcept
    cdef void _close(self, double now) noexcept
