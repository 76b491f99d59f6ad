"""Access decisions applied to MCP messages: refusals for calls, filtered list answers.

`gateway.auth.access` decides; this module applies its decisions on every path
by which a client reaches an upstream: the byte pass-through of
`/servers/{name}/mcp` (server.py), the `/mcp` aggregate and the single-server
facade (aggregate.py), and the bridged SSE and WebSocket transports
(bridge.py). Lists show exactly what the calls allow, because both are decided
by the same `access.decide`.

It must keep the common case free: a call whose principal has nothing that
could be hidden from it gets no `ListFilter`, and its answer passes as bytes.

Refusals: a tool, prompt or resource the principal may not use is 403
`-32031` naming it (on its own tenant's server, so nothing of another tenant's
is said); a server it may not use at all is answered like a server that does
not exist (404 `-32032` on `/servers/{name}/mcp`, "Unknown tool" on `/mcp`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from gateway.auth import access
from gateway.auth.access import PROMPT, RESOURCE, TOOL, Principal
from gateway.dataplane.jsonrpc import FORBIDDEN, UNKNOWN_SERVER, Call, Refusal
from gateway.dataplane.upstream import UpstreamError
from gateway.snapshot import ServerEntry, Snapshot

# List method -> (key of its items in the result, kind of item, the item's field that names it).
LISTS = {
    "tools/list": ("tools", TOOL, "name"),
    "prompts/list": ("prompts", PROMPT, "name"),
    "resources/list": ("resources", RESOURCE, "uri"),
    "resources/templates/list": ("resourceTemplates", RESOURCE, "uriTemplate"),
}
_LIST_KINDS = {key: (key, kind, field) for key, kind, field in LISTS.values()}
# Methods that use one item, and the params field naming it (`Call.target` carries it).
TARGETS = {"tools/call": (TOOL, "name"), "prompts/get": (PROMPT, "name"), "resources/read": (RESOURCE, "uri")}
# Methods naming an item that `Call` does not read: checked from params (they are rare).
_PARAM_TARGETS = frozenset({"resources/subscribe", "resources/unsubscribe", "completion/complete"})
_VERB = {TOOL: "call tool", PROMPT: "get prompt", RESOURCE: "read resource"}
# Methods where a config:// resource could be named or listed (refused or hidden for all but ADMIN).
_TOUCHES_RESOURCES = frozenset(
    {"resources/read", "resources/list", "resources/templates/list", "resources/subscribe", "resources/unsubscribe",
     "completion/complete"}
)
# One upstream SSE event held back for rewriting (bridge.py bounds events alike).
MAX_EVENT_BYTES = 16 * 1024 * 1024


def unknown_server(name: str) -> Refusal:
    """The answer for a server that does not exist, is another tenant's, or may not be used by this principal."""
    return Refusal(404, UNKNOWN_SERVER, f"No MCP server named '{name}' is available to you")


def forbidden(server: ServerEntry, kind: str, name: str, decision: access.Decision) -> Refusal:
    return Refusal(
        403, FORBIDDEN, f"Forbidden: you may not {_VERB[kind]} '{name}' on server '{server.name}': {decision.reason}"
    )


# -- tool-definition pinning (registry/discovery.py) ----------------------------------------------
# A tool whose definition changed since an admin approved it is withheld, where its tenant
# asks for that, exactly like a tool the caller may not use: not listed, and refused (403
# -32031) with a message saying why. `Snapshot.withheld` holds such tools by server.
_TOOL_METHODS = frozenset({"tools/call", "tools/list"})


def withheld(snapshot: Snapshot, server: ServerEntry, name: str) -> bool:
    names = snapshot.withheld.get(server.id)
    return names is not None and name in names


def _withheld_refusal(server: ServerEntry, name: str) -> Refusal:
    return Refusal(
        403, FORBIDDEN, f"Forbidden: tool '{name}' on server '{server.name}' changed its definition since an admin "
        "approved it; it is withheld until an admin approves the new definition",
    )


def _may_hide(snapshot: Snapshot, principal: Principal, server: ServerEntry, kind: str) -> bool:
    return access.may_hide(snapshot, principal, server, kind) or (kind == TOOL and server.id in snapshot.withheld)


def usable(snapshot: Snapshot, principal: Principal, server: ServerEntry) -> bool:
    """May the principal use `server` at all? One dict lookup when its tenant has no rules for it."""
    rules = snapshot.access.by_server.get(server.id)
    if rules is None:  # the common case, without a call into access.usable
        return server.tenant_id == principal.tenant_id
    return access.usable(snapshot, principal, server).allowed


def check_method(principal: Principal, method: str | None) -> None:
    """Refuse (403) a method the principal's role may not use."""
    decision = access.method_permitted(principal, method)
    if not decision:
        raise Refusal(403, FORBIDDEN, f"Forbidden: {decision.reason}")


def check_target(
    snapshot: Snapshot, principal: Principal, server: ServerEntry, kind: str, name: str, shown: str | None = None
) -> None:
    """Refuse (403) the use of item `name` of `server`; `shown` is the name as the client wrote it."""
    decision = access.decide(snapshot, principal, server, kind, name)
    if not decision:
        raise forbidden(server, kind, shown if shown is not None else name, decision)
    if kind == TOOL and withheld(snapshot, server, name):
        raise _withheld_refusal(server, shown if shown is not None else name)


