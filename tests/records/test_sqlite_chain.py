"""SQLite audit chains with more than one writer: the gateway's writer and a CLI command's, at the same time.

Each SQLite audit write reads its chain's head and inserts the next links in one transaction. Two processes
that both read the head before either inserted would give two entries one chain position; the unique index
refuses the second, and its writer keeps an accepted entry in the rejected file instead of the table. The
sink takes SQLite's write lock before it reads (records/sinks.py `SQLiteSink`), so writers take turns; a
lock held past the busy timeout is an unavailable database (retried), never a rejected row.

The writers here are real: separate processes (each a `RecordWriter` over its own sink, as the gateway
runs it) started together on one database file.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from harness import verify_chains
from gateway.db import tables
from gateway.db.engine import create_engine
from gateway.records.sinks import RowsRejected, SinkUnavailable, SQLiteSink, sink_for

from test_audit_writer import AUDIT, entry

# One writing process: says it is ready, waits for the start file, then submits its entries in small bursts
# to a RecordWriter (batches of a few rows, flushed every 5 ms) and prints its counters and its spill's files.
_WRITER = r"""
import asyncio, json, os, sys, time, uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gateway.records.sinks import sink_for
from gateway.records.spill import Spill
from gateway.records.writer import COLUMNS, RecordWriter

url, spill_dir, ready, go, name, count, *tenants = sys.argv[1:]
count = int(count)
tenants = [None if t == "-" else uuid.UUID(t) for t in tenants]
base = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def entry(tenant, i):
    values = dict.fromkeys(COLUMNS["audit_logs"])
    values.update(id=uuid.uuid4(), tenant_id=tenant, user_id=uuid.uuid4(), action="admin.keys.write",
                  resource_type="api-keys", details={"writer": name, "i": i}, outcome="success",
                  duration_ms=1.0, created_at=base + timedelta(milliseconds=i), role="ADMIN")
    return tuple(values[column] for column in COLUMNS["audit_logs"])


async def main():
    sink = await sink_for(url)
    writer = RecordWriter(sink, batch_size=3, flush_interval=0.005, spill=Spill(spill_dir, url))
    await writer.start()
    Path(ready).touch()
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        await asyncio.sleep(0.001)
    for i in range(count):
        for tenant in tenants:
            writer.submit("audit_logs", entry(tenant, i))
        if i % 3 == 2:
            await asyncio.sleep(0.002)
    await writer.stop(timeout=60)
    stats = writer.stats
    await sink.close()
    print(json.dumps({"written": stats.written, "dropped": stats.dropped, "spilled": stats.spilled,
                      "last_error": stats.last_error, "spill": sorted(p.name for p in Path(spill_dir).iterdir())}))


