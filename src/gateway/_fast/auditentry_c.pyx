# The compiled twin of auditentry_py.py: the same functions, the head written and the rows built at C level,
# and SHA-256 computed by the system's libcrypto, called directly.
#
# A .pyx of its own, like pgcopy_c.pyx: what makes it fast is what plain Python cannot say. The head: the
# canonical array written here for the types a written entry holds (exact UUIDs, str, int, float, UTC
# datetimes), in orjson's notation; any other value and the whole head is the twin's (orjson's) to write,
# as is a float Python would write with an exponent (orjson writes those differently). hashlib's
# sha256 with OpenSSL 3 spends about 600 ns of an entry's 800 (measured on a 300-byte entry) outside the
# hashing: fetching the algorithm for every new object and copying the context for every digest. Here the
# plain SHA256_* calls hash into a context on the stack; where a libcrypto lacks them, the EVP algorithm is
# fetched and its context made once, then reset for each entry (which still frees and allocates the
# provider's context every time: 380 -> 341 ns for `entry_hash` of 300 bytes, timeit).
# libcrypto is the one hashlib itself uses, opened by name at import (dlopen); where it cannot be opened, or
# fails its known-answer check, hashlib does the hashing (`NATIVE_SHA256` says which). No OpenSSL header or
# link-time library is needed to build this. tests/fast/test_auditentry.py holds the twins to the same bytes,
# rows and heads.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.datetime cimport (
    PyDateTime_CheckExact, datetime_tzinfo, import_datetime, PyDateTime_GET_YEAR, PyDateTime_GET_MONTH,
    PyDateTime_GET_DAY, PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MINUTE, PyDateTime_DATE_GET_SECOND,
    PyDateTime_DATE_GET_MICROSECOND,
)
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLong
from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM

from libc.string cimport memchr, memcmp, memcpy

from gateway._fast import auditentry_py as _twin

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object text)
    char* PyOS_double_to_string(double value, char format_code, int precision, int flags, int* kind) except NULL
    int Py_DTSF_ADD_DOT_0
    int Py_DTST_FINITE

cdef extern from "gw_uuid.h":
    int gw_uuid_int_bytes(object value, unsigned char* out) except -1
    int gw_uuid_read_in_place(object kind, int on)
    int gw_uuid_in_place()
    void gw_uuid_int_slot(object kind)
    int gw_uuid_16(object value, unsigned char* out) except -1

cdef extern from *:
    """
    #include <dlfcn.h>

    /* libcrypto's EVP digest calls, looked up at import: no OpenSSL header or library at build time. */
    static void *gw_md = NULL, *gw_ctx = NULL;
    static int (*gw_digest_init)(void *, const void *, void *) = NULL;
    static int (*gw_digest_update)(void *, const void *, size_t) = NULL;
    static int (*gw_digest_final)(void *, unsigned char *, unsigned int *) = NULL;
    /* Its plain SHA-256 calls, where it still has them (OpenSSL 1.0 to 3.x: deprecated in 3.0, not removed).
       They hash into a caller's context on the stack: OpenSSL 3's EVP_DigestInit_ex frees and allocates the
       provider's context on every init, about 700 instructions a hash; these run the same block function
       (with the CPU's SHA extensions where it has them). The context is 112 bytes in every release; a bigger
       buffer keeps a future one safe. */
    static int (*gw_sha_init)(void *) = NULL;
    static int (*gw_sha_update)(void *, const void *, size_t) = NULL;
    static int (*gw_sha_final)(unsigned char *, void *) = NULL;
    typedef union { unsigned char bytes[512]; long double align; } gw_sha_ctx;
    static int gw_use_plain = 0;  /* whether they hash: 1 where they were found, until told otherwise */

    static int gw_sha256_open(void) {
        static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", "libcrypto.dylib",
                                      NULL};
        for (int i = 0; names[i] != NULL; i++) {
            void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
            if (lib == NULL) continue;
            void *(*fetch)(void *, const char *, const char *) =
                (void *(*)(void *, const char *, const char *))dlsym(lib, "EVP_MD_fetch");
            const void *(*sha256)(void) = (const void *(*)(void))dlsym(lib, "EVP_sha256");
            void *(*ctx_new)(void) = (void *(*)(void))dlsym(lib, "EVP_MD_CTX_new");
            gw_digest_init = (int (*)(void *, const void *, void *))dlsym(lib, "EVP_DigestInit_ex");
            gw_digest_update = (int (*)(void *, const void *, size_t))dlsym(lib, "EVP_DigestUpdate");
            gw_digest_final = (int (*)(void *, unsigned char *, unsigned int *))dlsym(lib, "EVP_DigestFinal_ex");
            if (ctx_new == NULL || gw_digest_init == NULL || gw_digest_update == NULL || gw_digest_final == NULL) {
                dlclose(lib);
                continue;
            }
            gw_sha_init = (int (*)(void *))dlsym(lib, "SHA256_Init");
            gw_sha_update = (int (*)(void *, const void *, size_t))dlsym(lib, "SHA256_Update");
            gw_sha_final = (int (*)(unsigned char *, void *))dlsym(lib, "SHA256_Final");
            if (gw_sha_init == NULL || gw_sha_update == NULL || gw_sha_final == NULL) {
                gw_sha_init = NULL;
            }
            gw_use_plain = gw_sha_init != NULL;
            /* OpenSSL 3: fetched once (EVP_sha256() would fetch again on every init); 1.1: the static one. */
            gw_md = fetch != NULL ? fetch(NULL, "SHA256", NULL) : NULL;
            if (gw_md == NULL && sha256 != NULL) gw_md = (void *)sha256();
            gw_ctx = gw_md != NULL ? ctx_new() : NULL;
            if (gw_ctx != NULL) return 1;  /* the library stays open for the life of the process */
            gw_md = NULL;
            dlclose(lib);
        }
        return 0;
    }

    static int gw_sha_use_plain(int on) { gw_use_plain = on && gw_sha_init != NULL; return gw_use_plain; }

    /* SHA-256 of the three pieces a..c into out[32]; -1 if libcrypto failed. */
    static int gw_sha256(const char *a, size_t na, const char *b, size_t nb, const char *c, size_t nc,
                         unsigned char *out) {
        unsigned int length = 0;
        if (gw_use_plain) {
            gw_sha_ctx ctx;
            if (!gw_sha_init(&ctx) || !gw_sha_update(&ctx, a, na) || !gw_sha_update(&ctx, b, nb) ||
                !gw_sha_update(&ctx, c, nc) || !gw_sha_final(out, &ctx)) {
                return -1;
            }
            return 0;
        }
        if (!gw_digest_init(gw_ctx, gw_md, NULL) || !gw_digest_update(gw_ctx, a, na) ||
            !gw_digest_update(gw_ctx, b, nb) || !gw_digest_update(gw_ctx, c, nc) ||
            !gw_digest_final(gw_ctx, out, &length) || length != 32) {
            return -1;
        }
        return 0;
    }
    """
    int gw_sha256_open()
    int gw_sha_use_plain(int on)
    int gw_use_plain
    int gw_sha256(const char* a, size_t na, const char* b, size_t nb, const char* c, size_t nc,
                  unsigned char* out)

import_datetime()

import uuid as _uuid
from datetime import timezone as _timezone

GENESIS = _twin.GENESIS
HEAD_COLUMNS = _twin.HEAD_COLUMNS
cdef object _UUID = _uuid.UUID
try:  # the UUIDs asyncpg reads (key, user and tenant ids from the database): its own subclass
    from asyncpg.pgproto.pgproto import UUID as _asyncpg_uuid
except ImportError:  # pragma: no cover - asyncpg is a dependency
    _asyncpg_uuid = _uuid.UUID
