"""MCP transport rules the gateway enforces before it forwards anything.

Both protocol eras arrive on the same endpoint:

- 2026-07-28 ("modern"): every request carries its protocol version in
  `params._meta`, and mirrors its routing fields in headers
  (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`). The gateway routes,
  authorizes and records on what the body says, so a header that contradicts
  the body is refused (-32020) instead of being trusted by anything downstream.
- 2025-11-25 and earlier ("legacy"): `MCP-Protocol-Version` must name a known
  revision; JSON-RPC batches exist only in 2025-03-26 (the version assumed when
  the header is absent) and are refused for the others.

And for either: a browser `Origin` that is not allowed is refused (403), the
spec's defence against DNS rebinding.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

from gateway.dataplane.jsonrpc import FORBIDDEN, INVALID_REQUEST, Call, Refusal

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
KNOWN_VERSIONS = HANDSHAKE_VERSIONS + MODERN_VERSIONS
# The spec: a server that receives no MCP-Protocol-Version assumes 2025-03-26.
ASSUMED_VERSION = "2025-03-26"
BATCH_VERSIONS = ("2025-03-26",)

HEADER_MISMATCH = -32020
UNSUPPORTED_PROTOCOL_VERSION = -32022

_ROUTING_HEADERS = ("mcp-protocol-version", "mcp-method", "mcp-name")
_NAME_FIELDS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_BASE64_VALUE = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def decode_header_value(value: str | None) -> str | None:
    """An `Mcp-Name` value as the client meant it: `=?base64?…?=` carries non-ASCII names.

    A malformed encoding gives None, which never equals a body value.
    """
    if value is None:
        return None
    match = _BASE64_VALUE.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _mismatch(message: str) -> Refusal:
    return Refusal(400, HEADER_MISMATCH, message)


def check_message(call: Call, headers: CIMultiDictProxy[str]) -> None:
    """Refuse a POSTed message whose headers and body disagree or whose version is unknown."""
    for name in _ROUTING_HEADERS:
        if len(headers.getall(name, ())) > 1:
            # First-copy and last-copy readers would disagree about the message.
            raise _mismatch(f"Header mismatch: {name} appears more than once")
    header_version = headers.get("mcp-protocol-version")
    if call.envelope_version is not None:
        _check_modern(call, headers, header_version)
        return
    if header_version is not None and header_version not in KNOWN_VERSIONS:
        raise Refusal(
            400,
            INVALID_REQUEST,
            f"Bad Request: unsupported MCP-Protocol-Version {header_version!r} "
            f"(supported: {', '.join(KNOWN_VERSIONS)})",
        )
    if call.is_batch:
        version = header_version or ASSUMED_VERSION
        if version not in BATCH_VERSIONS:
            raise Refusal(
                400,
                INVALID_REQUEST,
                f"Invalid Request: JSON-RPC batches are not part of MCP {version}; send one message per request",
            )


def _check_modern(call: Call, headers: CIMultiDictProxy[str], header_version: str | None) -> None:
    if header_version != call.envelope_version:
        raise _mismatch(
            "Header mismatch: MCP-Protocol-Version header does not match params._meta's protocol version"
        )
    if headers.get("mcp-method") != call.method:
        raise _mismatch("Header mismatch: Mcp-Method header does not match the body's method")
    field = _NAME_FIELDS.get(call.method or "")
    if field is not None and call.target is not None:
        if decode_header_value(headers.get("mcp-name")) != call.target:
            raise _mismatch(f"Header mismatch: Mcp-Name header does not match the body's params.{field}")
    if call.envelope_version not in MODERN_VERSIONS:
        raise Refusal(
            400,
            UNSUPPORTED_PROTOCOL_VERSION,
            "Unsupported protocol version",
            data={"supported": list(MODERN_VERSIONS), "requested": call.envelope_version},
        )


def check_origin(origin: str | None, allowed: frozenset[str]) -> None:
    """Refuse a browser request from an origin that may not call this gateway.

    No `Origin` (a non-browser client) passes. Loopback origins pass, so a
    local tool in a browser works out of the box; other origins must be listed
    in `dataplane.allowed_origins` ("*" allows all).
    """
    if origin is None or "*" in allowed or origin in allowed:
        return
    host = urlsplit(origin).hostname
    if host in _LOOPBACK_HOSTS:
        return
    raise Refusal(
        403,
        FORBIDDEN,
        f"Origin {origin} may not call this gateway; an operator can add it to dataplane.allowed_origins",
    )
