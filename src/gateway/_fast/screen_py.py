"""Screening a JSON body for the audit sanitizer: can it hold anything `Sanitizer.clean` would change?

An audit entry's main cost was walking the decoded parameters of every call
through `records/sanitize.py`, although most calls carry no secret, no string
over the length bound and nothing nested too deep. `Screen.plain` answers
"nothing here can change" from the raw bytes in one pass, so the walk runs only
for the bodies it cannot rule out. It is a screen, not a sanitizer: every test
below is a necessary condition for `clean` to change a value decoded from the
body, so True is always right and False is often a false alarm (then the walk
decides). It gives False for:

- an escape other than \\n \\t \\r \\b \\f \\" \\\\ (a \\u escape could spell
  anything, a \\/ is a '/' that a hex/base64 run goes on through; the others
  are characters that end a run, and \\n \\t \\r \\f are spaces where a
  pattern needs one), and the few letters past ASCII that `str.lower` (keys
  are compared lower-cased) or a case-insensitive pattern takes for ASCII ones
  (U+0130, U+0131, U+017F, U+212A: `_counts_as_ascii`). Any other character
  past ASCII only ends a hex/base64 run, as punctuation does, and the spaces
  past ASCII that the patterns' `\\s` matches (U+00A0, U+3000...) are spaces
  where a pattern needs one (`_goes_on`), so text in other languages is
  screened like English;
- a body of more than `_MAX_BODY` bytes (half the sanitizer's `MAX_DETAILS`), a
  string longer than `MAX_STRING`, more than `MAX_ITEMS - 2` commas (a
  container of more than `MAX_ITEMS` items has that many), `MAX_DEPTH` opening
  brackets with the caller's `nesting` (the depth bound), a run of 19 digits
  (an integer past 64 bits has one);
- a secret name in the body's text lower-cased with '-' and ' ' as '_' (how
  keys are compared): the sanitizer's names, built-in and added, each standing
  for every key that contains it, so a name counts in a key (a string followed
  by ':'), and in any other string only where the name=value pattern could
  match, followed by ["']?\\s*[=:] (the pattern's words all end in a name,
  "key" or "pwd"); and where a value pattern could match, the words it needs
  that are no names ("key" or "pwd" followed by ["']?\\s*[=:], "bearer"
  followed by whitespace and a token character);
- the cased markers of the value patterns: "-----BEGIN", "gw_", "eyJ", "xox",
  "AIza", the GitHub "gh?_"/"github_pat_", an AWS key id's four letters,
  "sk-"/"pk_"/... after a word boundary, and "://" followed by an "@" before
  any '/', whitespace or the string's end (only a URL's user:password@ can
  match there: the gateway's own resource URIs, mcpgw://server/..., and most
  URLs have none);
- a run of 32 or more hex/base64 characters that the sanitizer would redact
  (digits and letters, few separators, all hex or both cases), with up to two
  '=' after it: quotes, colons, commas and brackets end such runs both in the
  raw body and in the decoded strings, so the runs are the same.

No I/O, no allocation per byte. `screen_c.py` is a symlink to this file and
`screen_c.pxd` gives it C types; keep it to byte arithmetic.
"""

MAX_STRING = 1024
MAX_ITEMS = 100
MAX_DEPTH = 16
_LONG_RUN = 32
_BIG_DIGITS = 19
# Half the sanitizer's MAX_DETAILS: what a cleaning keeps of a body it leaves alone counts at most twice
# its bytes (a string's characters, one for any other value, the entry's own keys: "id" is "request_id").
_MAX_BODY = 1 << 15

# The value patterns' cased markers (an AWS key id's first four letters among them), by their first byte.
_CASED_MARKERS = (b"-----BEGIN", b"gw_", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_", b"eyJ", b"xox",
                  b"AIza", b"AKIA", b"ASIA", b"AGPA", b"AIDA", b"AROA", b"ANPA", b"ANVA", b"AIPA", b"ABIA", b"ACCA")
