"""Benchmark: request_logs rows per second through COPY (PostgresSink) against an executemany INSERT.

    python bench/bench_writer.py
    python bench/bench_writer.py --rows 200000 --batch 10000 --rounds 3 --loop uvloop
    BENCH_PG_URL=postgresql://user@host:5432/postgres python bench/bench_writer.py

It creates a database of its own (`gwbench_<random>`) on the server BENCH_PG_URL
names (default: postgres@127.0.0.1:5432, trust auth), migrates it with
`gateway.db.migrate.upgrade`, and drops it when done, also on failure or ^C.

Both methods write the same pre-built rows over one asyncpg connection, in
batches of --batch rows, each batch its own transaction: COPY is
`PostgresSink.write` (what the writer runs), the baseline is asyncpg's
`executemany` of a 16-parameter INSERT (pipelined, the fastest INSERT asyncpg
has). Each round truncates the table before each method and alternates which
goes first; the best round of each is reported, with the ratio. Then two figures
for the writer itself: the cost of `RecordWriter.submit` (the request path) and
rows/s end to end (submit all, then `stop()` drains them). Then the audit
trail: what building an entry costs the request path (`AuditTrail.mcp_row` +
`submit`), what preparing it costs the flusher (decode the params, sanitize,
bound; with and without its JSON log line, written to /dev/null by the
handler `gateway serve` gives the gateway.audit logger), and audit
rows/s through the chained write (per batch: a transaction, the tenants'
advisory locks, the check for ids already written, each chain's head, COPY).
The conditions (CPUs, PostgreSQL version, loop, batch size) are printed with
the figures; the server is shared with whatever else runs on it, so compare
figures from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import asyncpg
import orjson

from gateway.db import migrate
from gateway.db.engine import create_pg_pool
from gateway.dataplane.server import _RowIds
from gateway.records.audit import AuditLogHandler, AuditTrail, audit_log
from gateway.records.sinks import PostgresSink
from gateway.records.writer import COLUMNS, RecordWriter

ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLE = "request_logs"


def database_url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def build_rows(count: int, new_id=uuid.uuid4, start: datetime | None = None) -> list[tuple]:
    """Rows shaped like the data plane's: ids (`new_id()`), a tenant, a server, a status, sizes, an aware
    timestamp a microsecond apart from `start` (default: now)."""
    tenant, server = uuid.uuid4(), uuid.uuid4()
    start = datetime.now(timezone.utc) if start is None else start
    rows = []
    for i in range(count):
        failed = i % 20 == 0
        rows.append(
            (
                new_id(),
                tenant,
                uuid.uuid4(),
                uuid.uuid4(),
                server,
                "search",
                "tools/call",
                f"tool-{i % 13}",
                502 if failed else 200,
                -32603 if failed else None,
                "upstream timed out" if failed else None,
                3.5 + (i % 97) / 10,
                200 + i % 1000,
                1500 + i % 5000,
                "203.0.113.9",
                start + timedelta(microseconds=i),
            )
        )
    assert len(rows[0]) == len(COLUMNS[TABLE])
    return rows


def batches(rows: list[tuple], size: int) -> list[list[tuple]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


async def time_copy(pool: asyncpg.Pool, rows: list[tuple], batch: int) -> float:
    sink = PostgresSink(pool)
    columns = COLUMNS[TABLE]
    started = time.perf_counter()
    for chunk in batches(rows, batch):
        await sink.write(TABLE, columns, chunk)
    return time.perf_counter() - started


async def time_executemany(pool: asyncpg.Pool, rows: list[tuple], batch: int) -> float:
    columns = COLUMNS[TABLE]
    sql = (
        f"INSERT INTO {TABLE} ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})"
    )
    started = time.perf_counter()
    async with pool.acquire() as conn:
        for chunk in batches(rows, batch):
            async with conn.transaction():
                await conn.executemany(sql, chunk)
    return time.perf_counter() - started


async def truncate(pool: asyncpg.Pool, table: str = TABLE) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {table}")
        await conn.execute(f"VACUUM ANALYZE {table}")


async def count(pool: asyncpg.Pool, table: str = TABLE) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval(f"SELECT count(*) FROM {table}")


AUDIT_TENANTS = 4
# A tools/call body as a client sends it: what an audit entry decodes and sanitizes.
AUDIT_BODY = orjson.dumps({
    "jsonrpc": "2.0", "id": 7, "method": "tools/call",
    "params": {"name": "search", "arguments": {
        "query": "quarterly revenue by region", "limit": 10, "filters": {"region": ["emea", "apac"], "year": 2026},
        "auth": {"api_key": "sk-live-0123456789abcdefghijklmnop"},
    }, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
})


def audit_keys() -> list[SimpleNamespace]:
    return [SimpleNamespace(tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), id=uuid.uuid4(), role="USER")
            for _ in range(AUDIT_TENANTS)]


def audit_entries(trail: AuditTrail, keys: list[SimpleNamespace], count: int) -> list[tuple]:
    now = datetime.now(timezone.utc)
    return [trail.mcp_row(keys[i % len(keys)], "search", "tools/call", "search", AUDIT_BODY, 200, None, None,
                          3.5, "203.0.113.9", now) for i in range(count)]


async def measure_audit(pool: asyncpg.Pool, args: argparse.Namespace) -> dict[str, float]:
    """The audit trail's costs: request path, preparing (off it), chained writes; best of `--rounds` each."""
    trail = AuditTrail(log=True)
    trail.new_id = _RowIds().next  # what the data plane gives it: ids without a syscall each
    keys = audit_keys()
    count = args.audit_rows
    figures: dict[str, float] = {}
    sink = PostgresSink(pool)
    columns = COLUMNS["audit_logs"]
    entries = audit_entries(trail, keys, count)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    handler = AuditLogHandler(devnull)  # what `gateway serve` gives the gateway.audit logger
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    audit_log.propagate = False
    try:
        for _ in range(args.rounds):
            # Request path: build the row (raw body kept) and queue it.
            writer = RecordWriter(sink, batch_size=count + 1)
            submit = writer.submit
            now = datetime.now(timezone.utc)
            started = time.perf_counter()
            for i in range(count):
                submit("audit_logs", trail.mcp_row(keys[i & 3], "search", "tools/call", "search", AUDIT_BODY, 200,
                                                   None, None, 3.5, "203.0.113.9", now))
            best(figures, "request_path_ns", (time.perf_counter() - started) / count * 1e9)
            del writer

            # The flusher: decode + sanitize + bound, without and with the JSON log line.
            audit_log.setLevel(logging.WARNING)
            started = time.perf_counter()
            prepared = trail.prepare(entries)
            best(figures, "prepare_us", (time.perf_counter() - started) / count * 1e6)
            audit_log.addHandler(handler)
            audit_log.setLevel(logging.INFO)
            started = time.perf_counter()
            trail.prepare(entries)
            best(figures, "prepare_logged_us", (time.perf_counter() - started) / count * 1e6)
            audit_log.removeHandler(handler)

            # Chained writes, batch by batch, as the writer sends them.
            await truncate(pool, "audit_logs")
            started = time.perf_counter()
            for chunk in batches(prepared, args.batch):
                await sink.write("audit_logs", columns, chunk)
            seconds = time.perf_counter() - started
            assert await count_rows(pool) == count
            best(figures, "chained_seconds", seconds)
    finally:
        audit_log.removeHandler(handler)
        audit_log.propagate = True
        devnull.close()
    figures["chained_rows_per_s"] = count / figures.pop("chained_seconds")
    return figures


