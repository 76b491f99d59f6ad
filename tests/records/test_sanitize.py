"""The audit sanitizer: secrets by key name and by value pattern, at any depth; bounds; what it leaves alone."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.records import sanitize
from gateway.records.sanitize import DEFAULT, MAX_STRING, REDACTED, SECRET_NAMES, Sanitizer, clean_text

GW_KEY = "gw_abcdefghij_" + "Zx9" * 13 + "A"
JWT = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36P"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"


def flat(value) -> str:
    return json.dumps(value)


@pytest.mark.parametrize("name", [
    "password", "Password", "user_password", "PASSWD", "passphrase", "client_secret", "secretKey", "token",
    "access_token", "refresh-token", "api_key", "API-Key", "x-api-key", "apikey", "Authorization",
    "proxy_authorization", "cookie", "Set-Cookie", "credentials", "aws_credential", "private_key", "privateKey",
    "access_key_id", "session_key", "signature",
])
def test_secret_names_are_redacted_whole_at_any_depth(name):
    value = {"outer": [{"inner": {name: {"deep": "v", "n": 1}}}, {name: 12345}, {name: "plain"}]}
    cleaned = DEFAULT.clean(value)
    assert cleaned == {"outer": [{"inner": {name: REDACTED}}, {name: REDACTED}, {name: REDACTED}]}


def test_counts_named_like_tokens_are_not_secrets_in_camel_case_either():
    # The MCP sampling request's own parameter, and the usage counts of LLM APIs' JavaScript SDKs.
    value = {"maxTokens": 256, "inputTokens": 10, "OutputTokens": 5, "totalTokens": 15, "tokenCount": 3,
             "accessToken": "s3cret", "tokenizer": "cl100k"}
    cleaned = DEFAULT.clean(value)
    assert {k: cleaned[k] for k in ("maxTokens", "inputTokens", "OutputTokens", "totalTokens", "tokenCount")} == {
        "maxTokens": 256, "inputTokens": 10, "OutputTokens": 5, "totalTokens": 15, "tokenCount": 3}
    assert cleaned["accessToken"] == REDACTED and cleaned["tokenizer"] == REDACTED
    # A deployment that names one of them a secret gets it redacted in every spelling.
    assert Sanitizer(extra_names=("maxTokens",)).clean({"max_tokens": 1, "maxTokens": 2}) == {
        "max_tokens": REDACTED, "maxTokens": REDACTED}


def test_counts_named_like_tokens_are_not_secrets():
    value = {"max_tokens": 256, "prompt_tokens": 10, "completion_tokens": 5, "tokenizer": "cl100k"}
    cleaned = DEFAULT.clean(value)
    assert cleaned["max_tokens"] == 256 and cleaned["prompt_tokens"] == 10 and cleaned["completion_tokens"] == 5
    assert cleaned["tokenizer"] == REDACTED  # contains "token": the name net is wide on purpose


@pytest.mark.parametrize("text, kept, gone", [
    (f"Authorization: Bearer {JWT}", "Authorization: Bearer ", JWT),
    ("authorization=Basic dXNlcjpwYXNzd29yZA==", "authorization=Basic ", "dXNlcjpwYXNzd29yZA"),
    ("curl -H 'Bearer abc.def-ghi_jkl'", "Bearer ", "abc.def-ghi_jkl"),
    (f"use {GW_KEY} for this", "gw_abcdefghij_", GW_KEY[14:]),
    (f"token is {JWT}", "token is ", JWT),
    (f"id {AWS_ID} secret {AWS_SECRET}", "id ", AWS_ID),
    (f"id {AWS_ID} secret {AWS_SECRET}", " secret ", AWS_SECRET),
    (f"sha {HEX}", "sha ", HEX),
    ("connect password=hunter2&user=bob", "password=", "hunter2"),
    ('config: {"api_key": "s3cr3t-v@lue"}', "api_key", "s3cr3t-v@lue"),
    ("postgres://bob:s3cret@db.example/x", "postgres://bob:", "s3cret"),
    (f"key:\n{PEM}\nend", "key:\n", "MIIEowIBAAKCAQEA7"),
    ("sk-proj-abcdefghijklmnopqrstuvwxyz012345", "", "abcdefghijklmnopqrstuvwxyz012345"),
    ("ghp_" + "a1B2" * 9, "", "a1B2a1B2a1B2"),
])
def test_secret_values_are_redacted_where_they_appear(text, kept, gone):
    cleaned = DEFAULT.clean({"note": text, "list": [text], "nested": {"deeper": [{"x": text}]}})
    for value in (cleaned["note"], cleaned["list"][0], cleaned["nested"]["deeper"][0]["x"]):
        assert gone not in value, value
        assert REDACTED in value
        assert kept in value


@pytest.mark.parametrize("text", [
    "550e8400-e29b-41d4-a716-446655440000",  # ids stay readable
    "/Users/Alice/Documents/report2024/final-v2",
    "get_user_by_identifier_with_extra_fields_v2",
    "What is the weather in Paris tomorrow?",
    "https://example.com/some/long/path/to/a/resource",
    "the basic setup works",
])
def test_ordinary_values_are_left_alone(text):
    assert DEFAULT.clean({"q": text}) == {"q": text}


def test_a_secret_used_as_a_key_is_redacted_too():
    cleaned = DEFAULT.clean({JWT: 1, "b": 2})
    assert JWT not in flat(cleaned) and cleaned["b"] == 2


def test_deployment_and_tenant_names_add_to_the_defaults():
    sanitizer = Sanitizer(extra_names=["ssn", "Account-Number"], exact_names=["key"])
    cleaned = sanitizer.clean({"SSN": "123-45-6789", "account_number": 42, "customer_ssn_hash": "x",
                               "key": "k", "keyboard": "qwerty", "password": "p"})
    assert cleaned == {"SSN": REDACTED, "account_number": REDACTED, "customer_ssn_hash": REDACTED,
                       "key": REDACTED, "keyboard": "qwerty", "password": REDACTED}
    # A deployment may even redact what the defaults keep.
    assert Sanitizer(extra_names=["max_tokens"]).clean({"max_tokens": 5}) == {"max_tokens": REDACTED}


def test_the_default_list_is_the_one_list():
    assert "password" in SECRET_NAMES and "authorization" in SECRET_NAMES
    assert all(name == name.lower() for name in SECRET_NAMES)


def test_bounds_and_what_the_database_cannot_store():
    long = "x" * (MAX_STRING + 500)
    assert clean_text(long).startswith("x" * MAX_STRING) and clean_text(long).endswith("[+500 chars]")
    assert clean_text("a\x00b") == "a\ufffdb"
    assert clean_text("lone \ud800 surrogate").encode()  # storable as UTF-8
    big = DEFAULT.clean({"n": 2**70, "items": list(range(500)), "keys": {str(i): i for i in range(500)}})
    assert big["n"] == str(2**70)
    assert len(big["items"]) == 101 and big["items"][-1].startswith("[truncated")
    assert len(big["keys"]) == 101
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["d"] = {}
        node = node["d"]
    assert "[too deep]" in flat(DEFAULT.clean(deep))


def test_clean_never_changes_its_argument_and_is_idempotent():
    value = {"password": "p", "list": [{"token": "t"}], "note": f"Bearer {JWT}"}
    original = json.loads(json.dumps(value))
    once = DEFAULT.clean(value)
    assert value == original
    assert DEFAULT.clean(once) == once


# Pieces that each start or nearly start a pattern, glued into texts for the property below.
PIECES = ["://", "https://", "mcpgw://docs/", "file:///srv/a.md", "bob:pw@", "bob@", "@", ":", "/", " ", "\n", "=",
          "password=", "pwd:", "Bearer ", "bearer\t", "Authorization: ", "gw_abc_", "eyJ", "AKIA", "xoxb-", "AIza",
          "sk-", "pk_", "ghp_", "-----BEGIN ", "PRIVATE KEY-----", "token", "secret", "key=", "Zz9", "a1B2" * 5,
          "0123456789abcdef" * 2, "x"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=8).map("".join))
def test_a_text_without_a_marker_is_one_no_pattern_changes(text):
    """`_maybe_secret` lets a text skip every pattern but the long-run one: only where none of them could match."""
    if not sanitize._maybe_secret(text):
        for pattern, replacement in sanitize._PATTERNS[:-1]:
            assert pattern.sub(replacement, text) == text, (pattern.pattern, text)


@pytest.mark.parametrize("text", [
    "mcpgw://docs/file:///srv/docs/guide.md",
    "https://docs.example.com/guide/install?lang=en&page=2",
])
def test_urls_without_a_password_skip_the_patterns(text):
    assert not sanitize._maybe_secret(text)
    assert clean_text(text) == text


def test_a_urls_password_is_still_found():
    assert sanitize._maybe_secret("see postgres://bob:s3cret@db.example/x")
    assert clean_text("see postgres://bob:s3cret@db.example/x") == f"see postgres://bob:{REDACTED}@db.example/x"


def _every_pattern(text: str) -> str:
    """`_clean_text` as it was before the patterns were tried only where they can match: each pattern over the
    whole text, in turn (those but the long-run one only where `_maybe_secret` finds a marker)."""
    if len(text) > MAX_STRING:
        text = text[:MAX_STRING] + f"...[+{len(text) - MAX_STRING} chars]"
    text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode()
    if len(text) < 8:
        return text
    if not sanitize._maybe_secret(text):
        return sanitize._LONG_RUN.sub(sanitize._LONG_RUN_SECRET, text)
    for pattern, replacement in sanitize._PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# The patterns' words in every case and spelling, with what may come before and after them, the letters a
# case-insensitive pattern reads as ASCII (U+0130, U+0131, U+017F, U+212A), and whole secrets.
WORDS = (sanitize._spellings(*sanitize._ASSIGNED_NAMES) + sanitize._spellings("proxy_authorization")
         + ("authorization", "bearer", "Bearer", "BEARER", "PASSWORD", "Api-Key", "ToKeN", "monkey", "keys", "pwds"))
PARTS = ["=", ":", " = ", '"', "'", "\t", "\n", " ", ",", ";", "&", "@", "://", "https://h/", "u:p@", "x", "_", "-",
         "\u0130", "\u0131", "\u017f", "\u212a", "s\u212ay-", "\u017fecret=", "-----BEGIN ", "PRIVATE KEY-----",
         "gw_ab_", "eyJ", "a.b", "AKIA", "ASIA", "sk-", "pk_", "rk-", "ghp_", "github_pat_", "xoxb-", "AIza",
         "Zz9" * 6, "0123456789abcdef" * 2, "a1B2" * 9, "hunter2", "k-", "k_", "\u00e9t\u00e9", "\u65e5"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(WORDS) | st.sampled_from(PARTS) | st.text(max_size=3), max_size=14).map("".join))
def test_the_patterns_tried_where_they_can_match_give_what_each_over_the_whole_text_gives(text):
    assert sanitize._clean_text(text) == _every_pattern(text)


@pytest.mark.parametrize("text", [
    open(sanitize.__file__).read()[:3000],  # source code: "key", "token", "secret" everywhere
    "key" * 400, "key " * 300, "token=" * 200, "api_key=1 " * 100, "Bearer x " * 120, "sk-" * 400, "k-" * 600,
    "password=hunter2 token: abc Bearer abcdefghijklmnop sk-abcdefghijklmnopqrstu AKIAABCDEFGHIJKLMNOP " * 12,
    "x" * 31 + "0" + "pwd:1 " + "a1B2" * 20, "url https://bob:pw@host/x and api-key: 1",
])
def test_long_texts_and_texts_made_of_markers_are_cleaned_as_before(text):
    assert sanitize._clean_text(text) == _every_pattern(text)


def _alternatives(group: str) -> set[str]:
    """The words an alternation of words with optional "[_-]?" joints takes, lower-cased."""
    words = set()
    for alternative in group.split("|"):
        spellings = [""]
        for piece in re.split(r"(\[_-\]\?)", alternative):
            joints = ("_", "-", "") if piece == "[_-]?" else (piece,)
            spellings = [done + joint for done in spellings for joint in joints]
        words.update(spellings)
    return {word.lower() for word in words}


def test_the_rules_know_every_word_their_patterns_begin_with():
    """A rule tries its pattern only where one of its words can begin: the words must be every word the
    pattern's match can begin with, and each must hold a marker."""
    name_value = sanitize._PATTERNS[10][0].pattern
    group = re.search(r"\\b\(\?:(.*?)\)\[", name_value.replace("\n", "")).group(1)
    assert set(sanitize._spellings(*sanitize._ASSIGNED_NAMES)) == _alternatives(group)
    authorization = sanitize._PATTERNS[1][0].pattern
    assert r"\b(?:proxy[_-]?)?authorization\b" in authorization
    assert set(sanitize._spellings("authorization", "proxy_authorization")) == \
        _alternatives("proxy[_-]?authorization|authorization")
    for rule in sanitize._RULES:
        if rule.offsets is not None:
            assert rule.offsets.keys() == set(rule.markers)
            for marker, places in rule.offsets.items():
                for offset, heads in places:
                    assert all(len(head) == offset for head in heads)
    # Every word holds a marker, lower-cased where the rule is folded: checked by making the texts.
    for rule, words in ((sanitize._RULES[10], sanitize._spellings(*sanitize._ASSIGNED_NAMES)),
                        (sanitize._RULES[1], sanitize._spellings("authorization", "proxy_authorization"))):
        for word in words:
            assert any(marker in word for marker in rule.markers), word
            assert rule.apply(word + "=v4lue", word + "=v4lue") == rule.pattern.sub(rule.replacement, word + "=v4lue")


