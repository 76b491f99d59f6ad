"""Every refusal on the MCP path: the HTTP status, the JSON-RPC error code, an actionable message.

Bad input must change nothing: refused requests never reach the upstream
(checked by what the upstream would have answered) and are still recorded.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import datetime, timedelta, timezone

import aiohttp
import orjson
import pytest

from gateway.dataplane import jsonrpc

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
ACCEPT = "application/json, text/event-stream"


async def post(url: str, *, key: str | None = None, json=None, data: bytes | None = None, headers=None):
    sent = {"Accept": ACCEPT, "Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=json, data=data, headers=sent) as resp:
            body = await resp.read()
            return resp.status, resp.headers, body


def error_of(body: bytes) -> dict:
    doc = orjson.loads(body)
    assert doc["jsonrpc"] == "2.0" and "error" in doc, doc
    return doc["error"]


async def test_missing_credentials_401_with_challenge(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, headers, body = await post(t.endpoint, json=INIT)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    error = error_of(body)
    assert error["code"] == jsonrpc.UNAUTHENTICATED
    assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize(
    "token",
    [
        "nonsense",
        "gw_abcdefghij_" + "A" * 40,  # well-formed, unknown prefix
        "Basic dXNlcjpwYXNz",
    ],
)
async def test_bad_key_401(gateway, mcp_upstream, token):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, headers, body = await post(t.endpoint, key=token, json=INIT)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert error_of(body) == {"code": jsonrpc.UNAUTHENTICATED, "message": "Invalid API key"}


async def test_wrong_secret_for_a_real_prefix_401(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    forged = t.api_key[:-1] + ("A" if t.api_key[-1] != "A" else "B")
    status, _, body = await post(t.endpoint, key=forged, json=INIT)
    assert status == 401
    assert error_of(body)["message"] == "Invalid API key"


async def test_revoked_key_401(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, _, _ = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 200
    status, revoked = await gateway.admin("DELETE", f"/api-keys/{t.api_key_id}")
    assert status == 200 and revoked["is_active"] is False
    status, _, body = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 401
    assert "revoked" in error_of(body)["message"]


async def test_expired_key_401(gateway, mcp_upstream):
    # Seconds enough for a busy machine to make the key and use it once before it expires.
    soon = datetime.now(timezone.utc) + timedelta(seconds=4)
    t = await gateway.tenancy("acme", mcp_upstream, expires_at=soon.isoformat())
    status, _, _ = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 200
    await asyncio.sleep((soon - datetime.now(timezone.utc)).total_seconds() + 0.2)
    status, headers, body = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 401
    assert "expired" in error_of(body)["message"]
    assert "WWW-Authenticate" in headers


async def test_key_without_proxy_scope_403(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream, scopes=["metrics"])
    status, headers, body = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 403
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert error_of(body)["code"] == jsonrpc.FORBIDDEN


async def test_unknown_server_and_other_tenants_server_look_the_same(gateway, mcp_upstream):
    a = await gateway.tenancy("acme", mcp_upstream, server_name="acme-tools")
    b = await gateway.tenancy("globex", mcp_upstream, server_name="globex-tools")
    status1, _, body1 = await post(f"{gateway.url}/servers/no-such-server/mcp", key=a.api_key, json=INIT)
    status2, _, body2 = await post(f"{gateway.url}/servers/globex-tools/mcp", key=a.api_key, json=INIT)
    assert status1 == status2 == 404
    e1, e2 = error_of(body1), error_of(body2)
    assert e1["code"] == e2["code"] == jsonrpc.UNKNOWN_SERVER
    # The message names what was asked for and nothing about who owns it.
    assert e2["message"] == e1["message"].replace("no-such-server", "globex-tools")
    # b's own key does reach its server.
    status, _, _ = await post(b.endpoint, key=b.api_key, json=INIT)
    assert status == 200


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", jsonrpc.PARSE_ERROR),
        (b"", jsonrpc.PARSE_ERROR),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', jsonrpc.INVALID_REQUEST),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', jsonrpc.INVALID_REQUEST),
        (b'"just a string"', jsonrpc.INVALID_REQUEST),
        (b"[]", jsonrpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 42}}', jsonrpc.INVALID_PARAMS),
    ],
)
async def test_malformed_bodies_400(gateway, mcp_upstream, raw, code):
    t = await gateway.tenancy("acme", mcp_upstream)
    status, _, body = await post(t.endpoint, key=t.api_key, data=raw)
    assert status == 400
    error = error_of(body)
    assert error["code"] == code
    assert error["message"]


async def test_oversized_body_413(pg_url, mcp_upstream, make_gateway):
    gw = await make_gateway(pg_url, dataplane={"max_body_bytes": 1024})
    t = await gw.tenancy("acme", mcp_upstream)
    big = {**CALL, "params": {"name": "echo", "arguments": {"text": "x" * 2000}}}
    status, _, body = await post(t.endpoint, key=t.api_key, json=big)
    assert status == 413
    error = error_of(body)
    assert error["code"] == jsonrpc.PAYLOAD_TOO_LARGE and "1024" in error["message"]

    # Without a Content-Length (chunked upload) the limit holds too.
    async def chunks():
        for _ in range(4):
            yield b" " * 512
        yield b"{}"

    async with aiohttp.ClientSession() as http:
        async with http.post(
            t.endpoint, data=chunks(), headers={"Authorization": f"Bearer {t.api_key}", "Accept": ACCEPT}
        ) as resp:
            assert resp.status == 413
            assert error_of(await resp.read())["code"] == jsonrpc.PAYLOAD_TOO_LARGE


async def test_over_hourly_limit_429_with_retry_after(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream, rate_limit_per_hour=3)
    for _ in range(3):
        status, _, _ = await post(t.endpoint, key=t.api_key, json=INIT)
        assert status == 200
    status, headers, body = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 429
    # 3 per hour refills one token every 1200 s.
    assert 1 <= int(headers["Retry-After"]) <= 1200
    error = error_of(body)
    assert error["code"] == jsonrpc.RATE_LIMITED
    assert "3 requests per hour" in error["message"]
    assert error["data"]["tier"] == "api_key"
    # The refusal carries the request's id so the client can match it.
    assert orjson.loads(body)["id"] == INIT["id"]


async def test_unreachable_upstream_502(gateway):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t = await gateway.tenancy("acme", f"http://127.0.0.1:{port}/mcp")
    status, _, body = await post(t.endpoint, key=t.api_key, json=INIT)
    assert status == 502
    error = error_of(body)
    assert error["code"] == jsonrpc.UPSTREAM_UNAVAILABLE
    assert "unreachable" in error["message"]


async def test_refusals_are_recorded(gateway, pg_url, mcp_upstream):
    import asyncpg

    t = await gateway.tenancy("acme", mcp_upstream)
    await post(t.endpoint, json=INIT)  # 401
    await post(f"{gateway.url}/servers/nope/mcp", key=t.api_key, json=INIT)  # 404
    await post(t.endpoint, key=t.api_key, data=b"{")  # 400
    await gateway.gateway.writer.flush()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT status_code, error_code, tenant_id FROM request_logs ORDER BY created_at")
    finally:
        await conn.close()
    assert [(r["status_code"], r["error_code"]) for r in rows] == [
        (401, jsonrpc.UNAUTHENTICATED),
        (404, jsonrpc.UNKNOWN_SERVER),
        (400, jsonrpc.PARSE_ERROR),
    ]
    assert rows[0]["tenant_id"] is None and str(rows[1]["tenant_id"]) == t.tenant_id
