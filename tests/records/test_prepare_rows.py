"""`_fast/auditentry.prepare_rows`: a batch of audit rows through `AuditTrail.prepare`, a plain call's at C level.

The compiled loop makes a plain call's row itself (its details an `McpDetails` whose body is one message the
tenant's screen passes and `plain_details` writes) and hands every other row to `prepare`'s per-row code. Its
rows must be exactly those of the per-row code alone (the twin's `prepare_rows`), whatever the batch holds:
secrets in bodies, errors and server names, tenants with their own names to redact, batches, bodies that are
not JSON, details of other kinds, rows that have their id already."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._fast import auditentry, auditentry_py
from gateway.records import audit
from gateway.records.audit import AdminDetails, AuditTrail, McpDetails
from gateway.records.chain import DetailsText

pytestmark = pytest.mark.skipif(not auditentry.COMPILED, reason="the twin gives every row to the per-row code")

TENANTS = [uuid.UUID(int=1), uuid.UUID(int=2), None]
OWN_NAMES = {TENANTS[1]: ("customer_ref",)}  # the second tenant redacts one more name


class Key:
    def __init__(self, tenant_id):
        self.tenant_id, self.user_id, self.id, self.role = tenant_id, uuid.UUID(int=7), uuid.UUID(int=8), "USER"


def trail() -> AuditTrail:
    counter = iter(range(1, 1_000_000))
    return AuditTrail(new_id=lambda: uuid.UUID(int=next(counter)), extra_names=("internal_code",),
                      tenant_names=lambda tenant: OWN_NAMES.get(tenant, ()), log=False)


def prepared_both_ways(rows: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """The rows `prepare` makes, and those it makes with the twin's `prepare_rows` (the per-row code alone)."""
    compiled = trail().prepare(list(rows))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(audit, "_prepare_rows", auditentry_py.prepare_rows)
        per_row = trail().prepare(list(rows))
    return compiled, per_row


WORDS = st.sampled_from([
    "echo", "x" * 40, "password", "customer_ref", "internal_code", "sk-" + "a1" * 12, "Bearer abc.def",
    "eyJhbGciOiJIUzI1NiJ9", "caf\u00e9", "line\nbreak", "AKIAIOSFODNN7EXAMPLE", "0123456789abcdef" * 3, "",
    "https://docs.example.com/a?b=c&d=1", "mcpgw://docs/file:///srv/a.md", "postgres://bob:pw@db/x",
])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False) | WORDS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WORDS | st.sampled_from(["a", "name", "_meta"]),
                                                                inner, max_size=3),
    max_leaves=10,
)


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["call", "call", "call", "batch", "other", "raw"]))
    if kind == "raw":
        return draw(st.sampled_from([b"", b"not json", b"[", b"{", b"  ", b"null", b'{"a":1,"a":2}']))
    message = {"jsonrpc": "2.0", "id": draw(st.integers(0, 99) | WORDS), "method": draw(st.sampled_from(
        ["tools/call", "resources/read", "ping"])), "params": draw(VALUES)}
    if draw(st.booleans()):
        message["error"] = draw(VALUES)
    value = [message, message] if kind == "batch" else (draw(VALUES) if kind == "other" else message)
    return json.dumps(value, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
                      ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def rows(draw) -> tuple:
    tenant = draw(st.sampled_from(TENANTS))
    body = draw(bodies())
    status = draw(st.sampled_from([200, 403, 502]))
    error = draw(st.none() | st.sampled_from(["", "Forbidden", "bad token Bearer abcdefghijklmnop", "x" * 3000]))
    server = draw(st.none() | st.sampled_from(["bench", "password-vault", "s" * 300]))
    row = trail().mcp_row(Key(tenant), server, "tools/call", "echo", body, status, None, error, 1.5, "127.0.0.1",
                          datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc))
    other = draw(st.sampled_from(["mcp", "mcp", "mcp", "admin", "dict", "text", "none", "with id"]))
    if other == "admin":
        row = row[:7] + (AdminDetails("POST", "/admin/keys", {}, body, status, None),) + row[8:]
    elif other == "dict":
        row = row[:7] + ({"status": status, "params": {"password": "hunter2"}},) + row[8:]
    elif other == "text":
        row = row[:7] + (DetailsText(b'{"status":200}'),) + row[8:]
    elif other == "none":
        row = row[:7] + (None,) + row[8:]
    elif other == "with id":
        row = (uuid.UUID(int=99),) + row[1:]
    return row


