"""The isolation matrix: two tenants, every control-plane route and every MCP method, each against the other.

Acme's tenant admin and acme's proxy key try everything on globex's objects.
Every attempt must be refused, no answer may carry anything of globex's, and
a refusal must look exactly like the one for an object that does not exist
(so it does not even reveal that globex's object exists).

The control-plane routes are read from the running application, not listed
here: a new route that this matrix does not know how to attack fails the
test until it is added, so the matrix cannot fall behind the API.
"""

from __future__ import annotations

import json
import re
import uuid

import aiohttp
import pytest
from aiohttp import web

# Routes a tenant admin may call that hold no tenant-owned object (public or self-describing).
_PUBLIC = {("GET", "/api/v1/openapi.json")}
# Path prefixes outside the admin API proper: sign-in flows are exercised by their own tests.
_OUTSIDE = ("/auth/",)
# Routes that answer with figures, not objects: test_analytics_matrix attacks every one of them.
_ANALYTICS = "/api/v1/analytics/"
# The kind of object behind `{id}` in each collection.
_KINDS = {
    "tenants": "tenant", "users": "user", "api-keys": "key", "servers": "server",
    "access-rules": "rule", "sessions": "session", "routing-rules": "route",
    "rate-limits": "limits",  # the deployment's: a tenant admin reads them (only its own weight), never writes
    "bans": "ban",  # the deployment's, by address: operator only
    "retention-policies": "policy", "alerts": "alert",  # a tenant's overrides and alert rules (and their events)
    "config": "setting",  # `{key}`: a tenant's override of it is that tenant's
}
# A valid body for each route that takes one (so a refusal is about whose object it is, not the body).
# Creating: aimed at globex (its tenant, user, server). Unknown routes get {} and must still refuse alike.
def _bodies(theirs: dict[str, str]) -> dict[tuple[str, str], dict]:
    return {
        ("POST", "/api/v1/tenants"): {"name": "probe-tenant"},
        ("PATCH", "/api/v1/tenants/{id}"): {"status": "suspended"},
        ("POST", "/api/v1/users"): {"tenant_id": theirs["tenant"], "username": "probe", "email": "probe@example.com"},
        ("PATCH", "/api/v1/users/{id}"): {"role": "READONLY"},
        ("POST", "/api/v1/api-keys"): {"user_id": theirs["user"], "name": "probe"},
        ("POST", "/api/v1/api-keys/import"): {"user_id": theirs["user"], "name": "probe", "key": "legacy-probe-key"},
        ("POST", "/api/v1/api-keys/{id}/rotate"): {},
        ("POST", "/api/v1/servers"): {"tenant_id": theirs["tenant"], "name": "probe",
                                      "endpoint_url": "http://127.0.0.1:9/mcp"},
        ("PUT", "/api/v1/servers/{id}/auth"): {"auth": {"kind": "none"}},
        ("PATCH", "/api/v1/servers/{id}"): {"description": "probe", "settings": {"discovery_interval": 60}},
        ("POST", "/api/v1/servers/{id}/tools/{name}/approve"): {},
        ("POST", "/api/v1/access-rules"): {"tenant_id": theirs["tenant"], "effect": "deny", "description": "probe"},
        ("PATCH", "/api/v1/rate-limits"): {"ip_per_minute": 1},
        ("PUT", "/api/v1/servers/{id}/maintenance"): {"maintenance": True},
        ("POST", "/api/v1/routing-rules"): {"tenant_id": theirs["tenant"], "name": "probe",
                                            "targets": [{"server_id": theirs["server"]}]},
        ("PATCH", "/api/v1/routing-rules/{id}"): {"description": "probe", "priority": 0},
        ("POST", "/api/v1/retention-policies"): {"tenant_id": theirs["tenant"], "table_name": "request_logs",
                                                 "days": 1},
        ("POST", "/api/v1/retention-policies/run"): {},
        ("PATCH", "/api/v1/retention-policies/{id}"): {"days": 1},
        ("POST", "/api/v1/alerts"): {"tenant_id": theirs["tenant"], "name": "probe", "metric": "health"},
        ("PATCH", "/api/v1/alerts/{id}"): {"description": "probe", "threshold": 1},
        ("PUT", "/api/v1/config/{key}"): {"value": "probe", "tenant_id": theirs["tenant"]},
    }