cdef object _PG_UUID = _asyncpg_uuid
# asyncpg's UUID read in place (gw_uuid.h), where its layout is found.
gw_uuid_read_in_place(_PG_UUID, _PG_UUID is not _UUID)
gw_uuid_int_slot(_UUID)  # uuid.UUID's int read from its slot
cdef Py_ssize_t _fallbacks = 0  # heads and lines the twin wrote (see `fallbacks`)
cdef object _UTC = _timezone.utc
from orjson import loads as _loads
cdef object _twin_head = _twin.canonical_head
cdef object _twin_line = _twin.log_line


cdef object _by_twin(function, tuple arguments):
    """`function` (the twin's) called for what is not written here, and counted."""
    global _fallbacks
    _fallbacks += 1
    return function(*arguments)


def fallbacks():
    """How many heads and lines the twin wrote in this process (a value of a type not written here): a test's
    way to see that what a gateway writes takes the compiled path."""
    return _fallbacks
cdef Py_ssize_t _WIDTH = len(_twin.HEAD_COLUMNS)
cdef object _GENESIS_HEAD = (0, _twin.GENESIS)
cdef object _twin_hash = _twin.entry_hash
cdef bint _native = False
cdef const char* _HEX = b"0123456789abcdef"
cdef object _LIMIT = 2**63  # chain_seq is a bigint


cdef inline int _decimal_before(char* end, long long value) noexcept:
    """`value` in decimal, written backwards to end just before `end` (20 bytes at most); returns its length."""
    cdef unsigned long long rest = <unsigned long long>value
    cdef char* at = end
    if value < 0:
        rest = 0 - rest  # also right for the most negative value
    while True:
        at -= 1
        at[0] = <char>(48 + rest % 10)
        rest //= 10
        if rest == 0:
            break
    if value < 0:
        at -= 1
        at[0] = b"-"
    return <int>(end - at)


cdef object _hex_digest(const char* prev, Py_ssize_t prev_size, long long seq, const char* body,
                        Py_ssize_t body_size):
    """The entry hash as 64 lowercase hex characters, or None if libcrypto failed (the caller falls back)."""
    cdef char middle[24]  # "|<seq>|", written from the end
    cdef unsigned char digest[32]
    middle[23] = b"|"
    cdef int start = 23 - _decimal_before(middle + 23, seq)
    start -= 1
    middle[start] = b"|"
    if gw_sha256(prev, prev_size, middle + start, 24 - start, body, body_size, digest) != 0:
        return None
    text = PyUnicode_New(64, 127)
    cdef char* out = <char*>PyUnicode_DATA(text)
    cdef int i
    for i in range(32):
        out[2 * i] = _HEX[digest[i] >> 4]
        out[2 * i + 1] = _HEX[digest[i] & 15]
    return text


# ------------------------------------------------------------------ the canonical head

include "gw_buffer.pxi"
include "gw_time.pxi"


# Which bytes a JSON string cannot hold as they are: '"', '\\' and the control characters.
cdef unsigned char _ESCAPED[256]
for _byte in range(256):
    _ESCAPED[_byte] = _byte < 0x20 or _byte == 34 or _byte == 92


cdef int _put_string(Buffer* buf, str value) except -1:
    """`value` as orjson writes a str; 1 (nothing written) for one it refuses (a lone surrogate)."""
    cdef Py_ssize_t size, i, run
    cdef const unsigned char* data
    cdef unsigned char c
    cdef char* out
    try:
        data = <const unsigned char*>PyUnicode_AsUTF8AndSize(value, &size)
    except UnicodeEncodeError:
        return 1
    _reserve(buf, size * 6 + 2)
    out = buf.data + buf.length
    out[0] = b'"'
    out += 1
    i = 0
    while i < size:
        run = i
        while run < size and not _ESCAPED[data[run]]:
            run += 1
        if run > i:  # a run of bytes written as they are
            memcpy(out, data + i, run - i)
            out += run - i
            i = run
            if i == size:
                break
        c = data[i]
        if c == 34 or c == 92:
            out[0], out[1] = b"\\", <char>c
            out += 2
        elif c == 8 or c == 9 or c == 10 or c == 12 or c == 13:
            out[0] = b"\\"
            out[1] = b"b" if c == 8 else b"t" if c == 9 else b"n" if c == 10 else b"f" if c == 12 else b"r"
            out += 2
        else:  # another control character: \u00XX, lowercase
            out[0], out[1], out[2], out[3], out[4], out[5] = b"\\", b"u", b"0", b"0", _HEX[c >> 4], _HEX[c & 15]
            out += 6
        i += 1
    out[0] = b'"'
    buf.length = out + 1 - buf.data
    return 0


# The last UUID object written at each id position and its quoted text: the tenant, user and key of
# consecutive entries are most often the very same objects (one key's requests).
cdef object _last_ids = [None, None, None, None]
cdef char _last_texts[4][38]


cdef int _put_uuid(Buffer* buf, Py_ssize_t at, object value) except -1:
    """A UUID as its lowercase hyphenated text, quoted (`at`: its id position 0-3, for the cache; else -1)."""
    cdef unsigned char raw[16]
    cdef char* out
    cdef char* start
    cdef int i
    _reserve(buf, 38)
    start = out = buf.data + buf.length
    if 0 <= at < 4 and (<list>_last_ids)[at] is value:
        memcpy(out, _last_texts[at], 38)
        buf.length += 38
        return 0
    if gw_uuid_16(value, raw):
        pass
    elif type(value) is _UUID:
        gw_uuid_int_bytes(value.int, raw)
    else:  # asyncpg's, where its layout was not found
        data = value.bytes
        if type(data) is not bytes or len(<bytes>data) != 16:
            raise ValueError("a UUID whose bytes are not 16 bytes")
        memcpy(raw, PyBytes_AS_STRING(data), 16)
    out[0] = b'"'
    out += 1
    for i in range(16):
        if i == 4 or i == 6 or i == 8 or i == 10:
            out[0] = b"-"
            out += 1
        out[0], out[1] = _HEX[raw[i] >> 4], _HEX[raw[i] & 15]
        out += 2
    out[0] = b'"'
    if 0 <= at < 4:
        memcpy(_last_texts[at], start, 38)
        (<list>_last_ids)[at] = value
    buf.length += 38
    return 0


cdef int _put_timestamp(Buffer* buf, object value) except -1:
    """A UTC datetime as orjson writes it with OPT_UTC_Z: "YYYY-MM-DDTHH:MM:SS[.ffffff]Z", quoted."""
    cdef char* out
    cdef int micro = PyDateTime_DATE_GET_MICROSECOND(value)
    _reserve(buf, 30)
    out = buf.data + buf.length
    out[0] = b'"'
    _civil(out + 1, value, b"T")
    if micro:
        out[20] = b"."
        _digits(out + 21, micro, 6)
        out[27], out[28] = b"Z", b'"'
        buf.length += 29
    else:
        out[20], out[21] = b"Z", b'"'
        buf.length += 22
    return 0


cdef int _put_long(Buffer* buf, long long value) except -1:
    """An integer in decimal."""
    cdef char digits[20]
    cdef int size = _decimal_before(digits + 20, value)
    _reserve(buf, size)
    _put(buf, digits + 20 - size, size)
    return 0