_MARKERS_AT = [tuple(m for m in _CASED_MARKERS if m[0] == first) for first in range(256)]
# The (first, second) byte pairs the cased markers start with, "sk", "pk", "rk" (the \b(sk|pk|rk)[-_] prefix) and
# ":/" (a URL's "://", which counts only with an "@" after it: `_userinfo_follows`).
_CASED_AND_KEY_PAIRS = tuple(sorted({m[0] << 8 | m[1] for m in _CASED_MARKERS} | {c << 8 | 107 for c in (115, 112, 114)}
                                    | {58 << 8 | 47}))


def _mark(bits, pair):
    bits[pair >> 3] |= 1 << (pair & 7)


# Folded markers of the value patterns (every pattern but the cased ones needs one of these): what the
# sanitizer's walk tests a string for before applying them (records/sanitize.py).
FOLDED_MARKERS = ("authoriz", "bearer", "pass", "pwd", "secret", "key", "token")
# What the screen looks for instead of those markers. The names (a deployment's and tenant's too) count
# wherever they are: "authorization", "password", "passwd", "passphrase", "secret" and "token" are names, and
# each pattern those markers guard needs one of them. The others count only where their pattern could go on:
# the name=value pattern's words that are no names end in "key" or are "pwd", and it needs ["']?\s*[=:]
# after them; the bearer pattern needs whitespace, then a token character.
_NAME, _ASSIGNED, _BEARER = 0, 1, 2
_ASSIGNED_WORDS = ("key", "pwd")


def _fold(c):
    """A byte as keys are compared: lower case, '-' and ' ' as '_'."""
    if 65 <= c <= 90:
        return c + 32
    if c == 45 or c == 32:
        return 95
    return c


def _has(data, i, n, marker):
    """Whether `marker` starts at `data[i]`."""
    m = len(marker)
    if i + m > n:
        return False
    mark = marker
    k = 0
    while k < m:
        if data[i + k] != mark[k]:
            return False
        k += 1
    return True


def _has_any(data, i, n, markers):
    for marker in markers:
        if _has(data, i, n, marker):
            return True
    return False


