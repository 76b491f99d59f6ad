"""The audit sanitizer: secrets by key name and by value pattern, at any depth; bounds; what it leaves alone."""

from __future__ import annotations

import json

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
