"""Helpers the tests share that are not fixtures: ports, processes, a provisioned gateway.

The suite runs in parallel (pytest-xdist workers): nothing here may hand two workers the same
port, database or file.
"""

from __future__ import annotations

import fcntl
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


# Ports handed out by free_port(): below the kernel's ephemeral range, so no bind(("", 0))
# and no outgoing connection of any process takes one of them, and each locked (flock on a
# file per port) for the life of the process, so no other test process (xdist worker or a
# second pytest run on the machine) hands out the same one. A test may therefore stop a
# server and start it again on its port.
_PORT_RANGE = (20000, 32000)
_PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "mcp-gateway-test-ports"
_port_locks: list = []  # open lock files: the locks last as long as this process
_next_port: list[int] = []


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A local port nobody listens on, this process's alone until it exits."""
    low, high = _PORT_RANGE[0], min(_PORT_RANGE[1], _ephemeral_low())
    if not _next_port:  # a random start: concurrent processes rarely even try the same ports
        _next_port.append(random.randrange(low, high))
    _PORT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for _ in range(high - low):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < high else low
        lock = open(_PORT_LOCK_DIR / str(port), "a")  # noqa: SIM115 (kept open: it holds the lock)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another live process has it
            lock.close()
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use by something else (or lingering in TIME_WAIT)
                lock.close()
                continue
        _port_locks.append(lock)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


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


def spawn_upstream(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.upstream", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}/mcp"


# Rate limits far above what a test sends, so only the tests about limits meet them (they set
# their own); the defaults themselves are checked in test_config.py. For gateways a test
# starts, in process or as `gateway serve`.
GENEROUS_LIMITS = {
    "GATEWAY_LIMITS_GLOBAL_PER_MINUTE": "10000000",
    "GATEWAY_LIMITS_ROLES": '{"ADMIN": 1000000, "USER": 1000000, "SERVICE": 1000000, "READONLY": 1000000}',
    "GATEWAY_LIMITS_IP_PER_MINUTE": "10000000",
    "GATEWAY_LIMITS_ANONYMOUS_PER_MINUTE": "1000000",
}


def gateway_config(database_url: str, config_file=None, **sections):
    """A Config on free ports with `sections` ({"dataplane": {...}}) applied over `config_file` (TOML)."""
    from gateway import config

    env = {
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DATAPLANE_PORT": "0",
        "GATEWAY_CONTROLPLANE_PORT": "0",
        "GATEWAY_WRITER_FLUSH_INTERVAL": "0.05",
        "GATEWAY_SNAPSHOT_POLL_INTERVAL": "0.2",
        # Health probes only where a test asks for them (tests/registry/test_health.py): a probe is a
        # request the upstream counts and a transition is a configuration version, mid-test.
        "GATEWAY_UPSTREAMS_HEALTH_INTERVAL": "86400",
        **GENEROUS_LIMITS,
    }
    for section, values in sections.items():
        for key, value in values.items():
            env[f"GATEWAY_{section.upper()}_{key.upper()}"] = str(value)
    return config.load(config_file, env=env)


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
        self._stopped = False

    async def stop(self) -> None:
        """Stop the gateway, once (a test may stop it before what it writes through goes away; the fixture
        that started it stops it again at teardown)."""
        if not self._stopped:
            self._stopped = True
            await self.gateway.stop()

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
                return resp.status, (await resp.json()) if resp.status != 204 else None

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


# The operator key of each database this run bootstrapped (a second gateway on
# the same database shares it, as a second process in production would).
_OPERATOR_KEYS: dict[str, str] = {}


async def start_gateway(database_url: str, config_file=None, **sections) -> RunningGateway:
    from gateway.app import Gateway
    from gateway.controlplane import service
    from gateway.db.engine import create_engine

    if database_url not in _OPERATOR_KEYS:
        engine = create_engine(database_url)
        try:
            _OPERATOR_KEYS[database_url] = await service.bootstrap(engine)
        finally:
            await engine.dispose()
    gateway = Gateway(gateway_config(database_url, config_file, **sections))
    await gateway.start()
    return RunningGateway(gateway, _OPERATOR_KEYS[database_url])


class LocalPeer:
    """A test peer: an aiohttp app answering POSTs at `PATH` on a free loopback port.

    Subclasses give `_handle(request)`; `start()` returns the URL to reach it at.
    """

    PATH = "/mcp"
    _runner = None

    async def start(self) -> str:
        from aiohttp import web

        app = web.Application()
        app.router.add_post(self.PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}{self.PATH}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def verify_chains(url: str):
    """`chain.verify` of every audit chain in the database at `url` (its reports, one per chain)."""
    from gateway.db.engine import create_engine
    from gateway.records import chain

    engine = create_engine(url)
    try:
        return await chain.verify(engine)
    finally:
        await engine.dispose()
