"""The 2024-11-05 HTTP+SSE and the WebSocket transports, bridged to the upstream's Streamable HTTP endpoint.

Real peers on both sides: the official SDK's `sse_client` (and the SDK's
`Client` over a WebSocket transport, below) against a real gateway in front of
the SDK demo server, which speaks only Streamable HTTP. Each test checks what
the client sees and what the gateway did upstream and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import anyio
import asyncpg
import mcp_types
import orjson
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.shared.message import SessionMessage

from gateway.dataplane import bridge, jsonrpc, sse

ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def _call(i: int, tool: str, **arguments) -> dict:
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


# -- clients -----------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def websocket_client(url: str, api_key: str):
    """The MCP SDK's WebSocket client transport (mcp 1.x `mcp.client.websocket`: subprotocol "mcp",
    one JSON-RPC message per text frame), on aiohttp and with a bearer header. mcp 2.x dropped it."""
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=("mcp",), headers={"Authorization": f"Bearer {api_key}"}) as ws:

            async def reader() -> None:
                async with read_writer:
                    async for frame in ws:
                        if frame.type == aiohttp.WSMsgType.TEXT:
                            message = mcp_types.jsonrpc_message_adapter.validate_json(frame.data, by_name=False)
                            await read_writer.send(SessionMessage(message))

            async def writer() -> None:
                async with write_reader:
                    async for item in write_reader:
                        await ws.send_str(json.dumps(item.message.model_dump(by_alias=True, mode="json",
                                                                             exclude_unset=True)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                tg.start_soon(writer)
                yield read_stream, write_stream
                tg.cancel_scope.cancel()


def sdk_client(gw, t, transport: str, *, mode: str = "legacy", **options) -> Client:
    base = f"{gw.url}/servers/{t.server_name}"
    if transport == "sse":
        streams = sse_client(f"{base}/sse", headers={"Authorization": f"Bearer {t.api_key}"})
    else:
        streams = websocket_client(f"{base.replace('http://', 'ws://')}/ws", t.api_key)
    return Client(streams, mode=mode, **options)


class RawSse:
    """A 2024-11-05 client speaking raw HTTP: the stream, its endpoint, POSTs."""

    def __init__(self, http: aiohttp.ClientSession, gw, key: str, name: str = "demo") -> None:
        self.http, self.gw, self.key, self.name = http, gw, key, name
        self.endpoint: str | None = None
        self._stream: aiohttp.ClientResponse | None = None

    async def open(self) -> None:
        self._stream = await self.http.get(
            f"{self.gw.url}/servers/{self.name}/sse", headers={"Authorization": f"Bearer {self.key}"}
        )
        assert self._stream.status == 200, await self._stream.text()
        assert self._stream.headers["Content-Type"].startswith("text/event-stream")
        event, data = await self.event()
        assert event == "endpoint"
        self.endpoint = self.gw.url + data

    async def event(self, timeout: float = 10.0) -> tuple[str, str]:
        event, data = "message", []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self._stream.content.readline()).decode().rstrip("\r\n")
                if not line:
                    if data:
                        return event, "\n".join(data)
                    if self._stream.content.at_eof():
                        raise EOFError("the stream ended")
                    continue
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)

    async def message(self) -> dict:
        event, data = await self.event()
        assert event == "message"
        return orjson.loads(data)

    async def answer(self, request_id) -> dict:
        """The response to `request_id`, skipping notifications on the way."""
        while True:
            message = await self.message()
            if message.get("id") == request_id and "method" not in message:
                return message

    async def post(self, message, key: str | None = None, endpoint: str | None = None) -> aiohttp.ClientResponse:
        data = message if isinstance(message, bytes) else orjson.dumps(message)
        async with self.http.post(
            endpoint or self.endpoint, data=data,
            headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"},
        ) as resp:
            await resp.read()
            return resp

    async def handshake(self) -> dict:
        assert (await self.post(INIT)).status == 202
        init = await self.answer(1)
        assert (await self.post(INITIALIZED)).status == 202
        return init

    def close(self) -> None:
        self._stream.close()


# -- helpers ----------------------------------------------------------------------------------------
async def _request_logs(gw, pg_url: str, expected: int, where: str = "true") -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(100):
            await gw.gateway.writer.flush()
            rows = await conn.fetch(f"SELECT * FROM request_logs WHERE {where} ORDER BY created_at")
            if len(rows) >= expected:
                return rows
            await asyncio.sleep(0.05)
        return rows
    finally:
        await conn.close()


async def _upstream_status(upstream_url: str, session: bytes) -> int:
    """What the upstream says to a request in `session` (404 once the session has ended)."""
    headers = {"Mcp-Session-Id": session.decode(), "MCP-Protocol-Version": "2025-11-25", "Accept": ACCEPT}
    async with aiohttp.ClientSession() as http:
        async with http.post(upstream_url, json={"jsonrpc": "2.0", "id": 9, "method": "ping"}, headers=headers) as r:
            await r.read()
            return r.status


async def _settled(baseline: int) -> int:
    """The number of tasks once the loop's tasks are back to `baseline` (or after 5 s)."""
    for _ in range(100):
        count = len(asyncio.all_tasks())
        if count <= baseline:
            return count
        await asyncio.sleep(0.05)
    return len(asyncio.all_tasks())