class Screen:
    """A screen for one set of secret names (`names`: the sanitizer's, normalized as keys are). `counts`: the keys
    that hold a name but are no secret (the sanitizer's exceptions, normalized and without underscores:
    "maxtokens"), none of them a whole-key name of its."""

    def __init__(self, names, counts=()):
        self._counts = frozenset(counts)
        self._key_end = -1  # `_in_key`'s last string: where it closes, and whether it is a key
        self._key_answer = False
        # Each entry: a kind byte, then the folded word. A name in a key is enough (the key is redacted whole);
        # elsewhere, and the contextual words anywhere, count only where their pattern could go on.
        kinds = {word: _ASSIGNED for word in _ASSIGNED_WORDS}
        kinds["bearer"] = _BEARER
        for name in names:
            if name and name.isascii():
                kinds[name] = _NAME
        entries = sorted(bytes([kind]) + word.encode() for word, kind in kinds.items())
        by_first = [[] for _ in range(256)]
        for entry in entries:
            by_first[entry[1]].append(entry)
        self._by_first = [tuple(found) for found in by_first]
        # A bit per (byte, next byte) pair, as they are in the body, where a closer look is needed: a word's
        # first two letters in any case ('-' and ' ' for '_'), a cased marker's first two bytes, and "sk"/"pk"/
        # "rk" (a key's prefix). Most pairs are none of these, and a byte costs one test of this map.
        firsts = [[] for _ in range(256)]  # the raw bytes each folded byte stands for
        for raw in range(256):
            firsts[_fold(raw)].append(raw)
        hits = bytearray(8192)
        for entry in entries:
            seconds = firsts[entry[2]] if len(entry) > 2 else range(256)  # a one-letter name: any second byte
            for first in firsts[entry[1]]:
                for second in seconds:
                    _mark(hits, first << 8 | second)
        for pair in _CASED_AND_KEY_PAIRS:
            _mark(hits, pair)
        self._pairs = bytes(hits)
        # The pairs `plain` passes over without a look: a byte of a run that is no digit, followed by a byte
        # with which it starts nothing. Most of a body's bytes are such (the letters of its words and values).
        # `_calm` adds the pairs of a byte that is neither in a run nor structure (a space, ':', '.', '}'...):
        # such a byte only ends the run before it, which matters only to a run holding a digit, so `plain`
        # passes over them too while it is in no such run (between the words of a text, after each key).
        quiet = bytearray(8192)
        calm = bytearray(8192)
        for first in range(256):
            kind = _KINDS[first]
            row = first << 5
            if kind & _RUN and not kind & _DIGIT:
                for k in range(row, row + 32):
                    quiet[k] = calm[k] = ~hits[k] & 255
            elif not kind & (_RUN | _SPECIAL):
                for k in range(row, row + 32):
                    calm[k] = ~hits[k] & 255
        self._quiet = bytes(quiet)
        self._calm = bytes(calm)

    def _word_at(self, data, i, n, f):
        """Whether a word that counts starts at `data[i]` (compared folded); `f` is `data[i]` folded."""
        for entry in self._by_first[f]:
            m = len(entry) - 1
            if i + m <= n:
                letters = entry
                k = 1
                while k < m:
                    if _fold(data[i + k]) != letters[k + 1]:
                        break
                    k += 1
                if k == m:
                    kind = letters[0]
                    if kind == _NAME:
                        # A key holding a name is redacted whole, unless it is a count (`_a_count`); in any other
                        # string a name matters only to the name=value pattern, whose words all end in a name,
                        # "key" or "pwd".
                        if (self._in_key(data, i + m, n) and not self._a_count(data, i, n)) or _goes_on(
                                data, i + m, n, _ASSIGNED):
                            return True
                    elif _goes_on(data, i + m, n, kind):
                        return True
        return False

    def _in_key(self, data, j, n):
        """Whether the string that holds `data[j]` is a key: its closing quote is followed (after JSON's spaces)
        by ':'. One that does not end counts as a key. The answer is remembered for the rest of the string: a
        long text naming "token" or "key" on every line was read to its end again for each of them (quadratic
        in its length). `plain` asks in increasing order, after a word's letters (never inside an escape), so
        a later `j` before the string's end is in the same string."""
        if j < self._key_end:
            return self._key_answer
        end = _string_end(data, j, n)
        answer = end >= n or _colon_after(data, end + 1, n)
        self._key_end = end
        self._key_answer = answer
        return answer

    def _a_count(self, data, i, n):
        """Whether the key that holds `data[i]` is one of `counts`, compared as the sanitizer compares keys
        (ASCII folded, '_' left out). A key with an escape or a byte past ASCII is none."""
        if not self._counts:
            return False
        start = i
        while start > 0 and data[start - 1] != 34:
            if data[start - 1] == 92 or data[start - 1] >= 128:
                return False
            start -= 1
        end = i
        while end < n and data[end] != 34:
            if data[end] == 92 or data[end] >= 128:
                return False
            end += 1
        if start == 0 or end >= n:
            return False
        key = bytearray()
        for k in range(start, end):
            c = _fold(data[k])
            if c != 95:
                key.append(c)
        return bytes(key) in self._counts

    def _starts_here(self, data, i, n, c):
        """Whether what starts at `data[i]` (`c`) makes the screen give up: a word that counts, a cased marker,
        or sk/pk/rk with '-' or '_' after a word boundary."""
        if self._by_first[_FOLD[c]] and self._word_at(data, i, n, _FOLD[c]):
            return True
        if _MARKERS_AT[c] and _has_any(data, i, n, _MARKERS_AT[c]):
            return True
        if c == 58 and i + 2 < n and data[i + 1] == 47 and data[i + 2] == 47 and _userinfo_follows(data, i + 3, n):
            return True
        # The boundary: no word byte before, or one that may be an escape's letter (\\n: a newline).
        return ((c == 115 or c == 112 or c == 114) and i + 2 < n and data[i + 1] == 107
                and (data[i + 2] == 45 or data[i + 2] == 95)
                and (i == 0 or not _KINDS[data[i - 1]] & _WORD or (i >= 2 and data[i - 2] == 92)))

    def plain(self, raw, nesting):
        """Whether `Sanitizer.clean` would leave every value decoded from the JSON `raw` as it is.

        `nesting`: how many container levels the caller adds around the
        decoded value before cleaning it.
        """
        n = len(raw)
        if n > _MAX_BODY:
            return False
        self._key_end = -1
        pairs = self._pairs
        quiet = self._quiet
        calm = self._calm
        data = raw  # compiled: a pointer to the bytes (no bounds checks: every index is below n)
        kinds = _KINDS
        opens = nesting
        commas = 0
        quoted = False
        # The loop looks at each byte's pair and class only. What a hex/base64 run holds (its digits, letters
        # and separators) matters only for a run of 19 bytes or more (a run of 19 digits is in one, and a
        # secret run is longer), so such a run is read again when it ends (`_plain_run`), and a string's
        # length is told by where it opened. Each test returns False, so testing one when its span ends, not
        # at every byte, gives the same answer. A run without a digit holds neither 19 digits nor a secret
        # (the sanitizer's runs need a digit), so only a run with one is read again, and where such a run
        # began is looked up when its first digit comes (before, the bytes that end runs need no look).
        opened = 0
        floor = 0  # where the last escape ended: its letter is no byte of the run after it
        run_from = 0  # where the current run of [A-Za-z0-9+/_-] began, while it holds a digit
        digit_in_run = False
        i = 0
        while i < n:
            # A quiet pair changes none of the counts below, nor does a calm one outside a run with a digit:
            # skip to the next byte that may.
            if digit_in_run:
                while i + 1 < n:
                    pair = data[i] << 8 | data[i + 1]
                    if not quiet[pair >> 3] & (1 << (pair & 7)):
                        break
                    i += 1
            else:
                while i + 1 < n:
                    pair = data[i] << 8 | data[i + 1]
                    if not calm[pair >> 3] & (1 << (pair & 7)):
                        break
                    i += 1
            c = data[i]
            # A word, a cased marker or a key's prefix could start here: rare, the pair's bit says.
            pair = c << 8 | (data[i + 1] if i + 1 < n else 0)
            if pairs[pair >> 3] & (1 << (pair & 7)) and self._starts_here(data, i, n, c):
                return False
            kind = kinds[c]
            if not kind & _RUN:  # no byte of a run is special
                if digit_in_run and i - run_from >= _BIG_DIGITS and not _plain_run(data, run_from, i, n):
                    return False
                digit_in_run = False
                if kind & _SPECIAL:
                    if c >= 128:  # past ASCII: a lead byte may start one of the few characters that count
                        if _counts_as_ascii(data, i, n):
                            return False
                    elif c == 92:  # an escape: the two bytes are one character that only ends a run, or any
                        e = data[i + 1] if i + 1 < n else 0
                        if not (e == 110 or e == 116 or e == 114 or e == 98 or e == 102 or e == 34 or e == 92):
                            return False  # \\u could spell anything, \\/ a run's '/'
                        i += 2
                        floor = i
                        continue
                    elif c == 34:
                        if quoted and i - opened - 1 > MAX_STRING:
                            return False
                        quoted = not quoted
                        opened = i
                    elif c == 44:
                        commas += 1
                    else:  # { or [
                        opens += 1
            elif kind & _DIGIT and not digit_in_run:
                run_from = i
                while run_from > floor and kinds[data[run_from - 1]] & _RUN:
                    run_from -= 1
                digit_in_run = True
            i += 1
        if digit_in_run and n - run_from >= _BIG_DIGITS and not _plain_run(data, run_from, n, n):
            return False
        if quoted and n - opened - 1 > MAX_STRING:
            return False
        return commas < MAX_ITEMS - 1 and opens < MAX_DEPTH


