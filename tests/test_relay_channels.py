"""Questions, progress and log messages relayed for stdio, SSE (2024-11-05) and WebSocket servers.

These transports carry every request of the gateway over one process or
connection and do not say which request a server's message belongs to, save
progress (by its token). The gateway relays a server's request or log message
only while exactly one request is in flight there (multiplexed.py), and refuses
the request upstream otherwise. The peers are the official SDK's: the demo
server plus a few tools (stdio_servers/relay_server.py) over stdio, the SDK's
`sse_app()`, and the SDK server behind channel_servers/ws_server.py's WebSocket;
the client is the SDK's, in both eras, on `/servers/{name}/mcp` and `/mcp`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import mcp.types as types
import pytest
from channel_servers.scripted import Script, serve, sse_app, ws_app
from harness import free_port, wait_for_port
from test_relay import _Answers

from gateway.dataplane import multiplexed
from gateway.dataplane.channels import SseUpstream, WebSocketUpstream
from gateway.dataplane.mcp_client import HANDSHAKE, RELAYED_CLIENT_CAPABILITIES
from gateway.dataplane.stdio import StdioUpstream
from gateway.dataplane.upstream import UpstreamError, UpstreamTimeout
from gateway.demo.client import gateway_client

SERVER = Path(__file__).parent / "stdio_servers" / "relay_server.py"
COMMAND = shlex.join([sys.executable, str(SERVER)])
MODES = ["legacy", "2026-07-28"]
# The server's name behind the gateway, by transport.
NAMES = {"stdio": "local", "sse": "events", "websocket": "sock"}
TRANSPORTS = list(NAMES)
REFUSED = "cannot tell which of its clients it is for"


# -- the servers ---------------------------------------------------------------------------------------------
class Served:
    """relay_server.py over SSE or WebSocket in a subprocess, on a port of its own."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.port = free_port()
        path = "sse" if transport == "sse" else "ws"
        scheme = "http" if transport == "sse" else "ws"
        self.url = f"{scheme}://127.0.0.1:{self.port}/{path}"
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--transport", self.transport, "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    def client(self, **options):
        kind = SseUpstream if self.transport == "sse" else WebSocketUpstream
        return kind(self.url, timeout=30.0, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="session")
def relay_servers():
    """The SSE and WebSocket servers, once per run."""
    served = {t: Served(t) for t in ("sse", "websocket")}
    yield served
    for s in served.values():
        s.stop()


@pytest.fixture
async def relay_tenancy(gateway, mcp_upstream, relay_servers):
    """A tenant with relay_server.py behind the gateway three times: over stdio, SSE and WebSocket."""
    t = await gateway.tenancy("acme", mcp_upstream, server_name="web")
    endpoints = {"stdio": COMMAND, "sse": relay_servers["sse"].url, "websocket": relay_servers["websocket"].url}
    for transport, name in NAMES.items():
        status, body = await gateway.admin(
            "POST", "/servers", {"tenant_id": t.tenant_id, "name": name, "endpoint_url": endpoints[transport],
                                 "transport_type": transport},
        )
        assert status == 201, body
    return gateway, t


def _route(transport: str, path: str) -> tuple[str, str]:
    """(endpoint path, tool prefix) of a server behind the facade or in /mcp."""
    name = NAMES[transport]
    return (f"/servers/{name}/mcp", "") if path == "facade" else ("/mcp", f"{name}__")


def _client(gw, t, path: str, mode: str, answers: _Answers | None = None, **options):
    if answers is not None:
        options.update(sampling_callback=answers.sampling, elicitation_callback=answers.elicitation)
    return gateway_client(f"{gw.url}{path}", t.api_key, mode=mode, **options)


def _text(result) -> str:
    assert not result.is_error, result
    return result.content[0].text


