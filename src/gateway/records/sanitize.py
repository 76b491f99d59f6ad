"""Removing secrets from what an audit entry records: by key name and by value pattern, at any depth.

An audit entry keeps the parameters of what was done (a tool call's
arguments, an admin request's body) so that someone can later see what
happened; it must not keep the credentials that travelled with them. Two
nets, applied to every value of a nested structure of dicts and lists:

- by name: a value whose key contains one of `SECRET_NAMES` (or a name a
  deployment or tenant adds) is replaced whole by `REDACTED`, whatever it is
  (a string, a number, a dict of them);
- by pattern: in every string (keys included), whatever looks like a bearer
  token, one of the gateway's API keys, a JWT, an AWS access key id, a
  private-key block, a well-known vendor token, a long hex or base64 secret,
  or `password=...` in text, is replaced by `REDACTED` in place, so the
  rest of the string still says what it was.

It also bounds what is kept (strings, lists, dicts, depth) and replaces what
the database cannot store (NUL characters, integers past 64 bits), so an
entry is never refused by the database for its details. This module does no
I/O and logs nothing; `Sanitizer.clean` never modifies its argument.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from gateway._fast import screen

REDACTED = "[REDACTED]"

# Names of values that are secrets, matched as substrings of the key after
# lowercasing and turning '-' and ' ' into '_' ("X-API-Key" -> "x_api_key").
# The one list: the data plane, the control plane and tests all use this.
SECRET_NAMES: tuple[str, ...] = (
    "password",
    "passwd",
    "passphrase",
    "secret",  # client_secret, secret_key, ...
    "token",  # access_token, refresh_token, id_token, ...
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "privatekey",
    "access_key",
    "session_key",
    "signature",
)
# Keys that contain a secret name but name counts, not secrets (LLM tool
# parameters are full of them); matched whole, after the same normalizing and
# without underscores, so that the camelCase spellings count too (the MCP
# sampling request's own `maxTokens`, `inputTokens`, `totalTokens`).
NOT_SECRET_NAMES: frozenset[str] = frozenset(
    {"max_tokens", "max_new_tokens", "input_tokens", "output_tokens", "total_tokens", "num_tokens",
     "token_count", "tokens_used", "prompt_tokens", "completion_tokens"}
)

# Bounds on what an entry keeps: it records what was done, not whole payloads.
MAX_STRING = 1024
MAX_ITEMS = 100  # list items and dict keys kept per container
MAX_DEPTH = 16
MAX_DETAILS = 65_536
"""What a cleaned value keeps in all: each string and key counts its length, every other value and each
container 1 (a 4 MB body of 1 KB strings full of marker words kept 4.5 MB and took 1.7 s of the writer's
flush to clean). The walk stops at the first value it reaches past that; what it did not reach is left out,
and `CUT_KEY` (a dict) or `CUT_ITEM` (a list) at the top says so. The compiled screen passes no body of
more than half this many bytes, so a body it passes is never cut."""
CUT_KEY = "[cut]"
CUT_NOTE = f"past {MAX_DETAILS} characters of details"
CUT_ITEM = f"[cut: {CUT_NOTE}]"
_INT64 = (-(2**63), 2**63 - 1)


def _sub(pattern: str, replacement, flags: int = 0) -> tuple[re.Pattern[str], Any]:
    return re.compile(pattern, flags), replacement


_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")
_HEX = re.compile(r"[0-9a-fA-F]+")


def _long_secret(match: re.Match[str]) -> str:
    """A long run of hex or base64 characters is a secret when it mixes character kinds."""
    text = match.group(0)
    if _DIGIT.search(text) is None or _LETTER.search(text) is None:
        return text
    if (text.count("/") + text.count("-") + text.count("_")) * 8 > len(text):
        return text  # separators every few characters: a path or an identifier, not random bytes
    if _HEX.fullmatch(text) is not None:
        return REDACTED
    # base64 / base64url: upper and lower case and digits together (paths and words rarely are).
    if text.upper() != text and text.lower() != text:
        return REDACTED
    return text


# Applied in order to every string of at least _SHORTEST characters. Each keeps
# what says what the secret was (its name, "Bearer", the key's public prefix).
_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    # PEM private keys, up to their end line (or the end of a truncated string).
    _sub(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", REDACTED, re.S),
    # "Authorization: Basic xyz", "authorization=Bearer xyz": the scheme's credential.
    _sub(r"(?i)(\b(?:proxy[_-]?)?authorization\b[\"']?\s*[:=]\s*[\"']?)(?:(basic|bearer|digest|token)\s+)?[^\s\"',;&]+",
         lambda m: m.group(1) + (m.group(2) + " " if m.group(2) else "") + REDACTED),
    _sub(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*", lambda m: m.group(1) + " " + REDACTED),
    # The gateway's own API keys: gw_<prefix>_<secret>; the prefix is not secret and names the key.
    _sub(r"\b(gw_[a-z0-9]+_)[A-Za-z0-9]+", lambda m: m.group(1) + REDACTED),
    # JWTs (and JWS/JWE compact forms): base64url header starting with '{"'.
    _sub(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)?", REDACTED),
    # AWS access key ids.
    _sub(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{16}\b", REDACTED),
    # Vendor tokens with a recognizable prefix: OpenAI/Anthropic-style sk-, GitHub, Slack, Google, Stripe.
    _sub(r"\b(?:sk|pk|rk)[-_](?:live_|test_|proj-|ant-)?[A-Za-z0-9_\-]{16,}", REDACTED),
    _sub(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}", REDACTED),
    _sub(r"\bxox[abposr]-[A-Za-z0-9-]{10,}", REDACTED),
    _sub(r"\bAIza[0-9A-Za-z_\-]{35}\b", REDACTED),
    # name=value / name: value in text (query strings, connection strings, config lines, log lines).
    _sub(r"(?i)(\b(?:password|passwd|pwd|passphrase|secret|client[_-]?secret|api[_-]?key|access[_-]?key|"
         r"secret[_-]?key|token|access[_-]?token|refresh[_-]?token|auth[_-]?token|private[_-]?key)"
         r"[\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&;,\"']+)",
         lambda m: m.group(1) + REDACTED),
    # user:password@ in URLs.
    _sub(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]+:)[^\s@/]+@", lambda m: m.group(1) + REDACTED + "@"),
    # Long hex or base64 runs that mix letters and digits (keys, secrets; UUIDs keep their dashes and survive).
    _sub(r"[A-Za-z0-9+/_\-]{32,}={0,2}", _long_secret),
)
_SHORTEST = 8  # "pwd=abcd" is the shortest string a pattern above can change
# Something every match of a pattern above but the last contains (substring tests: Python's regex
# engine is slow on alternations without a common prefix). Most strings have none of them; a long run
# of word characters alone needs only the last pattern.
_FOLDED_MARKERS = screen.FOLDED_MARKERS  # in lower-cased text: ("authoriz", "bearer", "pass", ...)
_CASED_MARKERS = ("-----BEGIN", "gw_", "eyJ", "xox", "AIza", "k-", "k_", "gh")
_AWS_IDS = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA", "ABIA", "ACCA")
_LONG_RUN, _LONG_RUN_SECRET = _PATTERNS[-1]


def _maybe_secret(text: str, lowered: str | None = None) -> bool:
    """Whether a pattern but the long-run one may match `text` (`lowered`: `text.lower()`, if the caller has it)."""
    if lowered is None:
        lowered = text.lower()
    for marker in _FOLDED_MARKERS:
        if marker in lowered:
            return True
    for marker in _CASED_MARKERS:
        if marker in text:
            return True
    # A URL's user:password@ needs an "@" after its "://" (resource URIs and most URLs have none).
    url = text.find("://")
    if url != -1 and text.find("@", url + 3) != -1:
        return True
    # Substring tests, not a regex: Python's engine tries an alternation at every position (15 us a KB).
    return "A" in text and any(prefix in text for prefix in _AWS_IDS)


class _Rule:
    """Where one of `_PATTERNS` can match: every match begins with one of `words` (lower-cased where `folded`),
    each holding one of `markers`; so a match begins where a marker is found in the text (lower-cased where
    `folded`), that marker's offset in a word before it. `words` None: the pattern runs over the whole text when
    a marker is there at all.

    Python's regex engine tries a pattern at every position of a text (a pattern that begins with \\b or a
    case-insensitive word gets no literal-prefix search): about 30 ns a character here, the name=value pattern,
    which tries each of its twenty words, five times that. All of them over a 1,024-character text took 600 us
    where a marker such as "key" or "token" (any source file, any page of docs) let them run. `apply` tries a
    pattern only where a match can begin, which gives what `sub` gives: the same leftmost matches, each
    replaced, the next searched after its end."""

    __slots__ = ("pattern", "replacement", "markers", "folded", "offsets", "most", "ends")

    def __init__(self, index: int, markers: tuple[str, ...], folded: bool,
                 words: tuple[str, ...] | None = None) -> None:
        self.pattern, self.replacement = _PATTERNS[index]
        self.markers, self.folded = markers, folded
        # marker -> ((offset, what the words hold before the marker at that offset), ...)
        self.offsets: dict[str, tuple[tuple[int, tuple[str, ...]], ...]] | None = None
        self.most = 0  # the most places a marker's finding stands for
        if words is not None:
            self.offsets = {}
            for marker in markers:
                heads: dict[int, set[str]] = {}
                for word in words:
                    for at in range(len(word)):
                        if word.startswith(marker, at):
                            heads.setdefault(at, set()).add(word[:at])
                self.offsets[marker] = tuple((at, tuple(sorted(heads[at]))) for at in sorted(heads))
            self.most = max(len(places) for places in self.offsets.values())
        # The last characters of what the words hold before a marker.
        self.ends = frozenset(head[-1] for places in (self.offsets or {}).values() for _, heads in places
                              for head in heads if head)

    def apply(self, text: str, hay: str) -> str:
        """`pattern.sub(replacement, text)`; `hay`: `text`, or `text.lower()` (as long as it) for a folded rule."""
        offsets = self.offsets
        found = 0
        for marker in self.markers:
            found += hay.count(marker)
        if not found:
            return text
        if offsets is None or found * self.most * 8 > len(text):  # no places, or a text made of markers
            return self.pattern.sub(self.replacement, text)
        starts: set[int] = set()
        ends = self.ends
        for marker in self.markers:
            places = offsets[marker]
            at = hay.find(marker)
            while at != -1:
                # A word holding the marker past its start has one of `ends` right before it: most findings
                # (" key", "monkey") are ruled out by that one test.
                after_head = at > 0 and hay[at - 1] in ends
                for offset, heads in places:
                    if offset == 0:
                        starts.add(at)
                    elif after_head and offset <= at and hay.startswith(heads, at - offset):
                        starts.add(at - offset)
                at = hay.find(marker, at + 1)
        match = self.pattern.match  # at a position, with what comes before it seen (\b looks back)
        replacement = self.replacement
        pieces: list[str] = []
        done = 0
        for start in sorted(starts):
            if start < done:
                continue
            hit = match(text, start)
            if hit is not None:
                pieces.append(text[done:start])
                pieces.append(replacement(hit) if callable(replacement) else hit.expand(replacement))
                done = hit.end()  # no pattern matches an empty text, so this moves on
        if not pieces:
            return text
        pieces.append(text[done:])
        return "".join(pieces)


def _spellings(*words: str) -> tuple[str, ...]:
    """Each word with each "_" as "_", "-" or nothing (what [_-]? takes)."""
    return tuple(spelled for word in words for spelled in _spellings_of(word))


def _spellings_of(word: str) -> list[str]:
    head, sep, tail = word.partition("_")
    if not sep:
        return [word]
    return [head + joint + rest for joint in ("_", "-", "") for rest in _spellings_of(tail)]


# The words the name=value pattern's match begins with ("client[_-]?secret" as "client_secret" here).
_ASSIGNED_NAMES = ("password", "passwd", "pwd", "passphrase", "secret", "client_secret", "api_key", "access_key",
                   "secret_key", "token", "access_token", "refresh_token", "auth_token", "private_key")
# In `_PATTERNS`' order, but the last (the long runs: `_long_runs`); tests/records/test_sanitize.py checks the
# words against the patterns'.
_RULES = (
    _Rule(0, ("-----BEGIN",), False, ("-----BEGIN",)),
    _Rule(1, ("authoriz",), True, _spellings("authorization", "proxy_authorization")),
    _Rule(2, ("bearer",), True, ("bearer",)),
    _Rule(3, ("gw_",), False, ("gw_",)),
    _Rule(4, ("eyJ",), False, ("eyJ",)),
    _Rule(5, _AWS_IDS, False, _AWS_IDS),
    _Rule(6, ("k-", "k_"), False, ("sk-", "sk_", "pk-", "pk_", "rk-", "rk_")),
    _Rule(7, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), False,
          ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    _Rule(8, ("xox",), False, ("xox",)),
    _Rule(9, ("AIza",), False, ("AIza",)),
    _Rule(10, ("pass", "pwd", "secret", "key", "token"), True, _spellings(*_ASSIGNED_NAMES)),
    _Rule(11, ("://",), False),  # a scheme of any length before it
)
# Letters that a case-insensitive pattern matches as ASCII ones but `str.lower` does not map to them one to one
# (U+0130 lowers to two characters): in a text holding one, the folded rules run their whole pattern.
_FOLD_TRAPS = ("\u0130", "\u0131", "\u017f", "\u212a")


def _apply_patterns(text: str, lowered: str | None = None) -> str:
    """Every pattern but the long-run one applied in turn, as `pattern.sub` would apply them (`lowered`:
    `text.lower()`, if the caller has it)."""
    traps = not text.isascii() and any(trap in text for trap in _FOLD_TRAPS)
    for rule in _RULES:
        if not rule.folded:
            cleaned = rule.apply(text, text)
        elif traps:
            cleaned = rule.pattern.sub(rule.replacement, text)
        else:
            if lowered is None:
                lowered = text.lower()
            cleaned = rule.apply(text, lowered)
        if cleaned is not text:
            text, lowered = cleaned, None
            traps = not text.isascii() and any(trap in text for trap in _FOLD_TRAPS)
    return text


# The characters of a long run ([A-Za-z0-9+/_-]) as b"a", every other byte of a text's UTF-8 as b" ".
_RUN_BYTES = bytes(97 if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/_-") else 32 for c in range(256))
_A_LONG_RUN = b"a" * 32


def _long_runs(text: str, encoded: bytes | None = None) -> str:
    """The long-run pattern applied, where the text holds a run long enough (a C-speed test first: the pattern
    costs about 30 ns a character, and most texts of 32 characters or more hold no such run). `encoded`: the
    text's UTF-8, if the caller has it."""
    if encoded is None:
        encoded = text.encode("utf-8", "surrogatepass")
    if _A_LONG_RUN not in encoded.translate(_RUN_BYTES):
        return text
    return _LONG_RUN.sub(_LONG_RUN_SECRET, text)


