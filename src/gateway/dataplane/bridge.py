"""The two older downstream transports, bridged to an upstream's Streamable HTTP endpoint.

- HTTP+SSE (MCP 2024-11-05): `GET /servers/{name}/sse` opens an event stream
  whose first event (`endpoint`) names `/servers/{name}/messages?session_id=…`;
  the client POSTs each JSON-RPC message there (202 Accepted) and every
  message from the server comes down the stream as an `event: message`.
- WebSocket: `GET /servers/{name}/ws` upgrades (subprotocol `mcp` when the
  client offers it, as the SDKs' WebSocket clients do); JSON-RPC messages
  travel as text frames both ways.

Both are authenticated like `/servers/{name}/mcp` (bearer key, `proxy` scope)
at the opening request, and every client message goes through that endpoint's
checks where they apply: the key is checked again against the current
snapshot, the body is capped, the envelope parsed, the key's quota charged,
and one `request_logs` row is written when the message's exchange ends.
A refused message with an id is answered on the channel with the JSON-RPC
error; on the SSE transport a refusal that cannot be addressed (no id, an
unparseable or oversized body) is the POST's HTTP status instead.

Upstream, a `Bridge` (one per downstream connection) is a 2025-11-25
Streamable HTTP client: it POSTs each client message unchanged, relays the
answer (a JSON body, or an SSE stream event by event as it arrives, so
progress notifications flow live), keeps the upstream's `Mcp-Session-Id` and
the negotiated `MCP-Protocol-Version`, opens the upstream's GET stream after
`notifications/initialized` for server-initiated messages, and on close sends
DELETE and cancels everything it started. The client's credentials never go
upstream: the bridge builds every upstream header itself.

Ordering: messages are sent upstream in the order the client sent them. A
notification or response is forwarded before the next message is taken (its
answer is a quick 202), so `notifications/initialized` is in place before the
first request, and after it the upstream's GET stream is opened before the next
message goes (an upstream sends the requests it makes of its own, such as
`roots/list`, on that stream and drops them when none is open); requests run
concurrently (a long tool call does not hold up the next one), at most
`_MAX_IN_FLIGHT` per connection.

Memory is bounded everywhere: the inbound queue (`_INBOX_MESSAGES`), the
messages waiting for the client (`_OUTBOX_BYTES`), one upstream SSE event
(`_MAX_EVENT_BYTES`), and the upstream connection pauses reading once 256 KiB
wait (upstream.py). A client that does not read for `_STALL_SECONDS` while
its outbox is full is disconnected.

Where sessions live: a 2024-11-05 SSE session is the stream itself and
exists only in the gateway process that holds that stream (a dict of random
192-bit ids). Its POSTs must reach the same process, so a load balancer in
front of several gateway processes must be sticky for `/servers/*/sse` and
`/servers/*/messages` (for example by client address); a POST that lands
elsewhere is answered 404 "Session not found". WebSocket connections carry
everything on one connection and need no stickiness. The 2025-era
`/servers/{name}/mcp` sessions are not affected (sealed tokens, any replica).

Traced (the data plane's `tracer`, tracing.py): each message `accept` takes
is one `mcp.request` span (SERVER, `gateway.transport` "sse" or "websocket"),
the child of the trace context in its `params._meta` (MCP's carrier, SEP-414)
or of its POST's `traceparent`; its quota charge is a `limit` span and its
exchange with the upstream an `upstream` span (CLIENT), named in the
`traceparent` of that POST. The message's bytes go upstream as they came. The
connection itself, its GET stream and its DELETE are not traced.

Not here: the 2026-07-28 stateless era (these transports predate it: a
message carrying its envelope is refused with -32022 naming the handshake
versions, which sends a `mode="auto"` SDK client to `initialize`), JSON-RPC
batches (not part of 2024-11-05 nor 2025-11-25), and stdio upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import quote

import msgspec
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.auth.authenticate import authenticate
from gateway.dataplane import enforce
from gateway.dataplane.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    RATE_LIMITED,
    SESSION_NOT_FOUND,
    UNKNOWN_SERVER,
    UPSTREAM_BAD_RESPONSE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    Call,
    Refusal,
    parse_body,
)
from gateway.dataplane.protocol import HANDSHAKE_VERSIONS, UNSUPPORTED_PROTOCOL_VERSION, check_origin
from gateway.dataplane.server import CLIENT_CLOSED, DataPlane, _Exchange, _too_large, _too_many_sessions
from gateway.dataplane.sse import EventParser, sse_frame
from gateway.dataplane.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.snapshot import KeyEntry, ServerEntry
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.bridge")

# Bounds (module constants: tests shrink them).
_INBOX_MESSAGES = 64  # client messages accepted but not yet forwarded; the reader waits beyond
_MAX_IN_FLIGHT = 64  # concurrent upstream requests per connection; more are refused
_OUTBOX_BYTES = 4 * 1024 * 1024  # messages waiting for the client (one larger message still fits alone)
_STALL_SECONDS = 30.0  # a full outbox for this long: the client does not read, drop it
_MAX_EVENT_BYTES = 16 * 1024 * 1024  # one upstream SSE event
_KEEPALIVE_SECONDS = 20.0  # an SSE comment this often; the key is checked again at each tick
_DELETE_TIMEOUT = 5.0
# GET streams hold their connection for a session's life; they get their own
# pool per origin so they cannot starve the shared request pool (64 by default).
_STREAM_CONNECTIONS = 100_000
# Reopening the upstream's GET stream: at once after one that worked, with
# backoff between these bounds after one that failed. Messages the upstream
# sends in between are lost unless it keeps events for Last-Event-ID.
_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 30.0
# After a close, how long the downstream writer may take to finish before its connection is cut.
_CLOSE_GRACE = 5.0

_JSON = "application/json"
_ACCEPT_BOTH = b"application/json, text/event-stream"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


class _Peek(msgspec.Struct):
    """What the bridge reads of an upstream message: is it the answer to a request?"""

    id: Any = None
    method: Any = None
    error: Any = None


_peek = msgspec.json.Decoder(_Peek)


class _ChannelClosed(Exception):
    """The downstream channel is gone (closed, or dropped for not reading)."""


class _Tick:
    """Returned by `_Outbox.get` when nothing came within the keep-alive interval."""


TICK = _Tick()


class _Outbox:
    """Messages for the client, bounded in bytes; one message always fits when it is empty."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[bytes] = deque()
        self._size = 0
        self.closed = False
        self._changed = asyncio.Event()  # set on put, get and close

    def _wake(self) -> None:
        self._changed.set()

    async def put(self, message: bytes, stall: float) -> bool:
        """Queue `message`; False if the channel is closed or stayed full for `stall` seconds."""
        deadline = None
        while not self.closed and self._size and self._size + len(message) > self.limit:
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + stall
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return False
        if self.closed:
            return False
        self._items.append(message)
        self._size += len(message)
        self._wake()
        return True

    async def get(self, timeout: float) -> bytes | _Tick | None:
        """The next message; TICK after `timeout` seconds of nothing; None once closed and empty."""
        if not self._items and not self.closed:
            self._changed.clear()
            try:
                async with asyncio.timeout(timeout):
                    while not self._items and not self.closed:
                        await self._changed.wait()
                        self._changed.clear()
            except TimeoutError:
                return TICK
        if self._items:
            message = self._items.popleft()
            self._size -= len(message)
            self._wake()
            return message
        return None

    def close(self) -> None:
        self.closed = True
        self._wake()