def comparable(row: tuple) -> tuple:
    details = row[7]
    text = details.text if hasattr(details, "text") else details
    return row[:7] + (type(details).__name__, text) + row[8:]


@settings(max_examples=400, deadline=None)
@given(batch=st.lists(rows(), min_size=1, max_size=8))
def test_the_rows_are_the_per_row_codes(batch):
    compiled, per_row = prepared_both_ways(batch)
    assert [comparable(row) for row in compiled] == [comparable(row) for row in per_row]


def test_a_plain_call_is_made_without_the_per_row_code():
    body = orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                         "params": {"name": "echo", "arguments": {"text": "hello"}}})
    rows = [trail().mcp_row(Key(tenant), "bench", "tools/call", "echo", body, 200, None, None, 2.5, "10.0.0.1",
                            datetime(2026, 11, 26, tzinfo=timezone.utc)) for tenant in TENANTS]
    made: list[tuple] = []

    def fallback(row, plain=None):
        raise AssertionError(f"a plain call went to the per-row code: {row!r}")

    def plain_of(tenant):
        return trail().sanitizer(tenant).screen.plain

    ids = iter(range(1, 10))
    auditentry.prepare_rows(rows, made, McpDetails, plain_of, fallback, lambda: uuid.UUID(int=next(ids)),
                            audit._TENANT, audit._DETAILS, audit._BOUNDED, audit.CLEANED_TEXTS, audit.clean_text,
                            audit._CREATED)
    assert [row[0] for row in made] == [uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)]
    for row in made:
        assert type(row[7]) is DetailsText
        assert row[7].value() == {"method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hello"}},
                                  "request_id": 3, "server": "bench", "status": 200}


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"password":"hunter2"}}',  # a secret name
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"customer_ref":"c-1"}}',  # the tenant's own name
    b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]',  # a batch
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"x":1.50}}',  # orjson writes 1.5: plain_details leaves it
])
def test_what_the_screen_or_plain_details_refuse_goes_to_the_per_row_code(body):
    row = trail().mcp_row(Key(TENANTS[1]), "bench", "tools/call", "echo", body, 200, None, None, 2.5, "10.0.0.1",
                          datetime(2026, 11, 26, tzinfo=timezone.utc))
    handed: list[tuple] = []
    made: list[tuple] = []
    auditentry.prepare_rows([row], made, McpDetails, lambda tenant: trail().sanitizer(tenant).screen.plain,
                            lambda row, plain=None: handed.append(row) or ("per-row",), lambda: uuid.UUID(int=1),
                            audit._TENANT,
                            audit._DETAILS, audit._BOUNDED, audit.CLEANED_TEXTS, audit.clean_text, audit._CREATED)
    assert handed == [row] and made == [("per-row",)]


def test_a_secret_in_an_error_or_server_name_is_cleaned_on_the_fast_path_too():
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}'
    row = trail().mcp_row(Key(TENANTS[0]), "vault Bearer abcdefghijklmnopqrstuvwxyz", "tools/call", "echo", body,
                          401, None, "refused: Bearer abcdefghijklmnopqrstuvwxyz", 2.5, "10.0.0.1",
                          datetime(2026, 11, 26, tzinfo=timezone.utc))
    compiled, per_row = prepared_both_ways([row])
    assert comparable(compiled[0]) == comparable(per_row[0])
    assert b"abcdefghijklmnopqrstuvwxyz" not in compiled[0][7].text
