"""A fast stub MCP upstream for benchmarks and load tests.

    python bench/stub_upstream.py --port 9100 [--host 127.0.0.1]

Every POST (any path) carrying a JSON-RPC request gets one fixed-shape result
echoing the request's id:

    {"jsonrpc":"2.0","id":<id>,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}

with `Content-Type: application/json` (`server/discover` gets a 2026-07-28 discover
result instead, so the gateway takes it for what it stands in for); a notification or a client's response
(no id) gets 202 and an empty body, a batch gets an array of results (202 if
it holds no request), a body that is not JSON gets 400 with a JSON-RPC parse
error (-32700; JSON that is no message: -32600). GET and DELETE get 405 (no
server-to-client stream, no sessions), as the MCP Streamable HTTP transport
allows. Connections are HTTP/1.1 keep-alive (pipelining works: answers go
out in order) unless the client asks to close.

What it must be: much faster than anything it measures, so it stays out of
the figures. Hence raw asyncio Protocols, the llhttp parser (`httptools`),
uvloop, one decode of the id with a typed msgspec decoder, and one
`transport.write` per answer; no web framework. What it must not do: any work
per request that a real MCP server would do (it runs no tool).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import httptools
import msgspec
import uvloop


class _Message(msgspec.Struct):
    # Only what the answer needs. `id` is kept raw so it echoes byte-for-byte
    # (an int, a string, whatever the client chose); UNSET means "no id".
    id: msgspec.Raw = msgspec.Raw(b"")
    method: str = ""


_decode_one = msgspec.json.Decoder(_Message).decode
_decode_batch = msgspec.json.Decoder(list[_Message]).decode

_RESULT_HEAD = b'{"jsonrpc":"2.0","id":'
_SESSION_HEADER = b"Mcp-Session-Id: bench-session\r\n"
_RESULT_TAIL = b',"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}'
# server/discover is answered as a server of both eras answers it (the gateway asks once per
# server which era it speaks; a stub that answered it like a tool call would be taken for a
# 2025-era server and put behind the gateway's translating facade).
_DISCOVER_TAIL = (
    b',"result":{"supportedVersions":["2026-07-28"],"capabilities":{"tools":{}},'
    b'"resultType":"complete","_meta":{"io.modelcontextprotocol/serverInfo":{"name":"stub","version":"1"}}}}'
)
_PARSE_ERROR = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
_INVALID_REQUEST = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request"}}'

_KEEP = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
_JSON_HEADERS = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
_EMPTY_HEADERS = b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n"
_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 405: b"Method Not Allowed"}


def answer_body(body: bytes) -> tuple[int, bytes]:
    """(HTTP status, body) for one POSTed JSON-RPC message or batch."""
    try:
        if body.lstrip()[:1] == b"[":
            ids = [m.id for m in _decode_batch(body) if m.id]
            if not ids:
                return 202, b""
            return 200, b"[" + b",".join(_RESULT_HEAD + bytes(i) + _RESULT_TAIL for i in ids) + b"]"
        message = _decode_one(body)
        message_id = message.id
    except msgspec.ValidationError:  # JSON, but not a message (e.g. a bare number)
        return 400, _INVALID_REQUEST
    except msgspec.DecodeError:
        return 400, _PARSE_ERROR
    if not message_id:
        return 202, b""
    if message.method == "server/discover":
        return 200, _RESULT_HEAD + bytes(message_id) + _DISCOVER_TAIL
    return 200, _RESULT_HEAD + bytes(message_id) + _RESULT_TAIL


class StubProtocol(asyncio.Protocol):
    """One client connection: parse requests with llhttp, answer each as it completes."""

    __slots__ = ("transport", "parser", "body", "paused")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(400, b"", close=True)
        except httptools.HttpParserError:
            self._reply(400, b"", close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # Flow control: a client that does not read its answers stops being read.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.body.clear()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        close = not parser.should_keep_alive()
        method = parser.get_method()
        if method != b"POST":
            self._reply(405, b"", close=close, extra=b"Allow: POST\r\n")
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        status, payload = answer_body(body)
        # initialize opens a session (bench/proxy.py --case legacy-session); later requests
        # carry its id, which this stub accepts without looking, like a cheap real server.
        extra = _SESSION_HEADER if b'"initialize"' in body else b""
        self._reply(status, payload, close=close, extra=extra)

    def _reply(self, status: int, payload: bytes, *, close: bool, extra: bytes = b"") -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if payload:
            head = _JSON_HEADERS % (status, _REASONS[status], len(payload))
        else:
            head = _EMPTY_HEADERS % (status, _REASONS[status])
        transport.write(b"".join((head, extra, _CLOSE if close else _KEEP, b"\r\n", payload)))
        if close:
            transport.close()


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, host, port, backlog=1024, reuse_address=True)
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"stub_upstream listening on http://{host}:{bound}/mcp", file=sys.stderr, flush=True)
    try:
        await stopping.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fast stub MCP upstream (JSON-RPC over HTTP/1.1).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free one)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
