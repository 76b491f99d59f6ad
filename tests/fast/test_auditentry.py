"""The audit chain's per-entry work (gateway._fast.auditentry): both twins write the same canonical head, find
the same whole floats, number and hash a batch the same way, and the hash is SHA-256 of
"<prev_hash>|<chain_seq>|<canonical>" whichever library computes it."""

from __future__ import annotations

import hashlib
import ssl
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from asyncpg.pgproto.pgproto import UUID as AsyncpgUUID
from hypothesis import given, settings
from hypothesis import strategies as st

TENANT_AT, DETAILS_AT, SEQ_AT = 1, 2, 4  # rows of (id, tenant, details, other, seq, prev, hash, tail)
WIDTH = 8
A, B = uuid.UUID(int=0xA), uuid.UUID(int=0xB)


def reference_hash(prev: str, seq: int, canonical: bytes) -> str:
    return hashlib.sha256(f"{prev}|{seq}|".encode() + canonical).hexdigest()


@settings(max_examples=300, deadline=None)
@given(prev=st.text(max_size=70), seq=st.integers(-(2**63), 2**63 - 1), canonical=st.binary(max_size=300))
def test_the_hash_is_sha256_of_the_three_pieces(compiled_auditentry, python_auditentry, prev, seq, canonical):
    expected = reference_hash(prev, seq, canonical)
    assert compiled_auditentry.entry_hash(prev, seq, canonical) == expected
    assert python_auditentry.entry_hash(prev, seq, canonical) == expected


def test_the_compiled_twin_hashes_with_libcrypto_itself(compiled_auditentry):
    # This Python has OpenSSL (ssl imports), so the compiled twin found the same libcrypto and passed its check.
    assert ssl.OPENSSL_VERSION
    assert compiled_auditentry.NATIVE_SHA256 is True
    assert compiled_auditentry.sha256_calls() == "plain"  # OpenSSL 1.0 to 3.x still export SHA256_*


def test_evp_calls_give_the_same_hashes(compiled_auditentry):
    # Where a libcrypto lacks the plain calls, the EVP ones hash: the same answer for every size around a block.
    assert compiled_auditentry._plain_calls(False) is False
    try:
        assert compiled_auditentry.sha256_calls() == "evp"
        for size in (0, 1, 55, 56, 63, 64, 65, 119, 120, 300, 4096):
            canonical = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
            assert compiled_auditentry.entry_hash("prev", size, canonical) == reference_hash("prev", size, canonical)
    finally:
        assert compiled_auditentry._plain_calls(True) is True


# Tenants as the rows hold them: the same object many times, an equal but distinct object, None (a chain too).
_TENANTS = st.sampled_from([A, A, B, uuid.UUID(int=0xA), None])


@st.composite
def batches(draw):
    tenants = draw(st.lists(_TENANTS, max_size=12))
    rows = [(uuid.UUID(int=i), tenant, {"n": i}, "x", None, None, None, i) for i, tenant in enumerate(tenants)]
    canonicals = [draw(st.binary(max_size=40)) for _ in rows]
    texts = draw(st.none() | st.just([f'{{"n": {i}}}' for i in range(len(rows))]))
    heads = draw(st.dictionaries(st.sampled_from([A, B, None]),
                                 st.tuples(st.integers(0, 2**62), st.text("0123456789abcdef", min_size=64,
                                                                          max_size=64)), max_size=3))
    return rows, canonicals, texts, heads


@settings(max_examples=300, deadline=None)
@given(batches())
def test_the_twins_find_the_same_tenants(compiled_auditentry, python_auditentry, batch):
    rows = batch[0]
    found = compiled_auditentry.tenants_in(rows, TENANT_AT)
    assert found == python_auditentry.tenants_in(rows, TENANT_AT) == {row[TENANT_AT] for row in rows}
    assert len(found) == len({row[TENANT_AT] for row in rows})  # equal but distinct objects once