# -- through the gateway --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["facade", "aggregate"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_questions_and_progress_reach_the_client(relay_tenancy, transport, path, mode):
    gw, t = relay_tenancy
    endpoint, prefix = _route(transport, path)
    answers = _Answers()
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with _client(gw, t, endpoint, mode, answers) as client:
        assert _text(await client.call_tool(f"{prefix}greet_me", {})) == "Hello, Ada!"
        assert _text(await client.call_tool(f"{prefix}ask_model", {"topic": "Paris"})) \
            == "The model says: Paris is lovely."
        counted = await client.call_tool(f"{prefix}count", {"n": 3, "delay": 0.02}, progress_callback=on_progress)
        assert _text(counted) == "counted to 3"
        assert _text(await client.call_tool(f"{prefix}add", {"a": 1, "b": 2})) == "3.0"
    assert answers.asked == ["elicitation:What is your name?", "sampling:One sentence about Paris, please."]
    assert seen == [(1, 3, "step 1 of 3"), (2, 3, "step 2 of 3"), (3, 3, "step 3 of 3")]
    assert gw.gateway.dataplane.aggregate.relay.paused == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_concurrent_calls_each_hear_only_their_own_progress(relay_tenancy, transport, mode):
    gw, t = relay_tenancy
    endpoint, prefix = _route(transport, "facade")
    first: list[float] = []
    second: list[float] = []

    async def on_first(progress, total, message) -> None:
        first.append(progress)

    async def on_second(progress, total, message) -> None:
        second.append(progress)

    async with _client(gw, t, endpoint, mode) as client:
        a, b = await asyncio.gather(
            client.call_tool(f"{prefix}count", {"n": 3, "delay": 0.02}, progress_callback=on_first),
            client.call_tool(f"{prefix}count", {"n": 5, "delay": 0.01}, progress_callback=on_second),
        )
    assert (_text(a), _text(b)) == ("counted to 3", "counted to 5")
    assert first == [1, 2, 3]
    assert second == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_question_while_two_calls_are_in_flight_is_refused_upstream(relay_tenancy, transport, mode):
    gw, t = relay_tenancy
    endpoint, prefix = _route(transport, "facade")
    answers = _Answers()
    async with _client(gw, t, endpoint, mode, answers) as client:
        held, asked = await asyncio.gather(
            client.call_tool(f"{prefix}hold", {"seconds": 1.5}),
            client.call_tool(f"{prefix}ask_after", {"seconds": 0.5}),
        )
        assert _text(held) == "held"
        # The server got the gateway's refusal, and says so; the client was not asked.
        refusal = _text(asked)
        assert refusal.startswith("refused: ") and REFUSED in refusal, refusal
        assert answers.asked == []
        # Alone in flight, the same question reaches the client.
        assert _text(await client.call_tool(f"{prefix}ask_after", {"seconds": 0})) == "answered: Ada"
    assert answers.asked == ["elicitation:Who is asking?"]
    assert gw.gateway.dataplane.aggregate.relay.paused == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_log_messages_reach_the_client_only_when_theirs_is_the_only_call(relay_tenancy, transport):
    gw, t = relay_tenancy
    endpoint, prefix = _route(transport, "facade")
    logged: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.append(params.data)

    async with _client(gw, t, endpoint, "legacy", logging_callback=on_log) as client:
        assert _text(await client.call_tool(f"{prefix}log_then_answer", {"text": "alone"})) == "logged"
        # With another call in flight, nobody can tell whose it is: dropped.
        held, answered = await asyncio.gather(
            client.call_tool(f"{prefix}hold", {"seconds": 1.0}),
            client.call_tool(f"{prefix}log_then_answer", {"text": "in company", "seconds": 0.3}),
        )
        assert (_text(held), _text(answered)) == ("held", "logged")
    assert logged == ["alone"]


# -- the upstream clients alone ----------------------------------------------------------------------------
@pytest.fixture(params=TRANSPORTS)
async def upstream(request, relay_servers):
    """(client, kill): a client of relay_server.py over each transport, and how to end its peer
    (the next request starts a new one)."""
    if request.param == "stdio":
        client = StdioUpstream(COMMAND, timeout=30.0)

        def kill() -> None:
            os.kill(client.pid, signal.SIGKILL)
    else:
        own = Served(request.param)  # killed by the test: not the shared one
        client = own.client()

        def kill() -> None:
            own.stop()
            own.start()
    try:
        yield client, kill
    finally:
        await client.close()
        if request.param != "stdio":
            own.stop()


async def _progress_then_answer(call, timeout: float = 10.0) -> tuple[list[dict], dict]:
    progress = []
    while True:
        message = await call.next(timeout)
        if "method" not in message:
            return progress, message
        assert message["method"] == "notifications/progress"
        progress.append(message["params"])


async def test_the_handshake_announces_what_the_gateway_relays(upstream):
    client, _ = upstream
    # The SDK's resolvers (greet_me's Elicit) ask only a client that announced elicitation.
    call = await client.start("tools/call", {"name": "greet_me", "arguments": {}})
    question = await call.next(10.0)
    assert question["method"] == "elicitation/create"
    # The answer goes back on the same stream under the server's own id.
    await call.reply({"jsonrpc": "2.0", "id": question["id"], "result": {"action": "accept",
                                                                        "content": {"name": "Grace"}}})
    answer = await call.next(10.0)
    assert answer["id"] == call.request_id and answer["result"]["content"][0]["text"] == "Hello, Grace!"
    call.close()


async def test_a_call_holds_a_bounded_number_of_messages(upstream):
    client, _ = upstream
    steps = multiplexed.MAX_QUEUED + 36
    call = await client.start("tools/call", {"name": "count", "arguments": {"n": steps},
                                             "_meta": {"progressToken": "gwp-bound"}})
    for _ in range(1000):  # not read until the server has said all (and more than a call may hold)
        if call.dropped >= steps - multiplexed.MAX_QUEUED:
            break
        await asyncio.sleep(0.01)
    progress, answer = await _progress_then_answer(call)
    assert answer["result"]["content"][0]["text"] == f"counted to {steps}"
    # The first MAX_QUEUED were kept, the rest dropped; the answer is never dropped.
    assert [p["progress"] for p in progress] == list(range(1, multiplexed.MAX_QUEUED + 1))
    assert call.dropped == steps - multiplexed.MAX_QUEUED
    call.close()


