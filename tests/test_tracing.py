"""OpenTelemetry tracing, end to end: real gateways exporting to a real OTLP/HTTP receiver.

The receiver is an aiohttp server in the test taking POST /v1/traces
(application/x-protobuf) as a collector does, each body decoded with the
collector's own `ExportTraceServiceRequest`; its raw bytes are kept too, to
search them for secrets. The upstream is an aiohttp JSON-RPC server that
records the headers and params each message brought (and a WebSocket one, for
the transports without headers). Clients are plain aiohttp: Streamable HTTP
on `/servers/{name}/mcp` and `/mcp`, and the bridged 2024-11-05 SSE and
WebSocket transports. The gateway is configured by the standard OTEL_*
variables only, set before it starts (the SDK reads them when the gateway
builds its provider).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web
from harness import LocalPeer, start_gateway
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus

from gateway import tracing
from gateway.dataplane import jsonrpc

SECRET_ARGUMENT = "hunter2-" + secrets.token_hex(8)  # a tool argument: params never reach an attribute
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "work", "arguments": {"password": SECRET_ARGUMENT}}}
AGGREGATE_CALL = {**CALL, "params": {**CALL["params"], "name": "recorder__work"}}  # the same tool through /mcp


@dataclass
class ExportedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    error: bool
    status_message: str
    resource: dict = field(repr=False)


def _values(attributes) -> dict:
    out = {}
    for kv in attributes:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


class Receiver(LocalPeer):
    """An OTLP/HTTP trace endpoint: what a collector would have received."""

    PATH = "/v1/traces"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[ExportedSpan] = []
        self.content_types: set[str] = set()

    async def _handle(self, request: web.Request) -> web.Response:
        self.content_types.add(f"{request.content_type};{request.headers.get('Content-Encoding', '')}")
        body = await request.read()
        self.bodies.append(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = _values(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ExportedSpan(
                        name=span.name, kind=span.kind, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), attributes=_values(span.attributes),
                        error=span.status.code == ProtoStatus.STATUS_CODE_ERROR, status_message=span.status.message,
                        resource=resource,
                    ))
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> dict[str, ExportedSpan]:
        spans = self.spans_of(trace_id)
        by_name = {s.name: s for s in spans}
        assert len(by_name) == len(spans), f"a span name twice in one trace: {[s.name for s in spans]}"
        return by_name

    def spans_of(self, trace_id: str) -> list[ExportedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        """Until `count` spans have arrived in all (the processor exports every OTEL_BSP_SCHEDULE_DELAY)."""
        deadline = time.monotonic() + timeout
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} spans arrived, {count} expected: {self.spans}"
            await asyncio.sleep(0.02)

    async def first(self, predicate, timeout: float = 15.0) -> ExportedSpan:
        """The first span to arrive that matches `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            for span in self.spans:
                if predicate(span):
                    return span
            assert time.monotonic() < deadline, f"no such span among {self.spans}"
            await asyncio.sleep(0.02)


@dataclass
class Received:
    """One message an upstream received: its method, the HTTP headers it came with, its params."""

    method: str | None
    headers: dict[str, list[str]]
    params: dict

    @property
    def meta(self) -> dict:
        return self.params.get("_meta") or {}


class Upstream(LocalPeer):
    """A JSON-RPC upstream that records every message; `fail` answers calls and pings with HTTP 500."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.fail = False

    @property
    def calls(self) -> list[dict[str, list[str]]]:
        """The headers of each tools/call."""
        return [r.headers for r in self.got("tools/call")]

    def got(self, method: str) -> list[Received]:
        return [r for r in self.received if r.method == method]

    async def _handle(self, request: web.Request) -> web.Response:
        message = await request.json()
        method = message.get("method")
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        self.received.append(Received(method, headers, message.get("params") or {}))
        if "id" not in message:
            return web.Response(status=202)
        if self.fail and method in ("tools/call", "ping"):
            return web.json_response({"error": "boom"}, status=500)
        if method == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "recorder", "version": "1"}}
        elif method == "tools/call":
            result = {"content": [{"type": "text", "text": "done"}]}
        elif method == "server/discover":
            return web.json_response({"jsonrpc": "2.0", "id": message["id"],
                                      "error": {"code": -32601, "message": "Method not found"}})
        else:
            result = {"tools": [], "resources": [], "prompts": []}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})


class SocketUpstream:
    """An MCP server on WebSocket (subprotocol `mcp`, one message per text frame), answering each connection
    on its own and recording every message: the gateway reaches it with no HTTP header per message."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/ws", self._socket)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"ws://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/ws"

    async def stop(self) -> None:
        await self._runner.cleanup()

    def got(self, method: str) -> list[dict]:
        return [m for m in self.received if m.get("method") == method]

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("mcp",))
        await ws.prepare(request)
        async for frame in ws:
            if frame.type is not WSMsgType.TEXT:
                continue
            message = orjson.loads(frame.data)
            self.received.append(message)
            method = message.get("method")
            if "id" not in message or method is None:
                continue
            if method == "initialize":
                result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                          "serverInfo": {"name": "socket", "version": "1"}}
            elif method == "tools/call":
                result = {"content": [{"type": "text", "text": "done"}]}
            elif method.endswith("/list"):
                result = {"tools": [], "resources": [], "resourceTemplates": [], "prompts": []}
            else:
                result = {}
            await ws.send_str(orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).decode())
        return ws


@pytest.fixture
async def receiver():
    running = Receiver()
    url = await running.start()
    running.url = url
    yield running
    await running.stop()


@pytest.fixture
async def upstream():
    running = Upstream()
    running.url = await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def socket_upstream():
    running = SocketUpstream()
    running.url = await running.start()
    yield running
    await running.stop()


@pytest.fixture
def no_otel_env(monkeypatch):
    """No OTEL_* variable of the machine's: each test sets the ones it is about."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def otel_env(no_otel_env, receiver):
    """Tracing on, exported to `receiver` every 50 ms."""
    no_otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
    no_otel_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return no_otel_env


async def post(url: str, key: str, body: dict, **headers) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}",
                                                      "Accept": "application/json, text/event-stream",
                                                      **headers}) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else {})


def _traceparent(value: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id, flags


_STEPS = ("authenticate", "limit", "route", "upstream")


def _request_root(spans: dict) -> object:
    """A proxied call's spans are its root and the four steps, each a child of the root: the root."""
    assert set(spans) == {"mcp.request", *_STEPS}
    root = spans["mcp.request"]
    for name in _STEPS:
        assert spans[name].parent_span_id == root.span_id, name
    return root


def _client_context() -> tuple[str, str, str]:
    """A client's trace id, span id, and the `traceparent` naming them (sampled)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def add_server(gw, tenant_id: str, name: str, url: str, transport: str = "http") -> None:
    status, body = await gw.admin("POST", "/servers", {"tenant_id": tenant_id, "name": name, "endpoint_url": url,
                                                       "transport_type": transport})
    assert status == 201, body
    deadline = time.monotonic() + 10
    while name not in {s.name for s in gw.gateway.store.current.servers.values()}:
        assert time.monotonic() < deadline, f"server {name} never reached the snapshot"
        await asyncio.sleep(0.02)


class BridgedClient:
    """A raw client of the bridged transports: `send` one message, `answer` reads until the response to an id."""

    def __init__(self, transport: str, http: aiohttp.ClientSession, key: str) -> None:
        self.transport, self.http, self.key = transport, http, key
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.stream: aiohttp.ClientResponse | None = None
        self.endpoint = ""

    async def send(self, message: dict, **headers) -> None:
        if self.ws is not None:
            await self.ws.send_str(orjson.dumps(message).decode())
            return
        async with self.http.post(self.endpoint, data=orjson.dumps(message), headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **headers,
        }) as resp:
            assert resp.status == 202, await resp.text()

    async def answer(self, request_id) -> dict:
        async with asyncio.timeout(15):
            while True:
                if self.ws is not None:
                    message = orjson.loads((await self.ws.receive()).data)
                else:
                    event, data = await self.event()
                    assert event == "message", (event, data)
                    message = orjson.loads(data)
                if message.get("id") == request_id and "method" not in message:
                    return message

    async def event(self) -> tuple[str, str]:
        event, data = "message", []
        while True:
            line = (await self.stream.content.readline()).decode().rstrip("\r\n")
            if not line:
                if data:
                    return event, "\n".join(data)
                assert not self.stream.content.at_eof(), "the stream ended"
                continue
            name, _, value = line.partition(":")
            if name == "event":
                event = value.strip()
            elif name == "data":
                data.append(value.removeprefix(" "))


@contextlib.asynccontextmanager
async def bridged(gw, t, transport: str):
    """A client connected to `t`'s server over the 2024-11-05 SSE transport or WebSocket."""
    base = f"{gw.url}/servers/{t.server_name}"
    auth = {"Authorization": f"Bearer {t.api_key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        client = BridgedClient(transport, http, t.api_key)
        if transport == "websocket":
            async with http.ws_connect(base.replace("http://", "ws://") + "/ws", protocols=("mcp",),
                                       headers=auth) as client.ws:
                yield client
        else:
            async with http.get(base + "/sse", headers=auth) as client.stream:
                event, data = await client.event()
                assert event == "endpoint", (event, data)
                client.endpoint = gw.url + data
                yield client


async def test_a_request_is_one_trace_of_its_stages_continued_upstream(
    otel_env, receiver, upstream, pg_url, make_gateway
):
    otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,team=platform")
    gw = await make_gateway(pg_url)
    assert gw.gateway.dataplane.tracer is not None
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    status, body = await post(t.endpoint, t.api_key, CALL, traceparent=f"00-{client_trace}-{client_span}-01")
    assert status == 200, body
    status, body = await post(t.endpoint, t.api_key, CALL)  # no traceparent: a trace of its own
    assert status == 200, body
    await receiver.wait_for(10)

    spans = receiver.trace(client_trace)
    root = _request_root(spans)
    assert root.kind == ProtoSpan.SPAN_KIND_SERVER
    assert root.parent_span_id == client_span  # the client's span is the parent: its trace goes on
    assert spans["upstream"].kind == ProtoSpan.SPAN_KIND_CLIENT
    assert spans["authenticate"].kind == ProtoSpan.SPAN_KIND_INTERNAL
    assert root.attributes == {
        "http.request.method": "POST", "http.response.status_code": 200, "mcp.method": "tools/call",
        "mcp.tool": "work", "gateway.server": "recorder", "gateway.tenant_id": t.tenant_id,
    }
    assert not root.error
    assert spans["route"].attributes == {"gateway.server": "recorder"}
    assert spans["upstream"].attributes == {"gateway.server": "recorder", "http.response.status_code": 200}
    assert not any(s.error for s in spans.values())
    assert root.resource["service.name"] == "mcp-gateway"  # the default, no OTEL_SERVICE_NAME
    assert root.resource["deployment.environment"] == "test" and root.resource["team"] == "platform"

    # The upstream saw the same trace, its parent the gateway's upstream span; the client's own
    # traceparent was replaced, not forwarded beside it.
    first, second = upstream.calls
    assert len(first["traceparent"]) == 1
    trace_id, parent, flags = _traceparent(first["traceparent"][0])
    assert (trace_id, parent, flags) == (client_trace, spans["upstream"].span_id, "01")
    # The second request: a new root trace, carried upstream the same way.
    other = {s.trace_id for s in receiver.spans} - {client_trace}
    assert len(other) == 1
    second_spans = receiver.trace(other.pop())
    assert set(second_spans) == set(spans)
    assert second_spans["mcp.request"].parent_span_id == ""
    assert _traceparent(second["traceparent"][0])[:2] == (
        second_spans["mcp.request"].trace_id, second_spans["upstream"].span_id
    )

    assert receiver.content_types == {"application/x-protobuf;"}
    exported = b"".join(receiver.bodies)
    for secret in (t.api_key, t.api_key.rsplit("_", 1)[1], SECRET_ARGUMENT, "Bearer"):
        assert secret.encode() not in exported, secret


async def test_a_rate_limited_request_names_its_tier(otel_env, receiver, upstream, pg_url, make_gateway):
    otel_env.setenv("OTEL_SERVICE_NAME", "edge-gateway")
    gw = await make_gateway(pg_url, limits={"burst_seconds": 60, "roles": '{"USER": 1}'})
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    assert (await post(t.endpoint, t.api_key, CALL))[0] == 200
    refused_trace = secrets.token_hex(16)
    status, body = await post(t.endpoint, t.api_key, CALL, traceparent=f"00-{refused_trace}-{secrets.token_hex(8)}-01")
    assert status == 429 and body["error"]["data"]["tier"] == "user"
    await receiver.wait_for(5 + 3)

    spans = receiver.trace(refused_trace)
    assert set(spans) == {"mcp.request", "authenticate", "limit"}  # refused before routing: nothing upstream
    root, limit = spans["mcp.request"], spans["limit"]
    assert root.attributes["gateway.rate_limit.tier"] == "user"
    assert root.attributes["http.response.status_code"] == 429
    assert root.attributes["rpc.jsonrpc.error_code"] == jsonrpc.RATE_LIMITED
    assert root.error and "Rate limit exceeded" in root.status_message
    assert limit.attributes["gateway.rate_limit.tier"] == "user" and limit.error
    assert not spans["authenticate"].error
    assert root.resource["service.name"] == "edge-gateway"
    assert len(upstream.calls) == 1


async def test_an_open_breaker_shows_on_the_route_span(otel_env, receiver, upstream, pg_url, make_gateway):
    gw = await make_gateway(pg_url, upstreams={"breaker_consecutive_failures": 2, "breaker_open_seconds": 60,
                                               "retry_attempts": 0})
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    upstream.fail = True
    for _ in range(2):
        assert (await post(t.endpoint, t.api_key, CALL))[0] == 500  # the upstream's own answer
    status, body = await post(t.endpoint, t.api_key, CALL)
    assert status == 503 and body["error"]["data"]["breaker"] == "open"
    assert len(upstream.calls) == 2
    await receiver.wait_for(5 + 5 + 4)

    traces: dict[str, dict[str, ExportedSpan]] = {}
    for span in receiver.spans:
        traces.setdefault(span.trace_id, {})[span.name] = span
    assert len(traces) == 3
    failed = [s for s in traces.values() if "upstream" in s]
    refused = [s for s in traces.values() if "upstream" not in s]
    assert len(failed) == 2 and len(refused) == 1
    for spans in failed:  # the upstream's 500: an error of the upstream call and of the request
        assert spans["upstream"].error and spans["upstream"].attributes["http.response.status_code"] == 500
        assert spans["mcp.request"].error and spans["mcp.request"].attributes["http.response.status_code"] == 500
    spans = refused[0]
    assert spans["route"].attributes == {"gateway.server": "recorder", "gateway.breaker": "open",
                                         "rpc.jsonrpc.error_code": jsonrpc.UPSTREAM_UNAVAILABLE}
    assert spans["route"].error and "circuit breaker is open" in spans["route"].status_message
    assert spans["mcp.request"].attributes["gateway.breaker"] == "open"
    assert spans["mcp.request"].attributes["http.response.status_code"] == 503


async def test_a_sampler_that_keeps_nothing_still_carries_the_trace_upstream(
    otel_env, receiver, upstream, pg_url, make_gateway
):
    otel_env.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    assert (await post(t.endpoint, t.api_key, CALL))[0] == 200
    await asyncio.to_thread(gw.gateway.tracer.provider.force_flush)
    assert receiver.spans == []
    trace_id, _, flags = _traceparent(upstream.calls[0]["traceparent"][0])
    assert int(flags, 16) & 1 == 0 and trace_id != "0" * 32  # not sampled, but one trace all the same


async def test_stop_exports_what_is_queued(no_otel_env, receiver, upstream, pg_url):
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.removesuffix("/v1/traces"))  # alone turns it on
    no_otel_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # nothing leaves before the stop
    gw = await start_gateway(pg_url)
    try:
        t = await gw.tenancy("acme", upstream.url, server_name="recorder")
        assert (await post(t.endpoint, t.api_key, CALL))[0] == 200
        await asyncio.sleep(0.2)
        assert receiver.spans == []
    finally:
        await gw.gateway.stop()
    assert {s.name for s in receiver.spans} == {"mcp.request", "authenticate", "limit", "route", "upstream"}


async def test_without_otel_variables_nothing_is_traced(no_otel_env, upstream, pg_url, make_gateway):
    gw = await make_gateway(pg_url)
    assert gw.gateway.tracer is None and gw.gateway.dataplane.tracer is None
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    client = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    assert (await post(t.endpoint, t.api_key, CALL, traceparent=client))[0] == 200
    assert upstream.calls[0]["traceparent"] == [client]  # passed through untouched, as any header
    # /mcp composes its own calls: with tracing off they carry no trace context at all.
    assert (await post(f"{gw.url}/mcp", t.api_key, AGGREGATE_CALL, traceparent=client))[0] == 200
    call = upstream.got("tools/call")[1]
    assert "traceparent" not in call.headers and call.meta == {}


async def test_an_aggregate_call_is_traced_as_a_server_call_is(otel_env, receiver, upstream, pg_url, make_gateway):
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    client_trace, client_span, traceparent = _client_context()
    # A context in params._meta as well, of another trace: the gateway's own replaces it.
    foreign = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    call = {**AGGREGATE_CALL, "params": {**AGGREGATE_CALL["params"],
                                         "_meta": {"traceparent": foreign, "tracestate": "v=1", "example.com/n": 1}}}
    status, body = await post(f"{gw.url}/mcp", t.api_key, call, traceparent=traceparent)
    assert status == 200 and body["result"]["content"][0]["text"] == "done", body
    await receiver.wait_for(5)

    spans = receiver.trace(client_trace)
    root = _request_root(spans)
    assert root.kind == ProtoSpan.SPAN_KIND_SERVER and root.parent_span_id == client_span
    assert spans["route"].kind == ProtoSpan.SPAN_KIND_INTERNAL
    assert spans["upstream"].kind == ProtoSpan.SPAN_KIND_CLIENT
    assert root.attributes == {
        "http.request.method": "POST", "http.response.status_code": 200, "mcp.method": "tools/call",
        "mcp.tool": "recorder__work", "gateway.server": "recorder", "gateway.tenant_id": t.tenant_id,
    }
    assert spans["route"].attributes == {"gateway.server": "recorder"}
    assert spans["upstream"].attributes == {"gateway.server": "recorder", "http.response.status_code": 200}
    assert not any(s.error for s in spans.values())

    # The upstream continued the trace under the upstream span: in the header and in params._meta,
    # where the client's own context gave way and its other keys stayed.
    (received,) = upstream.got("tools/call")
    (sent,) = received.headers["traceparent"]
    assert _traceparent(sent) == (client_trace, spans["upstream"].span_id, "01")
    assert received.meta == {"example.com/n": 1, "traceparent": sent}
    exported = b"".join(receiver.bodies)
    for secret in (t.api_key, SECRET_ARGUMENT, foreign):
        assert secret.encode() not in exported, secret

    # An upstream's 500: the upstream span fails with it, and the request with the gateway's 502.
    upstream.fail = True
    failed_trace, _, traceparent = _client_context()
    status, body = await post(f"{gw.url}/mcp", t.api_key, AGGREGATE_CALL, traceparent=traceparent)
    assert status == 502 and body["error"]["code"] == jsonrpc.UPSTREAM_UNAVAILABLE, body
    await receiver.wait_for(5 + 5)
    spans = receiver.trace(failed_trace)
    assert spans["upstream"].error and spans["upstream"].attributes["http.response.status_code"] == 500
    assert spans["mcp.request"].error and spans["mcp.request"].attributes["http.response.status_code"] == 502
    assert spans["mcp.request"].attributes["rpc.jsonrpc.error_code"] == jsonrpc.UPSTREAM_UNAVAILABLE
    assert not spans["route"].error


async def test_an_aggregate_list_is_one_upstream_span_per_server(otel_env, receiver, upstream, pg_url, make_gateway):
    other = Upstream()
    other.url = await other.start()
    try:
        gw = await make_gateway(pg_url)
        t = await gw.tenancy("acme", upstream.url, server_name="alpha")
        await add_server(gw, t.tenant_id, "beta", other.url)
        client_trace, client_span, traceparent = _client_context()
        status, body = await post(f"{gw.url}/mcp", t.api_key, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                  traceparent=traceparent)
        assert status == 200 and "_meta" not in body["result"], body  # both servers answered
        await receiver.wait_for(5)

        spans = receiver.spans_of(client_trace)
        assert sorted(s.name for s in spans) == ["authenticate", "limit", "mcp.request", "upstream", "upstream"]
        (root,) = [s for s in spans if s.name == "mcp.request"]
        assert root.attributes["mcp.method"] == "tools/list" and "gateway.server" not in root.attributes
        calls = {s.attributes["gateway.server"]: s for s in spans if s.name == "upstream"}
        assert set(calls) == {"alpha", "beta"}
        for name, peer in (("alpha", upstream), ("beta", other)):
            span = calls[name]
            assert span.kind == ProtoSpan.SPAN_KIND_CLIENT and span.parent_span_id == root.span_id
            assert span.attributes == {"gateway.server": name, "http.response.status_code": 200} and not span.error
            (listed,) = [r for r in peer.got("tools/list") if "traceparent" in r.headers]
            (sent,) = listed.headers["traceparent"]
            assert _traceparent(sent) == (client_trace, span.span_id, "01")
            assert listed.meta == {"traceparent": sent}
            # Whatever else carried a context (the era's discovery, the session's opening) went inside that
            # call; what the gateway asks on its own (capability discovery at registration) carries none.
            for received in peer.received:
                for value in received.headers.get("traceparent", ()):
                    assert _traceparent(value)[:2] == (client_trace, span.span_id), received
    finally:
        await other.stop()


async def test_a_websocket_upstream_gets_the_context_in_params_meta(
    otel_env, receiver, upstream, socket_upstream, pg_url, make_gateway
):
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    await add_server(gw, t.tenant_id, "sock", socket_upstream.url, "websocket")
    client_trace, client_span, traceparent = _client_context()
    call = {**CALL, "params": {**CALL["params"], "_meta": {"traceparent": traceparent, "example.com/n": 1}}}
    status, body = await post(f"{gw.url}/servers/sock/mcp", t.api_key, call, traceparent=traceparent)
    assert status == 200 and body["result"]["content"][0]["text"] == "done", body
    await receiver.wait_for(5)

    spans = receiver.trace(client_trace)
    root = _request_root(spans)
    assert root.attributes["gateway.server"] == "sock" and root.attributes["mcp.tool"] == "work"
    assert spans["route"].attributes == {"gateway.server": "sock"}
    # No HTTP exchange to name a status of: the server, and the call carried the span in its params.
    assert spans["upstream"].attributes == {"gateway.server": "sock"}
    assert spans["upstream"].kind == ProtoSpan.SPAN_KIND_CLIENT and not spans["upstream"].error
    (received,) = socket_upstream.got("tools/call")
    meta = received["params"]["_meta"]
    assert set(meta) == {"traceparent", "example.com/n"}
    assert _traceparent(meta["traceparent"]) == (client_trace, spans["upstream"].span_id, "01")
    # The handshake and capability discovery went outside any request: no context in them.
    for message in socket_upstream.received:
        if message is not received:
            assert "traceparent" not in (message.get("params") or {}).get("_meta", {}), message


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_each_bridged_message_is_a_request_span_continued_upstream(
    otel_env, receiver, upstream, pg_url, make_gateway, transport
):
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", upstream.url, server_name="recorder")
    client_trace, client_span, traceparent = _client_context()
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    async with bridged(gw, t, transport) as client:
        await client.send(initialize)
        assert "result" in await client.answer(1)
        await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if transport == "sse":  # the message's own POST names the client's span
            await client.send(CALL, traceparent=traceparent)
        else:  # a frame has no headers: the message names it in params._meta
            await client.send({**CALL, "params": {**CALL["params"], "_meta": {"traceparent": traceparent}}})
        assert (await client.answer(CALL["id"]))["result"]["content"][0]["text"] == "done"
        await receiver.wait_for(3 * 3)

    spans = receiver.trace(client_trace)
    assert set(spans) == {"mcp.request", "limit", "upstream"}
    root, limit, call = spans["mcp.request"], spans["limit"], spans["upstream"]
    assert root.kind == ProtoSpan.SPAN_KIND_SERVER and root.parent_span_id == client_span
    assert root.attributes == {
        "gateway.transport": transport, "gateway.server": "recorder", "http.response.status_code": 200,
        "mcp.method": "tools/call", "mcp.tool": "work", "gateway.tenant_id": t.tenant_id,
    }
    assert limit.parent_span_id == root.span_id and limit.kind == ProtoSpan.SPAN_KIND_INTERNAL
    assert call.parent_span_id == root.span_id and call.kind == ProtoSpan.SPAN_KIND_CLIENT
    assert call.attributes == {"gateway.server": "recorder", "http.response.status_code": 200}
    assert not any(s.error for s in spans.values())
    (received,) = upstream.got("tools/call")
    (sent,) = received.headers["traceparent"]
    assert _traceparent(sent) == (client_trace, call.span_id, "01")
    # The message's bytes went upstream as they came: a context the client put in them stays.
    assert received.meta == ({} if transport == "sse" else {"traceparent": traceparent})

    # The other two messages: a trace each, of the same shape, each continued upstream.
    others = {}
    for trace_id in {s.trace_id for s in receiver.spans} - {client_trace}:
        trace = receiver.trace(trace_id)
        assert set(trace) == {"mcp.request", "limit", "upstream"} and trace["mcp.request"].parent_span_id == ""
        others[trace["mcp.request"].attributes["mcp.method"]] = trace
    assert set(others) == {"initialize", "notifications/initialized"}
    assert others["notifications/initialized"]["mcp.request"].attributes["http.response.status_code"] == 202
    for method, trace in others.items():  # (capability discovery sent an initialize too, with no context)
        (received,) = [r for r in upstream.got(method) if "traceparent" in r.headers]
        assert _traceparent(received.headers["traceparent"][0])[1] == trace["upstream"].span_id, method


async def test_a_health_probe_is_a_trace_of_its_own_carried_upstream(
    otel_env, receiver, upstream, pg_url, make_gateway
):
    gw = await make_gateway(pg_url, upstreams={"health_interval": 0.2, "health_timeout": 5.0})
    await gw.tenancy("acme", upstream.url, server_name="recorder")
    probe = await receiver.first(lambda s: s.name == "health.probe")
    assert probe.kind == ProtoSpan.SPAN_KIND_CLIENT and probe.parent_span_id == "" and not probe.error
    assert probe.attributes == {"gateway.server": "recorder", "mcp.method": "ping", "http.response.status_code": 200}
    (ping,) = [r for r in upstream.got("ping")
               if _traceparent(r.headers["traceparent"][0])[:2] == (probe.trace_id, probe.span_id)]
    assert ping.meta == {"traceparent": ping.headers["traceparent"][0]}

    upstream.fail = True  # pings get HTTP 500
    failed = await receiver.first(lambda s: s.name == "health.probe" and s.error)
    assert failed.parent_span_id == "" and failed.trace_id != probe.trace_id
    assert failed.attributes["http.response.status_code"] == 500
    assert {s.name for s in receiver.spans} == {"health.probe"}  # probes only: no request, no stray span


@pytest.mark.parametrize(("variables", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "gw", "OTEL_TRACES_SAMPLER": "always_on"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_TRACES_EXPORTER": "none"}, False),
], ids=["nothing", "no-exporter", "otlp", "console", "traces-endpoint", "endpoint", "sdk-disabled", "exporter-none"])
def test_which_variables_turn_tracing_on(no_otel_env, variables, on):
    for name, value in variables.items():
        no_otel_env.setenv(name, value)
    tracer = tracing.setup()
    try:
        assert (tracer is not None) is on
    finally:
        if tracer is not None:
            tracer.shutdown()


@pytest.mark.parametrize(("variables", "says"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "does not ship"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf only"),
], ids=["unknown-exporter", "grpc"])
def test_what_cannot_be_exported_is_said_once(no_otel_env, caplog, variables, says):
    for name, value in variables.items():
        no_otel_env.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="gateway.tracing"):
        assert tracing.setup() is None
    warnings = [r for r in caplog.records if r.name == "gateway.tracing"]
    assert len(warnings) == 1 and says in warnings[0].getMessage()


def test_without_the_extra_tracing_asked_for_is_one_warning(no_otel_env, caplog):
    no_otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    for module in ("opentelemetry.sdk", "opentelemetry.sdk.resources", "opentelemetry.sdk.trace",
                   "opentelemetry.sdk.trace.export"):
        no_otel_env.setitem(sys.modules, module, None)  # as if the SDK were not installed
    with caplog.at_level(logging.WARNING, logger="gateway.tracing"):
        assert tracing.setup() is None
    warnings = [r for r in caplog.records if r.name == "gateway.tracing"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "mcp-gateway[otel]" in warnings[0].getMessage()
