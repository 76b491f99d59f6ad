"""The audit body screen (`_fast/screen`): True only when the sanitizer would change nothing.

`Sanitizer.unchanged` lets an audit entry skip the walk of its parameters.
It must never say "nothing to change" about a body that `Sanitizer.clean`
would change: that would store a secret. The property tests feed it JSON
built from the fragments that trigger each of the sanitizer's nets (names,
markers, long hex/base64 runs, big integers, long strings, wide and deep
containers, escapes, the non-ASCII letters that lower to ASCII ones) and check
that whenever it says True, cleaning changes nothing. The compiled screen and
its pure-Python twin must agree byte for byte.
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._fast import screen, screen_py
from gateway.records.sanitize import DEFAULT, MAX_DEPTH, MAX_ITEMS, MAX_STRING, Sanitizer

pytestmark = pytest.mark.skipif(not screen.COMPILED, reason="the screen is used only compiled")

TENANT = Sanitizer(extra_names=("ssn", "Routing-Number", "taxi"))  # "taxi": "tax\u0130" lowers to "taxi\u0307"
EXACT = Sanitizer(exact_names=("max_tokens", "total-tokens"), extra_names=("tokens_used",))  # counts made secret

# Pieces of text that each trip (or nearly trip) one net of the sanitizer.
FRAGMENTS = [
    "password", "Pass", "pwd", "secret", "token", "max_tokens", "key", "KEY", "api-key", "X-Api-Key", "Authorization",
    "bearer ", "Bearer abc.def", "cookie", "credential", "signature", "ssn", "routing number", "routing-number",
    "gw_", "gw_abc_", "eyJ", "eyJhbGciOi.eyJzdWIi.sig", "://", "https://u:p@host/", "xox", "xoxb-123456789012",
    "AIza", "AKIA", "AKIAIOSFODNN7EXAMPLE", "ASIA", "-----BEGIN", "-----BEGIN RSA PRIVATE KEY-----", "sk-", "sk_",
    "pk_live_", "rk-", "task_", "ghp_", "github_pat_", "gh", "high", "=", "==", "/", "_", "-", "+",
    "0123456789abcdef", "ABCDEF", "Zz9", "a" * 40, "A1b2" * 10, "9" * 18, "9" * 19, "1" * 25, "1.5e300",
    "accesskey", "AccessKey=", "accesskey'=", "accessKey' :", "keyword", "monkey", "compass", "bypass", "pwd", "Pwd :", "bearer\t", "BEARER  x",
    "=", ":", " = ", "'", '"', "key:", "key'=", "pwd=", "api_key ", "@", "u:p@", "bob@", "/@", "mcpgw://docs/",
    "file:///srv/a.md", "http://h", "ftp://x:y@z", "://@", ":// @", "://a/b@c",
    "\u0131", "authorızatıon: ", "to\u212aen", "tax\u0130", "\u017fecret", "bearer\u00a0", "\u00a0", "\u2003",
    "\u3000", "\u1680", "\u2028", "\u202f", "\u205f", "\u0085", "key\u00a0=", "pwd\u3000:", "Gr\u00fc\u00dfe",
    "\t", "\r", "\x08", "\x0c", "\x1c", "\n\n", "key\n=", "pwd\t:", 'accesskey"=', "bearer\n", "\nsk-", "\\n",
    "\n0123456789abcdef", "n0123456789abcdef", "\\", "maxTokens", "max-tokens", "MAX_TOKENS", "tokens_used",
    "prompt tokens", "totalTokens", "max_tokens_secret", "_", "x_max_tokens",
    "\u00e9t\u00e9", "\u4e2d\u6587", "\U0001f600", "\u00c5", "\u212b", "\u1e9e",
    "\u212aey", "pa\u017f\u017fword", "\u0130", "caf\u00e9", "\u65e5\u672c", "\x00", "\ud800"[:0], "\\", "\n", " ", "",
]
# Fragments glued together (new words, runs and markers across their seams) or apart (word boundaries kept).
texts = (st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=6).map("".join)
         | st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=3).map(" ".join)
         | st.tuples(st.sampled_from(FRAGMENTS), st.text("abcdefABCDEF0123456789_-", min_size=14, max_size=40))
         .map("".join))
leaves = st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats(
    allow_nan=False, allow_infinity=False) | texts | st.builds(lambda n: "x" * n, st.integers(MAX_STRING - 2, MAX_STRING + 2))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=12,
)


def _bodies(value, ascii_only: bool = False) -> bytes:
    """A tools/call as a client could send it (the standard library writes integers of any size)."""
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": value}}
    return json.dumps(message, ensure_ascii=ascii_only).encode()


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.booleans())
def test_a_body_the_screen_passes_is_one_cleaning_leaves_alone(value, ascii_only):
    raw = _bodies(value, ascii_only)
    decoded = orjson.loads(raw)
    for sanitizer in (DEFAULT, TENANT, EXACT):
        if sanitizer.unchanged(raw):
            assert sanitizer.clean(decoded) == decoded, raw


@settings(max_examples=1500, deadline=None)
@given(values)
def test_the_compiled_screen_and_its_twin_agree(value):
    raw = _bodies(value)
    words = ("authoriz", "bearer", "cookie", "key", "pass", "secret", "token", "ssn")
    assert screen.Screen(words).plain(raw, 0) == screen_py.Screen(words).plain(raw, 0)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_at_all(raw):
    words = ("key", "pass")
    assert screen.Screen(words).plain(raw, 0) == screen_py.Screen(words).plain(raw, 0)


def test_an_ordinary_call_passes():
    raw = _bodies({"query": "quarterly revenue by region", "limit": 10, "filters": {"region": ["emea"], "year": 2026},
                   "text": "a" * 200, "path": "/srv/data/reports/2026/q3.csv", "id": "6f1d0c2e-9a4b-4c1e-8f00-1a2b3c4d5e6f"})
    assert DEFAULT.unchanged(raw)


@pytest.mark.parametrize("argument", [
    {"password": "hunter2"},  # a secret name
    {"X-Api-Key": "v"},  # a name after folding
    {"ssn": "078-05-1120"},  # a tenant's own name (TENANT only; checked below)
    {"note": "Bearer abcdef"},
    {"note": "gw_abcdefghij_Zx9Zx9Zx9"},
    {"note": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig"},
    {"note": "AKIAIOSFODNN7EXAMPLE"},
    {"note": "sk-live-0123456789abcdefghijklmnop"},
    {"note": "https://user:pw@example.com/"},
    {"url": "postgres://bob:s3cret@db.example/x"},
    {"url": "https://bob:pw\u0040example.com"},  # an "@" spelled as an escape
    {"note": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},  # long hex
    {"note": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},  # long base64
    {"note": "x" * (MAX_STRING + 1)},  # would be cut
    {"n": 2**63},  # past 64 bits: stored as text
    {"list": list(range(MAX_ITEMS + 1))},  # would be cut
    {"note": "ghp_" + "a1" * 18},  # a GitHub token (one case only: not a long-run secret)
    {"note": "xoxb-1234567890-abc"},
    {"note": "AIzaSyA-1234567890abcdefghijklmnopqrstu"},
    {"note": "-----BEGIN PRIVATE KEY-----"},
    {"api_\u212aey": "v"},  # the Kelvin sign lowers to "k": a secret name for the sanitizer
    {"note": "pa\u017f\u017fword=hunter2 high"},  # long s matches "s" under (?i)
    {"note": "accesskey=abc123"},  # a name=value word that is no name: "key" followed by "="
    {"note": "PWD: hunter2"},
    {"note": "accesskey'=abc123"},  # the pattern's optional quote between the word and "="
    {"note": "use bearer  abc.def"},
    {"note": "bearer\u00a0abcdef"},  # a no-break space is whitespace to the pattern
    {"note": "pwd\u3000= hunter2"},
    {"note": "the key\u2003\u00a0: v"},
    {"note": "Bearer\u205fabcdef"},
    {"note": "authoriz\u0131ng"},  # a dotless i matches "i" case-insensitively
    {"note": "to\u212aen=abc"},  # the Kelvin sign: "k"
    {"note": "\u017fecret"},  # a long s: "s"
    {"note": "x\nsk-live-0123456789abcdefghij"},  # a newline before sk- is a word boundary
    {"note": "\n" + "9f86d081884c7d659a2feaa0c55ad015"},  # 32 hex digits after a newline: redacted
    {"note": "x\\" + "9f86d081884c7d659a2feaa0c55ad015"},  # ... after a backslash
    {"note": 'accesskey"=abc123'},  # an escaped quote between the word and "="
    {"note": "pwd\t: hunter2"},
    {"note": "token=abc"},  # a name followed by "=": the name=value pattern
    {"note": "my Password : hunter2"},
    {"note": "say \"token\": yes"},  # an escaped quote between the name and ":"
    {"note": "client-secret\u00a0=x"},
    {"note": "authorization: Basic abc"},
    {"token": "v"},  # a name in a key: the value is redacted whole
    {"outer": [{"Session-Key": 1}]},
    {"x\"token": 1},  # ... also behind an escape in the key
    {"a": {"b": "c"}, "api key": "v"},
    {"note": "use bearer\nabc.def"},
])
def test_what_the_screen_sends_to_the_walk(argument):
    raw = _bodies(argument)
    sanitizer = TENANT if "ssn" in argument else DEFAULT
    assert not sanitizer.unchanged(raw)
    if "ssn" in argument:
        assert DEFAULT.unchanged(raw)  # the default sanitizer has no such name


@pytest.mark.parametrize("argument", [
    {"url": "https://docs.example.com/guide/install?lang=en&page=2"},
    {"uri": "mcpgw://docs/file:///srv/docs/guide.md"},  # a resource URI as the gateway rewrites it
    {"url": "https://example.com/@alice/posts"},  # an "@" after the first "/": no user:password@
    {"note": "see https://example.com/ or mail bob@example.com"},  # the "@" is in another word
    {"url": "https://example.com", "contact": "bob@example.com"},  # ... or in another string
])
def test_a_url_counts_only_with_an_at_sign_after_its_scheme(argument):
    raw = _bodies(argument)
    assert DEFAULT.unchanged(raw)
    decoded = orjson.loads(raw)
    assert DEFAULT.clean(decoded) == decoded


@pytest.mark.parametrize("text", [
    "caf\u00e9 cr\u00e8me", "Gr\u00fc\u00dfe aus M\u00fcnchen", "Paris demain\u00a0? Oui\u202f!", "a\u3000b\u2003c",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440", "\U0001f600 done", "\u00c5ngstr\u00f6m",
])
def test_text_in_other_languages_is_screened_like_english(text):
    for ascii_only in (False, True):  # raw UTF-8, or \u escapes (those are walked)
        raw = _bodies({"note": text, "tags": [text]}, ascii_only)
        assert DEFAULT.unchanged(raw) is not ascii_only
    # A key that lowers to "taxi" and a combining dot holds the tenant's name "taxi": redacted, so walked.
    raw = _bodies({"tax\u0130": "v"})
    assert TENANT.clean(orjson.loads(raw)) != orjson.loads(raw)
    assert not TENANT.unchanged(raw)


@pytest.mark.parametrize("text", [
    "# Notes\n\n- fix the login flow\n- deploy on Monday", 'def f():\n\treturn "x"\r\n', "a\\b\\c", "tab\tend\f\b",
    "n0123456789abcdef0123456789abcde",  # 31 characters: no secret run, with or without a newline before it
    "\n0123456789abcdef0123456789abcde",
])
def test_the_usual_escapes_are_screened_as_the_characters_they_spell(text):
    raw = _bodies({"content": text})
    assert DEFAULT.unchanged(raw)
    decoded = orjson.loads(raw)
    assert DEFAULT.clean(decoded) == decoded


@pytest.mark.parametrize("raw", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"note":"\\u0070assword=hunter2"}}',  # \u: anything
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"note":"0123456789abcdef\\/0123456789abcdef"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"note":"ends with \\',  # cut after the backslash
])
def test_the_other_escapes_are_walked(raw):
    assert not DEFAULT.unchanged(raw)


@pytest.mark.parametrize("argument", [
    {"message": "Fix token refresh race in session middleware"},
    {"summary": "Rotate the database password", "project_key": "OPS"},  # "key" ends a key: no "=" in its text
    {"note": "the secret sauce, a session cookie and their credentials", "issue_key": "OPS-1"},
    {"note": "tokens: 5"},  # "tokens" is no word of the pattern: "token" is followed by "s"
])
def test_a_name_in_a_value_counts_only_before_an_equals_sign_or_colon(argument):
    _passes(argument)


@pytest.mark.parametrize("argument", [
    {"prompt": "Summarize.", "max_tokens": 500}, {"maxTokens": 1}, {"usage": {"input-tokens": 1, "TotalTokens": 2}},
])
def test_a_key_that_is_a_count_passes(argument):
    _passes(argument)
    # ... unless the deployment made it a secret, as a whole key or as a name.
    assert not EXACT.unchanged(_bodies({"max_tokens": 1})) and not EXACT.unchanged(_bodies({"tokensUsed": 1}))
    assert not DEFAULT.unchanged(_bodies({"max_tokens_secret": 1}))


def _passes(argument):
    raw = _bodies(argument)
    assert DEFAULT.unchanged(raw)
    decoded = orjson.loads(raw)
    assert DEFAULT.clean(decoded) == decoded


def test_words_that_are_no_names_count_only_where_their_pattern_could_match():
    raw = _bodies({"keywords": ["monkey", "key"], "note": "the bearer's compass passes", "pwd_hint": "x"})
    assert DEFAULT.unchanged(raw)
    decoded = orjson.loads(raw)
    assert DEFAULT.clean(decoded) == decoded


def test_depth_counts_the_levels_the_caller_adds():
    value: object = "leaf"
    for _ in range(MAX_DEPTH - 6):
        value = [value]
    raw = _bodies(value)  # three levels of envelope around it
    assert DEFAULT.unchanged(raw, 0)
    assert not DEFAULT.unchanged(raw, 4)


def test_a_batch_screened_with_its_extra_level():
    from gateway.records.audit import McpDetails

    batch = orjson.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": {
        "text": "plain"}}}, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "t", "arguments": {
            "token": "s3cr3t"}}}])
    details = McpDetails(batch, "demo", 200, None).build(DEFAULT)
    assert details["batch"][0]["params"]["arguments"] == {"text": "plain"}
    assert details["batch"][1]["params"]["arguments"] == {"token": "[REDACTED]"}


@pytest.mark.parametrize(("note", "plain"), [
    ("page 2 of 10, row 7: ok", True),  # spaces, colons and commas between short runs with digits
    ("order no. " + "9" * 18 + " shipped", True),  # 18 digits: stored as they are
    ("order no. " + "9" * 19 + " shipped", False),  # 19 digits: may be an integer past 64 bits
    ("id: ab" + "9" * 19, False),  # the run of digits begins inside a word, after calm bytes
    ("ab: cd" + "1" * 18 + " ef", True),  # the run that holds the digits began after the ': ', not before it
    ("hash: " + "a1" * 20, False),  # a 40-character hex run after calm bytes: the sanitizer redacts it
    ("ref: abcdefABCDEFGHIJ" + "1234567890" + "uvwxyz", False),  # a 32-character run, 16 from its first digit
    ("hash. " + "a1" * 15 + " . end", True),  # 30 characters: too short to be a secret
])
def test_bytes_that_only_end_runs_are_passed_over_and_runs_with_digits_are_still_read(note, plain):
    """Between runs, a space or a ':' only ends the run before it: the screen passes over such bytes while it is
    in no run holding a digit, and finds where that run began when its first digit comes."""
    raw = _bodies({"note": note})
    assert DEFAULT.unchanged(raw) is plain
    words = ("authoriz", "bearer", "key", "pass", "secret", "token")
    assert screen.Screen(words).plain(raw, 0) is screen_py.Screen(words).plain(raw, 0) is plain
    if plain:
        decoded = orjson.loads(raw)
        assert DEFAULT.clean(decoded) == decoded


def test_names_all_along_a_long_text_read_it_once(monkeypatch):
    """A name in a value makes the screen find where its string ends (is the string a key?). A source file or a
    page of docs names "token" or "key" on every line: each finding read the rest of the text again, quadratic
    in its length (a 1 MB body of them took minutes). The twin's reads of string ends are counted, byte by
    byte; the answers are the compiled screen's and the twin's alike."""
    read = []
    string_end = screen_py._string_end

    def counted(data, j, n):
        end = string_end(data, j, n)
        read.append(end - j)
        return end

    monkeypatch.setattr(screen_py, "_string_end", counted)
    line = "refresh the access token when the api key rotates; "
    text = line * 400  # 20 KB, 800 names
    for raw in (_bodies({"content": text}), _bodies({"content": text, "note": text + "token"}),
                _bodies({"content": text, "access_token": 1})):
        read.clear()
        words = ("authoriz", "bearer", "key", "pass", "secret", "token")
        assert screen_py.Screen(words).plain(raw, 0) is screen.Screen(words).plain(raw, 0) is False  # too long
        assert sum(read) <= len(raw), (len(read), sum(read))
    short = _bodies({"content": line * 10, "note": "the token " * 20})
    read.clear()
    assert screen_py.Screen(("key", "token")).plain(short, 0) is screen.Screen(("key", "token")).plain(short, 0)
    assert len(read) == 2  # once for each string that names one