def _string_end(data, j, n):
    """Where the string that holds `data[j]` closes: its closing quote's index, or `n` if it does not close."""
    while j < n:
        c = data[j]
        if c == 92:  # an escape: its second byte may be a quote
            j += 2
            continue
        if c == 34:
            return j
        j += 1
    return n


def _colon_after(data, j, n):
    """Whether ':' comes at `data[j]` after JSON's spaces (or the body ends there)."""
    while j < n and (data[j] == 32 or data[j] == 9 or data[j] == 10 or data[j] == 13):
        j += 1
    return j >= n or data[j] == 58


def _goes_on(data, j, n, kind):
    """Whether the pattern of a contextual word (`kind`) could match from `data[j]`, right after the word."""
    if kind == _ASSIGNED:  # ["']?\s*[=:]
        # The quote is a character of the text: ' or \\". A " in the raw body ends the string, and the pattern
        # matches within one string (a key "project_key" is followed by ":" only in the body).
        if j < n and data[j] == 39:
            j += 1
        elif j + 1 < n and data[j] == 92 and data[j + 1] == 34:
            j += 2
        size = _space_at(data, j, n)
        while size:
            j += size
            size = _space_at(data, j, n)
        return j < n and (data[j] == 61 or data[j] == 58)
    # _BEARER: \s+[A-Za-z0-9\-._~+/]
    start = j
    size = _space_at(data, j, n)
    while size:
        j += size
        size = _space_at(data, j, n)
    if j == start or j >= n:
        return False
    c = data[j]
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c in (45, 46, 95, 126, 43, 47)