asyncio.run(main())
"""


async def _stored(url: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            audit = tables.audit_logs
            found = await conn.execute(sa.select(audit.c.id, audit.c.tenant_id, audit.c.chain_seq, audit.c.details)
                                       .order_by(audit.c.tenant_id, audit.c.chain_seq))
            return [tuple(row) for row in found]
    finally:
        await engine.dispose()


_verify = verify_chains  # tests/harness.py


def test_writers_of_two_processes_extend_one_sqlite_chain(sqlite_url: str, tmp_path: Path):
    tenant = uuid.uuid4()
    go = tmp_path / "go"
    count = 150
    processes = []
    for name in ("gateway", "cli"):
        spill_dir = tmp_path / f"spill-{name}"
        spill_dir.mkdir()
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _WRITER, sqlite_url, str(spill_dir), str(tmp_path / f"ready-{name}"), str(go),
             name, str(count), str(tenant), "-"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{name}").exists() for name in ("gateway", "cli")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a writer did not start"
        time.sleep(0.01)
    go.touch()  # both writers started: they submit at the same moment
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        reports.append(json.loads(out.splitlines()[-1]))
    for report in reports:
        # Every entry went in, none was rejected (kept in the rejected file) or left in a spill segment.
        assert (report["written"], report["dropped"], report["spilled"]) == (2 * count, 0, 0), report
        assert not [name for name in report["spill"] if name.endswith((".spill", "-rejected.jsonl"))], report

    rows = asyncio.run(_stored(sqlite_url))
    assert len(rows) == len({row[0] for row in rows}) == 2 * 2 * count
    for who in (tenant, None):
        mine = [row for row in rows if row[1] == who]
        assert [row[2] for row in mine] == list(range(1, 2 * count + 1))
        for name in ("gateway", "cli"):
            assert sorted(row[3]["i"] for row in mine if row[3]["writer"] == name) == list(range(count))
    verified = asyncio.run(_verify(sqlite_url))
    assert [(r.tenant_id, r.entries, r.ok) for r in verified] == [(None, 2 * count, True), (tenant, 2 * count, True)]


async def test_two_sinks_writing_at_once_take_turns(sqlite_url: str):
    """In one process too: two engines' connections run in their own threads, truly at the same time."""
    tenant = uuid.uuid4()
    sinks = [await sink_for(sqlite_url) for _ in range(2)]
    try:
        async def write(sink, offset):
            for batch in range(40):
                await sink.write("audit_logs", AUDIT, [entry(tenant, offset + batch * 5 + i) for i in range(5)])

        await asyncio.gather(write(sinks[0], 0), write(sinks[1], 1000))
    finally:
        for sink in sinks:
            await sink.close()
    rows = await _stored(sqlite_url)
    assert [row[2] for row in rows] == list(range(1, 401))
    assert [(r.entries, r.ok) for r in await _verify(sqlite_url)] == [(400, True)]


async def test_a_lock_held_past_the_busy_timeout_is_unavailable_not_rejected(sqlite_url: str):
    engine = create_engine(sqlite_url)

    @event.listens_for(engine.sync_engine, "connect")
    def _short_wait(dbapi_connection, _record):  # after the engine's own pragmas (busy_timeout=5000)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=200")
        cursor.close()

    sink = SQLiteSink(engine)
    tenant = uuid.uuid4()
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        await sink.write("audit_logs", AUDIT, [entry(tenant, 0)])
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, open past the timeout
        batch = [entry(tenant, i) for i in (1, 2)]
        with pytest.raises(SinkUnavailable, match="locked") as raised:
            await sink.write("audit_logs", AUDIT, batch)
        assert not isinstance(raised.value, RowsRejected)
        holder.execute("ROLLBACK")
        await sink.write("audit_logs", AUDIT, batch)  # the retry goes in after the head it reads now
    finally:
        holder.close()
        await sink.close()
    rows = await _stored(sqlite_url)
    assert [row[2] for row in rows] == [1, 2, 3]
    assert [(r.entries, r.ok) for r in await _verify(sqlite_url)] == [(3, True)]


async def test_details_kept_as_text_are_stored_and_chained_on_sqlite(sqlite_url: str):
    """A plain call's details kept as their JSON text (chain.DetailsText) are stored as that JSON and hash as
    the same details held as a dict: the chain verifies."""
    import orjson

    from gateway.records import chain

    tenant = uuid.uuid4()
    at = AUDIT.index("details")
    rows = []
    for i in range(6):
        row = entry(tenant, i)
        value = {"method": "tools/call", "params": {"name": "t", "arguments": {"i": i}}, "request_id": i,
                 "status": 200}
        held = chain.DetailsText(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)) if i % 2 else value
        rows.append(row[:at] + (held,) + row[at + 1 :])
    sink = await sink_for(sqlite_url)
    try:
        await sink.write("audit_logs", AUDIT, rows)
    finally:
        await sink.close()
    stored = await _stored(sqlite_url)
    assert [row[3]["params"]["arguments"]["i"] for row in stored] == list(range(6))
    assert [(r.entries, r.ok) for r in await _verify(sqlite_url)] == [(6, True)]
