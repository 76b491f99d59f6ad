"""A misbehaving upstream: every failure reaches the client as a clear JSON-RPC error, nothing hangs.

The upstream here is a real TCP server speaking (or failing to speak) HTTP/1.1;
its URL path picks the misbehaviour.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from gateway.dataplane import jsonrpc

ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{}}'
CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}


class FaultyUpstream:
    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                served_here += 1
                path = head.split(b" ")[1]
                if path == b"/close":
                    return
                if path == b"/garbage":
                    writer.write(b"SPEAKING NO HTTP TODAY\r\n\r\n")
                    await writer.drain()
                    return
                if path == b"/stall":
                    await asyncio.sleep(3600)
                if path == b"/stall-body":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                    await writer.drain()
                    await asyncio.sleep(3600)
                if path == b"/cut-body":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                    await writer.drain()
                    return
                if path == b"/once-per-connection" and served_here > 1:
                    # The idle connection "timed out" just as the next request arrived.
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(ANSWER), ANSWER)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def faulty():
    upstream = FaultyUpstream()
    url = await upstream.start()
    yield upstream, url
    await upstream.stop()


INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


async def _call(gw, tenancy, server: str, body: dict = CALL) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(
            f"{gw.url}/servers/{server}/mcp", json=body,
            headers={"Authorization": f"Bearer {tenancy.api_key}", "Accept": "application/json, text/event-stream"},
        ) as resp:
            return resp.status, await resp.read()


async def _register(gw, tenancy, name: str, url: str) -> None:
    status, body = await gw.admin(
        "POST", "/servers", {"tenant_id": tenancy.tenant_id, "name": name, "endpoint_url": url}
    )
    assert status == 201, body
    # Registration asks for a capability discovery, which talks to the upstream too: let it
    # finish (or fail) before a test counts connections and requests.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, server = await gw.admin("GET", f"/servers/{body['id']}")
        if server.get("discovered_at") or server.get("discovery_error"):
            return
        assert asyncio.get_running_loop().time() < deadline, "discovery did not settle"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "http_status", "code", "words"),
    [
        ("/close", 502, jsonrpc.UPSTREAM_BAD_RESPONSE, "closed the connection"),
        ("/garbage", 502, jsonrpc.UPSTREAM_BAD_RESPONSE, "malformed"),
        ("/stall", 504, jsonrpc.UPSTREAM_TIMEOUT, "did not answer"),
        ("/stall-body", 504, jsonrpc.UPSTREAM_TIMEOUT, "did not answer"),
        ("/cut-body", 502, jsonrpc.UPSTREAM_BAD_RESPONSE, "mid-response"),
    ],
)
async def test_faults_become_clear_errors(pg_url, make_gateway, mcp_upstream, faulty, path, http_status, code, words):
    upstream, base = faulty
    gw = await make_gateway(pg_url, dataplane={"upstream_timeout": 0.5})
    t = await gw.tenancy("acme", mcp_upstream)
    await _register(gw, t, "faulty", base + path)
    status, raw = await _call(gw, t, "faulty")
    body = orjson.loads(raw)
    assert status == http_status, body
    assert body["error"]["code"] == code
    assert "faulty" in body["error"]["message"] and words in body["error"]["message"]
    # The gateway is fine afterwards: the healthy server still answers.
    status, raw = await _call(gw, t, "demo", INIT)
    assert status == 200 and b'"serverInfo"' in raw
    assert not [p for p in gw.gateway.dataplane.pools.values() if p.open_connections > p.max_connections]


async def test_stale_keepalive_connection_is_retried_once(pg_url, make_gateway, mcp_upstream, faulty):
    upstream, base = faulty
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", mcp_upstream)
    await _register(gw, t, "flaky", base + "/once-per-connection")
    before = upstream.connections
    for _ in range(3):
        status, raw = await _call(gw, t, "flaky")
        assert status == 200 and raw == ANSWER
    # Each call found its kept-alive connection dead (the first: the one discovery left) and used a fresh one.
    assert upstream.connections - before == 3


async def test_keepalive_connections_are_reused(pg_url, make_gateway, mcp_upstream, faulty):
    upstream, base = faulty
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", mcp_upstream)
    await _register(gw, t, "steady", base + "/ok")
    requests, connections = upstream.requests, upstream.connections
    for _ in range(20):
        status, _ = await _call(gw, t, "steady")
        assert status == 200
    assert upstream.requests - requests == 20
    assert upstream.connections - connections <= 1  # at most one new: discovery's may still be kept alive


async def test_servers_sharing_an_origin_keep_their_own_paths(pg_url, make_gateway, mcp_upstream, faulty):
    upstream, base = faulty
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", mcp_upstream)
    await _register(gw, t, "fine", base + "/ok")
    await _register(gw, t, "broken", base + "/close")
    assert (await _call(gw, t, "fine"))[0] == 200
    assert (await _call(gw, t, "broken"))[0] == 502
    assert (await _call(gw, t, "fine"))[0] == 200
    # One pool for the origin, paths per server (the demo tenancy's server has its own origin).
    assert len([origin for origin in gw.gateway.dataplane.pools if base.startswith(origin)]) == 1