def _session_ended(name: str) -> Refusal:
    return Refusal(
        404, SESSION_NOT_FOUND,
        f"Session not found: it has ended or is not yours; open a new one with GET /servers/{name}/sse",
    )


def _is_request(call: Call) -> bool:
    return call.method is not None and call.request_id is not None


def _upstream_refusal(server: ServerEntry, exc: UpstreamError) -> Refusal:
    if isinstance(exc, UpstreamTimeout):
        return Refusal(504, UPSTREAM_TIMEOUT, f"Server '{server.name}' did not answer in time: {exc}")
    if isinstance(exc, UpstreamConnectError):
        return Refusal(502, UPSTREAM_UNAVAILABLE, f"Server '{server.name}' is unreachable: {exc}")
    return Refusal(502, UPSTREAM_BAD_RESPONSE, f"Server '{server.name}' broke the exchange: {exc}")


class _Message:
    """One accepted client message on its way upstream."""

    __slots__ = ("request", "key", "call", "body", "started", "listing", "span")

    def __init__(
        self, request: web.BaseRequest, key: KeyEntry, call: Call, body: bytes, started: float,
        listing: enforce.ListFilter | None = None, span=None,
    ) -> None:
        self.request, self.key, self.call, self.body, self.started = request, key, call, body, started
        self.listing = listing  # filters its answer when it is a list (access rules)
        self.span = span  # its span (tracing.py) when tracing is on


