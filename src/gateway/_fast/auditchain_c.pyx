# The compiled twin of auditchain_py.py: the same `link` and `entry_hash`, the rows built at C level and
# SHA-256 computed by the system's libcrypto through its EVP interface, called directly.
#
# A .pyx of its own, like pgcopy_c.pyx: what makes it fast is what plain Python cannot say. hashlib's
# sha256 with OpenSSL 3 spends about 600 ns of an entry's 800 (measured on a 300-byte entry) outside the
# hashing: fetching the algorithm for every new object and copying the context for every digest. Here the
# algorithm is fetched and the context made once, then reset for each entry (about 230 ns in all).
# libcrypto is the one hashlib itself uses, opened by name at import (dlopen); where it cannot be opened, or
# fails its known-answer check, hashlib does the hashing (`NATIVE_SHA256` says which). No OpenSSL header or
# link-time library is needed to build this. tests/fast/test_auditchain.py holds the twins to the same rows.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM

from gateway._fast import auditchain_py as _twin

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object text)

cdef extern from *:
    """
    #include <dlfcn.h>

    /* libcrypto's EVP digest calls, looked up at import: no OpenSSL header or library at build time. */
    static void *gw_md = NULL, *gw_ctx = NULL;
    static int (*gw_digest_init)(void *, const void *, void *) = NULL;
    static int (*gw_digest_update)(void *, const void *, size_t) = NULL;
    static int (*gw_digest_final)(void *, unsigned char *, unsigned int *) = NULL;

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

    /* SHA-256 of the three pieces a..c into out[32]; -1 if libcrypto failed. */
    static int gw_sha256(const char *a, size_t na, const char *b, size_t nb, const char *c, size_t nc,
                         unsigned char *out) {
        unsigned int length = 0;
        if (!gw_digest_init(gw_ctx, gw_md, NULL) || !gw_digest_update(gw_ctx, a, na) ||
            !gw_digest_update(gw_ctx, b, nb) || !gw_digest_update(gw_ctx, c, nc) ||
            !gw_digest_final(gw_ctx, out, &length) || length != 32) {
            return -1;
        }
        return 0;
    }
    """
    int gw_sha256_open()
    int gw_sha256(const char* a, size_t na, const char* b, size_t nb, const char* c, size_t nc,
                  unsigned char* out)

GENESIS = _twin.GENESIS
cdef object _GENESIS_HEAD = (0, _twin.GENESIS)
cdef object _twin_hash = _twin.entry_hash
cdef bint _native = False
cdef const char* _HEX = b"0123456789abcdef"
cdef object _LIMIT = 2**63  # chain_seq is a bigint


cdef object _hex_digest(const char* prev, Py_ssize_t prev_size, long long seq, const char* body,
                        Py_ssize_t body_size):
    """The entry hash as 64 lowercase hex characters, or None if libcrypto failed (the caller falls back)."""
    cdef char middle[24]  # "|<seq>|", written from the end
    cdef unsigned char digest[32]
    cdef int start = 23
    cdef unsigned long long rest = (0ULL - <unsigned long long>seq) if seq < 0 else <unsigned long long>seq
    middle[start] = b"|"
    while True:
        start -= 1
        middle[start] = <char>(48 + rest % 10)
        rest //= 10
        if rest == 0:
            break
    if seq < 0:
        start -= 1
        middle[start] = b"-"
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
        found = PyDict_GetItem(known, identity)
        if found is NULL:
            found = PyDict_GetItem(states, tenant)
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


_self_check()
NATIVE_SHA256 = _native

__all__ = ("GENESIS", "NATIVE_SHA256", "entry_hash", "link")
