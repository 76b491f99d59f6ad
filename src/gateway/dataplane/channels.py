"""The gateway as an MCP client over one long-lived connection: HTTP+SSE (2024-11-05) and WebSocket.

A server whose `transport_type` is `sse` has the URL of its event stream as
`endpoint_url`; one whose `transport_type` is `websocket` has a ws:// or
wss:// URL. `SseUpstream` and `WebSocketUpstream` are drop-ins for
`UpstreamClient`, as `StdioUpstream` is: `request()` returns a result or
raises `UpstreamRpcError`, `UpstreamError` or `UpstreamTimeout`. They serve
the single-server facade (`/servers/{name}/mcp`) and `/mcp`.

What it owns: one connection per upstream, opened on first use; the
handshake (initialize, then initialized); many requests multiplexed over the
connection by the gateway's own ids; opening it again after it broke, with
exponential backoff; and closing it. Each upstream has its own
`aiohttp.ClientSession`, closed with it.

`start()` sends a request and returns it in flight (a `StreamCall`, see
multiplexed.py), for the relay to carry what the server sends before its
answer: progress (routed by its token), log messages and server-to-client
requests (sampling, elicitation, roots). Neither transport says which request
a server's request or log message belongs to: the gateway relays one only
while exactly one request is in flight on the connection, and otherwise
refuses the request (-32601, saying why) or drops the log message, as for
stdio servers. `ping` is answered by the gateway; other notifications are
dropped. The handshake announces what it relays (`RELAYED_CLIENT_CAPABILITIES`).

What it must not do: log what messages carry (methods, ids and sizes only),
buffer without bound (one SSE event or WebSocket message is capped at
`MAX_MESSAGE`; a started call holds at most `multiplexed.MAX_QUEUED`
messages), follow a redirect (the registered URL is the one used) or an SSE
`endpoint` on another origin than the stream's, or send anything of the
client's credentials (the gateway speaks as itself).

The 2024-11-05 HTTP+SSE transport: GET the event stream; its first event,
`endpoint`, names (relative to the stream's URL) where each message is to be
POSTed; answers and the server's own messages arrive on the stream as
`message` events. The upstream's session is the stream: when it ends, what
is pending fails and the next request opens a new one. WebSocket (the
`mcp` subprotocol the SDK used to serve): one JSON-RPC message per text
frame, both ways.

Like stdio servers, these speak the handshake era (2025-11-25); `era` is "legacy".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import aiohttp
import orjson
from yarl import URL

from gateway.dataplane.mcp_client import CLIENT_INFO, HANDSHAKE, RELAYED_CLIENT_CAPABILITIES, UpstreamRpcError
from gateway.dataplane.multiplexed import CallTable, RestartBackoff, StreamCall, progress_token
from gateway.dataplane.sse import EventParser
from gateway.dataplane.upstream import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.channels")

# One SSE event or one WebSocket message; a longer one breaks the connection
# (the stream cannot be trusted past it) and fails what is pending.
MAX_MESSAGE = 16 * 1024 * 1024
# WebSocket pings this often; no pong within half of it closes the connection.
HEARTBEAT = 30.0
# How long a WebSocket close handshake may take.
CLOSE_TIMEOUT = 2.0
# A connection that lived this long resets the reconnect backoff.
STABLE_AFTER = 30.0
# Messages the gateway sends unasked (answers to pings, cancellations): at
# most this many at once per connection, each within this many seconds.
_MAX_BACKGROUND_SENDS = 64
_BACKGROUND_SEND_TIMEOUT = 10.0
# Below the keep-alive timeout of common servers (uvicorn: 5 s), so a POST is
# not sent on a connection the server is closing (aiohttp never retries a POST).
_KEEPALIVE = 2.0
_USER_AGENT = f"{CLIENT_INFO['name']}/{CLIENT_INFO['version']}"
_SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
_POST_HEADERS = {"Content-Type": "application/json"}
_INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


class ChannelUpstream:
    """One MCP server behind one long-lived connection, opened on first use and again after it broke.

    Subclasses say how to open the connection (`_connect`); everything above
    the wire (ids, pending requests, handshake, backoff, close) is here.
    """

    kind = "channel"  # how messages name the transport

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        connect_timeout: float = 10.0,
        restart_backoff: tuple[float, float] = (0.1, 5.0),
        credential=None,
    ) -> None:
        """`timeout` bounds each request (and the handshake); `connect_timeout` bounds opening the connection.

        `credential` (dataplane/credentials.py): the gateway's own, presented on
        every HTTP request of the connection (the SSE stream's GET and each POST,
        the WebSocket upgrade).
        """
        self.url = url
        self.credential = credential
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.era = "legacy"  # these transports predate the 2026-07-28 stateless era
        self.server_capabilities: dict[str, Any] = {}
        self.server_info: dict[str, Any] = {}
        self.instructions: str | None = None
        self.protocol_version: str | None = None
        self.reconnects = 0
        self.label = f"the {self.kind} server {_display(url)}"
        self._ids = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None
        self._channel: _Channel | None = None
        self._channels: set[_Channel] = set()  # every one not yet shut down, for close()
        self._starting: asyncio.Future[_Channel] | None = None
        self._connected = False
        self._backoff = RestartBackoff(*restart_backoff, stable_after=STABLE_AFTER)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_display(self.url)} reconnects={self.reconnects}>"

    @property
    def connected(self) -> bool:
        """Whether a connection is open and has completed the handshake."""
        return self._channel is not None and self._channel.usable

    # -- the client interface ---------------------------------------------------------------
    async def ensure_ready(self) -> dict[str, Any]:
        """Connect and complete the handshake if needed; return the server's capabilities."""
        await self._ready()
        return self.server_capabilities

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its result or raise UpstreamRpcError / UpstreamError."""
        channel = await self._ready()
        return _result(await self._exchange(channel, method, params, self.timeout), self.label)

    async def start(self, method: str, params: dict[str, Any]) -> StreamCall:
        """Send one request and return it in flight: what the server sends for it, then its answer."""
        channel = await self._ready()
        request_id = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        channel.pending[request_id] = answer
        call = StreamCall(channel.calls, request_id, answer, progress_token(params),
                          send=partial(self._send, channel), cancel=channel.cancel_request)
        data = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        try:
            async with asyncio.timeout(self.timeout):
                await channel.send(data)
        except TimeoutError:
            call.close("timeout")  # it may have arrived
            raise UpstreamTimeout(f"{self.label} did not take {method} within {self.timeout:g}s") from None
        except UpstreamError:
            call.abandon()
            raise
        except BaseException:
            call.close()
            raise
        return call

    async def _send(self, channel: _Channel, message: dict[str, Any]) -> None:
        """Send one message on `channel` (not on a successor: an answer belongs to its connection)."""
        try:
            async with asyncio.timeout(self.timeout):
                await channel.send(orjson.dumps(message))
        except TimeoutError:
            raise UpstreamTimeout(f"{self.label} did not take a message within {self.timeout:g}s") from None

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send one notification (no answer is expected)."""
        channel = await self._ready()
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        try:
            async with asyncio.timeout(self.timeout):
                await channel.send(orjson.dumps(message))
        except TimeoutError:
            raise UpstreamTimeout(f"{self.label} did not take {method} within {self.timeout:g}s") from None

    async def close(self) -> None:
        """Close the connection, fail what is pending, close the HTTP session; idempotent."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    # -- what a transport provides ----------------------------------------------------------
    async def _connect(self, http: aiohttp.ClientSession) -> _Channel:
        """Open a connection ready to carry messages, its reader started (bounded by the caller)."""
        raise NotImplementedError

    def _adopt(self, channel: _Channel) -> _Channel:
        """Track a new connection until it has shut down (close() waits for it)."""
        self._channels.add(channel)
        return channel

    # -- one exchange -------------------------------------------------------------------------
    async def _exchange(
        self, channel: _Channel, method: str, params: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        answer = asyncio.get_running_loop().create_future()
        channel.pending[request_id] = answer
        try:
            async with asyncio.timeout(timeout):
                await channel.send(orjson.dumps(message))
                return await answer
        except TimeoutError:
            if method != "initialize":  # which must not be cancelled; the connection is closed instead
                channel.cancel_request(request_id, "timeout")
            raise UpstreamTimeout(f"{self.label} did not answer {method} within {timeout:g}s") from None
        except asyncio.CancelledError:
            channel.cancel_request(request_id, "the client went away")
            raise
        finally:
            channel.pending.pop(request_id, None)

    # -- connecting, reconnecting -------------------------------------------------------------
    async def _ready(self) -> _Channel:
        channel = self._channel
        if channel is not None and channel.usable:
            return channel
        if self._closed:
            raise UpstreamError(f"{self.label} has been closed")
        if self._starting is None:
            if channel is not None:  # it broke: the next attempt waits out the backoff
                self._channel = None
                ended = channel.ended_at or time.monotonic()
                self._backoff.failed(ended - channel.opened_at, ended)
            delay = self._backoff.wait(time.monotonic())
            self._starting = asyncio.ensure_future(self._start(delay))
            self._starting.add_done_callback(self._started)
        starting = self._starting
        try:
            # Shielded: a caller that gives up does not abandon a connection others wait for.
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if starting.cancelled() and task is not None and not task.cancelling():
                # close() stopped the attempt, not our caller: an error, not a cancellation.
                raise UpstreamError(f"{self.label} has been closed") from None
            raise

    def _started(self, task: asyncio.Future[_Channel]) -> None:
        self._starting = None
        if task.cancelled():
            return
        if task.exception() is not None:  # also marks it retrieved when no caller is left
            self._backoff.failed(None, time.monotonic())
            return
        self._channel = task.result()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=_KEEPALIVE),
                # Each request is bounded by the caller; an event stream has no total.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                headers={"User-Agent": _USER_AGENT},
                middlewares=(_refuse_redirects,) if self.credential is None else (_refuse_redirects, self._present),
            )
        return self._http

    async def _present(self, request: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
        """Client middleware: the server's credential on every request of this connection."""
        for name, value in await self.credential.headers():
            request.headers[name.decode("latin-1")] = value.decode("latin-1")
        response = await handler(request)
        if response.status == 401:
            self.credential.invalidate()  # the next connection presents a fresh token
        return response

    async def _start(self, delay: float) -> _Channel:
        if delay > 0:
            await asyncio.sleep(delay)
        if self._closed:
            raise UpstreamError(f"{self.label} has been closed")
        try:
            async with asyncio.timeout(self.connect_timeout):
                channel = await self._connect(self._session())
        except TimeoutError:
            raise UpstreamTimeout(f"{self.label} did not connect within {self.connect_timeout:g}s") from None
        if self._connected:
            self.reconnects += 1
        self._connected = True
        try:
            answer = await self._exchange(
                channel,
                "initialize",
                {"protocolVersion": HANDSHAKE, "capabilities": RELAYED_CLIENT_CAPABILITIES, "clientInfo": CLIENT_INFO},
                self.timeout,
            )
            if "error" in answer:
                raise UpstreamError(f"it refused initialize: {_error_text(answer)}")
            result = answer.get("result")
            if not isinstance(result, dict):
                raise UpstreamError("it answered initialize without a result object")
            async with asyncio.timeout(self.timeout):
                await channel.send(_INITIALIZED)
        except BaseException as exc:
            channel.fail(f"{self.label}: the handshake did not complete", quiet=True)
            if isinstance(exc, UpstreamError):
                kind = UpstreamTimeout if isinstance(exc, UpstreamTimeout) else UpstreamError
                raise kind(f"{self.label} did not start: {exc}") from None
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"{self.label} did not take initialized within {self.timeout:g}s") from None
            raise
        self.server_capabilities = result.get("capabilities") or {}
        self.server_info = result.get("serverInfo") or {}
        self.instructions = result.get("instructions")
        self.protocol_version = result.get("protocolVersion")
        log.info("connected to %s (protocol %s)", self.label, self.protocol_version)
        return channel

    async def _shut_down(self) -> None:
        starting = self._starting
        if starting is not None:
            starting.cancel()
            await asyncio.wait({starting})
        reason = f"{self.label} has been closed"
        await asyncio.gather(*(c.close(reason) for c in list(self._channels)))
        self._channel = None
        if self._http is not None:
            await self._http.close()