def _units(value) -> int:
    """What a cleaned value counts against MAX_DETAILS: each string and key its length, anything else 1."""
    if isinstance(value, str):
        return len(value) or 1
    if isinstance(value, dict):
        return 1 + sum((len(key) or 1) + _units(item) for key, item in value.items())
    if isinstance(value, list):
        return 1 + sum(_units(item) for item in value)
    return 1


def test_a_value_past_max_details_is_cut_where_the_walk_reaches_the_bound():
    """A 4 MB body of 1 KB strings full of marker words kept 4.5 MB and took 1.7 s of the flush to clean: the walk
    now stops at the first value past MAX_DETAILS, marks the cut at the top, and keeps what came before it,
    cleaned as ever."""
    line = ("token=abc key: pass=b Bearer c sk-" + "d" * 20 + " ")[:60] * 17
    value = {"name": "w", "arguments": {"x": [[line] * 100] * 40, "after": "never reached"}}
    cleaned = DEFAULT.clean(value)
    assert cleaned[sanitize.CUT_KEY] == sanitize.CUT_NOTE
    kept = cleaned["arguments"]["x"]
    assert "after" not in cleaned["arguments"]  # past the cut, in document order
    assert all(item == clean_text(line) for row in kept for item in row) and "Bearer [REDACTED]" in kept[0][0]
    assert sum(len(row) for row in kept) < 4000
    assert sanitize.MAX_DETAILS <= _units(cleaned) <= sanitize.MAX_DETAILS + MAX_STRING + 100
    assert len(kept) < 40 and len(kept[-1]) <= 100 and not any("truncated" in item for item in kept[-1])
    # Cut in the last container of all: marked all the same.
    cut_list = DEFAULT.clean(["s" * 700] * 100)
    assert cut_list[-1] == sanitize.CUT_ITEM and len(cut_list) < 100
    assert DEFAULT.clean({"a": {"b": ["s" * 700] * 100}})[sanitize.CUT_KEY] == sanitize.CUT_NOTE


