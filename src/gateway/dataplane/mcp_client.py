"""The gateway as an MCP client of one upstream, for answers the gateway composes itself.

`/servers/{name}/mcp` relays bytes and needs none of this. The aggregate
endpoint (`/mcp`) does: it lists every server's tools and calls them on the
client's behalf, so it must speak each upstream's era.

- Era: detected once per upstream with `server/discover` (2026-07-28); an
  upstream that does not answer it speaks the handshake era. Cached here.
- 2026-07-28 upstreams get stateless requests with the `_meta` envelope and
  the `Mcp-Method`/`Mcp-Name` headers; nothing to hold.
- Handshake-era upstreams get one session per upstream and gateway process,
  opened on first use (initialize + initialized) and opened again when the
  upstream says it has ended (404). Request ids are the gateway's own, unique
  per session, so concurrent clients sharing the session never collide.

The client's credentials are never sent: the gateway speaks as itself, with
the server's own credential when one is configured (`credential`).

Traced (`tracer`, tracing.py; None when tracing is off): every POST carries
the current span as `traceparent` (the `upstream` span of a `/mcp` call, a
health probe's), and each message's HTTP status is noted on it. Outside such
a span nothing is added.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
from typing import Any

import orjson

from gateway.dataplane.sse import EventParser
from gateway.dataplane.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
CLIENT_INFO = {"name": "mcp-gateway", "version": "0.1.0"}
_ACCEPT = "application/json, text/event-stream"
# What the gateway announces to upstreams as a client: it relays these to its own clients.
RELAYED_CLIENT_CAPABILITIES: dict[str, Any] = {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {}}
MAX_EVENT_BYTES = 16 * 1024 * 1024
# Fire-and-forget cancellations, held until they finish.
_BACKGROUND: set[asyncio.Future] = set()
_NAME_FIELDS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class UpstreamUnauthorized(UpstreamConnectError):
    """The upstream refused the gateway's credential (HTTP 401 or 403): no answer to judge the call by."""


class UpstreamRpcError(Exception):
    """The upstream answered with a JSON-RPC error (passed on to the client as it is)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "upstream error"))
        self.error = error


def header_value(text: str) -> str:
    """A header-safe form of a name: as it is if visible ASCII, else the spec's base64 form."""
    if text.isascii() and text.isprintable():
        return text
    return "=?base64?" + base64.b64encode(text.encode()).decode("ascii") + "?="


def parse_answer(body: bytes, content_type: bytes, request_id: int) -> dict[str, Any]:
    """The JSON-RPC response to `request_id` in a JSON or SSE body."""
    if content_type.startswith(b"text/event-stream"):
        for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if not data:
                continue
            message = orjson.loads(data)
            if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
                return message
        raise UpstreamError("the upstream's event stream ended without an answer")
    message = orjson.loads(body)
    if not isinstance(message, dict):
        raise UpstreamError("the upstream answered with something that is not a JSON-RPC response")
    return message


