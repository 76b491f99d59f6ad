"""OpenTelemetry tracing of the data plane: optional, configured by the standard OTEL_* variables only.

What it owns: deciding from the environment whether to trace, building a
TracerProvider of this gateway's own (resource, sampler and OTLP exporter as
the SDK reads them from OTEL_*), and the few calls the data plane makes: a
server span per proxied request (`mcp.request`) or bridged message, child
spans `authenticate`, `limit`, `route` and `upstream` (one per call `/mcp`
makes), the client's W3C `traceparent` kept and a new one sent upstream (as a
header, and in `params._meta` of the messages the gateway composes itself);
and a span of its own trace per health probe (`health.probe`).

What it must not do: cost the request path anything when off (`setup` returns
None and the data plane checks that once per stage), block the event loop
(spans are exported by the SDK's BatchSpanProcessor thread), set the process's
global provider (each Gateway has its own; tests start several), or put a
credential, a header or a request's params into an attribute.

Needs the `otel` extra (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http);
without it a gateway asked to trace logs one warning and runs untraced.
"""

from __future__ import annotations

import logging
import os

import msgspec

from gateway.dataplane.jsonrpc import Refusal
from gateway.dataplane.mcp_client import UpstreamRpcError

log = logging.getLogger("gateway.tracing")

DEFAULT_SERVICE_NAME = "mcp-gateway"
# Trace context headers a client sends: replaced by the gateway's own upstream when tracing is on.
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
# The same in a JSON-RPC message's params._meta: MCP reserves these keys for W3C trace context
# (SEP-414, https://modelcontextprotocol.io/seps/414-request-meta), the carrier where there are no
# HTTP headers (stdio, SSE and WebSocket upstreams, WebSocket clients).
_META_KEYS = ("traceparent", "tracestate")


class _TraceMeta(msgspec.Struct):
    traceparent: str | None = None
    tracestate: str | None = None


class _TraceParams(msgspec.Struct):
    meta: _TraceMeta | None = msgspec.field(default=None, name="_meta")


class _TraceMessage(msgspec.Struct):
    """Only the trace context of a client's message; everything else is skipped unread."""

    params: _TraceParams | None = None


_trace_message = msgspec.json.Decoder(_TraceMessage)
# What a failed health verdict says on its span (never the error text: it may name the endpoint).
_PROBE_FAILURES = {"probe": "the health probe failed", "process": "the stdio process exited"}


