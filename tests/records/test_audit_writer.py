"""Audit entries through the writer: never dropped, spilled while PostgreSQL is away, replayed once and
in order, chained per tenant, and a chain that was tampered with is named at its first broken link.

The outages are real: the writer reaches PostgreSQL through tests/tcp_relay.py, which cuts every
connection and refuses new ones until restored. Rows are read over a separate, direct connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import sqlalchemy as sa
from tcp_relay import TcpRelay

from harness import verify_chains
from gateway._fast import auditentry
from gateway.db import tables
from gateway.db.engine import create_engine, create_pg_pool
from gateway.records import chain
from gateway.records.sinks import PostgresSink, sink_for
from gateway.records.spill import Spill
from gateway.records.writer import COLUMNS, RecordWriter

UTC = timezone.utc
AUDIT = COLUMNS["audit_logs"]
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def entry(tenant: uuid.UUID | None, i: int, **overrides) -> tuple:
    values = dict.fromkeys(AUDIT)
    values.update(
        id=uuid.uuid4(), tenant_id=tenant, user_id=uuid.uuid4(), api_key_id=uuid.uuid4(), action="mcp.tools/call",
        resource_type="tool", resource_id=f"tool-{i % 5}", details={"i": i, "args": {"q": "x", "n": i / 7}},
        client_ip="192.0.2.1", outcome="success" if i % 9 else "error", error_code=None if i % 9 else -32603,
        duration_ms=i / 3, created_at=BASE + timedelta(milliseconds=i), role="USER",
    )
    values.update(overrides)
    return tuple(values[name] for name in AUDIT)


def request_log(i: int) -> tuple:
    values = dict.fromkeys(COLUMNS["request_logs"])
    values.update(id=uuid.uuid4(), status_code=200, created_at=BASE, method="tools/call", duration_ms=1.0,
                  request_bytes=10, response_bytes=20)
    return tuple(values[name] for name in COLUMNS["request_logs"])


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.05)


async def stored(pg_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetch("SELECT id, tenant_id, chain_seq, details->>'i' AS i FROM audit_logs "
                                "ORDER BY tenant_id, chain_seq")
    finally:
        await conn.close()


verify_all = verify_chains  # tests/harness.py


def through(relay: TcpRelay, url: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{relay.port}"))


@pytest.fixture
async def relay(pg_url: str):
    parts = urlsplit(pg_url)
    relay = await TcpRelay(parts.hostname, parts.port or 5432).start()
    yield relay
    await relay.stop()


@pytest.fixture
async def relayed_sink(relay: TcpRelay, pg_url: str):
    sink = PostgresSink(await create_pg_pool(through(relay, pg_url), max_size=2), timeout=5.0)
    yield sink
    await sink.close()


@pytest.fixture
async def make_sink():
    """`await make_sink(url)`: a sink closed at teardown, also when the test fails (an open pool would hang it)."""
    opened = []

    async def make(url: str):
        sink = await sink_for(url)
        opened.append(sink)
        return sink

    yield make
    for sink in opened:
        await sink.close()


def spill_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".spill")) if directory.exists() else []


# ------------------------------------------------------------------ never dropped


async def test_audit_rows_are_accepted_when_the_queue_is_full(pg_url, tmp_path, make_sink):
    sink = await make_sink(pg_url)
    writer = RecordWriter(sink, max_queue=10, batch_size=4, spill=Spill(tmp_path, pg_url))
    logs = [writer.submit("request_logs", request_log(i)) for i in range(15)]
    tenant = uuid.uuid4()
    audits = [writer.submit("audit_logs", entry(tenant, i)) for i in range(20)]
    assert logs == [True] * 10 + [False] * 5  # request logs: refused and counted
    assert audits == [True] * 20  # audit: never refused
    await writer.start()
    await writer.stop()
    rows = await stored(pg_url)
    assert [int(r["i"]) for r in rows] == list(range(20))
    stats = writer.stats
    assert (stats.written, stats.dropped, stats.queued) == (30, 5, 0)
    assert stats.submitted == 35


# ------------------------------------------------------------------ outages


async def test_an_outage_during_a_burst_loses_no_entry_and_duplicates_none(
    relay: TcpRelay, relayed_sink: PostgresSink, pg_url: str, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="gateway.records")
    spill_dir = tmp_path / "spill"
    writer = RecordWriter(relayed_sink, batch_size=50, flush_interval=0.05, spill=Spill(spill_dir, pg_url))
    await writer.start()
    tenants = [uuid.uuid4() for _ in range(3)]
    submitted: dict[uuid.UUID, list[uuid.UUID]] = {t: [] for t in tenants}
    counter = 0

    def burst(n: int) -> None:
        nonlocal counter
        for _ in range(n):
            row = entry(tenants[counter % 3], counter)
            submitted[row[1]].append(row[0])
            assert writer.submit("audit_logs", row)
            writer.submit("request_logs", request_log(counter))
            counter += 1

    burst(300)
    await writer.flush()
    relay.cut()
    for _ in range(20):  # traffic keeps coming while PostgreSQL is away
        burst(40)
        await asyncio.sleep(0.05)

    async def spilled() -> bool:
        return writer.stats.spilled_total >= 500 and writer.stats.spilled > 0

    await eventually(spilled)
    assert spill_files(spill_dir), "the entries are on disk, not only in memory"
    assert len(await stored(pg_url)) == 300

    relay.restore()
    burst(100)  # and after it: these must come after the spilled ones in each chain

    async def all_in() -> bool:
        return len(await stored(pg_url)) == counter

    await eventually(all_in, timeout=30.0)
    await writer.flush()
    rows = await stored(pg_url)
    assert len({r["id"] for r in rows}) == len(rows) == counter == 1200
    for tenant in tenants:
        in_chain = [r for r in rows if r["tenant_id"] == tenant]
        assert [r["chain_seq"] for r in in_chain] == list(range(1, len(in_chain) + 1))
        assert [r["id"] for r in in_chain] == submitted[tenant]  # the order they were submitted in
    assert all(report.ok for report in await verify_all(pg_url))
    assert spill_files(spill_dir) == []  # deleted once replayed
    stats = writer.stats
    assert stats.spilled == 0 and stats.queued == 0
    assert stats.submitted == stats.written + stats.dropped  # request logs may have been held, never lost here
    await writer.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.records"]
    assert any("go to the spill" in m for m in messages) and any("audit spill replayed" in m for m in messages)


async def test_stop_with_the_database_away_spills_and_the_next_process_replays(
    relay: TcpRelay, relayed_sink: PostgresSink, pg_url: str, tmp_path, make_sink
):
    spill_dir = tmp_path / "spill"
    writer = RecordWriter(relayed_sink, flush_interval=60, spill=Spill(spill_dir, pg_url))
    await writer.start()
    relay.cut()
    tenant = uuid.uuid4()
    rows = [entry(tenant, i) for i in range(50)]
    for row in rows:
        writer.submit("audit_logs", row)
        writer.submit("request_logs", request_log(0))
    started = time.monotonic()
    await writer.stop(timeout=1.0)
    assert time.monotonic() - started < 5
    stats = writer.stats
    assert stats.spilled_total == 50 and stats.dropped == 50  # audit spilled; request logs given up
    assert spill_files(spill_dir)
    relay.restore()

    # The next process (here: a writer with a spill of its own in the same directory) finds and replays it.
    sink = await make_sink(pg_url)
    successor = RecordWriter(sink, flush_interval=0.05, spill=Spill(spill_dir, pg_url))
    await successor.start()
    await successor.flush()
    assert [r["id"] for r in await stored(pg_url)] == [row[0] for row in rows]
    assert successor.stats.recovered == 50
    assert spill_files(spill_dir) == []
    await successor.stop()


async def test_a_torn_spill_line_is_ignored_and_the_rest_replayed(pg_url: str, tmp_path, caplog, make_sink):
    caplog.set_level(logging.WARNING, logger="gateway.records")
    dead = Spill(tmp_path, pg_url)
    tenant = uuid.uuid4()
    rows = [entry(tenant, i) for i in range(10)]
    dead.append(rows)
    segment = dead.pending[0][0]
    dead.close()  # the process died...
    with open(segment, "ab") as fh:  # ...in the middle of writing its next line
        fh.write(b'1234abcd {"id": "6f1c')

    sink = await make_sink(pg_url)
    writer = RecordWriter(sink, spill=Spill(tmp_path, pg_url))
    await writer.start()
    await writer.flush()
    assert [r["id"] for r in await stored(pg_url)] == [row[0] for row in rows]
    assert any("1 torn or damaged lines ignored" in r.getMessage() for r in caplog.records)
    await writer.stop()


async def test_replay_skips_entries_already_written(pg_url: str, tmp_path, make_sink):
    """A batch whose commit was not acknowledged is spilled and comes back: its rows go in once."""
    tenant = uuid.uuid4()
    rows = [entry(tenant, i) for i in range(30)]
    sink = await make_sink(pg_url)
    await sink.write("audit_logs", AUDIT, rows[:20])  # committed, the answer lost
    dead = Spill(tmp_path, pg_url)
    dead.append(rows[10:])  # spilled anyway, with ten more
    dead.close()
    writer = RecordWriter(sink, spill=Spill(tmp_path, pg_url))
    await writer.start()
    await writer.flush()
    stored_rows = await stored(pg_url)
    assert [r["id"] for r in stored_rows] == [row[0] for row in rows]
    assert [r["chain_seq"] for r in stored_rows] == list(range(1, 31))
    assert all(report.ok for report in await verify_all(pg_url))
    await writer.stop()


# ------------------------------------------------------------------ chains


async def test_writers_of_several_processes_extend_one_chain(pg_url: str, tmp_path, make_sink):
    tenant = uuid.uuid4()
    sinks = [await make_sink(pg_url) for _ in range(3)]
    writers = [RecordWriter(s, batch_size=25, flush_interval=0.01, spill=Spill(tmp_path / str(i), pg_url))
               for i, s in enumerate(sinks)]
    for writer in writers:
        await writer.start()
    for i in range(600):
        writers[i % 3].submit("audit_logs", entry(tenant, i))
        writers[(i + 1) % 3].submit("audit_logs", entry(None, i))  # the chain of entries without a tenant
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    for writer in writers:
        await writer.stop()
    rows = await stored(pg_url)
    for who in (tenant, None):
        seqs = [r["chain_seq"] for r in rows if r["tenant_id"] == who]
        assert seqs == list(range(1, 601))
    reports = await verify_all(pg_url)
    assert [(r.tenant_id, r.entries, r.ok) for r in reports] == [(None, 600, True), (tenant, 600, True)]


async def test_a_batch_larger_than_a_link_slice_keeps_every_chain_whole(pg_url: str):
    # The sink numbers, hashes and encodes a big batch a slice at a time, giving the loop back between
    # slices; each chain must go on across the slices as if the batch were one.
    from gateway.records import sinks

    sink = PostgresSink(await create_pg_pool(pg_url, max_size=1))
    tenants = [uuid.uuid4(), uuid.uuid4(), None]
    size = 2 * sinks._LINK_CHUNK + sinks._COPY_CHUNK + 7
    try:
        for batch in range(2):
            rows = [entry(tenants[i % 3], batch * size + i) for i in range(size)]
            await sink.write("audit_logs", AUDIT, rows)
    finally:
        await sink.close()
    found = await stored(pg_url)
    for tenant in tenants:
        mine = [r for r in found if r["tenant_id"] == tenant]
        assert [r["chain_seq"] for r in mine] == list(range(1, len(mine) + 1))
        assert [int(r["i"]) for r in mine] == [i for i in range(2 * size) if tenants[i % size % 3] == tenant]
    reports = await verify_all(pg_url)
    assert all(r.ok for r in reports) and sum(r.entries for r in reports) == 2 * size


async def test_a_batch_takes_its_chains_locks_and_heads_in_a_statement_each(pg_url: str):
    # A batch holds entries of many tenants in production: locking and reading each chain's head with a
    # statement of its own cost two round trips per tenant per batch.
    sink = PostgresSink(await create_pg_pool(pg_url, max_size=1))
    statements: list[str] = []
    async with sink.pool.acquire() as conn:
        conn.add_query_logger(lambda record: statements.append(record.query))
    tenants = [uuid.uuid4() for _ in range(40)]
    counts = []
    try:
        for batch, spread in enumerate((2, 2, 40, 40)):  # the first batch also reads the table's column types
            statements.clear()
            rows = [entry(tenants[i % spread] if i % 7 else None, 200 * batch + i) for i in range(200)]
            await sink.write("audit_logs", AUDIT, rows)
            counts.append(len(statements))
    finally:
        await sink.close()
    assert counts[1] == counts[2] == counts[3] <= 6, (counts, statements)
    reports = await verify_all(pg_url)
    assert len(reports) == 41 and all(report.ok for report in reports)
    assert sum(report.entries for report in reports) == 800


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


async def test_a_batch_that_comes_again_goes_in_once(database_url: str, make_sink, caplog):
    """A batch whose commit was not acknowledged comes again (the writer's retry, a replayed spill), with more
    rows: each sink skips what is in, and numbers the rest after it."""
    caplog.set_level(logging.INFO, logger="gateway.records")
    tenant = uuid.uuid4()
    rows = [entry(tenant, i) for i in range(30)]
    sink = await make_sink(database_url)
    await sink.write("audit_logs", AUDIT, rows[:20])
    await sink.write("audit_logs", AUDIT, rows[10:])
    audit = tables.audit_logs
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            found = (await conn.execute(sa.select(audit.c.id, audit.c.chain_seq).order_by(audit.c.chain_seq))).all()
    finally:
        await engine.dispose()
    assert [row[0] for row in found] == [row[0] for row in rows]
    assert [row[1] for row in found] == list(range(1, 31))
    assert all(report.ok for report in await verify_all(database_url))
    assert any("skipped 10 entries already in the database" in r.getMessage() for r in caplog.records)


async def test_verify_names_the_first_broken_link(database_url: str, tmp_path, make_sink):
    changed, deleted, rewritten, clean = (uuid.uuid4() for _ in range(4))
    sink = await make_sink(database_url)
    for tenant in (changed, deleted, rewritten, clean):
        await sink.write("audit_logs", AUDIT, [entry(tenant, i) for i in range(10)])
        await sink.write("audit_logs", AUDIT, [entry(tenant, i) for i in range(10, 20)])
    assert all(report.ok for report in await verify_all(database_url))

    audit = tables.audit_logs
    engine = create_engine(database_url)

    def at(tenant, seq):
        return sa.and_(audit.c.tenant_id == tenant, audit.c.chain_seq == seq)

    async with engine.begin() as conn:
        ids = {tenant: (await conn.execute(sa.select(audit.c.id).where(at(tenant, 7)))).scalar_one()
               for tenant in (changed, deleted, rewritten)}
        # One value changed in place.
        await conn.execute(sa.update(audit).where(at(changed, 7)).values(details={"i": 7, "args": {"q": "y"}}))
        # One entry removed from the middle.
        await conn.execute(sa.delete(audit).where(at(deleted, 7)))
        # One changed, its hash recomputed to match: the next link still names it.
        row = (await conn.execute(sa.select(audit).where(at(rewritten, 7)))).mappings().one()
        forged = dict(row, outcome="error")
        details_text = (await conn.execute(
            sa.select(sa.cast(audit.c.details, sa.Text)).where(at(rewritten, 7)))).scalar_one()
        digest = chain.entry_hash(row["prev_hash"], 7, chain.canonical(forged, details_text))
        await conn.execute(sa.update(audit).where(at(rewritten, 7)).values(outcome="error", entry_hash=digest))
    next_id = await _id_at(engine, deleted, 8)
    rewritten_next = await _id_at(engine, rewritten, 8)
    await engine.dispose()

    reports = {r.tenant_id: r for r in await verify_all(database_url)}
    assert reports[clean].ok and reports[clean].entries == 20
    bad = reports[changed]
    assert (bad.broken_seq, bad.broken_entry, bad.entries) == (7, ids[changed], 6)
    assert "does not match the entry's contents" in bad.reason
    bad = reports[deleted]
    assert (bad.broken_seq, bad.broken_entry) == (8, next_id)
    assert "chain_seq 7 missing" in bad.reason
    bad = reports[rewritten]
    assert (bad.broken_seq, bad.broken_entry) == (8, rewritten_next)
    assert "differs from the entry_hash" in bad.reason

    # The command: one line per chain, the broken ones named, exit status 1 (0 for a clean tenant).
    env = {**os.environ, "GATEWAY_DATABASE_URL": database_url}
    done = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert f"broken tenant={changed} chain_seq=7 entry={ids[changed]} " in "\n".join(lines)
    assert any(line.startswith(f"broken tenant={deleted} chain_seq=8 entry={next_id}") for line in lines)
    assert any(line.startswith(f"ok tenant={clean} entries=20 chain_seq=1..20 head=") for line in lines)
    done = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--tenant", str(clean)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"ok tenant={clean} entries=20"), done


async def test_a_chain_may_start_only_where_retention_left_its_anchor(pg_url: str, make_sink):
    tenant = uuid.uuid4()
    sink = await make_sink(pg_url)
    await sink.write("audit_logs", AUDIT, [entry(tenant, i) for i in range(10)])
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO tenants (id, name, status, settings, is_platform, weight, created_at, "
                           "updated_at) VALUES ($1, 'anchored', 'active', '{}', false, 100, now(), now())", tenant)
        last = await conn.fetchrow("SELECT chain_seq, entry_hash FROM audit_logs WHERE tenant_id = $1 AND "
                                   "chain_seq = 3", tenant)
        await conn.execute("DELETE FROM audit_logs WHERE tenant_id = $1 AND chain_seq <= 3", tenant)
        (report,) = await _verify(pg_url, tenant)
        assert report.broken_seq == 4 and "left no anchor" in report.reason
        # What retention (records/retention.py) records when it deletes a chain's oldest end.
        await conn.execute(
            "INSERT INTO system_config (id, tenant_id, key, category, value, sensitive, runtime, version, "
            "created_at, updated_at) VALUES ($1, $2, 'records.audit_anchor', 'records', $3::jsonb, false, false, 1, "
            "now(), now())", uuid.uuid4(), tenant,
            f'{{"chain_seq": {last["chain_seq"]}, "entry_hash": "{last["entry_hash"]}"}}',
        )
        (report,) = await _verify(pg_url, tenant)
        assert report.ok and (report.first_seq, report.last_seq, report.entries) == (4, 10, 7)
        await conn.execute("DELETE FROM audit_logs WHERE tenant_id = $1 AND chain_seq = 4", tenant)
        (report,) = await _verify(pg_url, tenant)
        assert report.broken_seq == 5 and "anchor is chain_seq 3" in report.reason
    finally:
        await conn.close()


async def _verify(url: str, tenant: uuid.UUID) -> list[chain.ChainReport]:
    engine = create_engine(url)
    try:
        return await chain.verify(engine, tenant)
    finally:
        await engine.dispose()


async def _id_at(engine, tenant, seq) -> uuid.UUID:
    audit = tables.audit_logs
    async with engine.connect() as conn:
        return (await conn.execute(
            sa.select(audit.c.id).where(audit.c.tenant_id == tenant, audit.c.chain_seq == seq))).scalar_one()


def test_the_canonical_form_reads_numbers_as_the_database_prints_them():
    """jsonb prints 1e300 as 301 digits and -0.0 as 0.0: the hash must not change with it."""
    assert chain.canonical_details('{"a": 1e300, "b": -0.0, "c": 1e-7, "d": 1.50, "e": [2, 2.0]}') == \
        chain.canonical_details('{"e": [2.0, 2], "d": 1.5, "c": 0.0000001, "b": 0.0, "a": ' + "1" + "0" * 300 + "}")
    assert chain.canonical_details(None) != chain.canonical_details("null")
    assert chain.canonical_details('{"a": "x"}') != chain.canonical_details('{"a": "y"}')


def test_the_fast_canonical_form_is_the_one_read_back():
    """What the writer hashes without a round trip equals what the verifier computes from the stored text."""
    from gateway.records.sinks import encode_json

    values = [
        {"a": 1e300, "b": -0.0, "c": 1e-7, "d": 1.5, "e": [2, 2.0, 0.1, 123456789.123, 5e-324, 1e16, -3]},
        {"z": {"y": [True, False, None, "é ✓ \\n \" \\u2028"], "x": float("nan"), "w": float("inf")}},
        {"n": 2**63 - 1, "m": -(2**63), "zero": 0, "k": ""},
        [1, "two", {"three": 3.0}],
        "plain", 7, 7.25, None, True,
        {1: "int key", "s": "str key"},  # not what a prepared entry holds: the slow path, same answer
    ]
    for value in values:
        assert chain.details_canonical(value, encode_json) == chain.canonical_details(encode_json(value)), value


def test_the_writers_one_pass_canonical_form_is_the_reference_one():
    """`row_canonical_and_json` (what the PostgreSQL sink hashes) equals `row_canonical`, and its text holds the
    same details; rows of every origin: prepared now, read back (naive time, text ids), replayed (int duration)."""
    from gateway.records.sinks import encode_json

    tenant = uuid.uuid4()
    details_values = [
        {"status": 200, "params": {"a": 1e300, "b": -0.0, "c": [2, 2.0, 0.1], "d": "é ✓"}},
        {"status": 500, "error": "x", "n": 2**63 - 1}, None, [1, {"two": 2.0}], {1: "int key"},
    ]
    rows = []
    for i, details in enumerate(details_values):
        rows.append(entry(tenant, i, details=details))
        rows.append(entry(tenant, i, details=details, duration_ms=3, created_at=datetime(2026, 11, 26, 7, 0, 1)))
        rows.append(entry(None, i, details=details, id=str(uuid.uuid4()),
                          created_at=datetime(2026, 11, 26, 8, 0, tzinfo=timezone(timedelta(hours=1)))))
    for row in rows:
        body, text = chain.row_canonical_and_json(row)
        assert body == chain.row_canonical(row, encode_json), row
        details = row[COLUMNS["audit_logs"].index("details")]
        assert (text is None) == (details is None)
        if text is not None:
            assert chain.canonical_details(text) == chain.canonical_details(encode_json(details))


def test_prepared_details_are_encoded_once_and_hash_as_any_other():
    """`prepare` leaves each entry's details encoded (chain.EncodedDetails.text, for the log line and the writer),
    or, for a plain call the compiled core writes from the body, only as that text (chain.DetailsText); the
    canonical form made from that text is the reference one, floats and non-text keys included."""
    from gateway.records.audit import AuditTrail
    from gateway.records.sinks import encode_json

    trail = AuditTrail(log=False)
    key = SimpleNamespace(tenant_id=uuid.uuid4(), user_id=None, id=uuid.uuid4(), role="USER")
    now = datetime.now(timezone.utc)
    bodies = [b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"x":2.0,"y":1e16}}}',
              b'{"jsonrpc":"2.0","id":2,"method":"ping"}', b"not json", b""]
    rows = trail.prepare([trail.mcp_row(key, "s", "tools/call", "t", body, 200, None, None, 1.5, None, now)
                          for body in bodies])
    rows.append(trail.prepare([entry(key.tenant_id, 9, details={1: "int key", "f": 3.0})])[0])
    kinds = []
    for row in rows:
        details = row[COLUMNS["audit_logs"].index("details")]
        kinds.append(type(details))
        value = details.value() if type(details) is chain.DetailsText else details
        assert type(details) in chain.TEXT_TYPES and details.text == orjson.dumps(
            value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        body, text = chain.row_canonical_and_json(row)
        assert body == chain.row_canonical(row, encode_json), row
        assert chain.canonical_details(text) == chain.canonical_details(encode_json(details))
    # The ping is a plain call: written from its body where the compiled core is, decoded and built elsewhere.
    plain = chain.DetailsText if auditentry.COMPILED else chain.EncodedDetails
    assert kinds == [chain.EncodedDetails, plain, chain.EncodedDetails, chain.EncodedDetails, chain.EncodedDetails]


def _entry_implementations():
    import importlib

    from gateway._fast import is_extension_module

    found = [importlib.import_module("gateway._fast.auditentry_py")]
    compiled = importlib.import_module("gateway._fast.auditentry_c")
    if is_extension_module(compiled):
        found.append(compiled)
    return found


@settings(max_examples=300, deadline=None)
@given(details=st.lists(st.none() | st.dictionaries(st.text(max_size=3), st.floats() | st.integers(-(2**63), 2**63 - 1)
                                                     | st.text(max_size=4), max_size=3), min_size=1, max_size=6),
       encoded=st.lists(st.sampled_from(["dict", "encoded", "text"]), min_size=6, max_size=6),
       naive=st.booleans(), text_ids=st.booleans())
def test_a_batchs_canonical_forms_are_each_rows_one_pass_form(details, encoded, naive, text_ids):
    """`row_canonicals` (`_fast/auditentry.canonicals_into`, both twins) gives each row what
    `row_canonical_and_json` gives it: details encoded by `prepare`, kept as text (`DetailsText`: never a
    float) or neither, whole floats or not, values the compiled head leaves to its twin (a naive time, ids as
    text). However the details are held, the canonical form is the one of the plain dict."""
    rows, plain = [], []
    for i, value in enumerate(details):
        created = BASE.replace(tzinfo=None) if naive else BASE
        rows.append(entry(uuid.uuid4(), i, details=value, created_at=created,
                          **({"user_id": str(uuid.uuid4())} if text_ids else {})))
        plain.append(rows[-1])
        if value is not None and encoded[i] == "encoded":
            held = chain.EncodedDetails(value)
            held.encode()
        elif value is not None and encoded[i] == "text" and not any(type(v) is float for v in value.values()):
            held = chain.DetailsText(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
        else:
            continue
        rows[-1] = rows[-1][: chain._ROW_DETAILS] + (held,) + rows[-1][chain._ROW_DETAILS + 1 :]
    expected = [chain.row_canonical_and_json(row) for row in rows]
    assert [c for c, _ in expected] == [chain.row_canonical_and_json(row)[0] for row in plain]
    for implementation in _entry_implementations():
        canonicals, texts = [], []
        for start in range(0, len(rows), 4):
            implementation.canonicals_into(rows, start, min(start + 4, len(rows)), chain._ROW_HEAD, chain._ROW_DETAILS,
                                           chain._FORMAT_VERSION, chain.TEXT_TYPES, chain.row_canonical_and_json,
                                           canonicals, texts)
        assert list(zip(canonicals, texts)) == expected, implementation.__name__
    assert asyncio.run(chain.row_canonicals(rows, chunk=2)) == ([c for c, _ in expected], [t for _, t in expected])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.floats(allow_nan=False) | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=6))
def test_the_one_pass_canonical_form_for_any_numbers(numbers):
    from gateway.records.sinks import encode_json

    row = entry(uuid.uuid4(), 1, details={"params": {"values": numbers, "one": numbers[0] if numbers else 0.0}})
    assert chain.row_canonical_and_json(row)[0] == chain.row_canonical(row, encode_json)


async def test_an_empty_batch_writes_nothing_and_refuses_nothing(pg_url: str, make_sink):
    sink = await make_sink(pg_url)
    await sink.write("audit_logs", AUDIT, [])
    await sink.write("request_logs", COLUMNS["request_logs"], [])
    assert await stored(pg_url) == []


async def test_plain_calls_in_other_languages_and_with_addresses_are_stored_and_chained(database_url: str,
                                                                                        make_sink):
    """The calls the screen and `plain_details` now take (UTF-8 past ASCII, "://" without an "@", the usual
    escapes, floats written as orjson writes them) are stored with the details the general path would give, and
    their chain verifies, in both databases."""
    from gateway.records.audit import AuditTrail

    trail = AuditTrail(new_id=uuid.uuid4, log=False)
    key = SimpleNamespace(tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), id=uuid.uuid4(), role="USER")
    calls = [
        ("tools/call", "ask", {"name": "ask", "arguments": {"question": "Quelle m\u00e9t\u00e9o \u00e0 Paris ?",
                                                            "\u8a00\u8a9e": "\u65e5\u672c\u8a9e \U0001f600"}}),
        ("tools/call", "fetch", {"name": "fetch", "arguments": {"url": "https://docs.example.com/a?b=c&d=1"}}),
        ("resources/read", "mcpgw://docs/file:///srv/d.md", {"uri": "mcpgw://docs/file:///srv/d.md"}),
        ("tools/call", "write_file", {"name": "write_file", "arguments": {
            "path": "C:\\notes.md", "content": '# Notes\n\n- "fix" the\tlogin\r\n\b\f'}}),
        ("tools/call", "generate", {"name": "generate", "arguments": {
            "temperature": 0.7, "top_p": 0.95, "at": [37.7749, -122.4194], "min": 0.0001, "big": 123456789012.345}}),
    ]
    rows = []
    for i, (method, target, params) in enumerate(calls):
        body = orjson.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params})
        rows.append(trail.mcp_row(key, "docs", method, target, body, 200, None, None, 1.5, "192.0.2.1",
                                  BASE + timedelta(seconds=i)))
    prepared = trail.prepare(rows)
    at = AUDIT.index("details")
    assert [type(row[at]) for row in prepared] == [chain.DetailsText] * len(calls)  # the fast path, each
    sink = await make_sink(database_url)
    await sink.write("audit_logs", AUDIT, prepared)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            found = (await conn.execute(sa.select(tables.audit_logs.c.details)
                                        .order_by(tables.audit_logs.c.chain_seq))).scalars().all()
    finally:
        await engine.dispose()
    found = [orjson.loads(value) if isinstance(value, str) else value for value in found]
    assert [details["params"] for details in found] == [params for _, _, params in calls]
    assert [details["status"] for details in found] == [200] * len(calls)
    reports = await verify_all(database_url)
    assert all(report.ok for report in reports) and sum(report.entries for report in reports) == len(calls)


async def test_a_huge_call_is_stored_cut_and_chained(database_url: str, make_sink):
    """A 4 MB call of marker words: its entry keeps MAX_DETAILS of it, cleaned, marked as cut, and chains."""
    from gateway.records import sanitize
    from gateway.records.audit import AuditTrail

    trail = AuditTrail(new_id=uuid.uuid4, log=False)
    key = SimpleNamespace(tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), id=uuid.uuid4(), role="USER")
    line = ("token=abc key: 1 pass=b Bearer c0ffee " * 30)[:1000]
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                         "params": {"name": "w", "arguments": {"x": [[line] * 100] * 40}}})
    assert len(body) > 4_000_000
    prepared = trail.prepare([trail.mcp_row(key, "docs", "tools/call", "w", body, 200, None, None, 1.5, "192.0.2.1",
                                            BASE)])
    sink = await make_sink(database_url)
    await sink.write("audit_logs", AUDIT, prepared)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            (found,) = (await conn.execute(sa.select(tables.audit_logs.c.details))).scalars().all()
    finally:
        await engine.dispose()
    found = orjson.loads(found) if isinstance(found, str) else found
    assert found[sanitize.CUT_KEY] == sanitize.CUT_NOTE and found["method"] == "tools/call"
    assert len(orjson.dumps(found)) < 2 * sanitize.MAX_DETAILS
    kept = found["params"]["arguments"]["x"]
    assert kept[0][0] == sanitize.clean_text(line) and "Bearer [REDACTED]" in kept[0][0] and "abc" not in kept[0][0]
    reports = await verify_all(database_url)
    assert all(report.ok for report in reports) and sum(report.entries for report in reports) == 1


async def test_entries_that_take_long_to_prepare_are_prepared_a_few_at_a_time(pg_url: str, make_sink):
    """The flusher prepares audit rows in steps, letting the loop serve requests between them. A walked entry of a
    big body takes milliseconds (tens for 4 MB), so 256 of them in a step held the loop for seconds: a step that
    took long makes the next one smaller, in proportion. Each heavy entry here sleeps 4 ms in `prepare` (twice
    the step's goal); every step after the first holds at most two, and every entry is written once."""
    steps: list[tuple[int, int]] = []  # (rows, heavy rows) of each step

    def prepare(rows: list[tuple]) -> list[tuple]:
        heavy = sum(1 for row in rows if row[AUDIT.index("resource_id")] == "heavy")
        steps.append((len(rows), heavy))
        time.sleep(0.004 * heavy)
        return rows

    sink = await make_sink(pg_url)
    writer = RecordWriter(sink, batch_size=2_000, flush_interval=0.05, prepare_audit=prepare)
    tenant = uuid.uuid4()
    for i in range(900):
        assert writer.submit("audit_logs", entry(tenant, i, resource_id="heavy" if i % 15 == 7 else "light"))
    await writer.start()
    await writer.stop()
    assert sum(rows for rows, _ in steps) == 900 and steps[0][0] == 256
    # A step after a quick one may be twice as big, so two heavy entries can share one.
    assert steps[0][1] > 2 and max(heavy for _, heavy in steps[1:]) <= 2, steps
    assert [int(r["i"]) for r in await stored(pg_url)] == list(range(900))
