# C types for screen_c.py, a symlink to the pure-Python twin screen_py.py:
# Cython compiles the twin's code under this name. Keep the declarations in
# step with the twin's signatures.

cimport cython

cdef Py_ssize_t MAX_STRING
cdef Py_ssize_t MAX_ITEMS
cdef Py_ssize_t MAX_DEPTH
cdef Py_ssize_t _LONG_RUN
cdef Py_ssize_t _BIG_DIGITS
cdef Py_ssize_t _MAX_BODY

cdef int _fold(int c) noexcept

@cython.locals(m=Py_ssize_t, k=Py_ssize_t, mark=cython.p_uchar)
cdef bint _has(const unsigned char* data, Py_ssize_t i, Py_ssize_t n, bytes marker) except -1

@cython.locals(marker=bytes)
cdef bint _has_any(const unsigned char* data, Py_ssize_t i, Py_ssize_t n, tuple markers) except -1

@cython.locals(kinds=cython.p_uchar, seen=int, seps=Py_ssize_t, digits=Py_ssize_t, i=Py_ssize_t, kind=int)
cdef bint _plain_run(const unsigned char* data, Py_ssize_t start, Py_ssize_t end, Py_ssize_t n) noexcept

@cython.locals(pad=Py_ssize_t, length=Py_ssize_t, hexish=bint)
cdef bint _secret_run(const unsigned char* data, Py_ssize_t end, Py_ssize_t n, Py_ssize_t run, Py_ssize_t seps,
                      int seen) noexcept

cdef int _DIGIT
cdef int _UPPER
cdef int _LOWER
cdef int _RUN
cdef int _NOT_HEX
cdef int _SEPARATOR
cdef int _WORD
cdef int _SPECIAL
cdef bytes _KINDS
cdef list _MARKERS_AT
cdef tuple _CASED_AND_KEY_PAIRS
cdef int _NAME
cdef int _ASSIGNED
cdef int _BEARER

@cython.locals(c=int)
cdef Py_ssize_t _string_end(const unsigned char* data, Py_ssize_t j, Py_ssize_t n) noexcept

cdef bint _colon_after(const unsigned char* data, Py_ssize_t j, Py_ssize_t n) noexcept

@cython.locals(c=int, b=int)
cdef bint _counts_as_ascii(const unsigned char* data, Py_ssize_t i, Py_ssize_t n) noexcept

@cython.locals(c=int, b=int, d=int, found=bint)
cdef Py_ssize_t _space_at(const unsigned char* data, Py_ssize_t j, Py_ssize_t n) noexcept

@cython.locals(c=int)
cdef bint _userinfo_follows(const unsigned char* data, Py_ssize_t j, Py_ssize_t n) noexcept

@cython.locals(start=Py_ssize_t, c=int, size=Py_ssize_t)
cdef bint _goes_on(const unsigned char* data, Py_ssize_t j, Py_ssize_t n, int kind) noexcept
cdef bytes _FOLD


@cython.final
cdef class Screen:
    cdef list _by_first
    cdef bytes _pairs
    cdef bytes _quiet
    cdef bytes _calm
    cdef frozenset _counts
    cdef Py_ssize_t _key_end
    cdef bint _key_answer

    @cython.locals(end=Py_ssize_t, answer=bint)
    cdef bint _in_key(self, const unsigned char* data, Py_ssize_t j, Py_ssize_t n) noexcept

    @cython.locals(start=Py_ssize_t, end=Py_ssize_t, k=Py_ssize_t, c=int, key=bytearray)
    cdef bint _a_count(self, const unsigned char* data, Py_ssize_t i, Py_ssize_t n) except -1

    @cython.locals(entry=bytes, letters=cython.p_uchar, m=Py_ssize_t, k=Py_ssize_t, kind=int)
    cdef bint _word_at(self, const unsigned char* data, Py_ssize_t i, Py_ssize_t n, int f) except -1

    cdef bint _starts_here(self, const unsigned char* data, Py_ssize_t i, Py_ssize_t n, int c) except -1

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, c=int, kind=int, opens=Py_ssize_t,
                   commas=Py_ssize_t, quoted=bint, opened=Py_ssize_t, run_from=Py_ssize_t, pairs=cython.p_uchar,
                   quiet=cython.p_uchar, calm=cython.p_uchar, digit_in_run=bint, pair=cython.uint, data=cython.p_uchar,
                   floor=Py_ssize_t, e=int,
                   kinds=cython.p_uchar)
    cpdef bint plain(self, bytes raw, Py_ssize_t nesting) except -1
