"""`gateway serve --workers N`: workers share the ports, a killed one comes back, SIGTERM loses nothing.

Real processes: the supervisor is `python -m gateway serve --workers 2` on PostgreSQL and Redis,
its workers are its children, the upstream is the load tests' stub. Which worker answered is in
`X-Gateway-Worker` / `X-Gateway-Pid` (on /healthz and /metrics) and in the merged /metrics.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from harness import GENEROUS_LIMITS, free_port, wait_for_port

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"
MODERN = "2026-07-28"


async def _provision(pg_url: str, upstream: str) -> tuple[str, str]:
    """(operator key, a proxy key of a tenant with server `stub`), written to the database directly."""
    from gateway.controlplane import schemas, service
    from gateway.db.engine import create_engine

    engine = create_engine(pg_url)
    try:
        admin_key = await service.bootstrap(engine)
        actor = await service.operator_actor(engine)
        tenant = await service.create_tenant(engine, actor, schemas.TenantCreate(name="acme"))
        user = await service.create_user(
            engine, actor, schemas.UserCreate(username="u", email="u@example.com", tenant_id=tenant["id"])
        )
        key = await service.create_api_key(
            engine, actor, schemas.ApiKeyCreate(user_id=user["id"], name="k", rate_limit_per_hour=100_000)
        )
        await service.create_server(
            engine, actor, schemas.ServerCreate(name="stub", endpoint_url=upstream, tenant_id=tenant["id"])
        )
    finally:
        await engine.dispose()
    return admin_key, key["key"]


class Supervised:
    """`gateway serve --workers 2` in a session of its own (so teardown reaches every worker)."""

    def __init__(self, env: dict, log_path: Path) -> None:
        self.port = int(env["GATEWAY_DATAPLANE_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--workers", "2"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture
def supervised(pg_url, redis_url, redis_prefix, stub_upstream, tmp_path):
    admin_key, key = asyncio.run(_provision(pg_url, stub_upstream))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({
        "GATEWAY_DATABASE_URL": pg_url, "GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_KEY_PREFIX": redis_prefix,
        "GATEWAY_DATAPLANE_PORT": str(free_port()), "GATEWAY_CONTROLPLANE_PORT": str(free_port()),
        # Rows must leave at shutdown, not on the timer: what SIGTERM flushes is what is counted.
        "GATEWAY_WRITER_FLUSH_INTERVAL": "60", "GATEWAY_WRITER_BATCH_SIZE": "100000",
        "GATEWAY_UPSTREAMS_HEALTH_INTERVAL": "86400",
        **GENEROUS_LIMITS,
    })
    gateway = Supervised(env, tmp_path / "supervisor.log")
    gateway.admin_key, gateway.key = admin_key, key
    try:
        wait_for_port(gateway.port, gateway.process, timeout=60)
        yield gateway
    finally:
        gateway.close()


async def _healthz_worker(url: str) -> tuple[str, str]:
    """(worker index, pid) of the worker a new connection reached."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            return resp.headers["X-Gateway-Worker"], resp.headers["X-Gateway-Pid"]


