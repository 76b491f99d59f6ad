"""OpenTelemetry tracing, end to end: real gateways exporting to a real OTLP/HTTP receiver.

The receiver is an aiohttp server in the test taking POST /v1/traces
(application/x-protobuf) as a collector does, each body decoded with the
collector's own `ExportTraceServiceRequest`; its raw bytes are kept too, to
search them for secrets. The upstream is an aiohttp JSON-RPC server that
records the headers each call brought. The gateway is configured by the
standard OTEL_* variables only, set before it starts (the SDK reads them when
the gateway builds its provider).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import web
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
        spans = [s for s in self.spans if s.trace_id == trace_id]
        by_name = {s.name: s for s in spans}
        assert len(by_name) == len(spans), f"a span name twice in one trace: {[s.name for s in spans]}"
        return by_name

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        """Until `count` spans have arrived in all (the processor exports every OTEL_BSP_SCHEDULE_DELAY)."""
        deadline = time.monotonic() + timeout
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} spans arrived, {count} expected: {self.spans}"
            await asyncio.sleep(0.02)


class Upstream(LocalPeer):
    """A JSON-RPC upstream that records each tools/call's headers; `fail` answers calls with HTTP 500."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []
        self.fail = False

    async def _handle(self, request: web.Request) -> web.Response:
        message = await request.json()
        method = message.get("method")
        if "id" not in message:
            return web.Response(status=202)
        if method == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "recorder", "version": "1"}}
        elif method == "tools/call":
            headers: dict[str, list[str]] = {}
            for name, value in request.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            self.calls.append(headers)
            if self.fail:
                return web.json_response({"error": "boom"}, status=500)
            result = {"content": [{"type": "text", "text": "done"}]}
        elif method == "server/discover":
            return web.json_response({"jsonrpc": "2.0", "id": message["id"],
                                      "error": {"code": -32601, "message": "Method not found"}})
        else:
            result = {"tools": [], "resources": [], "prompts": []}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})


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
    assert set(spans) == {"mcp.request", "authenticate", "limit", "route", "upstream"}
    root = spans["mcp.request"]
    assert root.kind == ProtoSpan.SPAN_KIND_SERVER
    assert root.parent_span_id == client_span  # the client's span is the parent: its trace goes on
    for name in ("authenticate", "limit", "route", "upstream"):
        assert spans[name].parent_span_id == root.span_id, name
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
