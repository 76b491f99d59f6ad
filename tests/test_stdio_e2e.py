"""A stdio MCP server behind the gateway: SDK clients in both eras, on /servers/{name}/mcp and /mcp."""

from __future__ import annotations

import asyncio
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.demo.client import gateway_client

SERVER = Path(__file__).parent / "stdio_servers" / "sdk_server.py"
MODES = ["legacy", "2026-07-28"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
async def stdio_tenancy(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream, server_name="web")
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVER))}"
    status, body = await gateway.admin(
        "POST", "/servers", {"tenant_id": t.tenant_id, "name": "local", "endpoint_url": command,
                             "transport_type": "stdio"},
    )
    assert status == 201, body
    return gateway, t


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_server_through_its_endpoint(stdio_tenancy, mode):
    gw, t = stdio_tenancy
    async with gateway_client(f"{gw.url}/servers/local/mcp", t.api_key, mode=mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "add", "slow"} <= names
        assert (await client.call_tool("add", {"a": 40, "b": 2})).content[0].text == "42.0"
        resources = await client.list_resources()
        assert any(str(r.uri) == "test://readme" for r in resources.resources)
    process = gw.gateway.dataplane.stdio_clients[next(iter(gw.gateway.dataplane.stdio_clients))]
    pid = process.pid
    assert pid and _alive(pid)
    await gw.gateway.stop()  # the fixture's stop is then a no-op for the listeners
    assert not _alive(pid), "stopping the gateway must stop its stdio servers"


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_server_in_the_aggregate(stdio_tenancy, mode):
    gw, t = stdio_tenancy
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"local__echo", "web__echo"} <= names
        assert (await client.call_tool("local__echo", {"text": "via stdio"})).content[0].text == "via stdio"
        assert (await client.call_tool("web__add", {"a": 1, "b": 2})).content[0].text == "3.0"
        uris = {r.uri for r in (await client.list_resources()).resources}
        assert {"mcpgw://local/test://readme", "mcpgw://web/demo://readme"} <= uris
        read = await client.read_resource("mcpgw://local/test://readme")
        assert (read.contents[0].uri, read.contents[0].text) == ("mcpgw://local/test://readme", "a test server")


async def test_removed_or_changed_servers_stop_their_process(stdio_tenancy):
    gw, t = stdio_tenancy
    async with gateway_client(f"{gw.url}/servers/local/mcp", t.api_key) as client:
        await client.call_tool("echo", {"text": "start it"})
    dataplane = gw.gateway.dataplane
    (process,) = dataplane.stdio_clients.values()
    pid = process.pid
    # A snapshot without the server (as after its removal) retires the process.
    snapshot = gw.gateway.store.current
    dataplane.on_snapshot(replace(snapshot, servers={k: v for k, v in snapshot.servers.items() if v.name != "local"},
                                  by_tenant={}))
    assert not dataplane.stdio_clients
    for _ in range(100):
        if not _alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not _alive(pid)
