"""List-change notifications where the gateway is the server: `/mcp` and the facade.

A 2026-07-28 client listens with `subscriptions/listen` (the SDK's
`Client.listen`, and raw frames to check the wire), a 2025-era client with a
GET event stream. Changes come from the configuration (a server added or
removed) and from an upstream whose tool list changes (the demo server's
`toggle_tool`, in a process of this test's own).
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from harness import spawn_upstream

from gateway.demo.client import gateway_client

WATCH = {"list_watch_interval": 0.3}
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
_MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}


@pytest.fixture
def mutable_upstream():
    proc, url = spawn_upstream("--extras")
    yield url
    proc.terminate()
    proc.wait(10)


class _Events:
    """The JSON-RPC messages of an SSE response, as they arrive."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 5.0) -> dict:
        data: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.response.content.readline()).rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    return orjson.loads(b"\n".join(data))
                elif not line and self.response.content.at_eof():
                    raise EOFError("the stream ended")


async def _listen_raw(http, gw, t, path, request_id=7, **wanted):
    body = {"jsonrpc": "2.0", "id": request_id, "method": "subscriptions/listen",
            "params": {"notifications": wanted, "_meta": _MODERN_META}}
    headers = {"Authorization": f"Bearer {t.api_key}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "subscriptions/listen"}
    return await http.post(f"{gw.url}{path}", json=body, headers=headers)


async def test_modern_listen_on_mcp_hears_configuration_changes(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, dataplane=WATCH)
    t = await gw.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        response = await _listen_raw(http, gw, t, "/mcp", toolsListChanged=True, resourcesListChanged=True)
        assert response.status == 200 and response.content_type == "text/event-stream"
        events = _Events(response)
        ack = await events.next()
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["notifications"] == {"toolsListChanged": True, "resourcesListChanged": True}
        assert ack["params"]["_meta"] == {SUBSCRIPTION_ID: 7}
        # A second server for the tenant: its tools and resources join the aggregate.
        status, _ = await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "more",
                                                        "endpoint_url": mcp_upstream})
        assert status == 201
        seen = {(await events.next())["method"], (await events.next())["method"]}
        assert seen == {"notifications/tools/list_changed", "notifications/resources/list_changed"}
        # Prompts changed too, but this client did not ask for them: nothing more comes.
        with pytest.raises(TimeoutError):
            await events.next(timeout=1.0)
        response.close()
    await asyncio.sleep(0.1)
    assert gw.gateway.dataplane.watcher.listening == 0


async def test_another_tenants_change_is_not_announced(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, dataplane=WATCH)
    t = await gw.tenancy("acme", mcp_upstream)
    other = await gw.tenancy("globex", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        response = await _listen_raw(http, gw, t, "/mcp", toolsListChanged=True)
        events = _Events(response)
        assert (await events.next())["method"] == "notifications/subscriptions/acknowledged"
        status, _ = await gw.admin("POST", "/servers", {"tenant_id": other.tenant_id, "name": "theirs",
                                                        "endpoint_url": mcp_upstream})
        assert status == 201
        with pytest.raises(TimeoutError):
            await events.next(timeout=1.5)
        response.close()


async def test_an_upstreams_tool_change_reaches_a_modern_listener(pg_url, make_gateway, mutable_upstream):
    gw = await make_gateway(pg_url, dataplane=WATCH)
    t = await gw.tenancy("acme", mutable_upstream)
    async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="2026-07-28") as client:
        before = {tool.name for tool in (await client.list_tools()).tools}
        assert "demo__extra" not in before
        async with client.listen(tools_list_changed=True) as subscription:
            assert (await client.call_tool("demo__toggle_tool", {})).content[0].text == "extra is present"
            async with asyncio.timeout(5):
                event = await subscription.__anext__()
            assert type(event).__name__ == "ToolsListChanged"
            after = {tool.name for tool in (await client.list_tools()).tools}
            assert after - before == {"demo__extra"}


async def test_legacy_get_stream_on_mcp(pg_url, make_gateway, mcp_upstream, mutable_upstream):
    gw = await make_gateway(pg_url, dataplane=WATCH)
    t = await gw.tenancy("acme", mutable_upstream)
    headers = {"Authorization": f"Bearer {t.api_key}", "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as http:
        response = await http.get(f"{gw.url}/mcp", headers=headers)
        assert response.status == 200
        events = _Events(response)
        async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="legacy") as client:
            await client.call_tool("demo__toggle_tool", {})
        assert (await events.next())["method"] == "notifications/tools/list_changed"
        # A second server changes every list.
        status, _ = await gw.admin("POST", "/servers", {"tenant_id": t.tenant_id, "name": "more",
                                                        "endpoint_url": mcp_upstream})
        assert status == 201
        kinds = {(await events.next())["method"] for _ in range(3)}
        assert kinds == {"notifications/tools/list_changed", "notifications/prompts/list_changed",
                         "notifications/resources/list_changed"}
        response.close()
    # DELETE on /mcp is still not allowed; a GET that does not take an event stream neither.
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{gw.url}/mcp", headers={"Authorization": f"Bearer {t.api_key}"}) as r:
            assert r.status == 405 and "GET" in r.headers["Allow"]


async def test_the_stream_ends_with_the_gateway(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, dataplane=WATCH)
    t = await gw.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        response = await _listen_raw(http, gw, t, "/mcp", request_id="sub-1", toolsListChanged=True)
        events = _Events(response)
        await events.next()
        stopping = asyncio.ensure_future(gw.gateway.stop())
        final = await events.next()
        assert final == {"jsonrpc": "2.0", "id": "sub-1",
                         "result": {"resultType": "complete", "_meta": {SUBSCRIPTION_ID: "sub-1"}}}
        await stopping


async def test_the_facade_of_a_server_of_the_other_era_announces_its_changes(pg_url, make_gateway):
    # A 2025-era-only server with a changing list, a 2026-07-28 client on /servers/demo/mcp:
    # the facade answers the listen itself and watches that one server.
    proc, url = spawn_upstream("--extras", "--legacy-only")
    try:
        gw = await make_gateway(pg_url, dataplane=WATCH)
        t = await gw.tenancy("acme", url)
        other = await gw.tenancy("globex", url, server_name="demo")
        async with gateway_client(t.endpoint, t.api_key, mode="2026-07-28") as client:
            async with client.listen(tools_list_changed=True) as subscription:
                assert (await client.call_tool("toggle_tool", {})).content[0].text == "extra is present"
                async with asyncio.timeout(5):
                    event = await subscription.__anext__()
                assert type(event).__name__ == "ToolsListChanged"
                assert "extra" in {tool.name for tool in (await client.list_tools()).tools}
        # The facade's scope is (tenant, server): the other tenant's listener of "its" demo heard
        # nothing of acme's, and is answered for its own tenant only.
        assert gw.gateway.dataplane.watcher.listening == 0
        async with aiohttp.ClientSession() as http:
            response = await _listen_raw(http, gw, other, "/servers/demo/mcp", toolsListChanged=True)
            events = _Events(response)
            assert (await events.next())["method"] == "notifications/subscriptions/acknowledged"
            response.close()
    finally:
        proc.terminate()
        proc.wait(10)