def _transports(gw) -> bridge.Transports:
    return gw.gateway.dataplane.transports


async def _only_bridge(gw) -> bridge.Bridge:
    for _ in range(100):
        bridges = _transports(gw).bridges
        if len(bridges) == 1:
            found = next(iter(bridges))
            if found.upstream_session is not None:
                return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected one initialized bridge, found {len(_transports(gw).bridges)}")


# -- the SDK through both transports ------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["sse", "ws"])
@pytest.mark.parametrize("answer", ["sse", "json"])
async def test_sdk_client_through_bridge(gateway, pg_url, mcp_upstream, mcp_upstream_json, transport, answer):
    t = await gateway.tenancy("acme", mcp_upstream if answer == "sse" else mcp_upstream_json)
    async with sdk_client(gateway, t, transport) as client:
        assert client.protocol_version == "2025-11-25"
        tools = await client.list_tools()
        assert {"echo", "add", "count"} <= {tool.name for tool in tools.tools}
        result = await client.call_tool("add", {"a": 20, "b": 22})
        assert result.content[0].text == "42.0"
        echoed = await client.call_tool("echo", {"text": "ünïcode ✓ \n line"})
        assert echoed.content[0].text == "ünïcode ✓ \n line"
    assert await _settled_bridges(gateway)

    # initialize, initialized, tools/list, 2 calls, and the connection itself
    rows = await _request_logs(gateway, pg_url, expected=6)
    methods = [r["method"] for r in rows]
    assert gateway.gateway.writer.stats.dropped == 0
    assert {"initialize", "notifications/initialized", "tools/list", "GET"} <= set(methods), methods
    assert sorted(r["tool_name"] for r in rows if r["method"] == "tools/call") == ["add", "echo"]
    for row in rows:
        assert str(row["tenant_id"]) == t.tenant_id
        assert str(row["api_key_id"]) == t.api_key_id
        assert row["server_name"] == "demo"
        assert row["status_code"] < 300, dict(row)
    connection = next(r for r in rows if r["method"] == "GET")
    assert connection["status_code"] == (200 if transport == "sse" else 101)
    assert next(r for r in rows if r["method"] == "notifications/initialized")["status_code"] == 202
    assert all(r["response_bytes"] > 0 for r in rows if r["method"] in ("initialize", "tools/call"))


