"""Where record batches land: PostgreSQL through COPY, SQLite through executemany.

A sink owns one database connection pool (asyncpg) or engine (SQLAlchemy) and
writes one table's rows per call; `gateway.records.writer` decides what to
write and when. A sink turns every driver error into one of two answers the
writer acts on: `SinkUnavailable` (retry these rows later) or `RowsRejected`
(these rows will never go in). Their messages are safe to log: a sink must not
put row values into an error it raises, because rows carry user data and
driver messages quote it (asyncpg: "invalid UUID 'abc'", SQLAlchemy: the
statement's parameters).

Audit rows are not copied as they come: `write` numbers and hashes them into
their tenant's chain (records/chain.py) in the transaction that inserts them.
On PostgreSQL that transaction first takes each chain's advisory lock
(`pg_advisory_xact_lock(chain.LOCK_CLASS, chain.lock_key(tenant))`, in a fixed
order, so processes never deadlock), reads each chain's head, and COPYs the
numbered rows. Ids are the idempotency keys: when the primary key refuses a
row (a retried batch whose first COPY committed, a replayed spill segment),
that transaction rolls back and a second one skips the rows whose id is
already in the table (looked up only then: most batches are new). On SQLite the same transaction
takes the database's write lock before its first read (`BEGIN IMMEDIATE`,
see `SQLiteSink`), so writers of several processes take turns there too.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timezone
from typing import Protocol

import asyncpg
import orjson
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway._fast import pgcopy
from gateway.db import tables
from gateway.records import chain
from gateway.db.engine import create_engine, create_pg_pool, is_postgres

logger = logging.getLogger("gateway.records")

UTC = timezone.utc
AUDIT = "audit_logs"


class Sink(Protocol):
    async def write(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        """Write all `rows` (tuples in `columns` order) or none of them."""

    async def close(self) -> None: ...


class SinkError(Exception):
    """A write failed. `str()` of it never contains row values."""


class SinkUnavailable(SinkError):
    """The database could not take the rows now (down, unreachable, timed out): retry them."""


class RowsRejected(SinkError):
    """The database refused the rows themselves (a NULL in a NOT NULL column, a value
    of the wrong type or too long): retrying the same rows fails the same way."""


def _json_positions(table: str, columns: tuple[str, ...]) -> tuple[int, ...]:
    table_columns = tables.metadata.tables[table].columns
    return tuple(i for i, name in enumerate(columns) if isinstance(table_columns[name].type, sa.JSON))


# Non-str keys are serialized (as str) the way the stdlib json module, which the
# control plane's SQLAlchemy JSON type uses, would: an audit entry must not be
# lost over an integer key.
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def encode_json(value: object) -> str | None:
    """A JSON column's value as JSON text; None stays SQL NULL on both back ends."""
    if value is None:
        return None
    if type(value) is chain.DetailsText:  # an audit entry's details kept as their JSON text
        return value.text.decode()
    return orjson.dumps(value, option=_ORJSON_OPTIONS).decode()


# ---------------------------------------------------------------- PostgreSQL

# SQLSTATE class 22 (data exception) and 23 (integrity constraint violation) are
# about the rows; asyncpg encodes values client-side and reports a bad one as a
# plain TypeError / ValueError / OverflowError (IndexError for a short tuple).
_PG_REJECTIONS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
)


def _pg_error(exc: Exception) -> SinkError:
    if isinstance(exc, _PG_REJECTIONS):
        # The server's message and the client's encoder quote the offending value:
        # name the error and the column, never the value.
        detail = type(exc).__name__
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate:
            detail += f" (SQLSTATE {sqlstate})"
        column = getattr(exc, "column_name", None)
        if column:
            detail += f" in column {column}"
        return RowsRejected(detail)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return SinkUnavailable("TimeoutError: the database did not answer in time")
    # Connection and server-state errors ("connection refused", "terminating
    # connection due to administrator command", "database ... does not exist")
    # name hosts and objects, not row values. Of a server error only the primary
    # message is kept: its DETAIL line is where PostgreSQL quotes rows.
    if isinstance(exc, asyncpg.PostgresError):
        return SinkUnavailable(f"{type(exc).__name__} (SQLSTATE {exc.sqlstate}): {exc.message}")
    return SinkUnavailable(f"{type(exc).__name__}: {exc}")