class _World:
    def __init__(self) -> None:
        self.ids: dict[str, dict[str, str]] = {"acme": {}, "globex": {}}
        self.secrets: dict[str, list[str]] = {"acme": [], "globex": []}  # what must never leak across
        self.admin_keys: dict[str, str] = {}
        self.proxy_keys: dict[str, str] = {}


async def _build(gw, upstream: str) -> _World:
    world = _World()
    for name in ("acme", "globex"):
        t = await gw.tenancy(name, upstream, server_name=f"{name}-files")
        ids = world.ids[name]
        ids.update(tenant=t.tenant_id, user=t.user_id, key=t.api_key_id, server=t.server_id)
        world.proxy_keys[name] = t.api_key
        status, admin = await gw.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": f"{name}-admin",
                                                          "email": f"{name}-admin@example.com", "role": "ADMIN"})
        assert status == 201, admin
        status, key = await gw.admin("POST", "/api-keys", {"user_id": admin["id"], "name": f"{name}-admin-key",
                                                           "scopes": ["admin", "read", "write"]})
        assert status == 201, key
        world.admin_keys[name] = key["key"]
        status, rule = await gw.admin("POST", "/access-rules", {
            "tenant_id": t.tenant_id, "effect": "deny", "role": "READONLY",
            "server_name": f"{name}-files", "tool": "secret_*", "description": f"{name} rule",
        })
        assert status == 201, rule
        ids["rule"] = rule["id"]
        status, route = await gw.admin("POST", "/routing-rules", {
            "tenant_id": t.tenant_id, "name": f"{name}-route", "match_tool": "search_*",
            "targets": [{"server_id": t.server_id, "weight": 2}], "description": f"{name} route",
        })
        assert status == 201, route
        ids["route"] = route["id"]
        status, policy = await gw.admin("POST", "/retention-policies", {"tenant_id": t.tenant_id,
                                                                        "table_name": "request_logs", "days": 45})
        assert status == 201, policy
        status, alert = await gw.admin("POST", "/alerts", {
            "tenant_id": t.tenant_id, "name": f"{name}-alert", "server_id": t.server_id, "metric": "error_rate",
            "threshold": 0.25, "webhook_url": f"http://{name}.example/hook", "description": f"{name} alert",
        })
        assert status == 201, alert
        ids.update(policy=policy["id"], alert=alert["id"])
        world.secrets[name] += [policy["id"], alert["id"], f"{name}-alert", f"{name}.example"]
        # A setting only this tenant has (its override; no deployment's value). The key is what a caller
        # names, so it may be echoed back; its value must never cross.
        status, setting = await gw.admin("PUT", f"/config/{name}.private", {"value": f"{name}-setting-value",
                                                                            "tenant_id": t.tenant_id})
        assert status == 200, setting
        ids["setting"] = setting["key"]
        world.secrets[name] += [t.tenant_id, t.user_id, t.api_key_id, t.server_id, admin["id"], key["id"],
                                f"{name}-files", f"{name}-user", f"{name}-admin", f"{name}@example.com",
                                route["id"], f"{name}-route", setting["id"], f"{name}-setting-value"]
    return world


def _routes(gw) -> list[tuple[str, str]]:
    apps = [r.app for r in gw.gateway._runners if isinstance(r, web.AppRunner)]
    assert apps, "the control plane is not running"
    found = []
    for route in apps[0].router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if route.method in ("HEAD", "OPTIONS") or path is None:
            continue
        found.append((route.method, path))
    return sorted(set(found))


async def _call(gw, method: str, path: str, key: str, body=None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, gw.gateway.controlplane_url + path, json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            return response.status, await response.text()


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s and s in text]