class UpstreamClient:
    def __init__(self, pool: UpstreamPool, target: str, *, timeout: float, credential=None, tracer=None) -> None:
        self.pool = pool
        self.target = target
        self.timeout = timeout
        # The gateway's own credential for this upstream (dataplane/credentials.py), sent on every request.
        self.credential = credential
        # Spans (tracing.py): the current one is sent as `traceparent`; None: tracing off.
        self.tracer = tracer
        self.era: str | None = None  # "modern" or "legacy", once known
        # For a modern upstream: whether it also takes a 2025-era handshake (None: not probed yet).
        self.accepts_handshake: bool | None = None
        self.server_capabilities: dict[str, Any] = {}
        self.server_info: dict[str, Any] = {}
        self.instructions: str | None = None
        self._session_id: str | None = None
        self._ids = itertools.count(1)
        self._opening: asyncio.Lock = asyncio.Lock()

    async def detect(self) -> str:
        """The upstream's era ("modern" or "legacy"), asked once and then remembered."""
        if self.era is None:
            await self._detect()
        return self.era  # type: ignore[return-value]

    async def probe_handshake(self) -> bool:
        """Whether a modern upstream also serves 2025-era clients; asked once.

        An initialize is sent; a session it opens is ended at once with DELETE.
        """
        if self.accepts_handshake is not None:
            return self.accepts_handshake
        async with self._opening:
            if self.accepts_handshake is None:
                params = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": CLIENT_INFO}
                try:
                    status, answer = await self._exchange("initialize", params, [], keep_session=False)
                    self.accepts_handshake = status < 400 and answer is not None and "result" in answer
                except UpstreamError:
                    self.accepts_handshake = False
        return self.accepts_handshake

    async def ensure_ready(self) -> dict[str, Any]:
        """Detect the era and open a session if one is needed; return the server's capabilities."""
        if self.era is None:
            await self._detect()
        if self.era == "legacy" and self._session_id is None:
            await self._open_legacy_session()
        return self.server_capabilities

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its result or raise UpstreamRpcError / UpstreamError."""
        if self.era is None:
            await self._detect()
        if self.era == "modern":
            return await self._modern(method, params or {})
        for attempt in (0, 1):
            if self._session_id is None:
                await self._open_legacy_session()
            status, answer = await self._exchange(method, params or {}, self._legacy_headers(method))
            if status == 404 and attempt == 0:
                self._session_id = None  # the upstream ended the session; open a new one once
                continue
            return _result(answer, status)
        raise AssertionError("unreachable")

    async def _modern(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        params, headers = self._modern_envelope(method, params)
        status, answer = await self._exchange(method, params, headers)
        return _result(answer, status)

    def _modern_envelope(
        self, method: str, params: dict[str, Any]
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        params = dict(params)
        meta = dict(params.get("_meta") or {})
        meta.setdefault("io.modelcontextprotocol/protocolVersion", MODERN)
        # The gateway relays sampling, elicitation and roots (as input requests) to its clients.
        meta.setdefault("io.modelcontextprotocol/clientCapabilities", RELAYED_CLIENT_CAPABILITIES)
        meta.setdefault("io.modelcontextprotocol/clientInfo", CLIENT_INFO)
        params["_meta"] = meta
        headers = [("MCP-Protocol-Version", MODERN), ("Mcp-Method", method)]
        field = _NAME_FIELDS.get(method)
        if field is not None and isinstance(params.get(field), str):
            headers.append(("Mcp-Name", header_value(params[field])))
        return params, headers

    def _legacy_headers(self, method: str) -> list[tuple[str, str]]:
        headers = [("MCP-Protocol-Version", HANDSHAKE)]
        if self._session_id:
            headers.append(("Mcp-Session-Id", self._session_id))
        return headers

    async def _send(
        self, method: str, params: dict[str, Any] | None, headers: list[tuple[str, str]], *, notify: bool = False
    ) -> tuple[int, UpstreamResponse]:
        """POST one message; return its id and the response once its headers are in."""
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if not notify:
            message["id"] = request_id
        if params is not None:
            message["params"] = params
        response = await self._post(orjson.dumps(message), headers)
        if self.tracer is not None:
            self.tracer.upstream_status(response.status)  # the last message of a call is the call itself
        return request_id, response

    async def _post(self, body: bytes, headers: list[tuple[str, str]]) -> UpstreamResponse:
        all_headers = [("Content-Type", "application/json"), ("Accept", _ACCEPT), *headers]
        encoded = [(n.encode("latin-1"), v.encode("utf-8")) for n, v in all_headers]
        if self.credential is not None:
            encoded += await self.credential.headers()
        if self.tracer is not None:
            self.tracer.inject(encoded)
        framed = self.pool.encode_request("POST", self.target, encoded, body)
        response = await self.pool.request(framed, timeout=self.timeout)
        if response.status == 401 and self.credential is not None:
            self.credential.invalidate()  # the next request presents a fresh token
        return response

    async def _exchange(
        self,
        method: str,
        params: dict[str, Any] | None,
        headers: list[tuple[str, str]],
        *,
        notify: bool = False,
        keep_session: bool = True,
    ) -> tuple[int, dict[str, Any] | None]:
        request_id, response = await self._send(method, params, headers, notify=notify)
        content = await _read(response, self.timeout)
        if method == "initialize":
            sid = response.header(b"mcp-session-id")
            if keep_session:
                self._session_id = sid.decode("latin-1") if sid else None
            elif sid:
                await self._end_session(sid)
        if notify or not content:
            return response.status, None
        try:
            return response.status, parse_answer(content, response.content_type, request_id)
        except (orjson.JSONDecodeError, UpstreamError) as exc:
            if response.status in (401, 403):
                _result(None, response.status)  # raises UpstreamUnauthorized
            if response.status >= 400:
                raise UpstreamError(f"the upstream answered HTTP {response.status}") from None
            raise UpstreamError(f"unreadable answer to {method}: {exc}") from None

    # -- calls that stream ----------------------------------------------------------------------
    async def start(self, method: str, params: dict[str, Any]) -> UpstreamCall:
        """Send one request and return it in flight, to read what the upstream sends before its answer."""
        if self.era is None:
            await self._detect()
        if self.era == "modern":
            params, headers = self._modern_envelope(method, params)
            request_id, response = await self._send(method, params, headers)
            return UpstreamCall(self, request_id, response, None)
        for attempt in (0, 1):
            if self._session_id is None:
                await self._open_legacy_session()
            session_id = self._session_id
            request_id, response = await self._send(method, params, self._legacy_headers(method))
            if response.status == 404 and attempt == 0:
                await _read(response, self.timeout)
                if self._session_id == session_id:
                    self._session_id = None  # the upstream ended the session; open a new one once
                continue
            return UpstreamCall(self, request_id, response, session_id)
        raise AssertionError("unreachable")

    async def reply(self, message: dict[str, Any], session_id: str | None) -> None:
        """Send a response to a server-to-client request (2025 era: POSTed on the session, answered 202)."""
        headers = [("MCP-Protocol-Version", HANDSHAKE)]
        if session_id:
            headers.append(("Mcp-Session-Id", session_id))
        response = await self._post(orjson.dumps(message), headers)
        await _read(response, self.timeout)
        if response.status >= 400:
            raise UpstreamError(f"the upstream refused the client's answer with HTTP {response.status}")

    async def cancel(self, request_id: int, session_id: str | None, reason: str) -> None:
        """Tell a 2025-era upstream to stop working on a request (closing its stream does not)."""
        message = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": request_id, "reason": reason}}
        try:
            await self.reply(message, session_id)
        except (UpstreamError, OSError):
            pass  # best effort: the answer, if it comes, goes nowhere

    async def _end_session(self, session_id: bytes) -> None:
        headers = [(b"MCP-Protocol-Version", HANDSHAKE.encode()), (b"Mcp-Session-Id", session_id)]
        try:
            if self.credential is not None:
                headers += await self.credential.headers()
            framed = self.pool.encode_request("DELETE", self.target, headers, None)
            response = await self.pool.request(framed, timeout=self.timeout)
            await asyncio.wait_for(response.read(), self.timeout)
        except (UpstreamError, asyncio.TimeoutError):
            pass  # the upstream will expire it

    async def _detect(self) -> None:
        async with self._opening:
            if self.era is not None:
                return
            try:
                answer = await self._modern("server/discover", {})
            except (UpstreamConnectError, UpstreamTimeout):
                raise  # no answer at all says nothing about the era: ask again next time
            except (UpstreamRpcError, UpstreamError):
                answer = None  # refused or not understood: a 2025-era server
            if answer is not None and MODERN in answer.get("supportedVersions", []):
                self.era = "modern"
                self.server_capabilities = answer.get("capabilities", {})
                self.server_info = (answer.get("_meta") or {}).get("io.modelcontextprotocol/serverInfo") or {}
                self.instructions = answer.get("instructions")
            else:
                self.era = "legacy"

    async def _open_legacy_session(self) -> None:
        async with self._opening:
            if self._session_id is not None:
                return
            status, answer = await self._exchange(
                "initialize",
                {"protocolVersion": HANDSHAKE, "capabilities": RELAYED_CLIENT_CAPABILITIES, "clientInfo": CLIENT_INFO},
                [],
            )
            result = _result(answer, status)
            self.server_capabilities = result.get("capabilities", {})
            self.server_info = result.get("serverInfo") or {}
            self.instructions = result.get("instructions")
            await self._exchange(
                "notifications/initialized", None, self._legacy_headers("notifications/initialized"), notify=True
            )


class UpstreamCall:
    """One request in flight to an HTTP upstream: what it sends before its answer, then the answer.

    A JSON body is the answer alone. An SSE body may first carry notifications
    (progress, log messages) and server-to-client requests (sampling,
    elicitation, roots, ping), which the caller answers with `reply`; the
    response to our request comes last. Reading waits as long as the caller
    says: a call paused on its client's input may sit idle for minutes.
    """

    def __init__(self, client: UpstreamClient, request_id: int, response: UpstreamResponse, session_id: str | None):
        self.client = client
        self.request_id = request_id
        self.session_id = session_id
        self.status = response.status
        self.answered = False
        self._response = response
        self._parser = EventParser(MAX_EVENT_BYTES) if response.is_event_stream else None
        self._queue: collections.deque[dict[str, Any]] = collections.deque()

    async def next(self, timeout: float | None) -> dict[str, Any]:
        """The next message of this call; the answer (our id, no method) is the last."""
        while not self._queue:
            if self._parser is None:
                content = await _read(self._response, timeout)
                try:
                    message = orjson.loads(content)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"the upstream answered HTTP {self.status} with no JSON-RPC message") from None
                if not isinstance(message, dict):
                    raise UpstreamError("the upstream answered with something that is not a JSON-RPC response")
                self._queue.append(message)
                break
            chunk = await self._response.next_chunk(timeout)
            if chunk is None:
                raise UpstreamError("the upstream's event stream ended without an answer")
            for _event, data in self._parser.feed(chunk):
                try:
                    message = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError("the upstream sent an event that is not JSON") from None
                if isinstance(message, dict):
                    self._queue.append(message)
        message = self._queue.popleft()
        if "method" not in message and message.get("id") == self.request_id:
            self.answered = True
            self._response.release()
        return message

    async def reply(self, message: dict[str, Any]) -> None:
        """Answer a server-to-client request of this call."""
        await self.client.reply(message, self.session_id)

    def close(self, reason: str = "the client went away") -> None:
        """Stop reading; an unanswered call is cancelled upstream (closing a 2026-07-28 stream is enough)."""
        self._response.release()
        if not self.answered:
            self.answered = True
            if self.client.era == "legacy":
                task = asyncio.ensure_future(self.client.cancel(self.request_id, self.session_id, reason))
                _BACKGROUND.add(task)
                task.add_done_callback(_BACKGROUND.discard)


async def _read(response: UpstreamResponse, timeout: float | None) -> bytes:
    """The whole body; on timeout the exchange is abandoned (its connection closed, not reused)."""
    try:
        return await asyncio.wait_for(response.read(), timeout)
    except asyncio.TimeoutError:
        response.release()
        raise UpstreamTimeout(f"the answer's body did not arrive within {timeout:g}s") from None


def _result(answer: dict[str, Any] | None, status: int) -> dict[str, Any]:
    if status in (401, 403):
        # Not an answer about the method (nor about the era): the gateway's own credential is missing or refused.
        raise UpstreamUnauthorized(
            f"the upstream refused the gateway's credentials (HTTP {status}); check the server's auth setting"
        )
    if answer is None:
        raise UpstreamError(f"the upstream answered HTTP {status} with no JSON-RPC message")
    if "error" in answer:
        if not isinstance(answer["error"], dict):  # an HTTP-level error body, not JSON-RPC
            raise UpstreamError(f"the upstream answered HTTP {status}: {str(answer['error'])[:200]}")
        raise UpstreamRpcError(answer["error"])
    result = answer.get("result")
    if not isinstance(result, dict):
        raise UpstreamError("the upstream's answer has no result object")
    return result
