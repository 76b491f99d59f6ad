"""Request logs reach PostgreSQL: after a burst, and after SIGTERM in the middle of load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import asyncpg

from harness import GENEROUS_LIMITS, free_port, wait_for_port

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}


async def _count(pg_url: str, where: str = "true") -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM request_logs WHERE {where}")
    finally:
        await conn.close()


def _headers(key: str) -> dict:
    return {
        "Authorization": f"Bearer {key}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }


def _modern_call(i: int) -> dict:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "burst", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {**CALL, "id": i, "params": {**CALL["params"], "_meta": meta}}


async def test_burst_rows_counted_in_postgres(gateway, pg_url, mcp_upstream_json):
    t = await gateway.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=100_000)
    n = 400
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> int:
            async with http.post(t.endpoint, json=_modern_call(i), headers=_headers(t.api_key)) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(n)))
    assert statuses.count(200) == n
    await gateway.gateway.writer.flush()
    assert await _count(pg_url, "method = 'tools/call' AND tool_name = 'echo' AND status_code = 200") == n
    assert gateway.gateway.writer.stats.dropped == 0


async def test_sigterm_flushes_every_answered_request(pg_url, mcp_upstream_json, tmp_path):
    """A real `gateway serve` process, under load, stopped by SIGTERM: nothing answered is lost."""
    from gateway.controlplane import schemas, service
    from gateway.db.engine import create_engine

    engine = create_engine(pg_url)
    try:
        await service.bootstrap(engine)
        actor = await service.operator_actor(engine)
        tenant = await service.create_tenant(engine, actor, schemas.TenantCreate(name="acme"))
        user = await service.create_user(
            engine, actor, schemas.UserCreate(username="u", email="u@example.com", tenant_id=tenant["id"])
        )
        key = (
            await service.create_api_key(
                engine, actor, schemas.ApiKeyCreate(user_id=user["id"], name="k", rate_limit_per_hour=100_000)
            )
        )["key"]
        await service.create_server(
            engine, actor, schemas.ServerCreate(name="demo", endpoint_url=mcp_upstream_json, tenant_id=tenant["id"])
        )
    finally:
        await engine.dispose()

    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_DATABASE_URL": pg_url,
        "GATEWAY_DATAPLANE_PORT": str(port),
        "GATEWAY_CONTROLPLANE_ENABLED": "false",
        # A long interval: rows must leave at shutdown, not on the timer.
        "GATEWAY_WRITER_FLUSH_INTERVAL": "60",
        "GATEWAY_WRITER_BATCH_SIZE": "100000",
        **GENEROUS_LIMITS,
    }
    # stderr to a file, not a pipe nobody reads: the gateway logs every audit entry there, and a
    # full pipe would stop it.
    log_path = tmp_path / "stderr.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, stderr=log_file)
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        endpoint = f"http://127.0.0.1:{port}/servers/demo/mcp"
        answered = 0
        stop = asyncio.Event()

        async def client(http: aiohttp.ClientSession, worker: int) -> None:
            nonlocal answered
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    async with http.post(endpoint, json=_modern_call(i), headers=_headers(key)) as resp:
                        text = await resp.read()
                        assert resp.status == 200, (resp.status, text)
                        answered += 1
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                    return  # the gateway has closed its listener

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            workers = [asyncio.create_task(client(http, w)) for w in range(8)]
            deadline = asyncio.get_running_loop().time() + 60
            while answered < 200:
                # A client that ended before the SIGTERM failed (or the gateway went away):
                # its error, now, instead of waiting for answers that will never come.
                ended = [w for w in workers if w.done()]
                if ended:
                    stop.set()
                    await asyncio.gather(*workers)
                    raise AssertionError(f"a client ended after {answered} answers, before the SIGTERM")
                assert asyncio.get_running_loop().time() < deadline, f"only {answered} answers in 60 s"
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            stop.set()
            await asyncio.gather(*workers)
        assert code == 0, log_path.read_text()
        assert answered >= 200
        recorded = await _count(pg_url, "method = 'tools/call'")
        # Every request the gateway answered has its row; a request cut off by
        # the shutdown may have a row too (status 499), never the reverse.
        assert recorded >= answered
        assert await _count(pg_url, "status_code = 200") == answered
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()


async def test_request_logs_off_writes_no_request_rows_but_keeps_the_audit_trail(make_gateway, pg_url,
                                                                                   mcp_upstream_json):
    """`[writer] request_logs = false` (for measuring what records cost): no request_logs or server_metrics rows;
    the audit trail is its own switch and still gets every entry."""
    gw = await make_gateway(pg_url, writer={"request_logs": False, "server_metrics_window": 0.05})
    t = await gw.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=100_000)
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            async with http.post(t.endpoint, json=_modern_call(i), headers=_headers(t.api_key)) as resp:
                assert resp.status == 200, await resp.text()
    await asyncio.sleep(0.2)  # several server_metrics windows
    await gw.gateway.writer.flush()
    assert await _count(pg_url) == 0
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM server_metrics") == 0
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'mcp.tools/call'") == 5
    finally:
        await conn.close()
