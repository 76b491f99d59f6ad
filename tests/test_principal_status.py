"""Tenant status, settings and weight; user role and active flag: changed through the admin API and the CLI,
in force on every gateway process with the next snapshot, open streams included.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from gateway.dataplane import bridge, jsonrpc
from gateway.dataplane import server as dataplane_server

ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


async def call(endpoint: str, key: str) -> tuple[int, dict | None]:
    async with aiohttp.ClientSession() as http:
        async with http.post(endpoint, json=INIT, headers={"Authorization": f"Bearer {key}", "Accept": ACCEPT}) as r:
            await r.read()
            return r.status, (await r.json())["error"] if r.status >= 400 else None


async def until(predicate, limit: float = 5.0) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < limit, "it never happened"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def read_until_closed(response: aiohttp.ClientResponse) -> None:
    while await response.content.readany():
        pass


# -- tenants ---------------------------------------------------------------------------------------------------
async def test_suspending_a_tenant_refuses_all_its_credentials_on_every_process(
    pg_url, redis_url, redis_prefix, make_gateway, mcp_upstream
):
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    a = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    b = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    t = await a.tenancy("acme", mcp_upstream)
    other = await a.tenancy("globex", mcp_upstream)
    _, second = await a.admin("POST", "/api-keys", {"user_id": t.user_id, "name": "second", "scopes": ["proxy"]})
    keys = [t.api_key, second["key"]]
    on_b = f"{b.url}/servers/demo/mcp"
    await until(lambda: _all(on_b, keys, 200))

    status, tenant = await a.admin("PATCH", f"/tenants/{t.tenant_id}", {"status": "suspended"})
    assert status == 200 and tenant["status"] == "suspended"
    for endpoint in (t.endpoint, on_b):
        took = await until(lambda e=endpoint: _all(e, keys, 403))
        assert took < 1.0
        status, error = await call(endpoint, t.api_key)
        assert error["code"] == jsonrpc.FORBIDDEN and "suspended" in error["message"]
    assert (await call(other.endpoint, other.api_key))[0] == 200  # another tenant is untouched

    status, tenant = await a.admin("PATCH", f"/tenants/{t.tenant_id}", {"status": "active"})
    assert status == 200
    await until(lambda: _all(on_b, keys, 200))


async def _all(endpoint: str, keys: list[str], status: int) -> bool:
    return [(await call(endpoint, key))[0] for key in keys] == [status] * len(keys)


async def test_suspension_ends_open_streams_at_their_next_keep_alive(gateway, mcp_upstream, monkeypatch):
    monkeypatch.setattr(dataplane_server, "_KEEPALIVE_SECONDS", 0.3)  # the /mcp list-change stream
    monkeypatch.setattr(bridge, "_KEEPALIVE_SECONDS", 0.3)  # bridged 2024-11-05 SSE connections
    t = await gateway.tenancy("acme", mcp_upstream)
    auth = {"Authorization": f"Bearer {t.api_key}"}
    async with aiohttp.ClientSession() as http:
        listen = await http.get(f"{gateway.url}/mcp", headers={**auth, "Accept": "text/event-stream"})
        bridged = await http.get(f"{gateway.url}/servers/demo/sse", headers=auth)
        assert listen.status == bridged.status == 200
        assert (await bridged.content.readline()).startswith(b"event: endpoint")
        # A 2025-era session's GET stream, relayed from the upstream as it is (no keep-alive of ours).
        async with http.post(t.endpoint, json=INIT, headers={**auth, "Accept": ACCEPT}) as opened:
            assert opened.status == 200
            session = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
        async with http.post(t.endpoint, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                             headers={**auth, **session, "Accept": ACCEPT}) as done:
            assert done.status == 202
        relayed = await http.get(t.endpoint, headers={**auth, **session, "Accept": "text/event-stream"})
        assert relayed.status == 200
        streams = (listen, bridged, relayed)
        # They stay open while the tenant is active (several keep-alives go by).
        for stream in streams:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await read_until_closed(stream)

        status, _ = await gateway.admin("PATCH", f"/tenants/{t.tenant_id}", {"status": "suspended"})
        assert status == 200
        started = time.monotonic()
        async with asyncio.timeout(3.0):
            await read_until_closed(relayed)  # at the configuration change itself
        async with asyncio.timeout(3.0):
            await asyncio.gather(read_until_closed(listen), read_until_closed(bridged))  # at their keep-alive
        assert time.monotonic() - started < 2.0
        for stream in streams:
            stream.release()


async def test_tenant_changes_are_the_operators_and_validated(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    _, admin_user = await gateway.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": "adm",
                                                           "email": "adm@acme.test", "role": "ADMIN"})
    _, admin_key = await gateway.admin("POST", "/api-keys", {"user_id": admin_user["id"], "name": "a",
                                                             "scopes": ["admin"]})
    status, body = await gateway.admin("PATCH", f"/tenants/{t.tenant_id}", {"status": "suspended"},
                                       key=admin_key["key"])
    assert status == 403 and "operator" in body["error"]["message"]

    status, body = await gateway.admin("PATCH", f"/tenants/{t.tenant_id}", {"weight": 0, "status": "gone"})
    assert status == 422 and {d["field"] for d in body["error"]["details"]} == {"weight", "status"}
    status, body = await gateway.admin("PATCH", f"/tenants/{t.tenant_id}", {"weight": 1001})
    assert status == 422
    status, body = await gateway.admin("PATCH", f"/tenants/{t.tenant_id}", {})
    assert status == 422 and "nothing to change" in body["error"]["details"][0]["message"]

    status, tenant = await gateway.admin("PATCH", f"/tenants/{t.tenant_id}",
                                         {"weight": 250, "settings": {"tier": "gold", "notes": ["a", 1]}})
    assert status == 200
    assert (tenant["weight"], tenant["settings"], tenant["status"]) == (250, {"tier": "gold", "notes": ["a", 1]},
                                                                      "active")
    status, again = await gateway.admin("GET", f"/tenants/{t.tenant_id}")
    assert status == 200 and again["weight"] == 250
    entry = gateway.gateway.store.current.tenants[uuid.UUID(t.tenant_id)]
    assert entry.weight == 250  # in the data plane's snapshot, for fair scheduling

    status, new = await gateway.admin("POST", "/tenants", {"name": "heavy", "weight": 1000})
    assert status == 201 and new["weight"] == 1000
    status, _ = await gateway.admin("POST", "/tenants", {"name": "too-heavy", "weight": 1001})
    assert status == 422

    # The operator's own tenant cannot be suspended (that would lock the operator out).
    _, page = await gateway.admin("GET", "/tenants")
    (platform,) = [x for x in page["items"] if x["name"] == "platform"]
    status, body = await gateway.admin("PATCH", f"/tenants/{platform['id']}", {"status": "suspended"})
    assert status == 409


async def test_a_suspended_tenants_admin_hears_why_on_the_admin_api(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    _, admin_user = await gateway.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": "adm",
                                                           "email": "adm@acme.test", "role": "ADMIN"})
    _, admin_key = await gateway.admin("POST", "/api-keys", {"user_id": admin_user["id"], "name": "a",
                                                             "scopes": ["admin"]})
    assert (await gateway.admin("GET", "/servers", key=admin_key["key"]))[0] == 200
    await gateway.admin("PATCH", f"/tenants/{t.tenant_id}", {"status": "suspended"})
    status, body = await gateway.admin("GET", "/servers", key=admin_key["key"])
    assert status == 403 and "suspended" in body["error"]["message"]


def _cli(pg_url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = pg_url
    return subprocess.run([sys.executable, "-m", "gateway", *argv], env=env, capture_output=True, text=True,
                          timeout=60)


async def test_tenant_status_on_the_command_line(pg_url, gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    done = await asyncio.to_thread(_cli, pg_url, "tenants", "update", t.tenant_id, "--status", "suspended",
                                   "--weight", "7")
    assert done.returncode == 0, done.stderr
    await until(lambda: _all(t.endpoint, [t.api_key], 403))  # the poll (0.2 s) brings the CLI's change
    listed = await asyncio.to_thread(_cli, pg_url, "tenants", "list")
    (line,) = [x for x in listed.stdout.splitlines() if t.tenant_id in x]
    assert "suspended" in line and "weight=7" in line
    refused = await asyncio.to_thread(_cli, pg_url, "tenants", "update", t.tenant_id, "--weight", "0")
    assert refused.returncode == 2 and "weight" in refused.stderr
    done = await asyncio.to_thread(_cli, pg_url, "tenants", "update", t.tenant_id, "--status", "active")
    assert done.returncode == 0, done.stderr
    await until(lambda: _all(t.endpoint, [t.api_key], 200))


# -- users --------------------------------------------------------------------------------------------------------
async def test_deactivating_a_user_refuses_its_keys_at_once(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    _, second = await gateway.admin("POST", "/api-keys", {"user_id": t.user_id, "name": "2", "scopes": ["proxy"]})
    colleague = await gateway.tenancy("acme-too", mcp_upstream)
    status, user = await gateway.admin("PATCH", f"/users/{t.user_id}", {"is_active": False})
    assert status == 200 and user["is_active"] is False
    for key in (t.api_key, second["key"]):
        status, error = await call(t.endpoint, key)  # this gateway reloaded before the PATCH answered
        assert status == 401 and "deactivated" in error["message"]
    assert (await call(colleague.endpoint, colleague.api_key))[0] == 200
    status, _ = await gateway.admin("PATCH", f"/users/{t.user_id}", {"is_active": True})
    assert (await call(t.endpoint, t.api_key))[0] == 200


async def test_user_role_changes_and_their_limits(gateway, mcp_upstream):
    a = await gateway.tenancy("acme", mcp_upstream)
    b = await gateway.tenancy("globex", mcp_upstream)
    _, adm = await gateway.admin("POST", "/users", {"tenant_id": a.tenant_id, "username": "adm",
                                                    "email": "adm@acme.test", "role": "ADMIN"})
    _, adm_key = await gateway.admin("POST", "/api-keys", {"user_id": adm["id"], "name": "a", "scopes": ["admin"]})
    key = adm_key["key"]
    # A tenant ADMIN changes its own tenant's users...
    status, user = await gateway.admin("PATCH", f"/users/{a.user_id}", {"role": "READONLY", "email": "NEW@acme.test"},
                                       key=key)
    assert status == 200 and (user["role"], user["email"]) == ("READONLY", "new@acme.test")
    # ...not another tenant's (as if it did not exist), and not itself (no lock-out by accident).
    status, _ = await gateway.admin("PATCH", f"/users/{b.user_id}", {"role": "ADMIN"}, key=key)
    assert status == 404
    status, body = await gateway.admin("PATCH", f"/users/{adm['id']}", {"is_active": False}, key=key)
    assert status == 409
    status, body = await gateway.admin("PATCH", f"/users/{adm['id']}", {"role": "USER"}, key=key)
    assert status == 409
    status, body = await gateway.admin("PATCH", f"/users/{a.user_id}", {"role": "ROOT"}, key=key)
    assert status == 422

    # Demoted by the operator, the same key loses what the ADMIN role gave it, at once.
    status, _ = await gateway.admin("PATCH", f"/users/{adm['id']}", {"role": "USER"})
    assert status == 200
    status, body = await gateway.admin("POST", "/users", {"username": "x", "email": "x@acme.test"}, key=key)
    assert status == 403 and "USER role" in body["error"]["message"]