async def _settled_bridges(gw) -> bool:
    for _ in range(100):
        transports = _transports(gw)
        if not transports.bridges and not transports.sessions and not transports._tasks:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_progress_notifications_flow_live(gateway, mcp_upstream, transport):
    t = await gateway.tenancy("acme", mcp_upstream)
    seen: list[tuple[float, float]] = []
    loop = asyncio.get_running_loop()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, loop.time()))

    async with sdk_client(gateway, t, transport) as client:
        started = loop.time()
        result = await client.call_tool("count", {"n": 4, "delay": 0.2}, progress_callback=on_progress)
        finished = loop.time()
    assert result.content[0].text == "counted to 4"
    assert [p for p, _ in seen] == [1, 2, 3, 4]
    # Relayed as they came, not all at once with the result.
    assert seen[0][1] - started < finished - started - 0.4


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_auto_mode_client_falls_back_to_the_handshake(gateway, mcp_upstream, transport):
    """A `mode="auto"` SDK client probes with 2026-07-28 `server/discover`; the bridge names the handshake versions."""
    t = await gateway.tenancy("acme", mcp_upstream)
    async with sdk_client(gateway, t, transport, mode="auto") as client:
        assert client.protocol_version == "2025-11-25"
        assert (await client.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3.0"


async def test_raw_websocket(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    url = f"{gateway.url.replace('http://', 'ws://')}/servers/demo/ws"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            assert ws.protocol == "mcp"

            async def answer(request_id):
                while True:
                    message = await asyncio.wait_for(ws.receive_json(), 10)
                    if message.get("id") == request_id and "method" not in message:
                        return message

            await ws.send_str(json.dumps(INIT))
            init = await answer(1)
            assert init["result"]["protocolVersion"] == "2024-11-05"  # the client's choice, negotiated upstream
            await ws.send_str(json.dumps(INITIALIZED))
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": "list", "method": "tools/list"}))
            assert "tools" in (await answer("list"))["result"]
            await ws.send_str(json.dumps(_call(3, "word_count", text="one two three")))
            assert (await answer(3))["result"]["content"][0]["text"] == "3"
            # A frame that is not JSON: the JSON-RPC parse error, id null; the connection stays.
            await ws.send_str("{not json")
            assert (await answer(None))["error"]["code"] == jsonrpc.PARSE_ERROR
            await ws.send_str(json.dumps(INIT | {"id": 4}))
            assert (await answer(4))["error"]["code"] == jsonrpc.INVALID_REQUEST  # one initialize per connection
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 5, "method": "ping"}))
            assert (await answer(5))["result"] == {}
    assert await _settled_bridges(gateway)


# -- server-initiated messages ------------------------------------------------------------------------
PEER = """
import asyncio, sys, warnings
from mcp.server.mcpserver import Context, MCPServer

warnings.simplefilter("ignore")  # roots are deprecated in 2026-07-28; this is a 2025-era peer
server = MCPServer("bridge-peer")
background = set()

@server.tool(description="Ask the client for its roots: a server-to-client request inside a call.")
async def roots(ctx: Context) -> str:
    result = await ctx.session.list_roots()
    return ",".join(str(root.uri) for root in result.roots)

@server.tool(description="The HTTP headers this call arrived with, as JSON.")
def seen_headers(ctx: Context) -> str:
    import json
    return json.dumps({name.lower(): value for name, value in (ctx.headers or {}).items()})

@server.tool(description="Announce a tools/list change a moment after answering, outside any request.")
async def announce_later(ctx: Context) -> str:
    session = ctx.session
    async def later():
        await asyncio.sleep(0.3)
        await session.send_tool_list_changed()
    task = asyncio.get_running_loop().create_task(later())
    background.add(task)
    task.add_done_callback(background.discard)
    return "scheduled"

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(server.streamable_http_app(host="127.0.0.1"), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning")
"""