def test_tenants_in_refuses_rows_too_short(compiled_auditentry):
    with pytest.raises(IndexError):
        compiled_auditentry.tenants_in([(None, A), (None,)], 1)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_the_twins_link_a_batch_alike(compiled_auditentry, python_auditentry, batch):
    rows, canonicals, texts, heads = batch
    ours, theirs = dict(heads), dict(heads)
    linked = compiled_auditentry.link(rows, ours, canonicals, texts, TENANT_AT, DETAILS_AT, SEQ_AT)
    assert linked == python_auditentry.link(rows, theirs, canonicals, texts, TENANT_AT, DETAILS_AT, SEQ_AT)
    assert ours == theirs
    # And what they agree on is the chain: each row after the previous one of its tenant.
    last = dict(heads)
    for i, row in enumerate(linked):
        seq, prev = last.get(row[TENANT_AT], (0, "0" * 64))
        assert row[SEQ_AT : SEQ_AT + 3] == (seq + 1, prev, reference_hash(prev, seq + 1, canonicals[i]))
        assert row[DETAILS_AT] == (texts[i] if texts is not None else rows[i][DETAILS_AT])
        assert row[:SEQ_AT] == (rows[i][0], rows[i][1], row[DETAILS_AT], rows[i][3]) and row[-1] == rows[i][-1]
        last[row[TENANT_AT]] = (seq + 1, row[SEQ_AT + 2])
    assert {tenant: last[tenant] for tenant in ours} == ours


def test_equal_tenant_objects_extend_one_chain(auditentry_impl):
    same = uuid.UUID(int=0xA)
    assert same is not A
    rows = [(uuid.uuid4(), tenant, None, None, None, None, None, None) for tenant in (A, same, A, None)]
    heads = {same: (41, "f" * 64)}
    linked = auditentry_impl.link(rows, heads, [b"x"] * 4, None, TENANT_AT, DETAILS_AT, SEQ_AT)
    assert [row[SEQ_AT] for row in linked] == [42, 43, 44, 1]
    assert linked[1][SEQ_AT + 1] == linked[0][SEQ_AT + 2]
    assert heads == {A: (44, linked[2][SEQ_AT + 2]), None: (1, linked[3][SEQ_AT + 2])}


def test_positions_past_a_rows_end_are_refused(auditentry_impl):
    rows = [(uuid.uuid4(), A, None)]
    with pytest.raises(IndexError):
        auditentry_impl.link(rows, {}, [b"x"], None, TENANT_AT, DETAILS_AT, SEQ_AT)


class _Other:
    """A value of a type orjson has no encoding for (as asyncpg's UUID): written as its str()."""

    def __str__(self) -> str:
        return "other-\u00e9"


# asyncpg's UUID (a uuid.UUID subclass): the ids of keys, users and tenants read from the database.
_ASYNCPG_UUIDS = st.uuids().map(lambda u: AsyncpgUUID(str(u)))
_IDS = st.one_of(st.none(), st.uuids(), _ASYNCPG_UUIDS, st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                 st.just(_Other()))
_TEXTS = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["mcp.tools/call", "USER", "127.0.0.1"]),
                   st.integers(), st.just(_Other()))
_TIMES = st.one_of(
    st.datetimes(timezones=st.just(timezone.utc)),
    st.datetimes(),  # naive: taken as UTC
    st.datetimes(timezones=st.sampled_from([timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(0))])),
    st.none(),
)
# Durations as the gateway records them: milliseconds to the microsecond (the compiled twin writes these
# without dtoa), and the edges of that path.
_MILLIS = st.one_of(st.integers(-(10**16), 10**16).map(lambda k: k / 1000),
                    st.sampled_from([0.0, -0.0, 0.001, -0.001, 1e12, -1e12, 999999999999.999, 0.1 + 0.2, 1e-4, 5e-324]))
_HEADS = st.tuples(
    _IDS, _IDS, _IDS, _IDS, _TEXTS, _TEXTS, _TEXTS, _TEXTS, _TEXTS, _TEXTS,
    st.one_of(st.none(), st.integers(-(2**70), 2**70), st.booleans()),
    st.one_of(st.none(), st.floats(), _MILLIS, st.integers(-(2**40), 2**40)),
    _TIMES,
)


