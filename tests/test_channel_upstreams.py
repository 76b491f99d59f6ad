"""SSE (2024-11-05) and WebSocket upstreams: the clients alone, then behind a gateway.

The peers are real: the demo server on the official SDK served with `sse_app()`
(uvicorn), and the same SDK server behind a WebSocket (channel_servers/ws_server.py).
Hand-written peers (channel_servers/scripted.py) cover what the SDK never sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from channel_servers.scripted import TOOL, Script, serve, sse_app, ws_app
from harness import free_port, wait_for_port

from gateway.dataplane.channels import SseUpstream, WebSocketUpstream
from gateway.dataplane.mcp_client import HANDSHAKE, RELAYED_CLIENT_CAPABILITIES, UpstreamRpcError
from gateway.dataplane.upstream import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.demo.client import gateway_client

WS_SERVER = Path(__file__).parent / "channel_servers" / "ws_server.py"
MODES = ["legacy", "2026-07-28"]


class Upstream:
    """A real MCP server in a subprocess on a fixed port, which a test may kill and start again."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        if transport == "sse":
            self.argv = [sys.executable, "-m", "gateway.demo.upstream", "--transport", "sse"]
            self.url = f"http://127.0.0.1:{self.port}/sse"
            self.client_type = SseUpstream
        else:
            self.argv = [sys.executable, str(WS_SERVER)]
            self.url = f"ws://127.0.0.1:{self.port}/ws"
            self.client_type = WebSocketUpstream

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*self.argv, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, **options):
        options.setdefault("timeout", 30.0)
        return self.client_type(self.url, **options)


def _started(transport: str):
    upstream = Upstream(transport)
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def sse_server():
    yield from _started("sse")


@pytest.fixture(scope="session")
def ws_server():
    yield from _started("websocket")


@pytest.fixture(params=["sse", "websocket"])
def server(request, sse_server, ws_server) -> Upstream:
    """Each test runs against the SDK's SSE server and the SDK server behind a WebSocket."""
    return sse_server if request.param == "sse" else ws_server


@pytest.fixture(params=["sse", "websocket"])
def own_server(request):
    """A server of this test's own, to kill and restart."""
    yield from _started(request.param)


def _text(result: dict) -> str:
    return result["content"][0]["text"]