class Bridge:
    """One downstream connection bridged to one upstream as a Streamable HTTP client."""

    def __init__(
        self,
        transports: Transports,
        key: KeyEntry,
        server: ServerEntry,
        authorization: str | None,
        abort: Callable[[], None],
    ) -> None:
        self.transports = transports
        self.plane = transports.plane
        self.key = key
        self.server = server
        self.authorization = authorization  # the client's: checked again while connected, never sent upstream
        # The gateway's own credential for the server, as it was when the connection opened.
        self.credential = self.plane.credentials.for_server(server)
        self.outbox = _Outbox(_OUTBOX_BYTES)
        self.upstream_session: bytes | None = None
        self.protocol_version: bytes | None = None
        self.stream_sent = 0  # bytes of server-initiated messages (the GET stream)
        self.closed = False
        self.reason: str | None = None
        self.close_code = WSCloseCode.OK
        self._abort = abort
        self._inbox: asyncio.Queue[_Message] = asyncio.Queue(_INBOX_MESSAGES)
        self._in_flight: set[asyncio.Task] = set()
        self._pump: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self._listening = asyncio.Event()  # the first GET stream attempt has its answer
        self._closing: asyncio.Task | None = None
        self._ended: asyncio.Future[None] | None = None  # resolved by close(); made only when waited on
        self._initializing = False
        # Set by the transport once it has stopped writing to the client.
        self.downstream_done = asyncio.Event()
        # This connection's place under the key's session cap ("bridge:<ticket>"), if counted.
        self.place: str | None = None

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._run())

    def close(self, reason: str, code: int = WSCloseCode.OK, *, abort: bool = False) -> asyncio.Task:
        """Begin tearing down (idempotent); the task ends once the upstream session is ended.

        `abort` also cuts the downstream connection at once (a client that
        does not read would otherwise keep a write waiting forever).
        """
        if self._closing is None:
            self.closed = True
            self.reason, self.close_code = reason, code
            if self._ended is not None and not self._ended.done():
                self._ended.set_result(None)
            self._closing = self.transports._track(self._teardown(abort))
        return self._closing

    async def _teardown(self, abort: bool) -> None:
        pending = {t for t in (self._pump, self._listener, *self._in_flight) if t is not None and not t.done()}
        if abort:
            self.outbox.close()
            self._abort()
        await cancel_all(pending)
        self.outbox.close()
        self.transports.bridges.discard(self)
        self._drain_inbox()
        if self.upstream_session is not None:
            await self._end_upstream_session()
        await self.transports._idle()
        if not self.downstream_done.is_set():
            # A write to a client that does not read never ends by itself.
            try:
                async with asyncio.timeout(_CLOSE_GRACE):
                    await self.downstream_done.wait()
            except TimeoutError:
                self._abort()

    async def _end_upstream_session(self) -> None:
        pool = self.plane.pool_for(self.server)
        try:
            headers = await self._with_credential(self._headers(accept=None))
            payload = pool.encode_request("DELETE", self.server.target, headers, None)
            async with asyncio.timeout(_DELETE_TIMEOUT):
                response = await pool.request(payload, timeout=_DELETE_TIMEOUT)
                await response.read()
        except (UpstreamError, TimeoutError) as exc:
            log.info("could not end upstream session on %s: %s", self.server.name, exc)

    # -- client messages ---------------------------------------------------------------------
    async def accept(self, request: web.BaseRequest, key: KeyEntry, body: bytes, started: float) -> Refusal | None:
        """Check one client message and queue it for the upstream.

        A refusal of a request (a message with a method and an id) is answered
        on the channel; any other refusal is returned for the transport to
        render. Either way it is recorded.
        """
        call: Call | None = None
        tracer = self.plane.tracer
        span = None
        if tracer is not None:
            # A 2024-11-05 message is POSTed (its headers are its own); a WebSocket frame has none.
            transport, headers = ("sse", request.headers) if request.method == "POST" else ("websocket", None)
            span = tracer.start_message(transport, self.server.name, headers, body)
        try:
            if self.closed:
                raise _session_ended(self.server.name)
            snapshot = self.plane.store.current
            current = snapshot.server(key.tenant_id, self.server.name)
            if current is None or not enforce.usable(snapshot, key, current):
                # Removed, or closed to this caller by access rules since the connection opened.
                self.close("the server was removed", WSCloseCode.POLICY_VIOLATION)
                raise Refusal(404, UNKNOWN_SERVER, f"No MCP server named '{self.server.name}' is available to you")
            call = parse_body(body)
            if call.is_batch:
                raise Refusal(
                    400, INVALID_REQUEST, "Invalid Request: JSON-RPC batches are not part of this transport; "
                    "send one message at a time",
                )
            if call.envelope_version is not None:
                # 2026-07-28 is stateless Streamable HTTP only; say which versions work here.
                raise Refusal(
                    400, UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version: this transport speaks the "
                    "initialize handshake",
                    data={"supported": list(HANDSHAKE_VERSIONS), "requested": call.envelope_version},
                )
            initialize = call.method == "initialize"
            if initialize and (self._initializing or self.upstream_session is not None):
                raise Refusal(400, INVALID_REQUEST, "Invalid Request: this connection is already initialized")
            if self.plane.limiter is not None:
                if span is None:
                    await self.plane._limit(request, key, call)
                else:
                    await tracer.stage(span, "limit", self.plane._limit(request, key, call))
            listing = enforce.check_call(snapshot, key, current, call, body)  # access rules, role permissions
        except Refusal as refusal:
            return await self._refused(request, key, call, body, started, refusal, span)
        except asyncio.CancelledError:
            if span is not None:  # the client left while the message waited for its quota
                exchange = _Exchange()
                exchange.status, exchange.error = CLIENT_CLOSED, "client closed the connection"
                tracer.end_message(span, exchange, key, self.server, call)
            raise
        message = _Message(request, key, call, body, started, listing, span)
        if initialize:
            self._initializing = True
        if not self._inbox.full():
            self._inbox.put_nowait(message)
            return None
        # Full: wait for room (the reader stops reading, TCP pushes back), or for the end.
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            if self.closed:
                self._ended.set_result(None)
        put = asyncio.ensure_future(self._inbox.put(message))
        try:
            await asyncio.wait((put, self._ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
                if initialize:
                    self._initializing = False
                self._record_gone(request, key, call, body, started, span)
        if put.cancelled():
            return _session_ended(self.server.name)
        if self.closed:
            self._drain_inbox()  # it may have gone in after the teardown emptied the queue
            return _session_ended(self.server.name)
        return None

    async def _refused(
        self, request, key: KeyEntry | None, call: Call | None, body: bytes, started: float, refusal: Refusal,
        span=None,
    ) -> Refusal | None:
        exchange = _Exchange()
        exchange.status, exchange.error_code, exchange.error = refusal.http_status, refusal.code, refusal.message
        self.plane.refusals.inc(str(refusal.code))
        try:
            if call is not None and _is_request(call):
                payload = refusal.body(call.request_id)
                exchange.sent = len(payload)
                await self.deliver(payload)
                return None
            return refusal
        except _ChannelClosed:
            return None
        finally:
            self.plane._record(request, started, exchange, key, self.server, call, body, True)
            if span is not None:
                self.plane.tracer.end_message(span, exchange, key, self.server, call)

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():  # accepted, never forwarded: still one row each
            message = self._inbox.get_nowait()
            self._record_gone(message.request, message.key, message.call, message.body, message.started,
                              message.span)

    def _record_gone(self, request, key, call, body, started, span=None) -> None:
        exchange = _Exchange()
        exchange.status, exchange.error = CLIENT_CLOSED, "connection closed before the message was forwarded"
        self.plane._record(request, started, exchange, key, self.server, call, body, True)
        if span is not None:
            self.plane.tracer.end_message(span, exchange, key, self.server, call)

    async def deliver(self, message: bytes) -> None:
        """Queue a message for the client; a client that has stopped reading is disconnected."""
        if await self.outbox.put(message, _STALL_SECONDS):
            return
        if not self.outbox.closed:
            log.warning("dropping a %s client that stopped reading (%d bytes waiting)", self.server.name,
                        self.outbox._size)
            self.close("the client stopped reading", WSCloseCode.POLICY_VIOLATION, abort=True)
        raise _ChannelClosed

    async def _run(self) -> None:
        """Forward accepted messages in order: requests concurrently, anything else one at a time."""
        loop = asyncio.get_running_loop()
        while True:
            message = await self._inbox.get()
            if _is_request(message.call):
                if len(self._in_flight) >= _MAX_IN_FLIGHT:
                    refusal = Refusal(
                        429, RATE_LIMITED, f"Too many requests in flight on this connection (at most "
                        f"{_MAX_IN_FLIGHT}); wait for answers before sending more",
                    )
                    await self._refused(message.request, message.key, message.call, message.body, message.started,
                                        refusal, message.span)
                    continue
                task = loop.create_task(self._exchange(message))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                # Let it write its request before a later message (e.g. its cancellation) goes out.
                await asyncio.sleep(0)
            else:
                await self._exchange(message)
                if message.call.method == "notifications/initialized" and self._listener is None:
                    self._listener = loop.create_task(self._listen())
                    # Hold later messages until the stream is there: an upstream sends requests
                    # it makes of its own (roots/list, sampling, …) on it, and drops them without it.
                    await self._listening.wait()

    async def _exchange(self, message: _Message) -> None:
        exchange = _Exchange()
        call = message.call
        try:
            if message.span is None:
                await self._forward(message, exchange)
            else:
                await self.plane.tracer.upstream(message.span, self.server.name, exchange,
                                                 self._forward(message, exchange))
        except Refusal as refusal:
            exchange.status, exchange.error_code, exchange.error = refusal.http_status, refusal.code, refusal.message
            self.plane.refusals.inc(str(refusal.code))
            if _is_request(call):
                payload = refusal.body(call.request_id)
                try:
                    await self.deliver(payload)
                    exchange.sent += len(payload)
                except _ChannelClosed:
                    pass
        except _ChannelClosed:
            exchange.error = "client connection closed mid-answer"
            if not exchange.status:
                exchange.status = CLIENT_CLOSED
        except asyncio.CancelledError:
            exchange.error = exchange.error or f"connection closed mid-answer ({self.reason or 'cancelled'})"
            if not exchange.status:
                exchange.status = CLIENT_CLOSED
            raise
        except Exception as exc:  # a fault of ours: keep the connection, answer the request
            log.exception("bridging %s to %s failed", call.method or "a response", self.server.name)
            exchange.status, exchange.error_code, exchange.error = 500, INTERNAL_ERROR, f"gateway error: {exc!r}"
            if _is_request(call):
                refusal = Refusal(500, INTERNAL_ERROR, "Internal error in the gateway while relaying this request")
                with contextlib.suppress(_ChannelClosed):
                    await self.deliver(refusal.body(call.request_id))
        finally:
            if call.method == "initialize":
                self._initializing = False
            self.plane._record(
                message.request, message.started, exchange, message.key, self.server, call, message.body, True
            )
            if message.span is not None:
                self.plane.tracer.end_message(message.span, exchange, message.key, self.server, call)

    def _headers(self, accept: bytes | None = _ACCEPT_BOTH, *, body: bool = False) -> list[tuple[bytes, bytes]]:
        headers = []
        if body:
            headers.append((b"Content-Type", b"application/json"))
        if accept is not None:
            headers.append((b"Accept", accept))
        if self.protocol_version is not None:
            headers.append((b"MCP-Protocol-Version", self.protocol_version))
        if self.upstream_session is not None:
            headers.append((b"Mcp-Session-Id", self.upstream_session))
        return headers

    async def _with_credential(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        if self.credential is not None:
            headers += await self.credential.headers()
        return headers

    async def _forward(self, message: _Message, exchange: _Exchange) -> None:
        call, server = message.call, self.server
        pool = self.plane.pool_for(server)
        timeout = self.plane.config.upstream_timeout
        try:
            headers = await self._with_credential(self._headers(body=True))
            if message.span is not None:
                self.plane.tracer.inject(headers)  # the `upstream` span, current while this runs
            payload = pool.encode_request("POST", server.target, headers, message.body)
            response = await pool.request(payload, timeout=timeout)
            exchange.status = response.status
            if call.method == "initialize" and response.status == 200:
                self.upstream_session = response.header(b"mcp-session-id")
            elif response.status == 404 and self.upstream_session is not None:
                response.release()
                # The upstream ended (or forgot) the session: so does this connection.
                self.close("the server ended the session", WSCloseCode.GOING_AWAY)
                raise Refusal(
                    404, SESSION_NOT_FOUND, f"Session not found: server '{server.name}' ended it; connect again"
                )
            if response.is_event_stream:
                answered = await self._relay_stream(response, call, exchange, message.listing)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        content = await response.read()
                except TimeoutError:
                    response.release()
                    raise UpstreamTimeout(f"the answer's body did not arrive within {timeout:g}s") from None
                answered = await self._relay_body(content, response.status, call, exchange, message.listing)
        except UpstreamError as exc:
            raise _upstream_refusal(server, exc) from None
        if _is_request(call) and not answered:
            raise Refusal(
                502, UPSTREAM_BAD_RESPONSE,
                f"Server '{server.name}' ended its answer (HTTP {exchange.status}) without a response to this request",
            )

    async def _relay_stream(
        self, response: UpstreamResponse, call: Call, exchange: _Exchange, listing: enforce.ListFilter | None = None
    ) -> bool:
        """Relay an SSE answer event by event; True once the request's own response went by.

        The limits of `/servers/{name}/mcp` apply: no byte for `upstream_timeout`
        (a progress event counts) or a stream older than `stream_max_duration`
        ends it, and a request still waiting then gets a 504 error.
        """
        config = self.plane.config
        parser = EventParser(_MAX_EVENT_BYTES)
        answered = False
        chunks = response.iter_chunks(idle_timeout=config.upstream_timeout, max_duration=config.stream_max_duration)
        try:
            async for chunk in chunks:
                for event, data in parser.feed(chunk):
                    if event not in (b"", b"message"):
                        continue
                    if not answered and _is_request(call):
                        answered = self._learn(data, call)
                    if listing is not None:
                        data = listing.message(data)
                    await self.deliver(data)
                    exchange.sent += len(data)
        except UpstreamError as exc:
            if not answered:
                raise
            # The answer went by already: what broke after it concerns no one waiting.
            exchange.error = f"upstream stream broke after the answer: {exc}"
        finally:
            await chunks.aclose()
        return answered

    async def _relay_body(
        self, content: bytes, status: int, call: Call, exchange: _Exchange, listing: enforce.ListFilter | None = None
    ) -> bool:
        if not content.strip():
            return False
        try:
            peek = _peek.decode(content)
        except msgspec.DecodeError:
            if status >= 400:
                raise Refusal(
                    502, UPSTREAM_BAD_RESPONSE, f"Server '{self.server.name}' answered HTTP {status}"
                ) from None
            raise Refusal(502, UPSTREAM_BAD_RESPONSE, f"Server '{self.server.name}' answered with something that "
                          "is not a JSON-RPC message") from None
        if status in (401, 403) and not isinstance(peek.error, dict):
            # An HTTP-level refusal of the gateway's own credential (an OAuth error body is not JSON-RPC).
            raise Refusal(
                502, UPSTREAM_UNAVAILABLE,
                f"Server '{self.server.name}' refused the gateway's credentials (HTTP {status}); "
                "check the server's auth setting",
            )
        answered = False
        if _is_request(call):
            answered = self._learn(content, call, peek)
            if not answered and peek.method is None and peek.error is not None:
                # An HTTP-level error (e.g. 400) carries id null or a made-up one: address it to the request.
                message = orjson.loads(content)
                message["id"] = call.request_id
                content = orjson.dumps(message)
                answered = True
        elif status >= 400 or peek.method is None:
            # Nothing the client could match it to (it sent a notification or a response).
            log.info("%s answered a %s with HTTP %d", self.server.name, call.method or "response", status)
            return False
        if listing is not None:
            content = listing.message(content)
        await self.deliver(content)
        exchange.sent += len(content)
        return answered

    def _learn(self, data: bytes, call: Call, peek: _Peek | None = None) -> bool:
        """Is `data` the response to `call`? For initialize, also note the negotiated version."""
        if peek is None:
            try:
                peek = _peek.decode(data)
            except msgspec.DecodeError:
                return False
        if peek.method is not None or peek.id != call.request_id:
            return False
        if call.method == "initialize" and peek.error is None:
            try:
                version = orjson.loads(data)["result"]["protocolVersion"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                version = None
            if isinstance(version, str) and 0 < len(version) <= 32 and version.isascii() and version.isprintable():
                self.protocol_version = version.encode("ascii")
        return True

    # -- server-initiated messages -----------------------------------------------------------
    async def _listen(self) -> None:
        """Relay the upstream's GET stream; reconnect when it ends, stop if the upstream offers none."""
        try:
            await self._relay_get_stream()
        finally:
            self._listening.set()

    async def _relay_get_stream(self) -> None:
        pool = self.transports.stream_pool(self.server)
        delay = _RECONNECT_MIN
        parser = EventParser(_MAX_EVENT_BYTES)
        while not self.closed:
            headers = self._headers(b"text/event-stream")
            if parser.last_id is not None:
                headers.append((b"Last-Event-ID", parser.last_id))
            worked = False  # the stream delivered, or stayed open until it idled out
            opened = asyncio.get_running_loop().time()
            try:
                try:
                    headers = await self._with_credential(headers)
                    payload = pool.encode_request("GET", self.server.target, headers, None)
                    response = await pool.request(payload, timeout=self.plane.config.upstream_timeout)
                finally:
                    self._listening.set()  # the stream is open (or will not be): the pump goes on
                if response.status == 404 and self.upstream_session is not None:
                    response.release()
                    self.close("the server ended the session", WSCloseCode.GOING_AWAY)
                    return
                if response.status == 409:
                    # The upstream still holds the stream just left (it allows one per
                    # session and notices a disconnect a moment later): try again shortly.
                    response.release()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    continue
                if response.status != 200 or not response.is_event_stream:
                    # 405: the upstream offers no stream; anything else: it will not, either.
                    response.release()
                    if response.status != 405:
                        log.info("%s refused the session's GET stream: HTTP %d", self.server.name, response.status)
                    return
                # Quiet for stream_idle_timeout, or older than stream_max_duration: reconnect.
                config = self.plane.config
                chunks = response.iter_chunks(
                    idle_timeout=config.stream_idle_timeout, max_duration=config.stream_max_duration
                )
                try:
                    async for chunk in chunks:
                        for event, data in parser.feed(chunk):
                            if event in (b"", b"message"):
                                await self.deliver(data)
                                self.stream_sent += len(data)
                                worked = True
                finally:
                    await chunks.aclose()
            except _ChannelClosed:
                return
            except UpstreamTimeout as exc:
                worked = True
                log.debug("GET stream of %s ended: %s", self.server.name, exc)
            except UpstreamError as exc:
                log.info("GET stream of %s broke: %s", self.server.name, exc)
            last_id, parser = parser.last_id, EventParser(_MAX_EVENT_BYTES)
            parser.last_id = last_id  # resume after the last event seen, if the upstream keeps events
            if worked or asyncio.get_running_loop().time() - opened > 5.0:
                delay = _RECONNECT_MIN  # a stream that worked (or idled out): back at once
                continue
            await asyncio.sleep(delay)  # one that fails at once: back off
            delay = min(delay * 2, _RECONNECT_MAX)

    # -- checks while connected --------------------------------------------------------------
    def recheck(self) -> KeyEntry:
        """The key, checked again against the current snapshot (revoked, expired, suspended, server gone).

        A Refusal also closes the bridge: the connection was admitted on
        terms that no longer hold.
        """
        plane = self.plane
        snapshot = plane.store.current
        try:
            key = authenticate(snapshot, self.authorization, "proxy", verified=plane.verified, tokens=plane.tokens)
            current = snapshot.server(key.tenant_id, self.server.name)
            if current is None or not enforce.usable(snapshot, key, current):
                raise enforce.unknown_server(self.server.name)
        except Refusal as refusal:
            self.close(refusal.message, WSCloseCode.POLICY_VIOLATION)
            raise
        if self.place is not None:
            plane.session_counter.seen(key.id, self.place)  # a live connection stays counted
        return key


class Transports:
    """The bridged connections of one data plane (this process): the SSE session table and the stream pools."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.sessions: dict[str, Bridge] = {}  # SSE session id -> its bridge
        self.bridges: set[Bridge] = set()  # every open bridge, SSE and WebSocket
        self._stream_pools: dict[str, UpstreamPool] = {}
        self._tasks: set[asyncio.Task] = set()

    def _track(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def stream_pool(self, server: ServerEntry) -> UpstreamPool:
        pool = self._stream_pools.get(server.origin)
        if pool is None:
            pool = self._stream_pools[server.origin] = UpstreamPool(
                server.endpoint_url,
                max_connections=_STREAM_CONNECTIONS,
                idle_seconds=1.0,
                connect_timeout=self.plane.config.upstream_connect_timeout,
            )
        return pool

    async def _idle(self) -> None:
        """With no bridge left, close the stream pools (and the keep-alive connections a 405 or 409 left)."""
        if self.bridges:
            return
        pools, self._stream_pools = list(self._stream_pools.values()), {}
        for pool in pools:
            await pool.close()

    async def close(self) -> None:
        """End every bridged connection (DELETE upstream) and close the stream pools."""
        reason = "the gateway is shutting down"
        closing = [bridge.close(reason, WSCloseCode.GOING_AWAY) for bridge in list(self.bridges)]
        await asyncio.gather(*closing, return_exceptions=True)
        for pool in self._stream_pools.values():
            await pool.close()
        self._stream_pools.clear()

    async def handle(self, request: web.BaseRequest, name: str, endpoint: str) -> web.StreamResponse:
        """`endpoint` is "sse", "messages" or "ws"."""
        if endpoint == "messages":
            if request.method != "POST":
                return _not_allowed("POST")
            return await self.post_message(request, name)
        if request.method != "GET":
            return _not_allowed("GET")
        if endpoint == "sse":
            return await self.open_sse(request, name)
        return await self.open_websocket(request, name)

    # -- shared opening checks ---------------------------------------------------------------------
    async def _admit(self, request: web.BaseRequest, name: str) -> tuple[KeyEntry, ServerEntry]:
        """Origin, key, route and quota for an opening request, as `/servers/{name}/mcp` does them."""
        plane = self.plane
        check_origin(request.headers.get("Origin"), plane.allowed_origins)
        key = await plane._authenticate(request)
        snapshot = plane.store.current
        server = snapshot.server(key.tenant_id, name)
        if server is None or not enforce.usable(snapshot, key, server):
            raise enforce.unknown_server(name)  # also a server access rules close to this caller
        if server.transport_type != "http":
            raise Refusal(
                502, UPSTREAM_UNAVAILABLE,
                f"Server '{server.name}' uses the {server.transport_type} transport, which this endpoint cannot "
                "bridge yet",
            )
        if plane.limiter is not None:
            await plane._limit(request, key, None)
        return key, server

    def _refusal_response(self, request, started, exchange, key, server, refusal: Refusal, body=b"") -> web.Response:
        exchange.status, exchange.error_code, exchange.error = refusal.http_status, refusal.code, refusal.message
        self.plane.refusals.inc(str(refusal.code))
        payload = refusal.body(None)
        exchange.sent = len(payload)
        self.plane._record(request, started, exchange, key, server, None, body, bool(body))
        return web.Response(body=payload, status=refusal.http_status, headers=refusal.headers, content_type=_JSON)

    async def _take_place(self, key: KeyEntry) -> str | None:
        """A place for one more session of this key (a bridged connection is one), or a 429 Refusal."""
        counter = self.plane.session_counter
        if counter is None:
            return None
        ticket = await counter.admit(key.id)
        if ticket is None:
            raise _too_many_sessions(counter)
        return ticket

    def _open(self, request: web.BaseRequest, key: KeyEntry, server: ServerEntry, ticket: str | None) -> Bridge:
        def abort() -> None:
            transport = request.transport
            if transport is not None:
                transport.abort()

        bridge = Bridge(self, key, server, request.headers.get("Authorization"), abort)
        if ticket is not None:
            bridge.place = f"bridge:{ticket}"
            self.plane.session_counter.opened(key.id, ticket, bridge.place)
        self.bridges.add(bridge)
        return bridge

    async def _finish(self, request, started, exchange: _Exchange, bridge: Bridge, reason: str) -> None:
        """Tear the bridge down (even when cancelled) and record the connection's own row."""
        try:
            await asyncio.shield(bridge.close(reason))
        finally:
            if bridge.place is not None:
                self.plane.session_counter.ended(bridge.key.id, bridge.place)
            exchange.sent = bridge.stream_sent
            if exchange.error is None and bridge.reason != reason:
                exchange.error = bridge.reason
            self.plane._record(request, started, exchange, bridge.key, bridge.server, None, b"", False)

    # -- HTTP+SSE (2024-11-05) -------------------------------------------------------------------
    async def open_sse(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        started = time.perf_counter()
        exchange = _Exchange()
        key = server = None
        try:
            key, server = await self._admit(request, name)
            ticket = await self._take_place(key)
        except Refusal as refusal:
            return self._refusal_response(request, started, exchange, key, server, refusal)
        bridge = self._open(request, key, server, ticket)
        session_id = secrets.token_urlsafe(24)
        self.sessions[session_id] = bridge
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        exchange.status = 200
        try:
            await response.prepare(request)
            endpoint = f"/servers/{quote(name, safe='')}/messages?session_id={session_id}"
            await response.write(b"event: endpoint\ndata: " + endpoint.encode("ascii") + b"\n\n")
            bridge.start()
            while True:
                message = await bridge.outbox.get(_KEEPALIVE_SECONDS)
                if message is None:
                    break
                if message is TICK:
                    try:
                        bridge.recheck()
                    except Refusal:
                        continue  # closing: the outbox ends the loop
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(sse_frame(message))
            await response.write_eof()
        except ConnectionResetError:
            exchange.error = "client closed the connection"
        except asyncio.CancelledError:
            exchange.error = "client closed the connection"
            raise
        finally:
            self.sessions.pop(session_id, None)
            bridge.downstream_done.set()
            await self._finish(request, started, exchange, bridge, "client closed the connection")
        return response

    async def post_message(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        plane = self.plane
        started = time.perf_counter()
        exchange = _Exchange()
        key: KeyEntry | None = None
        bridge: Bridge | None = None
        body = b""
        try:
            check_origin(request.headers.get("Origin"), plane.allowed_origins)
            key = await plane._authenticate(request)
            session_id = request.query.get("session_id")
            bridge = self.sessions.get(session_id) if session_id else None
            if bridge is None or bridge.closed or bridge.key.id != key.id or bridge.server.name != name:
                # Unknown, ended, another key's or another server's: all look the same.
                bridge = None
                raise _session_ended(name)
            body = await plane._read_body(request)
        except Refusal as refusal:
            server = bridge.server if bridge is not None else None
            return self._refusal_response(request, started, exchange, key, server, refusal, body)
        except asyncio.CancelledError:
            exchange.status, exchange.error = CLIENT_CLOSED, "client closed the connection"
            self.plane._record(request, started, exchange, key, bridge.server, None, body, True)
            raise
        refusal = await bridge.accept(request, key, body, started)
        if refusal is not None:
            return web.Response(
                body=refusal.body(None), status=refusal.http_status, headers=refusal.headers, content_type=_JSON
            )
        return web.Response(status=202, text="Accepted")

    # -- WebSocket ----------------------------------------------------------------------------------
    async def open_websocket(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        started = time.perf_counter()
        exchange = _Exchange()
        key = server = None
        limit = self.plane.config.max_body_bytes
        ws = web.WebSocketResponse(protocols=("mcp",), max_msg_size=limit, decode_text=False)
        try:
            key, server = await self._admit(request, name)
            if not ws.can_prepare(request).ok:
                raise Refusal(
                    426, INVALID_REQUEST, "Upgrade Required: this endpoint speaks WebSocket "
                    "(send 'Connection: Upgrade' and 'Upgrade: websocket')",
                    headers={"Upgrade": "websocket", "Connection": "Upgrade"},
                )
            ticket = await self._take_place(key)
        except Refusal as refusal:
            return self._refusal_response(request, started, exchange, key, server, refusal)
        bridge = self._open(request, key, server, ticket)
        exchange.status = 101
        writer: asyncio.Task | None = None
        try:
            await ws.prepare(request)
            bridge.start()
            writer = asyncio.get_running_loop().create_task(_ws_writer(ws, bridge))
            async for frame in ws:
                if frame.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._ws_message(request, bridge, frame.data, limit)
                    if bridge.closed:
                        break
                elif frame.type == WSMsgType.ERROR:
                    # aiohttp has already sent close 1009 for a frame over max_msg_size.
                    if getattr(frame.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                        refusal = _too_large(limit)
                        await bridge._refused(request, bridge.key, None, b"", time.perf_counter(), refusal)
                        bridge.close(refusal.message, WSCloseCode.MESSAGE_TOO_BIG)
                    else:
                        exchange.error = f"websocket error: {frame.data}"
                    break
        except (asyncio.CancelledError, ConnectionResetError):
            exchange.error = "client closed the connection"
            raise
        finally:
            if writer is None:
                bridge.downstream_done.set()
            try:
                await self._finish(request, started, exchange, bridge, "client closed the connection")
            finally:
                if writer is not None:
                    # It ends once the outbox is closed, sending the close frame if the client has not.
                    await asyncio.shield(writer)
        return ws

    async def _ws_message(self, request: web.BaseRequest, bridge: Bridge, data: bytes, limit: int) -> None:
        started = time.perf_counter()
        if isinstance(data, str):  # pragma: no cover - decode_text=False gives bytes
            data = data.encode()
        try:
            key = bridge.recheck()
        except Refusal as refusal:
            await bridge._refused(request, bridge.key, None, data, started, refusal)
            return
        refusal = await bridge.accept(request, key, data, started)
        if refusal is not None and refusal.code in (PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS):
            # JSON-RPC: a message that cannot be read is answered with id null.
            try:
                await bridge.deliver(refusal.body(None))
            except _ChannelClosed:
                pass


async def _ws_writer(ws: web.WebSocketResponse, bridge: Bridge) -> None:
    try:
        while True:
            message = await bridge.outbox.get(_KEEPALIVE_SECONDS)
            if message is None:
                break
            if message is TICK:
                try:
                    bridge.recheck()
                except Refusal:
                    continue  # closing: the outbox ends the loop
                await ws.ping()  # keeps idle proxies from cutting a quiet connection
                continue
            await ws.send_frame(message, WSMsgType.TEXT)
        if not ws.closed:
            reason = (bridge.reason or "").encode("utf-8")[:120]
            await ws.close(code=bridge.close_code, message=reason)
    except ConnectionResetError:
        bridge.close("client closed the connection")
    finally:
        bridge.downstream_done.set()


def _not_allowed(allowed: str) -> web.Response:
    return web.json_response(
        {"error": f"method not allowed here; use {allowed}"}, status=405, headers={"Allow": allowed}
    )