def _counts_as_ascii(data, i, n):
    """Whether the UTF-8 character at `data[i]` (a lead byte) is a letter that `str.lower` or a case-insensitive
    pattern takes for an ASCII letter: U+0130, U+0131, U+017F, U+212A. Every other character past ASCII is
    nothing to the nets but the end of a run, or a space where a pattern needs one (`_space_at`). (Bytes that
    are no valid UTF-8 make a body orjson refuses: it is stored as "[not JSON]".)"""
    c = data[i]
    b = data[i + 1] if i + 1 < n else 0
    if c == 0xC4:
        return b == 0xB0 or b == 0xB1
    if c == 0xC5:
        return b == 0xBF
    return c == 0xE2 and b == 0x84 and i + 2 < n and data[i + 2] == 0xAA


def _space_at(data, j, n):
    """The size in bytes of the space the patterns' `\\s` matches at `data[j]` (0: none): ASCII's (tab to
    carriage return, 0x1C-0x1F, space; \\n \\t \\r \\f as escapes) and U+0085, U+00A0, U+1680, U+2000-U+200A,
    U+2028, U+2029, U+202F, U+205F, U+3000 as UTF-8."""
    if j >= n:
        return 0
    c = data[j]
    if c == 92:  # \\n \\t \\r \\f in the raw body
        return 2 if j + 1 < n and (data[j + 1] == 110 or data[j + 1] == 116 or data[j + 1] == 114
                                   or data[j + 1] == 102) else 0
    if c < 0x80:
        return 1 if (9 <= c <= 13 or 28 <= c <= 32) else 0
    b = data[j + 1] if j + 1 < n else 0
    if c == 0xC2:
        return 2 if b == 0x85 or b == 0xA0 else 0
    if c < 0xE1 or c > 0xE3 or j + 2 >= n:
        return 0
    d = data[j + 2]
    if c == 0xE1:
        found = b == 0x9A and d == 0x80
    elif c == 0xE3:
        found = b == 0x80 and d == 0x80
    elif b == 0x80:  # U+2000-U+200A, U+2028, U+2029, U+202F
        found = 0x80 <= d <= 0x8A or d == 0xA8 or d == 0xA9 or d == 0xAF
    else:
        found = b == 0x81 and d == 0x9F
    return 3 if found else 0


