"""The audit trail's log lines ("dual logging"): what `gateway serve` writes, on its direct path and through
ordinary log records, must be the same entries in the same format."""

from __future__ import annotations

import io
import json
import logging
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config as config_module
from gateway.cli import configure_logging
from gateway.records.audit import AuditLogHandler, AuditTrail, audit_log

BODY = orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                     "params": {"name": "search", "arguments": {"q": "plain words", "api_key": "sk-hidden-value"}}})


@pytest.fixture
def audit_logger():
    saved = audit_log.handlers[:], audit_log.level, audit_log.propagate, audit_log.filters[:]
    root = logging.getLogger()
    root_saved = root.handlers[:], root.level
    yield audit_log
    audit_log.handlers[:], audit_log.level, audit_log.propagate, audit_log.filters[:] = saved
    root.handlers[:], _ = root_saved
    root.setLevel(root_saved[1])


def _rows(trail: AuditTrail, count: int) -> list[tuple]:
    key = SimpleNamespace(tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), id=uuid.uuid4(), role="USER")
    now = datetime.now(timezone.utc)
    return [trail.mcp_row(key, "demo", "tools/call", "search", BODY, 200, None, None, 1.5, "198.51.100.7", now)
            for _ in range(count)]


def _serve_logging(fmt: str) -> io.StringIO:
    """What `gateway serve` sets up (cli.configure_logging), writing to a buffer."""
    configure_logging(config_module.load(None, env={"GATEWAY_LOG_FORMAT": fmt}))
    stream = io.StringIO()
    handler = audit_log.handlers[0]
    assert type(handler) is AuditLogHandler
    handler.setStream(stream)
    return stream


class _Recording(AuditLogHandler):
    """The same handler through ordinary log records (a subclass is never given the direct path)."""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_direct_lines_equal_the_log_records_lines(audit_logger, fmt):
    stream = _serve_logging(fmt)
    trail = AuditTrail(log=True)
    prepared = trail.prepare(_rows(trail, 3))
    direct = stream.getvalue().splitlines()
    assert len(direct) == 3

    ordinary = _Recording(io.StringIO(), json_lines=fmt == "json")
    ordinary.setFormatter(audit_log.handlers[0].formatter)
    audit_log.handlers[:] = [ordinary]
    trail.prepare(prepared)  # prepared rows prepare to themselves: the same entries again
    recorded = ordinary.stream.getvalue().splitlines()
    assert len(recorded) == 3

    def parsed(line: str) -> dict:
        if fmt == "json":
            obj = json.loads(line)
            obj.pop("ts")
            return obj
        stamp, _, rest = line.partition(" INFO gateway.audit: ")
        assert len(stamp) == len("2026-11-26 06:00:00,000") and rest
        return json.loads(rest)

    assert [parsed(line) for line in direct] == [parsed(line) for line in recorded]
    entry = parsed(direct[0])["audit"] if fmt == "json" else parsed(direct[0])
    assert entry["id"] == str(prepared[0][0]) and entry["action"] == "mcp.tools/call"
    assert entry["details"]["params"]["arguments"] == {"q": "plain words", "api_key": "[REDACTED]"}
    assert "sk-hidden-value" not in stream.getvalue()


def test_a_filter_on_the_logger_sees_every_entry(audit_logger):
    stream = _serve_logging("json")
    seen = []
    audit_log.addFilter(lambda record: seen.append(record.audit["id"]) or True)
    trail = AuditTrail(log=True)
    prepared = trail.prepare(_rows(trail, 2))
    assert seen == [row[0] for row in prepared]  # the ordinary path: one record per entry
    assert len(stream.getvalue().splitlines()) == 2


def test_no_lines_when_the_log_is_off(audit_logger):
    stream = _serve_logging("json")
    audit_log.setLevel(logging.WARNING)  # [audit] log = false
    trail = AuditTrail(log=True)
    trail.prepare(_rows(trail, 2))
    assert stream.getvalue() == ""



