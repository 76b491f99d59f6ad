"""A dropped SSE answer is resumed through the gateway with `Last-Event-ID` (2025 era, SEP-1699).

Upstream: the conformance fixture (official SDK, an in-memory event store,
`retry: 100`). The gateway relays event ids, `retry` and `Last-Event-ID`
unchanged, so resumption is the upstream's own, across gateway processes too.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from harness import free_port, wait_for_port

from gateway.demo.client import gateway_client

FIXTURE = Path(__file__).parent / "conformance" / "fixture_server.py"
_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def resumable_upstream():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FIXTURE), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


async def test_the_sdk_client_resumes_a_stream_the_server_closed(gateway, resumable_upstream):
    t = await gateway.tenancy("acme", resumable_upstream)
    logs: list[str] = []

    async def on_log(params) -> None:
        logs.append(params.data)

    async with gateway_client(t.endpoint, t.api_key, mode="legacy", logging_callback=on_log) as client:
        result = await client.call_tool("test_reconnection", {})
        assert result.content[0].text == "Reconnection test completed"
    assert logs == ["Before disconnect", "After reconnect"]


async def _events(response: aiohttp.ClientResponse, count: int) -> list[tuple[str | None, dict]]:
    """`count` SSE events with data: (id, message)."""
    found: list[tuple[str | None, dict]] = []
    event_id, data = None, []
    async with asyncio.timeout(10):
        while len(found) < count:
            line = (await response.content.readline()).rstrip(b"\r\n")
            if line.startswith(b"id:"):
                event_id = line[3:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif not line:
                if data and data != [b""]:
                    found.append((event_id, orjson.loads(b"\n".join(data))))
                event_id, data = None, []
    return found


async def test_a_client_that_dropped_the_stream_resumes_on_another_process(pg_url, make_gateway, resumable_upstream):
    a = await make_gateway(pg_url)
    b = await make_gateway(pg_url)
    t = await a.tenancy("acme", resumable_upstream)
    await asyncio.sleep(0.5)  # b's snapshot has the key (polling)
    auth = {"Authorization": f"Bearer {t.api_key}"}
    async with aiohttp.ClientSession() as http:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "r", "version": "1"}}}
        async with http.post(f"{a.url}/servers/demo/mcp", json=init, headers={**_HEADERS, **auth}) as r:
            session = r.headers["Mcp-Session-Id"]
            await r.read()
        common = {**_HEADERS, **auth, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        await http.post(f"{a.url}/servers/demo/mcp", headers=common,
                        json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p"}}}
        # Read the first progress event through process a, then drop the connection.
        response = await http.post(f"{a.url}/servers/demo/mcp", json=call, headers=common)
        (first_id, first), = await _events(response, 1)
        assert first["method"] == "notifications/progress" and first["params"]["progress"] == 0
        assert first_id
        response.close()
        # Resume through process b: the rest of the stream, nothing twice.
        async with http.get(f"{b.url}/servers/demo/mcp", headers={**common, "Last-Event-ID": first_id}) as resumed:
            assert resumed.status == 200
            rest = await _events(resumed, 3)
    messages = [message for _, message in rest]
    assert [(m["params"]["progress"], m["params"]["progressToken"]) for m in messages[:2]] == [(50, "p"), (100, "p")]
    assert messages[2]["id"] == 2 and not messages[2]["result"].get("isError")