class SseUpstream(ChannelUpstream):
    """An MCP server on the 2024-11-05 HTTP+SSE transport: an event stream to read, an endpoint to POST to."""

    kind = "SSE"

    def __init__(self, url: str, *, max_event: int = MAX_MESSAGE, **options: Any) -> None:
        super().__init__(url, **options)
        self.max_event = max_event

    async def _connect(self, http: aiohttp.ClientSession) -> _Channel:
        try:
            response = await http.get(self.url, headers=_SSE_HEADERS, allow_redirects=False)
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(f"cannot reach {self.label}: {_describe(exc)}") from None
        try:
            if response.status != 200:
                raise UpstreamError(f"{self.label} answered the stream's GET with HTTP {response.status}")
            if response.content_type != "text/event-stream":
                raise UpstreamError(f"{self.label} answered with {response.content_type!r}, not an event stream")
        except BaseException:
            response.close()
            raise
        channel = self._adopt(_SseChannel(self.label, self._channels.discard, http, URL(self.url), response,
                                          self.max_event))
        channel.start_reading()
        try:
            # The connect timeout of our caller bounds the wait: a cancellation here fails the channel.
            await asyncio.shield(channel.endpoint)
        except BaseException:
            channel.fail(f"{self.label} announced no endpoint", quiet=True)
            raise
        return channel


