"""The JSON-RPC envelope as the data plane sees it, and the refusals it sends.

The gateway decodes only what a decision needs: the method, the id, and for
`tools/call` / `prompts/get` / `resources/read` the name or URI. `params` stays
`msgspec.Raw` and the original body bytes are forwarded untouched.

Every refusal is a JSON-RPC error object with a stable code (the table below,
also in README.md) and a message a person can act on, sent with the HTTP status
the transport requires.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

# JSON-RPC 2.0
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# The gateway's own refusals. MCP reserves -32000/-32001 (SDK: connection
# closed, request timeout), -32020..-32022 (2026-07-28 header and version
# errors) and -32042 (URL elicitation), so these live in -32030..-32039.
UNAUTHENTICATED = -32030
FORBIDDEN = -32031
UNKNOWN_SERVER = -32032
PAYLOAD_TOO_LARGE = -32033
RATE_LIMITED = -32034
UPSTREAM_UNAVAILABLE = -32035
UPSTREAM_TIMEOUT = -32036
CIRCUIT_OPEN = -32037
UPSTREAM_BAD_RESPONSE = -32038
SESSION_NOT_FOUND = -32039


class Envelope(msgspec.Struct, omit_defaults=True):
    """A request, notification or response; fields a decision does not need stay raw."""

    jsonrpc: str | None = None
    method: str | None = None
    id: int | str | None = None
    # Kept raw and never re-encoded; empty when the message has no params.
    params: msgspec.Raw = msgspec.Raw(b"")


class _Meta(msgspec.Struct):
    # 2026-07-28 requests carry their protocol version in params._meta.
    protocol_version: str | None = msgspec.field(default=None, name="io.modelcontextprotocol/protocolVersion")


class _Params(msgspec.Struct):
    """The few params a decision needs; everything else in params is skipped unread."""

    # Any here: only tools/call, prompts/get and resources/read need a string.
    name: Any = None
    uri: Any = None
    meta: _Meta | None = msgspec.field(default=None, name="_meta")


_envelope = msgspec.json.Decoder(Envelope)
_batch = msgspec.json.Decoder(list[Envelope])
_params = msgspec.json.Decoder(_Params)

# Methods whose target is named in params: the tool, prompt or resource.
_NAMED_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class Refusal(Exception):
    """A request the gateway answers itself, with an HTTP status and a JSON-RPC error."""

    def __init__(
        self,
        http_status: int,
        code: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.data = data

    def body(self, request_id: int | str | None = None) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": error})


class Call(msgspec.Struct):
    """What the pipeline learned from a body: used to route, limit and record."""

    method: str | None
    request_id: int | str | None
    target: str | None  # tool name, prompt name or resource URI
    is_batch: bool = False
    # params._meta's protocol version: set on 2026-07-28 (stateless) requests only.
    envelope_version: str | None = None


def parse_body(body: bytes) -> Call:
    """Decode the envelope of a POSTed body or raise a Refusal (-32700 / -32600)."""
    stripped = body.lstrip()
    if stripped[:1] == b"[":
        try:
            items = _batch.decode(body)
        except msgspec.DecodeError as exc:
            raise _decode_refusal(body, exc) from None
        if not items:
            raise Refusal(400, INVALID_REQUEST, "Invalid Request: an empty JSON-RPC batch")
        for item in items:
            _check(item)
        first = items[0]
        return Call(method=first.method, request_id=None, target=None, is_batch=True)
    try:
        envelope = _envelope.decode(body)
    except msgspec.DecodeError as exc:
        raise _decode_refusal(body, exc) from None
    _check(envelope)
    target = None
    envelope_version = None
    if envelope.params:
        try:
            params = _params.decode(envelope.params)
        except msgspec.DecodeError:
            field = _NAMED_METHODS.get(envelope.method) if envelope.method else None
            what = f"params.{field} as a string" if field else "params as an object"
            raise Refusal(400, INVALID_PARAMS, f"Invalid params: {envelope.method} needs {what}") from None
        field = _NAMED_METHODS.get(envelope.method) if envelope.method else None
        if field is not None:
            target = getattr(params, field)
            if target is not None and not isinstance(target, str):
                raise Refusal(400, INVALID_PARAMS, f"Invalid params: {envelope.method} needs params.{field} as a string")
        if params.meta is not None:
            envelope_version = params.meta.protocol_version
    return Call(method=envelope.method, request_id=envelope.id, target=target, envelope_version=envelope_version)


def _check(envelope: Envelope) -> None:
    if envelope.jsonrpc != "2.0":
        raise Refusal(400, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    if envelope.method is None and envelope.id is None:
        raise Refusal(400, INVALID_REQUEST, 'Invalid Request: a message needs "method" or "id"')


def _decode_refusal(body: bytes, exc: msgspec.DecodeError) -> Refusal:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return Refusal(400, PARSE_ERROR, f"Parse error: the body is not valid JSON ({exc})")
    # Valid JSON of the wrong shape (e.g. "method": 5, or a bare string).
    detail = str(exc).replace("`", "")
    return Refusal(400, INVALID_REQUEST, f"Invalid Request: {detail}")
