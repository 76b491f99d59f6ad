"""Transport rules the gateway enforces itself: modern header/body agreement, versions, batches, Origin."""

from __future__ import annotations

import base64

import aiohttp
import orjson
import pytest

from gateway.dataplane import jsonrpc
from gateway.dataplane.protocol import HEADER_MISMATCH, UNSUPPORTED_PROTOCOL_VERSION, decode_header_value

MODERN = "2026-07-28"
ACCEPT = "application/json, text/event-stream"


def modern_call(name: str = "echo", version: str = MODERN) -> dict:
    return {
        "jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {
            "name": name, "arguments": {"text": "hi"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": version,
                      "io.modelcontextprotocol/clientCapabilities": {}},
        },
    }


def modern_headers(key: str, **overrides: str) -> list[tuple[str, str]]:
    headers = {"Authorization": f"Bearer {key}", "Accept": ACCEPT, "Content-Type": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
    headers.update(overrides)
    return [(k, v) for k, v in headers.items() if v is not None]


async def send(url: str, body, headers) -> tuple[int, dict | list | None]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw and resp.content_type == "application/json" else None)


@pytest.fixture
async def tenancy(gateway, mcp_upstream_json):
    return await gateway.tenancy("acme", mcp_upstream_json)


async def test_consistent_modern_request_passes(tenancy):
    status, body = await send(tenancy.endpoint, modern_call(), modern_headers(tenancy.api_key))
    assert status == 200 and body["result"]["content"][0]["text"] == "hi"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"Mcp-Method": "tools/list"}, "Mcp-Method"),
        ({"Mcp-Name": "add"}, "Mcp-Name"),
        ({"Mcp-Name": None}, "Mcp-Name"),
        ({"MCP-Protocol-Version": None}, "MCP-Protocol-Version"),
        ({"MCP-Protocol-Version": "2025-11-25"}, "MCP-Protocol-Version"),
    ],
)
async def test_headers_that_contradict_the_body_are_refused(tenancy, overrides, words):
    status, body = await send(tenancy.endpoint, modern_call(), modern_headers(tenancy.api_key, **overrides))
    assert status == 400
    assert body["error"]["code"] == HEADER_MISMATCH
    assert words in body["error"]["message"]
    assert body["id"] == 3


async def test_duplicate_routing_header_is_refused(tenancy):
    headers = modern_headers(tenancy.api_key) + [("Mcp-Method", "tools/call")]
    status, body = await send(tenancy.endpoint, modern_call(), headers)
    assert status == 400 and body["error"]["code"] == HEADER_MISMATCH
    assert "more than once" in body["error"]["message"]


async def test_base64_encoded_name_matches(tenancy):
    name = "ÉCHO-工具"
    encoded = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
    status, body = await send(tenancy.endpoint, modern_call(name), modern_headers(tenancy.api_key, **{"Mcp-Name": encoded}))
    # Not refused by the gateway: the upstream answers (the tool does not exist there).
    assert not (status == 400 and body["error"]["code"] == HEADER_MISMATCH)


def test_decode_header_value():
    assert decode_header_value("plain") == "plain"
    assert decode_header_value("=?base64?w6k=?=") == "é"
    assert decode_header_value("=?base64?not base64?=") is None
    assert decode_header_value(None) is None


async def test_unknown_modern_version_is_refused_with_the_supported_list(tenancy):
    body = modern_call(version="2099-01-01")
    status, answer = await send(
        tenancy.endpoint, body, modern_headers(tenancy.api_key, **{"MCP-Protocol-Version": "2099-01-01"})
    )
    assert status == 400
    assert answer["error"]["code"] == UNSUPPORTED_PROTOCOL_VERSION
    assert answer["error"]["data"] == {"supported": [MODERN], "requested": "2099-01-01"}


async def test_unknown_legacy_version_header_is_refused(tenancy):
    init = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    status, body = await send(
        tenancy.endpoint, init,
        {"Authorization": f"Bearer {tenancy.api_key}", "Accept": ACCEPT, "MCP-Protocol-Version": "1999-01-01"},
    )
    assert status == 400
    assert body["error"]["code"] == jsonrpc.INVALID_REQUEST
    assert "1999-01-01" in body["error"]["message"]


async def test_batches_refused_outside_2025_03_26(tenancy):
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}]
    headers = {"Authorization": f"Bearer {tenancy.api_key}", "Accept": ACCEPT, "Content-Type": "application/json"}
    status, body = await send(tenancy.endpoint, batch, {**headers, "MCP-Protocol-Version": "2025-11-25"})
    assert status == 400
    assert "batches are not part of MCP 2025-11-25" in body["error"]["message"]
    # In 2025-03-26 (also what a missing header means) they are the upstream's to answer.
    for extra in ({"MCP-Protocol-Version": "2025-03-26"}, {}):
        status, body = await send(tenancy.endpoint, batch, {**headers, **extra})
        assert not (isinstance(body, dict) and "batches are not part of" in body.get("error", {}).get("message", ""))


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://127.0.0.1:6274", True),
        ("https://app.example.com", True),  # listed in allowed_origins below
        ("https://evil.example", False),
        ("null", False),
    ],
)
async def test_origin(pg_url, mcp_upstream_json, make_gateway, origin, allowed):
    gw = await make_gateway(pg_url, dataplane={"allowed_origins": "https://app.example.com"})
    t = await gw.tenancy("acme", mcp_upstream_json)
    headers = modern_headers(t.api_key) + [("Origin", origin)]
    status, body = await send(t.endpoint, modern_call(), headers)
    if allowed:
        assert status == 200
    else:
        assert status == 403
        assert body["error"]["code"] == jsonrpc.FORBIDDEN
        assert "dataplane.allowed_origins" in body["error"]["message"]