def _outcome(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - the twins must fail alike too
        return type(exc)


@settings(max_examples=1000, deadline=None)
@given(values=_HEADS, version=st.sampled_from(["1", "2", "\u00e9"]))
def test_the_twins_write_the_same_head(compiled_auditentry, python_auditentry, values, version):
    expected = _outcome(python_auditentry.canonical_head, values, version)
    assert _outcome(compiled_auditentry.canonical_head, values, version) == expected
    # Twice: the compiled twin remembers the last id objects it wrote.
    assert _outcome(compiled_auditentry.canonical_head, values, version) == expected


def test_a_head_is_orjsons_array_of_the_columns(auditentry_impl):
    import orjson

    ids = [uuid.uuid4() for _ in range(4)]
    when = datetime(2026, 11, 26, 7, 0, 1, 250, tzinfo=timezone.utc)
    values = (*ids, "USER", "mcp.tools/call", "tool", 'say "hi"\n\x01', "198.51.100.7", "error", -32603, 12.5, when)
    head = auditentry_impl.canonical_head(values, "1")
    assert head == orjson.dumps(["1", *values], option=orjson.OPT_UTC_Z)
    assert orjson.loads(head)[-1] == "2026-11-26T07:00:01.000250Z"
    naive = auditentry_impl.canonical_head((*values[:-1], when.replace(tzinfo=None)), "1")
    shifted = auditentry_impl.canonical_head((*values[:-1], when.astimezone(timezone(timedelta(hours=-3)))), "1")
    assert naive == shifted == head


@settings(max_examples=2000, deadline=None)
@given(text=st.binary(max_size=12).map(lambda raw: bytes(b".0,}]e+x1"[byte % 9] for byte in raw)))
def test_the_whole_float_test_finds_every_form_orjson_writes(auditentry_impl, text):
    """A ".0" before a comma, a brace, a bracket or the end, or an "e+" exponent."""
    expected = b".0," in text or b".0}" in text or b".0]" in text or b"e+" in text or text.endswith(b".0")
    assert auditentry_impl.may_hold_whole_float(text) == expected


_NAMES = ("id", "tenant_id", "user_id", "api_key_id", "action", "details", "client_ip", "error_code", "duration_ms",
          "created_at")
_LINE_VALUES = st.one_of(
    st.none(), st.uuids(), _ASYNCPG_UUIDS, st.text(max_size=10), st.integers(-(2**70), 2**70), st.booleans(), st.floats(), _MILLIS,
    st.datetimes(timezones=st.just(timezone.utc)), st.datetimes(), st.just(_Other()),
    st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3), max_size=3),
)


@settings(max_examples=1000, deadline=None)
@given(values=st.lists(_LINE_VALUES, min_size=len(_NAMES), max_size=len(_NAMES) + 2).map(tuple),
       details_text=st.none() | st.just(b'{"params":{"q":"x"},"status":200}'))
def test_the_twins_write_the_same_log_line(compiled_auditentry, python_auditentry, values, details_text):
    expected = _outcome(python_auditentry.log_line, _NAMES, values, 5, details_text)
    assert _outcome(compiled_auditentry.log_line, _NAMES, values, 5, details_text) == expected
    if isinstance(expected, bytes):
        import orjson

        entry = {name: value for name, value in zip(_NAMES, values) if value is not None}
        if details_text is not None and "details" in entry:
            entry["details"] = orjson.loads(details_text)
        assert orjson.loads(expected) == orjson.loads(orjson.dumps(
            entry, default=str, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS))


def test_what_an_entry_holds_takes_the_compiled_path(compiled_auditentry):
    """Ids as the gateway holds them (uuid4s it drew, asyncpg's read from the database), texts, an int, a float,
    a UTC time: no head or line of them is left to the twin (that would be correct, and slower)."""
    when = datetime(2026, 11, 26, 7, 0, 1, 5, tzinfo=timezone.utc)
    values = (uuid.uuid4(), AsyncpgUUID(str(uuid.uuid4())), AsyncpgUUID(str(uuid.uuid4())), None, "USER",
              "mcp.tools/call", "tool", "echo", "203.0.113.9", "error", -32603, 0.125, when)
    before = compiled_auditentry.fallbacks()
    compiled_auditentry.canonical_head(values, "1")
    compiled_auditentry.log_line(_NAMES, values[:5] + (None, "x", -1, 2.5, when), 5, b"{}")
    assert compiled_auditentry.fallbacks() == before
    compiled_auditentry.canonical_head((*values[:-1], when.replace(tzinfo=None)), "1")  # naive: the twin's
    assert compiled_auditentry.fallbacks() == before + 1


class _Text(str):
    """A str subclass: cleaned without the cache, and always a plain str once cut."""


_BOUNDED_AT = ((2, 4), (3, 8), (5, 1))
_CELLS = st.one_of(st.none(), st.text(max_size=12), st.text(max_size=12).map(_Text), st.integers(), st.uuids())