# A chain's head is its highest position (the unique index on (tenant_id, chain_seq), read backwards).
# Several tenants' heads in one statement:
_PG_HEADS = (
    "SELECT t.n, h.chain_seq, h.entry_hash FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n) CROSS JOIN LATERAL ("
    "SELECT chain_seq, entry_hash FROM audit_logs WHERE tenant_id = t.id AND chain_seq IS NOT NULL "
    "ORDER BY chain_seq DESC LIMIT 1) AS h"
)
# Every chain's lock in one statement; the aggregate runs the calls in the array's order.
_PG_LOCKS = "SELECT count(pg_advisory_xact_lock($1, key)) FROM unnest($2::int4[]) AS key"
# The chain of entries without a tenant.
_PG_HEAD_NULL = (
    "SELECT chain_seq, entry_hash FROM audit_logs WHERE tenant_id IS NULL AND chain_seq IS NOT NULL "
    "ORDER BY chain_seq DESC LIMIT 1"
)


# The binary COPY encoding (gateway._fast.pgcopy) of each column type the record tables use; a table with a column
# of another type is COPYed by asyncpg's own encoder.
_COPY_KINDS = {
    "uuid": "U", "text": "T", "character varying": "T", "jsonb": "J", "smallint": "S", "integer": "I",
    "bigint": "L", "double precision": "F", "boolean": "B", "timestamp with time zone": "Z",
}
_LINK_CHUNK = 256  # audit entries numbered and hashed between two turns of the loop
_COPY_CHUNK = 256  # rows per CopyData message (about a quarter of a millisecond of encoding)


async def _pieces(chunks: list[bytes]):
    """The pieces of a COPY stream, as the async iterable asyncpg's `copy_to_table` reads."""
    for chunk in chunks:
        yield chunk


_COLUMN_TYPES = (
    "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
    "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped"
)