def check_params(snapshot: Snapshot, principal: Principal, server: ServerEntry, method: str, params: Any) -> None:
    """The checks of one request whose params are decoded (the facade, batches): role, then the item it names."""
    check_method(principal, method)
    if not isinstance(params, dict):
        return
    target = TARGETS.get(method)
    if target is not None:
        name = params.get(target[1])
        if isinstance(name, str):
            check_target(snapshot, principal, server, target[0], name)
    elif method in _PARAM_TARGETS:
        _check_named_in_params(snapshot, principal, server, method, params)


def _check_named_in_params(snapshot: Snapshot, principal: Principal, server: ServerEntry, method: str, params: dict):
    if method == "completion/complete":
        # Completing a prompt's or a resource template's arguments is using it.
        ref = params.get("ref")
        if not isinstance(ref, dict):
            return
        if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            check_target(snapshot, principal, server, PROMPT, ref["name"])
        elif ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
            check_target(snapshot, principal, server, RESOURCE, ref["uri"])
    elif isinstance(params.get("uri"), str):  # resources/subscribe, resources/unsubscribe
        check_target(snapshot, principal, server, RESOURCE, params["uri"])


def check_call(
    snapshot: Snapshot, principal: Principal, server: ServerEntry, call: Call, body: bytes
) -> ListFilter | None:
    """Check a message bound for `server` as it is (the pass-through and the bridges).

    Raises a Refusal for what the principal may not do; returns a `ListFilter`
    when the answer is a list that could hold something the principal may not
    use, else None (the answer passes as bytes).
    """
    if call.is_batch:
        return _check_batch(snapshot, principal, server, body)
    method = call.method
    if method is None:
        return None  # a response to the server's own request
    if access.unrestricted(snapshot, principal, server) and (
        principal.role == access.ADMIN or method not in _TOUCHES_RESOURCES
    ) and (server.id not in snapshot.withheld or method not in _TOOL_METHODS):
        return None  # the common case: no rule here, a role that may do anything, no config:// at stake
    check_method(principal, method)
    target = TARGETS.get(method)
    if target is not None:
        if call.target is not None:
            check_target(snapshot, principal, server, target[0], call.target)
        return None
    listed = LISTS.get(method)
    if listed is not None:
        if call.request_id is None or not _may_hide(snapshot, principal, server, listed[1]):
            return None
        return ListFilter(snapshot, principal, server, {call.request_id: listed}, single=listed)
    if method in _PARAM_TARGETS:
        try:
            params = orjson.loads(body).get("params")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        check_params(snapshot, principal, server, method, params)
    return None


def _check_batch(snapshot: Snapshot, principal: Principal, server: ServerEntry, body: bytes) -> ListFilter | None:
    """Every request of a JSON-RPC batch is checked; one refused request refuses the batch."""
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # parse_body has refused it already
    pending: dict[Any, tuple[str, str, str]] = {}
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("method"), str):
            continue
        method = item["method"]
        check_params(snapshot, principal, server, method, item.get("params"))
        listed = LISTS.get(method)
        request_id = item.get("id")
        if listed is not None and isinstance(request_id, (int, str)) and _may_hide(
            snapshot, principal, server, listed[1]
        ):
            pending[request_id] = listed
    return ListFilter(snapshot, principal, server, pending) if pending else None


def visible(snapshot: Snapshot, principal: Principal, server: ServerEntry, key: str, items: list) -> list:
    """The items of one server's list (`key`: tools, prompts, resources, resourceTemplates) the principal may use.

    `items` itself when nothing could be hidden. Resource templates are kept
    when their template text, read as a URI, is allowed: a template whose
    expansions a rule allows only in part is listed, and its denied expansions
    are refused when read.
    """
    _, kind, field = _LIST_KINDS[key]
    if not _may_hide(snapshot, principal, server, kind):
        return items
    hidden = snapshot.withheld.get(server.id, ()) if kind == TOOL else ()
    return [
        item for item in items
        if isinstance(item, dict) and isinstance(item.get(field), str)
        and access.decide(snapshot, principal, server, kind, item[field]) and item[field] not in hidden
    ]


def filter_result(snapshot: Snapshot, principal: Principal, server: ServerEntry, method: str, result: Any) -> None:
    """Filter, in place, a list result the facade got from `server` (non-list results are left alone)."""
    listed = LISTS.get(method)
    if listed is None or not isinstance(result, dict) or not isinstance(result.get(listed[0]), list):
        return
    result[listed[0]] = visible(snapshot, principal, server, listed[0], result[listed[0]])


