"""The data plane's HTTP endpoints and the request pipeline behind them.

`/servers/{server_name}/mcp` runs one fixed pipeline, built once:
client address (deny list, bans, per-address bucket) -> authenticate
(snapshot) -> route (snapshot) -> read and parse the body -> rate-limit tiers
(limits/limiter.py: key quotas, user by role, tenant, global through the fair
queue) -> forward (pooled upstream connection) ->
record (one `request_logs` row, and for an authenticated caller one
`audit_logs` row, into the writer's queue). Each stage either
hands on or stops the request with a `Refusal`; nothing on this path touches
the database or Redis.

The answer streams back unchanged: a JSON body whole, an SSE body chunk by
chunk as the upstream sends it. The client's credentials are never sent
upstream; hop-by-hop headers stay on their own hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from gateway._fast.ids import RowIds as _RowIds  # ids of request log rows and audit entries
from gateway._fast.ids import utc_now  # their time (datetime.now(timezone.utc), built at C level)
from gateway._fast.auditentry import mcp_row as _mcp_row  # AuditTrail.mcp_row's builder
from gateway._fast.intake import CallRecorder  # a request's rows, queued in the writer's lanes
from gateway.auth.authenticate import VerifiedKeys, authenticate, authenticate_request
from gateway.config import DataPlaneConfig
from gateway.dataplane import enforce
from gateway.dataplane.aggregate import Aggregate
from gateway.dataplane.channels import ChannelUpstream, SseUpstream, WebSocketUpstream
from gateway.dataplane.credentials import CredentialUnavailable, UpstreamCredentials
from gateway.dataplane.jsonrpc import (
    FORBIDDEN,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
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
from gateway.dataplane.mcp_client import UpstreamClient
from gateway.dataplane.protocol import check_message, check_origin
from gateway.dataplane.relay import Downstream
from gateway.dataplane.sessions import SessionSealer
from gateway.dataplane.sse import sse_frame
from gateway.dataplane.watch import KINDS as WATCHED
from gateway.dataplane.watch import Listener, Watcher
from gateway.dataplane.stdio import StdioUpstream
from gateway.dataplane.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamStopped,
    UpstreamTimeout,
)
from gateway.dataplane.guard import SAFE_METHODS, Ticket, UpstreamGuard
from gateway.limits.limiter import Limited, Limiter
from gateway.limits.sessions import SessionCounter
from gateway.records.audit import AuditTrail, McpDetails
from gateway.records.metrics import METHOD_LABELS, Registry, tenant_names
from gateway.netaddr import is_ip, networks, within
from gateway.snapshot import KeyEntry, ServerEntry, SnapshotStore

if TYPE_CHECKING:
    from gateway.auth.key_usage import KeyUsage
    from gateway.auth.oidc import TokenVerifier
    from gateway.tracing import RequestTracer

log = logging.getLogger("gateway.dataplane")

# Never forwarded upstream: the client's credentials (the gateway speaks to
# upstreams with its own), hop-by-hop headers, and what the pool sets itself.
_REQUEST_HEADERS_DROPPED = frozenset(
    {
        b"authorization", b"proxy-authorization", b"cookie", b"host", b"content-length", b"connection",
        b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"proxy-connection", b"expect",
        b"origin", b"accept-encoding", b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
        b"x-forwarded-proto",
    }
)
_RESPONSE_HEADERS_DROPPED = frozenset(
    {
        b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"trailer",
        b"upgrade", b"proxy-connection", b"date", b"server", b"set-cookie",
    }
)
_JSON = "application/json"
# How a rate-limit refusal names the tier that refused.
_TIER_NAMES = {
    "ip": "this address", "anonymous": "this address without valid credentials", "api_key": "this API key",
    "user": "this user's role", "tenant": "this tenant's share of the gateway", "global": "the gateway",
}
# Transports the gateway reaches over one long-lived connection (channels.py).
_CHANNEL_UPSTREAMS: dict[str, type[ChannelUpstream]] = {"sse": SseUpstream, "websocket": WebSocketUpstream}
# Servers answered by the single-server facade, and how refusals describe each.
_FACADE_TRANSPORTS = {"stdio": "stdio", "sse": "the 2024-11-05 HTTP+SSE transport", "websocket": "WebSocket"}
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
# A quiet list-change stream gets a comment this often (and its key is checked again).
_KEEPALIVE_SECONDS = 15.0
# Status recorded for a request whose client left before any answer (as nginx logs it).
CLIENT_CLOSED = 499
# What a safe call may be retried after (dataplane/guard.py): the upstream was not reached or broke
# the exchange, or said it cannot answer now. Never a timeout: the call may have run.
_RETRYABLE_CODES = frozenset({UPSTREAM_UNAVAILABLE, UPSTREAM_BAD_RESPONSE})
_RETRYABLE_STATUSES = frozenset({502, 503, 504})


def _retry_safe(call: Call | None, tool: str | None, snapshot, server: ServerEntry) -> bool:
    """Whether a call may be sent twice: a list call, or a tool `server` marks read-only or idempotent."""
    if call is None or call.is_batch:
        return False
    if call.method in SAFE_METHODS:
        return True
    return tool is not None and tool in snapshot.safe_tools.get(server.id, ())


class DataPlane:
    def __init__(
        self,
        config: DataPlaneConfig,
        store: SnapshotStore,
        writer,
        metrics: Registry,
        *,
        limiter: Limiter | None,
        sessions: SessionSealer,
        session_counter: SessionCounter | None = None,
        tokens: TokenVerifier | None = None,
        ready=lambda: True,
        credentials: UpstreamCredentials | None = None,
        key_usage: KeyUsage | None = None,
        guard: UpstreamGuard | None = None,
        audit: AuditTrail | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        # Spans of proxied requests (tracing.py); None: tracing off, and one `is None` check a stage.
        self.tracer = tracer
        # An audit entry per authenticated request (records/audit.py); None: [audit] enabled = false.
        self.audit = audit
        # Breakers, routing, per-upstream queues and retries (None: calls go out unguarded).
        self.guard = guard
        # The gateway's own credentials for upstreams (per server, opened from the snapshot).
        self.credentials = credentials if credentials is not None else UpstreamCredentials(None)
        # Keys seen in use (last_used_at, flushed in the background); None: not recorded.
        self.key_usage = key_usage
        # Relayed event streams of API-key callers: upstream exchange -> (Authorization, server name).
        self._open_streams: dict[UpstreamResponse, tuple[str | None, str]] = {}
        # Configured JWT issuers (None: API keys only, and no protected-resource metadata).
        self.tokens = tokens
        self.sessions = sessions
        # Open sessions per key (None or max_per_key 0: not counted).
        self.session_counter = session_counter if session_counter is not None and session_counter.enabled else None
        self.config = config
        self.store = store
        self.writer = writer
        # The rate-limit tiers (None: [limits] enabled = false).
        self.limiter = limiter
        self._trusted_proxies = networks(config.trusted_proxies, "trusted_proxies")
        self.ready = ready
        self.pools: dict[str, UpstreamPool] = {}
        self.clients: dict = {}
        # Upstream processes the gateway runs for stdio servers, by server id.
        self.stdio_clients: dict[uuid.UUID, StdioUpstream] = {}
        # Connections the gateway holds to SSE (2024-11-05) and WebSocket servers, by server id.
        self.channel_clients: dict[uuid.UUID, ChannelUpstream] = {}
        self._closing: set[asyncio.Task] = set()
        # (server id, endpoint, modern client?) -> whether the facade must translate between eras.
        self._era_gaps: dict[tuple[uuid.UUID, str, bool], bool] = {}
        # Imported here: bridge.py builds on this module.
        from gateway.dataplane.bridge import Transports

        self.transports = Transports(self)
        self.aggregate = Aggregate(
            self.client_for, timeout=config.upstream_timeout, page_size=config.aggregate_page_size,
            max_duration=config.stream_max_duration,
        )
        self.aggregate.guard = guard
        self.aggregate.tracer = tracer
        self.watcher = Watcher(self.aggregate, store, interval=config.list_watch_interval)
        self.allowed_origins = frozenset(config.allowed_origins)
        self.verified = VerifiedKeys()
        self._ids = _RowIds()
        if audit is not None:
            audit.new_id = self._ids.next  # ids drawn like request logs' (no syscall per id)
        # Each request's rows (`_record`): AuditTrail.mcp_row's row made by the compiled builder.
        self._calls = CallRecorder(writer.intake, self._ids.next, _mcp_row, McpDetails)
        self._calls.audit = audit is not None
        self._operational = {
            "/healthz": self.handle_healthz,
            "/readyz": self.handle_readyz,
            "/metrics": self.handle_metrics,
        }
        if tokens is not None:
            self._operational[tokens.metadata_path] = self.handle_resource_metadata
        self.metrics = metrics
        # Counted by the tenant's id, named at scrape time; a server's name is its tenant's own.
        named = {"tenant": tenant_names(lambda: store.current.tenants)}
        self.requests = metrics.counter(
            "gateway_requests_total", "MCP requests by tenant, server, method and outcome (HTTP status)",
            ("tenant", "server", "method", "status"), named,
        )
        self.refusals = metrics.counter(
            "gateway_refusals_total", "Requests the gateway refused itself, by reason", ("reason",)
        )
        self.limited = metrics.counter(
            "gateway_rate_limited_total", "Requests refused by a rate-limit tier, by tier", ("tier",)
        )
        self.admitted = metrics.counter(
            "gateway_rate_limit_admitted_total", "Requests every rate-limit tier of their principal admitted"
        )
        self.latency = metrics.histogram(
            "gateway_request_duration_seconds", "Time from request to the end of the answer, by tenant and server",
            ("tenant", "server"), named,
        )
        metrics.gauge(
            "gateway_upstream_connections",
            "Upstream connections by origin and state",
            lambda: [((origin, "open"), p.open_connections) for origin, p in self.pools.items()]
            + [((origin, "idle"), p.idle_connections) for origin, p in self.pools.items()],
            ("origin", "state"),
        )

    # -- wiring ----------------------------------------------------------------------
    def wrap_operational(self, path: str, wrapper) -> None:
        """Serve an operational path (`/metrics`, `/healthz`) through `wrapper(handler)` (workers.py)."""
        self._operational[path] = wrapper(self._operational[path])

    def build_server(self) -> web.Server:
        """aiohttp's low-level server with our own dispatch.

        Why not `web.Application`: its router, match-info and middleware
        machinery cost about 7% of a proxied request here, for five fixed
        paths that a few string comparisons resolve.
        """
        limit = self.config.max_body_bytes

        def make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
            # client_max_size makes aiohttp refuse larger bodies while reading
            # them, even without a Content-Length (chunked uploads).
            return web.BaseRequest(
                message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=limit
            )

        # handler_cancellation: a client that goes away cancels its request, so
        # the upstream exchange (and, in the modern era, the call) is cancelled too.
        return web.Server(self.dispatch, request_factory=make_request, handler_cancellation=True, access_log=None)

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        if path.startswith("/servers/"):
            name, sep, rest = path[9:].partition("/")
            if name and sep and rest == "mcp":
                if method == "POST":
                    return await self._proxy(request, name, with_body=True)
                if method in ("GET", "DELETE"):
                    # GET opens a legacy server-to-client SSE stream; DELETE ends a legacy session.
                    return await self._proxy(request, name, with_body=False)
                return _not_allowed("POST, GET, DELETE")
            if name and sep and rest in ("sse", "messages", "ws"):
                # The 2024-11-05 HTTP+SSE and WebSocket transports, bridged to Streamable HTTP.
                return await self.transports.handle(request, name, rest)
        elif path == "/mcp":
            if method == "POST":
                return await self._proxy(request, None, with_body=True, aggregate=True)
            if method in ("GET", "DELETE"):
                return await self._proxy(request, None, with_body=False, aggregate=True)
            return _not_allowed("POST")
        elif path in self._operational:
            if method != "GET":
                return _not_allowed("GET")
            return await self._operational[path](request)
        return web.json_response({"error": f"no such endpoint: {path}"}, status=404)

    def _retire(self, process: StdioUpstream | ChannelUpstream) -> None:
        task = asyncio.ensure_future(process.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def on_snapshot(self, snapshot) -> None:
        """Stop stdio and channel upstreams that are gone; wake the list watcher."""
        if len(self._era_gaps) > 10_000:
            self._era_gaps.clear()  # era decisions are keyed by endpoint: a changed one is asked afresh
        self.watcher.on_snapshot(snapshot)
        live = {s.id for s in snapshot.servers.values() if s.transport_type == "stdio"}
        for server_id in [i for i in self.stdio_clients if i not in live]:
            self._retire(self.stdio_clients.pop(server_id))
        live = {s.id for s in snapshot.servers.values() if s.transport_type in _CHANNEL_UPSTREAMS}
        for server_id in [i for i in self.channel_clients if i not in live]:
            self._retire(self.channel_clients.pop(server_id))
        self.credentials.forget({s.id for s in snapshot.servers.values()})
        for upstream, (authorization, name) in list(self._open_streams.items()):
            try:
                key = authenticate(snapshot, authorization, "proxy", verified=self.verified)
                if snapshot.server(key.tenant_id, name) is None:
                    raise Refusal(404, UNKNOWN_SERVER, f"No MCP server named '{name}' is available to you")
            except Refusal as refusal:
                upstream.abort(UpstreamStopped(refusal.message))

    async def end_streams(self) -> None:
        """End the long-lived streams (list changes, bridged connections) so that shutdown need not wait them out."""
        self.watcher.end_all()
        await self.transports.close()

    async def close(self) -> None:
        await self.transports.close()
        self.aggregate.relay.close()  # calls paused for their clients' input are cancelled upstream
        await self.watcher.close()
        if self.session_counter is not None:
            await self.session_counter.close()
        # Every child process is stopped (stdin closed, SIGTERM, SIGKILL) before the loop ends.
        await asyncio.gather(
            *(p.close() for p in self.stdio_clients.values()),
            *(c.close() for c in self.channel_clients.values()),
            *self._closing,
        )
        self.stdio_clients.clear()
        self.channel_clients.clear()
        for pool in self.pools.values():
            await pool.close()
        self.pools.clear()
        await self.credentials.close()

    def pool_for(self, server: ServerEntry) -> UpstreamPool:
        pool = self.pools.get(server.origin)
        if pool is None:
            pool = self.pools[server.origin] = UpstreamPool(
                server.endpoint_url,
                max_connections=self.config.upstream_pool_size,
                idle_seconds=self.config.upstream_idle_seconds,
                connect_timeout=self.config.upstream_connect_timeout,
            )
        return pool

    # -- the MCP endpoint ------------------------------------------------------------------
    def client_for(self, server: ServerEntry) -> UpstreamClient | StdioUpstream | ChannelUpstream:
        """The gateway's own MCP client of `server` (one per server and endpoint, era cached)."""
        if server.transport_type == "stdio":
            process = self.stdio_clients.get(server.id)
            if process is None or process.command != server.endpoint_url:
                if process is not None:
                    self._retire(process)
                process = StdioUpstream(server.endpoint_url, timeout=self.config.upstream_timeout)
                self.stdio_clients[server.id] = process
            return process
        # A changed credential makes a new client (and, for a channel, a new connection presenting it).
        credential = self.credentials.for_server(server)
        channel_type = _CHANNEL_UPSTREAMS.get(server.transport_type)
        if channel_type is not None:
            channel = self.channel_clients.get(server.id)
            if (
                channel is None or type(channel) is not channel_type or channel.url != server.endpoint_url
                or channel.credential is not credential
            ):
                if channel is not None:
                    self._retire(channel)
                channel = channel_type(
                    server.endpoint_url,
                    timeout=self.config.upstream_timeout,
                    connect_timeout=self.config.upstream_connect_timeout,
                    credential=credential,
                )
                self.channel_clients[server.id] = channel
            return channel
        client = self.clients.get(server.id)
        if (
            client is None or client.pool is not self.pool_for(server) or client.target != server.target
            or client.credential is not credential
        ):
            client = UpstreamClient(
                self.pool_for(server), server.target, timeout=self.config.upstream_timeout, credential=credential,
                tracer=self.tracer,
            )
            self.clients[server.id] = client
        return client

    async def _era_gap(self, server: ServerEntry, modern: bool) -> bool:
        """Whether a client of this era needs the facade to use `server` (decided once per process).

        A 2026-07-28 client and a 2025-era server: the gateway holds the upstream
        session and speaks for the server. A 2025-era client and a server that
        takes only 2026-07-28 requests: the gateway answers the handshake itself.
        Otherwise bytes pass through unchanged.
        """
        client = self.client_for(server)
        try:
            era = await client.detect()
            gap = era == "legacy" if modern else (era == "modern" and not await client.probe_handshake())
        except (UpstreamError, OSError) as exc:
            # Unreachable just now: pass the request through (its error is the answer) and ask again later.
            log.debug("could not learn the era of server %s: %s", server.name, exc)
            return False
        self._era_gaps[(server.id, server.endpoint_url, modern)] = gap
        if gap:
            log.info("server %s speaks the %s era: %s clients are translated by the gateway",
                     server.name, era, "2026-07-28" if modern else "2025-era")
        return gap

    async def _proxy(
        self, request: web.BaseRequest, name: str | None, *, with_body: bool, aggregate: bool = False
    ) -> web.StreamResponse:
        started = time.perf_counter()
        snapshot = self.store.current
        exchange = _Exchange()
        tracer = self.tracer
        if tracer is not None:
            exchange.span = tracer.start_request(request.headers)
        key: KeyEntry | None = None
        server: ServerEntry | None = None
        call: Call | None = None
        body = b""
        address: str | None = None
        try:
            headers = request.headers
            check_origin(headers.get("Origin"), self.allowed_origins)
            address = self.client_address(request)
            if tracer is None:
                key = await self._authenticate(request, address)
            else:
                key = await tracer.stage(exchange.span, "authenticate", self._authenticate(request, address))
            if aggregate:
                if not with_body and not _opens_stream(request):
                    raise Refusal(
                        405, INVALID_REQUEST, "/mcp keeps no session: POST one message per request, or GET "
                        "(Accept: text/event-stream) a stream of list changes",
                        headers={"Allow": "GET, POST"},
                    )
            else:
                server = snapshot.server(key.tenant_id, name)
                if server is None or not enforce.usable(snapshot, key, server):
                    # Same answer whether the name is unused, another tenant's, or closed to this caller
                    # by access rules (auth/access.py).
                    raise Refusal(404, UNKNOWN_SERVER, f"No MCP server named '{name}' is available to you")
            if with_body:
                body = await self._read_body(request)
                call = parse_body(body)
                check_message(call, headers)
            if self.limiter is not None:
                if tracer is None:
                    await self._limit(request, key, call, address)
                else:
                    await tracer.stage(exchange.span, "limit", self._limit(request, key, call, address))
            if call is not None and server is not None and server.transport_type == "http":
                modern = call.envelope_version is not None
                gap = self._era_gaps.get((server.id, server.endpoint_url, modern))
                # A 2025-era client is translated only if the server refuses the handshake,
                # which its initialize finds out; other requests pass through untouched.
                if gap is None and (modern or call.method == "initialize"):
                    gap = await self._era_gap(server, modern)
                if gap:
                    aggregate = True  # client and server speak different eras: the facade translates
            if server is not None and server.transport_type in _FACADE_TRANSPORTS:
                if not with_body and not _opens_stream(request):
                    raise Refusal(
                        405, INVALID_REQUEST,
                        f"Server '{server.name}' speaks {_FACADE_TRANSPORTS[server.transport_type]} behind the "
                        "gateway: POST one message per request, or GET (Accept: text/event-stream) a stream of "
                        "list changes",
                        headers={"Allow": "GET, POST"},
                    )
                aggregate = True
            if aggregate and not with_body:
                return await self._listen(request, key, server, exchange)
            if aggregate and call.method == "subscriptions/listen" and call.envelope_version is not None:
                return await self._listen(request, key, server, exchange, call.request_id, _listen_filter(body))
            if aggregate:
                if call.is_batch:
                    raise Refusal(400, INVALID_REQUEST, "Invalid Request: /mcp takes one JSON-RPC message per request")
                # What the upstream sends before its answer (progress, questions for the
                # client) turns the answer into an event stream, if the client takes one.
                stream = _EventStream(request, exchange) if "text/event-stream" in headers.get("Accept", "") else None
                down = Downstream(
                    modern=call.envelope_version is not None, key_id=key.id, emit=stream.emit if stream else None,
                    request_id=call.request_id,
                )
                try:
                    answer = await self.aggregate.answer(snapshot, key, body, only=server, down=down, span=exchange.span)
                except Refusal as refusal:
                    if stream is None or stream.response is None:
                        raise
                    # Too late for an HTTP status: the refusal is the stream's last event.
                    exchange.error_code, exchange.error = refusal.code, refusal.message
                    self.refusals.inc(str(refusal.code))
                    return await stream.finish(orjson.loads(refusal.body(call.request_id)))
                server = answer.server
                if answer.message is not None and "error" in answer.message:
                    exchange.error_code = _error_code(answer.message["error"])
                if stream is not None and stream.response is not None:
                    return await stream.finish(answer.message)
                exchange.status = answer.status
                payload = orjson.dumps(answer.message) if answer.message is not None else b""
                exchange.sent = len(payload)
                return web.Response(body=payload, status=answer.status,
                                    content_type=_JSON if payload else None)
            # Access rules and role permissions (enforce.py); a list answer that could hold what
            # this caller may not use comes back filtered, any other answer as bytes.
            listing = enforce.check_call(snapshot, key, server, call, body) if call is not None else None
            return await self._forward(request, key, server, body if with_body else None, exchange, call, listing)
        except Refusal as refusal:
            exchange.status, exchange.error_code, exchange.error = refusal.http_status, refusal.code, refusal.message
            self.refusals.inc(str(refusal.code))
            payload = refusal.body(call.request_id if call is not None else None)
            exchange.sent = len(payload)
            return web.Response(body=payload, status=refusal.http_status, headers=refusal.headers, content_type=_JSON)
        except asyncio.CancelledError:
            # The client went away mid-exchange (for SSE, often right after its
            # answer): the exchange still happened and is recorded.
            exchange.error = "client closed the connection"
            if not exchange.status:
                exchange.status = CLIENT_CLOSED
            raise
        finally:
            self._record(request, started, exchange, key, server, call, body, with_body, address)
            if tracer is not None:
                tracer.end_request(exchange.span, request, exchange, key, server, call)

    async def _listen(
        self,
        request: web.BaseRequest,
        key: KeyEntry,
        server: ServerEntry | None,
        exchange: _Exchange,
        request_id: int | str | None = None,
        wanted: dict | None = None,
    ) -> web.StreamResponse:
        """A stream of list changes where the gateway is the server (`/mcp`, the facade).

        2025 era: a GET stream carrying every kind. 2026-07-28: the answer to
        `subscriptions/listen`, acknowledged first, each frame tagged with the
        request's id, only the kinds asked for, and ended with a result when the
        gateway closes it. Either way it ends at `stream_max_duration`, or when
        the key stops being valid (checked at each keep-alive).
        """
        modern = wanted is not None
        if modern:
            kinds = frozenset(kind for kind, (_, field, _) in WATCHED.items() if wanted.get(field) is True)
        else:
            kinds = frozenset(WATCHED)
        meta = {SUBSCRIPTION_ID: request_id} if modern else None
        scope = (key.tenant_id, server.id if server is not None else None)
        listener = Listener(kinds)
        await self.watcher.add(scope, listener)
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        exchange.status = 200
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stream_max_duration

        async def send(message: dict) -> None:
            frame = sse_frame(orjson.dumps(message))
            await response.write(frame)
            exchange.sent += len(frame)

        try:
            await response.prepare(request)
            if modern:
                honored = {WATCHED[kind][1]: True for kind in kinds}
                await send({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                            "params": {"notifications": honored, "_meta": meta}})
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(_KEEPALIVE_SECONDS, left)):
                        kind = await listener.queue.get()
                except TimeoutError:
                    try:
                        authenticate(self.store.current, request.headers.get("Authorization"), "proxy",
                                     verified=self.verified, tokens=self.tokens)
                    except Refusal as refusal:
                        exchange.error = f"stream ended: {refusal.message}"
                        break
                    await response.write(b": keep-alive\n\n")
                    continue
                if kind is None:
                    break  # the gateway is shutting down
                notification: dict = {"jsonrpc": "2.0", "method": WATCHED[kind][2]}
                if meta is not None:
                    notification["params"] = {"_meta": meta}
                await send(notification)
            if modern:
                await send({"jsonrpc": "2.0", "id": request_id, "result": {"resultType": "complete", "_meta": meta}})
            await response.write_eof()
        except ConnectionResetError:
            exchange.error = "client closed the connection"
        finally:
            self.watcher.remove(scope, listener)
        return response

    def client_address(self, request: web.BaseRequest) -> str | None:
        """The client's address: the peer's, or, from a trusted proxy, the one it names in X-Forwarded-For."""
        peer = request.remote
        if not self._trusted_proxies or peer is None or not within(peer, self._trusted_proxies):
            return peer
        forwarded = request.headers.getall("X-Forwarded-For", ())
        hops = [hop.strip() for value in forwarded for hop in value.split(",")]
        # Right to left: each trusted hop vouches for the one before it; the first
        # untrusted one is the client (what it says about earlier hops is its own claim).
        for hop in reversed(hops):
            if not within(hop, self._trusted_proxies):
                return hop if is_ip(hop) else peer
        return hops[0] if hops and is_ip(hops[0]) else peer

    async def _authenticate(self, request: web.BaseRequest, address: str | None = None) -> KeyEntry:
        """The caller's key, after its address passed the deny list, bans and its bucket.

        Failed credentials are charged to the address's anonymous bucket: once it
        is spent the answer is 429, not 401, so guessing keys goes slowly.
        `address`: `client_address(request)`, when the caller has it already.
        """
        limiter = self.limiter
        if limiter is not None:
            if address is None:
                address = self.client_address(request)
            try:
                limiter.check_address(address, time.monotonic())
            except Limited as limited:
                raise self._limit_refusal(limited) from None
        try:
            return await authenticate_request(
                self.store, request.headers.get("Authorization"), "proxy", verified=self.verified, tokens=self.tokens
            )
        except Refusal as refusal:
            if limiter is not None and refusal.http_status == 401:
                limited = limiter.anonymous(address, time.monotonic())
                if limited is not None:
                    raise self._limit_refusal(limited) from None
            raise

    async def _limit(self, request: web.BaseRequest, key: KeyEntry, call: Call | None,
                     address: str | None = None) -> None:
        """Charge the request to every tier of its principal (it may wait in the fair queue), or refuse it."""
        limiter = self.limiter
        cost = limiter.cost(call.method, call.target) if call is not None else 1.0
        tenant = self.store.current.tenants.get(key.tenant_id)
        if address is None:
            address = self.client_address(request)
        try:
            # Decided on the spot; only a request that must queue for the global bucket awaits.
            pending = limiter.admit_now(key, tenant.weight if tenant is not None else 100, address, cost,
                                        time.monotonic())
            if pending is not None:
                await limiter.wait(pending)
        except Limited as limited:
            raise self._limit_refusal(limited) from None
        self.admitted.inc()

    def _limit_refusal(self, limited: Limited) -> Refusal:
        self.limited.inc(limited.tier)
        if limited.status == 403:
            return Refusal(403, FORBIDDEN, f"Forbidden: {limited.reason}", data={"tier": limited.tier})
        if limited.status == 503:
            return Refusal(503, UPSTREAM_UNAVAILABLE, f"Unavailable: {limited.reason}; retry in 1 s",
                           headers={"Retry-After": "1"}, data={"tier": limited.tier})
        retry = limited.retry_seconds
        if limited.window:
            what = f"{_TIER_NAMES[limited.tier]} allows {limited.limit:g} requests per {limited.window}"
            message = f"Rate limit exceeded: {what}; retry in {retry} s"
        else:
            message = f"Rate limit exceeded: {limited.reason}; retry in {retry} s"
        if limited.reason and limited.window:
            message += f" ({limited.reason})"
        headers = {"Retry-After": str(retry), "RateLimit-Reset": str(retry), "RateLimit-Remaining": "0"}
        if limited.limit:
            headers["RateLimit-Limit"] = f"{limited.limit:g}"
        data = {"tier": limited.tier, "retry_after": retry}
        if limited.window:
            data.update(limit=limited.limit, window=limited.window)
        return Refusal(429, RATE_LIMITED, message, headers=headers, data=data)

    @property
    def request_logs(self) -> bool:
        """Whether each request writes a request_logs row ([writer] request_logs, set by app.py; false only to
        measure what records cost)."""
        return self._calls.request_logs

    @request_logs.setter
    def request_logs(self, on: bool) -> None:
        self._calls.request_logs = on

    def _record(self, request, started, exchange, key, server, call, body, with_body, address=None) -> None:
        elapsed = time.perf_counter() - started
        # Milliseconds to the microsecond, as stored: the audit writer spells such a float without dtoa.
        duration_ms = round(elapsed * 1_000_000) / 1000.0
        if key is not None and self.key_usage is not None and type(key) is KeyEntry:
            self.key_usage.note(key.id)  # last_used_at, written in the background
        server_name = server.name if server is not None else None
        method = call.method if call is not None else (request.method if not with_body else None)
        tenant_id = key.tenant_id if key is not None else None
        self.requests.inc(tenant_id, server_name or "", METHOD_LABELS.get(method, "other"), exchange.status)
        self.latency.observe(elapsed, tenant_id, server_name or "")
        if address is None:
            address = self.client_address(request)
        # Its request_logs row and, for a caller with a key, its audit entry (whose params the writer decodes
        # later), built and queued in the writer's lanes by the compiled intake: no frame of ours per row.
        self._calls.record(
            key, server, server_name, method, call.target if call is not None else None, exchange.status or 500,
            exchange.error_code, exchange.error, duration_ms, body, exchange.sent, address, utc_now(),
            call is not None and call.is_batch,
        )

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None

    async def _forward(
        self,
        request: web.BaseRequest,
        key: KeyEntry,
        server: ServerEntry,
        body: bytes | None,
        exchange: _Exchange,
        call: Call | None = None,
        listing: enforce.ListFilter | None = None,
    ) -> web.StreamResponse:
        """Send the request to `server`, or to the replica its routing rule picks, through the guard.

        The guard (dataplane/guard.py) refuses while the breaker is open, holds
        the call until the upstream has a slot, and allows a failed safe call
        (a list, or a tool the server marks read-only or idempotent) another
        attempt, on another replica where there is one, while the retry budget
        holds. Only connection failures, broken exchanges and 502/503/504
        answers are retried, never a timeout (the call may have run).
        """
        if server.transport_type != "http":
            raise Refusal(
                502,
                UPSTREAM_UNAVAILABLE,
                f"Server '{server.name}' uses the {server.transport_type} transport, "
                "which this gateway version cannot reach yet",
            )
        guard = self.guard
        if guard is None or body is None:
            # GET streams and DELETEs go to the addressed server as they are.
            if exchange.span is None:
                return await self._send(request, key, server, body, exchange, call, listing, None)
            return await self.tracer.upstream(
                exchange.span, server.name, exchange,
                self._send(request, key, server, body, exchange, call, listing, None),
            )
        snapshot = self.store.current
        tool = call.target if call is not None and call.method == "tools/call" else None
        target, route = server, None
        if server.tenant_id in snapshot.routing.by_tenant:  # the tenant has routing rules
            session = request.headers.get("Mcp-Session-Id")
            if session is None:
                target, route = guard.route(snapshot, server, tool)
            else:
                # A session lives on the replica that opened it: no other may take its calls.
                target = self._session_replica(session, key, guard.replicas(snapshot, server, tool)) or server
        attempts = 0
        tried: list[ServerEntry] = []
        while True:
            if exchange.span is None:
                ticket = await guard.enter(target, key.tenant_id, tool, snapshot.tenants)
            else:  # the breaker's verdict and any wait for a slot
                ticket = await self.tracer.stage(
                    exchange.span, "route", guard.enter(target, key.tenant_id, tool, snapshot.tenants), target.name
                )
            try:
                if exchange.span is None:
                    response = await self._send(request, key, target, body, exchange, call, listing, ticket)
                else:
                    response = await self.tracer.upstream(
                        exchange.span, target.name, exchange,
                        self._send(request, key, target, body, exchange, call, listing, ticket),
                    )
            except Refusal as refusal:
                guard.leave(ticket)
                if refusal.code not in _RETRYABLE_CODES or not _retry_safe(call, tool, snapshot, target):
                    raise
                failure: Refusal | web.StreamResponse = refusal
            except BaseException:
                guard.leave(ticket)
                raise
            else:
                guard.leave(ticket)  # unless a stream holds it until it ends
                if exchange.status not in _RETRYABLE_STATUSES or not _retry_safe(call, tool, snapshot, target):
                    return response
                failure = response
            tried.append(target)
            if attempts >= target.settings.retry_attempts or not guard.may_retry(target):
                if isinstance(failure, Refusal):
                    raise failure
                return failure
            attempts += 1
            target = guard.failover(route, tried) or target
            log.info("retrying a safe call (%s) to '%s', attempt %d", call.method, target.name, attempts + 1)
            exchange.status, exchange.sent = 0, 0

    def _session_replica(self, token: str, key: KeyEntry, replicas: tuple) -> ServerEntry | None:
        """The replica whose session `token` is (several replicas: each is asked; they are few)."""
        for replica in replicas:
            if self.sessions.open(token, key.id, replica.id) is not None:
                return replica
        return None

    async def _send(
        self,
        request: web.BaseRequest,
        key: KeyEntry,
        server: ServerEntry,
        body: bytes | None,
        exchange: _Exchange,
        call: Call | None,
        listing: enforce.ListFilter | None,
        ticket: Ticket | None,
    ) -> web.StreamResponse:
        """One exchange with `server`, noting on the guard's `ticket` (if any) how it went.

        A relayed event stream takes the ticket over (`ticket.held`) and gives it
        back itself when it ends; the caller gives back any other.
        """
        pool = self.pool_for(server)
        headers = []
        session: str | None = None  # the upstream session this request names, if any
        credential = self.credentials.for_server(server) if server.auth_sealed is not None else None
        # The gateway's credential replaces any header of the same name the client sent.
        dropped = _REQUEST_HEADERS_DROPPED if credential is None else _REQUEST_HEADERS_DROPPED | credential.names
        for name, value in request.raw_headers:
            lowered = name.lower()
            if lowered in dropped:
                continue
            if lowered == b"mcp-session-id":
                session = self._open_session(value.decode("latin-1"), key, server)
                value = session.encode("latin-1")
            headers.append((name, value))
        if exchange.span is not None:
            self.tracer.inject(headers)  # this call's traceparent instead of the client's
        counter = self.session_counter
        session_ticket = None  # a place held under the key's session cap while an initialize is out
        if counter is not None:
            if session is not None:
                counter.seen(key.id, session)
            elif call is not None and call.method == "initialize":
                session_ticket = await counter.admit(key.id)
                if session_ticket is None:
                    raise _too_many_sessions(counter)
        try:
            if credential is not None:
                headers += await credential.headers()
            payload = pool.encode_request(request.method, server.target, headers, body)
            upstream = await pool.request(payload, timeout=self.config.upstream_timeout)
            exchange.status = upstream.status
            if ticket is not None:
                ticket.ok = upstream.status < 500
            if upstream.status == 401 and credential is not None:
                credential.invalidate()  # an expired or revoked token: the next request fetches another
            if counter is not None:
                _count_session(counter, key, session, session_ticket, upstream, request.method)
                session_ticket = None
            if upstream.is_event_stream:
                request_id = call.request_id if call is not None else None
                if ticket is not None:
                    ticket.held = True  # the stream gives it back when it ends
                return await self._stream(request, upstream, exchange, key, server, request_id, listing, ticket)
            if upstream.complete:
                content = await upstream.read()  # the usual case: it all came with the headers
            else:
                try:
                    content = await asyncio.wait_for(upstream.read(), self.config.upstream_timeout)
                except asyncio.TimeoutError:
                    upstream.release()
                    raise UpstreamTimeout(
                        f"the answer's body did not arrive within {self.config.upstream_timeout:g}s"
                    ) from None
        except UpstreamTimeout as exc:
            if ticket is not None:
                ticket.ok = False
            raise Refusal(504, UPSTREAM_TIMEOUT, f"Server '{server.name}' did not answer in time: {exc}") from None
        except CredentialUnavailable as exc:
            raise Refusal(502, UPSTREAM_UNAVAILABLE, f"Server '{server.name}' was not called: {exc}") from None
        except UpstreamConnectError as exc:
            if ticket is not None:
                ticket.ok = False
            raise Refusal(502, UPSTREAM_UNAVAILABLE, f"Server '{server.name}' is unreachable: {exc}") from None
        except UpstreamError as exc:
            if ticket is not None:
                ticket.ok = False
            raise Refusal(502, UPSTREAM_BAD_RESPONSE, f"Server '{server.name}' broke the exchange: {exc}") from None
        finally:
            if session_ticket is not None:
                counter.abandoned(key.id, session_ticket)  # the initialize never reached an answer
        if listing is not None:
            content = listing.message(content)
        exchange.sent = len(content)
        return web.Response(body=content, status=upstream.status, headers=self._response_headers(upstream, key, server))

    async def _stream(
        self, request: web.BaseRequest, upstream: UpstreamResponse, exchange: _Exchange, key: KeyEntry,
        server: ServerEntry, request_id: int | str | None, listing: enforce.ListFilter | None = None,
        ticket: Ticket | None = None,
    ) -> web.StreamResponse:
        """Relay an upstream event stream; the guard's `ticket` (if any) is given back when it ends."""
        try:
            return await self._relay_stream(request, upstream, exchange, key, server, request_id, listing, ticket)
        finally:
            if ticket is not None:
                self.guard.leave(ticket, stream_ended=True)

    async def _relay_stream(
        self, request: web.BaseRequest, upstream: UpstreamResponse, exchange: _Exchange, key: KeyEntry,
        server: ServerEntry, request_id: int | str | None, listing: enforce.ListFilter | None,
        ticket: Ticket | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=self._response_headers(upstream, key, server))
        # Each chunk goes to the client as it comes: no buffering of SSE.
        await response.prepare(request)
        # A call's stream (POST) must keep moving like any answer; a GET stream may idle longer.
        idle = self.config.upstream_timeout if request.method == "POST" else self.config.stream_idle_timeout
        chunks = upstream.iter_chunks(idle_timeout=idle, max_duration=self.config.stream_max_duration)
        if listing is not None:
            chunks = listing.chunks(chunks)  # the list answer's event is held back until whole, then filtered
        if type(key) is KeyEntry:
            # Checked again at every configuration change (on_snapshot): a revoked key, a deactivated
            # user or a suspended tenant ends the stream then, not at its idle or duration limit.
            self._open_streams[upstream] = (request.headers.get("Authorization"), server.name)
        try:
            async for chunk in chunks:
                await response.write(chunk)
                exchange.sent += len(chunk)
            await response.write_eof()
        except UpstreamStopped as exc:
            exchange.error = f"stream ended by the gateway: {exc}"
            await _end_quietly(response)
        except UpstreamTimeout as exc:
            exchange.error = f"stream ended by the gateway: {exc}"
            if ticket is not None and request.method == "POST":
                ticket.ok = False  # a call's answer that stopped coming (a GET stream may idle)
            if request_id is not None:
                # The client is waiting for this request's answer: give it one.
                refusal = Refusal(504, UPSTREAM_TIMEOUT, f"Server '{server.name}' {exc}; the call was abandoned")
                event = b"event: message\ndata: " + refusal.body(request_id) + b"\n\n"
                try:
                    await response.write(event)
                    exchange.error_code = UPSTREAM_TIMEOUT
                except ConnectionResetError:
                    pass
            await _end_quietly(response)
        except UpstreamError as exc:
            # The headers are gone already; all that is left is to end the stream.
            if ticket is not None:
                ticket.ok = False
            exchange.error = f"upstream stream broke: {exc}"
            log.warning("upstream stream broke after %d bytes: %s", exchange.sent, exc)
            await _end_quietly(response)
        except ConnectionResetError:
            # The client closed its end (routine: a 2025-era client ending its
            # session drops its streams). Not an error of ours to log loudly.
            exchange.error = "client closed the connection"
        finally:
            self._open_streams.pop(upstream, None)
            # Release the upstream exchange now, not when the generator is collected.
            await chunks.aclose()
        return response

    def _open_session(self, token: str, key: KeyEntry, server: ServerEntry) -> str:
        upstream_id = self.sessions.open(token, key.id, server.id)
        if upstream_id is None:
            # Unknown, forged, another key's or another server's: all look the same.
            raise Refusal(
                404, SESSION_NOT_FOUND, "Session not found: it has ended or is not yours; start a new one with initialize"
            )
        return upstream_id

    def _response_headers(self, upstream: UpstreamResponse, key: KeyEntry, server: ServerEntry) -> list[tuple[str, str]]:
        headers = []
        for name, value in upstream.headers:
            lowered = name.lower()
            if lowered in _RESPONSE_HEADERS_DROPPED:
                continue
            text = value.decode("latin-1")
            if lowered == b"mcp-session-id":
                text = self.sessions.seal(text, key.id, server.id)
            headers.append((name.decode("latin-1"), text))
        return headers

    # -- operational endpoints ----------------------------------------------------------------
    async def handle_healthz(self, request: web.BaseRequest) -> web.Response:
        """Liveness, public: says only that the process answers (probes hold no keys)."""
        return web.json_response({"status": "ok"})

    async def handle_readyz(self, request: web.BaseRequest) -> web.Response:
        """Readiness, public as a status (200 or 503); the checks and the configuration
        version only for a key with the `health` scope. A credential that is sent must be valid."""
        checks = {"snapshot": self.store.loaded, "writer": bool(self.ready())}
        ok = all(checks.values())
        answer: dict = {"status": "ready" if ok else "not ready"}
        if request.headers.get("Authorization") is not None:
            try:
                authenticate(self.store.current, request.headers.get("Authorization"), "health")
            except Refusal as refusal:
                return web.Response(
                    body=refusal.body(), status=refusal.http_status, headers=refusal.headers, content_type=_JSON
                )
            answer.update(checks=checks, config_version=self.store.current.version)
        return web.json_response(answer, status=200 if ok else 503)

    async def handle_metrics(self, request: web.BaseRequest) -> web.Response:
        try:
            await authenticate_request(self.store, request.headers.get("Authorization"), "metrics", tokens=self.tokens)
        except Refusal as refusal:
            return web.Response(
                body=refusal.body(), status=refusal.http_status, headers=refusal.headers, content_type=_JSON
            )
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def handle_resource_metadata(self, request: web.BaseRequest) -> web.Response:
        """RFC 9728 protected-resource metadata: where clients get tokens for this gateway."""
        # Public and the same for everyone: any origin may read it, caches may keep it a while.
        headers = {"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=300"}
        return web.json_response(self.tokens.metadata(), headers=headers)