def _sockets_to(port: int) -> int:
    """How many TCP sockets of this process are connected to `port` (its fds matched in /proc/net)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


def _other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


# -- the clients against the SDK's servers ----------------------------------------------------------
async def test_handshake_list_and_call(server):
    upstream = server.client()
    try:
        capabilities = await upstream.ensure_ready()
        assert "tools" in capabilities
        assert upstream.protocol_version == HANDSHAKE
        assert upstream.server_info["name"] == "gateway-demo"
        assert upstream.instructions == "Demo tools behind the MCP gateway."
        names = {tool["name"] for tool in (await upstream.request("tools/list"))["tools"]}
        assert {"echo", "add", "word_count", "count"} <= names
        assert _text(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "héllo\nworld"}})) \
            == "héllo\nworld"
        resource = await upstream.request("resources/read", {"uri": "demo://readme"})
        assert resource["contents"][0]["text"].startswith("A demo MCP server")
    finally:
        await upstream.close()


async def test_concurrent_calls_are_matched_to_their_answers(server):
    upstream = server.client()
    try:
        # Call i counts 20-i steps: the last ones sent are answered first.
        counts = [upstream.request("tools/call", {"name": "count", "arguments": {"n": 20 - i, "delay": 0.01}})
                  for i in range(20)]
        adds = [upstream.request("tools/call", {"name": "add", "arguments": {"a": i, "b": 1000}}) for i in range(20)]
        results = await asyncio.gather(*counts, *adds)
        assert [_text(r) for r in results[:20]] == [f"counted to {20 - i}" for i in range(20)]
        assert [_text(r) for r in results[20:]] == [f"{1000 + i}.0" for i in range(20)]
        assert upstream.reconnects == 0  # all of it over one connection
    finally:
        await upstream.close()


async def test_progress_notifications_arrive_and_their_contents_are_not_logged(server, caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.channels")
    upstream = server.client()
    try:
        result = await upstream.request(
            "tools/call", {"name": "count", "arguments": {"n": 3}, "_meta": {"progressToken": "p-1"}}
        )
        assert _text(result) == "counted to 3"
    finally:
        await upstream.close()
    progress = [r for r in caplog.records if "notifications/progress" in r.getMessage()]
    assert len(progress) == 3  # each step came over the channel as a notification
    assert not any("step 1 of 3" in r.getMessage() or "p-1" in r.getMessage() for r in caplog.records)


async def test_upstream_errors_pass_through(server):
    upstream = server.client()
    try:
        with pytest.raises(UpstreamRpcError) as refused:
            await upstream.request("no/such/method", {})
        assert refused.value.error["code"] == -32601
        # The SDK (2.3) answers an unknown tool with a tool error, not a JSON-RPC error: passed on as it is.
        result = await upstream.request("tools/call", {"name": "nope", "arguments": {}})
        assert result["isError"] is True and _text(result) == "Unknown tool: nope"
        assert _text(await upstream.request("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}})) == "3.0"
    finally:
        await upstream.close()


async def test_killed_upstream_fails_the_call_and_a_restarted_one_is_reconnected(own_server):
    upstream = own_server.client()
    try:
        assert _text(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "up"}})) == "up"
        call = asyncio.ensure_future(
            upstream.request("tools/call", {"name": "count", "arguments": {"n": 400, "delay": 0.05}})
        )
        await asyncio.sleep(0.5)
        assert not call.done()
        own_server.kill()
        with pytest.raises(UpstreamError) as failed:
            await asyncio.wait_for(call, 10)
        assert not isinstance(failed.value, UpstreamTimeout), "the break must be noticed, not waited out"
        assert not upstream.connected
        with pytest.raises(UpstreamConnectError):  # nothing listens now
            await upstream.request("tools/list")
        await asyncio.to_thread(own_server.start)  # the same port
        assert _text(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "again"}})) \
            == "again"
        assert upstream.reconnects >= 1 and upstream.connected
    finally:
        await upstream.close()


async def test_close_is_idempotent_and_leaves_no_task_or_connection(server):
    upstream = server.client()
    await upstream.request("tools/list")
    await asyncio.gather(*(upstream.request("tools/call", {"name": "echo", "arguments": {"text": str(i)}})
                           for i in range(5)))
    pending = asyncio.ensure_future(
        upstream.request("tools/call", {"name": "count", "arguments": {"n": 100, "delay": 0.05}})
    )
    await asyncio.sleep(0.2)
    assert _sockets_to(server.port) >= 1
    await asyncio.gather(upstream.close(), upstream.close())
    await upstream.close()
    with pytest.raises(UpstreamError, match="closed"):
        await pending
    with pytest.raises(UpstreamError, match="closed"):
        await upstream.request("tools/list")
    assert _other_tasks() == set()
    for _ in range(100):  # a closed transport lets go of its socket on the loop's next turns
        if _sockets_to(server.port) == 0:
            break
        await asyncio.sleep(0.01)
    assert _sockets_to(server.port) == 0


async def test_close_while_connecting(server):
    upstream = server.client()
    ready = asyncio.ensure_future(upstream.ensure_ready())
    await asyncio.sleep(0)
    await upstream.close()
    with pytest.raises(UpstreamError, match="closed"):
        await ready
    assert _other_tasks() == set()


# -- the clients against hand-written peers -------------------------------------------------------------
@pytest.fixture(params=["sse", "websocket"])
async def scripted(request):
    """(script, client) for a hand-written peer of either transport."""
    script = Script(big=8192)
    app = sse_app(script, "messages?session=s1") if request.param == "sse" else ws_app(script)
    async with serve(app) as port:
        if request.param == "sse":
            client = SseUpstream(f"http://127.0.0.1:{port}/sse", timeout=5.0, max_event=4096)
        else:
            client = WebSocketUpstream(f"ws://127.0.0.1:{port}/ws", timeout=5.0, max_message=4096)
        try:
            yield script, client
        finally:
            await client.close()


async def test_awkward_framing_and_server_requests(scripted, caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.channels")
    script, upstream = scripted
    assert (await upstream.request("tools/list"))["tools"] == [TOOL]
    assert upstream.server_info == {"name": "scripted", "version": "1"}
    # The handshake, as a 2025-era client does it, announcing what the gateway relays
    # (test_relay_channels.py), and nothing of a client's credentials.
    initialize = script.received[0]
    assert initialize["method"] == "initialize"
    assert initialize["params"] == {"protocolVersion": HANDSHAKE, "capabilities": RELAYED_CLIENT_CAPABILITIES,
                                    "clientInfo": {"name": "mcp-gateway", "version": "0.1.0"}}
    assert script.received[1] == {"jsonrpc": "2.0", "method": "notifications/initialized"}
    # The server's ping is answered; its other request is refused, not left hanging.
    assert await script.wait_for(lambda m: m.get("id") == "srv-ping") == {"jsonrpc": "2.0", "id": "srv-ping",
                                                                          "result": {}}
    refusal = await script.wait_for(lambda m: m.get("id") == 7)
    assert refusal["error"]["code"] == -32601 and "sampling/createMessage" in refusal["error"]["message"]
    assert not any("private-log-text" in r.getMessage() for r in caplog.records)
    # Answers keep coming after all that.
    assert _text(await upstream.request("tools/call", {"name": "x", "arguments": {}})) == "called x"


async def test_timeout_and_caller_cancellation_tell_the_server(scripted):
    script, upstream = scripted
    upstream.timeout = 0.3
    with pytest.raises(UpstreamTimeout):
        await upstream.request("tools/call", {"name": "hang", "arguments": {}})
    hung = await script.wait_for(lambda m: m.get("params", {}).get("name") == "hang")
    cancelled = await script.wait_for(lambda m: m.get("method") == "notifications/cancelled")
    assert cancelled["params"] == {"requestId": hung["id"], "reason": "timeout"}

    upstream.timeout = 5.0
    call = asyncio.ensure_future(upstream.request("tools/call", {"name": "hang", "arguments": {"n": 2}}))
    second = await script.wait_for(lambda m: m.get("params", {}).get("arguments") == {"n": 2})
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    gone = await script.wait_for(lambda m: m.get("method") == "notifications/cancelled"
                                 and m["params"]["requestId"] == second["id"])
    assert gone["params"]["reason"] == "the client went away"
    assert upstream.connected  # a cancelled call does not cost the connection


async def test_an_oversized_message_breaks_the_connection_and_the_next_call_reconnects(scripted):
    script, upstream = scripted
    await upstream.ensure_ready()
    with pytest.raises(UpstreamError) as failed:
        await upstream.request("tools/call", {"name": "big", "arguments": {}})
    assert not isinstance(failed.value, UpstreamTimeout)
    assert _text(await upstream.request("tools/call", {"name": "after", "arguments": {}})) == "called after"
    assert upstream.reconnects == 1
    assert sum(m.get("method") == "initialize" for m in script.received) == 2


@pytest.mark.parametrize("endpoint", [
    "http://203.0.113.9:{port}/messages?session=s1",  # another host
    "//203.0.113.9:{port}/messages?session=s1",  # the same, scheme-relative
    "https://127.0.0.1:{port}/messages?session=s1",  # another scheme
    "http://127.0.0.1:{other}/messages?session=s1",  # another port
])
async def test_an_endpoint_on_another_origin_is_refused(endpoint):
    script = Script()
    async with serve(sse_app(script, endpoint.replace("{other}", str(free_port())))) as port:
        upstream = SseUpstream(f"http://127.0.0.1:{port}/sse", timeout=5.0, restart_backoff=(0.01, 0.01))
        try:
            for _ in range(2):  # and again on the next attempt
                with pytest.raises(UpstreamError, match="not on the stream's origin"):
                    await upstream.request("tools/list")
        finally:
            await upstream.close()
    assert script.received == []  # nothing was posted anywhere


async def test_a_same_origin_absolute_endpoint_is_used():
    script = Script()
    async with serve(sse_app(script, "http://127.0.0.1:{port}/messages?session=s1")) as port:
        upstream = SseUpstream(f"http://127.0.0.1:{port}/sse", timeout=5.0)
        try:
            assert (await upstream.request("tools/list"))["tools"] == [TOOL]
        finally:
            await upstream.close()


async def test_a_redirect_is_not_followed():
    async def redirect(request):
        raise aiohttp.web.HTTPTemporaryRedirect("http://203.0.113.9/elsewhere")

    app = aiohttp.web.Application()
    app.router.add_get("/sse", redirect)
    app.router.add_get("/ws", redirect)
    async with serve(app) as port:
        for upstream in (SseUpstream(f"http://127.0.0.1:{port}/sse", timeout=5.0, connect_timeout=3.0),
                         WebSocketUpstream(f"ws://127.0.0.1:{port}/ws", timeout=5.0, connect_timeout=3.0)):
            try:
                with pytest.raises(UpstreamError) as refused:
                    await upstream.request("tools/list")
                assert not isinstance(refused.value, UpstreamTimeout)
                assert "307" in str(refused.value)
            finally:
                await upstream.close()


# -- behind a gateway ---------------------------------------------------------------------------------------
@pytest.fixture
async def channel_tenancy(gateway, mcp_upstream, sse_server, ws_server):
    t = await gateway.tenancy("acme", mcp_upstream, server_name="web")
    for name, url, transport in (("old-sse", sse_server.url, "sse"), ("sock", ws_server.url, "websocket")):
        status, body = await gateway.admin(
            "POST", "/servers", {"tenant_id": t.tenant_id, "name": name, "endpoint_url": url,
                                 "transport_type": transport},
        )
        assert status == 201, body
    return gateway, t


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["old-sse", "sock"])
async def test_through_the_servers_endpoint(channel_tenancy, name, mode):
    gw, t = channel_tenancy
    async with gateway_client(f"{gw.url}/servers/{name}/mcp", t.api_key, mode=mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "add", "count"} <= names
        assert (await client.call_tool("add", {"a": 40, "b": 2})).content[0].text == "42.0"
        assert (await client.call_tool("count", {"n": 3})).content[0].text == "counted to 3"
        resources = await client.list_resources()
        assert any(str(r.uri) == "demo://readme" for r in resources.resources)
    (entry,) = [s for s in gw.gateway.store.current.servers.values() if s.name == name]
    channel = gw.gateway.dataplane.channel_clients[entry.id]
    assert type(channel) is (SseUpstream if name == "old-sse" else WebSocketUpstream)
    assert channel.connected and channel.url == entry.endpoint_url


@pytest.mark.parametrize("mode", MODES)
async def test_in_the_aggregate(channel_tenancy, mode):
    gw, t = channel_tenancy
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"old-sse__echo", "sock__echo", "web__echo"} <= names
        assert (await client.call_tool("old-sse__echo", {"text": "via sse"})).content[0].text == "via sse"
        assert (await client.call_tool("sock__add", {"a": 2, "b": 3})).content[0].text == "5.0"
    dataplane = gw.gateway.dataplane
    assert sorted(type(c).__name__ for c in dataplane.channel_clients.values()) == ["SseUpstream",
                                                                                    "WebSocketUpstream"]


async def test_a_stream_is_refused_with_an_accurate_reason(channel_tenancy):
    gw, t = channel_tenancy
    async with aiohttp.ClientSession() as http:
        for name, words in (("old-sse", "the 2024-11-05 HTTP+SSE transport"), ("sock", "WebSocket")):
            async with http.get(f"{gw.url}/servers/{name}/mcp",
                                headers={"Authorization": f"Bearer {t.api_key}"}) as response:
                assert response.status == 405
                body = await response.json()
                assert body["error"]["message"] == (f"Server '{name}' speaks {words} behind the gateway: "
                                                    "POST one message per request, or GET (Accept: "
                                                    "text/event-stream) a stream of list changes")


async def test_changed_or_removed_servers_close_their_connection(channel_tenancy):
    gw, t = channel_tenancy
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="legacy") as client:
        await client.call_tool("old-sse__echo", {"text": "open it"})
        await client.call_tool("sock__echo", {"text": "open it"})
    dataplane = gw.gateway.dataplane
    snapshot = gw.gateway.store.current
    entries = {s.name: s for s in snapshot.servers.values()}
    sse_client = dataplane.channel_clients[entries["old-sse"].id]
    ws_client = dataplane.channel_clients[entries["sock"].id]
    assert sse_client.connected and ws_client.connected
    # A new endpoint: a new client, the old one closed.
    moved = replace(entries["sock"], endpoint_url=entries["sock"].endpoint_url + "?v=2")
    assert dataplane.client_for(moved) is not ws_client
    # Gone from the configuration (as after its removal): closed and forgotten.
    dataplane.on_snapshot(replace(snapshot, servers={k: v for k, v in snapshot.servers.items() if v.name != "old-sse"},
                                  by_tenant={}))
    assert entries["old-sse"].id not in dataplane.channel_clients
    assert entries["sock"].id in dataplane.channel_clients
    for _ in range(200):
        if not sse_client.connected and not ws_client.connected:
            break
        await asyncio.sleep(0.01)
    assert not sse_client.connected and not ws_client.connected
    with pytest.raises(UpstreamError, match="closed"):
        await sse_client.request("tools/list")
