"""Hand-written MCP peers on the 2024-11-05 HTTP+SSE transport and on WebSocket, in the test's own loop.

The SDK's servers (sse_app, ws_server.py) prove the transports against the real
thing; these say exactly what goes on the wire, to test what the SDK never sends:
SSE framed with CRLF and bare CR, data split over many lines and tiny chunks,
comments, `id`/`retry` fields, server-to-client requests, oversized messages, an
endpoint on another origin. Everything the gateway sends is kept in `received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from harness import free_port

TOOL = {"name": "scripted", "description": "Line one\nline two, é", "inputSchema": {"type": "object"}}


class Script:
    """What the peer answers, and everything it was sent."""

    def __init__(self, *, big: int = 0) -> None:
        self.big = big  # the size of the answer to the tool "big"
        self.received: list[dict[str, Any]] = []
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()

    def send(self, message: dict[str, Any]) -> None:
        self.outbox.put_nowait(orjson.dumps(message, option=orjson.OPT_INDENT_2))  # many lines

    def on_message(self, message: dict[str, Any]) -> None:
        self.received.append(message)
        method, request_id = message.get("method"), message.get("id")
        if method == "initialize":
            self.send({"jsonrpc": "2.0", "id": request_id, "result": {
                "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                "serverInfo": {"name": "scripted", "version": "1"}, "instructions": "hand-written"}})
        elif method == "tools/list":
            # Before answering, the server asks things of the gateway and tells it something.
            self.send({"jsonrpc": "2.0", "id": "srv-ping", "method": "ping"})
            self.send({"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage",
                       "params": {"messages": [], "maxTokens": 1}})
            self.send({"jsonrpc": "2.0", "method": "notifications/message",
                       "params": {"level": "info", "data": "private-log-text"}})
            self.send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": [TOOL]}})
        elif method == "tools/call":
            name = message["params"]["name"]
            if name == "big":
                self.outbox.put_nowait(b'{"jsonrpc":"2.0","id":%d,"result":{"x":"%s"}}' % (request_id, b"a" * self.big))
            elif name != "hang":  # hang: never answered
                self.send({"jsonrpc": "2.0", "id": request_id,
                           "result": {"content": [{"type": "text", "text": f"called {name}"}]}})

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The first message received that matches, waiting for it at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.received:
                if predicate(message):
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no such message among {self.received}")
            await asyncio.sleep(0.01)


def sse_frame(message: bytes, eol: bytes) -> bytes:
    """One `message` event, a data line per line of the message, with a comment and ignored fields inside."""
    lines = message.split(b"\n")
    body = b"".join(b"data: " + line + eol for line in lines[:1])
    body += b": a comment inside the event" + eol + b"id: 42" + eol + b"retry: 1000" + eol
    body += b"".join(b"data:" + line + eol for line in lines[1:])  # no space after the colon: also data
    return b"event: message" + eol + body + eol


def sse_app(script: Script, endpoint: str, *, session: str = "s1") -> web.Application:
    """GET /sse announces `endpoint` ("{port}" in it: the port it serves on); POSTs to /messages feed `script`."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        announced = endpoint.replace("{port}", str(request.url.port)).encode()
        await response.write(b": keep-alive\r\n\r\nevent: endpoint\r\ndata: " + announced + b"\r\n\r\n")
        sent = 0
        while True:
            message = await script.outbox.get()
            eol = (b"\r\n", b"\r", b"\n")[sent % 3]
            sent += 1
            frame = sse_frame(message, eol)
            for i in range(0, len(frame), 7):  # tiny chunks: CRLF split across them too
                await response.write(frame[i:i + 7])
            await response.write(b":\n")  # a keep-alive between events

    async def messages(request: web.Request) -> web.Response:
        if request.query.get("session") != session:
            return web.Response(status=404, text="Could not find session")
        script.on_message(await request.json())
        return web.Response(status=202, text="Accepted")

    app = web.Application()
    app.router.add_get("/sse", stream)
    app.router.add_post("/messages", messages)
    return app


def ws_app(script: Script) -> web.Application:
    """A WebSocket at /ws (subprotocol `mcp`) feeding `script`, one message per text frame."""

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("mcp",), max_msg_size=64 * 1024 * 1024)
        await ws.prepare(request)

        async def write() -> None:
            while True:
                await ws.send_str((await script.outbox.get()).decode())

        writer = asyncio.ensure_future(write())
        try:
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    script.on_message(orjson.loads(frame.data))
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    app = web.Application()
    app.router.add_get("/ws", socket)
    return app


@contextlib.asynccontextmanager
async def serve(app: web.Application):
    """Serve `app` on a free local port for the block; yields the port."""
    # handler_cancellation: a stream handler ends when its client goes away.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()
