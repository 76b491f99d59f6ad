"""`/mcp`: the caller's tenant as one virtual MCP server.

The gateway answers here itself, in the client's era: `initialize` (2025-era)
or `server/discover` (2026-07-28), `ping`, and the tools and prompts of every
server the caller's tenant has, named `{server}__{name}`. A call to
`{server}__{tool}` goes to that server with the original name, through
`UpstreamClient` (which speaks each upstream's own era). Resources and
resource templates are listed with URIs `mcpgw://{server}/{original URI}`
(see `namespaced_uri`); `resources/read` of such a URI reads the original one
on that server. The session-less design means any replica answers any request.

Lists are fetched from every server at once, each with its own deadline; a
server that fails is left out of the answer and named in
`_meta["mcp-gateway/unavailable"]`, so one broken upstream does not hide the
others. Each server's list is cached for `LIST_TTL` seconds and for one
configuration version. Names that would not fit the MCP tool-name rule
(1-128 of `[A-Za-z0-9_.-]`) once prefixed are left out and logged.

Not yet aggregated: resource subscriptions (so `resources` is announced
without `subscribe`), server-to-client requests and progress streaming.

The same machinery, given one server (`only=`), is the facade for upstreams
that do not speak HTTP (stdio): names stay as they are, resources pass
through, the upstream's own capabilities are announced, and any other method
is forwarded as it is.

Traced (`tracer`, tracing.py, with the request's span passed in): each call
to an upstream is a `route` span (the guard's `enter`) and an `upstream` span
with the server's name, one per server a list fans out to; the call carries
that span upstream, in `params._meta` (the only carrier of a stdio, SSE or
WebSocket upstream) and, for HTTP, in the `traceparent` header (mcp_client.py).
A list answered from the cache makes no span: nothing went upstream.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import uuid
from typing import Any

import orjson

from gateway.dataplane import enforce
from gateway.dataplane.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, Refusal
from gateway.dataplane.mcp_client import UpstreamRpcError
from gateway.dataplane.relay import Downstream, Relay
from gateway.dataplane.protocol import HANDSHAKE_VERSIONS, MODERN_VERSIONS
from gateway.dataplane.upstream import UpstreamError, UpstreamTimeout
from gateway.snapshot import KeyEntry, ServerEntry, Snapshot

log = logging.getLogger("gateway.aggregate")

SEPARATOR = "__"
LIST_TTL = 5.0
MAX_UPSTREAM_PAGES = 100
SERVER_INFO = {"name": "mcp-gateway", "version": "0.1.0"}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_ENVELOPE_PREFIX = "io.modelcontextprotocol/"
# What a 2026-07-28 server sends with a JSON-RPC error (the SDK's table).
_MODERN_ERROR_STATUS = {-32700: 400, -32600: 400, -32602: 400, -32020: 400, -32021: 400, -32022: 400, -32601: 404}
# List method -> the key of its items in the result.
_KINDS = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}
_ROUTED = {"tools/call": "tools", "prompts/get": "prompts", "resources/read": "resources"}
# Resource URIs on /mcp are `mcpgw://{server}/{original URI}`, the original
# appended as it is. Why this form:
# - It is a URI (RFC 3986): the server name is the authority (server names are
#   `[A-Za-z0-9][A-Za-z0-9_.-]*`, all reg-name characters) and the original,
#   scheme and all, is path, where ':' and '//' are allowed.
# - It reverses without decoding anything: a server name cannot contain '/', so
#   the first '/' after the prefix ends it and the rest is the original, byte
#   for byte. A URI template stays a template of the same variables
#   (`file:///{path}` -> `mcpgw://docs/file:///{path}`), and the client's
#   expansion of it is the prefix plus the expansion of the original.
#   Percent-encoding the original (into a query parameter, say) would not
#   survive a client expanding the template inside the encoded text.
# - The server name is compared exactly, as in `{server}__{name}`. RFC 3986
#   calls a host case-insensitive, but neither the MCP SDK (URIs are strings)
#   nor pydantic's URL type changes the case of a non-special scheme's host.
URI_SCHEME = "mcpgw"
_URI_PREFIX = URI_SCHEME + "://"
# Results that carry 2026-07-28 caching hints (SEP-2549).
_CACHEABLE = {"server/discover", "tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}


class Answer:
    """A JSON-RPC answer the aggregate composed: HTTP status, the message, and the server it involved."""

    __slots__ = ("status", "message", "server")

    def __init__(self, status: int, message: dict[str, Any] | None, server: ServerEntry | None = None) -> None:
        self.status, self.message, self.server = status, message, server


class Aggregate:
    def __init__(self, client_for, *, timeout: float, page_size: int = 200, max_duration: float = 3600.0) -> None:
        # client_for(server) -> UpstreamClient: the data plane owns pools and clients.
        self.client_for = client_for
        self.timeout = timeout
        self.page_size = page_size
        self._cache: dict[tuple[uuid.UUID, str, int], tuple[float, list[dict]]] = {}
        self.relay = Relay(timeout=timeout, max_duration=max_duration)
        # Routing, breakers and queues around calls (dataplane/guard.py); None: calls go out unguarded.
        self.guard = None
        # Spans of upstream calls (tracing.py), handed over by the data plane; None: tracing off (and no span).
        self.tracer = None

    async def answer(
        self,
        snapshot: Snapshot,
        key: KeyEntry,
        body: bytes,
        only: ServerEntry | None = None,
        down: Downstream | None = None,
        span=None,
    ) -> Answer:
        """Answer one message: for the tenant's aggregate, or as the facade of server `only`.

        `down` is the client's side of a call (progress, questions for the client:
        see relay.py); without it a call's answer is all the client gets.
        `span`: the request's span when tracing is on, the parent of its upstream calls' spans.
        """
        message = orjson.loads(body)
        if not isinstance(message, dict):
            raise Refusal(400, INVALID_REQUEST, "Invalid Request: /mcp takes one JSON-RPC message per request")
        method = message.get("method")
        if method is None or "id" not in message:
            if method is None:
                # A client's answer to a question relayed from an upstream (or to nothing we asked).
                self.relay.accept_answer(key.id, message)
            elif method == "notifications/cancelled" and isinstance(message.get("params"), dict):
                # Its call is stopped, and so cancelled upstream under the gateway's own id.
                self.relay.cancel(key.id, message["params"].get("requestId"))
            return Answer(202, None)
        request_id = message["id"]
        params = message.get("params") or {}
        modern = isinstance(params.get("_meta"), dict) and (
            params["_meta"].get(_ENVELOPE_PREFIX + "protocolVersion") in MODERN_VERSIONS
        )
        enforce.check_method(key, method)  # the role table: READONLY does not call tools
        try:
            if only is not None:
                # Access rules for the one server behind the facade; its lists come back filtered.
                enforce.check_params(snapshot, key, only, method, params)
                result, server = await self._single(only, method, params, down, key.tenant_id, span), only
                enforce.filter_result(snapshot, key, only, method, result)
            elif method == "initialize":
                result, server = self._initialize(params, self._capabilities()), None
            elif method == "server/discover":
                result, server = self._discover(self._capabilities()), None
            elif method == "ping":
                result, server = {}, None
            elif method in _KINDS:
                result, server = await self._list(snapshot, key, method, params, span), None
            elif method in _ROUTED:
                result, server = await self._route(snapshot, key, method, params, down, span)
            else:
                raise UpstreamRpcError({"code": METHOD_NOT_FOUND, "message": f"Method not found: {method}"})
        except UpstreamRpcError as exc:
            status = _MODERN_ERROR_STATUS.get(exc.error.get("code"), 200) if modern else 200
            return Answer(status, {"jsonrpc": "2.0", "id": request_id, "error": exc.error})
        if modern:
            result.setdefault("resultType", "complete")
            if method in _CACHEABLE:
                # The answer depends on who asks, and the tenant's servers can change
                # at any moment: private, and stale at once.
                result.setdefault("ttlMs", 0)
                result.setdefault("cacheScope", "private")
        return Answer(200, {"jsonrpc": "2.0", "id": request_id, "result": result}, server)

    # -- the gateway's own answers ------------------------------------------------------------
    @staticmethod
    def _capabilities() -> dict[str, Any]:
        # No `subscribe`: resource subscriptions are not relayed. List changes are (watch.py).
        return {"tools": {"listChanged": True}, "prompts": {"listChanged": True}, "resources": {"listChanged": True}}

    def _initialize(self, params: dict[str, Any], capabilities: dict[str, Any], instructions: str = "") -> dict:
        requested = params.get("protocolVersion")
        version = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
        return {
            "protocolVersion": version,
            "capabilities": capabilities,
            "serverInfo": SERVER_INFO,
            "instructions": instructions
            or "Every MCP server of your tenant behind one endpoint; tools and prompts are named "
            "server__name, resources mcpgw://server/original-uri.",
        }

    def _discover(self, capabilities: dict[str, Any]) -> dict[str, Any]:
        return {
            "supportedVersions": list(MODERN_VERSIONS),
            "capabilities": capabilities,
            "_meta": {_ENVELOPE_PREFIX + "serverInfo": SERVER_INFO},
        }

    # -- one server behind a facade (stdio upstreams) ---------------------------------------------
    async def _single(
        self, server: ServerEntry, method: str, params: dict[str, Any], down: Downstream | None,
        tenant_id: uuid.UUID | None = None, span=None,
    ) -> dict[str, Any]:
        client = self.client_for(server)
        try:
            if method in ("initialize", "server/discover"):
                capabilities = await client.ensure_ready()
                # What the gateway relays: no resource subscriptions yet.
                relayed = {
                    k: v for k, v in capabilities.items() if k in ("tools", "prompts", "resources", "completions", "logging")
                }
                if "resources" in relayed:
                    relayed["resources"] = {k: v for k, v in relayed["resources"].items() if k != "subscribe"}
                for kind in ("tools", "prompts", "resources"):
                    if isinstance(relayed.get(kind), dict):
                        relayed[kind] = {**relayed[kind], "listChanged": True}  # the gateway watches (watch.py)
                # The server's own name and instructions: the client should not see a difference.
                instructions = client.instructions or f"The MCP server '{server.name}' through the gateway."
                info = client.server_info or SERVER_INFO
                if method == "initialize":
                    return {**self._initialize(params, relayed, instructions), "serverInfo": info}
                result = self._discover(relayed)
                result["_meta"] = {_ENVELOPE_PREFIX + "serverInfo": info}
                if client.instructions:
                    result["instructions"] = client.instructions
                return result
            if method == "ping":
                return {}
            forwarded = {k: v for k, v in params.items() if k != "_meta"}
            meta = {k: v for k, v in (params.get("_meta") or {}).items() if not k.startswith(_ENVELOPE_PREFIX)}
            if meta:
                forwarded["_meta"] = meta
            return await self._guarded(server, tenant_id, client, method, forwarded, down, span)
        except UpstreamTimeout as exc:
            raise _upstream_refusal(504, server, f"did not answer in time: {exc}") from None
        except (UpstreamError, OSError) as exc:
            raise _upstream_refusal(502, server, f"is unreachable or broke the exchange: {exc}") from None

    async def _guarded(
        self, server: ServerEntry, tenant_id: uuid.UUID | None, client, method: str, params: dict[str, Any],
        down: Downstream | None, span=None,
    ) -> dict[str, Any]:
        """A call through the guard: refused while the breaker is open, held for a slot, its outcome counted."""
        guard = self.guard
        if guard is None:
            return await self._call(server, client, method, params, down, span)
        tool = params.get("name") if method == "tools/call" else None
        entering = guard.enter(server, tenant_id, tool=tool if isinstance(tool, str) else None)
        if span is None:
            ticket = await entering
        else:  # the breaker's verdict and any wait for a slot
            ticket = await self.tracer.stage(span, "route", entering, server.name)
        try:
            result = await self._call(server, client, method, params, down, span)
        except UpstreamRpcError:
            ticket.ok = True  # an error answer: the upstream is up
            raise
        except (UpstreamError, OSError):
            ticket.ok = False
            raise
        else:
            ticket.ok = True
            return result
        finally:
            guard.leave(ticket)

    async def _call(
        self, server: ServerEntry, client, method: str, params: dict[str, Any], down: Downstream | None, span=None
    ) -> dict[str, Any]:
        if span is not None:
            # The same call inside an `upstream` span, which the call carries upstream.
            tracer = self.tracer
            return await tracer.call(
                span, server.name, lambda: self._call(server, client, method, tracer.with_context(params), down)
            )
        if down is None:
            return await client.request(method, params)
        return await self.relay.call(client, method, params, down)

    # -- lists ----------------------------------------------------------------------------------
    async def _list(self, snapshot: Snapshot, key: KeyEntry, method: str, params: dict, span=None) -> dict[str, Any]:
        kind = _KINDS[method]
        offset = _read_cursor(params.get("cursor"), snapshot.version)
        # A server closed to this caller by access rules is left out as if it did not exist.
        servers = sorted(
            (s for s in snapshot.servers_of(key.tenant_id) if enforce.usable(snapshot, key, s)), key=lambda s: s.name
        )
        lists = await asyncio.gather(
            *(self.server_list(s, kind, method, snapshot.version, span=span) for s in servers)
        )
        items: list[dict] = []
        unavailable = []
        for server, listed in zip(servers, lists):
            if listed is None:
                unavailable.append(server.name)
                continue
            listed = enforce.visible(snapshot, key, server, kind, listed)  # what this caller may use
            for item in listed:
                if kind in ("resources", "resourceTemplates"):
                    # Resources keep their name; their URI says which server they are on.
                    field = "uri" if kind == "resources" else "uriTemplate"
                    uri = item.get(field)
                    if not isinstance(uri, str) or not uri:
                        log.warning("left out a resource of server %s without a %s", server.name, field)
                        continue
                    items.append({**item, field: namespaced_uri(server.name, uri)})
                    continue
                name = f"{server.name}{SEPARATOR}{item.get('name', '')}"
                if kind == "tools" and not _TOOL_NAME.fullmatch(name):
                    log.warning("left out tool %r of server %s: the prefixed name breaks the tool-name rule",
                                item.get("name"), server.name)
                    continue
                items.append({**item, "name": name})
        end = offset + self.page_size
        result: dict[str, Any] = {kind: items[offset:end]}
        if end < len(items):
            result["nextCursor"] = _make_cursor(end, snapshot.version)
        if unavailable:
            result["_meta"] = {"mcp-gateway/unavailable": unavailable}
        return result

    async def server_list(
        self, server: ServerEntry, kind: str, method: str, version: int, *, fresh: bool = False, span=None
    ) -> list[dict] | None:
        """One server's whole list (all pages), from the cache unless `fresh`; None if the server failed.

        `span`: the request's, when tracing is on; a fetch is then one `upstream` span (all its pages).
        """
        cache_key = (server.id, kind, version)
        cached = self._cache.get(cache_key)
        now = time.monotonic()
        if cached is not None and cached[0] > now and not fresh:
            return cached[1]
        if self.guard is not None and not self.guard.usable(server):
            return None  # its breaker is open (or it is down): left out at once, not after a timeout
        client = self.client_for(server)
        try:
            if span is None:
                items = await self._pages(client, kind, method)
            else:
                tracer = self.tracer
                items = await tracer.call(span, server.name, lambda: self._pages(client, kind, method, tracer))
        except UpstreamRpcError as exc:
            if exc.error.get("code") == METHOD_NOT_FOUND:
                items = []  # the server has no such capability: an empty list, not an outage
            else:
                log.warning("server %s refused %s: %s", server.name, method, exc)
                return None
        except (UpstreamError, TimeoutError, OSError) as exc:
            log.warning("server %s did not answer %s: %s", server.name, method, exc)
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[cache_key] = (now + LIST_TTL, items)
        return items

    async def _pages(self, client, kind: str, method: str, tracer=None) -> list[dict]:
        """Every page of one list, within the aggregate's timeout; `tracer`: each page carries the current span."""
        items: list[dict] = []
        cursor = None
        async with asyncio.timeout(self.timeout):
            for _ in range(MAX_UPSTREAM_PAGES):
                params = {"cursor": cursor} if cursor else {}
                if tracer is not None:
                    params = tracer.with_context(params)
                result = await client.request(method, params)
                items.extend(i for i in result.get(kind, []) if isinstance(i, dict))
                cursor = result.get("nextCursor")
                if not cursor:
                    break
        return items

    # -- calls ----------------------------------------------------------------------------------
    async def _route(
        self, snapshot: Snapshot, key: KeyEntry, method: str, params: dict, down: Downstream | None, span=None
    ):
        if method == "resources/read":
            return await self._read_resource(snapshot, key, params, down, span)
        full = params.get("name")
        if not isinstance(full, str):
            raise UpstreamRpcError({"code": INVALID_PARAMS, "message": f"{method} needs params.name as a string"})
        server_name, sep, name = full.partition(SEPARATOR)
        server = snapshot.server(key.tenant_id, server_name) if sep and name else None
        if server is None or not enforce.usable(snapshot, key, server):
            what = "tool" if method == "tools/call" else "prompt"
            raise UpstreamRpcError({"code": INVALID_PARAMS, "message": f"Unknown {what}: {full}"})
        enforce.check_target(snapshot, key, server, enforce.TARGETS[method][0], name, shown=full)
        if self.guard is not None:
            # A routing rule may send the call to another replica of the server.
            server = self.guard.route(snapshot, server, name if method == "tools/call" else None)[0]
        return await self._forward(server, method, params, "name", name, down, key.tenant_id, span), server

    async def _read_resource(
        self, snapshot: Snapshot, key: KeyEntry, params: dict, down: Downstream | None, span=None
    ):
        uri = params.get("uri")
        if not isinstance(uri, str):
            raise UpstreamRpcError({"code": INVALID_PARAMS, "message": "resources/read needs params.uri as a string"})
        server_name, original = original_uri(uri)
        server = snapshot.server(key.tenant_id, server_name) if server_name else None
        if server is None or not enforce.usable(snapshot, key, server):
            # An unknown resource is -32602 with the URI in `data` (SEP-2164, the
            # 2026-07-28 spec; its earlier -32002 is retired and never reused). The
            # SDK's servers answer so in every era, and so does the gateway. The same
            # answer whether the server does not exist or is another tenant's.
            message = f"Unknown resource: {uri}"
            if server_name is None:
                message += f" (resources here are named {_URI_PREFIX}{{server}}/{{original URI}})"
            raise UpstreamRpcError({"code": INVALID_PARAMS, "message": message, "data": {"uri": uri}})
        enforce.check_target(snapshot, key, server, enforce.RESOURCE, original, shown=uri)
        try:
            result = await self._forward(server, "resources/read", params, "uri", original, down, key.tenant_id, span)
        except UpstreamRpcError as exc:
            data = exc.error.get("data")
            if isinstance(data, dict) and data.get("uri") == original:
                exc.error["data"] = {**data, "uri": uri}  # the URI the client knows
            raise
        contents = result.get("contents")
        if isinstance(contents, list):
            result["contents"] = [
                {**c, "uri": namespaced_uri(server.name, c["uri"])}
                if isinstance(c, dict) and isinstance(c.get("uri"), str) else c
                for c in contents
            ]
        return result, server

    async def _forward(
        self, server: ServerEntry, method: str, params: dict, field: str, value: str, down: Downstream | None,
        tenant_id: uuid.UUID | None = None, span=None,
    ) -> dict:
        """`method` on `server` with params[field] = value and the client's own `_meta` keys only."""
        forwarded = {k: v for k, v in params.items() if k != "_meta"}
        forwarded[field] = value
        meta = {k: v for k, v in (params.get("_meta") or {}).items() if not k.startswith(_ENVELOPE_PREFIX)}
        if meta:
            forwarded["_meta"] = meta
        try:
            return await self._guarded(server, tenant_id, self.client_for(server), method, forwarded, down, span)
        except UpstreamTimeout as exc:
            raise _upstream_refusal(504, server, f"did not answer in time: {exc}") from None
        except (UpstreamError, OSError) as exc:
            raise _upstream_refusal(502, server, f"is unreachable or broke the exchange: {exc}") from None