@settings(max_examples=500, deadline=None)
@given(cells=st.lists(_CELLS, min_size=6, max_size=6), first=st.none() | st.uuids(),
       created=st.none() | st.datetimes() | st.datetimes(timezones=st.just(timezone.utc))
       | st.datetimes(timezones=st.just(timezone(timedelta(hours=2)))),
       cached=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4))
def test_the_twins_finish_a_row_alike(compiled_auditentry, python_auditentry, cells, first, created, cached):
    row = (first, *cells, created)
    new_id = uuid.UUID(int=7)
    calls: list = []

    def clean(text):
        calls.append(text)
        return text.upper() + "~" if isinstance(text, str) else text

    def run(implementation):
        calls.clear()
        return _outcome(implementation.finish_row, row, new_id, {"d": 1}, 1, _BOUNDED_AT, dict(cached), clean, 7), \
            list(calls)

    expected = run(python_auditentry)
    assert run(compiled_auditentry) == expected
    finished = expected[0]
    if isinstance(finished, tuple):
        assert finished[0] == (first if first is not None else new_id) and finished[1] == {"d": 1}
        assert all(type(finished[at]) is str and len(finished[at]) <= length
                   for at, length in _BOUNDED_AT if row[at] is not None)
        assert finished[7] is None or finished[7].tzinfo is not None


class _Caller:
    """A key as the request path holds it (KeyEntry or TokenPrincipal): what an audit row reads of it."""

    def __init__(self, tenant_id, user_id, key_id, role):
        self.tenant_id, self.user_id, self.id, self.role = tenant_id, user_id, key_id, role


@settings(max_examples=500, deadline=None)
@given(tenant=st.none() | st.uuids(), role=st.sampled_from(["USER", "ADMIN", None]),
       server=st.none() | st.sampled_from(["bench", "files"]),
       method=st.none() | st.text(max_size=8) | st.sampled_from(
           ["tools/call", "prompts/get", "resources/read", "resources/subscribe", "resources/unsubscribe", "tools/list",
            "ping", "POST", ""]),
       target=st.none() | st.sampled_from(["echo", "file:///a"]), body=st.sampled_from([b"", b"{}", b"[1]"]),
       status=st.sampled_from([200, 202, 399, 400, 429, 502]), error_code=st.none() | st.sampled_from([-32601, 0]),
       error=st.none() | st.sampled_from(["", "Forbidden"]), is_batch=st.booleans())
def test_the_twins_build_the_same_mcp_row(compiled_auditentry, python_auditentry, tenant, role, server, method,
                                          target, body, status, error_code, error, is_batch):
    caller = _Caller(tenant, uuid.UUID(int=2), uuid.UUID(int=3), role)
    now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)

    def row(implementation):
        made = implementation.mcp_row(implementation.McpDetails, caller, server, method, target, body, status,
                                      error_code, error, 1.25, "10.0.0.9", now, is_batch)
        details = made[7]
        assert type(details) is implementation.McpDetails
        return made[:7] + ((details.body, details.server, details.status, details.error),) + made[8:]

    expected = row(python_auditentry)
    assert row(compiled_auditentry) == expected
    assert len(expected) == 17 and expected[0] is None and expected[1] is tenant and expected[13] == role
    assert expected[9] == ("error" if status >= 400 or error_code is not None else "success")


def test_a_batch_is_one_entry_on_its_server(auditentry_impl):
    caller = _Caller(A, B, uuid.UUID(int=3), "USER")
    made = auditentry_impl.mcp_row(auditentry_impl.McpDetails, caller, "files", "tools/call", "echo", b"[{}]", 200,
                                   None, None, 1.0, None, datetime(2026, 1, 1, tzinfo=timezone.utc), True)
    assert made[4:7] == ("mcp.batch", "server", "files")


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.uuids(), min_size=4, max_size=4))
def test_asyncpgs_uuids_are_read_in_place_and_give_their_text(compiled_auditentry, python_auditentry, ids):
    """The compiled head reads an asyncpg UUID's bytes where the object keeps them (gw_uuid.h), not through
    `.bytes`: read either way, the head is the twin's."""
    assert compiled_auditentry.uuids_in_place(), "asyncpg's UUID layout was not found: ids go through .bytes"
    when = datetime(2026, 11, 27, 2, 0, 0, tzinfo=timezone.utc)
    values = (*(AsyncpgUUID(str(value)) for value in ids), "USER", "mcp.tools/call", "tool", "echo", "203.0.113.9",
              "success", None, 1.5, when)
    expected = python_auditentry.canonical_head(values, "1")
    try:
        for in_place in (True, False):
            compiled_auditentry._read_in_place(in_place)
            assert compiled_auditentry.uuids_in_place() is in_place
            assert compiled_auditentry.canonical_head(values, "1") == expected
    finally:
        compiled_auditentry._read_in_place(True)