def _userinfo_follows(data, j, n):
    """Whether a URL's user:password@ could follow a "://" that ends before `data[j]`: the sanitizer's pattern
    needs an "@" after it with no '/' and no whitespace between, and the string cannot end before it (a '"' ends
    it in the raw body). A backslash counts as an "@": an escape may spell one."""
    while j < n:
        c = data[j]
        if c == 64 or c == 92:  # @, or an escape (\u0040 spells one; the others do not, but this is rare)
            return True
        if c == 47 or c == 34 or c == 32 or 9 <= c <= 13 or 28 <= c <= 31:  # / " and what \s matches in ASCII
            return False
        j += 1
    return False


def _plain_run(data, start, end, n):
    """Whether the run of [A-Za-z0-9+/_-] bytes from `data[start]` to before `data[end]` holds neither a run of
    `_BIG_DIGITS` digits nor a secret the sanitizer would redact."""
    kinds = _KINDS
    seen = 0
    seps = 0
    digits = 0
    i = start
    while i < end:
        kind = kinds[data[i]]
        seen |= kind
        if kind & _SEPARATOR:
            seps += 1
        if kind & _DIGIT:
            digits += 1
            if digits >= _BIG_DIGITS:
                return False
        else:
            digits = 0
        i += 1
    return end - start < _LONG_RUN or not _secret_run(data, end, n, end - start, seps, seen)


def _secret_run(data, end, n, run, seps, seen):
    """Whether the sanitizer redacts the run of `run` characters ending before `data[end]` (with its '=' padding);
    `seen`: the kinds of its bytes, or-ed."""
    pad = 0
    while pad < 2 and end + pad < n and data[end + pad] == 61:
        pad += 1
    length = run + pad
    if not seen & _DIGIT or not seen & (_UPPER | _LOWER):
        return False
    if seps * 8 > length:
        return False
    hexish = not seen & _NOT_HEX and pad == 0
    return hexish or (seen & _UPPER and seen & _LOWER) != 0


def _kind(c):
    """The classes of byte `c` the screen tests (see the flags above)."""
    kind = 0
    if 48 <= c <= 57:
        kind |= _DIGIT | _RUN | _WORD
    elif 65 <= c <= 90:
        kind |= _UPPER | _RUN | _WORD | (_NOT_HEX if c > 70 else 0)
    elif 97 <= c <= 122:
        kind |= _LOWER | _RUN | _WORD | (_NOT_HEX if c > 102 else 0)
    elif c == 95:  # _
        kind |= _RUN | _WORD | _SEPARATOR | _NOT_HEX
    elif c == 45 or c == 47:  # - /
        kind |= _RUN | _SEPARATOR | _NOT_HEX
    elif c == 43:  # +
        kind |= _RUN | _NOT_HEX
    if c >= 128 or c in (92, 34, 44, 123, 91):
        kind |= _SPECIAL
    return kind


# Byte classes (bits of `_KINDS[byte]`): a digit, an upper- or lower-case ASCII letter, a byte of a hex/base64
# run ([A-Za-z0-9+/_-]), one of those that is not a hex digit, a separator the sanitizer counts in a run (/ - _),
# a word byte for \b, and a byte that needs a closer look (structure, escapes, non-ASCII).
_DIGIT, _UPPER, _LOWER, _RUN, _NOT_HEX, _SEPARATOR, _WORD, _SPECIAL = 1, 2, 4, 8, 16, 32, 64, 128
_KINDS = bytes(_kind(c) for c in range(256))
_FOLD = bytes(_fold(c) for c in range(256))