async def test_control_plane_matrix(gateway, mcp_upstream):
    world = await _build(gateway, mcp_upstream)
    theirs, mine = world.ids["globex"], world.admin_keys["acme"]
    bodies = _bodies(theirs)
    unclassified = []
    checked = 0
    for method, path in _routes(gateway):
        if (method, path) in _PUBLIC or path.startswith(_OUTSIDE) or path.startswith(_ANALYTICS):
            continue
        match = re.fullmatch(r"/api/v1/([a-z-]+)(?:/\{(?:id|address|key)\}(/.*)?)?(/[a-z]+)?", path)
        collection = match.group(1) if match else None
        if collection not in _KINDS:
            unclassified.append((method, path))
            continue
        kind = _KINDS[collection]
        body = bodies.get((method, path), {}) if method in ("POST", "PUT", "PATCH") else None
        known = (method, path) in bodies or body is None
        refused = (403, 404) if known else (403, 404, 422)
        slot = "{id}" if "{id}" in path else "{key}" if "{key}" in path else None
        if slot is not None:
            if kind not in theirs:
                continue  # globex has no such object in this build (e.g. no sessions without sign-in)
            target = path.replace(slot, theirs[kind])
            missing = path.replace(slot, str(uuid.uuid4()) if slot == "{id}" else f"no.{uuid.uuid4().hex}")
            status, text = await _call(gateway, method, target, mine, body)
            status_missing, text_missing = await _call(gateway, method, missing, mine, body)
            assert status in refused, (method, target, status, text)
            # Indistinguishable from an object that does not exist.
            assert status == status_missing, (method, path, status, status_missing)
            assert text.replace(theirs[kind], "<id>") == text_missing.replace(missing.split("/")[4], "<id>"), (
                method, path, text, text_missing)
        elif method == "GET":
            status, text = await _call(gateway, method, path, mine)
            assert status in (200, 403), (method, path, status, text)
        else:
            # Creating inside globex (the body names globex's tenant or user).
            status, text = await _call(gateway, method, path, mine, body)
            assert status in refused, (method, path, status, text)
        assert not _leaks(text, world.secrets["globex"]), (method, path, _leaks(text, world.secrets["globex"]))
        checked += 1
    assert not unclassified, f"routes the isolation matrix does not cover: {unclassified}"
    assert checked >= 10
    # And nothing of globex's changed: its objects are as the operator left them.
    for collection in ("users", "api-keys", "servers", "access-rules", "routing-rules", "config"):
        status, page = await gateway.admin("GET", f"/{collection}?limit=500")
        assert status == 200, page
        probes = [item for item in page["items"] if "probe" in json.dumps(item)]
        assert not probes, (collection, probes)
    status, tenant = await gateway.admin("GET", f"/tenants/{theirs['tenant']}")
    assert status == 200 and tenant["status"] == "active", tenant


async def test_analytics_matrix(gateway, mcp_upstream):
    """Acme's admin asks every analytics route about everyone, and about globex by name: never a figure of
    globex's; globex's tenant is "not found" like a made-up one. The operator sees both (so the rows are there)."""
    from datetime import datetime, timezone

    import sqlalchemy as sa

    from gateway.db.tables import request_logs

    world = await _build(gateway, mcp_upstream)
    theirs, mine = world.ids["globex"], world.admin_keys["acme"]
    now = datetime.now(timezone.utc)
    rows = []
    for name, ids in world.ids.items():
        world.secrets[name].append(f"{name}-secret-tool")
        for i in range(3):
            rows.append({"id": uuid.uuid4(), "tenant_id": uuid.UUID(ids["tenant"]), "user_id": uuid.UUID(ids["user"]),
                         "api_key_id": uuid.UUID(ids["key"]), "server_id": uuid.UUID(ids["server"]),
                         "server_name": f"{name}-files", "method": "tools/call", "tool_name": f"{name}-secret-tool",
                         "status_code": 200, "error_code": None, "error": None, "duration_ms": 1.0 + i,
                         "request_bytes": 1, "response_bytes": 1, "client_ip": "127.0.0.1", "created_at": now})
    async with gateway.gateway.engine.begin() as conn:
        await conn.execute(sa.insert(request_logs), rows)

    routes = [(m, p) for m, p in _routes(gateway) if p.startswith(_ANALYTICS)]
    assert len(routes) >= 4, routes
    for method, path in routes:
        operator_view = None
        if "{tenant_id}" in path:
            status, own = await _call(gateway, method, path.replace("{tenant_id}", world.ids["acme"]["tenant"]), mine)
            assert status == 200, (path, own)
            status, operator_view = await _call(gateway, method, path.replace("{tenant_id}", theirs["tenant"]),
                                                gateway.admin_key)
            assert status == 200, (path, operator_view)
            missing = str(uuid.uuid4())
            status, text = await _call(gateway, method, path.replace("{tenant_id}", theirs["tenant"]), mine)
            status_missing, text_missing = await _call(gateway, method, path.replace("{tenant_id}", missing), mine)
            assert status == status_missing == 404, (path, status, status_missing)
            assert text == text_missing, (path, text, text_missing)
            texts = [own, text]
        elif "{" not in path:
            texts = []
            for query in ("", f"?tenant_id={theirs['tenant']}"):
                status, text = await _call(gateway, method, path + query, mine)
                assert status in (200, 403), (path, status, text)
                texts.append(text)
            operator_view = (await _call(gateway, method, path, gateway.admin_key))[1]
        else:
            raise AssertionError(f"the analytics matrix does not know how to attack {method} {path}")
        for text in texts:
            assert not _leaks(text, world.secrets["globex"]), (path, _leaks(text, world.secrets["globex"]))
        if path.endswith(("server-health", "request-performance", "tenant-usage/{tenant_id}")):
            assert "globex-files" in operator_view or "globex-secret-tool" in operator_view, (path, operator_view)