class _WithText:
    """Details that carry their JSON text (as the writer's DetailsText does)."""

    def __init__(self, text) -> None:
        self.text = text


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(_LINE_VALUES, min_size=len(_NAMES), max_size=len(_NAMES)).map(tuple), max_size=6),
       texts=st.lists(st.none() | st.just(b'{"q":1}') | st.just("not bytes"), min_size=6, max_size=6))
def test_the_twins_write_a_batchs_lines_as_each_rows_line(compiled_auditentry, python_auditentry, rows, texts):
    """`log_lines` is `log_line` for each row, with the details' own text where their type carries one, and the
    fallback's line for a row `log_line` refuses (an int past 64 bits among the details, say)."""
    rows = [row[:5] + (_WithText(text),) + row[6:] if text is not None and at % 2 else row
            for at, (row, text) in enumerate(zip(rows, texts))]

    def fallback(row):
        return b"fallback:%d" % len(row)

    def each(module):
        lines = []
        for row in rows:
            details = row[5]
            text = details.text if type(details) is _WithText else None
            lines.append(_outcome(module.log_line, _NAMES, row, 5, text))
        return [line if isinstance(line, bytes) else fallback(row) for line, row in zip(lines, rows)]

    expected = each(python_auditentry)
    assert python_auditentry.log_lines(_NAMES, rows, 5, (_WithText,), fallback) == expected
    assert compiled_auditentry.log_lines(_NAMES, rows, 5, (_WithText,), fallback) == expected


_BOUND_CELLS = st.one_of(st.none(), st.text(max_size=12), st.text(max_size=12).map(_Text), st.integers(),
                         st.sampled_from(["secret-x", "ok", "a\x00b"]))


@settings(max_examples=500, deadline=None)
@given(rows=st.lists(st.lists(_BOUND_CELLS, min_size=4, max_size=4).map(tuple), max_size=8),
       cached=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4),
       lengths=st.tuples(st.integers(0, 12) | st.none(), st.integers(0, 12) | st.none()))
def test_the_twins_bound_a_batchs_texts_alike(compiled_auditentry, python_auditentry, rows, cached, lengths):
    """`bound_rows` cleans each text at a bounded position (the cache first), cuts it to its length (None: no
    bound), leaves None and the other positions alone, and keeps a row none of whose texts changed as the very
    same tuple."""
    def clean(text):
        return text.replace("secret", "[REDACTED]").replace("\x00", "\ufffd")

    bounded = ((1, lengths[0]), (3, lengths[1]))
    expected = python_auditentry.bound_rows(rows, bounded, dict(cached), clean)
    made = compiled_auditentry.bound_rows(rows, bounded, dict(cached), clean)
    assert made == expected
    for row, ours, theirs in zip(rows, made, expected):
        assert (ours is row) == (theirs is row)
        assert ours[0] is row[0] and ours[2] is row[2]
        for at, length in bounded:
            if row[at] is None:
                assert ours[at] is None
            else:
                text = cached.get(row[at]) if type(row[at]) is str else None
                text = clean(str(row[at])) if text is None else text
                assert ours[at] == text[:length] and type(ours[at]) is str


def test_bound_rows_takes_rows_of_any_sequence_and_refuses_short_ones(auditentry_impl):
    assert auditentry_impl.bound_rows([["a", "secret"]], ((1, 3),), {}, lambda t: t.upper()) == [("a", "SEC")]
    with pytest.raises(IndexError):
        auditentry_impl.bound_rows([("a",)], ((1, 3),), {}, str)


_AUDIT_ROW_CELLS = st.tuples(
    st.uuids() | _ASYNCPG_UUIDS, st.none() | st.uuids() | _ASYNCPG_UUIDS, st.none() | _ASYNCPG_UUIDS,
    st.none() | _ASYNCPG_UUIDS, st.sampled_from(["mcp.tools/call", "mcp.resources/read"]),
    st.none() | st.just("tool"), st.none() | st.text(max_size=8), st.sampled_from(["1.2.3.4", "::1"]),
    st.sampled_from(["success", "error"]), st.none() | st.integers(-(2**31), 2**31 - 1) | st.just("odd"),
    _MILLIS | st.integers(0, 9), st.datetimes(timezones=st.just(timezone.utc)) | st.datetimes(),
    st.sampled_from(["USER", "ADMIN"]),
    st.sampled_from([b'{"params":{"q":"x"},"status":200}', b'{"n":1.0}', b'{"s":"\xc3\xa9"}', b"{}"]),
)