@pytest.fixture(scope="module")
def peer_upstream(tmp_path_factory) -> str:
    """An SDK server that sends requests and notifications of its own (the demo server does not)."""
    import subprocess
    import sys

    from harness import free_port, wait_for_port

    script = tmp_path_factory.mktemp("peer") / "peer.py"
    script.write_text(PEER)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_server_requests_and_get_stream_notifications(gateway, pg_url, peer_upstream, transport):
    """A request from the server inside a call (answered by the client through the bridge), and a
    notification the server sends outside any request (relayed from the upstream's GET stream)."""
    t = await gateway.tenancy("acme", peer_upstream)
    changed = asyncio.Event()

    async def list_roots(context) -> mcp_types.ListRootsResult:
        return mcp_types.ListRootsResult(roots=[mcp_types.Root(uri="file:///work/a")])

    async def on_message(message) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            changed.set()

    async with sdk_client(gateway, t, transport, list_roots_callback=list_roots, message_handler=on_message) as client:
        assert (await client.call_tool("roots", {})).content[0].text == "file:///work/a"
        seen = json.loads((await client.call_tool("seen_headers", {})).content[0].text)
        # The gateway speaks as itself: the client's key never reaches the upstream.
        assert "authorization" not in seen and t.api_key not in json.dumps(seen)
        assert seen["mcp-protocol-version"] == "2025-11-25" and seen["mcp-session-id"]
        assert (await client.call_tool("announce_later", {})).content[0].text == "scheduled"
        await asyncio.wait_for(changed.wait(), 10)
    assert await _settled_bridges(gateway)
    rows = await _request_logs(gateway, pg_url, expected=1, where="method = 'GET'")
    assert rows[0]["response_bytes"] > 0  # what the GET stream relayed is counted on the connection's row
    responses = await _request_logs(gateway, pg_url, expected=1, where="method IS NULL")
    assert responses[0]["status_code"] == 202  # the client's answer to roots/list, forwarded upstream


async def test_get_stream_idling_out_is_reopened(pg_url, make_gateway, peer_upstream):
    """The upstream's GET stream ends after `stream_idle_timeout` of quiet; the bridge opens it again."""
    gw = await make_gateway(pg_url, dataplane={"stream_idle_timeout": 0.3})
    t = await gw.tenancy("acme", peer_upstream)
    changed = asyncio.Event()

    async def on_message(message) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            changed.set()

    async with sdk_client(gw, t, "ws", message_handler=on_message) as client:
        await asyncio.sleep(1.2)  # several idle timeouts and reconnections
        assert (await client.call_tool("announce_later", {})).content[0].text == "scheduled"
        await asyncio.wait_for(changed.wait(), 10)
    assert await _settled_bridges(gw)


async def test_a_stalled_call_is_abandoned_with_an_error(pg_url, make_gateway, mcp_upstream):
    """A call's stream that stays quiet for upstream_timeout ends, and the client hears why (504, -32036)."""
    gw = await make_gateway(pg_url, dataplane={"upstream_timeout": 0.5})
    t = await gw.tenancy("acme", mcp_upstream)
    url = f"{gw.url.replace('http://', 'ws://')}/servers/demo/ws"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            await ws.send_str(json.dumps(INIT))
            assert (await asyncio.wait_for(ws.receive_json(), 10))["id"] == 1
            await ws.send_str(json.dumps(INITIALIZED))
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "count", "arguments": {"n": 2, "delay": 1.5}, "_meta": {"progressToken": 1}}}
            await ws.send_str(json.dumps(call))
            while True:
                message = await asyncio.wait_for(ws.receive_json(), 10)
                if message.get("id") == 2:
                    break
            assert message["error"]["code"] == jsonrpc.UPSTREAM_TIMEOUT
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "ping"}))
            assert (await asyncio.wait_for(ws.receive_json(), 10)) == {"jsonrpc": "2.0", "id": 3, "result": {}}


