"""A real MCP client (official SDK) through a real gateway to a real MCP server, both eras.

Upstream: gateway.demo.upstream (MCPServer from the SDK) in its own process.
Gateway: started in the test's loop on PostgreSQL, provisioned through the
admin API. Each test checks what the client sees and what the gateway recorded.
"""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest
from mcp.types import TextContent

from gateway.demo.client import gateway_client

MODES = ["legacy", "2026-07-28"]


async def _request_logs(gw, pg_url: str, expected: int) -> list[asyncpg.Record]:
    """The request log once it holds `expected` rows.

    A row is recorded when its exchange ends, which can be a moment after the
    client has its answer (the SSE stream's last bytes), so wait for it.
    """
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(100):
            await gw.gateway.writer.flush()
            rows = await conn.fetch("SELECT * FROM request_logs ORDER BY created_at")
            if len(rows) >= expected:
                return rows
            await asyncio.sleep(0.05)
        return rows
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", ["sse", "json"])
async def test_sdk_client_through_gateway(gateway, pg_url, mcp_upstream, mcp_upstream_json, mode, answer):
    upstream = mcp_upstream if answer == "sse" else mcp_upstream_json
    t = await gateway.tenancy("acme", upstream)
    async with gateway_client(t.endpoint, t.api_key, mode=mode) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        tools = await client.list_tools()
        assert {"echo", "add", "count"} <= {tool.name for tool in tools.tools}
        result = await client.call_tool("add", {"a": 20, "b": 22})
        assert isinstance(result.content[0], TextContent) and result.content[0].text == "42.0"
        echoed = await client.call_tool("echo", {"text": "ünïcode ✓"})
        assert echoed.content[0].text == "ünïcode ✓"

    # legacy: initialize, initialized, tools/list, 2 calls, GET stream, DELETE
    rows = await _request_logs(gateway, pg_url, expected=7 if mode == "legacy" else 3)
    methods = [r["method"] for r in rows]
    assert gateway.gateway.writer.stats.dropped == 0, gateway.gateway.writer.stats
    assert methods.count("tools/call") == 2
    assert "tools/list" in methods
    if mode == "legacy":
        # The handshake and the session's end went through the gateway too.
        assert "initialize" in methods and "notifications/initialized" in methods and "DELETE" in methods
    calls = [r for r in rows if r["method"] == "tools/call"]
    assert sorted(r["tool_name"] for r in calls) == ["add", "echo"]
    for row in rows:
        assert str(row["tenant_id"]) == t.tenant_id
        assert str(row["api_key_id"]) == t.api_key_id
        assert row["server_name"] == "demo"
        assert row["status_code"] < 300, row
        assert row["duration_ms"] > 0 and row["request_bytes"] >= 0


@pytest.mark.parametrize("mode", MODES)
async def test_progress_notifications_stream_through(gateway, mcp_upstream, mode):
    t = await gateway.tenancy("acme", mcp_upstream)
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with gateway_client(t.endpoint, t.api_key, mode=mode) as client:
        result = await client.call_tool("count", {"n": 5}, progress_callback=on_progress)
    assert result.content[0].text == "counted to 5"
    assert seen == [1, 2, 3, 4, 5]


async def test_modern_headers_and_version_pass_through(gateway, mcp_upstream_json):
    """A raw 2026-07-28 request: Mcp-Method/Mcp-Name reach the server, its answer comes back unchanged."""
    t = await gateway.tenancy("acme", mcp_upstream_json)
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "echo",
            "arguments": {"text": "raw"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    headers = {
        "Authorization": f"Bearer {t.api_key}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(t.endpoint, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
    assert answer["id"] == 7
    assert answer["result"]["content"][0]["text"] == "raw"


async def test_sse_is_streamed_not_buffered(gateway, mcp_upstream):
    """The first SSE event reaches the client before the upstream has finished the stream."""
    t = await gateway.tenancy("acme", mcp_upstream)
    headers = {
        "Authorization": f"Bearer {t.api_key}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(t.endpoint, json=init, headers=headers) as resp:
            assert resp.status == 200
            session_id = resp.headers["Mcp-Session-Id"]
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            await resp.read()
        headers["Mcp-Session-Id"] = session_id
        headers["MCP-Protocol-Version"] = "2025-11-25"
        async with http.post(
            t.endpoint, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
        ) as resp:
            assert resp.status == 202
        call = {
            "jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "count", "arguments": {"n": 3, "delay": 0.3}, "_meta": {"progressToken": "p"}},
        }
        async with http.post(t.endpoint, json=call, headers=headers) as resp:
            # The upstream waits between events; a buffering proxy would hand
            # over all of them, result included, in one piece.
            received = b""
            while b"notifications/progress" not in received:
                chunk = await asyncio.wait_for(resp.content.readany(), 10)
                assert chunk, "stream ended before the first progress event"
                received += chunk
            assert b"counted to 3" not in received
            received += await resp.content.read()
            assert b"counted to 3" in received
            assert received.count(b"notifications/progress") == 3
        async with http.delete(t.endpoint, headers=headers) as resp:
            assert resp.status in (200, 204)