def test_a_line_with_a_non_str_key_is_still_written():
    """Lines are encoded without OPT_NON_STR_KEYS (its slow path), and with it only when a key needs it. The
    sanitizer turns a prepared entry's keys into text; this is the encoder's own fallback."""
    from gateway.records.audit import _LOGGED, _dumps

    assert all(type(name) is str for name in _LOGGED)  # not SQLAlchemy's quoted_name: orjson's fast path
    assert _dumps({"details": {1: "int key", "s": uuid.UUID(int=5)}}) == (
        '{"details":{"1":"int key","s":"00000000-0000-0000-0000-000000000005"}}')


def test_each_entry_is_sanitized_with_its_own_tenants_names():
    # One batch of three tenants' entries, one tenant's rows holding equal but distinct UUID objects: the
    # batch's sanitizers are looked up per tenant (by object identity), never one tenant's for another's rows.
    first, second = uuid.uuid4(), uuid.uuid4()
    names = {first: ("q",), second: ()}
    trail = AuditTrail(log=False, tenant_names=lambda tenant: names.get(tenant, ("plain",)))
    now = datetime.now(timezone.utc)
    rows = []
    for tenant in (first, second, uuid.UUID(str(first)), None, second):
        key = SimpleNamespace(tenant_id=tenant, user_id=None, id=uuid.uuid4(), role="USER")
        rows.append(trail.mcp_row(key, "demo", "tools/call", "search", BODY, 200, None, None, 1.5, None, now))
    arguments = [row[7]["params"]["arguments"] for row in trail.prepare(rows)]
    assert [a["q"] for a in arguments] == ["[REDACTED]", "plain words", "[REDACTED]", "plain words", "plain words"]
    assert all(a["api_key"] == "[REDACTED]" for a in arguments)


_JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4) | st.integers(-(2**63), 2**63 - 1), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(details=_JSON_LIKE, present=st.lists(st.booleans(), min_size=14, max_size=14),
       when=st.datetimes(timezones=st.just(timezone.utc)))
def test_a_lines_entry_is_the_entry_dict_encoded(details, present, when):
    """The log line's JSON (`_entry_json`: `_fast/auditentry`'s `log_line`, None columns left out) parses to what
    the entry dict the log records carry encodes to, whatever the details and whichever columns are None."""
    from gateway.records.audit import _dumps, _entry, _entry_json

    values = [uuid.uuid4(), uuid.uuid4(), None, uuid.uuid4(), "mcp.tools/call", "tool", "é ✓ \x01", details,
              "203.0.113.9", "error", -32603, 12.5, when, "USER"]
    row = tuple(value if keep else None for value, keep in zip(values, present)) + (None, None, None)
    assert json.loads(_entry_json(row)) == json.loads(_dumps(_entry(row)))


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_lines_keep_their_order_on_a_binary_stream(audit_logger, encoding):
    """Entries written in batches (straight to a UTF-8 stream's binary buffer) and records formatted one by one
    (as text) come out in the order they were handed over, whole; another encoding gets text it can encode."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace", write_through=False)
    handler = AuditLogHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    stream.write("before\n")  # text already in the wrapper when the first batch goes to the buffer
    handler.write_entries([b'{"n":1}', '{"n":"\u00e9"}'.encode()])
    handler.emit(logging.LogRecord("gateway.audit", logging.INFO, "", 0, "record \u2713", None, None))
    handler.write_entries([b'{"n":3}'])
    handler.flush()
    lines = raw.getvalue().decode(encoding).splitlines()
    assert lines[0] == "before"
    assert [line.split(": ", 1)[1] for line in lines[1:3]] == ['{"n":1}', '{"n":"\u00e9"}']
    assert lines[3] == ("record \u2713" if encoding == "utf-8" else "record \\u2713")
    assert lines[4].endswith(': {"n":3}') and len(lines) == 5