def namespaced_uri(server: str, uri: str) -> str:
    """The URI (or URI template) `uri` of server `server` as `/mcp` names it."""
    return f"{_URI_PREFIX}{server}/{uri}"


def original_uri(uri: str) -> tuple[str, str] | tuple[None, None]:
    """(server, original URI) of a URI `namespaced_uri` made; (None, None) for any other URI."""
    # The scheme is case-insensitive (RFC 3986 3.1); the rest is taken as it is.
    if uri[: len(_URI_PREFIX)].lower() != _URI_PREFIX:
        return None, None
    server, sep, original = uri[len(_URI_PREFIX):].partition("/")
    if not (sep and server and original):
        return None, None
    return server, original


def _upstream_refusal(status: int, server: ServerEntry, what: str) -> Refusal:
    from gateway.dataplane.jsonrpc import UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE

    code = UPSTREAM_TIMEOUT if status == 504 else UPSTREAM_UNAVAILABLE
    return Refusal(status, code, f"Server '{server.name}' {what}")


def _make_cursor(offset: int, version: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"o": offset, "v": version})).decode("ascii")


def _read_cursor(cursor: Any, version: int) -> int:
    if cursor is None:
        return 0
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor))
        offset = int(data["o"])
        if offset < 0:
            raise ValueError
    except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        raise UpstreamRpcError({"code": INVALID_PARAMS, "message": "Invalid cursor"}) from None
    if data.get("v") != version:
        # The servers behind the list changed since this cursor was made.
        raise UpstreamRpcError({"code": INVALID_PARAMS, "message": "Invalid cursor: the list changed; start over"})
    return offset
