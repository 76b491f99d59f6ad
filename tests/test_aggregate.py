"""/mcp: every server of the caller's tenant as one MCP server, tools named server__tool, both eras."""

from __future__ import annotations

import aiohttp
import asyncpg
import orjson
import pytest
from harness import free_port
from mcp.shared.exceptions import MCPError

from gateway.demo.client import gateway_client

MODES = ["legacy", "2026-07-28"]


@pytest.fixture
async def setup(gateway, mcp_upstream, mcp_upstream_legacy):
    """acme: alpha (speaks both eras) and beta (2025-era only); globex: its own server."""
    t = await gateway.tenancy("acme", mcp_upstream, server_name="alpha")
    status, _ = await gateway.admin(
        "POST", "/servers", {"tenant_id": t.tenant_id, "name": "beta", "endpoint_url": mcp_upstream_legacy}
    )
    assert status == 201
    other = await gateway.tenancy("globex", mcp_upstream, server_name="secret")
    return gateway, t, other


@pytest.mark.parametrize("mode", MODES)
async def test_tools_of_every_server_under_one_endpoint(setup, mode):
    gw, t, _ = setup
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        for server in ("alpha", "beta"):
            assert {f"{server}__echo", f"{server}__add", f"{server}__count"} <= names
        assert not any(name.startswith("secret__") for name in names)  # globex's server stays invisible
        for server in ("alpha", "beta"):
            result = await client.call_tool(f"{server}__add", {"a": 2, "b": 5})
            assert result.content[0].text == "7.0"
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert {"alpha__greet", "beta__greet"} <= prompts
        prompt = await client.get_prompt("beta__greet", {"name": "Ada"})
        assert "Ada" in prompt.messages[0].content.text


@pytest.mark.parametrize("mode", MODES)
async def test_unknown_and_foreign_tools_look_the_same(setup, mode):
    gw, t, _ = setup
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        errors = []
        for name in ("nope__echo", "secret__echo", "alpha", "alpha__"):
            with pytest.raises(MCPError) as err:
                await client.call_tool(name, {"text": "x"})
            errors.append(err.value.error.message.replace(name, "<name>"))
        assert len(set(errors)) == 1 and "Unknown tool" in errors[0]


async def test_an_unreachable_server_is_left_out_and_named(setup):
    gw, t, _ = setup
    dead = f"http://127.0.0.1:{free_port()}/mcp"  # nobody listens there, nor will during the test
    await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "gone", "endpoint_url": dead})
    status, answer = await _post(gw, t, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert status == 200
    names = {tool["name"] for tool in answer["result"]["tools"]}
    assert "alpha__echo" in names and "beta__echo" in names
    assert answer["result"]["_meta"]["mcp-gateway/unavailable"] == ["gone"]


async def test_pagination_with_opaque_cursors(pg_url, make_gateway, mcp_upstream, mcp_upstream_legacy):
    gw = await make_gateway(pg_url, dataplane={"aggregate_page_size": 3})
    t = await gw.tenancy("acme", mcp_upstream, server_name="alpha")
    await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "beta", "endpoint_url": mcp_upstream_legacy})
    seen, cursor, pages = [], None, 0
    while True:
        params = {"cursor": cursor} if cursor else {}
        status, answer = await _post(gw, t, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": params})
        assert status == 200
        pages += 1
        seen += [tool["name"] for tool in answer["result"]["tools"]]
        assert len(answer["result"]["tools"]) <= 3
        cursor = answer["result"].get("nextCursor")
        if not cursor:
            break
    assert pages == 5 and len(seen) == len(set(seen)) == 14  # 7 tools on each of 2 servers
    status, answer = await _post(gw, t, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"cursor": "junk"}})
    assert answer["error"]["code"] == -32602


async def test_sdk_clients_list_every_page(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, dataplane={"aggregate_page_size": 2})
    t = await gw.tenancy("acme", mcp_upstream, server_name="alpha")
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="2026-07-28") as client:
        page = await client.list_tools()
        assert len(page.tools) == 2 and page.next_cursor


async def test_get_and_delete_are_405_and_calls_are_recorded(setup, pg_url):
    gw, t, _ = setup
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/mcp", headers={"Authorization": f"Bearer {t.api_key}"}) as resp:
            assert resp.status == 405
    status, answer = await _post(
        gw, t, {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "beta__echo", "arguments": {"text": "x"}}}
    )
    assert status == 200 and answer["result"]["content"][0]["text"] == "x"
    await gw.gateway.writer.flush()
    conn = await asyncpg.connect(pg_url)
    try:
        row = await conn.fetchrow("SELECT server_name, tool_name, status_code FROM request_logs WHERE method = 'tools/call'")
    finally:
        await conn.close()
    assert dict(row) == {"server_name": "beta", "tool_name": "beta__echo", "status_code": 200}