@pytest.mark.parametrize("value", [
    {"a": ["x" * 1000] * 100, "b": {"c": ["y" * 900] * 100}},
    [{"k" * 50: "v" * 1000} for _ in range(100)],
    {"n": list(range(100)), "deep": [[["z" * 1024] * 100] * 100]},
    {"password": "p", "list": [["t" * 1024] * 100] * 3, "note": f"Bearer {JWT}", sanitize.CUT_KEY: "mine"},
    ["s" * 700] * 100 + [{"x": "y"}],
])
def test_a_cut_value_cleaned_again_is_the_same(value):
    once = DEFAULT.clean(value)
    assert DEFAULT.clean(once) == once
    assert _units(once) <= sanitize.MAX_DETAILS + MAX_STRING + 100


def test_the_screen_passes_no_body_a_cleaning_could_cut():
    """A body the screen passes has its details written as they are: what cleaning keeps of such a body counts
    at most twice its bytes, so the screen's bound is half MAX_DETAILS."""
    from gateway._fast import screen, screen_py

    assert screen_py._MAX_BODY * 2 <= sanitize.MAX_DETAILS
    if screen.COMPILED:
        def body(strings: int) -> bytes:
            arguments = {f"s{i}": "word " * 200 for i in range(strings)}  # 1,000 characters each
            return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                               "params": {"name": "t", "arguments": arguments}}).encode()

        assert len(body(30)) < screen_py._MAX_BODY < len(body(40))
        assert DEFAULT.unchanged(body(30)) and not DEFAULT.unchanged(body(40))