async def test_a_call_ends_with_its_process_or_connection(upstream):
    client, kill = upstream
    call = await client.start("tools/call", {"name": "count", "arguments": {"n": 200, "delay": 0.05},
                                             "_meta": {"progressToken": "gwp-dies"}})
    first = await call.next(10.0)
    assert first["params"]["progressToken"] == "gwp-dies"
    kill()
    with pytest.raises(UpstreamError) as ended:
        while True:  # what arrived before its end, then the end
            await call.next(10.0)
    assert not isinstance(ended.value, UpstreamTimeout)  # told at once, not found out by waiting
    call.close()
    # The next call is on a new process or connection, and the old one's calls are gone.
    again = await client.start("tools/call", {"name": "count", "arguments": {"n": 2},
                                              "_meta": {"progressToken": "gwp-again"}})
    progress, answer = await _progress_then_answer(again)
    assert [p["progressToken"] for p in progress] == ["gwp-again", "gwp-again"]
    again.close()


async def test_silence_times_a_call_out(upstream):
    client, _ = upstream
    call = await client.start("tools/call", {"name": "hold", "arguments": {"seconds": 5}})
    with pytest.raises(UpstreamTimeout):
        await call.next(0.2)
    call.close()


# -- against hand-written peers: exactly what goes on the wire -----------------------------------------------
@pytest.fixture(params=["sse", "websocket"])
async def scripted(request):
    script = Script()
    app = sse_app(script, "messages?session=s1") if request.param == "sse" else ws_app(script)
    async with serve(app) as port:
        if request.param == "sse":
            client = SseUpstream(f"http://127.0.0.1:{port}/sse", timeout=5.0)
        else:
            client = WebSocketUpstream(f"ws://127.0.0.1:{port}/ws", timeout=5.0)
        try:
            yield script, client
        finally:
            await client.close()


async def test_closing_an_unanswered_call_cancels_it_upstream(scripted):
    script, client = scripted
    call = await client.start("tools/call", {"name": "hang", "arguments": {}})
    initialize = script.received[0]
    assert initialize["params"] == {"protocolVersion": HANDSHAKE, "capabilities": RELAYED_CLIENT_CAPABILITIES,
                                    "clientInfo": {"name": "mcp-gateway", "version": "0.1.0"}}
    call.close("the client went away")
    cancelled = await script.wait_for(lambda m: m.get("method") == "notifications/cancelled")
    assert cancelled["params"] == {"requestId": call.request_id, "reason": "the client went away"}
    # An answer to a call that has ended goes nowhere, and nothing is left of it.
    script.send({"jsonrpc": "2.0", "id": call.request_id, "result": {}})
    script.send({"jsonrpc": "2.0", "id": 99, "method": "roots/list"})
    refusal = await script.wait_for(lambda m: m.get("id") == 99)
    assert refusal["error"]["code"] == -32601 and REFUSED in refusal["error"]["message"]
    assert "(none of its requests is in flight on this connection)" in refusal["error"]["message"]


async def test_a_question_goes_to_the_only_call_and_its_answer_back_under_the_servers_id(scripted):
    script, client = scripted
    call = await client.start("tools/call", {"name": "hang", "arguments": {}})
    script.send({"jsonrpc": "2.0", "id": "srv-1", "method": "roots/list"})
    script.send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}})
    question = await call.next(5.0)
    assert question == {"jsonrpc": "2.0", "id": "srv-1", "method": "roots/list"}
    assert (await call.next(5.0))["method"] == "notifications/message"
    await call.reply({"jsonrpc": "2.0", "id": "srv-1", "result": {"roots": []}})
    assert await script.wait_for(lambda m: m.get("id") == "srv-1") == {"jsonrpc": "2.0", "id": "srv-1",
                                                                       "result": {"roots": []}}
    # A second call in flight: the next question belongs to neither.
    other = await client.start("tools/call", {"name": "hang", "arguments": {"n": 2}})
    script.send({"jsonrpc": "2.0", "id": "srv-2", "method": "sampling/createMessage", "params": {}})
    refusal = await script.wait_for(lambda m: m.get("id") == "srv-2")
    assert refusal["error"]["code"] == -32601 and "2 of its requests are in flight" in refusal["error"]["message"]
    # The server's ping is still the gateway's to answer.
    script.send({"jsonrpc": "2.0", "id": "srv-ping", "method": "ping"})
    assert await script.wait_for(lambda m: m.get("id") == "srv-ping") == {"jsonrpc": "2.0", "id": "srv-ping",
                                                                          "result": {}}
    script.send({"jsonrpc": "2.0", "id": call.request_id, "result": {"done": 1}})
    assert (await call.next(5.0))["result"] == {"done": 1}
    call.close()
    other.close()