@pytest.mark.parametrize("mode", MODES)
async def test_resources_and_templates_of_every_server(setup, mode):
    gw, t, _ = setup
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        listed = {r.uri: r.name for r in (await client.list_resources()).resources}
        assert listed == {"mcpgw://alpha/demo://readme": "readme", "mcpgw://beta/demo://readme": "readme"}
        templates = {r.uri_template for r in (await client.list_resource_templates()).resource_templates}
        assert templates == {"mcpgw://alpha/demo://notes/{topic}", "mcpgw://beta/demo://notes/{topic}"}

        read = await client.read_resource("mcpgw://beta/demo://readme")
        assert read.contents[0].uri == "mcpgw://beta/demo://readme"
        assert read.contents[0].text == "A demo MCP server registered behind the gateway."
        # The template, expanded as a client expands it, reads the expanded original.
        expanded = "mcpgw://alpha/demo://notes/{topic}".replace("{topic}", "gateways")
        read = await client.read_resource(expanded)
        assert read.contents[0].uri == "mcpgw://alpha/demo://notes/gateways"
        assert read.contents[0].text == "A note on gateways."


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # "auto" learns capabilities from server/discover
async def test_resources_are_announced_without_subscriptions(setup, mode):
    gw, t, _ = setup
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        assert client.protocol_version == ("2026-07-28" if mode == "auto" else "2025-11-25")
        capabilities = client.server_capabilities
        resources = capabilities.resources
        # List changes are announced (watch.py); resource subscriptions are not relayed.
        assert resources is not None and not resources.subscribe and resources.list_changed
        assert capabilities.tools.list_changed and capabilities.prompts.list_changed


@pytest.mark.parametrize("mode", MODES)
async def test_unknown_foreign_and_unnamespaced_resources(setup, mode):
    gw, t, _ = setup
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode=mode) as client:
        messages = []
        for uri in ("mcpgw://nope/demo://readme", "mcpgw://secret/demo://readme"):  # secret: globex's server
            with pytest.raises(MCPError) as err:
                await client.read_resource(uri)
            assert err.value.error.code == -32602 and err.value.error.data == {"uri": uri}
            messages.append(err.value.error.message.replace(uri, "<uri>"))
        assert messages == ["Unknown resource: <uri>"] * 2
        for uri in ("demo://readme", "mcpgw://alpha", "mcpgw://alpha/", "mcpgw:///demo://readme"):
            with pytest.raises(MCPError) as err:
                await client.read_resource(uri)
            assert err.value.error.code == -32602 and err.value.error.data == {"uri": uri}
            assert "mcpgw://{server}/" in err.value.error.message
        # A known server without such a resource: its own error, naming the URI the client used.
        with pytest.raises(MCPError) as err:
            await client.read_resource("mcpgw://alpha/demo://nothing-here")
        assert err.value.error.code == -32602
        assert err.value.error.data == {"uri": "mcpgw://alpha/demo://nothing-here"}


async def test_resource_pages_span_servers(pg_url, make_gateway, mcp_upstream, mcp_upstream_legacy):
    gw = await make_gateway(pg_url, dataplane={"aggregate_page_size": 1})
    t = await gw.tenancy("acme", mcp_upstream, server_name="alpha")
    await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "beta", "endpoint_url": mcp_upstream_legacy})
    for method, kind, field in (("resources/list", "resources", "uri"),
                                ("resources/templates/list", "resourceTemplates", "uriTemplate")):
        seen, cursor = [], None
        while True:
            params = {"cursor": cursor} if cursor else {}
            status, answer = await _post(gw, t, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
            assert status == 200
            assert len(answer["result"][kind]) == 1
            seen += [item[field] for item in answer["result"][kind]]
            cursor = answer["result"].get("nextCursor")
            if not cursor:
                break
        assert [uri.split("/")[2] for uri in seen] == ["alpha", "beta"]  # one page per server, in order
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="2026-07-28") as client:
        page = await client.list_resources()
        assert len(page.resources) == 1 and page.next_cursor
        page = await client.list_resources(cursor=page.next_cursor)
        assert [r.uri for r in page.resources] == ["mcpgw://beta/demo://readme"] and not page.next_cursor


async def test_an_unreachable_server_is_left_out_of_resource_lists(setup):
    gw, t, _ = setup
    dead = f"http://127.0.0.1:{free_port()}/mcp"  # nobody listens there, nor will during the test
    await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "gone", "endpoint_url": dead})
    for method, kind in (("resources/list", "resources"), ("resources/templates/list", "resourceTemplates")):
        status, answer = await _post(gw, t, {"jsonrpc": "2.0", "id": 1, "method": method})
        assert status == 200 and len(answer["result"][kind]) == 2
        assert answer["result"]["_meta"]["mcp-gateway/unavailable"] == ["gone"]
    status, answer = await _post(
        gw, t, {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "mcpgw://gone/demo://readme"}}
    )
    assert status == 502 and answer["error"]["message"].startswith("Server 'gone'")


async def test_resource_reads_are_recorded_against_their_server(setup, pg_url):
    gw, t, _ = setup
    uri = "mcpgw://beta/demo://readme"
    status, answer = await _post(gw, t, {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": uri}})
    assert status == 200 and answer["result"]["contents"][0]["uri"] == uri
    await gw.gateway.writer.flush()
    conn = await asyncpg.connect(pg_url)
    try:
        row = await conn.fetchrow("SELECT server_name, tool_name FROM request_logs WHERE method = 'resources/read'")
    finally:
        await conn.close()
    assert dict(row) == {"server_name": "beta", "tool_name": uri}


async def _post(gw, t, message: dict):
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.url}/mcp", data=orjson.dumps(message),
            headers={"Authorization": f"Bearer {t.api_key}", "Accept": "application/json, text/event-stream",
                     "Content-Type": "application/json"},
        ) as resp:
            return resp.status, orjson.loads(await resp.read())