class ListFilter:
    """Filters the list answers among an upstream's messages for one request (or batch) of one principal."""

    __slots__ = ("snapshot", "principal", "server", "pending", "single")

    def __init__(
        self, snapshot: Snapshot, principal: Principal, server: ServerEntry,
        pending: dict[Any, tuple[str, str, str]], single: tuple[str, str, str] | None = None,
    ) -> None:
        self.snapshot, self.principal, self.server = snapshot, principal, server
        self.pending = pending  # request id -> LISTS entry
        # A lone list request: any answer carrying its list is filtered, whatever id the upstream gave it.
        self.single = single

    def message(self, data: bytes) -> bytes:
        """One upstream message (or batch), its list answers filtered; other bytes come back unchanged."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if isinstance(message, list):
            answers = [self._filter(m) for m in message]
            if all(a is m for a, m in zip(answers, message)):
                return data
            return orjson.dumps(answers)
        answer = self._filter(message)
        return data if answer is message else orjson.dumps(answer)

    def _filter(self, message: Any) -> Any:
        if not isinstance(message, dict) or not isinstance(message.get("result"), dict):
            return message
        request_id = message.get("id")
        listed = self.pending.get(request_id) if isinstance(request_id, (int, str)) else None
        listed = listed or self.single
        if listed is None:
            return message
        result = message["result"]
        key = listed[0]
        if not isinstance(result.get(key), list):
            return message
        kept = visible(self.snapshot, self.principal, self.server, key, result[key])
        return {**message, "result": {**result, key: kept}}

    def chunks(self, upstream: AsyncIterator[bytes]) -> FilteredChunks:
        """An upstream SSE body, chunk by chunk, with its list answers filtered."""
        return FilteredChunks(upstream, SseRewriter(self.message))


class SseRewriter:
    """Rewrites the data of each complete SSE event; every other byte passes as it came.

    An event is held back until its blank line arrives (to rewrite it whole);
    its `id:`, `event:` and `retry:` lines and comments are kept, so resumption
    (Last-Event-ID) works as before. Line breaks: CRLF, LF or CR (the SSE rules).
    """

    __slots__ = ("_rewrite", "_limit", "_buf", "_scan", "_lines", "_size")

    def __init__(self, rewrite: Callable[[bytes], bytes], limit: int = MAX_EVENT_BYTES) -> None:
        self._rewrite = rewrite
        self._limit = limit
        self._buf = bytearray()  # bytes of an unfinished line
        self._scan = 0  # where in _buf the search for a line break goes on
        self._lines: list[tuple[bytes, bytes | None]] = []  # (raw line, its data value or None) of this event
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf
        buf += chunk
        out = bytearray()
        pos, end = 0, len(buf)
        scan = self._scan
        while scan < end:
            lf = buf.find(b"\n", scan)
            cr = buf.find(b"\r", scan, lf if lf >= 0 else end)
            if cr >= 0:
                if cr + 1 == end:
                    break  # a CR last: a LF may follow in the next chunk
                stop, after = cr, (cr + 2 if buf[cr + 1] == 0x0A else cr + 1)
            elif lf >= 0:
                stop, after = lf, lf + 1
            else:
                scan = end
                break
            self._line(bytes(buf[pos:stop]), bytes(buf[pos:after]), out)
            pos = scan = after
        if pos:
            del buf[:pos]
            scan -= pos
        self._scan = max(scan, 0)
        if len(buf) + self._size > self._limit:
            raise UpstreamError(f"an upstream SSE event exceeds {self._limit} bytes")
        return bytes(out)

    def finish(self) -> bytes:
        """What is left when the upstream ends: an unfinished last event, rewritten all the same."""
        out = bytearray()
        if self._buf:
            line = bytes(self._buf).rstrip(b"\r")
            self._line(line, bytes(self._buf), out)
            self._buf.clear()
        if self._lines:
            out += self._event(b"")
        return bytes(out)

    def _line(self, line: bytes, raw: bytes, out: bytearray) -> None:
        if not line:
            out += self._event(raw)
            return
        value = None
        if line == b"data" or line.startswith(b"data:"):
            value = line[5:]
            if value[:1] == b" ":
                value = value[1:]
        self._lines.append((raw, value))
        self._size += len(raw)

    def _event(self, blank: bytes) -> bytes:
        lines, self._lines, self._size = self._lines, [], 0
        data = [value for _, value in lines if value is not None]
        if data:
            joined = b"\n".join(data)
            rewritten = self._rewrite(joined)
            if rewritten is not joined and rewritten != joined:
                kept = b"".join(raw for raw, value in lines if value is None)
                end = blank or b"\n"  # the upstream's own line break
                return kept + b"data: " + rewritten + end + end
        return b"".join(raw for raw, _ in lines) + blank


class FilteredChunks:
    """An async iterator of chunks passed through an `SseRewriter`; `aclose` closes the upstream's."""

    __slots__ = ("_upstream", "_rewriter", "_done")

    def __init__(self, upstream: AsyncIterator[bytes], rewriter: SseRewriter) -> None:
        self._upstream = upstream
        self._rewriter = rewriter
        self._done = False

    def __aiter__(self) -> FilteredChunks:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            try:
                chunk = await self._upstream.__anext__()
            except StopAsyncIteration:
                self._done = True
                tail = self._rewriter.finish()
                if tail:
                    return tail
                break
            out = self._rewriter.feed(chunk)
            if out:
                return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._upstream.aclose()
