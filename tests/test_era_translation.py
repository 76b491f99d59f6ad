"""Clients and servers of different eras meet through /servers/{name}/mcp.

A 2026-07-28 client of a 2025-era-only server, and a 2025-era client of a
server that takes 2026-07-28 requests only: the gateway's facade speaks each
side's era. Both sides are the official SDK (the server wrapped to refuse the
other era as such servers do).
"""

from __future__ import annotations

import uuid

import pytest

from harness import free_port

from gateway.demo.client import gateway_client

CASES = [
    # (upstream fixture, client mode, protocol the client ends up on)
    ("mcp_upstream_legacy", "2026-07-28", "2026-07-28"),
    ("mcp_upstream_modern", "legacy", "2025-11-25"),
]


@pytest.mark.parametrize(("upstream", "mode", "negotiated"), CASES)
async def test_client_of_the_other_era(gateway, request, upstream, mode, negotiated):
    t = await gateway.tenancy("acme", request.getfixturevalue(upstream))
    async with gateway_client(t.endpoint, t.api_key, mode=mode) as client:
        assert client.protocol_version == negotiated
        tools = await client.list_tools()
        assert {"echo", "add", "count"} <= {tool.name for tool in tools.tools}
        assert (await client.call_tool("add", {"a": 40, "b": 2})).content[0].text == "42.0"
        assert (await client.call_tool("echo", {"text": "ünïcode ✓"})).content[0].text == "ünïcode ✓"
        resources = await client.list_resources()
        assert "demo://readme" in {str(r.uri) for r in resources.resources}
        read = await client.read_resource("demo://readme")
        assert "demo MCP server" in read.contents[0].text
        prompt = await client.get_prompt("greet", {"name": "Ada"})
        assert "Ada" in prompt.messages[0].content.text
        unknown = await client.call_tool("no_such_tool", {})
        assert unknown.is_error and "no_such_tool" in unknown.content[0].text


@pytest.mark.parametrize(("upstream", "mode", "negotiated"), CASES)
async def test_the_direct_route_is_unchanged_for_the_servers_own_era(gateway, request, upstream, mode, negotiated):
    # The same servers, with a client of their own era: bytes pass through, the
    # upstream's own answers (and, for the 2025 era, its session) reach the client.
    own = "legacy" if mode == "2026-07-28" else "2026-07-28"
    t = await gateway.tenancy("acme", request.getfixturevalue(upstream))
    async with gateway_client(t.endpoint, t.api_key, mode=own) as client:
        assert client.protocol_version != negotiated
        assert (await client.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3.0"
    gaps = gateway.gateway.dataplane._era_gaps
    assert gaps[(uuid.UUID(t.server_id), request.getfixturevalue(upstream), own == "2026-07-28")] is False


async def test_a_server_that_is_down_is_asked_again(gateway):
    t = await gateway.tenancy("acme", f"http://127.0.0.1:{free_port()}/mcp")
    with pytest.raises(Exception):
        async with gateway_client(t.endpoint, t.api_key, mode="2026-07-28") as client:
            await client.list_tools()
    # Nothing was decided about a server that never answered.
    assert not gateway.gateway.dataplane._era_gaps


@pytest.mark.parametrize(
    ("upstream", "mode", "negotiated"),
    # "auto" probes with server/discover (a pinned 2026-07-28 client asks nothing at connect).
    [("mcp_upstream_legacy", "auto", "2026-07-28"), ("mcp_upstream_modern", "legacy", "2025-11-25")],
)
async def test_the_facade_presents_the_servers_identity(gateway, request, upstream, mode, negotiated):
    t = await gateway.tenancy("acme", request.getfixturevalue(upstream))
    async with gateway_client(t.endpoint, t.api_key, mode=mode) as client:
        assert client.protocol_version == negotiated
        assert client.server_info.name == "gateway-demo"
        assert client.instructions == "Demo tools behind the MCP gateway."
        assert client.server_capabilities.tools is not None
