"""The audit trail end to end: a real gateway, real PostgreSQL, the SDK demo server as upstream.

- Completeness: N operations of every kind (MCP calls and lists, calls refused with 403 and 429,
  a bridged WebSocket call, admin writes, reads and a refused read) give exactly N entries each,
  with who, what, when, how long and how it ended.
- Secrets in nested parameters (and admin bodies) reach neither the database nor the log.
- PostgreSQL cut in the middle of a burst (tests/tcp_relay.py): every entry arrives exactly once,
  in order, and the chains verify.
- `gateway serve` stopped by SIGTERM under load writes every entry; stopped while PostgreSQL is
  unreachable, it spills them and the next start replays them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from harness import GENEROUS_LIMITS, free_port, wait_for_port
from tcp_relay import TcpRelay

from harness import verify_chains
from gateway._fast import auditentry
from gateway.db.engine import create_engine

N = 5
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "audit-test", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def _headers(key: str, method: str, name: str | None = None) -> dict:
    headers = {
        "Authorization": f"Bearer {key}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def _message(i: int, method: str, params: dict | None = None) -> dict:
    return {"jsonrpc": "2.0", "id": i, "method": method, "params": {**(params or {}), "_meta": META}}


async def _post(http, url: str, key: str, i: int, method: str, params: dict | None = None) -> tuple[int, dict]:
    name = (params or {}).get("name")
    async with http.post(url, json=_message(i, method, params), headers=_headers(key, method, name)) as resp:
        return resp.status, await resp.json(content_type=None)


async def _rows(pg_url: str, where: str = "true", *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetch(f"SELECT *, details::text AS details_text FROM audit_logs WHERE {where} "
                                "ORDER BY tenant_id, chain_seq", *args)
    finally:
        await conn.close()


def _kinds(rows) -> Counter:
    return Counter((r["action"], r["outcome"], r["error_code"]) for r in rows)


_verify = verify_chains  # tests/harness.py


# ------------------------------------------------------------------ completeness


async def test_every_authenticated_operation_has_exactly_one_entry(pg_url, make_gateway, mcp_upstream_json,
                                                                   tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.audit")
    gw = await make_gateway(pg_url, writer={"spill_dir": tmp_path})
    t = await gw.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=100_000)
    status, limited = await gw.admin("POST", "/api-keys", {"user_id": t.user_id, "name": "limited",
                                                           "scopes": ["proxy"], "rate_limit_per_hour": 2})
    assert status == 201
    status, rule = await gw.admin("POST", "/access-rules", {"tenant_id": t.tenant_id, "effect": "deny",
                                                            "server_name": "demo", "tool": "add"})
    assert status == 201, rule
    await gw.gateway.writer.flush()
    before = _kinds(await _rows(pg_url))
    compiled_before = auditentry.fallbacks()

    async with aiohttp.ClientSession() as http:
        for i in range(N):
            status, body = await _post(http, t.endpoint, t.api_key, i, "tools/call",
                                       {"name": "echo", "arguments": {"text": f"call {i}"}})
            assert status == 200 and "result" in body, body
            status, body = await _post(http, t.endpoint, t.api_key, i, "tools/list")
            assert status == 200 and "result" in body
            status, body = await _post(http, t.endpoint, t.api_key, i, "tools/call",
                                       {"name": "add", "arguments": {"a": 1, "b": 2}})
            assert status == 403 and body["error"]["code"] == -32031, body
        for i in range(N + 2):
            status, body = await _post(http, t.endpoint, limited["key"], i, "tools/call",
                                       {"name": "echo", "arguments": {"text": "limited"}})
            assert status == (200 if i < 2 else 429), body
        # One call through the 2024-11-05 WebSocket bridge (bridge.py records through the same path).
        ws_url = f"{gw.url.replace('http://', 'ws://')}/servers/demo/ws"
        async with http.ws_connect(ws_url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "ws", "version": "1"}}}))
            while (await asyncio.wait_for(ws.receive_json(), 10)).get("id") != 1:
                pass
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                          "params": {"name": "echo", "arguments": {"text": "over-websocket"}}}))
            while (await asyncio.wait_for(ws.receive_json(), 10)).get("id") != 2:
                pass
    for i in range(N):
        status, _ = await gw.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": f"u{i}",
                                                      "email": f"u{i}@example.com", "role": "USER"})
        assert status == 201
        status, _ = await gw.admin("GET", "/servers")
        assert status == 200
        status, _ = await gw.admin("GET", "/servers", key=t.api_key)  # a proxy-only key: refused, but it is a caller
        assert status == 403
    await gw.gateway.writer.flush()

    rows = await _rows(pg_url)
    new = _kinds(rows) - before
    assert new[("mcp.tools/call", "success", None)] == N + 2 + 1
    assert new[("mcp.tools/list", "success", None)] == N
    assert new[("mcp.tools/call", "error", -32031)] == N
    assert new[("mcp.tools/call", "error", -32034)] == N
    assert new[("admin.users.write", "success", None)] == N
    assert new[("admin.servers.read", "success", None)] == N
    assert new[("admin.servers.read", "error", 403)] == N
    assert new[("mcp.initialize", "success", None)] == 1  # the bridged connection's handshake

    # Who, what, when, how long, how it ended.
    call = next(r for r in rows if r["action"] == "mcp.tools/call" and '"call 0"' in r["details_text"])
    assert (str(call["tenant_id"]), str(call["user_id"]), str(call["api_key_id"])) == \
        (t.tenant_id, t.user_id, t.api_key_id)
    assert (call["role"], call["client_ip"], call["resource_type"], call["resource_id"]) == \
        ("USER", "127.0.0.1", "tool", "echo")
    assert call["duration_ms"] > 0 and call["created_at"] is not None and call["chain_seq"] >= 1
    details = json.loads(call["details_text"])
    assert details["server"] == "demo" and details["status"] == 200
    assert details["params"]["arguments"] == {"text": "call 0"}
    refused = next(r for r in rows if r["error_code"] == -32031)
    assert refused["resource_id"] == "add" and json.loads(refused["details_text"])["status"] == 403
    assert "error" in json.loads(refused["details_text"])
    limited_row = next(r for r in rows if r["error_code"] == -32034)
    assert str(limited_row["api_key_id"]) == limited["id"]
    listing = next(r for r in rows if r["action"] == "mcp.tools/list")
    assert (listing["resource_type"], listing["resource_id"]) == ("server", "demo")
    over_ws = [r for r in rows if "over-websocket" in r["details_text"]]
    assert len(over_ws) == 1 and over_ws[0]["action"] == "mcp.tools/call"
    admin_write = next(r for r in rows if r["action"] == "admin.users.write" and '"u0"' in r["details_text"])
    assert admin_write["role"] == "ADMIN" and admin_write["resource_type"] == "users"
    admin_details = json.loads(admin_write["details_text"])
    assert (admin_details["method"], admin_details["path"], admin_details["status"]) == ("POST", "/api/v1/users", 201)
    assert admin_details["body"]["username"] == "u0"
    assert uuid.UUID(admin_write["resource_id"])  # the id of the user it created
    denied = next(r for r in rows if r["action"] == "admin.servers.read" and r["outcome"] == "error")
    assert json.loads(denied["details_text"])["error"]["code"] == "forbidden"

    # Dual logging: each entry is also one JSON line on gateway.audit, with the same id.
    logged = {json.loads(r.getMessage())["id"] for r in caplog.records if r.name == "gateway.audit"}
    assert {str(r["id"]) for r in rows} <= logged
    assert all(report.ok for report in await _verify(pg_url))
    # Every head and log line of those entries was written by the compiled core, none left to its twin
    # (the twin writes the same bytes, slower): the values a gateway holds are the types it writes itself.
    assert auditentry.fallbacks() == compiled_before


# ------------------------------------------------------------------ sanitizing


async def test_secrets_reach_neither_the_database_nor_the_log(pg_url, make_gateway, mcp_upstream_json, tmp_path,
                                                              caplog):
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(pg_url, writer={"spill_dir": tmp_path}, audit={"redact_keys": "employee_number"})
    t = await gw.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=100_000)
    status, _ = await gw.admin("PATCH", f"/tenants/{t.tenant_id}",
                               {"settings": {"audit_redact_keys": ["customer_ref"]}})
    assert status == 200
    for _ in range(100):  # the tenant's names reach the snapshot the writer reads them from
        tenant = gw.gateway.store.current.tenants.get(uuid.UUID(t.tenant_id))
        if tenant is not None and tenant.audit_redact_keys == ("customer_ref",):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the tenant's audit_redact_keys never reached the snapshot")

    secrets = {
        "password": "Hunter2-Pa55-0001",
        "connection": "S3cretInUrl0002",
        "bearer": "opaque.token-0003_value",
        "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIwMDA0In0.c2lnbmF0dXJlMDAwNA",
        "own_key": t.api_key.rsplit("_", 1)[1],
        "tenant_name": "CustRef-0006-zz",
        "deployment_name": "Emp-0007-qq",
        "aws": "AKIAABCDEFGHIJ000008",
        "header": "UpstreamHeader-0009-xyz",
        "legacy": "legacy-token-0010-abcdefgh",
    }
    arguments = {
        "text": "hello",
        "login": {"user": "bob", "password": secrets["password"]},
        "config": {"db": [{"dsn": f"postgres://bob:{secrets['connection']}@db.example/app"}]},
        "headers": [{"X-Request": f"Authorization: Bearer {secrets['bearer']}"}],
        "note": f"token {secrets['jwt']} and my key {t.api_key}",
        "deep": {"a": {"b": {"c": {"customer_ref": secrets["tenant_name"], "employee_number": secrets["deployment_name"]}}}},
        "aws": [[[f"id={secrets['aws']}"]]],
    }
    async with aiohttp.ClientSession() as http:
        status, body = await _post(http, t.endpoint, t.api_key, 1, "tools/call", {"name": "echo", "arguments": arguments})
        assert status == 200, body
    status, _ = await gw.admin("PUT", f"/servers/{t.server_id}/auth", {"auth": {
        "kind": "header", "header_name": "X-Upstream-Key", "header_value": secrets["header"]}})
    assert status == 200
    status, _ = await gw.admin("POST", "/api-keys/import", {"user_id": t.user_id, "name": "old",
                                                            "key": secrets["legacy"]})
    assert status == 201
    await gw.gateway.writer.flush()

    rows = await _rows(pg_url)
    assert any(r["action"] == "mcp.tools/call" and "[REDACTED]" in r["details_text"] for r in rows)
    assert any(r["action"] == "admin.servers.write" and "X-Upstream-Key" in r["details_text"] for r in rows)
    assert any(r["action"] == "admin.keys.import" for r in rows)
    conn = await asyncpg.connect(pg_url)
    try:
        for name, secret in secrets.items():
            found = await conn.fetchval("SELECT count(*) FROM audit_logs WHERE audit_logs::text LIKE $1", f"%{secret}%")
            assert found == 0, f"{name} reached audit_logs"
    finally:
        await conn.close()
    messages = [r.getMessage() for r in caplog.records] + [str(getattr(r, "audit", "")) for r in caplog.records]
    assert any("[REDACTED]" in m for m in messages)
    for name, secret in secrets.items():
        assert not any(secret in m for m in messages), f"{name} reached the log"


# ------------------------------------------------------------------ PostgreSQL goes away


def _through(relay: TcpRelay, url: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{relay.port}"))


async def test_postgres_cut_during_a_burst_loses_and_duplicates_nothing(pg_url, make_gateway, mcp_upstream_json,
                                                                        tmp_path):
    parts = urlsplit(pg_url)
    relay = await TcpRelay(parts.hostname, parts.port or 5432).start()
    gw = None
    try:
        spill = tmp_path / "spill"
        gw = await make_gateway(_through(relay, pg_url), writer={"spill_dir": spill, "flush_interval": 0.05})
        tenancies = [await gw.tenancy(name, mcp_upstream_json, rate_limit_per_hour=100_000)
                     for name in ("acme", "globex")]
        await gw.gateway.writer.flush()
        answered: list[str] = []
        async with aiohttp.ClientSession() as http:

            async def client(worker: int, count: int) -> None:
                t = tenancies[worker % 2]
                for i in range(count):
                    marker = f"w{worker}-{i}-{uuid.uuid4().hex[:6]}"
                    status, body = await _post(http, t.endpoint, t.api_key, i, "tools/call",
                                               {"name": "echo", "arguments": {"text": marker}})
                    assert status == 200, body
                    answered.append(marker)

            first = asyncio.gather(*(client(w, 40) for w in range(6)))
            await asyncio.sleep(0.3)
            relay.cut()  # in the middle of the burst
            await first
            await asyncio.gather(*(client(w, 20) for w in range(6)))  # the outage goes on

            async def spilled() -> bool:
                return gw.gateway.writer.stats.spilled > 0

            for _ in range(200):
                if await spilled():
                    break
                await asyncio.sleep(0.05)
            assert await spilled(), gw.gateway.writer.stats
            assert any(name.endswith(".spill") for name in os.listdir(spill))
            relay.restore()
            await asyncio.gather(*(client(w, 10) for w in range(6)))  # after it

        for _ in range(3):  # the flusher may be in a backoff the first time
            try:
                await gw.gateway.writer.flush()
                break
            except Exception:  # noqa: BLE001 - the database just came back
                await asyncio.sleep(1)
        rows = await _rows(pg_url, "action = 'mcp.tools/call'")
        markers = [json.loads(r["details_text"])["params"]["arguments"]["text"] for r in rows]
        assert len(markers) == len(answered) == 6 * 70
        assert sorted(markers) == sorted(answered)  # each exactly once
        for t in tenancies:
            chain_rows = await _rows(pg_url, "tenant_id = $1", uuid.UUID(t.tenant_id))
            assert [r["chain_seq"] for r in chain_rows] == list(range(1, len(chain_rows) + 1))
            times = [r["created_at"] for r in chain_rows]
            assert times == sorted(times)  # in the order they happened
        assert all(report.ok for report in await _verify(pg_url))
        assert not any(name.endswith(".spill") for name in os.listdir(spill))
        assert gw.gateway.writer.stats.spilled == 0
    finally:
        if gw is not None:
            await gw.stop()  # before the relay it writes through, or it waits its writer's timeout out
        await relay.stop()


# ------------------------------------------------------------------ SIGTERM


async def _provision(pg_url: str, upstream: str) -> str:
    from gateway.controlplane import schemas, service

    engine = create_engine(pg_url)
    try:
        await service.bootstrap(engine)
        actor = await service.operator_actor(engine)
        tenant = await service.create_tenant(engine, actor, schemas.TenantCreate(name="acme"))
        user = await service.create_user(
            engine, actor, schemas.UserCreate(username="u", email="u@example.com", tenant_id=tenant["id"])
        )
        key = (await service.create_api_key(
            engine, actor, schemas.ApiKeyCreate(user_id=user["id"], name="k", rate_limit_per_hour=100_000)
        ))["key"]
        await service.create_server(
            engine, actor, schemas.ServerCreate(name="demo", endpoint_url=upstream, tenant_id=tenant["id"])
        )
    finally:
        await engine.dispose()
    return key


def _serve(database_url: str, port: int, spill, log_path) -> tuple[subprocess.Popen, object]:
    env = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DATAPLANE_PORT": str(port),
        "GATEWAY_CONTROLPLANE_ENABLED": "false",
        # Rows leave at shutdown, not on the timer.
        "GATEWAY_WRITER_FLUSH_INTERVAL": "60",
        "GATEWAY_WRITER_BATCH_SIZE": "100000",
        "GATEWAY_WRITER_SHUTDOWN_TIMEOUT": "3",
        "GATEWAY_WRITER_SPILL_DIR": str(spill),
        "GATEWAY_UPSTREAMS_HEALTH_INTERVAL": "86400",
        **GENEROUS_LIMITS,
    }
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the caller; a file, not a pipe nobody reads
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, stderr=log), log


async def _load_then_sigterm(proc, port: int, key: str, before_sigterm=None) -> list[str]:
    endpoint = f"http://127.0.0.1:{port}/servers/demo/mcp"
    answered: list[str] = []
    stop = asyncio.Event()

    async def client(http, worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            marker = f"w{worker}-{i}"
            try:
                status, body = await _post(http, endpoint, key, i, "tools/call",
                                           {"name": "echo", "arguments": {"text": marker}})
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                return  # the listener is closed
            assert status == 200, body
            answered.append(marker)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        workers = [asyncio.create_task(client(http, w)) for w in range(6)]
        deadline = asyncio.get_running_loop().time() + 60
        while len(answered) < 150:
            if any(w.done() for w in workers):
                stop.set()
                await asyncio.gather(*workers)
                raise AssertionError(f"a client ended after {len(answered)} answers, before the SIGTERM")
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        if before_sigterm is not None:
            before_sigterm()
            await asyncio.sleep(0.3)  # load goes on while PostgreSQL is away
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        stop.set()
        await asyncio.gather(*workers)
    assert code == 0
    return answered


async def _logged_markers(pg_url: str) -> Counter:
    rows = await _rows(pg_url, "action = 'mcp.tools/call' AND outcome = 'success'")
    return Counter(json.loads(r["details_text"])["params"]["arguments"]["text"] for r in rows)


async def test_sigterm_under_load_writes_every_entry(pg_url, mcp_upstream_json, tmp_path):
    key = await _provision(pg_url, mcp_upstream_json)
    port = free_port()
    proc, log = _serve(pg_url, port, tmp_path / "spill", tmp_path / "serve.log")
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        answered = await _load_then_sigterm(proc, port, key)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logged = await _logged_markers(pg_url)
    assert all(logged[m] == 1 for m in answered), "an answered request without its audit entry"
    assert max(logged.values()) == 1
    assert all(report.ok for report in await _verify(pg_url))


async def test_sigterm_while_postgres_is_away_spills_and_the_next_start_replays(pg_url, mcp_upstream_json, tmp_path):
    key = await _provision(pg_url, mcp_upstream_json)
    parts = urlsplit(pg_url)
    relay = await TcpRelay(parts.hostname, parts.port or 5432).start()
    spill = tmp_path / "spill"
    port = free_port()
    proc, log = _serve(_through(relay, pg_url), port, spill, tmp_path / "serve.log")
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        answered = await _load_then_sigterm(proc, port, key, before_sigterm=relay.cut)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        await relay.stop()
    assert any(name.endswith(".spill") for name in os.listdir(spill)), (tmp_path / "serve.log").read_text()[-3000:]
    assert (await _logged_markers(pg_url)).total() < len(answered)

    # The next start (PostgreSQL reachable again) replays the spill before it serves long.
    proc, log = _serve(pg_url, port, spill, tmp_path / "serve2.log")
    try:
        await asyncio.to_thread(wait_for_port, port, proc)
        for _ in range(200):
            if not any(name.endswith(".spill") for name in os.listdir(spill)):
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logged = await _logged_markers(pg_url)
    assert all(logged[m] == 1 for m in answered), "an answered request's audit entry was lost"
    assert max(logged.values()) == 1
    assert not any(name.endswith(".spill") for name in os.listdir(spill))
    assert all(report.ok for report in await _verify(pg_url))


async def test_a_tenant_names_its_own_redactions_within_bounds(gateway):
    status, tenant = await gateway.admin("POST", "/tenants", {"name": "acme"})
    assert status == 201
    for bad in ("ssn", [""], ["x" * 65], [1], ["n"] * 101):
        status, body = await gateway.admin("PATCH", f"/tenants/{tenant['id']}",
                                           {"settings": {"audit_redact_keys": bad}})
        assert status == 422, bad
        assert [d["field"] for d in body["error"]["details"]] == ["settings.audit_redact_keys"]
    status, body = await gateway.admin("PATCH", f"/tenants/{tenant['id']}",
                                       {"settings": {"audit_redact_keys": ["ssn", "Account-Number"]}})
    assert status == 200 and body["settings"]["audit_redact_keys"] == ["ssn", "Account-Number"]
