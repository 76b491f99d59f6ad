# A datetime's civil fields as decimal text, for the compiled core's .pyx modules (`include "gw_time.pxi"`:
# auditentry_c's JSON times, pgcopy_c's SQLite times).

from cpython.datetime cimport (
    PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MINUTE, PyDateTime_DATE_GET_SECOND, PyDateTime_GET_DAY,
    PyDateTime_GET_MONTH, PyDateTime_GET_YEAR,
)


cdef inline void _digits(char* out, long value, int width) noexcept:
    """The last `width` decimal digits of `value` (not negative), leading zeros included."""
    cdef int i
    for i in range(width - 1, -1, -1):
        out[i] = <char>(48 + value % 10)
        value //= 10


cdef inline void _civil(char* out, object value, char between) noexcept:
    """A datetime's "YYYY-MM-DD?HH:MM:SS" (19 bytes), `between` the date and the time; no offset."""
    _digits(out, PyDateTime_GET_YEAR(value), 4)
    out[4] = b"-"
    _digits(out + 5, PyDateTime_GET_MONTH(value), 2)
    out[7] = b"-"
    _digits(out + 8, PyDateTime_GET_DAY(value), 2)
    out[10] = between
    _digits(out + 11, PyDateTime_DATE_GET_HOUR(value), 2)
    out[13] = b":"
    _digits(out + 14, PyDateTime_DATE_GET_MINUTE(value), 2)
    out[16] = b":"
    _digits(out + 17, PyDateTime_DATE_GET_SECOND(value), 2)