class WebSocketUpstream(ChannelUpstream):
    """An MCP server on WebSocket (subprotocol `mcp`): one JSON-RPC message per text frame."""

    kind = "WebSocket"

    def __init__(
        self, url: str, *, max_message: int = MAX_MESSAGE, heartbeat: float = HEARTBEAT, **options: Any
    ) -> None:
        super().__init__(url, **options)
        self.max_message = max_message
        self.heartbeat = heartbeat

    async def _connect(self, http: aiohttp.ClientSession) -> _Channel:
        try:
            ws = await http.ws_connect(
                self.url,
                protocols=("mcp",),
                heartbeat=self.heartbeat,
                max_msg_size=self.max_message,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(f"{self.label} refused the WebSocket upgrade (HTTP {exc.status})") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(f"cannot reach {self.label}: {_describe(exc)}") from None
        if ws.protocol not in ("mcp", None):  # aiohttp accepts only what was offered; kept as a guard
            await ws.close()
            raise UpstreamError(f"{self.label} chose the subprotocol {ws.protocol!r}, not 'mcp'")
        channel = self._adopt(_WebSocketChannel(self.label, self._channels.discard, ws))
        channel.start_reading()
        return channel


# -- one connection ---------------------------------------------------------------------------
class _Broken(Exception):
    """The connection cannot be trusted any more (the reason is the message)."""


class _Channel:
    """One connection: its pending requests, its reader, and its end."""

    def __init__(self, label: str, on_finished: Callable[[_Channel], None]) -> None:
        self.label = label
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # The started calls among them, for what the server sends before answering.
        self.calls = CallTable(label, "connection", lambda: self.pending, lambda i: self.pending.pop(i, None))
        self.failure: str | None = None  # why it stopped being usable
        self.opened_at = time.monotonic()
        self.ended_at = 0.0
        self._on_finished = on_finished
        self._reader: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._shutdown: asyncio.Future[None] | None = None
        self._noise_logged = False

    @property
    def usable(self) -> bool:
        return self.failure is None

    # -- what a transport provides ----------------------------------------------------------
    async def send(self, data: bytes) -> None:
        """Deliver one serialized message; raise UpstreamError if it cannot be."""
        raise NotImplementedError

    async def _read(self) -> str:
        """Read until the connection ends, handing each message to `receive`; return why it ended."""
        raise NotImplementedError

    async def _release(self) -> None:
        """Close the connection itself (never raises)."""
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------------
    def start_reading(self) -> None:
        self._reader = asyncio.ensure_future(self._read_until_end())

    async def _read_until_end(self) -> None:
        reason = f"{self.label}: the connection was closed"
        try:
            reason = await self._read()
        except _Broken as exc:
            reason = str(exc)
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            reason = f"{self.label}: the connection broke ({_describe(exc)})"
        except Exception as exc:  # a fault here must not leave requests waiting forever
            log.exception("reading from %s failed", self.label)
            reason = f"{self.label}: reading failed ({type(exc).__name__})"
        finally:
            self.fail(reason)

    def fail(self, reason: str, *, quiet: bool = False) -> None:
        """Stop using the connection: fail what waits and close it (the next request reconnects)."""
        if self.failure is None:
            self.failure = reason
            self.ended_at = time.monotonic()
            if quiet:
                log.debug("%s", reason)
            else:
                log.warning("%s (%d requests pending)", reason, len(self.pending))
        self.calls.clear()
        pending, self.pending = self.pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(UpstreamError(reason))
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._shut_down())

    async def close(self, reason: str) -> None:
        """Fail what is pending with `reason`, close the connection, wait until it is closed."""
        self.fail(reason, quiet=True)
        await asyncio.shield(self._shutdown)

    async def _shut_down(self) -> None:
        try:
            await cancel_all([t for t in (self._reader, *self._sends) if t is not None])
            await self._release()
        finally:
            self._on_finished(self)

    # -- messages the gateway sends unasked ---------------------------------------------------
    def send_soon(self, message: dict[str, Any]) -> None:
        """Send without waiting (an answer to a ping, a cancellation); dropped if too many wait."""
        if not self.usable:
            return
        if len(self._sends) >= _MAX_BACKGROUND_SENDS:
            log.debug("%s: %d messages wait to be sent; one more dropped", self.label, len(self._sends))
            return
        task = asyncio.ensure_future(self._send_quietly(orjson.dumps(message)))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send_quietly(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(_BACKGROUND_SEND_TIMEOUT):
                await self.send(data)
        except (UpstreamError, TimeoutError) as exc:
            log.debug("%s: a message the gateway sent unasked was not delivered: %s", self.label, exc)

    def cancel_request(self, request_id: int, reason: str) -> None:
        """Tell the server to stop working on a request nobody waits for any more."""
        self.pending.pop(request_id, None)
        self.send_soon({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": request_id, "reason": reason}})

    # -- messages received --------------------------------------------------------------------
    def receive(self, data: bytes | str) -> None:
        """Act on one received message (a JSON-RPC message or a batch of them)."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._log_noise(len(data))
            return
        messages = message if isinstance(message, list) else (message,)  # a list: a batch (2025-03-26)
        if not all([self._dispatch(m) for m in messages]):
            self._log_noise(len(data))

    def _dispatch(self, message: Any) -> bool:
        """Act on one message; False if it is not a JSON-RPC message at all."""
        if not isinstance(message, dict):
            return False
        method = message.get("method")
        if method is None:
            request_id = message.get("id")
            answer = self.pending.pop(request_id, None) if type(request_id) is int else None
            if answer is not None:
                if not answer.done():
                    answer.set_result(message)
            elif request_id is None and isinstance(message.get("error"), dict):
                # The server could not read something we sent (a parse error has no id).
                error = message["error"]
                log.warning("%s reported an error for no request: %s %.200s",
                            self.label, error.get("code"), error.get("message"))
            else:
                # Late (after a timeout), or an id that is not ours.
                log.debug("%s answered request %r, which nobody waits for", self.label, request_id)
            return "result" in message or "error" in message
        if not isinstance(method, str):
            return False
        if "id" not in message:
            if not self.calls.notification(method, message):
                log.debug("%s sent notification %s (dropped)", self.label, method)
        elif method == "ping":
            self.send_soon({"jsonrpc": "2.0", "id": message["id"], "result": {}})
        else:
            refusal = self.calls.request(method, message)
            if refusal is not None:
                self.send_soon(refusal)
        return True

    def _log_noise(self, size: int) -> None:
        if not self._noise_logged:  # once per connection: the contents are not logged anyway
            self._noise_logged = True
            log.warning("%s sent a message that is not JSON-RPC (%d bytes, skipped)", self.label, size)


class _SseChannel(_Channel):
    """The event stream of one 2024-11-05 session, and the endpoint its messages are POSTed to."""

    def __init__(
        self,
        label: str,
        on_finished: Callable[[_Channel], None],
        http: aiohttp.ClientSession,
        stream_url: URL,
        response: aiohttp.ClientResponse,
        max_event: int,
    ) -> None:
        super().__init__(label, on_finished)
        self._http = http
        self._stream_url = stream_url
        self._response = response
        self.max_event = max_event
        self._parser = EventParser(max_event)
        self.endpoint: asyncio.Future[URL] = asyncio.get_running_loop().create_future()

    def fail(self, reason: str, *, quiet: bool = False) -> None:
        if not self.endpoint.done():
            self.endpoint.set_exception(UpstreamError(reason))
            self.endpoint.exception()  # retrieved: nobody may be waiting any more
        super().fail(reason, quiet=quiet)

    async def send(self, data: bytes) -> None:
        if self.failure is not None:
            raise UpstreamError(self.failure)
        try:
            async with self._http.post(
                self.endpoint.result(), data=data, headers=_POST_HEADERS, allow_redirects=False
            ) as response:
                status = response.status
        except (aiohttp.ClientError, OSError) as exc:
            # Not a reason to drop the stream: if the server is gone, the stream says so.
            raise UpstreamError(f"{self.label}: cannot post a message ({_describe(exc)})") from None
        if status in (404, 410):
            reason = f"{self.label} no longer knows this session (HTTP {status} to a POST)"
            self.fail(reason)
            raise UpstreamError(reason)
        if not 200 <= status < 300:
            raise UpstreamError(f"{self.label} refused a message with HTTP {status}")

    async def _read(self) -> str:
        content = self._response.content
        parser = self._parser
        while True:
            chunk = await content.readany()
            if not chunk:
                return f"{self.label} ended its event stream"
            try:
                events = parser.feed(chunk)
            except UpstreamError as exc:  # an event past the size bound
                raise _Broken(f"{self.label}: {exc}") from None
            for event, data in events:
                self._event(event or b"message", data)

    def _event(self, event: bytes, data: bytes) -> None:
        if len(data) > self.max_event:
            # The parser checks its bound once per chunk; an event completed within
            # one chunk is checked here, so the bound does not depend on chunking.
            raise _Broken(f"{self.label}: an SSE event exceeds {self.max_event} bytes")
        if event == b"message":
            if data:  # an empty one is a keep-alive some servers send
                self.receive(data)
        elif event == b"endpoint":
            if self.endpoint.done():
                log.debug("%s announced its endpoint again (ignored)", self.label)
                return
            try:
                url = endpoint_url(self._stream_url, data)
            except ValueError as exc:
                raise _Broken(f"{self.label} announced an endpoint the gateway will not use: {exc}") from None
            self.endpoint.set_result(url)
        else:
            log.debug("%s sent an event of type %.40r (ignored)", self.label, event)

    async def _release(self) -> None:
        self._response.close()  # an event stream never ends by itself: close the connection


class _WebSocketChannel(_Channel):
    """One WebSocket connection: one JSON-RPC message per text frame."""

    def __init__(
        self, label: str, on_finished: Callable[[_Channel], None], ws: aiohttp.ClientWebSocketResponse
    ) -> None:
        super().__init__(label, on_finished)
        self._ws = ws

    async def send(self, data: bytes) -> None:
        if self.failure is not None:
            raise UpstreamError(self.failure)
        try:
            # orjson writes UTF-8: the bytes go out as a text frame as they are.
            await self._ws.send_frame(data, aiohttp.WSMsgType.TEXT)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            raise UpstreamError(f"{self.label}: cannot send a message ({_describe(exc)})") from None

    async def _read(self) -> str:
        ws = self._ws
        binary_logged = False
        while True:
            message = await ws.receive()
            kind = message.type
            if kind is aiohttp.WSMsgType.TEXT:
                self.receive(message.data)
            elif kind is aiohttp.WSMsgType.BINARY:
                if not binary_logged:
                    binary_logged = True
                    log.warning("%s sent a binary frame (%d bytes, skipped): MCP messages are text",
                                self.label, len(message.data))
            elif kind is aiohttp.WSMsgType.ERROR:
                raise _Broken(f"{self.label}: the WebSocket broke ({_describe(message.data)}, "
                              f"close code {ws.close_code})")
            else:  # CLOSE, CLOSING, CLOSED
                return f"{self.label} closed the WebSocket (code {ws.close_code})"

    async def _release(self) -> None:
        try:
            await self._ws.close()  # bounded by ws_close
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            log.debug("%s: the close handshake failed: %s", self.label, exc)


# -- the SSE endpoint ------------------------------------------------------------------------
def endpoint_url(stream: URL, data: bytes) -> URL:
    """The URL an SSE `endpoint` event names, resolved against the stream's; ValueError if on another origin."""
    text = data.decode("utf-8").strip()
    if not text:
        raise ValueError("it is empty")
    url = stream.join(URL(text))
    if url.scheme not in ("http", "https") or not url.host or url.origin() != stream.origin():
        raise ValueError(f"it is not on the stream's origin {stream.origin()} (it is on {_origin_text(url)})")
    return url


# -- helpers ----------------------------------------------------------------------------------
class _Redirected(aiohttp.ClientError):
    """The upstream answered with a redirect, which the gateway does not follow."""


async def _refuse_redirects(request: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
    # The registered URL is the one the gateway talks to. A WebSocket upgrade
    # has no allow_redirects switch, so this is checked for every request here.
    response = await handler(request)
    if 300 <= response.status < 400 and "Location" in response.headers:
        response.close()
        raise _Redirected(f"it answered HTTP {response.status}, a redirect (not followed)")
    return response


def _display(url: str) -> str:
    """A URL as messages show it: no user information, no query (either may carry a secret)."""
    try:
        parsed = URL(url)
        return str(parsed.with_user(None).with_query(None).with_fragment(None)) if parsed.host else "?"
    except (ValueError, TypeError):
        return "?"


def _origin_text(url: URL) -> str:
    try:
        return str(url.origin())
    except ValueError:
        return "no origin"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _error_text(answer: dict[str, Any]) -> str:
    error = answer.get("error")
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _result(answer: dict[str, Any], label: str) -> dict[str, Any]:
    if "error" in answer:
        error = answer["error"]
        raise UpstreamRpcError(error if isinstance(error, dict) else {"code": -32603, "message": str(error)})
    result = answer.get("result")
    if not isinstance(result, dict):
        raise UpstreamError(f"{label} answered without a result object")
    return result