class PostgresSink:
    """COPY (binary) into PostgreSQL through an asyncpg pool, which this sink owns and closes.

    JSON columns are orjson-encoded here, per value, only for tables that have
    them (audit_logs.details): asyncpg's jsonb codec takes text. That keeps the
    pool an ordinary one (no per-connection codec setup to get right on
    reconnect) and costs nothing for request_logs, which has no JSON column.

    A batch's COPY stream is written by `gateway._fast.pgcopy` in one call,
    for the column types the database reports for the table (read once per
    table and columns, again after a failed COPY); asyncpg's
    `copy_records_to_table` encodes field by field through its general codecs,
    which cost about as much as the rest of a request log row's way to the
    database (bench/records_cost.py).
    """

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 30.0) -> None:
        self._pool = pool
        # A database that stops answering (a dropped route, no RST) must fail the
        # write instead of hanging the writer forever.
        self._timeout = timeout
        self._json_positions: dict[tuple[str, tuple[str, ...]], tuple[int, ...]] = {}
        self._copy_kinds: dict[tuple[str, tuple[str, ...]], str | None] = {}

    @property
    def pool(self) -> asyncpg.Pool:
        """The sink's connections, for /metrics (app.py reads their counts)."""
        return self._pool

    async def write(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if table == AUDIT:
            return await self._write_audit(columns, rows)
        try:
            records = self._encoded(table, columns, rows)
        except Exception as exc:  # noqa: BLE001 - a value orjson cannot encode
            raise RowsRejected(f"{type(exc).__name__} while encoding a JSON value") from exc
        try:
            try:
                async with self._pool.acquire(timeout=self._timeout) as conn:
                    await self._copy(conn, table, columns, records)
            except asyncpg.UniqueViolationError:
                # A batch whose COPY committed but whose reply was lost (connection
                # cut at the wrong moment) comes back as a retry: insert what is new.
                await self._insert_skipping_duplicates(table, columns, records)
        except SinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - every driver error is classified
            raise _pg_error(exc) from exc

    async def _insert_skipping_duplicates(
        self, table: str, columns: tuple[str, ...], records: list[tuple]
    ) -> None:
        column_list = ", ".join(f'"{name}"' for name in columns)
        async with self._pool.acquire(timeout=self._timeout) as conn:
            async with conn.transaction():
                await conn.execute(
                    f'CREATE TEMPORARY TABLE "_gw_records_retry" (LIKE "{table}") ON COMMIT DROP',
                    timeout=self._timeout,
                )
                await conn.copy_records_to_table(
                    "_gw_records_retry", records=records, columns=columns, timeout=self._timeout
                )
                status = await conn.execute(
                    f'INSERT INTO "{table}" ({column_list}) SELECT {column_list} FROM "_gw_records_retry" '
                    "ON CONFLICT DO NOTHING",
                    timeout=self._timeout,
                )
        inserted = int(status.rsplit(" ", 1)[-1])
        logger.info(
            "%s: skipped %d rows already in the database (a retried batch had been committed)",
            table,
            len(records) - inserted,
        )

    async def _write_audit(self, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if columns != chain.COLUMNS:
            raise ValueError("audit rows are written with all their columns, in schema order")
        try:
            # The costly part of hashing, before the transaction and between turns of the loop.
            canonicals, texts = await chain.row_canonicals(rows)
        except Exception as exc:  # noqa: BLE001 - a value that cannot be encoded
            raise RowsRejected(f"{type(exc).__name__} while encoding an audit entry") from exc
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                try:
                    # Most batches are new: no lookup of their ids first (an array of UUIDs to encode, an index
                    # probe per row), the primary key refuses a row that is already in.
                    await self._chain_and_copy(conn, columns, rows, canonicals, texts, look_up=False)
                except asyncpg.UniqueViolationError:
                    # A retried batch whose first COPY committed (its answer was lost), or a spill segment
                    # replayed after a crash: the transaction rolled back; again, skipping what is in.
                    await self._chain_and_copy(conn, columns, rows, canonicals, texts, look_up=True)
        except SinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - every driver error is classified
            raise _pg_error(exc) from exc

    async def _chain_and_copy(self, conn, columns: tuple[str, ...], rows: list[tuple], canonicals: list[bytes],
                              texts: list[bytes | None], *, look_up: bool) -> None:
        """In one transaction: each chain's lock, (`look_up`: skip the rows already in,) each chain's head,
        the rows numbered and hashed after it, and their COPY."""
        async with conn.transaction():
            tenants = chain.tenants_of(rows)
            # One round trip for every chain's lock, taken in `tenants_of`'s order (unnest keeps the array's).
            await conn.execute(_PG_LOCKS, chain.LOCK_CLASS, [chain.lock_key(tenant) for tenant in tenants],
                               timeout=self._timeout)
            # Under the locks: what is already in (a committed batch coming back), and each chain's head.
            if look_up:
                present = await conn.fetch(
                    "SELECT id FROM audit_logs WHERE id = ANY($1::uuid[])", [row[0] for row in rows],
                    timeout=self._timeout,
                )
                if present:
                    skip = {record[0] for record in present}
                    kept = [i for i, row in enumerate(rows) if row[0] not in skip]
                    rows = [rows[i] for i in kept]
                    canonicals, texts = [canonicals[i] for i in kept], [texts[i] for i in kept]
                    logger.info("audit_logs: skipped %d entries already in the database (a retried or "
                                "replayed batch)", len(skip))
                    if not rows:
                        return
                    tenants = chain.tenants_of(rows)
            heads = {}
            unnamed = bool(tenants) and tenants[0] is None  # `tenants_of` puts the chain without a tenant first
            if unnamed:
                head = await conn.fetchrow(_PG_HEAD_NULL, timeout=self._timeout)
                if head is not None:
                    heads[None] = (head[0], head[1])
            named = tenants[1:] if unnamed else tenants
            if named:  # every tenant's head in one round trip
                for position, seq, digest in await conn.fetch(_PG_HEADS, named, timeout=self._timeout):
                    # Keyed by the rows' own tenant object, not the UUID asyncpg reads back: comparing that one
                    # with the rows' uuid.UUID costs ~1.7k instructions, and `link` looks a head up per row.
                    heads[named[position - 1]] = (seq, digest)
            try:
                # The details as JSON text already (asyncpg's jsonb codec takes text). A slice at a time, the
                # loop free between them: `heads` carries each chain on from one slice to the next, and the
                # locks keep every other writer's rows out of these chains meanwhile.
                records = []
                for at in range(0, len(rows), _LINK_CHUNK):
                    if at:
                        await asyncio.sleep(0)
                    end = at + _LINK_CHUNK
                    records += chain.link(rows[at:end], heads, encode_json, canonicals[at:end], texts[at:end])
            except Exception as exc:  # noqa: BLE001 - a value that cannot be encoded
                raise RowsRejected(f"{type(exc).__name__} while encoding an audit entry") from exc
            await self._copy(conn, AUDIT, columns, records)

    async def _copy(self, conn, table: str, columns: tuple[str, ...], records: list[tuple]) -> None:
        """COPY `records` into `table`: a binary stream of our own where every column's type has an encoding."""
        key = (table, columns)
        try:
            kinds = self._copy_kinds[key]
        except KeyError:
            kinds = self._copy_kinds[key] = await self._column_kinds(conn, table, columns)
        if kinds is None:
            # asyncpg's codecs take JSON as str; the audit entries' details come as their UTF-8 text (no record
            # table has a bytea column).
            records = [tuple(v.decode() if type(v) is bytes else v for v in r) for r in records]
            await conn.copy_records_to_table(table, records=records, columns=columns, timeout=self._timeout)
            return
        # Encoded before the COPY starts (a value it refuses stops nothing half-sent), as several CopyData
        # messages: PostgreSQL reads a whole message before it inserts a row of it. The requests in flight
        # get the loop between messages: a batch of thousands is milliseconds of encoding.
        last = len(records) - 1
        chunks = []
        for at in range(0, max(len(records), 1), _COPY_CHUNK):
            if at:
                await asyncio.sleep(0)
            chunks.append(pgcopy.encode(kinds, records[at : at + _COPY_CHUNK], at == 0, at + _COPY_CHUNK > last))
        try:
            await conn.copy_to_table(table, source=_pieces(chunks), columns=columns, format="binary",
                                     timeout=self._timeout)
        except Exception:
            # The types are read again for the next batch: a migration may have changed one since.
            self._copy_kinds.pop(key, None)
            raise

    async def _column_kinds(self, conn, table: str, columns: tuple[str, ...]) -> str | None:
        types = dict(await conn.fetch(_COLUMN_TYPES, f'"{table}"', timeout=self._timeout))
        kinds = [_COPY_KINDS.get(types.get(name)) for name in columns]
        return None if None in kinds else "".join(kinds)

    def _encoded(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> list[tuple]:
        key = (table, columns)
        positions = self._json_positions.get(key)
        if positions is None:
            positions = self._json_positions[key] = _json_positions(table, columns)
        if not positions:
            return rows
        if len(positions) == 1:
            (at,) = positions
            return [(*row[:at], encode_json(row[at]), *row[at + 1 :]) for row in rows]
        encoded = []
        for row in rows:
            values = list(row)
            for at in positions:
                values[at] = encode_json(values[at])
            encoded.append(tuple(values))
        return encoded

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self._pool.terminate()


# ---------------------------------------------------------------- SQLite


def _sqlite_error(exc: Exception) -> SinkError:
    # str() of a SQLAlchemy error includes the statement's parameters, i.e. the
    # rows: describe it by the driver's own message, which names constraints
    # and columns ("NOT NULL constraint failed: request_logs.status_code").
    if isinstance(exc, sa_exc.DBAPIError):
        detail = f"{type(exc.orig).__name__}: {exc.orig}"
        if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError)):
            return RowsRejected(detail)
        return SinkUnavailable(detail)  # locked, I/O error, no such table (not migrated yet)
    if isinstance(exc, sa_exc.StatementError):
        # Raised before the driver saw the rows: a bind processor refused a value
        # (a str where a UUID belongs).
        return RowsRejected(f"{type(getattr(exc, 'orig', None) or exc).__name__} while converting a value")
    if isinstance(exc, (TypeError, ValueError, LookupError, ArithmeticError)):
        return RowsRejected(type(exc).__name__)
    return SinkUnavailable(f"{type(exc).__name__}: {exc}")


def _driver_does_not_begin(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # the "begin" event below does (SQLiteSink)


def _begin_immediate(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _in_utc(process):
    """A timestamp column's bind processor, given aware times in UTC first (SQLite stores a wall-clock time
    without its offset)."""

    def convert(value):
        if value is not None and value.tzinfo is not None and value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        return process(value)

    return convert


class SQLiteSink:
    """One executemany INSERT per batch, in a transaction, through a SQLAlchemy engine this sink owns.

    Rows are stored as the tables' own column types (Uuid, DateTime) store
    them, so the control plane reads back what it would have written, with two
    exceptions made on purpose, for parity with PostgreSQL: JSON values are
    orjson-encoded here (None stays SQL NULL; SQLAlchemy's JSON type would
    store the text 'null' and reject datetimes and UUIDs inside the value), and
    aware timestamps are converted to UTC (SQLite stores a wall-clock time
    without its offset). The INSERT goes to the driver as it is
    (`exec_driver_sql`) with tuples from `pgcopy.sqlite_rows`, which writes a
    UUID's hex digits and a UTC time's text in C and hands any other value to
    its column type's own bind processor, taken from SQLAlchemy. An INSERT
    construct with a dict a row cost SQLAlchemy's statement machinery per row
    (bench/proxy_instructions.py --database sqlite: the records were 1.92x a
    request without them; 1.54x this way).

    Every transaction of this sink starts with `BEGIN IMMEDIATE`: it holds
    SQLite's write lock before its first read. Other processes write audit
    entries into the same chains (a second gateway process, a local CLI admin
    command: records/cli_audit.py), and an audit write reads its chains'
    heads before it inserts the next links; under a deferred transaction two
    writers could read the same head, and the unique index would refuse the
    second one's rows as if they were bad. With the lock taken first, writers
    take turns; one that waits past the engine's busy timeout gets "database
    is locked", which is `SinkUnavailable` (retried), like any lock error.
    The sqlite3 driver would only begin before the INSERT, so it is told not
    to begin at all (isolation_level None) and the engine's "begin" event
    emits the BEGIN: SQLAlchemy's SQLite documentation, "Enabling Non-Legacy
    SQLite Transactional Modes" (https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#sqlite-transactions).
    The engine is this sink's own (a reader through it would take the write
    lock too).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # Before the engine's first connection: every connection it opens gets the first hook.
        event.listen(engine.sync_engine, "connect", _driver_does_not_begin)
        event.listen(engine.sync_engine, "begin", _begin_immediate)
        # (table, columns) -> the INSERT's text and each converted column's (position, kind, conversion)
        self._plans: dict[tuple[str, tuple[str, ...]], tuple[str, tuple]] = {}

    @property
    def pool(self):
        """The engine's connection pool, for /metrics (app.py reads its counts)."""
        return self._engine.pool

    async def write(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if table == AUDIT:
            return await self._write_audit(columns, rows)
        insert, steps = self._plan(table, columns)
        try:
            params = pgcopy.sqlite_rows(rows, steps)
        except Exception as exc:  # noqa: BLE001 - a value that is not what its column takes
            raise RowsRejected(f"{type(exc).__name__} while converting a value") from exc
        try:
            async with self._engine.begin() as conn:
                await conn.exec_driver_sql(insert, params)
        except SinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - every driver error is classified
            raise _sqlite_error(exc) from exc

    async def _write_audit(self, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if columns != chain.COLUMNS:
            raise ValueError("audit rows are written with all their columns, in schema order")
        try:
            # The canonical forms before the write lock, between turns of the loop (as on PostgreSQL).
            canonicals, _ = await chain.row_canonicals(rows)
        except Exception as exc:  # noqa: BLE001 - a value that cannot be encoded
            raise RowsRejected(f"{type(exc).__name__} while encoding an audit entry") from exc
        try:
            try:
                # Most batches are new: no lookup of their ids first (as on PostgreSQL, the primary key refuses a
                # row that is already in).
                await self._chain_and_insert(columns, rows, canonicals, look_up=False)
            except sa_exc.IntegrityError:
                # A retried batch whose first write committed, or a spill segment replayed after a crash: the
                # transaction rolled back; again, skipping what is in (a row refused for another reason is
                # refused again, and rejected).
                await self._chain_and_insert(columns, rows, canonicals, look_up=True)
        except SinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - every driver error is classified
            raise _sqlite_error(exc) from exc

    async def _chain_and_insert(self, columns: tuple[str, ...], rows: list[tuple], canonicals: list[bytes], *,
                                look_up: bool) -> None:
        """In one transaction, under SQLite's write lock: (`look_up`: skip the rows already in,) each chain's
        head, the rows numbered and hashed after it, and their INSERT."""
        table = tables.audit_logs
        async with self._engine.begin() as conn:
            if look_up:
                present: set = set()
                ids = [row[0] for row in rows]
                for start in range(0, len(ids), 500):  # SQLite caps a statement's parameters
                    found = await conn.execute(sa.select(table.c.id).where(table.c.id.in_(ids[start : start + 500])))
                    present.update(found.scalars())
                if present:
                    kept = [i for i, row in enumerate(rows) if row[0] not in present]
                    rows, canonicals = [rows[i] for i in kept], [canonicals[i] for i in kept]
                    logger.info("audit_logs: skipped %d entries already in the database (a retried or "
                                "replayed batch)", len(present))
                    if not rows:
                        return
            heads = {}
            for tenant in chain.tenants_of(rows):
                query = (
                    sa.select(table.c.chain_seq, table.c.entry_hash)
                    .where(table.c.tenant_id.is_(None) if tenant is None else table.c.tenant_id == tenant,
                           table.c.chain_seq.is_not(None))
                    .order_by(table.c.chain_seq.desc())
                    .limit(1)
                )
                head = (await conn.execute(query)).first()
                if head is not None:
                    heads[tenant] = (head[0], head[1])
            insert, steps = self._plan(AUDIT, columns)
            try:
                params = pgcopy.sqlite_rows(chain.link(rows, heads, encode_json, canonicals), steps)
            except Exception as exc:  # noqa: BLE001 - a value that is not what its column takes
                raise RowsRejected(f"{type(exc).__name__} while converting a value") from exc
            await conn.exec_driver_sql(insert, params)

    def _plan(self, table: str, columns: tuple[str, ...]) -> tuple[str, tuple]:
        """The INSERT of `columns` into `table` in the driver's parameter style, and the conversion of each
        column that has one (`pgcopy.sqlite_rows`'s steps): its type's bind processor (aware times in UTC
        first), orjson for JSON."""
        key = (table, columns)
        plan = self._plans.get(key)
        if plan is None:
            dialect = self._engine.dialect
            if dialect.paramstyle != "qmark":
                raise RuntimeError(f"the SQLite driver takes {dialect.paramstyle} parameters, not qmark")
            quote = dialect.identifier_preparer.quote
            source = tables.metadata.tables[table].columns
            steps = []
            for at, name in enumerate(columns):
                column_type = source[name].type
                if isinstance(column_type, sa.JSON):
                    steps.append((at, "C", encode_json))
                    continue
                process = column_type.dialect_impl(dialect).bind_processor(dialect)
                # A UUID's hex digits and a UTC time's text are written by `pgcopy.sqlite_rows` itself (the same
                # text: tests/records/test_writer.py); any other value goes through the processor.
                if isinstance(column_type, sa.DateTime):
                    steps.append((at, "D", _in_utc(process or (lambda value: value))))
                elif isinstance(column_type, sa.Uuid) and process is not None:
                    steps.append((at, "X", process))
                elif process is not None:
                    steps.append((at, "C", process))
            insert = (f"INSERT INTO {quote(table)} ({', '.join(quote(name) for name in columns)}) "
                      f"VALUES ({', '.join('?' * len(columns))})")
            plan = self._plans[key] = (insert, tuple(steps))
        return plan

    async def close(self) -> None:
        await self._engine.dispose()


async def sink_for(url: str, *, timeout: float = 30.0) -> Sink:
    """The sink for a configured database URL (PostgreSQL: COPY; otherwise SQLite)."""
    if is_postgres(url):
        # The writer holds one connection at a time; a second lets a retry
        # connect while a dead one is still being torn down.
        pool = await create_pg_pool(url, min_size=1, max_size=2)
        return PostgresSink(pool, timeout=timeout)
    return SQLiteSink(create_engine(url))


__all__ = [
    "PostgresSink",
    "RowsRejected",
    "SQLiteSink",
    "Sink",
    "SinkError",
    "SinkUnavailable",
    "encode_json",
    "sink_for",
]