async def _workers_seen(url: str, want: int, timeout: float = 60.0, exclude_pids=()) -> dict[str, str]:
    """Ask on new connections until `want` distinct workers (not among exclude_pids) have answered."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only workers {seen} answered within {timeout}s"
        try:
            index, pid = await _healthz_worker(url)
        except aiohttp.ClientConnectionError:  # a worker starting or gone: its connection fails, ask again
            await asyncio.sleep(0.1)
            continue
        if pid not in exclude_pids:
            seen[index] = pid
    return seen


async def _metrics(url: str, admin_key: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"}) as resp:
            assert resp.status == 200
            return await resp.text()


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match is not None, f"{series} not in\n{text}"
    return float(match.group(1))


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _call(i: int) -> dict:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": meta}}


def _headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}


async def _count_rows(pg_url: str, where: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM request_logs WHERE {where}")
    finally:
        await conn.close()


async def test_two_workers_serve_one_port_and_a_killed_one_comes_back(supervised):
    gw = supervised
    workers = await _workers_seen(gw.url, 2)
    assert set(workers) == {"0", "1"} and len(set(workers.values())) == 2
    assert all(_parent(int(pid)) == gw.process.pid for pid in workers.values())

    # Calls on new connections land on both workers; /metrics (any worker) sums them and names each.
    calls = 40
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(calls):
            async with http.post(f"{gw.url}/servers/stub/mcp", json=_call(i), headers=_headers(gw.key)) as resp:
                assert resp.status == 200, await resp.text()
    text = await _metrics(gw.url, gw.admin_key)
    assert _value(text, 'gateway_requests_total{tenant="acme",server="stub",method="tools/call",status="200"}') == calls
    per_worker = [_value(text, f'gateway_worker_requests_total{{worker="{w}"}}') for w in ("0", "1")]
    assert sum(per_worker) == calls and all(n > 0 for n in per_worker), per_worker
    assert _value(text, 'gateway_workers{state="answering"}') == 2
    for index, pid in workers.items():
        assert _value(text, f'gateway_worker_info{{worker="{index}",pid="{pid}"}}') == 1

    # SIGKILL one worker: the supervisor starts another in its slot, which serves.
    os.kill(int(workers["0"]), signal.SIGKILL)
    replaced = await _workers_seen(gw.url, 2, exclude_pids={workers["0"]})
    assert replaced["1"] == workers["1"] and replaced["0"] != workers["0"]
    assert _parent(int(replaced["0"])) == gw.process.pid
    assert gw.process.poll() is None
    text = await _metrics(gw.url, gw.admin_key)
    assert _value(text, 'gateway_worker_restarts{worker="0"}') == 1
    assert _value(text, 'gateway_worker_restarts{worker="1"}') == 0
    assert "was killed by signal 9" in gw.output()

    gw.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.process.wait, 60) == 0, gw.output()
    for pid in replaced.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def test_sigterm_under_load_answers_and_records_every_accepted_request(supervised, pg_url):
    gw = supervised
    await _workers_seen(gw.url, 2)
    endpoint = f"{gw.url}/servers/stub/mcp"
    answered = 0
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal answered
        i = 0
        async with http:
            while not stop.is_set():
                i += 1
                try:
                    async with http.post(endpoint, json=_call(i), headers=_headers(gw.key)) as resp:
                        text = await resp.read()
                        assert resp.status == 200, (resp.status, text)  # accepted means answered, in full
                        answered += 1
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                    return  # its worker closed the listener: not accepted, never answered

    # 16 keep-alive connections, one per client: the kernel spreads them over both workers' sockets (one
    # session for all sixteen opens only as many connections as are busy at once).
    def one_connection() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=30))

    clients = [asyncio.create_task(client(one_connection())) for _ in range(16)]
    deadline = time.monotonic() + 60
    per_worker = [0.0, 0.0]
    # Until both workers are under load: 300 answers, and each worker has answered some (under a loaded
    # suite one worker can be slow to start answering while the other has answered hundreds).
    while answered < 300 or not all(n > 0 for n in per_worker):
        ended = [c for c in clients if c.done()]
        if ended:
            stop.set()
            await asyncio.gather(*clients)
            raise AssertionError(f"a client ended after {answered} answers, before the SIGTERM")
        assert time.monotonic() < deadline, f"{answered} answers in 60 s, by worker: {per_worker}"
        await asyncio.sleep(0.05)
        if answered >= 300:
            text = await _metrics(gw.url, gw.admin_key)
            per_worker = [_value(text, f'gateway_worker_requests_total{{worker="{w}"}}') for w in ("0", "1")]
    gw.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(gw.process.wait, 60)
    stop.set()
    await asyncio.gather(*clients)
    assert code == 0, gw.output()
    assert "all workers stopped" in gw.output()
    # Every answered call has its row (flushed at shutdown: the flush interval is a minute); a call cut
    # off by the shutdown may have a row too (499), never the reverse.
    assert await _count_rows(pg_url, "method = 'tools/call' AND status_code = 200") == answered
    assert await _count_rows(pg_url, "method = 'tools/call'") >= answered


@pytest.mark.parametrize("case", ["no redis", "sqlite", "unmigrated"])
def test_workers_refuse_what_they_cannot_share(case, redis_url, tmp_path, request):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_DATAPLANE_PORT": str(free_port()), "GATEWAY_CONTROLPLANE_PORT": str(free_port()),
                # Never reached in the first two cases: the configuration is refused before any connection.
                "GATEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "GATEWAY_REDIS_URL": redis_url})
    if case == "no redis":
        del env["GATEWAY_REDIS_URL"]
        expected = "needs Redis"
    elif case == "sqlite":
        env["GATEWAY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'gateway.db'}"
        expected = "needs PostgreSQL"
    else:
        env["GATEWAY_DATABASE_URL"] = request.getfixturevalue("empty_pg_url")
        expected = "run `gateway migrate`"
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    # Said once, by the supervisor, before any worker started.
    assert done.stderr.count(expected) == 1, done.stderr
    assert "worker 0 started" not in done.stderr
