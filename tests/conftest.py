"""Shared fixtures: real PostgreSQL, real Redis, SQLite files, free ports.

Isolation: the schema is migrated once per run into a template database, and
every test that asks for PostgreSQL gets its own database cloned from it
(`CREATE DATABASE ... TEMPLATE`, a file copy, tens of milliseconds). Redis users
get a key prefix of their own. Nothing here is mocked.

TEST_PG_URL and TEST_REDIS_URL point the suite at other servers (they are not
GATEWAY_* variables on purpose: the gateway rejects unknown GATEWAY_* names).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from harness import RunningGateway, free_port, spawn_upstream, start_gateway, wait_for_port  # noqa: F401

from gateway.db import migrate

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# The suite runs in pytest-xdist workers, each a process of its own with its own RUN_ID:
# every database and Redis key below is named after it, so workers never share one.
RUN_ID = uuid.uuid4().hex[:8]


def _pg_url(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


async def _admin(*statements: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


# Held while a template is migrated. The migrations also change what is server-wide, not
# per database (CREATE ROLE gateway_tenant, GRANT it): on a fresh server, workers migrating
# their templates at once would race to create the same role.
_MIGRATION_LOCK = 0x6D637067  # pg_advisory_lock key: any constant of this suite's own


@contextlib.contextmanager
def _migration_lock():
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(PG_ADMIN_URL))
    try:
        loop.run_until_complete(conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK))
        yield
    finally:
        loop.run_until_complete(conn.close())  # ends the session, and so its lock
        loop.close()


@pytest.fixture(scope="session")
def pg_template() -> str:
    """A database migrated to head, used only as a template (one per worker: a template
    may have no other connection while a database is cloned from it)."""
    name = f"gwtpl_{RUN_ID}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    with _migration_lock():
        migrate.upgrade(_pg_url(name))
    yield name
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_template: str) -> str:
    """URL of a fresh database of this test's own, at the current schema."""
    name = f"gwt_{RUN_ID}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield _pg_url(name)
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_pg_url(pg_template: str) -> str:
    """URL of a fresh, empty database (no schema), for migration tests.

    After pg_template: what its migration creates server-wide (the role) exists by then,
    so tests migrating this database never race another worker to create it.
    """
    name = f"gwe_{RUN_ID}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    yield _pg_url(name)
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a migrated SQLite file of this test's own."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"gwtest:{RUN_ID}:{uuid.uuid4().hex[:8]}:"
    yield prefix

    async def cleanup() -> None:
        import redis.asyncio as redis

        client = redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(cleanup())


# Tests whose code paths differ between event loops (transports, subprocesses, stream
# reading, signal handling): these run on asyncio's loop and on uvloop. The rest is
# application logic over the same calls and runs on uvloop, the production loop.
BOTH_LOOPS = frozenset({
    "test_upstream_faults", "test_stdio_upstream", "test_stdio_e2e", "test_channel_upstreams",
    "test_bridge_transports", "test_stream_limits", "test_proxy_e2e", "test_relay_channels",
    "test_records_e2e", "test_writer", "test_audit_writer", "test_audit_e2e",
})


def pytest_asyncio_loop_factories(config, item):
    """The loops an async test runs on: both for BOTH_LOOPS modules, else uvloop.

    TEST_LOOPS=uvloop (or asyncio, or asyncio,uvloop) overrides it for every test,
    e.g. TEST_LOOPS=asyncio,uvloop runs the whole suite on both.
    """
    import uvloop

    factories = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    wanted = os.environ.get("TEST_LOOPS")
    if wanted:
        return {name: factories[name] for name in wanted.split(",")}
    if item.module.__name__.rpartition(".")[2] not in BOTH_LOOPS:
        return {"uvloop": factories["uvloop"]}
    return factories


# -- real MCP peers and a real gateway ---------------------------------------------------------
def _upstream(*flags: str):
    proc, url = spawn_upstream(*flags)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def mcp_upstream() -> str:
    """The demo MCP server (official SDK, both eras, SSE answers), once per run."""
    yield from _upstream()


@pytest.fixture(scope="session")
def mcp_upstream_json() -> str:
    """The same server answering with JSON bodies instead of SSE."""
    yield from _upstream("--json-response")


@pytest.fixture(scope="session")
def mcp_upstream_legacy() -> str:
    """The same server behaving like a 2025-11-25 one: it refuses 2026-07-28 requests."""
    yield from _upstream("--legacy-only")


@pytest.fixture(scope="session")
def mcp_upstream_modern() -> str:
    """The same server taking 2026-07-28 requests only: it refuses the 2025-era handshake."""
    yield from _upstream("--modern-only")


@pytest.fixture
async def gateway(pg_url):
    """A gateway on PostgreSQL (in this test's loop), bootstrapped, on free ports."""
    running = await start_gateway(pg_url)
    yield running
    await running.gateway.stop()


# What a gateway writes to or reads from, as fixtures: set up before make_gateway (below), torn down after it.
_STORES = ("pg_url", "empty_pg_url", "sqlite_url", "database_url", "redis_url", "redis_prefix")


@pytest.fixture
def _stores_first(request):
    """The test's databases and Redis prefix, set up before make_gateway whatever order the test names them
    in. pytest tears fixtures down in the reverse order: a gateway stopped after its database was dropped
    waits its writer's whole flush timeout (10 s) before giving up on the rows it still holds."""
    for name in _STORES:
        if name in request.fixturenames:
            request.getfixturevalue(name)


@pytest.fixture
async def make_gateway(_stores_first):
    """`await make_gateway(url, dataplane={...})`: a gateway with settings of the test's choosing."""
    started: list[RunningGateway] = []

    async def make(database_url: str, **sections) -> RunningGateway:
        running = await start_gateway(database_url, **sections)
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest.fixture(scope="module")
def stub_upstream() -> str:
    """loadtests/stub_upstream.py in a process of its own: the fast upstream of the load and worker tests."""
    port = free_port()
    stub = Path(__file__).resolve().parent.parent / "loadtests" / "stub_upstream.py"
    proc = subprocess.Popen([sys.executable, str(stub), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)
