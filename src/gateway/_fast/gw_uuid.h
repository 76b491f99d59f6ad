/* A UUID's 16 bytes, for the compiled core's .pyx modules (pgcopy_c, auditentry_c, ids_c).

   Two UUID types reach the records: uuid.UUID (the rows' own ids, keeps an int) and asyncpg's subclass (ids
   read from the database, keeps the 16 bytes themselves in its object). Reading asyncpg's `.bytes` makes a
   bytes object each time, through the generic attribute lookup: about 250 instructions, eleven times a
   request when the batch's keys differ. `gw_uuid_read_in_place` finds, once, where asyncpg's object holds the bytes:
   the one offset at which two probe values' bytes both lie, checked against `.bytes`. Where it finds none
   (another asyncpg, another layout), `gw_held_uuid_bytes` answers 0 and the caller reads the attribute as
   before. */
#ifndef GW_UUID_H
#define GW_UUID_H
#include <Python.h>
#include <string.h>
#include "structmember.h"

/* Where objects of `type` keep the __slots__ member `name` (a plain object slot), or -1. */
static Py_ssize_t gw_slot_at(PyObject* type, const char* name) {
    PyObject* found = PyDict_GetItemString(((PyTypeObject*)type)->tp_dict, name);
    PyMemberDef* member;
    if (found == NULL || Py_TYPE(found) != &PyMemberDescr_Type) return -1;
    member = ((PyMemberDescrObject*)found)->d_member;
    if (member->type != T_OBJECT_EX || (member->flags & READONLY)) return -1;
    return member->offset;
}

/* uuid.UUID, and where it keeps its `int` (a __slots__ member): read there, not through the attribute, which
   costs the generic lookup (about 130 instructions) for every id a row or a line writes. Set once per module
   by `gw_uuid_int_slot`; a type whose `int` is no plain slot is read through the attribute. */
static PyTypeObject* gw_uuid_type = NULL;
static Py_ssize_t gw_uuid_int_at = -1;

static inline void gw_uuid_int_slot(PyObject* type) {
    gw_uuid_int_at = gw_slot_at(type, "int");
    gw_uuid_type = gw_uuid_int_at >= 0 ? (PyTypeObject*)type : NULL;
}

/* `value`'s int, borrowed, if `value` is exactly that uuid.UUID type and the slot is set; else NULL (then read
   `.int`, which raises as the attribute does). */
static inline PyObject* gw_uuid_int_of(PyObject* value) {
    if (Py_TYPE(value) != gw_uuid_type) return NULL;
    return *(PyObject**)((char*)value + gw_uuid_int_at);
}