cdef int _put_float(Buffer* buf, double value) except -1:
    """A float as Python's repr, which is orjson's text too when it has no exponent; 1 (nothing written) for
    one with an exponent or not finite (orjson's notation differs there: 1e16 against 1e+16).

    A value with at most three decimals (a duration in milliseconds, to the microsecond: what the gateway
    records) is written from its thousandths: the decimal whole/1000 reads back as `value` (the division
    is exact to within one rounding, and it was checked), no other decimal of three places or fewer does
    (below 1e12 they are 0.001 apart, more than the floats' spacing), and repr has no exponent from 0.001
    up to 1e16, so those digits, trailing zeros cut, are repr's. Python's dtoa costs far more.
    """
    cdef double scaled
    cdef long long whole, fraction
    cdef int kind = 0
    cdef char tail[4]
    cdef int cut
    if -1e12 < value < 1e12 and value != 0.0:
        scaled = value * 1000.0
        whole = <long long>scaled
        if <double>whole == scaled and <double>whole / 1000.0 == value:
            if whole < 0:
                _reserve(buf, 1)
                buf.data[buf.length] = b"-"
                buf.length += 1
                whole = -whole
            _put_long(buf, whole // 1000)
            fraction = whole % 1000
            tail[0] = b"."
            tail[1] = <char>(48 + fraction // 100)
            tail[2] = <char>(48 + fraction // 10 % 10)
            tail[3] = <char>(48 + fraction % 10)
            cut = 4
            while cut > 2 and tail[cut - 1] == b"0":
                cut -= 1
            _reserve(buf, 4)
            _put(buf, tail, cut)
            return 0
    cdef char* text = PyOS_double_to_string(value, b"r", 0, Py_DTSF_ADD_DOT_0, &kind)
    cdef Py_ssize_t size = 0
    cdef bint plain = kind == Py_DTST_FINITE
    try:
        while text[size] != 0:
            if text[size] == b"e":
                plain = False
            size += 1
        if not plain:
            return 1
        _reserve(buf, size)
        _put(buf, text, size)
        return 0
    finally:
        PyMem_Free(text)


cdef int _put_value(Buffer* buf, Py_ssize_t slot, object value) except -1:
    """`value` as orjson writes it (OPT_UTC_Z), for the types written here; 1 (maybe part written) for any
    other, which the twin writes. `slot`: the id position whose last UUID is remembered (0-3), or -1."""
    cdef long long number
    cdef type kind = type(value)
    if value is None:
        _reserve(buf, 4)
        _put(buf, b"null", 4)
        return 0
    if kind is str:
        return _put_string(buf, value)
    if kind is _UUID or kind is _PG_UUID:
        return _put_uuid(buf, slot, value)
    if kind is int:
        try:
            number = PyLong_AsLongLong(value)
        except OverflowError:
            return 1
        _put_long(buf, number)
        return 0
    if kind is float:
        return _put_float(buf, PyFloat_AS_DOUBLE(value))
    if PyDateTime_CheckExact(value) and datetime_tzinfo(value) is _UTC:
        return _put_timestamp(buf, value)
    return 1


cdef inline bint _head_type(Py_ssize_t at, object value):
    """Whether `value` is of column `at`'s type as the head writes it (else the twin normalizes it first: a str
    id, an int duration, a naive time)."""
    cdef type kind = type(value)
    if value is None:
        return True
    if at < 4:  # the ids
        return kind is _UUID or kind is _PG_UUID
    if at < 10:  # role, action, resource_type, resource_id, client_ip, outcome
        return kind is str
    if at == 10:  # error_code
        return kind is int
    if at == 11:  # duration_ms
        return kind is float
    return PyDateTime_CheckExact(value)  # created_at


cdef int _head_value(Buffer* buf, Py_ssize_t at, object value) except -1:
    """Column `at` of the head's values written; 1 where the twin must write the head (`_head_type`)."""
    if not _head_type(at, value):
        return 1
    return _put_value(buf, at, value)


def canonical_head(values, version):
    """`[version, *values]` as canonical JSON (see the twin's `canonical_head`)."""
    cdef Buffer buf
    cdef char stack[_STACK]
    cdef Py_ssize_t at
    cdef tuple row
    if type(values) is not tuple or len(values) != _WIDTH or type(version) is not str:
        return _by_twin(_twin_head, (values, version))
    row = values
    _start(&buf, stack)
    try:
        _put(&buf, b"[", 1)
        if _put_string(&buf, version):
            return _by_twin(_twin_head, (values, version))
        for at in range(_WIDTH):
            _reserve(&buf, 1)
            _put(&buf, b",", 1)
            if _head_value(&buf, at, row[at]):
                return _by_twin(_twin_head, (values, version))
        _reserve(&buf, 1)
        _put(&buf, b"]", 1)
        return PyBytes_FromStringAndSize(buf.data, buf.length)
    finally:
        _release(&buf)


cdef bint _holds_whole_float(const unsigned char* data, Py_ssize_t n) noexcept:
    """`may_hold_whole_float` of `n` bytes at `data`."""
    cdef Py_ssize_t at
    cdef const unsigned char* found = <const unsigned char*>memchr(data, 46, n)  # "."
    while found != NULL:
        at = found - data
        if at + 1 < n and data[at + 1] == 48:  # "0"
            if at + 2 == n or data[at + 2] == 44 or data[at + 2] == 125 or data[at + 2] == 93:  # , } ]
                return True
        found = <const unsigned char*>memchr(found + 1, 46, n - at - 1)
    found = <const unsigned char*>memchr(data, 43, n)  # "+"
    while found != NULL:
        at = found - data
        if at > 0 and data[at - 1] == 101:  # "e"
            return True
        found = <const unsigned char*>memchr(found + 1, 43, n - at - 1)
    return False


def finish_row(tuple row, new_id, details, Py_ssize_t details_at, tuple bounded, dict cleaned, clean,
               Py_ssize_t created_at):
    """An audit row as `prepare` leaves it (see the twin's `finish_row`), built as one tuple."""
    return _finish(row, new_id, details, details_at, bounded, cleaned, clean, created_at)


cdef object _bounded_text(object value, Py_ssize_t length, dict cleaned, clean):
    """`value` cleaned as the audit trail's texts are (`cleaned`, clean_text's cache, looked up first) and cut to
    `length` characters (-1: no bound)."""
    cdef PyObject* found = PyDict_GetItemWithError(cleaned, value) if type(value) is str else NULL
    if found is not NULL:
        text = <object>found
    else:
        text = clean(value) if isinstance(value, str) else clean(str(value))
    if length >= 0 and len(text) > length:
        return text[:length]
    return text


cdef tuple _finish(tuple row, new_id, details, Py_ssize_t details_at, tuple bounded, dict cleaned, clean,
                   Py_ssize_t created_at):
    cdef Py_ssize_t width = PyTuple_GET_SIZE(row), j, at
    cdef Py_ssize_t lengths[64]
    cdef tuple out
    if width > 64 or not (0 <= details_at < width and 0 <= created_at < width) or width == 0:
        return _twin.finish_row(row, new_id, details, details_at, bounded, cleaned, clean, created_at)
    for j in range(width):
        lengths[j] = -1
    for pair in bounded:
        at, length = pair
        if not 0 <= at < width:
            raise IndexError("a bounded position past the row's end")
        lengths[at] = length
    out = PyTuple_New(width)
    for j in range(width):
        value = <object>PyTuple_GET_ITEM(row, j)
        if j == details_at:
            value = details
        elif j == 0 and value is None:
            value = new_id
        if lengths[j] >= 0 and value is not None:
            value = _bounded_text(value, lengths[j], cleaned, clean)
        if j == created_at:
            if PyDateTime_CheckExact(value):
                if datetime_tzinfo(value) is None:
                    value = value.replace(tzinfo=_UTC)
            elif value.tzinfo is None:
                value = value.replace(tzinfo=_UTC)
        Py_INCREF(value)
        PyTuple_SET_ITEM(out, j, value)
    return out


def bound_rows(list rows, tuple bounded, dict cleaned, clean):
    """`rows` with their texts at `bounded` cleaned and cut (see the twin's `bound_rows`)."""
    cdef list out = []
    cdef list values
    cdef tuple row
    cdef Py_ssize_t count = len(bounded), width, at, k
    cdef Py_ssize_t positions[64]
    cdef Py_ssize_t lengths[64]  # -1: no bound
    if count > 64:
        return _twin.bound_rows(rows, bounded, cleaned, clean)
    for k in range(count):
        pair = bounded[k]
        positions[k] = pair[0]
        lengths[k] = -1 if pair[1] is None else <Py_ssize_t>pair[1]
        if lengths[k] < 0 and pair[1] is not None:
            raise ValueError("a negative length")
    for item in rows:
        row = item if type(item) is tuple else tuple(item)
        width = PyTuple_GET_SIZE(row)
        values = None
        for k in range(count):
            at = positions[k]
            if not 0 <= at < width:
                raise IndexError("a bounded position past the row's end")
            value = <object>PyTuple_GET_ITEM(row, at)
            if value is None:
                continue
            text = _bounded_text(value, lengths[k], cleaned, clean)
            if text is not value and (type(value) is not str or text != value):
                if values is None:
                    values = list(row)
                values[at] = text
        out.append(item if values is None else tuple(values))
    return out


cdef class McpDetails:
    """What an MCP entry's details are made of, kept raw until `prepare` (see the twin's `McpDetails`)."""

    cdef readonly object body, server, status, error

    def __init__(self, body, server, status, error):
        self.body, self.server, self.status, self.error = body, server, status, error


SUCCESS, ERROR = _twin.SUCCESS, _twin.ERROR
TARGET_KINDS = _twin.TARGET_KINDS
cdef str _SUCCESS = SUCCESS, _ERROR = ERROR
cdef dict _TARGET_KINDS = TARGET_KINDS
cdef dict _ACTIONS = {}  # a method's action ("mcp." + method), for the first methods seen


def mcp_row(type details_type, key, server_name, method, target, body, status, error_code, error, duration_ms,
            client_ip, now, bint is_batch=False):
    """An MCP request's audit row (see the twin's `mcp_row`), built without a Python frame."""
    cdef McpDetails details
    cdef PyObject* found
    if is_batch:
        action, kind, resource = "mcp.batch", "server", server_name
    else:
        if method:
            found = PyDict_GetItemWithError(_ACTIONS, method) if type(method) is str else NULL
            if found is not NULL:
                action = <object>found
            else:
                action = "mcp." + method
                if type(method) is str and len(_ACTIONS) < 256:  # bounded: methods are whatever clients send
                    _ACTIONS[method] = action
        else:
            action = "mcp.response" if body else "mcp.request"
        kind = _TARGET_KINDS.get(method) if target is not None else None
        if kind is None:
            if server_name is not None:
                kind, resource = "server", server_name
            else:
                kind = resource = None
        else:
            resource = target
    failed = status >= 400 or error_code is not None
    if not issubclass(details_type, McpDetails):
        raise TypeError("details_type must be an McpDetails")
    details = details_type.__new__(details_type)
    details.body, details.server, details.status, details.error = body, server_name, status, error
    return (None, key.tenant_id, key.user_id, key.id, action, kind, resource, details, client_ip,
            _ERROR if failed else _SUCCESS, error_code, duration_ms, now, key.role, None, None, None)


cdef class DetailsText:
    """An audit entry's details kept only as their sorted-key JSON text (see the twin's `DetailsText`)."""

    cdef readonly bytes text
    # The canonical form of the row these details were logged in, written with its log line (`log_lines`), and
    # that row's address: `canonicals_into` takes it for that very row instead of writing it again.
    cdef bytes _canonical
    cdef Py_ssize_t _canonical_of
    cdef Py_ssize_t _canonical_head_at  # the address of the head's positions it was written for

    def __init__(self, bytes text):
        self.text = text

    def value(self):
        return _loads(self.text)

    def __eq__(self, other):
        return type(other) is DetailsText and (<DetailsText>other).text == self.text

    __hash__ = None

    def __repr__(self):
        return f"DetailsText({self.text!r})"


cdef DetailsText _details_text(bytes text):
    cdef DetailsText made = DetailsText.__new__(DetailsText)
    made.text = text
    return made


def prepare_rows(list rows, list out, type mcp_type, plain_of, fallback, new_id, Py_ssize_t tenant_at,
                 Py_ssize_t details_at, tuple bounded, dict cleaned, clean, Py_ssize_t created_at):
    """Append each of `rows` to `out` as `prepare` leaves it (see the twin's `prepare_rows`): a plain call's
    here, in one pass without a Python frame, any other by `fallback(row)`."""
    cdef dict screens = {}  # the tenant object's address -> its screen's `plain`, or None
    cdef PyObject* last_tenant = NULL  # the tenant `plain` is for (a batch's rows come in runs of one tenant)
    plain = None
    cdef McpDetails details
    cdef PyObject* found
    cdef tuple row
    cdef bytes body
    for item in rows:
        row = <tuple?>item
        if not (0 <= tenant_at < PyTuple_GET_SIZE(row) and 0 <= details_at < PyTuple_GET_SIZE(row)):
            out.append(fallback(row))
            continue
        value = <object>PyTuple_GET_ITEM(row, details_at)
        if type(value) is not mcp_type:
            out.append(fallback(row))
            continue
        details = <McpDetails>value
        if (type(details.body) is not bytes or PyBytes_GET_SIZE(details.body) == 0
                or PyBytes_AS_STRING(details.body)[0] == 91  # a batch's "[": the general path
                or type(details.status) is not int
                or (details.server is not None and type(details.server) is not str)
                or (details.error is not None and type(details.error) is not str)):
            out.append(fallback(row))
            continue
        body = details.body
        # By the tenant object's identity, as `prepare` looks its sanitizer up (every row holds its tenant
        # alive until the batch is done, so no address is reused meanwhile).
        tenant = <object>PyTuple_GET_ITEM(row, tenant_at)
        if <PyObject*>tenant != last_tenant:
            address = <Py_ssize_t><void*>tenant
            found = PyDict_GetItemWithError(screens, address)
            if found is NULL:
                plain = plain_of(tenant)
                screens[address] = plain
            else:
                plain = <object>found
            last_tenant = <PyObject*>tenant
        if plain is None:
            out.append(fallback(row))
            continue
        if not plain(body, 0):
            out.append(fallback(row, False))  # the screen's answer: the fallback does not ask it again
            continue
        server = details.server
        if server is not None:
            found = PyDict_GetItemWithError(cleaned, server)
            server = <object>found if found is not NULL else clean(server)
        error = clean(details.error) if details.error else None
        if (server is not None and type(server) is not str) or (error is not None and type(error) is not str):
            out.append(fallback(row))
            continue
        text = _plain_details(body, details.status, server, error)
        if text is None:
            out.append(fallback(row, True))  # the screen passed it; plain_details declined
            continue
        out.append(_finish(row, new_id() if PyTuple_GET_ITEM(row, 0) == <PyObject*>None else None,
                           _details_text(text), details_at, bounded, cleaned, clean, created_at))


def canonicals_into(list rows, Py_ssize_t start, Py_ssize_t stop, tuple head_at, Py_ssize_t details_at,
                    str version, tuple text_types, slow, list canonicals, list texts):
    """Each row's canonical form and details' text appended (see the twin's `canonicals_into`)."""
    cdef Buffer buf
    cdef char stack[_STACK]
    cdef Py_ssize_t i, k, at, count = len(head_at)
    cdef tuple row
    cdef bytes text
    cdef bint done
    cdef bytes version_json = _json_string(version)
    if count != _WIDTH or not (0 <= start <= stop <= len(rows)):
        raise ValueError("head_at names the head's columns; start and stop a range of rows")
    for i in range(start, stop):
        row = rows[i]
        details = row[details_at]
        text = None
        done = False
        if details is not None:
            if type(details) not in text_types:
                done = True
            elif (type(details) is DetailsText and (<DetailsText>details)._canonical_of == <Py_ssize_t><PyObject*>row
                    and (<DetailsText>details)._canonical_head_at == <Py_ssize_t><PyObject*>head_at
                    and _same_version((<DetailsText>details)._canonical, version_json)):
                # Written with the row's log line, for this very row and head (`log_lines`).
                text = (<DetailsText>details).text
                if not text.isascii():
                    text.decode()  # UTF-8, or a UnicodeDecodeError as the database would refuse it
                canonicals.append((<DetailsText>details)._canonical)
                texts.append(text)
                continue
            else:
                found = getattr(details, "text", None)
                if type(found) is not bytes or _holds_whole_float(
                        <const unsigned char*>PyBytes_AS_STRING(found), PyBytes_GET_SIZE(found)):
                    done = True
                else:
                    text = found
        if not done:
            _start(&buf, stack)
            try:
                _put(&buf, b"[", 1)
                if _put_string(&buf, version):
                    done = True
                k = 0
                while not done and k < count:
                    at = head_at[k]
                    _reserve(&buf, 1)
                    _put(&buf, b",", 1)
                    if _head_value(&buf, k, row[at]):
                        done = True
                    k += 1
                if not done:
                    if text is None:
                        _reserve(&buf, 3)
                        _put(&buf, b"]\x1f-", 3)
                    else:
                        _reserve(&buf, 2 + len(text))
                        _put(&buf, b"]\x1f", 2)
                        _put(&buf, text, len(text))
                    canonicals.append(PyBytes_FromStringAndSize(buf.data, buf.length))
                    if text is not None and not text.isascii():  # ASCII is UTF-8 (a word at a time)
                        text.decode()  # UTF-8, or a UnicodeDecodeError as the database would refuse it
                    texts.append(text)
                    continue
            finally:
                _release(&buf)
        global _fallbacks
        _fallbacks += 1
        canonical, decoded = slow(row)
        canonicals.append(canonical)
        texts.append(decoded)


# The names of the last `names` a line was written with, each as '"name":' (the same tuple every time).
cdef object _keys_for = None
cdef list _keys = None


cdef list _keys_of(tuple names):
    """Each name as its JSON key and colon, for the names of the last call remembered; None if a name is not
    a str (the twin's to write)."""
    global _keys_for, _keys
    cdef Buffer buf
    cdef char stack[_STACK]
    cdef list keys
    if names is _keys_for:
        return _keys
    keys = []
    for name in names:
        if type(name) is not str:
            return None
        _start(&buf, stack)
        try:
            if _put_string(&buf, name):
                return None
            _reserve(&buf, 1)
            _put(&buf, b":", 1)
            keys.append(PyBytes_FromStringAndSize(buf.data, buf.length))
        finally:
            _release(&buf)
    _keys_for, _keys = names, keys
    return keys


def log_line(tuple names, tuple values, Py_ssize_t details_at, details_text):
    """The entry's log line as a JSON object (see the twin's `log_line`)."""
    return _line(names, values, details_at, details_text)


def log_lines(tuple names, list rows, Py_ssize_t details_at, tuple text_types, fallback, tuple head_at=None,
              str version=None):
    """Each row's log line, in order (see the twin's `log_lines`)."""
    cdef list lines = []
    cdef tuple row
    cdef Py_ssize_t spans[2 * _MAX_NAMES]
    cdef Py_ssize_t k, at, count = len(names)
    cdef bint spanned
    cdef DetailsText held
    if head_at is not None:
        if len(head_at) != _WIDTH or version is None:
            raise ValueError("head_at names the head's columns, with the version")
        for k in range(_WIDTH):
            at = head_at[k]
            if not 0 <= at < count or at == details_at:
                raise ValueError("a head column that is no line's")
    for item in rows:
        row = <tuple?>item
        details = row[details_at] if details_at < len(row) else None
        text = getattr(details, "text", None) if type(details) in text_types else None
        spanned = False
        try:
            line = _line(names, row, details_at, text, spans if count <= _MAX_NAMES else NULL, &spanned)
        except (TypeError, ValueError):
            line = fallback(row)
        else:
            if spanned and head_at is not None and type(details) is DetailsText:
                held = <DetailsText>details
                held._canonical = _canonical_from_line(<bytes>line, spans, row, head_at, version, held.text)
                held._canonical_of = <Py_ssize_t><PyObject*>row if held._canonical is not None else 0
                held._canonical_head_at = <Py_ssize_t><PyObject*>head_at
        lines.append(line)
    return lines


cdef enum:
    _MAX_NAMES = 32  # a line's columns whose values' places are kept for the canonical form


cdef object _line(tuple names, tuple values, Py_ssize_t details_at, details_text, Py_ssize_t* spans=NULL,
                  bint* spanned=NULL):
    """The line; where `spans` is given, each column's value's [start, end) in it (-1: not written), and
    `spanned` set when the line was written here (not by the twin)."""
    cdef Buffer buf
    cdef char stack[_STACK]
    cdef Py_ssize_t at, count = len(names)
    cdef bytes raw, key
    cdef list keys
    cdef bint first = True
    if len(values) < count or (details_text is not None and type(details_text) is not bytes):
        return _by_twin(_twin_line, (names, values, details_at, details_text))
    keys = _keys_of(names)
    if keys is None:
        return _by_twin(_twin_line, (names, values, details_at, details_text))
    _start(&buf, stack)
    try:
        _put(&buf, b"{", 1)
        for at in range(count):
            if spans != NULL:
                spans[2 * at] = -1
            value = values[at]
            if value is None:
                continue
            if not first:
                _reserve(&buf, 1)
                _put(&buf, b",", 1)
            first = False
            key = <bytes>PyList_GET_ITEM(keys, at)
            _reserve(&buf, len(key))
            _put(&buf, key, len(key))
            if spans != NULL:
                spans[2 * at] = buf.length
            if at == details_at and details_text is not None:
                raw = details_text
                _reserve(&buf, len(raw))
                _put(&buf, raw, len(raw))
            elif _put_value(&buf, at if at < 4 else -1, value):
                return _by_twin(_twin_line, (names, values, details_at, details_text))
            if spans != NULL:
                spans[2 * at + 1] = buf.length
        _reserve(&buf, 1)
        _put(&buf, b"}", 1)
        if spanned != NULL:
            spanned[0] = spans != NULL
        return PyBytes_FromStringAndSize(buf.data, buf.length)
    finally:
        _release(&buf)


cdef bytes _json_string(str text):
    """`text` as a JSON string (None: one the twin would write, a lone surrogate)."""
    cdef Buffer buf
    cdef char stack[_STACK]
    _start(&buf, stack)
    try:
        if _put_string(&buf, text):
            return None
        return PyBytes_FromStringAndSize(buf.data, buf.length)
    finally:
        _release(&buf)


cdef inline bint _same_version(bytes canonical, bytes version_json):
    """Whether `canonical` opens with the version `version_json` spells (and a comma after it)."""
    cdef Py_ssize_t size
    if version_json is None:
        return False
    size = PyBytes_GET_SIZE(version_json)
    return (PyBytes_GET_SIZE(canonical) > size + 1 and PyBytes_AS_STRING(canonical)[size + 1] == b","
            and memcmp(PyBytes_AS_STRING(canonical) + 1, PyBytes_AS_STRING(version_json), size) == 0)


cdef object _canonical_from_line(bytes line, const Py_ssize_t* spans, tuple row, tuple head_at, str version,
                                 bytes text):
    """The row's canonical form (as `canonicals_into` writes it: the head, 0x1f, the details' text) from the
    values as its log line spells them, which is how the head spells them too; None where the head would be
    the twin's (a value of another type than its column's) or the text is not taken as it is."""
    cdef Buffer buf
    cdef char stack[_STACK]
    cdef Py_ssize_t k, at
    cdef const char* data = PyBytes_AS_STRING(line)
    if text is None or _holds_whole_float(<const unsigned char*>PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text)):
        return None
    for k in range(_WIDTH):
        if not _head_type(k, <object>PyTuple_GET_ITEM(row, head_at[k])):
            return None
    _start(&buf, stack)
    try:
        _put(&buf, b"[", 1)
        if _put_string(&buf, version):
            return None
        for k in range(_WIDTH):
            at = head_at[k]
            if spans[2 * at] < 0:
                _reserve(&buf, 5)
                _put(&buf, b",null", 5)
            else:
                _reserve(&buf, 1 + spans[2 * at + 1] - spans[2 * at])
                _put(&buf, b",", 1)
                _put(&buf, data + spans[2 * at], spans[2 * at + 1] - spans[2 * at])
        _reserve(&buf, 2 + PyBytes_GET_SIZE(text))
        _put(&buf, b"]\x1f", 2)
        _put(&buf, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))
        return PyBytes_FromStringAndSize(buf.data, buf.length)
    finally:
        _release(&buf)


# ------------------------------------------------------------------ a plain call's details

cdef enum:
    _MAX_MEMBERS = 100  # an object's members (the screen passes no body with more commas than that)
    _MAX_NESTING = 32


cdef struct _Member:
    Py_ssize_t key_at  # the key's first byte in the body (after its quote)
    Py_ssize_t key_size
    Py_ssize_t value_at  # the value's canonical text in the output
    Py_ssize_t value_size


cdef inline Py_ssize_t _skip_space(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and (s[i] == 32 or s[i] == 10 or s[i] == 13 or s[i] == 9):
        i += 1
    return i


# The bytes that end a run of a string's ASCII text as written here: its closing quote, an escape (checked),
# a control character (left to the general path), and a byte past ASCII (checked as UTF-8).
cdef unsigned char _STRING_STOPS[256]
for _byte in range(256):
    _STRING_STOPS[_byte] = _byte == 34 or _byte == 92 or _byte < 0x20 or _byte >= 0x80


cdef inline Py_ssize_t _utf8_end(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """`s[i]` is past ASCII: the index after the UTF-8 character it starts, or -1 where it starts none that
    orjson reads (a stray continuation byte, an overlong form, a surrogate, past U+10FFFF, cut short)."""
    cdef unsigned char c = s[i]
    cdef Py_ssize_t size, k
    cdef unsigned char low = 0x80, high = 0xBF  # the second byte's range
    if c < 0xC2:
        return -1
    if c < 0xE0:
        size = 2
    elif c < 0xF0:
        size = 3
        if c == 0xE0:
            low = 0xA0  # below: an overlong form
        elif c == 0xED:
            high = 0x9F  # above: a surrogate
    elif c < 0xF5:
        size = 4
        if c == 0xF0:
            low = 0x90
        elif c == 0xF4:
            high = 0x8F  # above: past U+10FFFF
    else:
        return -1
    if i + size > n or not low <= s[i + 1] <= high:
        return -1
    for k in range(2, size):
        if not 0x80 <= s[i + k] <= 0xBF:
            return -1
    return i + size


# The escapes orjson writes as they are read: \b \f \n \r \t \" \\ (it writes a \/ as "/", a \u escape as the
# character or as a \u00XX of its own).
cdef unsigned char _KEPT_ESCAPES[256]
for _byte in range(256):
    _KEPT_ESCAPES[_byte] = _byte in b'bfnrt"\\'


cdef inline Py_ssize_t _string_end(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """`s[i]` opens a string: the index of its closing quote, or -1 for a string not written here (a control
    character, an escape orjson writes otherwise, bytes that are no UTF-8) or one that does not end. orjson
    writes every character past ASCII as its UTF-8 and \b \f \n \r \t \" \\ as these escapes, so those are
    copied as they are."""
    i += 1
    while True:
        while i < n and not _STRING_STOPS[s[i]]:
            i += 1
        if i >= n:
            return -1
        if s[i] >= 0x80:
            i = _utf8_end(s, i, n)
            if i < 0:
                return -1
        elif s[i] == 92 and i + 1 < n and _KEPT_ESCAPES[s[i + 1]]:
            i += 2
        else:
            return i if s[i] == 34 else -1


cdef inline int _key_order(const unsigned char* s, _Member* a, _Member* b) noexcept:
    """<0, 0 or >0 as key a sorts before, with or after key b (UTF-8's byte order is code point order)."""
    cdef Py_ssize_t size = a.key_size if a.key_size < b.key_size else b.key_size
    cdef int order = memcmp(s + a.key_at, s + b.key_at, size)
    if order != 0:
        return order
    return (a.key_size > b.key_size) - (a.key_size < b.key_size)


cdef Py_ssize_t _plain_fraction(const unsigned char* s, Py_ssize_t start, Py_ssize_t dot, Py_ssize_t n,
                                Buffer* out) except -2:
    """The number at `s[start]` whose integer part ends at the '.' at `s[dot]`, copied to `out` where orjson
    would write its float in the same characters; the index after it, or -1 where not (the caller's answer).

    Copied when the number has at most 15 significant digits, no trailing zero, no exponent, and is not below
    0.0001. Distinct decimals of at most 15 significant digits are distinct doubles (DBL_DIG), so the double the
    text decodes to has no shorter text that decodes to it, nor another as short: its shortest round-trip text,
    which is what orjson writes (as Python's repr does), holds the same digits. repr places the point as the
    text does from 0.0001 up to 1e16 (below, it writes an exponent, as orjson does). No trailing zero: the value
    is no whole number (the canonical form writes those as integers), and repr would write fewer digits."""
    cdef Py_ssize_t i = dot + 1, first
    cdef Py_ssize_t whole_digits = dot - start - (s[start] == 45)
    if i >= n or not 48 <= s[i] <= 57:
        return -1
    while i < n and 48 <= s[i] <= 57:
        i += 1
    if i < n and (s[i] == 101 or s[i] == 69):
        return -1  # an exponent: orjson writes such a float its own way
    if s[i - 1] == 48:
        return -1  # a trailing zero: "2.0" is a whole number, "0.50" is written "0.5"
    if whole_digits == 1 and s[dot - 1] == 48:  # below 1: the significant digits start after the zeros
        first = dot + 1
        while s[first] == 48:
            first += 1
        if first - dot - 1 > 3:
            return -1  # below 0.0001: written with an exponent
        if i - first > 15:
            return -1
    elif whole_digits + (i - dot - 1) > 15:
        return -1
    _reserve(out, i - start)
    _put(out, <const char*>s + start, i - start)
    return i


cdef Py_ssize_t _plain_value(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Buffer* out, int depth,
                             bint drop_meta) except -2:
    """The JSON value at `s[i]` written to `out` as orjson writes it once decoded (keys sorted, no space);
    the index after it, or -1 where the value is not written here: a float `_plain_fraction` does not copy, -0,
    an integer of 19 digits or more, a string as `_string_end` refuses, a duplicate key, anything that is not
    JSON. `drop_meta`: an object's "_meta" member is left out."""
    cdef unsigned char c
    cdef Py_ssize_t start, end
    if i >= n:
        return -1
    c = s[i]
    if c == 34:
        end = _string_end(s, i, n)
        if end < 0:
            return -1
        _reserve(out, end + 1 - i)
        _put(out, <const char*>s + i, end + 1 - i)
        return end + 1
    if c == 123:
        return _plain_object(s, i, n, out, depth, drop_meta)
    if c == 91:
        if depth >= _MAX_NESTING:
            return -1
        _reserve(out, 1)
        _put(out, b"[", 1)
        i = _skip_space(s, i + 1, n)
        if i < n and s[i] == 93:
            _reserve(out, 1)
            _put(out, b"]", 1)
            return i + 1
        while True:
            i = _plain_value(s, i, n, out, depth + 1, False)
            if i < 0:
                return -1
            i = _skip_space(s, i, n)
            if i >= n:
                return -1
            _reserve(out, 1)
            if s[i] == 44:
                _put(out, b",", 1)
                i = _skip_space(s, i + 1, n)
            elif s[i] == 93:
                _put(out, b"]", 1)
                return i + 1
            else:
                return -1
    if c == 45 or 48 <= c <= 57:
        start = i
        if c == 45:
            i += 1
            if i >= n:
                return -1
        if s[i] == 48:
            i += 1
        elif 49 <= s[i] <= 57:
            while i < n and 48 <= s[i] <= 57:
                i += 1
        else:
            return -1
        if i < n and s[i] == 46:
            return _plain_fraction(s, start, i, n, out)
        if i < n and (s[i] == 101 or s[i] == 69 or 48 <= s[i] <= 57):
            return -1  # an exponent (orjson writes the float its own way), or a leading zero
        if c == 45 and i - start == 2 and s[start + 1] == 48:  # -0: decoded as 0
            return -1
        if i - start - (c == 45) > 18:
            return -1
        _reserve(out, i - start)
        _put(out, <const char*>s + start, i - start)
        return i
    if c == 116 and i + 4 <= n and memcmp(s + i, b"true", 4) == 0:
        _reserve(out, 4)
        _put(out, b"true", 4)
        return i + 4
    if c == 102 and i + 5 <= n and memcmp(s + i, b"false", 5) == 0:
        _reserve(out, 5)
        _put(out, b"false", 5)
        return i + 5
    if c == 110 and i + 4 <= n and memcmp(s + i, b"null", 4) == 0:
        _reserve(out, 4)
        _put(out, b"null", 4)
        return i + 4
    return -1


cdef inline bint _is_key(const unsigned char* s, _Member* member, const char* key, Py_ssize_t size) noexcept:
    return member.key_size == size and memcmp(s + member.key_at, key, size) == 0


cdef Py_ssize_t _members(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Buffer* out, int depth,
                         _Member* members, int* count, bint message) except -2:
    """The members of the object opened at `s[i]`, their values written to `out` one after another, in the
    body's order; the index after the object, or -1 (see `_plain_value`; also more than _MAX_MEMBERS).
    `message`: the object is a JSON-RPC message, whose "params" are written without their "_meta"."""
    cdef Py_ssize_t end
    cdef int k
    count[0] = 0
    i = _skip_space(s, i + 1, n)
    if i < n and s[i] == 125:
        return i + 1
    while True:
        if i >= n or s[i] != 34 or count[0] == _MAX_MEMBERS:
            return -1
        end = _string_end(s, i, n)
        # A key with an escape: its bytes would not sort as its characters do (a "\\n" is 0x5C 0x6E, a newline
        # 0x0A), so the general path puts it in order.
        if end < 0 or memchr(s + i + 1, 92, end - i - 1) is not NULL:
            return -1
        k = count[0]
        members[k].key_at, members[k].key_size = i + 1, end - i - 1
        i = _skip_space(s, end + 1, n)
        if i >= n or s[i] != 58:
            return -1
        i = _skip_space(s, i + 1, n)
        members[k].value_at = out.length
        i = _plain_value(s, i, n, out, depth + 1, message and _is_key(s, &members[k], b"params", 6))
        if i < 0:
            return -1
        members[k].value_size = out.length - members[k].value_at
        count[0] = k + 1
        i = _skip_space(s, i, n)
        if i >= n:
            return -1
        if s[i] == 44:
            i = _skip_space(s, i + 1, n)
        elif s[i] == 125:
            return i + 1
        else:
            return -1


cdef int _put_member(Buffer* out, const char* key, Py_ssize_t key_size, const char* value, Py_ssize_t size,
                     bint* first) except -1:
    """`"key":value` and the comma before it unless it is the first."""
    _reserve(out, key_size + size + 4)
    if not first[0]:
        _put(out, b",", 1)
    first[0] = False
    _put(out, b'"', 1)
    _put(out, key, key_size)
    _put(out, b'":', 2)
    _put(out, value, size)
    return 0


cdef Py_ssize_t _plain_object(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Buffer* out, int depth,
                              bint drop_meta) except -2:
    """`_plain_value` of an object: its members written, then put in key order (a duplicate key: -1)."""
    cdef _Member members[_MAX_MEMBERS]
    cdef _Member held
    cdef int count, a, b
    cdef Py_ssize_t begin = out.length, size
    cdef char* values
    cdef bint first = True
    if depth >= _MAX_NESTING:
        return -1
    i = _members(s, i, n, out, depth, members, &count, False)
    if i < 0:
        return -1
    for a in range(1, count):  # insertion sort: a few members, most of them in order already
        held = members[a]
        b = a - 1
        while b >= 0 and _key_order(s, &members[b], &held) > 0:
            members[b + 1] = members[b]
            b -= 1
        if b >= 0 and _key_order(s, &members[b], &held) == 0:
            return -1  # a duplicate key: decoding keeps the last one
        members[b + 1] = held
    size = out.length - begin
    values = <char*>PyMem_Malloc(size + 1)
    if values == NULL:
        raise MemoryError()
    try:
        memcpy(values, out.data + begin, size)
        out.length = begin
        _reserve(out, 2)
        _put(out, b"{", 1)
        for a in range(count):
            if drop_meta and _is_key(s, &members[a], b"_meta", 5):
                continue
            _put_member(out, <const char*>s + members[a].key_at, members[a].key_size,
                        values + members[a].value_at - begin, members[a].value_size, &first)
        _reserve(out, 1)
        _put(out, b"}", 1)
    finally:
        PyMem_Free(values)
    return i


def plain_details(bytes body, long long status, server, error):
    """The details `McpDetails.build` makes of one JSON-RPC message, as the sorted-key JSON `prepare`
    encodes them, written from the body's text without decoding it; None where this does not write them
    (see the twin's `plain_details`). Only for a body the sanitizer's screen passed: nothing is redacted."""
    return _plain_details(body, status, server, error)


cdef object _plain_details(bytes body, long long status, server, error):
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), i
    cdef _Member members[_MAX_MEMBERS]
    cdef int count, a, b
    cdef int method = -1, request_id = -1, params = -1, response = -1
    cdef Buffer values, out
    cdef char values_stack[_STACK]
    cdef char out_stack[_STACK]
    cdef bint first = True
    if (server is not None and type(server) is not str) or (error is not None and type(error) is not str):
        return None
    i = _skip_space(s, 0, n)
    if i >= n or s[i] != 123:
        return None
    _start(&values, values_stack)
    _start(&out, out_stack)
    try:
        # The message's members, each value written as it is stored; "params" without its "_meta".
        i = _members(s, i, n, &values, 0, members, &count, True)
        if i < 0:
            return None
        if _skip_space(s, i, n) != n:
            return None
        for a in range(count):
            for b in range(a):
                if _key_order(s, &members[a], &members[b]) == 0:
                    return None  # a duplicate key: decoding keeps the last one
            if _is_key(s, &members[a], b"method", 6):
                method = a
            elif _is_key(s, &members[a], b"id", 2):
                request_id = a
            elif _is_key(s, &members[a], b"params", 6):
                params = a
            elif _is_key(s, &members[a], b"error", 5):
                response = a
        # The details' keys in sorted order: error, method, params, request_id, response_error, server, status.
        _reserve(&out, 1)
        _put(&out, b"{", 1)
        if error:
            _put_member(&out, b"error", 5, b"", 0, &first)
            if _put_string(&out, error):
                return None
        if method >= 0:
            _put_member(&out, b"method", 6, values.data + members[method].value_at, members[method].value_size,
                        &first)
        if params >= 0 and not (members[params].value_size == 4 and
                                memcmp(values.data + members[params].value_at, b"null", 4) == 0):
            _put_member(&out, b"params", 6, values.data + members[params].value_at, members[params].value_size,
                        &first)
        if request_id >= 0:
            _put_member(&out, b"request_id", 10, values.data + members[request_id].value_at,
                        members[request_id].value_size, &first)
        if response >= 0:
            _put_member(&out, b"response_error", 14, values.data + members[response].value_at,
                        members[response].value_size, &first)
        if server is not None:
            _put_member(&out, b"server", 6, b"", 0, &first)
            if _put_string(&out, server):
                return None
        _put_member(&out, b"status", 6, b"", 0, &first)
        _put_long(&out, status)
        _reserve(&out, 1)
        _put(&out, b"}", 1)
        return PyBytes_FromStringAndSize(out.data, out.length)
    finally:
        _release(&values)
        _release(&out)


def may_hold_whole_float(bytes text):
    """Whether `text` holds ".0" before a comma, a brace, a bracket or its end, or "e+" (see the twin's): the
    dots and the plus signs found by memchr, each then looked at."""
    return _holds_whole_float(<const unsigned char*>PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))


# ------------------------------------------------------------------ linking

def tenants_in(list rows, Py_ssize_t tenant_at):
    """The distinct tenants of `rows` (see the twin's `tenants_in`). Each tenant object is hashed once: a run of
    rows of one object is passed over, and an object seen before is found by its address (hashing one of
    asyncpg's UUIDs runs about 500 instructions, and the rows of two tenants' requests come in turn)."""
    cdef set seen = set()
    cdef dict addresses = {}  # the address of each tenant object added (the rows hold them alive meanwhile)
    cdef PyObject* last = NULL
    cdef tuple row
    for item in rows:
        row = <tuple?>item
        if not 0 <= tenant_at < PyTuple_GET_SIZE(row):
            raise IndexError("the tenant's position past a row's end")
        tenant = <object>PyTuple_GET_ITEM(row, tenant_at)
        if <PyObject*>tenant != last:
            address = <Py_ssize_t><void*>tenant
            if PyDict_GetItemWithError(addresses, address) is NULL:
                seen.add(tenant)
                addresses[address] = None
            last = <PyObject*>tenant  # the row holds it: no other object takes its address meanwhile
    return seen


def entry_hash(prev_hash, chain_seq, canonical):
    """SHA-256 hex of `prev_hash|chain_seq|canonical` (as the twin's)."""
    cdef Py_ssize_t prev_size
    cdef const char* prev
    if (_native and type(prev_hash) is str and type(chain_seq) is int and type(canonical) is bytes
            and -_LIMIT <= chain_seq < _LIMIT):
        prev = PyUnicode_AsUTF8AndSize(prev_hash, &prev_size)
        text = _hex_digest(prev, prev_size, chain_seq, PyBytes_AS_STRING(canonical),
                           PyBytes_GET_SIZE(canonical))
        if text is not None:
            return text
    return _twin_hash(prev_hash, chain_seq, canonical)


def link(list rows, dict heads, list canonicals, texts, Py_ssize_t tenant_at, Py_ssize_t details_at,
         Py_ssize_t seq_at):
    """`rows` numbered and hashed after their chains' heads (see the twin's `link`)."""
    cdef dict states = {}
    cdef dict known = {}
    cdef list linked = []
    cdef list state
    cdef Py_ssize_t i, j, width, count = PyList_GET_SIZE(rows)
    cdef Py_ssize_t prev_size
    cdef long long seq
    cdef const char* prev_text
    cdef PyObject* found
    cdef tuple row, out
    cdef bytes body
    cdef list text_list = texts
    if len(canonicals) < count or (text_list is not None and len(text_list) < count):
        raise IndexError("fewer canonical forms or texts than rows")
    for i in range(count):
        row = rows[i]  # a TypeError for anything but a tuple
        width = PyTuple_GET_SIZE(row)
        if not (0 <= tenant_at < width and 0 <= details_at < width and 0 <= seq_at and seq_at + 2 < width):
            raise IndexError("a column position past the row's end")
        tenant = <object>PyTuple_GET_ITEM(row, tenant_at)
        identity = <Py_ssize_t><void*>tenant
        found = PyDict_GetItemWithError(known, identity)
        if found is NULL:
            found = PyDict_GetItemWithError(states, tenant)
            if found is NULL:
                head = heads.get(tenant, _GENESIS_HEAD)
                state = [head[0], head[1]]
                PyDict_SetItem(states, tenant, state)
            else:
                state = <list>found
            PyDict_SetItem(known, identity, state)
        else:
            state = <list>found
        prev = state[1]
        seq = state[0]  # an OverflowError past a bigint, as the column would refuse it
        if seq == 0x7FFFFFFFFFFFFFFF:
            raise OverflowError("chain_seq past a bigint")
        seq += 1
        body = canonicals[i]
        if body is None:
            raise TypeError("a canonical form that is not bytes")
        digest = None
        if _native and type(prev) is str:
            prev_text = PyUnicode_AsUTF8AndSize(prev, &prev_size)
            digest = _hex_digest(prev_text, prev_size, seq, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        if digest is None:
            digest = _twin_hash(prev, seq, body)
        number = seq
        state[0] = number
        state[1] = digest
        out = PyTuple_New(width)
        for j in range(width):
            if j == seq_at:
                value = number
            elif j == seq_at + 1:
                value = prev
            elif j == seq_at + 2:
                value = digest
            elif j == details_at and text_list is not None:
                value = <object>PyList_GET_ITEM(text_list, i)
            else:
                value = <object>PyTuple_GET_ITEM(row, j)
            Py_INCREF(value)
            PyTuple_SET_ITEM(out, j, value)
        linked.append(out)
    for tenant, state in states.items():
        heads[tenant] = (state[0], state[1])
    return linked


def _self_check():
    """Use libcrypto if it opens and gives the known answer (FIPS 180-2's "abc", split as `link` splits)."""
    global _native
    cdef unsigned char digest[32]
    if not gw_sha256_open():
        return
    known = bytes.fromhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    _native = gw_sha256(b"a", 1, b"b", 1, b"c", 1, digest) == 0 and digest[:32] == known
    if not _native and gw_use_plain:  # the plain calls failed or erred: EVP's alone
        gw_sha_use_plain(False)
        _native = gw_sha256(b"a", 1, b"b", 1, b"c", 1, digest) == 0 and digest[:32] == known


_self_check()
NATIVE_SHA256 = _native


def sha256_calls():
    """Which of libcrypto's calls hash here: "plain" (SHA256_*), "evp", or None (hashlib's)."""
    return None if not _native else "plain" if gw_use_plain else "evp"


def uuids_in_place():
    """Whether asyncpg's UUIDs are read in place (their layout found), not through `.bytes`."""
    return gw_uuid_in_place() != 0


def _read_in_place(bint on):
    """Tests: read asyncpg's UUIDs in place (where the layout is found) or through `.bytes`."""
    gw_uuid_read_in_place(_PG_UUID, on and _PG_UUID is not _UUID)
    for at in range(4):  # the texts remembered were made either way; start afresh all the same
        (<list>_last_ids)[at] = None


def _plain_calls(bint on):
    """Hash through the plain calls (where libcrypto has them) or EVP's: a test's way to check both paths.
    Returns whether the plain calls now hash."""
    return gw_sha_use_plain(on) != 0

__all__ = (
    "GENESIS", "HEAD_COLUMNS", "NATIVE_SHA256", "bound_rows", "canonical_head", "canonicals_into", "entry_hash",
    "fallbacks", "finish_row", "link", "log_line", "log_lines", "may_hold_whole_float", "plain_details", "tenants_in",
)