async def _end_quietly(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except ConnectionResetError:
        pass


class _EventStream:
    """A facade answer that became an event stream: messages before the answer, then the answer."""

    __slots__ = ("request", "exchange", "response")

    def __init__(self, request: web.BaseRequest, exchange: _Exchange) -> None:
        self.request = request
        self.exchange = exchange
        self.response: web.StreamResponse | None = None

    async def emit(self, message: dict) -> bool:
        """Send one message; False if the client has gone."""
        try:
            if self.response is None:
                self.response = web.StreamResponse(
                    status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await self.response.prepare(self.request)
                self.exchange.status = 200
            frame = sse_frame(orjson.dumps(message))
            await self.response.write(frame)
        except ConnectionResetError:
            return False
        self.exchange.sent += len(frame)
        return True

    async def finish(self, message: dict | None) -> web.StreamResponse:
        if message is not None:
            await self.emit(message)
        await _end_quietly(self.response)
        return self.response


class _Exchange:
    """What the record of one request needs to know about how it went."""

    __slots__ = ("status", "sent", "error_code", "error", "span")

    def __init__(self) -> None:
        self.status = 0
        self.sent = 0
        self.error_code: int | None = None
        self.error: str | None = None
        self.span = None  # the request's span (tracing.py) when tracing is on


def _not_allowed(allowed: str) -> web.Response:
    return web.json_response({"error": f"method not allowed here; use {allowed}"}, status=405, headers={"Allow": allowed})


def _opens_stream(request: web.BaseRequest) -> bool:
    return request.method == "GET" and "text/event-stream" in request.headers.get("Accept", "")


def _listen_filter(body: bytes) -> dict:
    """params.notifications of a subscriptions/listen request ({} when absent or not an object)."""
    params = orjson.loads(body).get("params")
    wanted = params.get("notifications") if isinstance(params, dict) else None
    return wanted if isinstance(wanted, dict) else {}


def _count_session(
    counter: SessionCounter, key: KeyEntry, session: str | None, ticket: str | None, upstream: UpstreamResponse,
    method: str,
) -> None:
    """Keep the key's session count: a session opened, ended (DELETE), or gone upstream (404)."""
    if ticket is not None:
        opened = upstream.header(b"mcp-session-id")
        if opened and upstream.status < 400:
            counter.opened(key.id, ticket, opened.decode("latin-1"))
        else:
            counter.abandoned(key.id, ticket)  # refused, or a server that keeps no sessions
    elif session is not None and (upstream.status == 404 or (method == "DELETE" and upstream.status < 300)):
        counter.ended(key.id, session)


def _too_many_sessions(counter: SessionCounter) -> Refusal:
    return Refusal(
        429,
        RATE_LIMITED,
        f"Too many sessions: this API key may hold {counter.max_per_key} open sessions; end one "
        f"(DELETE) or let an idle one expire ({counter.idle_timeout:g} s without requests)",
        data={"tier": "sessions", "limit": counter.max_per_key},
    )


def _error_code(error) -> int | None:
    """The code of an upstream's JSON-RPC error, as the records keep it: an integer of 32 bits (the columns'), or
    None for an error that is no object or a code of another kind, which the client still gets as it came."""
    code = error.get("code") if type(error) is dict else None
    return code if type(code) is int and -(2**31) <= code < 2**31 else None


def _too_large(limit: int) -> Refusal:
    return Refusal(
        413,
        PAYLOAD_TOO_LARGE,
        f"Request body too large: this gateway accepts at most {limit} bytes per message",
    )

