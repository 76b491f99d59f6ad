"""Role-based permissions on every control-plane route, and the scopes keys need there and on the data plane.

`EXPECTED` states the policy independently of `controlplane/permissions.py`:
for every route, which callers may use it. Each route's test calls it as the
operator and as a tenant user of each role (keys holding every control-plane
scope, so the role decides): an allowed caller succeeds (2xx), any other is
refused with 403. A route added to the admin API without a line here fails
`test_every_route_is_in_the_policy`.
"""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from gateway.controlplane import permissions
from gateway.controlplane.api import ControlPlane

ROLES = ("ADMIN", "USER", "SERVICE", "READONLY")
EVERYONE = {"operator", *ROLES}
ADMINS = {"operator", "ADMIN"}
OPERATOR = {"operator"}
ALL_SCOPES = ["read", "write", "admin"]

# (method, route) -> who may call it ("own": only on the caller's own objects, checked in test_reach_of_own).
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("POST", "/api/v1/tenants"): OPERATOR,
    ("GET", "/api/v1/tenants"): EVERYONE,
    ("GET", "/api/v1/tenants/{id}"): EVERYONE,
    ("PATCH", "/api/v1/tenants/{id}"): OPERATOR,
    ("POST", "/api/v1/users"): ADMINS,
    ("GET", "/api/v1/users"): EVERYONE,  # USER, SERVICE, READONLY: themselves only
    ("PATCH", "/api/v1/users/{id}"): ADMINS,
    ("POST", "/api/v1/api-keys"): ADMINS | {"USER"},  # USER: for itself only
    ("GET", "/api/v1/api-keys"): EVERYONE,  # USER, SERVICE, READONLY: their own keys only
    ("POST", "/api/v1/api-keys/import"): ADMINS,
    ("DELETE", "/api/v1/api-keys/{id}"): ADMINS | {"USER"},
    ("POST", "/api/v1/api-keys/{id}/rotate"): ADMINS | {"USER"},
    ("POST", "/api/v1/servers"): ADMINS,
    ("GET", "/api/v1/servers"): EVERYONE,
    ("GET", "/api/v1/servers/{id}"): EVERYONE,
    ("PUT", "/api/v1/servers/{id}/auth"): ADMINS,
    # The registry (test_registry_api.py covers the reach): everyone reads what discovery found, a tenant
    # ADMIN changes, unregisters, discovers and approves.
    ("PATCH", "/api/v1/servers/{id}"): ADMINS,
    ("DELETE", "/api/v1/servers/{id}"): ADMINS,
    ("GET", "/api/v1/servers/{id}/tools"): EVERYONE,
    ("GET", "/api/v1/servers/{id}/resources"): EVERYONE,
    ("GET", "/api/v1/servers/{id}/resource-templates"): EVERYONE,
    ("GET", "/api/v1/servers/{id}/prompts"): EVERYONE,
    ("POST", "/api/v1/servers/{id}/discover"): ADMINS,
    ("POST", "/api/v1/servers/{id}/tools/{name}/approve"): ADMINS,
    # Access rules (their own tests cover their reach): a tenant ADMIN's business.
    ("POST", "/api/v1/access-rules"): ADMINS,
    ("GET", "/api/v1/access-rules"): ADMINS,
    ("GET", "/api/v1/access-rules/{id}"): ADMINS,
    ("DELETE", "/api/v1/access-rules/{id}"): ADMINS,
    # Routing rules (test_routing_rules_api.py covers their reach): like access rules, a tenant ADMIN's business.
    ("POST", "/api/v1/routing-rules"): ADMINS,
    ("GET", "/api/v1/routing-rules"): ADMINS,
    ("GET", "/api/v1/routing-rules/{id}"): ADMINS,
    ("PATCH", "/api/v1/routing-rules/{id}"): ADMINS,
    ("DELETE", "/api/v1/routing-rules/{id}"): ADMINS,
    # Sign-in sessions (test_signin.py covers their reach): everyone their own, a tenant ADMIN the tenant's.
    ("GET", "/api/v1/sessions"): EVERYONE,
    ("DELETE", "/api/v1/sessions/{id}"): EVERYONE,
    # Retention policies (test_lifecycle_api.py covers the reach): the operator's defaults, a tenant ADMIN's
    # overrides for its own tenant; running the job now is the operator's.
    ("GET", "/api/v1/retention-policies"): ADMINS,
    ("POST", "/api/v1/retention-policies"): ADMINS,
    ("POST", "/api/v1/retention-policies/run"): OPERATOR,
    ("PATCH", "/api/v1/retention-policies/{id}"): ADMINS,
    ("DELETE", "/api/v1/retention-policies/{id}"): ADMINS,
    # Alert rules and their events (test_lifecycle_api.py): like routing rules, a tenant ADMIN's business.
    ("GET", "/api/v1/alerts"): ADMINS,
    ("POST", "/api/v1/alerts"): ADMINS,
    ("GET", "/api/v1/alerts/{id}"): ADMINS,
    ("PATCH", "/api/v1/alerts/{id}"): ADMINS,
    ("DELETE", "/api/v1/alerts/{id}"): ADMINS,
    ("GET", "/api/v1/alerts/{id}/events"): ADMINS,
    # The deployment's limits (test_rate_limit_settings.py): a tenant ADMIN reads, the operator changes.
    ("GET", "/api/v1/rate-limits"): ADMINS,
    ("PATCH", "/api/v1/rate-limits"): OPERATOR,
    ("DELETE", "/api/v1/rate-limits"): OPERATOR,
    # Per-address bans (test_bans.py): addresses belong to no tenant.
    ("GET", "/api/v1/bans"): OPERATOR,
    ("POST", "/api/v1/bans"): OPERATOR,
    ("DELETE", "/api/v1/bans/{address}"): OPERATOR,
    # Analytics (test_analytics.py covers the reach): a tenant ADMIN its own tenant's figures; the database's
    # size and statistics are the deployment's.
    ("GET", "/api/v1/analytics/server-health"): ADMINS,
    ("GET", "/api/v1/analytics/request-performance"): ADMINS,
    ("GET", "/api/v1/analytics/tenant-usage/{tenant_id}"): ADMINS,
    ("GET", "/api/v1/analytics/database"): OPERATOR,
    # Upstream health (tests/registry/test_health.py covers the reach): everyone reads it, a tenant ADMIN
    # puts a server in and out of maintenance.
    ("GET", "/api/v1/servers/{id}/health"): EVERYONE,
    ("PUT", "/api/v1/servers/{id}/maintenance"): ADMINS,
    # System configuration (test_system_config.py covers the reach): a tenant ADMIN reads the deployment's values
    # and its tenant's overrides, and writes only those overrides.
    ("GET", "/api/v1/config"): ADMINS,
    ("GET", "/api/v1/config/{key}"): ADMINS,
    ("PUT", "/api/v1/config/{key}"): ADMINS,
    ("DELETE", "/api/v1/config/{key}"): ADMINS,
    ("GET", "/api/v1/config/{key}/history"): ADMINS,
}
PUBLIC = {
    ("GET", "/api/v1/openapi.json"),
    # The sign-in flow itself: before there is a credential (logout checks its own).
    ("GET", "/auth/login/{provider}"), ("GET", "/auth/callback/{provider}"), ("POST", "/auth/logout"),
}


