/* A non-negative int below 2**128 as 16 big-endian bytes (a UUID's `int`), for the compiled core's .pyx
   modules (pgcopy_c, auditentry_c). */
#ifndef GW_UUID_H
#define GW_UUID_H
#include <Python.h>

static int gw_uuid_int_bytes(PyObject* value, unsigned char* out) {
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t n = PyLong_AsNativeBytes(value, out, 16,
                                        Py_ASNATIVEBYTES_BIG_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER |
                                        Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (n < 0) return -1;
    if (n > 16) { PyErr_SetString(PyExc_OverflowError, "a UUID's int over 128 bits"); return -1; }
    return 0;
#else
    return _PyLong_AsByteArray((PyLongObject*)value, out, 16, 0, 0);
#endif
}

#endif