# Short texts recur (method names, tool names, enum values, keys): their cleaned form is remembered.
_CACHED_LENGTH = 64
_CACHE_SIZE = 8192
CLEANED_TEXTS: dict[str, str] = {}
"""`clean_text`'s results for short texts (up to `_CACHED_LENGTH` characters), for a caller that looks one up
before calling it (records/audit.py `prepare`: the call costs more than the lookup). Cleared, never rebound."""


def normalize_name(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def _compact(name: str) -> str:
    """A normalized name without its underscores: how `NOT_SECRET_NAMES` are matched (max_tokens, maxTokens)."""
    return name.replace("_", "")


class Sanitizer:
    """Cleans nested values: `SECRET_NAMES` plus `extra_names` (substrings) and `exact_names` (whole keys).

    Build one per set of names and keep it (compiling the name pattern is the
    expensive part); `clean` is safe to call from anywhere.
    """

    __slots__ = ("_name_pattern", "_exact", "_not_secret", "_names", "_screen")

    def __init__(self, extra_names: Iterable[str] = (), exact_names: Iterable[str] = ()) -> None:
        names = {normalize_name(n) for n in (*SECRET_NAMES, *extra_names) if n and n.strip()}
        self._name_pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
        self._exact = frozenset(normalize_name(n) for n in exact_names)
        self._not_secret = {_compact(n) for n in NOT_SECRET_NAMES} - {_compact(normalize_name(n)) for n in extra_names}
        self._names: dict[str, bool] = {}  # key -> secret_name(key): keys recur in every entry
        # What `unchanged` looks for in a body's folded text: every name (a key containing one is redacted
        # whole); the screen adds the words value patterns need where they could match (_fast/screen).
        # The counts among the exceptions (max_tokens...) pass it too, but for one that is also a whole-key name.
        counts = self._not_secret - {_compact(n) for n in self._exact}
        self._screen = screen.Screen(names | self._exact, {n.encode() for n in counts}) if screen.COMPILED else None

    def secret_name(self, key: str) -> bool:
        """Whether a value under `key` is replaced whole."""
        known = self._names.get(key)
        if known is not None:
            return known
        name = normalize_name(key)
        secret = name in self._exact or (
            _compact(name) not in self._not_secret and self._name_pattern.search(name) is not None
        )
        if len(self._names) >= _CACHE_SIZE:
            self._names.clear()
        self._names[key] = secret
        return secret

    @property
    def screen(self) -> screen.Screen | None:
        """The compiled screen `unchanged` asks (None without the compiled core)."""
        return self._screen

    def unchanged(self, raw: bytes, nesting: int = 0) -> bool:
        """Whether `clean` leaves every value decoded from the JSON text `raw` as it is: True is always right,
        False means "walk it with `clean`" (`_fast/screen` says what it checks; `nesting`: the container
        levels the caller adds around the decoded value).

        Walking the decoded parameters is most of an audit entry's cost, and most
        calls carry nothing it would change: the compiled screen rules that out in
        one pass over the bytes. Without the compiled core, always False (the twin
        is as exact, but slower than the walk it would save).
        """
        return self._screen is not None and self._screen.plain(raw, nesting)

    def clean(self, value: Any) -> Any:
        """A copy of `value` (JSON-like: dict, list, str, number, bool, None) with secrets replaced, bounded
        (`MAX_STRING`, `MAX_ITEMS`, `MAX_DEPTH`, `MAX_DETAILS`). Cleaning what it gives changes nothing more,
        but a container cut at `MAX_ITEMS`, whose note counts what was left out."""
        spent = _Spent()
        out = self._clean(value, 0, spent)
        if spent.cut:  # marked at the top, where a second cleaning stops at the same place and marks it again
            if type(out) is dict:
                key = CUT_KEY
                while key in out:
                    key += "'"
                out[key] = CUT_NOTE
            elif type(out) is list:
                out.append(CUT_ITEM)
        return out

    def _clean(self, value: Any, depth: int, spent: _Spent) -> Any:
        # What is given back is what counts against MAX_DETAILS, so that it counts the same when cleaned again.
        if isinstance(value, str):
            text = clean_text(value)
            spent.units += len(text) or 1
            return text
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                spent.units += len(_TOO_DEEP)
                return _TOO_DEEP
            spent.units += 1
            out: dict[str, Any] = {}
            for count, (key, item) in enumerate(value.items()):
                if spent.units >= MAX_DETAILS:
                    spent.cut = True
                    break
                if count == MAX_ITEMS:
                    out["[truncated]"] = note = f"{len(value) - MAX_ITEMS} more keys"
                    spent.units += len("[truncated]") + len(note)
                    break
                key = key if isinstance(key, str) else str(key)
                if self.secret_name(key):
                    item = REDACTED
                    spent.units += len(REDACTED)
                else:
                    item = self._clean(item, depth + 1, spent)
                key = clean_text(key)
                while key in out:  # two keys that clean to the same text both stay
                    key += "'"
                spent.units += len(key) or 1
                out[key] = item
            return out
        if isinstance(value, (list, tuple)):
            if depth >= MAX_DEPTH:
                spent.units += len(_TOO_DEEP)
                return _TOO_DEEP
            spent.units += 1
            items = []
            for item in value[:MAX_ITEMS]:
                if spent.units >= MAX_DETAILS:
                    spent.cut = True
                    return items  # the note at the top says so; a count here would change when cleaned again
                items.append(self._clean(item, depth + 1, spent))
            if len(value) > MAX_ITEMS:
                items.append(note := f"[truncated: {len(value) - MAX_ITEMS} more items]")
                spent.units += len(note)
            return items
        if value is None or isinstance(value, (bool, float)):
            spent.units += 1
            return value
        if isinstance(value, int):
            if _INT64[0] <= value <= _INT64[1]:
                spent.units += 1
                return value
            text = str(value)
            spent.units += len(text)
            return text
        text = clean_text(str(value))  # anything else (UUID, datetime) as its text
        spent.units += len(text) or 1
        return text


_TOO_DEEP = "[too deep]"


class _Spent:
    """How much of `MAX_DETAILS` a cleaning has given back so far, and whether it left something out."""

    __slots__ = ("units", "cut")

    def __init__(self) -> None:
        self.units = 0
        self.cut = False


def clean_text(text: str) -> str:
    """`text` bounded, without NULs (PostgreSQL's text and jsonb refuse them), secrets replaced."""
    if len(text) <= _CACHED_LENGTH:
        cleaned = CLEANED_TEXTS.get(text)
        if cleaned is None:
            cleaned = _clean_text(text)
            if len(CLEANED_TEXTS) >= _CACHE_SIZE:
                CLEANED_TEXTS.clear()
            CLEANED_TEXTS[text] = cleaned
        return cleaned
    return _clean_text(text)


def _clean_text(text: str) -> str:
    if len(text) > MAX_STRING:
        text = text[:MAX_STRING] + f"...[+{len(text) - MAX_STRING} chars]"
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    encoded: bytes | None
    try:
        encoded = text.encode()
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): not storable as UTF-8
        text = text.encode("utf-8", "replace").decode()
        encoded = None
    if len(text) < _SHORTEST:
        return text
    lowered = text.lower()  # once, for the markers and the case-insensitive patterns
    if _maybe_secret(text, lowered):
        cleaned = _apply_patterns(text, lowered)
        if cleaned is not text:
            text, encoded = cleaned, None
    return _long_runs(text, encoded) if len(text) >= 32 else text


DEFAULT = Sanitizer()
"""The sanitizer with the built-in names only."""


__all__ = ["DEFAULT", "MAX_STRING", "REDACTED", "SECRET_NAMES", "Sanitizer", "clean_text", "normalize_name"]
