"""The record writer against real PostgreSQL and SQLite: batching, bounds, outages, shutdown.

Outages are real: the writer reaches PostgreSQL through a TCP proxy in this
file that can cut every connection and refuse new ones, then come back on the
same port. Row counts are read over a separate, direct connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa
from harness import free_port

from gateway.db import tables
from gateway.db.engine import create_engine, create_pg_pool
from gateway.records import chain
from gateway.records.sinks import PostgresSink, RowsRejected, SQLiteSink, encode_json, sink_for
from gateway.records.writer import COLUMNS, RecordWriter

UTC = timezone.utc
OFFSETS = (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))
BASE_TIME = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TENANT = uuid.uuid4()


# ------------------------------------------------------------------ rows


def request_log(i: int, **overrides: object) -> tuple:
    failed = i % 10 == 0
    values = {
        "id": uuid.uuid4(),
        "tenant_id": TENANT,
        "user_id": None if i % 3 else uuid.uuid4(),
        "api_key_id": uuid.uuid4(),
        "server_id": uuid.uuid4(),
        "server_name": f"server-{i % 7}",
        "method": "tools/call",
        "tool_name": f"tool-{i % 11}",
        "status_code": 502 if failed else 200,
        "error_code": -32603 if failed else None,
        "error": "upstream timed out: é ✓" if failed else None,
        "duration_ms": i / 7,
        "request_bytes": i,
        "response_bytes": 2 * i,
        "client_ip": "10.0.0.1",
        # Aware, in three offsets, with microseconds: stored as the same instant.
        "created_at": (BASE_TIME + timedelta(microseconds=i * 1001)).astimezone(OFFSETS[i % 3]),
    }
    values.update(overrides)
    return tuple(values[name] for name in COLUMNS["request_logs"])


AUDIT_DETAILS = (
    {"args": {"q": "weather", "n": 3}, "tags": ["a", "b"], "nested": {"ok": True, "none": None}},
    [1, 2.5, "three", None],
    None,  # SQL NULL on both back ends, not the JSON text 'null'
    {"unicode": "日本語 ✓", "quote": 'say "hi"\n'},
    {},
)


def audit_entry(i: int) -> tuple:
    values = {
        "id": uuid.uuid4(),
        "tenant_id": TENANT,
        "user_id": uuid.uuid4(),
        "api_key_id": None,
        "action": "tool.call",
        "resource_type": "tool",
        "resource_id": f"tool-{i}",
        "details": AUDIT_DETAILS[i % len(AUDIT_DETAILS)],
        "client_ip": "192.0.2.7",
        "outcome": "success",
        "error_code": None,
        "duration_ms": 1.25,
        "created_at": (BASE_TIME + timedelta(seconds=i)).astimezone(OFFSETS[i % 3]),
        "role": "USER",
        "chain_seq": None,
        "prev_hash": None,
        "entry_hash": None,
    }
    return tuple(values[name] for name in COLUMNS["audit_logs"])


def server_metric(i: int, **overrides: object) -> tuple:
    values = {
        "id": uuid.uuid4(),
        "tenant_id": TENANT,
        "server_id": uuid.uuid4(),
        "tool_name": None,
        "window_start": BASE_TIME + timedelta(minutes=i),
        "window_seconds": 60,
        "request_count": i,
        "error_count": i // 10,
        "avg_response_ms": 12.5,
        "p50_response_ms": 11.0,
        "p95_response_ms": None,
        "p99_response_ms": 40.0,
        "created_at": BASE_TIME,
    }
    values.update(overrides)
    return tuple(values[name] for name in COLUMNS["server_metrics"])


def comparable(row: tuple) -> tuple:
    """A row with its timestamps as UTC instants (SQLite returns them naive, in UTC)."""
    return tuple(
        (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC))
        if isinstance(value, datetime)
        else value
        for value in row
    )


# ------------------------------------------------------------------ databases


class Database:
    """Reads what the writer wrote, over its own connection."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    async def count(self, table: str) -> int:
        async with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(tables.metadata.tables[table])
            return (await conn.execute(query)).scalar_one()

    async def rows(self, table: str) -> dict[uuid.UUID, tuple]:
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.select(tables.metadata.tables[table]))
            return {row[0]: comparable(tuple(row)) for row in result}

    async def scalar(self, sql: str) -> object:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.text(sql))).scalar_one()

    async def close(self) -> None:
        await self.engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