/* CPython 3.11 keeps an int as 30-bit digits, least significant first, their count in ob_size (its sign the
   int's): a UUID's int is at most five of them. Reading or writing those digits is a few shifts, where
   _PyLong_AsByteArray and _PyLong_FromByteArray go a byte at a time through their general cases (callgrind:
   about 250 and 300 instructions). Other versions and digit sizes take the general calls. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30 && \
    defined(__SIZEOF_INT128__)
#define GW_UUID_DIGITS 1
#endif

/* A non-negative int below 2**128 as 16 big-endian bytes (a UUID's `int`). */
static inline int gw_uuid_int_bytes(PyObject* value, unsigned char* out) {
#ifdef GW_UUID_DIGITS
    if (PyLong_CheckExact(value)) {
        Py_ssize_t count = Py_SIZE(value), i;
        const digit* digits = ((PyLongObject*)value)->ob_digit;
        if (count >= 0 && count <= 5 && (count < 5 || digits[4] < (1u << 8))) {
            unsigned __int128 number = 0;
            for (i = count - 1; i >= 0; i--) number = (number << 30) | digits[i];
            for (i = 15; i >= 0; i--) {
                out[i] = (unsigned char)number;
                number >>= 8;
            }
            return 0;
        }
    }
#endif
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

/* 16 big-endian bytes as a non-negative int (a UUID's `int`); NULL on an error. */
static inline PyObject* gw_uuid_bytes_int(const unsigned char* bytes) {
#ifdef GW_UUID_DIGITS
    unsigned __int128 number = 0, rest;
    Py_ssize_t count = 0, i;
    PyLongObject* made;
    for (i = 0; i < 16; i++) number = (number << 8) | bytes[i];
    for (rest = number; rest; rest >>= 30) count++;
    if (count <= 1) return PyLong_FromUnsignedLong((unsigned long)number);  /* 0 and the small ints' cache */
    made = _PyLong_New(count);
    if (made == NULL) return NULL;
    for (i = 0; i < count; i++) {
        made->ob_digit[i] = (digit)(number & PyLong_MASK);
        number >>= 30;
    }
    return (PyObject*)made;
#elif PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(bytes, 16, Py_ASNATIVEBYTES_BIG_ENDIAN);
#else
    return _PyLong_FromByteArray(bytes, 16, 0, 0);
#endif
}

static PyTypeObject* gw_held_uuid_type = NULL;  /* asyncpg's UUID, once its bytes were found in it */
static Py_ssize_t gw_held_uuid_at = -1;

/* The offset of the 16 bytes in objects of `type` made by `type(bytes)`, or -1: the single offset where both
   probes' bytes lie, and where `.bytes` agrees. Never raises. */
static inline Py_ssize_t gw_find_uuid_bytes(PyObject* type) {
    unsigned char probes[2][16];
    PyObject* made[2] = {NULL, NULL};
    Py_ssize_t found = -1, at, size;
    int i, k, matches = 0;
    if (!PyType_Check(type)) return -1;
    for (i = 0; i < 16; i++) {
        probes[0][i] = (unsigned char)(0xA5 ^ (i * 29));
        probes[1][i] = (unsigned char)(0x3C ^ (i * 71 + 5));
    }
    size = ((PyTypeObject*)type)->tp_basicsize;
    for (k = 0; k < 2; k++) {
        PyObject* raw = PyBytes_FromStringAndSize((const char*)probes[k], 16);
        if (raw == NULL) goto done;
        made[k] = PyObject_CallOneArg(type, raw);
        Py_DECREF(raw);
        if (made[k] == NULL || Py_TYPE(made[k]) != (PyTypeObject*)type) goto done;
    }
    for (at = (Py_ssize_t)sizeof(PyObject); at + 16 <= size; at++) {
        if (memcmp((char*)made[0] + at, probes[0], 16) == 0 && memcmp((char*)made[1] + at, probes[1], 16) == 0) {
            found = at;
            matches++;
        }
    }
    if (matches != 1) {
        found = -1;
        goto done;
    }
    for (k = 0; k < 2; k++) {
        PyObject* told = PyObject_GetAttrString(made[k], "bytes");
        int same = told != NULL && PyBytes_CheckExact(told) && PyBytes_GET_SIZE(told) == 16 &&
                   memcmp(PyBytes_AS_STRING(told), probes[k], 16) == 0;
        Py_XDECREF(told);
        if (!same) {
            found = -1;
            goto done;
        }
    }
done:
    Py_XDECREF(made[0]);
    Py_XDECREF(made[1]);
    PyErr_Clear();
    return found;
}

/* Read objects of `type` (asyncpg's UUID) in place from now on if `on` and their bytes can be found, else
   through their attribute (`on` false: a test's way to check that path); 1 if read in place. */
static inline int gw_uuid_read_in_place(PyObject* type, int on) {
    Py_ssize_t at = on ? gw_find_uuid_bytes(type) : -1;
    gw_held_uuid_type = at < 0 ? NULL : (PyTypeObject*)type;
    gw_held_uuid_at = at;
    return at >= 0;
}

/* Whether objects of the type set up are read in place. */
static inline int gw_uuid_in_place(void) {
    return gw_held_uuid_type != NULL;
}

/* `value`'s 16 bytes into `out` if it is an object of the type set up (1), else nothing written (0). */
static inline int gw_held_uuid_bytes(PyObject* value, unsigned char* out) {
    if (Py_TYPE(value) != gw_held_uuid_type) return 0;
    memcpy(out, (char*)value + gw_held_uuid_at, 16);
    return 1;
}

/* `value`'s 16 bytes into `out` where they are at hand without an attribute lookup: asyncpg's UUID read in
   place, or a uuid.UUID's int read from its slot (1); else nothing written (0: the caller reads the attribute,
   or refuses the value); -1 with an exception set for an int that is no UUID's. */
static inline int gw_uuid_16(PyObject* value, unsigned char* out) {
    PyObject* number;
    if (gw_held_uuid_bytes(value, out)) return 1;
    number = gw_uuid_int_of(value);
    if (number == NULL) return 0;
    return gw_uuid_int_bytes(number, out) < 0 ? -1 : 1;
}

#endif
