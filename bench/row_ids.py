"""Benchmark: what record rows' ids cost the database as a table grows, random (version 4) against time-ordered
(version 7, what `gateway._fast.ids.RowIds` draws).

    python bench/row_ids.py                          # SQLite and PostgreSQL, 300,000 rows each way
    python bench/row_ids.py --rows 1000000 --database sqlite
    BENCH_PG_URL=postgresql://user@host:5432/postgres python bench/row_ids.py --database postgres

Every request_logs row and audit entry has a UUID primary key, so each insert
also goes into that key's B-tree. A random id lands anywhere in it: once the
index outgrows the database's cache, most inserts read and dirty a page that
no recent insert touched. A version 7 id starts with the time, so a batch's
ids go in side by side at the index's right edge.

For each kind of id and each database, it makes a migrated database of its own
(a temporary SQLite file; `gwbench_ids_<random>` on the server BENCH_PG_URL
names, default postgres@127.0.0.1:5432, dropped at the end), then writes
`--rows` request_logs rows through the writer's own sink (`SQLiteSink`,
`PostgresSink`: executemany, COPY) in batches of `--batch`. The rows are
`bench_writer.py`'s (shaped as the data plane's: a tenant, a server, a failure
in twenty, an aware time a microsecond apart), only the ids differing. It
reports the CPU a row cost in the last `--tail` rows (the table at its
fullest): this process's for SQLite (the driver's thread included), the
PostgreSQL backend's (read from /proc: the server must run on this machine)
for PostgreSQL; and the ratio of version 4 to version 7. The two kinds run one
after the other, twice, in alternating order; the better run of each counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

from bench_writer import TABLE, build_rows  # bench/, this script's directory
from proxy import process_cpu_seconds

from gateway._fast.ids import COMPILED, RowIds
from gateway.db import migrate
from gateway.db.engine import create_engine, create_pg_pool
from gateway.records.sinks import PostgresSink, SQLiteSink
from gateway.records.writer import COLUMNS

ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def sqlite_run(kind: str, args: argparse.Namespace, work: Path) -> float:
    url = f"sqlite:///{work / f'{kind}-{time.monotonic_ns()}.db'}"
    migrate.upgrade(url)
    sink = SQLiteSink(create_engine(url))
    try:
        return await _write(sink, kind, args, time.process_time)
    finally:
        await sink.close()


async def postgres_run(kind: str, args: argparse.Namespace) -> float:
    name = f"gwbench_ids_{uuid.uuid4().hex[:12]}"
    base, _, _ = ADMIN_URL.rpartition("/")
    url = f"{base}/{name}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await asyncio.to_thread(migrate.upgrade, url)
            pool = await create_pg_pool(url, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                return await _write(PostgresSink(pool), kind, args, lambda: process_cpu_seconds(pid))
            finally:
                await pool.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _write(sink, kind: str, args: argparse.Namespace, cpu) -> float:
    new_id = uuid.uuid4 if kind == "v4" else RowIds().next
    start = datetime.now(timezone.utc)
    columns = COLUMNS[TABLE]
    written, spent = 0, 0.0
    while written < args.rows:
        batch = build_rows(min(args.batch, args.rows - written), new_id, start + timedelta(microseconds=written))
        before = cpu()
        await sink.write(TABLE, columns, batch)
        if written >= args.rows - args.tail:
            spent += cpu() - before
        written += len(batch)
    return spent / min(args.tail, args.rows) * 1e6


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gwbench-ids-") as work:
        for database in (["sqlite", "postgres"] if args.database == "both" else [args.database]):
            best = {"v4": float("inf"), "v7": float("inf")}
            for order in (("v4", "v7"), ("v7", "v4")):
                for kind in order:
                    if database == "sqlite":
                        figure = await sqlite_run(kind, args, Path(work))
                    else:
                        figure = await postgres_run(kind, args)
                    print(f"  {database} {kind}: {figure:.2f} us of CPU a row over the last {args.tail:,} rows",
                          file=sys.stderr)
                    best[kind] = min(best[kind], figure)
            who = "this process (the driver's thread too)" if database == "sqlite" else "the backend"
            print(f"{database:<9} version 4 {best['v4']:7.2f} us a row, version 7 {best['v7']:7.2f} us a row: "
                  f"{best['v4'] / best['v7']:.2f}x for random ids   (CPU of {who})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--rows", type=int, default=300_000, help="rows written with each kind of id")
    parser.add_argument("--batch", type=int, default=2_000, help="rows per write (the writer's batch size)")
    parser.add_argument("--tail", type=int, default=100_000, help="the last rows, whose CPU is reported")
    args = parser.parse_args()
    if args.rows < 1 or args.batch < 1 or not 0 < args.tail <= args.rows:
        parser.error("--rows and --batch must be positive, --tail between 1 and --rows")
    asyncio.run(measure(args))
    print(f"\nconditions: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), CPython "
          f"{platform.python_version()}, ids compiled: {COMPILED}, {args.rows:,} request_logs rows per run in "
          f"batches of {args.batch:,}, CPU over the last {args.tail:,}; best of 2 runs per kind, alternating")


if __name__ == "__main__":
    main()