async def sink(database_url: str):
    sink = await sink_for(database_url)
    yield sink
    await sink.close()


@pytest.fixture
async def database(database_url: str):
    database = Database(database_url)
    yield database
    await database.close()


@pytest.fixture
async def pg_database(pg_url: str):
    database = Database(pg_url)
    yield database
    await database.close()


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ a PostgreSQL that goes away


class PostgresOutage:
    """A TCP proxy in front of PostgreSQL. `cut()` aborts every connection and
    stops listening (clients get "connection refused"); `restore()` listens on
    the same port again."""

    def __init__(self, pg_url: str) -> None:
        self._parts = urlsplit(pg_url)
        self._target = (self._parts.hostname, self._parts.port or 5432)
        # Not an ephemeral port: while cut, no other worker's server or connection may take it.
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._pipes: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        netloc = self._parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _connected(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer.transport, upstream_writer.transport)
        self._transports.update(pair)
        pipes = [
            asyncio.ensure_future(_pipe(client_reader, upstream_writer, pair)),
            asyncio.ensure_future(_pipe(upstream_reader, client_writer, pair)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        self._transports.difference_update(pair)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: tuple) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        for transport in pair:  # either side closing ends the connection
            transport.abort()


@pytest.fixture
async def outage(pg_url: str):
    outage = PostgresOutage(pg_url)
    await outage.restore()
    yield outage
    await outage.cut()


@pytest.fixture
async def proxied_sink(outage: PostgresOutage):
    sink = PostgresSink(await create_pg_pool(outage.url, max_size=2), timeout=5.0)
    yield sink
    await sink.close()


def record_messages(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.records"]


# ------------------------------------------------------------------ tests


async def test_burst_is_written_exactly_once_and_round_trips(sink, database: Database) -> None:
    n = 25_000
    expected = {table: {} for table in COLUMNS}
    writer = RecordWriter(sink)
    await writer.start()
    for i in range(n):
        row = request_log(i)
        expected["request_logs"][row[0]] = row
        assert writer.submit("request_logs", row)
        if i % 50 == 0:  # mixed with the other tables in the same batches
            for table, make in (("audit_logs", audit_entry), ("server_metrics", server_metric)):
                row = make(i // 50)
                expected[table][row[0]] = row
                assert writer.submit(table, row)
    await writer.stop()

    assert not writer.running
    stats = writer.stats
    total = n + 2 * (n // 50)
    assert (stats.submitted, stats.written, stats.dropped, stats.queued) == (total, total, 0, 0)
    assert stats.failed_flushes == 0 and stats.last_flush_seconds is not None
    chained = COLUMNS["audit_logs"].index("chain_seq")  # chain_seq, prev_hash, entry_hash: set when written
    for table, rows in expected.items():
        assert await database.count(table) == len(rows)
        stored = await database.rows(table)
        if table == "audit_logs":
            # Numbered in the order submitted, the chain intact (records/chain.py).
            assert [stored[key][chained] for key in rows] == list(range(1, len(rows) + 1))
            stored = {key: row[:chained] + (None, None, None) for key, row in stored.items()}
            async with database.engine.connect() as conn:
                report = await chain.verify_chain(conn, TENANT)
            assert report.ok and report.entries == len(rows), report
        assert stored == {key: comparable(row) for key, row in rows.items()}, table
    details_at = COLUMNS["audit_logs"].index("details")
    null_details = sum(1 for row in expected["audit_logs"].values() if row[details_at] is None)
    assert await database.scalar("SELECT count(*) FROM audit_logs WHERE details IS NULL") == null_details


async def test_a_full_batch_is_flushed_without_waiting_for_the_interval(sink, database: Database) -> None:
    writer = RecordWriter(sink, batch_size=100, flush_interval=3600)
    await writer.start()
    for i in range(100):
        writer.submit("request_logs", request_log(i))

    async def written() -> bool:
        return await database.count("request_logs") == 100

    await eventually(written)

    # A partial batch waits for the interval (here: for stop()).
    for i in range(40):
        writer.submit("request_logs", request_log(i))
    await asyncio.sleep(0.3)
    assert await database.count("request_logs") == 100
    assert writer.stats.queued == 40
    await writer.stop()
    assert await database.count("request_logs") == 140


async def test_a_partial_batch_is_flushed_after_the_interval(sink, database: Database) -> None:
    writer = RecordWriter(sink, batch_size=10_000, flush_interval=0.2)
    await writer.start()
    for i in range(3):
        writer.submit("request_logs", request_log(i))

    async def written() -> bool:
        # The rows are visible in the database a moment before the writer counts them: wait for both.
        return await database.count("request_logs") == 3 and writer.stats.written == 3

    await eventually(written, timeout=5.0)
    await writer.stop()


async def test_submit_refuses_past_max_queue_and_counts_each_refusal(
    pg_url: str, pg_database: Database
) -> None:
    sink = await sink_for(pg_url)
    writer = RecordWriter(sink, max_queue=10, batch_size=4)
    accepted = [writer.submit("request_logs", request_log(i)) for i in range(15)]  # nothing flushes yet
    assert accepted == [True] * 10 + [False] * 5
    assert (writer.stats.dropped, writer.stats.queued, writer.stats.submitted) == (5, 10, 15)

    await writer.start()
    await writer.stop()
    assert await pg_database.count("request_logs") == 10
    assert (writer.stats.written, writer.stats.dropped) == (10, 5)

    # A stopped writer refuses rows: nothing would ever write them.
    assert writer.submit("request_logs", request_log(99)) is False
    assert writer.stats.dropped == 6
    await sink.close()


async def test_rows_accepted_during_an_outage_arrive_once_it_ends(
    outage: PostgresOutage, proxied_sink: PostgresSink, pg_database: Database, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.records")
    writer = RecordWriter(proxied_sink, batch_size=100, flush_interval=0.05)
    await writer.start()
    ids = set()

    def submit(count: int) -> None:
        for i in range(count):
            row = request_log(i)
            ids.add(row[0])
            assert writer.submit("request_logs", row)

    def count_is(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await pg_database.count("request_logs") == n

        return check

    submit(150)
    await eventually(count_is(150))

    async def acknowledged() -> bool:  # the rows are in, and the writer has seen the COMMIT answered
        return writer.stats.written == 150

    await eventually(acknowledged)

    await outage.cut()
    for _ in range(10):  # traffic keeps coming during the outage
        submit(100)
        await asyncio.sleep(0.05)

    async def retried() -> bool:
        return writer.stats.failed_flushes >= 3

    await eventually(retried)
    assert await pg_database.count("request_logs") == 150
    assert writer.stats.queued == 1000

    await outage.restore()
    await eventually(count_is(1150), timeout=20.0)

    async with pg_database.engine.connect() as conn:
        written = {row[0] for row in await conn.execute(sa.select(tables.request_logs.c.id))}
    assert written == ids
    stats = writer.stats
    assert (stats.written, stats.dropped, stats.queued) == (1150, 0, 0)
    assert stats.failed_flushes >= 3 and stats.last_error
    await writer.stop()

    # One error when the outage starts and one line when it ends, not one per retry.
    messages = [r for r in record_messages(caplog) if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0].split(" after")[0] for r in messages] == [
        "cannot write records",
        "writing records again",
    ], [r.getMessage() for r in messages]


async def test_during_an_outage_the_buffer_stays_bounded(
    outage: PostgresOutage, proxied_sink: PostgresSink, pg_database: Database, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.records")
    writer = RecordWriter(proxied_sink, max_queue=300, batch_size=100, flush_interval=0.05)
    await writer.start()
    await outage.cut()
    accepted = [writer.submit("request_logs", request_log(i)) for i in range(500)]
    assert accepted.count(True) == 300 and accepted[:300] == [True] * 300

    async def retried() -> bool:
        return writer.stats.failed_flushes >= 2

    await eventually(retried)
    assert (writer.stats.queued, writer.stats.dropped) == (300, 200)

    await outage.restore()

    async def written() -> bool:
        return await pg_database.count("request_logs") == 300

    await eventually(written, timeout=20.0)
    await writer.stop()
    assert (writer.stats.written, writer.stats.dropped) == (300, 200)
    assert any("record queue full" in r.getMessage() for r in record_messages(caplog))


async def test_stop_gives_up_at_its_deadline_and_counts_what_was_not_written(
    outage: PostgresOutage, proxied_sink: PostgresSink, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.records")
    writer = RecordWriter(proxied_sink, flush_interval=0.05)
    await writer.start()
    await outage.cut()
    for i in range(20):
        writer.submit("request_logs", request_log(i))

    started = time.monotonic()
    await writer.stop(timeout=1.0)
    assert time.monotonic() - started < 3.0
    assert not writer.running
    assert (writer.stats.dropped, writer.stats.queued, writer.stats.written) == (20, 0, 0)
    assert any("20 records not written" in r.getMessage() for r in record_messages(caplog))


async def test_stop_writes_everything_queued(sink, database: Database) -> None:
    writer = RecordWriter(sink, batch_size=1_000, flush_interval=3600)
    await writer.start()
    for i in range(2_500):
        writer.submit("request_logs", request_log(i))
    for i in range(7):
        writer.submit("audit_logs", audit_entry(i))
    await writer.stop()
    assert await database.count("request_logs") == 2_500
    assert await database.count("audit_logs") == 7

    # A writer that was never started drains on stop() too.
    idle = RecordWriter(sink)
    for i in range(30):
        idle.submit("server_metrics", server_metric(i))
    await idle.stop()
    assert await database.count("server_metrics") == 30


async def test_flush_writes_what_is_queued_now(sink, database: Database) -> None:
    writer = RecordWriter(sink, batch_size=2)
    for i in range(5):
        writer.submit("request_logs", request_log(i))
    writer.submit("audit_logs", audit_entry(0))
    await writer.flush()
    assert await database.count("request_logs") == 5
    assert await database.count("audit_logs") == 1
    assert writer.stats.queued == 0


async def test_rows_the_database_rejects_are_dropped_alone_and_never_logged(
    sink, database: Database, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.records")
    secret = f"SECRET-{uuid.uuid4()}"
    writer = RecordWriter(sink, batch_size=200)
    for i in range(200):
        # status_code is NOT NULL on both back ends.
        status = None if i in (57, 130) else 200
        writer.submit("request_logs", request_log(i, status_code=status, error=secret))
    await writer.stop()

    assert await database.count("request_logs") == 198
    assert (writer.stats.written, writer.stats.dropped, writer.stats.failed_flushes) == (198, 2, 0)
    assert "status_code" in writer.stats.last_error
    messages = [r.getMessage() for r in record_messages(caplog)]
    assert any("dropped 2 request_logs rows the database rejected" in m for m in messages), messages
    assert not any(secret in m or secret in str(r.args) for m in messages for r in caplog.records)


async def test_a_retried_batch_that_was_already_committed_is_not_duplicated(
    pg_url: str, pg_database: Database
) -> None:
    # The reply to a committed COPY can be lost with its connection; the writer
    # then sends the same batch again.
    sink = PostgresSink(await create_pg_pool(pg_url))
    rows = [request_log(i) for i in range(50)]
    await sink.write("request_logs", COLUMNS["request_logs"], rows)
    await sink.write("request_logs", COLUMNS["request_logs"], rows + [request_log(50)])
    assert await pg_database.count("request_logs") == 51
    await sink.close()


async def test_values_a_column_cannot_take_are_rejected_not_retried(sqlite_url: str, pg_url: str) -> None:
    bad = request_log(0, id="not-a-uuid")
    for sink in (await sink_for(pg_url), SQLiteSink(create_engine(sqlite_url))):
        with pytest.raises(RowsRejected) as caught:
            await sink.write("request_logs", COLUMNS["request_logs"], [bad])
        assert "not-a-uuid" not in str(caught.value)
        await sink.close()


async def test_sqlite_stores_each_value_as_sqlalchemys_own_insert_does(tmp_path) -> None:
    # SQLiteSink hands the driver converted tuples instead of going through an INSERT construct: what it stores
    # must be the very text and types SQLAlchemy stores, or the control plane would read other values back.
    import sqlite3

    from asyncpg.pgproto.pgproto import UUID as PgUUID

    from gateway.db import migrate

    naive = datetime(2025, 3, 1, 12, 0, 0, 7)
    rows = {
        "request_logs": [request_log(i) for i in range(30)]
        + [request_log(30, id=PgUUID(uuid.uuid4().bytes), created_at=naive, duration_ms=0.0, error="")],
        "server_metrics": [server_metric(i) for i in range(5)]
        + [server_metric(5, window_start=BASE_TIME.replace(microsecond=0), tool_name="t\x00ü")],
        # Linked as the sink links them, so both inserts get the same chain columns.
        "audit_logs": chain.link([audit_entry(i) for i in range(10)], {}, encode_json),
    }
    stored = {}
    for name in ("ours", "sqlalchemys"):
        url = f"sqlite:///{tmp_path / name}.db"
        migrate.upgrade(url)
        sink = SQLiteSink(create_engine(url))
        try:
            async with sink._engine.begin() as conn:
                for table, values in rows.items():
                    columns = COLUMNS[table]
                    if name == "ours":
                        insert, steps = sink._plan(table, columns)
                        await conn.exec_driver_sql(insert, [sink_converted(steps, row) for row in values])
                    else:
                        # SQLAlchemy's insert, JSON declared as text and encoded the way the sink encodes it.
                        source = tables.metadata.tables[table]
                        shadow = sa.Table(table, sa.MetaData(), *(
                            sa.Column(c.name, sa.Text() if isinstance(c.type, sa.JSON) else c.type)
                            for c in source.columns))
                        params = [dict(zip(columns, (
                            encode_json(v) if isinstance(source.columns[c].type, sa.JSON)
                            else v.astimezone(UTC) if isinstance(v, datetime) and v.tzinfo is not None
                            else v for c, v in zip(columns, row)))) for row in values]
                        await conn.execute(shadow.insert(), params)
        finally:
            await sink.close()
        with sqlite3.connect(tmp_path / f"{name}.db") as raw:
            stored[name] = {
                table: raw.execute(f"SELECT {', '.join(f'{c}, typeof({c})' for c in COLUMNS[table])} FROM {table} "
                                   "ORDER BY rowid").fetchall()
                for table in rows
            }
    for table, values in rows.items():
        assert len(stored["ours"][table]) == len(values)
        assert stored["ours"][table] == stored["sqlalchemys"][table], table
    # The sink's write path (its own conversions, in a transaction) reads back what was given.
    url = f"sqlite:///{tmp_path / 'written'}.db"
    migrate.upgrade(url)
    sink = SQLiteSink(create_engine(url))
    database = Database(url)
    try:
        await sink.write("request_logs", COLUMNS["request_logs"], rows["request_logs"][:30])
        assert await database.rows("request_logs") == {row[0]: comparable(row) for row in rows["request_logs"][:30]}
    finally:
        await sink.close()
        await database.close()


async def test_a_sqlite_engine_binds_none_through_a_registered_adapter_as_null(tmp_path) -> None:
    # CPython's sqlite3 runs its adaptation protocol for every None it binds (an AttributeError built and dropped
    # each time, about 450 ns); create_engine registers a C adapter for NoneType so the registry answers first.
    import sqlite3

    from gateway.db import engine as engine_module
    from gateway.db import migrate

    url = f"sqlite:///{tmp_path / 'nones'}.db"
    migrate.upgrade(url)
    sink = SQLiteSink(create_engine(url))
    try:
        assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)] is engine_module._NONE
        # A success's row: no error, no error code, no key (anonymous): each None is still stored as NULL.
        row = request_log(0, error=None, error_code=None, tenant_id=None, user_id=None, api_key_id=None)
        await sink.write("request_logs", COLUMNS["request_logs"], [row])
        async with sink._engine.connect() as conn:
            found = (await conn.exec_driver_sql(
                "SELECT typeof(error), typeof(error_code), typeof(tenant_id), typeof(api_key_id), typeof(status_code) "
                "FROM request_logs")).all()
        assert found == [("null", "null", "null", "null", "integer")]
    finally:
        await sink.close()


def sink_converted(steps: tuple, row: tuple) -> tuple:
    from gateway._fast import pgcopy

    return pgcopy.sqlite_rows([row], steps)[0]


async def test_every_record_table_is_copied_by_our_binary_encoder(pg_url: str) -> None:
    # A column type without an encoding would send its table back to asyncpg's slower COPY, silently.
    sink = PostgresSink(await create_pg_pool(pg_url))
    async with sink.pool.acquire() as conn:
        for table, columns in COLUMNS.items():
            assert await sink._column_kinds(conn, table, columns), table
    await sink.close()


async def test_a_table_with_a_type_we_do_not_encode_is_copied_by_asyncpg(pg_url: str, pg_database: Database) -> None:
    # inet has no binary encoding of ours: the table goes through asyncpg's COPY, which encodes the text.
    sink = PostgresSink(await create_pg_pool(pg_url))
    async with sink.pool.acquire() as conn:
        await conn.execute("ALTER TABLE request_logs ALTER COLUMN client_ip TYPE inet USING client_ip::inet")
        assert await sink._column_kinds(conn, "request_logs", COLUMNS["request_logs"]) is None
    await sink.write("request_logs", COLUMNS["request_logs"], [request_log(i) for i in range(20)])
    assert await pg_database.scalar("SELECT count(*) FROM request_logs WHERE client_ip = '10.0.0.1'::inet") == 20
    await sink.close()


async def test_a_column_type_changed_while_writing_costs_no_row(pg_url: str, pg_database: Database) -> None:
    # The encoder's column types are read once per table; a migration that changes one (int -> bigint here)
    # makes the next COPY fail. The writer splits the batch and retries, by then with the types read again.
    sink = PostgresSink(await create_pg_pool(pg_url))
    writer = RecordWriter(sink, batch_size=50)
    for i in range(50):
        writer.submit("request_logs", request_log(i))
    await writer.flush()
    async with sink.pool.acquire() as conn:
        await conn.execute("ALTER TABLE request_logs ALTER COLUMN request_bytes TYPE bigint")
    for i in range(50, 100):
        writer.submit("request_logs", request_log(i, request_bytes=2**40 + i if i % 2 else i))
    await writer.stop()
    assert await pg_database.count("request_logs") == 100
    assert await pg_database.scalar("SELECT count(*) FROM request_logs WHERE request_bytes > 2147483647") == 25
    assert writer.stats.dropped == 0
    await sink.close()


async def test_a_connection_given_back_in_a_transaction_comes_back_out_of_it(pg_url: str) -> None:
    # The records pool skips asyncpg's reset query (a round trip per write); what a cut-off write can leave
    # behind, an open transaction and its locks, must still be gone when the connection is used again.
    pool = await create_pg_pool(pg_url, max_size=1)
    other = await create_pg_pool(pg_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SELECT pg_advisory_xact_lock(7, 7)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock(7, 7)") is True
    finally:
        await pool.close()
        await other.close()


async def test_submit_rejects_rows_that_do_not_fit_the_table(sqlite_url: str) -> None:
    sink = await sink_for(sqlite_url)
    writer = RecordWriter(sink)
    with pytest.raises(ValueError, match="not a record table"):
        writer.submit("users", request_log(0))
    with pytest.raises(ValueError, match="values"):
        writer.submit("request_logs", request_log(0)[:-1])
    with pytest.raises(ValueError, match="values"):
        writer.submit("audit_logs", request_log(0))
    assert writer.stats.submitted == 0
    await sink.close()


def test_columns_follow_the_schema() -> None:
    assert set(COLUMNS) == set(tables.RECORD_TABLES)
    for table, columns in COLUMNS.items():
        assert columns == tuple(c.name for c in tables.metadata.tables[table].columns)