def _routes() -> set[tuple[str, str]]:
    app = ControlPlane(None, None).build_app()  # type: ignore[arg-type]
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def test_every_route_is_in_the_policy():
    routes = _routes()
    missing = routes - set(EXPECTED) - PUBLIC
    assert not missing, f"routes without an expected policy in this test: {sorted(missing)}"
    assert not set(EXPECTED) - routes, "the policy names routes the admin API does not have"
    app = ControlPlane(None, None).build_app()  # type: ignore[arg-type]
    for route in app.router.routes():
        declared = getattr(route.handler, "permission", "undeclared")
        # Every handler is an admin-wrapped route (a table action, or STRICT when None) or marked public.
        assert declared is None or declared == permissions.PUBLIC or declared in permissions.PERMISSIONS, route


class Principals:
    """One tenant with a user and an all-scopes admin-API key per role, and what the routes act on."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.keys: dict[str, str] = {"operator": gw.admin_key}
        self.users: dict[str, str] = {}

    async def setup(self, upstream: str) -> Principals:
        t = await self.gw.tenancy("acme", upstream)
        self.tenant_id, self.server_id = t.tenant_id, t.server_id
        for role in ROLES:
            self.users[role] = await self.user(role)
            self.keys[role] = (await self.key(self.users[role], ALL_SCOPES))["key"]
        self.users["operator"] = self.users["ADMIN"]  # whose objects the operator acts on
        return self

    async def user(self, role: str) -> str:
        name = f"{role.lower()}-{uuid.uuid4().hex[:6]}"
        status, body = await self.gw.admin("POST", "/users", {"tenant_id": self.tenant_id, "username": name,
                                                              "email": f"{name}@acme.test", "role": role})
        assert status == 201, body
        return body["id"]

    async def session(self, user_id: str) -> str:
        """A sign-in session of this user (made directly: test_signin.py runs the OAuth flow), its id."""
        from gateway.auth.signin import Identity
        from gateway.controlplane import sessions

        user = {"id": uuid.UUID(user_id), "tenant_id": uuid.UUID(self.tenant_id), "username": "-", "role": "-"}
        _, made = await sessions.open_session(self.gw.gateway.engine, user, Identity("test", "-", ()), ttl=600,
                                              ip=None, user_agent=None)
        return str(made["id"])

    async def key(self, user_id: str, scopes: list[str]) -> dict:
        status, body = await self.gw.admin("POST", "/api-keys", {"user_id": user_id, "name": "k", "scopes": scopes})
        assert status == 201, body
        return body


async def _request(p: Principals, who: str, method: str, route: str) -> int:
    """Call `route` as `who`, on objects `who` would own or reach; the HTTP status."""
    own_user = p.users[who]
    body = None
    path = route
    if route == "/api/v1/tenants" and method == "POST":
        body = {"name": f"t-{uuid.uuid4().hex[:8]}"}
    elif route == "/api/v1/tenants/{id}":
        path = route.replace("{id}", p.tenant_id)
        body = {"weight": 5} if method == "PATCH" else None
    elif route == "/api/v1/users" and method == "POST":
        name = f"new-{uuid.uuid4().hex[:8]}"
        body = {"tenant_id": p.tenant_id, "username": name, "email": f"{name}@acme.test"}
    elif route == "/api/v1/users/{id}":
        path = route.replace("{id}", await p.user("USER"))
        body = {"role": "SERVICE"}
    elif route == "/api/v1/api-keys" and method == "POST":
        body = {"user_id": own_user, "name": "self-made", "scopes": ["read"]}
    elif route == "/api/v1/api-keys/import":
        body = {"user_id": own_user, "name": "old", "key": f"legacy-{uuid.uuid4().hex}", "scopes": ["read"]}
    elif route.startswith("/api/v1/api-keys/{id}"):
        path = route.replace("{id}", (await p.key(own_user, ["proxy"]))["id"])
    elif route == "/api/v1/servers" and method == "POST":
        body = {"tenant_id": p.tenant_id, "name": f"s-{uuid.uuid4().hex[:8]}", "endpoint_url": "http://127.0.0.1:9/m"}
    elif route == "/api/v1/servers/{id}" and method == "DELETE":
        status, server = await p.gw.admin("POST", "/servers", {"tenant_id": p.tenant_id, "name": "doomed",
                                                               "endpoint_url": "http://127.0.0.1:9/m"})
        assert status in (201, 409), server
        if status == 409:  # a caller before this one was refused: the server is still there
            _, page = await p.gw.admin("GET", f"/servers?tenant_id={p.tenant_id}&name=doomed")
            server = page["items"][0]
        path = route.replace("{id}", server["id"])
    elif route == "/api/v1/servers/{id}":
        path = route.replace("{id}", p.server_id)
        body = {"description": f"changed by {who}"} if method == "PATCH" else None
    elif route == "/api/v1/servers/{id}/tools/{name}/approve":
        status, found = await p.gw.admin("POST", f"/servers/{p.server_id}/discover")
        assert status == 200, found
        path = route.replace("{id}", p.server_id).replace("{name}", "echo")
    elif route == "/api/v1/servers/{id}/auth":
        path = route.replace("{id}", p.server_id)
        body = {"auth": {"kind": "header", "header_name": "X-Key", "header_value": "v"}}
    elif route == "/api/v1/access-rules" and method == "POST":
        body = {"effect": "deny", "tenant_id": p.tenant_id, "role": "READONLY", "server_id": p.server_id}
    elif route == "/api/v1/rate-limits" and method == "PATCH":
        body = {"ip_per_minute": 600}
    elif route == "/api/v1/sessions/{id}":
        path = route.replace("{id}", await p.session(own_user))
    elif route == "/api/v1/analytics/tenant-usage/{tenant_id}":
        path = route.replace("{tenant_id}", p.tenant_id)
    elif route in ("/api/v1/servers/{id}/health", "/api/v1/servers/{id}/maintenance"):
        path = route.replace("{id}", p.server_id)
        body = {"maintenance": True} if method == "PUT" else None
    elif route == "/api/v1/bans" and method == "POST":
        body = {"address": "192.0.2.44", "seconds": 60, "reason": "permissions test"}
    elif route == "/api/v1/bans/{address}":
        status, ban = await p.gw.admin("POST", "/bans", {"address": "2001:db8::45", "seconds": 60})
        assert status == 201, ban
        path = route.replace("{address}", "2001:db8::45")
    elif route == "/api/v1/access-rules/{id}":
        status, rule = await p.gw.admin("POST", "/access-rules", {"effect": "allow", "tenant_id": p.tenant_id,
                                                                  "server_id": p.server_id})
        assert status == 201, rule
        path = route.replace("{id}", rule["id"])
    elif route == "/api/v1/routing-rules" and method == "POST":
        body = {"tenant_id": p.tenant_id, "name": f"r-{uuid.uuid4().hex[:8]}", "targets": [{"server_id": p.server_id}]}
    elif route == "/api/v1/routing-rules/{id}":
        status, rule = await p.gw.admin("POST", "/routing-rules", {"tenant_id": p.tenant_id,
                                                                   "name": f"r-{uuid.uuid4().hex[:8]}",
                                                                   "targets": [{"server_id": p.server_id}]})
        assert status == 201, rule
        path = route.replace("{id}", rule["id"])
        body = {"priority": 5} if method == "PATCH" else None
    elif route.startswith("/api/v1/retention-policies") and not route.endswith("/run"):
        # One policy per caller: a table of its own in the tenant (the operator's: the deployment's).
        table = {"ADMIN": "request_logs", "READONLY": "audit_logs", "SERVICE": "server_metrics",
                 "USER": "alert_events", "operator": "request_logs"}[who]
        policy = {"tenant_id": None if who == "operator" else p.tenant_id, "table_name": table, "days": 400}
        if route.endswith("{id}"):
            status, made = await p.gw.admin("POST", "/retention-policies", policy)
            assert status == 201, made
            path = route.replace("{id}", made["id"])
            body = {"days": 500} if method == "PATCH" else None
        elif method == "POST":
            body = policy
    elif route == "/api/v1/alerts" and method == "POST":
        body = {"tenant_id": p.tenant_id, "name": f"a-{uuid.uuid4().hex[:8]}", "metric": "health"}
    elif route.startswith("/api/v1/alerts/{id}"):
        status, rule = await p.gw.admin("POST", "/alerts", {"tenant_id": p.tenant_id, "server_id": p.server_id,
                                                            "name": f"a-{uuid.uuid4().hex[:8]}", "metric": "health"})
        assert status == 201, rule
        path = route.replace("{id}", rule["id"])
        body = {"enabled": False} if method == "PATCH" else None
    elif route.rpartition("/")[2] in ("tools", "resources", "resource-templates", "prompts", "discover"):
        path = route.replace("{id}", p.server_id)  # what discovery found, and discovering
    elif route.startswith("/api/v1/config/{key}"):
        key = f"perm.{uuid.uuid4().hex[:8]}"  # a deployment's value and the tenant's override of it
        for tenant in (None, p.tenant_id):
            status, made = await p.gw.admin("PUT", f"/config/{key}", {"value": 1, "tenant_id": tenant})
            assert status == 200, made
        path = route.replace("{key}", key)
        if method == "DELETE" or route.endswith("/history"):
            path += f"?tenant_id={p.tenant_id}"
        body = {"value": 2, "tenant_id": p.tenant_id} if method == "PUT" else None
    status, answer = await p.gw.admin(method, path.removeprefix("/api/v1"), body, key=p.keys[who])
    if status == 403:
        assert answer["error"]["code"] == "forbidden" and answer["error"]["message"], answer
    return status


@pytest.mark.parametrize(("method", "route"), sorted(EXPECTED), ids=lambda x: x)
async def test_route_allows_exactly_the_roles_it_should(gateway, mcp_upstream, method, route):
    p = await Principals(gateway).setup(mcp_upstream)
    allowed = EXPECTED[(method, route)]
    results = {who: await _request(p, who, method, route) for who in sorted(EVERYONE)}
    for who, status in results.items():
        if who in allowed:
            assert 200 <= status < 300, f"{who} should be allowed {method} {route}: {results}"
        else:
            assert status == 403, f"{who} should be refused {method} {route}: {results}"


async def test_openapi_is_public(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.admin_url}/openapi.json") as resp:
            assert resp.status == 200
            paths = (await resp.json())["paths"]
    assert {"/api/v1/api-keys/{id}/rotate", "/api/v1/api-keys/import", "/api/v1/tenants/{id}",
            "/api/v1/users/{id}", "/api/v1/servers/{id}/auth"} <= set(paths)
    # Every registry and routing-rule route is documented, with its operations.
    for route in EXPECTED:
        if route[1].startswith(("/api/v1/servers", "/api/v1/routing-rules", "/api/v1/config")):
            assert route[0].lower() in paths.get(route[1], {}), route


# -- scopes ------------------------------------------------------------------------------------------------------
async def test_scopes_decide_within_the_role(gateway, mcp_upstream):
    p = await Principals(gateway).setup(mcp_upstream)
    admin = p.users["ADMIN"]
    read = (await p.key(admin, ["read"]))["key"]
    write = (await p.key(admin, ["write", "proxy"]))["key"]
    proxy = (await p.key(admin, ["proxy"]))["key"]
    server = {"tenant_id": p.tenant_id, "name": "x", "endpoint_url": "http://127.0.0.1:9/m"}

    # `read`: every read the role allows, no write.
    assert (await gateway.admin("GET", "/servers", key=read))[0] == 200
    status, body = await gateway.admin("POST", "/servers", server, key=read)
    assert status == 403 and "'admin'" in body["error"]["message"]
    # `write`: reads, and API keys; nothing else.
    assert (await gateway.admin("GET", "/users", key=write))[0] == 200
    status, made = await gateway.admin("POST", "/api-keys", {"user_id": admin, "name": "w", "scopes": ["proxy"]},
                                       key=write)
    assert status == 201
    assert (await gateway.admin("POST", f"/api-keys/{made['id']}/rotate", key=write))[0] == 201
    assert (await gateway.admin("POST", "/servers", server, key=write))[0] == 403
    # A data-plane key is nothing on the admin API.
    for method, path in (("GET", "/servers"), ("GET", "/api-keys"), ("GET", "/tenants")):
        status, body = await gateway.admin(method, path, key=proxy)
        assert status == 403 and "scope" in body["error"]["message"]


async def test_keys_grant_no_more_than_their_maker_holds(gateway, mcp_upstream):
    p = await Principals(gateway).setup(mcp_upstream)
    user = p.users["USER"]
    narrow = (await p.key(user, ["write", "proxy"]))["key"]
    status, _ = await gateway.admin("POST", "/api-keys", {"user_id": user, "name": "ok", "scopes": ["proxy"]},
                                    key=narrow)
    assert status == 201
    status, body = await gateway.admin("POST", "/api-keys", {"user_id": user, "name": "up", "scopes": ["admin"]},
                                       key=narrow)
    assert status == 403 and "admin" in body["error"]["message"]
    # A tenant admin grants any scope to its users, except `metrics` (every tenant's traffic): the operator's.
    status, _ = await gateway.admin("POST", "/api-keys", {"user_id": user, "name": "a", "scopes": ["admin", "proxy"]},
                                    key=p.keys["ADMIN"])
    assert status == 201
    status, body = await gateway.admin("POST", "/api-keys", {"user_id": user, "name": "m", "scopes": ["metrics"]},
                                       key=p.keys["ADMIN"])
    assert status == 403 and "metrics" in body["error"]["message"]
    assert (await gateway.admin("POST", "/api-keys", {"user_id": user, "name": "m", "scopes": ["metrics"]}))[0] == 201


async def test_reach_of_own(gateway, mcp_upstream):
    """USER, SERVICE and READONLY see themselves and their own keys; a USER manages only its own keys."""
    p = await Principals(gateway).setup(mcp_upstream)
    for role in ("USER", "SERVICE", "READONLY"):
        status, users = await gateway.admin("GET", "/users", key=p.keys[role])
        assert status == 200 and [u["id"] for u in users["items"]] == [p.users[role]]
        status, keys = await gateway.admin("GET", "/api-keys", key=p.keys[role])
        assert status == 200 and {k["user_id"] for k in keys["items"]} == {p.users[role]}
        status, servers = await gateway.admin("GET", "/servers", key=p.keys[role])
        assert status == 200 and [s["id"] for s in servers["items"]] == [p.server_id]  # the tenant's
    status, users = await gateway.admin("GET", "/users", key=p.keys["ADMIN"])
    assert len(users["items"]) == 1 + len(ROLES)  # the tenancy's user and one per role

    others = await p.key(p.users["SERVICE"], ["proxy"])
    user_key = p.keys["USER"]
    for method, path, body in (
        ("DELETE", f"/api-keys/{others['id']}", None),
        ("POST", f"/api-keys/{others['id']}/rotate", None),
        ("POST", "/api-keys", {"user_id": p.users["SERVICE"], "name": "x", "scopes": ["read"]}),
    ):
        status, answer = await gateway.admin(method, path, body, key=user_key)
        assert status == 404, (method, path, answer)  # outside its reach: as if it did not exist


# -- the data plane's operational endpoints --------------------------------------------------------------------
async def _get(url: str, key: str | None = None) -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            text = await resp.text()
            return resp.status, (await resp.json()) if resp.content_type == "application/json" else text


async def test_operational_endpoints(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    health = await gateway.tenancy("ops", mcp_upstream, scopes=["health"])
    # /healthz: public liveness, says nothing else.
    assert await _get(f"{gateway.url}/healthz") == (200, {"status": "ok"})
    # /readyz: public status; the checks only for a `health` key; a credential sent must be valid.
    assert await _get(f"{gateway.url}/readyz") == (200, {"status": "ready"})
    status, body = await _get(f"{gateway.url}/readyz", health.api_key)
    assert status == 200 and body["checks"] == {"snapshot": True, "writer": True} and body["config_version"] >= 1
    status, body = await _get(f"{gateway.url}/readyz", t.api_key)  # proxy only
    assert status == 403 and "health" in body["error"]["message"]
    assert (await _get(f"{gateway.url}/readyz", "gw_abcdefghij_" + "A" * 40))[0] == 401
    # /metrics: the `metrics` scope.
    assert (await _get(f"{gateway.url}/metrics"))[0] == 401
    assert (await _get(f"{gateway.url}/metrics", health.api_key))[0] == 403
    status, text = await _get(f"{gateway.url}/metrics", gateway.admin_key)
    assert status == 200 and "gateway_requests_total" in text