def _wanted_exporters(environ) -> list[str]:
    """The span exporters the environment asks for: [] means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if "none" in names:
        return []
    if not names and (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        names = ["otlp"]
    return names


def setup() -> RequestTracer | None:
    """A RequestTracer when the OTEL_* variables ask for traces, else None (tracing off).

    On when OTEL_TRACES_EXPORTER names `otlp` or `console`, or an OTLP endpoint
    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT) is set;
    off with OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. The SDK itself
    reads the rest (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
    OTEL_TRACES_SAMPLER[_ARG], OTEL_EXPORTER_OTLP_*, OTEL_BSP_*) from os.environ
    when this builds the provider, so call it once per gateway, at start.
    """
    environ = os.environ
    names = _wanted_exporters(environ)
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        log.warning(
            "tracing is configured (OTEL_* variables) but the OpenTelemetry SDK is not installed (%s): "
            "running without traces; install the extra: pip install 'mcp-gateway[otel]'", exc,
        )
        return None
    exporters = []
    for name in names:
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol and protocol.strip().lower() != "http/protobuf":
                log.warning("OTLP protocol %r is not supported: the gateway exports spans over http/protobuf only; "
                            "spans are not sent to the OTLP endpoint", protocol)
                continue
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                log.warning("OTEL_TRACES_EXPORTER asks for otlp but opentelemetry-exporter-otlp-proto-http is not "
                            "installed (%s); install the extra: pip install 'mcp-gateway[otel]'", exc)
                continue
            exporters.append(OTLPSpanExporter())  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*
        else:
            log.warning("OTEL_TRACES_EXPORTER names %r, which this gateway does not ship (otlp, console)", name)
    if not exporters:
        return None
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER[_ARG]
    for exporter in exporters:
        # Export in batches from the processor's thread: a span's end only queues it.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: %s, service %s", ", ".join(names), resource.attributes.get(SERVICE_NAME))
    return RequestTracer(provider)


class RequestTracer:
    """The spans of the data plane, made by one TracerProvider of this gateway's own.

    Parents are passed explicitly (no context manager, no current span) except
    around an upstream call or a probe, where the span is made current for the
    length of the call so that `inject` and `with_context` name it in what is
    sent upstream.
    """

    def __init__(self, provider) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("gateway.dataplane")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._current_span = trace.get_current_span
        self._attach, self._detach = context.attach, context.detach
        # An empty context: the parent of a span that must start a trace of its own, whatever is current.
        self._root = context.Context()
        kinds = trace.SpanKind
        self._server, self._client, self._internal = kinds.SERVER, kinds.CLIENT, kinds.INTERNAL
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status

    def start_request(self, headers):
        """The server span of one request, a child of the client's `traceparent` when it sent a valid one."""
        return self._tracer.start_span("mcp.request", context=self._propagator.extract(headers), kind=self._server)

    def start_message(self, transport: str, server_name: str, headers, body: bytes):
        """The server span of one message a bridged client sent (`transport`: "sse" or "websocket").

        Its parent is the trace context in the message's `params._meta` when it
        carries a valid one, else the `traceparent` of `headers` (the message's
        own POST; None for a WebSocket frame: the upgrade's headers are the
        connection's, not the message's), else none.
        """
        parent = self._root
        if b"traceparent" in body:
            meta = _meta_context(body)
            if meta is not None:
                parent = self._propagator.extract(meta, context=self._root)
        if parent is self._root and headers is not None:
            parent = self._propagator.extract(headers, context=self._root)
        return self._tracer.start_span("mcp.request", context=parent, kind=self._server,
                                       attributes={"gateway.transport": transport, "gateway.server": server_name})

    async def stage(self, parent, name: str, step, server_name: str | None = None):
        """Await `step` (a coroutine) inside a child span `name` of `parent`; a refusal marks both."""
        attributes = {"gateway.server": server_name} if server_name is not None else None
        span = self._tracer.start_span(name, context=self._in_context(parent), kind=self._internal,
                                       attributes=attributes)
        try:
            return await step
        except Refusal as refusal:
            self._refused(span, refusal)
            self._refused(parent, refusal)
            raise
        except BaseException as exc:
            span.set_status(self._status(self._error, type(exc).__name__))
            raise
        finally:
            span.end()

    async def upstream(self, parent, server_name: str, exchange, step):
        """Await `step` (one exchange with an upstream) inside a client span, current while it runs (`inject`)."""
        span = self._tracer.start_span("upstream", context=self._in_context(parent), kind=self._client,
                                       attributes={"gateway.server": server_name})
        token = self._attach(self._in_context(span))
        try:
            response = await step
        except Refusal as refusal:
            self._refused(span, refusal)
            raise
        except BaseException as exc:
            span.set_status(self._status(self._error, type(exc).__name__))
            raise
        else:
            if exchange.status:
                span.set_attribute("http.response.status_code", exchange.status)
            if exchange.status >= 500 or exchange.error is not None:
                span.set_status(self._status(self._error, exchange.error))
            return response
        finally:
            self._detach(token)
            span.end()

    async def call(self, parent, server_name: str, step):
        """Await `step()`, one call the gateway makes itself (`/mcp`, a facade), inside a client span `upstream`.

        `step` is called once the span is current, so what it sends names it: an
        HTTP upstream's client (mcp_client.py) puts it in the `traceparent`
        header and notes the answer's status (`upstream_status`), and the
        caller's params get it through `with_context`. A JSON-RPC error is an
        answer: its code is noted and the span is not failed.
        """
        span = self._tracer.start_span("upstream", context=self._in_context(parent), kind=self._client,
                                       attributes={"gateway.server": server_name})
        token = self._attach(self._in_context(span))
        try:
            return await step()
        except UpstreamRpcError as exc:
            code = exc.error.get("code")
            if type(code) is int and span.is_recording():
                span.set_attribute("rpc.jsonrpc.error_code", code)
            raise
        except BaseException as exc:
            span.set_status(self._status(self._error, type(exc).__name__))
            raise
        finally:
            self._detach(token)
            span.end()

    async def probe(self, server_name: str, step):
        """Await `step` (one health probe: a coroutine returning its verdict) inside a client span `health.probe`.

        The span starts a trace of its own, never a request's, and is current
        while the probe runs, so the probe carries it upstream as `call` does.
        """
        span = self._tracer.start_span("health.probe", context=self._root, kind=self._client,
                                       attributes={"gateway.server": server_name})
        token = self._attach(self._in_context(span))
        try:
            verdict = await step
        except BaseException as exc:
            span.set_status(self._status(self._error, type(exc).__name__))
            raise
        else:
            if span.is_recording():
                if verdict.method is not None:
                    span.set_attribute("mcp.method", verdict.method)
                if not verdict.ok:
                    span.set_status(self._status(self._error, _PROBE_FAILURES.get(verdict.source, verdict.source)))
            return verdict
        finally:
            self._detach(token)
            span.end()

    def inject(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Replace any trace context the client sent in `headers` (as forwarded) by the current span's."""
        if any(name.lower() in _TRACE_HEADERS for name, _ in headers):
            headers[:] = [h for h in headers if h[0].lower() not in _TRACE_HEADERS]
        self._propagator.inject(headers, setter=_header_list)

    def with_context(self, params: dict) -> dict:
        """`params` with the current span as `_meta.traceparent` (and `tracestate`), in place of any the client sent.

        For the messages the gateway composes itself: the only carrier a stdio,
        SSE or WebSocket upstream has, and sent to an HTTP upstream beside the header.
        """
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        meta = params.get("_meta")
        if isinstance(meta, dict):
            carrier = {**{k: v for k, v in meta.items() if k not in _META_KEYS}, **carrier}
        if not carrier:
            return params
        return {**params, "_meta": carrier}

    def upstream_status(self, status: int) -> None:
        """The HTTP status an upstream answered a call with, on the current span (`call`'s or `probe`'s)."""
        span = self._current_span()
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(self._status(self._error, f"the upstream answered HTTP {status}"))

    def end_request(self, span, request, exchange, key, server, call) -> None:
        """Name what the request was and how it ended on its span, and end it."""
        if span.is_recording():
            self._outcome(span, {"http.request.method": request.method}, exchange, key, server, call)
        span.end()

    def end_message(self, span, exchange, key, server, call) -> None:
        """Name what a bridged message was and how its exchange ended on its span, and end it."""
        if span.is_recording():
            self._outcome(span, {}, exchange, key, server, call)
        span.end()

    def _outcome(self, span, attributes: dict, exchange, key, server, call) -> None:
        status = exchange.status or 500
        attributes["http.response.status_code"] = status
        if call is not None and call.method is not None:
            attributes["mcp.method"] = call.method
            if call.method == "tools/call" and call.target is not None:
                attributes["mcp.tool"] = call.target
        if server is not None:
            attributes["gateway.server"] = server.name
        if key is not None:
            attributes["gateway.tenant_id"] = str(key.tenant_id)
        if exchange.error_code is not None:
            attributes["rpc.jsonrpc.error_code"] = exchange.error_code
        span.set_attributes(attributes)
        if exchange.error_code is not None or exchange.error is not None or status >= 500:
            span.set_status(self._status(self._error, exchange.error))

    def _refused(self, span, refusal: Refusal) -> None:
        """What a refusal tells: its code, and the rate-limit tier or breaker that refused."""
        if not span.is_recording():
            return
        span.set_attribute("rpc.jsonrpc.error_code", refusal.code)
        data = refusal.data
        if type(data) is dict:
            if "tier" in data:
                span.set_attribute("gateway.rate_limit.tier", data["tier"])
            if "breaker" in data:
                span.set_attribute("gateway.breaker", data["breaker"])
        span.set_status(self._status(self._error, refusal.message))

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter threads (blocking: call it off the event loop)."""
        self.provider.shutdown()


class _HeaderList:
    """A propagator setter for the forwarded header list: (name, value) bytes pairs."""

    @staticmethod
    def set(carrier: list[tuple[bytes, bytes]], key: str, value: str) -> None:
        carrier.append((key.encode("latin-1"), value.encode("latin-1")))


_header_list = _HeaderList()


def _meta_context(body: bytes) -> dict[str, str] | None:
    """The trace context in a message's params._meta, as a propagator's carrier; None if it has none."""
    try:
        params = _trace_message.decode(body).params
    except msgspec.DecodeError:  # a batch, or params or a key of another type: no context of ours to read
        return None
    meta = params.meta if params is not None else None
    if meta is None or meta.traceparent is None:
        return None
    if meta.tracestate is None:
        return {"traceparent": meta.traceparent}
    return {"traceparent": meta.traceparent, "tracestate": meta.tracestate}
