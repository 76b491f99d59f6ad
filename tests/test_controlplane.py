"""The admin API: shapes, validation that lists every bad field, and tenant scoping."""

from __future__ import annotations

import uuid

import aiohttp
import asyncpg


async def test_create_and_list_shapes(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, page = await gateway.admin("GET", "/servers")
    assert status == 200
    assert set(page) == {"items", "next_cursor"}
    (server,) = page["items"]
    assert server["id"] == t.server_id and server["name"] == "demo"
    assert server["transport_type"] == "http" and server["health_status"] == "UNKNOWN"
    status, keys = await gateway.admin("GET", "/api-keys")
    assert status == 200
    for key in keys["items"]:
        assert "key" not in key and "key_hash" not in key and "salt" not in key


async def test_server_validation_lists_every_invalid_field(gateway):
    status, tenant = await gateway.admin("POST", "/tenants", {"name": "acme"})
    assert status == 201
    status, body = await gateway.admin(
        "POST",
        "/servers",
        {
            "tenant_id": tenant["id"],
            "name": "",
            "endpoint_url": "ftp://" + "x" * 600,
            "transport_type": "carrier-pigeon",
            "colour": "blue",
        },
    )
    assert status == 422
    fields = {d["field"] for d in body["error"]["details"]}
    assert fields == {"name", "endpoint_url", "transport_type", "colour"}
    # nothing was written
    status, page = await gateway.admin("GET", "/servers")
    assert page["items"] == []


async def test_server_endpoint_must_be_http_url(gateway):
    _, tenant = await gateway.admin("POST", "/tenants", {"name": "acme"})
    status, body = await gateway.admin(
        "POST", "/servers", {"tenant_id": tenant["id"], "name": "s", "endpoint_url": "not a url"}
    )
    assert status == 422
    assert body["error"]["details"] == [
        {"field": "endpoint_url", "message": "must be an http:// or https:// URL with a host"}
    ]


async def test_api_key_limits_validated(gateway):
    _, tenant = await gateway.admin("POST", "/tenants", {"name": "acme"})
    _, user = await gateway.admin(
        "POST", "/users", {"tenant_id": tenant["id"], "username": "u", "email": "u@example.com", "role": "USER"}
    )
    status, body = await gateway.admin(
        "POST",
        "/api-keys",
        {"user_id": user["id"], "name": "k", "scopes": ["proxy", "root"], "rate_limit_per_hour": 0,
         "rate_limit_per_day": 2_000_000, "expires_at": "2001-01-01T00:00:00Z"},
    )
    assert status == 422
    assert {d["field"] for d in body["error"]["details"]} == {
        "scopes", "rate_limit_per_hour", "rate_limit_per_day", "expires_at"
    }


async def test_malformed_admin_body_422(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.admin_url + "/tenants", data=b"{oops",
            headers={"Authorization": f"Bearer {gateway.admin_key}"},
        ) as resp:
            assert resp.status == 422
            assert (await resp.json())["error"]["code"] == "validation_failed"


async def test_duplicates_409(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, body = await gateway.admin("POST", "/tenants", {"name": "acme"})
    assert status == 409 and body["error"]["code"] == "conflict"
    status, _ = await gateway.admin(
        "POST", "/servers", {"tenant_id": t.tenant_id, "name": "demo", "endpoint_url": mcp_upstream}
    )
    assert status == 409
    # the same server name in another tenant is fine
    _, other = await gateway.admin("POST", "/tenants", {"name": "globex"})
    status, _ = await gateway.admin(
        "POST", "/servers", {"tenant_id": other["id"], "name": "demo", "endpoint_url": mcp_upstream}
    )
    assert status == 201


async def test_admin_credentials_required(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.admin_url + "/servers") as resp:
            assert resp.status == 401
            assert "WWW-Authenticate" in resp.headers
    t_status, _ = await gateway.admin("GET", "/servers", key="gw_abcdefghij_" + "A" * 40)
    assert t_status == 401


async def test_proxy_key_is_not_an_admin_key(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, body = await gateway.admin("GET", "/servers", key=t.api_key)
    assert status == 403
    assert "admin" in body["error"]["message"]


async def test_tenant_admin_sees_and_touches_only_its_tenant(gateway, mcp_upstream, pg_url):
    a = await gateway.tenancy("acme", mcp_upstream)
    b = await gateway.tenancy("globex", mcp_upstream)
    # An ADMIN user of tenant a with an admin key.
    _, admin_user = await gateway.admin(
        "POST", "/users", {"tenant_id": a.tenant_id, "username": "acme-admin", "email": "admin@acme.test",
                           "role": "ADMIN"},
    )
    _, admin_key = await gateway.admin("POST", "/api-keys", {"user_id": admin_user["id"], "name": "adm",
                                                             "scopes": ["admin"]})
    key = admin_key["key"]

    status, page = await gateway.admin("GET", "/servers", key=key)
    assert status == 200 and [s["id"] for s in page["items"]] == [a.server_id]
    status, page = await gateway.admin("GET", "/tenants", key=key)
    assert [t["id"] for t in page["items"]] == [a.tenant_id]

    # b's objects: refused exactly as if they did not exist.
    status, missing = await gateway.admin("GET", "/servers/00000000-0000-0000-0000-000000000000", key=key)
    status_b, other = await gateway.admin("GET", f"/servers/{b.server_id}", key=key)
    assert status == status_b == 404 and missing == other
    status, body = await gateway.admin("DELETE", f"/api-keys/{b.api_key_id}", key=key)
    assert status == 404
    status, body = await gateway.admin("POST", "/api-keys", {"user_id": b.user_id, "name": "x"}, key=key)
    assert status == 404
    status, body = await gateway.admin(
        "POST", "/servers", {"tenant_id": b.tenant_id, "name": "sneaky", "endpoint_url": mcp_upstream}, key=key
    )
    assert status == 404
    status, body = await gateway.admin("POST", "/tenants", {"name": "new"}, key=key)
    assert status == 403

    # Without a tenant_id, a tenant admin's objects land in its own tenant.
    status, server = await gateway.admin(
        "POST", "/servers", {"name": "mine", "endpoint_url": mcp_upstream}, key=key
    )
    assert status == 201 and server["tenant_id"] == a.tenant_id

    # b's key still works: nothing of b was touched.
    conn = await asyncpg.connect(pg_url)
    try:
        active = await conn.fetchval("SELECT is_active FROM enhanced_api_keys WHERE id = $1", uuid.UUID(b.api_key_id))
    finally:
        await conn.close()
    assert active is True


async def test_new_key_works_immediately(gateway, mcp_upstream):
    """A key minted through the admin API is usable on the very next request."""
    t = await gateway.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            t.endpoint,
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                             "clientInfo": {"name": "t", "version": "1"}}},
            headers={"Authorization": f"Bearer {t.api_key}", "Accept": "application/json, text/event-stream"},
        ) as resp:
            assert resp.status == 200


async def test_openapi_document(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.admin_url + "/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    assert {"/api/v1/tenants", "/api/v1/users", "/api/v1/api-keys", "/api/v1/servers"} <= set(doc["paths"])
    server = doc["components"]["schemas"]["ServerCreate"]
    assert server["properties"]["name"]["maxLength"] == 255
    assert server["properties"]["endpoint_url"]["maxLength"] == 500


async def test_only_the_operator_registers_stdio_servers(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    _, admin_user = await gateway.admin(
        "POST", "/users", {"tenant_id": t.tenant_id, "username": "acme-admin", "email": "adm@acme.test", "role": "ADMIN"}
    )
    _, admin_key = await gateway.admin("POST", "/api-keys", {"user_id": admin_user["id"], "name": "adm",
                                                             "scopes": ["admin"]})
    stdio = {"name": "shell", "endpoint_url": "python -m something", "transport_type": "stdio"}
    status, body = await gateway.admin("POST", "/servers", stdio, key=admin_key["key"])
    assert status == 403 and "operator" in body["error"]["message"]
    status, _ = await gateway.admin("POST", "/servers", {**stdio, "tenant_id": t.tenant_id})
    assert status == 201
