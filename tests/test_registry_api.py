"""The registry's admin routes: finding servers, changing and unregistering them, what discovery found, scoping.

Discovery itself (what is stored, pinning, withholding) is tests/registry/test_discovery.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest


async def _admin_key(gw, tenant_id: str, name: str) -> str:
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant_id, "username": f"{name}-admin",
                                                     "email": f"{name}-admin@example.com", "role": "ADMIN"})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": "adm",
                                                       "scopes": ["admin", "read"]})
    assert status == 201, key
    return key["key"]


async def _discovered(gw, server_id: str, timeout: float = 15.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            status, server = await gw.admin("GET", f"/servers/{server_id}")
            if server["discovered_at"] is not None or server["discovery_error"] is not None:
                return server
            await asyncio.sleep(0.1)


async def _names(gw, query: str, key: str | None = None) -> set[str]:
    status, page = await gw.admin("GET", f"/servers{query}", key=key)
    assert status == 200, page
    return {s["name"] for s in page["items"]}


async def test_servers_are_found_by_tag_transport_health_tool_and_name(gateway, mcp_upstream):
    acme = await gateway.tenancy("acme", mcp_upstream, server_name="files")
    globex = await gateway.tenancy("globex", mcp_upstream, server_name="files")
    for name, tags, transport, url in (
        ("search", ["eu", "prod"], "http", "http://127.0.0.1:9/mcp"),
        ("feeds", ["eu"], "sse", "http://127.0.0.1:9/sse"),
        ("chat", ["us", "prod"], "websocket", "ws://127.0.0.1:9/ws"),
    ):
        status, made = await gateway.admin("POST", "/servers", {"tenant_id": acme.tenant_id, "name": name,
                                                                "endpoint_url": url, "transport_type": transport,
                                                                "tags": tags})
        assert status == 201, made
    await _discovered(gateway, acme.server_id)
    await _discovered(gateway, globex.server_id)
    assert await _names(gateway, f"?tenant_id={acme.tenant_id}&tag=prod") == {"search", "chat"}
    assert await _names(gateway, f"?tenant_id={acme.tenant_id}&tag=eu&tag=prod") == {"search"}  # every tag given
    assert await _names(gateway, f"?tenant_id={acme.tenant_id}&tag=e") == set()  # whole tags, not substrings
    assert await _names(gateway, "?transport_type=websocket") == {"chat"}
    assert await _names(gateway, "?transport_type=sse&tag=eu") == {"feeds"}
    assert await _names(gateway, "?health_status=UNKNOWN&tag=us") == {"chat"}
    assert await _names(gateway, "?health_status=MAINTENANCE") == set()
    # By tool: servers whose last discovery found it (the two demo servers), within reach.
    status, page = await gateway.admin("GET", "/servers?tool=echo")
    assert {s["id"] for s in page["items"]} == {acme.server_id, globex.server_id}
    assert await _names(gateway, "?tool=no_such_tool") == set()
    status, page = await gateway.admin("GET", "/servers?name=files")
    assert {s["tenant_id"] for s in page["items"]} == {acme.tenant_id, globex.tenant_id}
    # A tenant admin finds only its own.
    key = await _admin_key(gateway, acme.tenant_id, "acme")
    status, page = await gateway.admin("GET", "/servers?tool=echo", key=key)
    assert [s["id"] for s in page["items"]] == [acme.server_id]
    assert await _names(gateway, "?name=files", key=key) == {"files"}
    assert await _names(gateway, f"?tenant_id={globex.tenant_id}", key=key) == set()
    # Paging still works under a filter.
    status, page = await gateway.admin("GET", f"/servers?tenant_id={acme.tenant_id}&limit=2")
    assert len(page["items"]) == 2 and page["next_cursor"]
    query = f"?tenant_id={acme.tenant_id}&limit=2&cursor={page['next_cursor']}"
    status, rest = await gateway.admin("GET", f"/servers{query}")
    assert len(rest["items"]) == 2 and not {s["id"] for s in rest["items"]} & {s["id"] for s in page["items"]}


async def test_bad_filters_are_422(gateway):
    status, body = await gateway.admin("GET", "/servers?transport_type=carrier-pigeon&health_status=GREEN&tool=")
    assert status == 422
    assert {d["field"] for d in body["error"]["details"]} == {"transport_type", "health_status", "tool"}
    status, body = await gateway.admin("GET", f"/servers/{uuid.uuid4()}/tools?pin_status=maybe")
    assert status == 422 and body["error"]["details"][0]["field"] == "pin_status"


async def test_patch_changes_what_it_names_and_the_snapshot_follows(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, server = await gateway.admin("PATCH", f"/servers/{t.server_id}", {
        "description": "Demo tools", "tags": ["blue"],
        "settings": {"discovery_interval": 60, "health_timeout": 3.5, "breaker_enabled": False},
    })
    assert status == 200, server
    assert server["description"] == "Demo tools" and server["tags"] == ["blue"]
    assert server["settings"] == {"discovery_interval": 60, "health_timeout": 3.5, "breaker_enabled": False}
    assert server["endpoint_url"] == mcp_upstream and server["name"] == "demo"  # the rest as it was
    entry = gateway.gateway.store.current.server(uuid.UUID(t.tenant_id), "demo")
    assert entry.settings.discovery_interval == 60 and entry.settings.breaker_enabled is False
    assert entry.tags == ("blue",)
    # Settings merge; a null removes one override (the deployment's value applies again).
    status, server = await gateway.admin("PATCH", f"/servers/{t.server_id}",
                                         {"settings": {"health_timeout": None, "retry_attempts": 0}})
    assert status == 200
    assert server["settings"] == {"discovery_interval": 60, "breaker_enabled": False, "retry_attempts": 0}
    status, server = await gateway.admin("PATCH", f"/servers/{t.server_id}", {"description": None})
    assert status == 200 and server["description"] is None
    # Deactivated: no longer served; reactivated: served again.
    status, server = await gateway.admin("PATCH", f"/servers/{t.server_id}", {"is_active": False})
    assert status == 200 and server["is_active"] is False
    assert gateway.gateway.store.current.server(uuid.UUID(t.tenant_id), "demo") is None
    status, body = await gateway.admin("POST", f"/servers/{t.server_id}/discover")
    assert status == 409 and "inactive" in body["error"]["message"]
    status, server = await gateway.admin("PATCH", f"/servers/{t.server_id}", {"is_active": True})
    assert status == 200 and gateway.gateway.store.current.server(uuid.UUID(t.tenant_id), "demo") is not None


async def test_invalid_patches_are_422_and_change_nothing(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    await _discovered(gateway, t.server_id)
    _, before = await gateway.admin("GET", f"/servers/{t.server_id}")
    version = gateway.gateway.store.current.version
    for patch, fields in (
        ({"settings": {"discovery_intervall": 60}}, {"settings.discovery_intervall"}),
        ({"settings": {"discovery_interval": 1}}, {"settings.discovery_interval"}),
        ({"settings": {"health_probe": "telepathy", "queue_max": "many"}},
         {"settings.health_probe", "settings.queue_max"}),
        ({"settings": {"breaker_open_seconds": 600, "breaker_max_open_seconds": 60}}, {"settings"}),  # across keys
        ({"settings": {"breaker_open_seconds": 600}}, {"settings"}),  # above the deployment's maximum
        ({"settings": ["not", "an", "object"]}, {"settings"}),
        ({"endpoint_url": "ftp://example.com/mcp"}, {"endpoint_url"}),
        ({"transport_type": "websocket"}, {"transport_type"}),  # its http:// endpoint is not a ws:// URL
        ({"name": "renamed"}, {"name"}),
        ({"tags": "blue", "is_active": "yes"}, {"tags", "is_active"}),
        ({}, {"$"}),
    ):
        status, body = await gateway.admin("PATCH", f"/servers/{t.server_id}", patch)
        assert status == 422, (patch, body)
        assert {d["field"] for d in body["error"]["details"]} == fields, (patch, body)
    # The bad key is named in the message too.
    status, body = await gateway.admin("PATCH", f"/servers/{t.server_id}", {"settings": {"bogus": 1}})
    assert "unknown setting" in body["error"]["details"][0]["message"]
    _, after = await gateway.admin("GET", f"/servers/{t.server_id}")
    assert after == before
    assert gateway.gateway.store.current.version == version  # nothing was written, nothing reloaded


async def test_only_the_operator_makes_a_server_stdio(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    key = await _admin_key(gateway, t.tenant_id, "acme")
    status, body = await gateway.admin("PATCH", f"/servers/{t.server_id}",
                                       {"transport_type": "stdio", "endpoint_url": "sh -c 'id'"}, key=key)
    assert status == 403 and "operator" in body["error"]["message"]
    status, body = await gateway.admin("PATCH", f"/servers/{t.server_id}", {"description": "mine"}, key=key)
    assert status == 200


async def test_unregister_removes_the_server_and_what_was_found(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    await _discovered(gateway, t.server_id)
    status, rule = await gateway.admin("POST", "/access-rules", {"tenant_id": t.tenant_id, "effect": "deny",
                                                                 "server_id": t.server_id, "tool": "echo"})
    assert status == 201
    status, gone = await gateway.admin("DELETE", f"/servers/{t.server_id}")
    assert status == 200 and gone["id"] == t.server_id and gone["name"] == "demo"
    assert (await gateway.admin("GET", f"/servers/{t.server_id}"))[0] == 404
    assert (await gateway.admin("GET", f"/servers/{t.server_id}/tools"))[0] == 404
    assert (await gateway.admin("DELETE", f"/servers/{t.server_id}"))[0] == 404
    assert (await gateway.admin("GET", f"/access-rules/{rule['id']}"))[0] == 404
    assert gateway.gateway.store.current.server(uuid.UUID(t.tenant_id), "demo") is None
    from gateway.db.tables import server_tools

    import sqlalchemy as sa

    async with gateway.gateway.engine.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(server_tools)
                                   .where(server_tools.c.server_id == uuid.UUID(t.server_id)))).scalar_one()
    assert left == 0
    # The name is free again.
    status, _ = await gateway.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "demo",
                                                         "endpoint_url": mcp_upstream})
    assert status == 201


async def test_what_discovery_found_is_paged(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    await _discovered(gateway, t.server_id)
    seen, cursor = [], None
    while True:
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        status, page = await gateway.admin("GET", f"/servers/{t.server_id}/tools{query}")
        assert status == 200 and set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= 3
        seen += [x["name"] for x in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) >= 7
    status, page = await gateway.admin("GET", f"/servers/{t.server_id}/tools?pin_status=approved&limit=500")
    assert {x["name"] for x in page["items"]} == set(seen)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/servers/{id}", None),
    ("PATCH", "/servers/{id}", {"description": "probe"}),
    ("DELETE", "/servers/{id}", None),
    ("GET", "/servers/{id}/tools", None),
    ("GET", "/servers/{id}/resources", None),
    ("GET", "/servers/{id}/resource-templates", None),
    ("GET", "/servers/{id}/prompts", None),
    ("POST", "/servers/{id}/discover", None),
    ("POST", "/servers/{id}/tools/echo/approve", None),
    ("POST", "/servers/{id}/tools/no_such_tool/approve", None),
])
async def test_another_tenants_server_is_not_found(gateway, mcp_upstream, method, path, body):
    acme = await gateway.tenancy("acme", mcp_upstream)
    globex = await gateway.tenancy("globex", mcp_upstream)
    await _discovered(gateway, globex.server_id)
    await _discovered(gateway, acme.server_id)
    key = await _admin_key(gateway, acme.tenant_id, "acme")
    theirs = await gateway.admin(method, path.replace("{id}", globex.server_id), body, key=key)
    missing_id = str(uuid.uuid4())
    missing = await gateway.admin(method, path.replace("{id}", missing_id), body, key=key)
    assert theirs[0] == missing[0] == 404, (theirs, missing)
    assert theirs[1] == missing[1]  # the same words: nothing says the server exists
    # Their server is as it was, and still discovered.
    status, server = await gateway.admin("GET", f"/servers/{globex.server_id}")
    assert status == 200 and server["description"] is None
    status, page = await gateway.admin("GET", f"/servers/{globex.server_id}/tools")
    assert "echo" in {x["name"] for x in page["items"]}
    # The same routes on its own server work for the tenant admin (the reach is the tenant).
    own = await gateway.admin(method, path.replace("{id}", acme.server_id), body, key=key)
    assert own[0] == (404 if "no_such_tool" in path else 200), own


async def test_everyone_reads_what_was_found_only_admins_act(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    await _discovered(gateway, t.server_id)
    status, user_key = await gateway.admin("POST", "/api-keys", {"user_id": t.user_id, "name": "r",
                                                                 "scopes": ["read"]})
    assert status == 201
    key = user_key["key"]
    status, page = await gateway.admin("GET", f"/servers/{t.server_id}/tools", key=key)
    assert status == 200 and page["items"]
    for method, path, body in (("POST", f"/servers/{t.server_id}/discover", None),
                               ("POST", f"/servers/{t.server_id}/tools/echo/approve", None),
                               ("PATCH", f"/servers/{t.server_id}", {"description": "x"}),
                               ("DELETE", f"/servers/{t.server_id}", None)):
        status, body = await gateway.admin(method, path, body, key=key)
        assert status == 403, (method, path, body)


# -- the command line ----------------------------------------------------------------------------------------
def _cli(pg_url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = pg_url
    return subprocess.run([sys.executable, "-m", "gateway", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


async def test_the_servers_commands(pg_url, gateway, mcp_upstream):
    async def cli(*argv: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(_cli, pg_url, "servers", *argv)

    t = await gateway.tenancy("acme", mcp_upstream)
    sid = t.server_id
    done = await cli("discover", sid)
    assert done.returncode == 0, done.stderr
    counts = dict(line.split("=", 1) for line in done.stdout.split())
    assert counts["resources"] == "1" and counts["prompts"] == "1" and int(counts["tools"]) >= 7
    tools = await cli("tools", sid)
    assert tools.returncode == 0 and any(line.startswith("echo ") and " approved " in line
                                         for line in tools.stdout.splitlines()), tools.stdout
    assert (await cli("tools", sid, "--changed")).stdout == ""
    listed = await cli("list", "--tool", "echo", "--transport", "http")
    assert listed.returncode == 0 and sid in listed.stdout
    assert sid not in (await cli("list", "--tag", "nope")).stdout
    done = await cli("update", sid, "--description", "from the shell", "--tag", "blue",
                     "--set", "discovery_interval=60", "--set", "health_probe=list")
    assert done.returncode == 0, done.stderr
    shown = json.loads((await cli("show", sid)).stdout)
    assert shown["description"] == "from the shell" and shown["tags"] == ["blue"]
    assert shown["settings"] == {"discovery_interval": 60, "health_probe": "list"}
    assert sid in (await cli("list", "--tag", "blue")).stdout
    refused = await cli("update", sid, "--set", "discovery_interval=1")
    assert refused.returncode == 2 and "settings.discovery_interval" in refused.stderr
    done = await cli("update", sid, "--unset", "health_probe")
    assert done.returncode == 0
    assert json.loads((await cli("show", sid)).stdout)["settings"] == {"discovery_interval": 60}
    refused = await cli("approve", sid, "no_such_tool")
    assert refused.returncode == 2 and "no tool named" in refused.stderr
    done = await cli("approve", sid, "echo")
    assert done.returncode == 0 and "approved definition" in done.stderr
    assert (await cli("show", str(uuid.uuid4()))).returncode == 2
    done = await cli("unregister", sid)
    assert done.returncode == 0, done.stderr
    assert (await cli("show", sid)).returncode == 2
