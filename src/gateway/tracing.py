"""OpenTelemetry tracing of the data plane: optional, configured by the standard OTEL_* variables only.

What it owns: deciding from the environment whether to trace, building a
TracerProvider of this gateway's own (resource, sampler and OTLP exporter as
the SDK reads them from OTEL_*), and the few calls the request path makes: a
server span per proxied request (`mcp.request`), child spans `authenticate`,
`limit`, `route` and `upstream`, the client's W3C `traceparent` kept and a new
one sent upstream.

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

from gateway.dataplane.jsonrpc import Refusal

log = logging.getLogger("gateway.tracing")

DEFAULT_SERVICE_NAME = "mcp-gateway"
# Trace context headers a client sends: replaced by the gateway's own upstream when tracing is on.
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


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
    """The spans of proxied MCP requests, made by one TracerProvider of this gateway's own.

    Parents are passed explicitly (no context manager, no current span) except
    around an upstream call, where the span is made current for the length of
    the call so that `inject` names it in the `traceparent` sent upstream.
    """

    def __init__(self, provider) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("gateway.dataplane")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._attach, self._detach = context.attach, context.detach
        kinds = trace.SpanKind
        self._server, self._client, self._internal = kinds.SERVER, kinds.CLIENT, kinds.INTERNAL
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status

    def start_request(self, headers):
        """The server span of one request, a child of the client's `traceparent` when it sent a valid one."""
        return self._tracer.start_span("mcp.request", context=self._propagator.extract(headers), kind=self._server)

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

    def inject(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Replace any trace context the client sent in `headers` (as forwarded) by the current span's."""
        if any(name.lower() in _TRACE_HEADERS for name, _ in headers):
            headers[:] = [h for h in headers if h[0].lower() not in _TRACE_HEADERS]
        self._propagator.inject(headers, setter=_header_list)

    def end_request(self, span, request, exchange, key, server, call) -> None:
        """Name what the request was and how it ended on its span, and end it."""
        if span.is_recording():
            status = exchange.status or 500
            attributes = {"http.request.method": request.method, "http.response.status_code": status}
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
        span.end()

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
