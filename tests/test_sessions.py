"""Sessions: one session across replicas, bound to the key and server that opened it."""

from __future__ import annotations

import uuid

import aiohttp
import orjson
import pytest

from gateway.dataplane import jsonrpc
from gateway.dataplane.sessions import TOKEN_PREFIX, SessionSealer

ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def _sse_json(raw: bytes) -> dict:
    """The JSON-RPC message in an SSE body, or the JSON body itself."""
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            return orjson.loads(line[5:])
    return orjson.loads(raw)


class LegacyClient:
    """A 2025-11-25 client speaking raw HTTP, free to pick a gateway per request."""

    def __init__(self, http: aiohttp.ClientSession, key: str) -> None:
        self.http, self.key, self.session_id = http, key, None

    def headers(self) -> dict:
        headers = {"Authorization": f"Bearer {self.key}", "Accept": ACCEPT, "Content-Type": "application/json"}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = "2025-11-25"
        return headers

    async def post(self, endpoint: str, message: dict) -> tuple[int, dict | None]:
        async with self.http.post(endpoint, data=orjson.dumps(message), headers=self.headers()) as resp:
            raw = await resp.read()
            if message.get("method") == "initialize" and resp.status == 200:
                self.session_id = resp.headers["Mcp-Session-Id"]
            return resp.status, (_sse_json(raw) if raw else None)

    async def delete(self, endpoint: str) -> int:
        async with self.http.delete(endpoint, headers=self.headers()) as resp:
            return resp.status


@pytest.fixture
async def replicas(pg_url, make_gateway, mcp_upstream):
    a = await make_gateway(pg_url)
    b = await make_gateway(pg_url)
    t = await a.tenancy("acme", mcp_upstream)
    await b.gateway.store.refresh()
    return a, b, t


async def test_one_session_across_two_replicas(replicas):
    a, b, t = replicas
    on_a, on_b = f"{a.url}/servers/demo/mcp", f"{b.url}/servers/demo/mcp"
    async with aiohttp.ClientSession() as http:
        client = LegacyClient(http, t.api_key)
        status, answer = await client.post(on_a, INIT)
        assert status == 200 and answer["result"]["serverInfo"]
        assert client.session_id.startswith(TOKEN_PREFIX)  # the upstream's id never reaches the client
        status, _ = await client.post(on_b, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert status == 202
        for i, endpoint in enumerate([on_a, on_b, on_a, on_b]):
            status, answer = await client.post(
                endpoint, {"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call",
                           "params": {"name": "add", "arguments": {"a": i, "b": 1}}},
            )
            assert status == 200 and answer["id"] == 10 + i
            assert answer["result"]["content"][0]["text"] == f"{i + 1.0}"
        assert await client.delete(on_b) == 200
        # Ended on one replica, ended on all (the upstream ended it).
        status, _ = await client.post(on_a, {"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
        assert status == 404


async def test_another_key_presenting_the_session_gets_404(replicas):
    a, _, t = replicas
    _, user = await a.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": "mallory",
                                               "email": "m@acme.test", "role": "USER"})
    _, other = await a.admin("POST", "/api-keys", {"user_id": user["id"], "name": "m", "scopes": ["proxy"]})
    async with aiohttp.ClientSession() as http:
        owner = LegacyClient(http, t.api_key)
        await owner.post(t.endpoint, INIT)
        thief = LegacyClient(http, other["key"])
        thief.session_id = owner.session_id
        status, answer = await thief.post(t.endpoint, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert status == 404
        assert answer["error"]["code"] == jsonrpc.SESSION_NOT_FOUND
        assert await thief.delete(t.endpoint) == 404
        # The owner's session is untouched.
        status, _ = await owner.post(t.endpoint, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert status == 200


async def test_a_session_is_bound_to_its_server(replicas, mcp_upstream):
    a, _, t = replicas
    status, _ = await a.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "other",
                                                   "endpoint_url": mcp_upstream})
    assert status == 201
    async with aiohttp.ClientSession() as http:
        client = LegacyClient(http, t.api_key)
        await client.post(t.endpoint, INIT)
        status, answer = await client.post(f"{a.url}/servers/other/mcp", {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert status == 404 and answer["error"]["code"] == jsonrpc.SESSION_NOT_FOUND


@pytest.mark.parametrize("forged", ["abc", TOKEN_PREFIX + "AAAA", TOKEN_PREFIX + "x" * 3000, "gws1.!!!"])
async def test_forged_session_ids_get_404(replicas, forged):
    a, _, t = replicas
    async with aiohttp.ClientSession() as http:
        client = LegacyClient(http, t.api_key)
        client.session_id = forged
        status, answer = await client.post(t.endpoint, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert status == 404 and answer["error"]["code"] == jsonrpc.SESSION_NOT_FOUND


async def test_modern_requests_alternate_freely(replicas, mcp_upstream):
    a, b, t = replicas
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    async with aiohttp.ClientSession() as http:
        for i, gw in enumerate([a, b, a, b]):
            async with http.post(
                f"{gw.url}/servers/demo/mcp",
                json={"jsonrpc": "2.0", "id": i, "method": "tools/list", "params": {"_meta": meta}},
                headers={"Authorization": f"Bearer {t.api_key}", "Accept": ACCEPT,
                         "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"},
            ) as resp:
                assert resp.status == 200
                assert "Mcp-Session-Id" not in resp.headers
                assert _sse_json(await resp.read())["id"] == i


def test_sealer_rejects_tampering_and_other_secrets():
    sealer = SessionSealer("s" * 40)
    key, server = uuid.uuid4(), uuid.uuid4()
    token = sealer.seal("upstream-123", key, server)
    assert sealer.open(token, key, server) == "upstream-123"
    assert sealer.open(token, uuid.uuid4(), server) is None
    assert sealer.open(token, key, uuid.uuid4()) is None
    assert SessionSealer("t" * 40).open(token, key, server) is None
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert sealer.open(flipped, key, server) is None
    assert sealer.seal("upstream-123", key, server) != token  # fresh nonce each time
    assert all(0x21 <= ord(c) <= 0x7E for c in token)  # the spec's visible-ASCII rule for session ids