def _audit_row(cells, details):
    # chain.COLUMNS: id, tenant_id, user_id, api_key_id, action, resource_type, resource_id, details, client_ip,
    # outcome, error_code, duration_ms, created_at, role, then the chain's three.
    return (*cells[:7], details, *cells[7:13], None, None, None)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(_AUDIT_ROW_CELLS, min_size=1, max_size=5))
def test_a_canonical_written_with_the_log_line_is_the_one_written_later(compiled_auditentry, python_auditentry,
                                                                        batch):
    """`log_lines`, told the head's columns and version, keeps each `DetailsText` row's canonical form in its
    details; `canonicals_into` takes it for that very row. The canonical forms (and details' texts) are those
    of rows whose details were never logged, in both twins, and so are the lines."""
    from gateway.records import chain

    names = tuple(str(name) for name in chain.COLUMNS[:14])  # plain str, as records/audit.py's (the compiled path)
    for module in (compiled_auditentry, python_auditentry):
        def run(log_first):
            rows = [_audit_row(cells, module.DetailsText(cells[-1])) for cells in batch]
            lines = None
            if log_first:
                lines = module.log_lines(names, rows, chain._ROW_DETAILS, (module.DetailsText,), lambda row: b"-",
                                         chain._ROW_HEAD, chain._FORMAT_VERSION)
            canonicals, texts = [], []
            module.canonicals_into(rows, 0, len(rows), chain._ROW_HEAD, chain._ROW_DETAILS, chain._FORMAT_VERSION,
                                   (module.DetailsText,), _slow_canonical(module), canonicals, texts)
            return lines, canonicals, texts

        logged, fresh = run(True), run(False)
        assert logged[1:] == fresh[1:]
        assert logged[0] == module.log_lines(names, [_audit_row(c, module.DetailsText(c[-1])) for c in batch],
                                             chain._ROW_DETAILS, (module.DetailsText,), lambda row: b"-")


def _slow_canonical(module):
    def slow(row):
        from gateway.records import chain

        head = python_head(module, tuple(row[at] for at in chain._ROW_HEAD))
        text = row[chain._ROW_DETAILS].text
        return head + b"\x1f" + text, text

    def python_head(module, values):
        return module.canonical_head(values, "1")

    return slow


def test_a_kept_canonical_serves_only_its_own_row_and_head(auditentry_impl):
    """Details logged in one row and found in another (equal but for its client address), or asked for with
    other head positions or another version, get their canonical form written afresh."""
    from gateway.records import chain

    when = datetime(2026, 11, 27, 3, 0, 0, tzinfo=timezone.utc)
    details = auditentry_impl.DetailsText(b'{"params":{},"status":200}')
    row = _audit_row((uuid.uuid4(), None, None, None, "mcp.tools/call", "tool", "echo", "1.2.3.4", "success",
                      None, 1.5, when, "USER"), details)
    auditentry_impl.log_lines(tuple(map(str, chain.COLUMNS[:14])), [row], chain._ROW_DETAILS,
                              (auditentry_impl.DetailsText,), None, chain._ROW_HEAD, chain._FORMAT_VERSION)
    other = row[:8] + ("5.6.7.8",) + row[9:]

    def canonical_of(rows, head_at=chain._ROW_HEAD, version=chain._FORMAT_VERSION):
        canonicals, texts = [], []
        auditentry_impl.canonicals_into(rows, 0, len(rows), head_at, chain._ROW_DETAILS, version,
                                        (auditentry_impl.DetailsText,), None, canonicals, texts)
        return canonicals[-1]

    def expected(of, version="1"):
        return auditentry_impl.canonical_head(tuple(of[at] for at in chain._ROW_HEAD), version) + b"\x1f" + \
            details.text

    assert canonical_of([row]) == expected(row)
    assert canonical_of([other]) == expected(other) != expected(row)
    assert canonical_of([row], head_at=tuple(list(chain._ROW_HEAD))) == expected(row)  # equal, another tuple
    assert canonical_of([row], version="2") == expected(row, "2")
