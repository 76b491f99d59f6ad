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
import os
import socket
import uuid

import asyncpg
import pytest

from gateway.db import migrate

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
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


@pytest.fixture(scope="session")
def pg_template() -> str:
    """A database migrated to head, used only as a template."""
    name = f"gwtpl_{RUN_ID}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
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
def empty_pg_url() -> str:
    """URL of a fresh, empty database (no schema), for migration tests."""
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on asyncio's loop and on uvloop (the production loop).

    TEST_LOOPS=uvloop (or asyncio) narrows it, e.g. for a quick local run.
    """
    import uvloop

    factories = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    wanted = os.environ.get("TEST_LOOPS")
    if wanted:
        factories = {name: factories[name] for name in wanted.split(",")}
    return factories


# -- real MCP peers and a real gateway ---------------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def _spawn_upstream(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.upstream", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(scope="session")
def mcp_upstream() -> str:
    """The demo MCP server (official SDK, both eras, SSE answers), once per run."""
    proc, url = _spawn_upstream()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def mcp_upstream_json() -> str:
    """The same server answering with JSON bodies instead of SSE."""
    proc, url = _spawn_upstream("--json-response")
    yield url
    proc.terminate()
    proc.wait(10)


def gateway_config(database_url: str, **sections):
    """A Config on free ports with `sections` ({"dataplane": {...}}) applied."""
    from gateway import config

    env = {
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DATAPLANE_PORT": "0",
        "GATEWAY_CONTROLPLANE_PORT": "0",
        "GATEWAY_WRITER_FLUSH_INTERVAL": "0.05",
        "GATEWAY_SNAPSHOT_POLL_INTERVAL": "0.2",
    }
    for section, values in sections.items():
        for key, value in values.items():
            env[f"GATEWAY_{section.upper()}_{key.upper()}"] = str(value)
    return config.load(None, env=env)


@dataclass
class Tenancy:
    """One tenant with a user, a proxy key and a registered server, made through the admin API."""

    tenant_id: str
    user_id: str
    api_key: str
    api_key_id: str
    server_id: str
    server_name: str
    endpoint: str


class RunningGateway:
    def __init__(self, gateway, admin_key: str) -> None:
        self.gateway = gateway
        self.admin_key = admin_key

    @property
    def url(self) -> str:
        return self.gateway.dataplane_url

    @property
    def admin_url(self) -> str:
        return self.gateway.controlplane_url + "/api/v1"

    async def admin(self, method: str, path: str, json=None, key: str | None = None):
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.request(
                method,
                self.admin_url + path,
                json=json,
                headers={"Authorization": f"Bearer {key or self.admin_key}"},
            ) as resp:
                return resp.status, await resp.json()

    async def tenancy(self, name: str, upstream_url: str, *, server_name: str = "demo", **key_fields) -> Tenancy:
        status, tenant = await self.admin("POST", "/tenants", {"name": name})
        assert status == 201, tenant
        status, user = await self.admin(
            "POST", "/users",
            {"tenant_id": tenant["id"], "username": f"{name}-user", "email": f"{name}@example.com", "role": "USER"},
        )
        assert status == 201, user
        status, key = await self.admin(
            "POST", "/api-keys", {"user_id": user["id"], "name": f"{name}-key", "scopes": ["proxy"], **key_fields}
        )
        assert status == 201, key
        status, server = await self.admin(
            "POST", "/servers",
            {"tenant_id": tenant["id"], "name": server_name, "endpoint_url": upstream_url, "transport_type": "http"},
        )
        assert status == 201, server
        return Tenancy(
            tenant_id=tenant["id"], user_id=user["id"], api_key=key["key"], api_key_id=key["id"],
            server_id=server["id"], server_name=server_name, endpoint=f"{self.url}/servers/{server_name}/mcp",
        )


async def start_gateway(database_url: str, **sections) -> RunningGateway:
    from gateway.app import Gateway
    from gateway.controlplane import service
    from gateway.db.engine import create_engine

    engine = create_engine(database_url)
    try:
        admin_key = await service.bootstrap(engine)
    finally:
        await engine.dispose()
    gateway = Gateway(gateway_config(database_url, **sections))
    await gateway.start()
    return RunningGateway(gateway, admin_key)


@pytest.fixture
async def gateway(pg_url):
    """A gateway on PostgreSQL (in this test's loop), bootstrapped, on free ports."""
    running = await start_gateway(pg_url)
    yield running
    await running.gateway.stop()
