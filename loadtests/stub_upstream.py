"""A fast stub MCP upstream for load tests and benchmarks: measure the gateway, not the upstream.

    python loadtests/stub_upstream.py --port 9100 [--host 127.0.0.1]

It speaks just enough MCP, in both eras, for every traffic shape in loadtests/ and
bench/proxy.py, with fixed answers and no tool ever run:

- `server/discover` (2026-07-28): supported versions, `tools` capability, server info.
  The gateway asks it once per upstream to learn the era.
- `initialize` (2025-era): a handshake result in the version asked for (2025-11-25 when
  the client asks for one this stub does not know), with a fresh `Mcp-Session-Id`.
  Later requests may carry any session id; it is not checked (a cheap server's answer).
- `tools/list`: four tools with the demo server's names and schemas (`echo`, `add`,
  `word_count`, `utc_now`), so the same locust users run against `gateway demo`'s
  server too.
- `tools/call` (any name, any arguments) and every other request: one text result "ok";
  `ping`: an empty result. 2026-07-28 requests (a `_meta` protocol version in the body)
  get `"resultType": "complete"` in their results.
- A notification or a client's response (no id): 202, empty. A batch: an array of
  results (202 if it holds no request). A body that is not JSON: 400 with -32700 (JSON
  that is no message: -32600).
- DELETE (the end of a 2025-era session): 200, empty. GET: 405 (no server-to-client
  stream), as the Streamable HTTP transport allows.

Connections are HTTP/1.1 keep-alive (pipelining works: answers go out in order) unless
the client asks to close.

What it must be: much faster than anything it measures. Hence raw asyncio Protocols, the
llhttp parser (`httptools`), uvloop, one decode of the envelope with a typed msgspec
decoder, answers assembled from prepared bytes, one `transport.write` per answer; no web
framework. Tens of thousands of answers a second on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys

import httptools
import msgspec
import uvloop

MODERN = "2026-07-28"
# Handshake versions this stub answers in; any other request gets the newest.
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")


class _Meta(msgspec.Struct):
    version: str = msgspec.field(name="io.modelcontextprotocol/protocolVersion", default="")


class _Params(msgspec.Struct):
    protocolVersion: str = ""  # initialize
    meta: _Meta | None = msgspec.field(name="_meta", default=None)  # 2026-07-28 requests carry their version here


class _Message(msgspec.Struct):
    # Only what the answer needs. `id` is kept raw so it echoes byte-for-byte
    # (an int, a string, whatever the client chose); an empty Raw means "no id".
    id: msgspec.Raw = msgspec.Raw(b"")
    method: str = ""
    params: _Params | None = None


_decode_one = msgspec.json.Decoder(_Message).decode
_decode_batch = msgspec.json.Decoder(list[_Message]).decode

_HEAD = b'{"jsonrpc":"2.0","id":'
_CALL = b',"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}'
_CALL_MODERN = b',"result":{"content":[{"type":"text","text":"ok"}],"isError":false,"resultType":"complete"}}'
_EMPTY = b',"result":{}}'
_EMPTY_MODERN = b',"result":{"resultType":"complete"}}'
_SERVER_INFO = b'{"name":"stub","version":"1"}'
# server/discover is answered as a server of both eras answers it (a stub that answered it like a
# tool call would be taken for a 2025-era server and put behind the gateway's translating facade).
_DISCOVER = (
    b',"result":{"supportedVersions":["' + MODERN.encode() + b'"],"capabilities":{"tools":{}},'
    b'"resultType":"complete","_meta":{"io.modelcontextprotocol/serverInfo":' + _SERVER_INFO + b"}}}"
)
_INITIALIZE = (
    b',"result":{"protocolVersion":"%s","capabilities":{"tools":{"listChanged":false}},'
    b'"serverInfo":' + _SERVER_INFO + b"}}"
)
_TOOLS = (
    b'[{"name":"echo","description":"Return the text unchanged.","inputSchema":{"type":"object",'
    b'"properties":{"text":{"type":"string"}},"required":["text"]}},'
    b'{"name":"add","description":"Add two numbers.","inputSchema":{"type":"object",'
    b'"properties":{"a":{"type":"number"},"b":{"type":"number"}},"required":["a","b"]}},'
    b'{"name":"word_count","description":"Count the words in a text.","inputSchema":{"type":"object",'
    b'"properties":{"text":{"type":"string"}},"required":["text"]}},'
    b'{"name":"utc_now","description":"The current UTC time, ISO 8601.","inputSchema":{"type":"object",'
    b'"properties":{}}}]'
)
_TOOLS_LIST = b',"result":{"tools":' + _TOOLS + b"}}"
_TOOLS_LIST_MODERN = b',"result":{"tools":' + _TOOLS + b',"resultType":"complete"}}'
_PARSE_ERROR = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
_INVALID_REQUEST = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request"}}'

_KEEP = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
_JSON_HEADERS = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
_EMPTY_HEADERS = b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n"
_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 405: b"Method Not Allowed"}
_sessions = itertools.count(1)


def _answer(message: _Message) -> bytes:
    """The result for one request (its id is known to be there)."""
    method = message.method
    params = message.params
    modern = params is not None and params.meta is not None and bool(params.meta.version)
    if method == "tools/call":
        tail = _CALL_MODERN if modern else _CALL
    elif method == "tools/list":
        tail = _TOOLS_LIST_MODERN if modern else _TOOLS_LIST
    elif method == "server/discover":
        tail = _DISCOVER
    elif method == "initialize":
        asked = params.protocolVersion if params is not None else ""
        version = asked if asked in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
        tail = _INITIALIZE % version.encode()
    elif method == "ping":
        tail = _EMPTY_MODERN if modern else _EMPTY
    else:
        tail = _CALL_MODERN if modern else _CALL
    return _HEAD + bytes(message.id) + tail


def answer_body(body: bytes) -> tuple[int, bytes, bool]:
    """(HTTP status, body, whether a session opens) for one POSTed JSON-RPC message or batch."""
    try:
        if body.lstrip()[:1] == b"[":
            requests = [m for m in _decode_batch(body) if m.id]
            if not requests:
                return 202, b"", False
            return 200, b"[" + b",".join(_answer(m) for m in requests) + b"]", False
        message = _decode_one(body)
    except msgspec.ValidationError:  # JSON, but not a message (e.g. a bare number)
        return 400, _INVALID_REQUEST, False
    except msgspec.DecodeError:
        return 400, _PARSE_ERROR, False
    if not message.id:
        return 202, b"", False
    return 200, _answer(message), message.method == "initialize"


class StubProtocol(asyncio.Protocol):
    """One client connection: parse requests with llhttp, answer each as it completes."""

    __slots__ = ("transport", "parser", "body")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError):
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
        if method == b"DELETE":
            self._reply(200, b"", close=close)
            return
        if method != b"POST":
            self._reply(405, b"", close=close, extra=b"Allow: POST, DELETE\r\n")
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        status, payload, opens_session = answer_body(body)
        extra = b"Mcp-Session-Id: stub-%d\r\n" % next(_sessions) if opens_session else b""
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
    parser = argparse.ArgumentParser(description="A fast stub MCP upstream (JSON-RPC over HTTP/1.1, both eras).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free one)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