def best(figures: dict[str, float], name: str, value: float) -> None:
    figures[name] = min(figures.get(name, value), value)


async def count_rows(pool: asyncpg.Pool) -> int:
    return await count(pool, "audit_logs")


async def measure(url: str, args: argparse.Namespace) -> None:
    rows = build_rows(args.rows)
    pool = await create_pg_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            server_version = await conn.fetchval("SHOW server_version")
        methods = {"copy": time_copy, "executemany": time_executemany}
        best = dict.fromkeys(methods, float("inf"))
        for round_number in range(args.rounds):
            order = list(methods) if round_number % 2 == 0 else list(reversed(methods))
            for name in order:
                await truncate(pool)
                seconds = await methods[name](pool, rows, args.batch)
                assert await count(pool) == len(rows), name
                best[name] = min(best[name], seconds)
                rate = len(rows) / seconds
                print(f"  round {round_number + 1} {name:<12} {rate:>12,.0f} rows/s", flush=True)

        # The writer: what submit() costs the request path, then submit + stop() end to end.
        await truncate(pool)
        sink = PostgresSink(pool)
        writer = RecordWriter(sink, max_queue=len(rows), batch_size=args.batch)
        await writer.start()
        submit = writer.submit
        started = time.perf_counter()
        for row in rows:
            submit(TABLE, row)
        submit_seconds = time.perf_counter() - started
        await writer.stop(timeout=600)
        writer_seconds = time.perf_counter() - started
        assert writer.stats.written == len(rows) == await count(pool), writer.stats
        audit = await measure_audit(pool, args)
    finally:
        await pool.close()

    copy_rate = len(rows) / best["copy"]
    insert_rate = len(rows) / best["executemany"]
    print()
    print(f"COPY (PostgresSink.write)     {copy_rate:>12,.0f} rows/s")
    print(f"executemany INSERT (baseline) {insert_rate:>12,.0f} rows/s")
    print(f"ratio COPY / executemany      {copy_rate / insert_rate:>12.1f}x")
    print(f"RecordWriter.submit           {submit_seconds / len(rows) * 1e9:>12,.0f} ns/row (request path)")
    writer_rate = len(rows) / writer_seconds
    print(f"RecordWriter end to end       {writer_rate:>12,.0f} rows/s (submit all, stop() drains)")
    print()
    print("audit trail:")
    print(f"  request path (mcp_row + submit)    {audit['request_path_ns']:>9,.0f} ns/entry")
    print(f"  prepare (decode, sanitize, bound)  {audit['prepare_us']:>9,.1f} us/entry (in the flusher)")
    print(f"  prepare + JSON log line            {audit['prepare_logged_us']:>9,.1f} us/entry (log to /dev/null)")
    print(f"  chained write (locks, dedupe, COPY) {audit['chained_rows_per_s']:>8,.0f} rows/s")
    print()
    print("conditions:")
    print(f"  rows per method     {len(rows):,} {TABLE} rows, batches of {args.batch:,}")
    print(f"  audit               {args.audit_rows:,} entries over {AUDIT_TENANTS} tenants, a {len(AUDIT_BODY)}-byte "
          "tools/call body each (one secret to redact), batches as above; best of the rounds")
    print(f"  rounds              {args.rounds}, best of each reported")
    print(f"  PostgreSQL          {server_version} at {ADMIN_URL.rpartition('@')[2].rpartition('/')[0]}")
    print(f"  CPUs                {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})")
    python = f"{platform.python_version()} ({platform.python_implementation()}), {platform.machine()}"
    print(f"  Python              {python}")
    print(f"  asyncpg             {asyncpg.__version__}, event loop {args.loop}")


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows written by each method per round")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per batch (one transaction each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--audit-rows", type=int, default=50_000, help="audit entries for the audit figures")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()

    name = f"gwbench_{uuid.uuid4().hex[:12]}"
    url = database_url(name)
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        migrate.upgrade(url)
        print(f"database {name} (dropped at exit)", flush=True)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(measure(url, args))
        else:
            asyncio.run(measure(url, args))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    sys.exit(main())