# -- refusals ---------------------------------------------------------------------------------------
async def test_refusals(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, dataplane={"max_body_bytes": 4096})
    t = await gw.tenancy("acme", mcp_upstream)
    _, user = await gw.admin("POST", "/users", {"tenant_id": t.tenant_id, "username": "mallory",
                                                "email": "m@acme.test", "role": "USER"})
    _, other = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": "m", "scopes": ["proxy"]})
    ws_url = f"{gw.url.replace('http://', 'ws://')}/servers/demo/ws"
    async with aiohttp.ClientSession() as http:
        # No key: 401 with a challenge, on the stream and on the upgrade.
        async with http.get(f"{gw.url}/servers/demo/sse") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"]["code"] == jsonrpc.UNAUTHENTICATED
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url, protocols=("mcp",))
        assert refused.value.status == 401
        async with http.get(f"{gw.url}/servers/nope/sse", headers={"Authorization": f"Bearer {t.api_key}"}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == jsonrpc.UNKNOWN_SERVER
        # Not an upgrade.
        async with http.get(ws_url.replace("ws://", "http://"), headers={"Authorization": f"Bearer {t.api_key}"}) as r:
            assert r.status == 426
        async with http.get(f"{gw.url}/servers/demo/messages") as resp:
            assert resp.status == 405

        client = RawSse(http, gw, t.api_key)
        await client.open()
        await client.handshake()
        # Another key, the right session id: 404, the same answer as an unknown session.
        resp = await client.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, key=other["key"])
        assert resp.status == 404
        unknown = client.endpoint.split("session_id=")[0] + "session_id=" + "A" * 32
        assert (await client.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, endpoint=unknown)).status == 404
        assert (await client.post(INITIALIZED, endpoint=f"{gw.url}/servers/demo/messages")).status == 404
        # The owner's session is untouched.
        assert (await client.post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})).status == 202
        assert "tools" in (await client.answer(3))["result"]
        # Too large: 413 before anything is parsed.
        big = _call(4, "echo", text="x" * 5000)
        assert (await client.post(big)).status == 413
        # Not JSON: 400 (nothing to address an answer to).
        assert (await client.post(b"{nope")).status == 400
        # A request the bridge refuses is answered on the stream (202 for the POST).
        modern = {"jsonrpc": "2.0", "id": 6, "method": "tools/list",
                  "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}
        assert (await client.post(modern)).status == 202
        error = (await client.answer(6))["error"]
        assert error["code"] == -32022 and "2025-11-25" in error["data"]["supported"]
        client.close()

        # A WebSocket frame over the limit ends the connection with 1009.
        async with http.ws_connect(ws_url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            await ws.send_str(json.dumps(big))
            frame = await asyncio.wait_for(ws.receive(), 10)
            assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    # The WebSocket's row is written once its close handshake is over: wait for both 413s.
    rows = await _request_logs(gw, pg_url, expected=2, where="status_code = 413")
    rows = await _request_logs(gw, pg_url, expected=1, where="status_code >= 400")
    statuses = {r["status_code"] for r in rows}
    assert {401, 404, 413, 400, 426} <= statuses, statuses
    codes = {r["error_code"] for r in rows}
    assert {jsonrpc.UNAUTHENTICATED, jsonrpc.SESSION_NOT_FOUND, jsonrpc.PAYLOAD_TOO_LARGE, -32022} <= codes
    assert sum(1 for r in rows if r["status_code"] == 413) == 2  # the POST and the frame


async def test_quota_per_message(gateway, mcp_upstream):
    """Each bridged message spends the key's quota, like a POST to /mcp; refusals say so on the channel."""
    t = await gateway.tenancy("acme", mcp_upstream, rate_limit_per_hour=4)
    async with aiohttp.ClientSession() as http:
        client = RawSse(http, gateway, t.api_key)
        await client.open()  # 1
        await client.handshake()  # 2, 3
        assert (await client.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).status == 202  # 4
        assert "tools" in (await client.answer(2))["result"]
        assert (await client.post(_call(3, "add", a=1, b=2))).status == 202
        error = (await client.answer(3))["error"]
        assert error["code"] == jsonrpc.RATE_LIMITED and error["data"]["window"] == "hour"
        # A notification has no id to answer: the POST carries the refusal.
        async with http.post(client.endpoint, json={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                    "params": {"requestId": 3}},
                             headers={"Authorization": f"Bearer {t.api_key}"}) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
        client.close()


async def test_revoked_key_ends_websocket(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    url = f"{gateway.url.replace('http://', 'ws://')}/servers/demo/ws"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            await ws.send_str(json.dumps(INIT))
            assert (await asyncio.wait_for(ws.receive_json(), 10))["id"] == 1
            status, _ = await gateway.admin("DELETE", f"/api-keys/{t.api_key_id}")
            assert status == 200
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
            frame = await asyncio.wait_for(ws.receive(), 10)
            assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert await _settled_bridges(gateway)


async def test_keepalive_ticks_and_a_revoked_key_ends_the_sse_stream(gateway, mcp_upstream, monkeypatch):
    """Between messages the stream sends keep-alive comments, and checks the key at each one."""
    monkeypatch.setattr(bridge, "_KEEPALIVE_SECONDS", 0.1)
    t = await gateway.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        client = RawSse(http, gateway, t.api_key)
        await client.open()
        await client.handshake()
        upstream_session = (await _only_bridge(gateway)).upstream_session
        await asyncio.sleep(0.5)  # a few ticks: comments, ignored by the client
        assert (await client.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).status == 202
        assert "tools" in (await client.answer(2))["result"]
        status, _ = await gateway.admin("DELETE", f"/api-keys/{t.api_key_id}")
        assert status == 200
        with pytest.raises(EOFError):
            await client.event(timeout=5)  # nothing more: the stream ends at the next tick
        client.close()
    assert await _settled_bridges(gateway)
    assert await _upstream_status(mcp_upstream, upstream_session) == 404


# -- teardown -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_disconnect_ends_the_upstream_session(gateway, mcp_upstream, transport):
    t = await gateway.tenancy("acme", mcp_upstream)
    baseline = len(asyncio.all_tasks())
    async with sdk_client(gateway, t, transport) as client:
        await client.call_tool("add", {"a": 1, "b": 1})
        connected = await _only_bridge(gateway)
        upstream_session = connected.upstream_session
        assert await _upstream_status(mcp_upstream, upstream_session) == 200  # alive while connected
    # The client left: the gateway sent DELETE upstream and cancelled everything it started.
    assert await _settled_bridges(gateway)
    assert connected.reason == "client closed the connection"
    assert await _upstream_status(mcp_upstream, upstream_session) == 404
    assert await _settled(baseline) <= baseline, [t.get_coro() for t in asyncio.all_tasks()]


async def test_closing_all_bridges_ends_both_transports(gateway, mcp_upstream):
    """`Transports.close()` (for shutdown) ends every bridged connection and its upstream session."""
    t = await gateway.tenancy("acme", mcp_upstream)
    url = f"{gateway.url.replace('http://', 'ws://')}/servers/demo/ws"
    async with aiohttp.ClientSession() as http:
        sse = RawSse(http, gateway, t.api_key)
        await sse.open()
        await sse.handshake()
        async with http.ws_connect(url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            await ws.send_str(json.dumps(INIT))
            assert (await asyncio.wait_for(ws.receive_json(), 10))["id"] == 1
            await ws.send_str(json.dumps(INITIALIZED))
            for _ in range(100):
                bridges = _transports(gateway).bridges
                if len(bridges) == 2 and all(b.upstream_session for b in bridges):
                    break
                await asyncio.sleep(0.05)
            sessions = [b.upstream_session for b in bridges]
            closing = asyncio.create_task(_transports(gateway).close())
            frame = await asyncio.wait_for(ws.receive(), 10)
            assert frame.type == aiohttp.WSMsgType.CLOSE and frame.data == aiohttp.WSCloseCode.GOING_AWAY
        with pytest.raises(EOFError):
            await sse.event(timeout=5)
        sse.close()
        await asyncio.wait_for(closing, 10)
    assert await _settled_bridges(gateway)
    assert [await _upstream_status(mcp_upstream, s) for s in sessions] == [404, 404]


async def test_client_leaving_mid_call_cancels_the_exchange(gateway, pg_url, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    baseline = len(asyncio.all_tasks())
    async with aiohttp.ClientSession() as http:
        client = RawSse(http, gateway, t.api_key)
        await client.open()
        await client.handshake()
        upstream_session = (await _only_bridge(gateway)).upstream_session
        call = _call(2, "count", n=50, delay=0.2) | {"params": {"name": "count", "arguments": {"n": 50, "delay": 0.2},
                                                                 "_meta": {"progressToken": "p"}}}
        assert (await client.post(call)).status == 202
        assert (await client.message())["method"] == "notifications/progress"
        client.close()
    assert await _settled_bridges(gateway)
    assert await _upstream_status(mcp_upstream, upstream_session) == 404
    assert await _settled(baseline) <= baseline
    rows = await _request_logs(gateway, pg_url, expected=1, where="method = 'tools/call'")
    assert rows[0]["status_code"] in (200, 499) and rows[0]["error"], dict(rows[0])


async def test_a_client_that_does_not_read_is_dropped(gateway, mcp_upstream, monkeypatch):
    """Answers pile up for a client that stops reading: bounded, then the connection is cut."""
    monkeypatch.setattr(bridge, "_OUTBOX_BYTES", 64 * 1024)
    monkeypatch.setattr(bridge, "_STALL_SECONDS", 0.5)
    t = await gateway.tenancy("acme", mcp_upstream, rate_limit_per_hour=100_000)
    url = f"{gateway.url.replace('http://', 'ws://')}/servers/demo/ws"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=("mcp",), headers={"Authorization": f"Bearer {t.api_key}"}) as ws:
            await ws.send_str(json.dumps(INIT))
            assert (await asyncio.wait_for(ws.receive_json(), 10))["id"] == 1
            await ws.send_str(json.dumps(INITIALIZED))
            dropped = await _only_bridge(gateway)
            upstream_session = dropped.upstream_session
            text = "y" * (256 * 1024)
            for i in range(40):  # about 20 MB of answers, far beyond socket buffers; never read
                await ws.send_str(json.dumps(_call(10 + i, "echo", text=text)))
            assert await _settled_bridges(gateway)
            # The connection is gone: draining what arrived ends in a close, never in 40 answers.
            answers = 0
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(10):
                    async for frame in ws:
                        if frame.type == aiohttp.WSMsgType.TEXT:
                            answers += 1
            assert ws.closed and answers < 40
    assert dropped.reason == "the client stopped reading"
    assert await _upstream_status(mcp_upstream, upstream_session) == 404


# -- pieces ------------------------------------------------------------------------------------------
def test_event_parser_handles_split_lines_and_crlf():
    parser = sse.EventParser(1024)
    stream = b"event: message\r\nid: 7\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n: comment\n\ndata: [2]\r\r"
    events = []
    for i in range(len(stream)):  # one byte at a time: every split point
        events += parser.feed(stream[i : i + 1])
    assert events == [(b"message", b'{"a":\n1}'), (b"", b"[2]")]
    assert parser.last_id == b"7"
    with pytest.raises(bridge.UpstreamError):
        sse.EventParser(16).feed(b"data: " + b"x" * 64)


def test_sse_frame_keeps_multiline_json_one_event():
    frame = sse.sse_frame(b'{\n"a": 1\r\n}')
    assert frame == b'event: message\ndata: {\ndata: "a": 1\ndata: }\n\n'