MCP_METHODS = [
    ("initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}),
    ("tools/list", {}),
    ("tools/call", {"name": "echo", "arguments": {"text": "x"}}),
    ("prompts/list", {}),
    ("prompts/get", {"name": "greet", "arguments": {"name": "x"}}),
    ("resources/list", {}),
    ("resources/templates/list", {}),
    ("resources/read", {"uri": "demo://readme"}),
    ("ping", {}),
]


async def _mcp(http, url: str, key: str, method: str, params: dict, headers=None) -> tuple[int, str]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}",
                                                  "Accept": "application/json, text/event-stream",
                                                  **(headers or {})}) as response:
        return response.status, await response.text()


@pytest.mark.parametrize(("method", "params"), MCP_METHODS, ids=[m for m, _ in MCP_METHODS])
async def test_mcp_matrix(gateway, mcp_upstream, method, params):
    world = await _build(gateway, mcp_upstream)
    key = world.proxy_keys["acme"]
    async with aiohttp.ClientSession() as http:
        # Another tenant's server, by name, looks exactly like a server nobody has.
        theirs = await _mcp(http, f"{gateway.url}/servers/globex-files/mcp", key, method, params)
        nobody = await _mcp(http, f"{gateway.url}/servers/nobody-files/mcp", key, method, params)
        assert theirs[0] == nobody[0] == 404
        assert theirs[1].replace("globex-files", "X") == nobody[1].replace("nobody-files", "X")
        # Through the aggregate: globex's server is not there, and naming it is an unknown name.
        if method in ("tools/call", "prompts/get"):
            p = {**params, "name": f"globex-files__{params['name']}"}
            q = {**params, "name": f"nobody-files__{params['name']}"}
        elif method == "resources/read":
            p, q = {"uri": "mcpgw://globex-files/demo://readme"}, {"uri": "mcpgw://nobody-files/demo://readme"}
        else:
            p = q = params
        status, text = await _mcp(http, f"{gateway.url}/mcp", key, method, p)
        status_nobody, text_nobody = await _mcp(http, f"{gateway.url}/mcp", key, method, q)
        assert status == status_nobody
        assert text.replace("globex-files", "X") == text_nobody.replace("nobody-files", "X")
        echoed = text.replace("globex-files", "")  # the name the caller sent may be echoed back, as for nobody's
        assert not _leaks(echoed, world.secrets["globex"]), _leaks(echoed, world.secrets["globex"])
        # Its own server is reached (the matrix is not passing because everything fails): the
        # upstream answers, whatever it thinks of a session-less request.
        own = await _mcp(http, f"{gateway.url}/servers/acme-files/mcp", key, method, params)
        assert own[0] in (200, 400) and "-32032" not in own[1], own


async def test_a_session_of_the_other_tenant_is_not_found(gateway, mcp_upstream):
    world = await _build(gateway, mcp_upstream)
    async with aiohttp.ClientSession() as http:
        init = MCP_METHODS[0]
        async with http.post(f"{gateway.url}/servers/globex-files/mcp",
                             json={"jsonrpc": "2.0", "id": 1, "method": init[0], "params": init[1]},
                             headers={"Authorization": f"Bearer {world.proxy_keys['globex']}",
                                      "Accept": "application/json, text/event-stream"}) as response:
            session = response.headers["Mcp-Session-Id"]
        headers = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        # Acme's key with globex's session, on acme's own server: not found, like a forged one.
        stolen = await _mcp(http, f"{gateway.url}/servers/acme-files/mcp", world.proxy_keys["acme"], "tools/list",
                            {}, headers)
        forged = await _mcp(http, f"{gateway.url}/servers/acme-files/mcp", world.proxy_keys["acme"], "tools/list",
                            {}, {**headers, "Mcp-Session-Id": "gws1.AAAA"})
        assert stolen[0] == forged[0] == 404 and stolen[1] == forged[1]
