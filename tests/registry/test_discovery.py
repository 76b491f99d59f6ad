"""Capability discovery against real MCP servers: what is stored, pinning, withholding, triggers, leases.

Upstreams: the demo server (official SDK, both eras), the conformance fixture,
and `paged_server.py` (the SDK's low-level server: tools in pages, one tool
whose definition changes on request). Every gateway here is the real one on a
PostgreSQL database of the test's own; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from harness import free_port, spawn_upstream, wait_for_port

from gateway.demo.client import gateway_client
from gateway.registry import discovery
from gateway.registry.discovery import Discoverer, definition_hash, definition_of

HERE = Path(__file__).parent
FIXTURE = HERE.parent / "conformance" / "fixture_server.py"
PAGED = HERE / "paged_server.py"


def _spawn(script: Path, *args: str, port: int | None = None) -> tuple[subprocess.Popen, str, int]:
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}/mcp", port


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def paged():
    """A low-level SDK server with 120 tools in pages of 25, plus `mutable` and `mutate`."""
    proc, url, port = _spawn(PAGED, "--tools", "120", "--page-size", "25")
    yield url
    _stop(proc)


@pytest.fixture
def small_paged():
    proc, url, port = _spawn(PAGED, "--tools", "3", "--page-size", "2")
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def conformance_fixture():
    proc, url, _ = _spawn(FIXTURE)
    yield url
    _stop(proc)


async def _discovered(gw, server_id: str, *, after=None, timeout: float = 15.0) -> dict:
    """The server once a discovery (later than `after`) has finished, successful or not."""
    async with asyncio.timeout(timeout):
        while True:
            status, server = await gw.admin("GET", f"/servers/{server_id}")
            assert status == 200, server
            done = server["discovered_at"] if server["discovery_error"] is None else server["discovery_error"]
            if done is not None and done != after:
                return server
            await asyncio.sleep(0.1)


async def _all(gw, path: str, key: str | None = None) -> list[dict]:
    items, cursor = [], None
    while True:
        status, page = await gw.admin("GET", path + (f"?cursor={cursor}" if cursor else ""), key=key)
        assert status == 200, page
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def _reference(url: str) -> dict[str, list[dict]]:
    """What the upstream lists, read by the SDK's own client (not the gateway's), every page."""
    async with gateway_client(url, "unused", mode="legacy") as client:
        out: dict[str, list[dict]] = {}
        for kind, call, field in (("tools", client.list_tools, "tools"),
                                  ("resources", client.list_resources, "resources"),
                                  ("resource-templates", client.list_resource_templates, "resource_templates"),
                                  ("prompts", client.list_prompts, "prompts")):
            items, cursor = [], None
            while True:
                page = await call(cursor=cursor) if cursor else await call()
                items += [i.model_dump(by_alias=True, exclude_none=True, mode="json") for i in getattr(page, field)]
                cursor = page.next_cursor
                if not cursor:
                    break
            out[kind] = items
        return out


def _check_tools_match(stored: list[dict], reference: list[dict]) -> None:
    assert {t["name"] for t in stored} == {t["name"] for t in reference}
    by_name = {t["name"]: t for t in stored}
    for tool in reference:
        row = by_name[tool["name"]]
        assert row["input_schema"] == tool["inputSchema"], tool["name"]
        assert row["output_schema"] == tool.get("outputSchema"), tool["name"]
        assert row["description"] == tool.get("description"), tool["name"]
        assert row["annotations"] == tool.get("annotations"), tool["name"]
        # First sight: approved by itself, and the hash is over the definition as listed.
        assert row["pin_status"] == "approved" and row["approved_hash"] == row["definition_hash"]
        assert row["definition_hash"] == definition_hash(definition_of(tool))
        assert row["approved_definition"]["inputSchema"] == tool["inputSchema"]


# -- what is stored -------------------------------------------------------------------------------
async def test_registration_discovers_every_capability_of_the_demo_server(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    server = await _discovered(gateway, t.server_id)
    assert server["discovery_error"] is None
    assert {"tools", "resources", "prompts"} <= set(server["capabilities"])
    reference = await _reference(mcp_upstream)
    tools = await _all(gateway, f"/servers/{t.server_id}/tools")
    _check_tools_match(tools, reference["tools"])
    assert {"echo", "add", "word_count", "utc_now", "count", "greet_me", "ask_model"} <= {x["name"] for x in tools}
    echo = next(x for x in tools if x["name"] == "echo")
    assert echo["input_schema"]["properties"]["text"]["type"] == "string"
    resources = await _all(gateway, f"/servers/{t.server_id}/resources")
    assert [(r["uri"], r["mime_type"], r["description"]) for r in resources] == [
        ("demo://readme", "text/plain", "What this server is.")]
    templates = await _all(gateway, f"/servers/{t.server_id}/resource-templates")
    assert [x["uri_template"] for x in templates] == ["demo://notes/{topic}"]
    prompts = await _all(gateway, f"/servers/{t.server_id}/prompts")
    assert [(p["name"], [a["name"] for a in p["arguments"]]) for p in prompts] == [("greet", ["name"])]
    assert {r["uri"] for r in reference["resources"]} == {"demo://readme"}


async def test_every_tool_of_the_conformance_fixture_with_its_schema(pg_url, make_gateway, conformance_fixture):
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", conformance_fixture, server_name="conformance")
    server = await _discovered(gw, t.server_id)
    assert server["discovery_error"] is None, server
    status, outcome = await gw.admin("POST", f"/servers/{t.server_id}/discover")
    assert status == 200 and outcome["ok"] and not outcome["flagged"], outcome
    client = gw.gateway.dataplane.client_for(gw.gateway.store.current.server(uuid.UUID(t.tenant_id), "conformance"))
    # The fixture speaks both eras; the gateway's client uses the newest it can.
    assert client.era == "modern"
    reference = await _reference(conformance_fixture)
    tools = await _all(gw, f"/servers/{t.server_id}/tools")
    _check_tools_match(tools, reference["tools"])
    assert len(tools) >= 20
    # A JSON Schema 2020-12 input schema survives as it was ($schema, $defs, $anchor).
    schema = next(x for x in tools if x["name"] == "json_schema_2020_12_tool")["input_schema"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$defs"]["address"]["$anchor"] == "addressDef"
    assert outcome["counts"]["tools"] == len(tools)
    for kind in ("resources", "resource-templates", "prompts"):
        stored = await _all(gw, f"/servers/{t.server_id}/{kind}")
        key = {"resources": "uri", "resource-templates": "uri_template", "prompts": "name"}[kind]
        ref_key = {"resources": "uri", "resource-templates": "uriTemplate", "prompts": "name"}[kind]
        assert {x[key] for x in stored} == {x[ref_key] for x in reference[kind]}, kind
        assert stored, kind


async def test_servers_of_either_era_alone_are_discovered(gateway, mcp_upstream_legacy, mcp_upstream_modern):
    """A 2025-era-only server through the handshake, a 2026-07-28-only one through server/discover."""
    reference = await _reference(mcp_upstream_legacy)
    for name, url, era in (("old", mcp_upstream_legacy, "legacy"), ("new", mcp_upstream_modern, "modern")):
        t = await gateway.tenancy(name, url)
        server = await _discovered(gateway, t.server_id)
        assert server["discovery_error"] is None, server
        entry = gateway.gateway.store.current.server(uuid.UUID(t.tenant_id), "demo")
        assert gateway.gateway.dataplane.client_for(entry).era == era
        _check_tools_match(await _all(gateway, f"/servers/{t.server_id}/tools"), reference["tools"])
        assert [x["name"] for x in await _all(gateway, f"/servers/{t.server_id}/prompts")] == ["greet"]


async def test_every_page_of_tools_is_read(gateway, paged):
    t = await gateway.tenancy("acme", paged, server_name="paged")
    server = await _discovered(gateway, t.server_id)
    assert server["discovery_error"] is None, server
    tools = await _all(gateway, f"/servers/{t.server_id}/tools")
    assert len(tools) == 122  # 120 over five pages of 25, plus mutable and mutate
    assert {x["name"] for x in tools} >= {f"tool_{i:03d}" for i in range(120)}
    assert next(x for x in tools if x["name"] == "tool_119")["input_schema"]["properties"]["n"]["minimum"] == 119
    # The server announces tools only: nothing else is asked for, nothing else stored.
    assert "tools" in server["capabilities"] and not {"resources", "prompts"} & set(server["capabilities"])
    for kind in ("resources", "resource-templates", "prompts"):
        assert await _all(gateway, f"/servers/{t.server_id}/{kind}") == []


async def test_a_server_paging_forever_fails_with_a_reason(gateway, paged):
    t = await gateway.tenancy("acme", paged, server_name="paged")
    await _discovered(gateway, t.server_id)
    server = gateway.gateway.store.current.server(uuid.UUID(t.tenant_id), "paged")
    client = gateway.gateway.dataplane.client_for(server)
    with pytest.raises(discovery.DiscoveryFailed, match="more than 3 pages"):
        await discovery.fetch(client, max_pages=3)


# -- pinning and withholding -----------------------------------------------------------------------
_MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}


async def _mcp(gw, path: str, key: str, method: str, params: dict) -> tuple[int, dict]:
    """One stateless 2026-07-28 request, its HTTP status and JSON-RPC answer (JSON or the last SSE event)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": _MODERN_META}}
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if "name" in params:
        headers["Mcp-Name"] = params["name"]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}{path}", json=body, headers=headers) as response:
            text = await response.text()
            if response.content_type == "text/event-stream":
                data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
                return response.status, json.loads(data[-1])
            return response.status, json.loads(text)


async def _tool_names(gw, key: str) -> tuple[set[str], set[str]]:
    """The tool names a key sees on /servers/paged/mcp and on /mcp, every page."""
    seen = []
    for path in ("/servers/paged/mcp", "/mcp"):
        names, cursor = set(), None
        while True:
            status, answer = await _mcp(gw, path, key, "tools/list", {"cursor": cursor} if cursor else {})
            assert status == 200, answer
            names |= {x["name"] for x in answer["result"]["tools"]}
            cursor = answer["result"].get("nextCursor")
            if not cursor:
                break
        seen.append(names)
    return seen[0], seen[1]


async def test_a_changed_tool_is_flagged_and_withheld_until_approved(gateway, small_paged, caplog):
    gw = gateway
    withholding = await gw.tenancy("acme", small_paged, server_name="paged")
    flagging = await gw.tenancy("globex", small_paged, server_name="paged")
    status, _ = await gw.admin("PATCH", f"/tenants/{withholding.tenant_id}",
                               {"settings": {"tool_pinning": "withhold"}})
    assert status == 200
    for t in (withholding, flagging):
        assert (await _discovered(gw, t.server_id))["discovery_error"] is None
    before = {x["name"]: x for x in await _all(gw, f"/servers/{withholding.server_id}/tools")}
    assert before["mutable"]["description"] == "Does one thing."

    # The upstream silently changes what `mutable` says it does.
    status, answer = await _mcp(gw, "/servers/paged/mcp", withholding.api_key, "tools/call",
                                {"name": "mutate", "arguments": {"to": "Deletes everything."}})
    assert status == 200 and answer["result"]["content"][0]["text"] == "Deletes everything.", answer
    with caplog.at_level(logging.WARNING, logger="gateway.discovery"):
        outcomes = [await gw.admin("POST", f"/servers/{t.server_id}/discover") for t in (withholding, flagging)]
    for status, outcome in outcomes:
        assert status == 200 and outcome["flagged"] == ["mutable"] and outcome["updated"]["tools"] == ["mutable"]
        assert outcome["configuration_changed"] is True
    assert any("'mutable' changed its definition" in r.getMessage() for r in caplog.records)

    status, page = await gw.admin("GET", f"/servers/{withholding.server_id}/tools?pin_status=changed")
    assert status == 200
    (changed,) = page["items"]
    assert changed["name"] == "mutable" and changed["description"] == "Deletes everything."
    assert changed["changed_at"] is not None and changed["definition_hash"] != changed["approved_hash"]
    assert changed["approved_hash"] == before["mutable"]["approved_hash"]
    assert changed["approved_definition"]["description"] == "Does one thing."  # what was approved stays

    # Withheld for the tenant that asked for it: not listed, and a call refused like a forbidden tool.
    direct, aggregate = await _tool_names(gw, withholding.api_key)
    assert "mutable" not in direct and "paged__mutable" not in aggregate
    assert {"mutate", "tool_000"} <= direct and "paged__mutate" in aggregate
    for path, name in (("/servers/paged/mcp", "mutable"), ("/mcp", "paged__mutable")):
        status, refused = await _mcp(gw, path, withholding.api_key, "tools/call", {"name": name, "arguments": {}})
        assert status == 403 and refused["error"]["code"] == -32031, refused
        assert "changed its definition" in refused["error"]["message"], refused
        assert "until an admin approves" in refused["error"]["message"], refused
    # Only flagged for the other tenant (its default): still listed and callable.
    direct, aggregate = await _tool_names(gw, flagging.api_key)
    assert "mutable" in direct and "paged__mutable" in aggregate
    status, answer = await _mcp(gw, "/servers/paged/mcp", flagging.api_key, "tools/call", {"name": "mutable"})
    assert status == 200 and answer["result"]["content"][0]["text"] == "did it"

    # A rediscovery of the same changed definition changes nothing more.
    status, outcome = await gw.admin("POST", f"/servers/{withholding.server_id}/discover")
    assert status == 200 and outcome["flagged"] == [] and outcome["configuration_changed"] is False

    # Approving a definition the admin did not review (a stale hash) approves nothing.
    status, body = await gw.admin("POST", f"/servers/{withholding.server_id}/tools/mutable/approve",
                                  {"definition_hash": before["mutable"]["definition_hash"]})
    assert status == 409 and "changed again" in body["error"]["message"]
    status, approved = await gw.admin("POST", f"/servers/{withholding.server_id}/tools/mutable/approve",
                                      {"definition_hash": changed["definition_hash"]})
    assert status == 200, approved
    assert approved["pin_status"] == "approved" and approved["approved_hash"] == changed["definition_hash"]
    assert approved["approved_definition"]["description"] == "Deletes everything."
    direct, aggregate = await _tool_names(gw, withholding.api_key)
    assert "mutable" in direct and "paged__mutable" in aggregate
    status, answer = await _mcp(gw, "/mcp", withholding.api_key, "tools/call", {"name": "paged__mutable"})
    assert status == 200 and answer["result"]["content"][0]["text"] == "did it", answer
    # The approved definition stays approved on the next discovery.
    status, outcome = await gw.admin("POST", f"/servers/{withholding.server_id}/discover")
    assert status == 200 and outcome["flagged"] == [] and outcome["updated"]["tools"] == []


async def test_a_tool_back_at_its_approved_definition_is_approved_again(gateway, small_paged):
    t = await gateway.tenancy("acme", small_paged, server_name="paged")
    await _discovered(gateway, t.server_id)
    for to, flagged in (("Something else.", ["mutable"]), ("Does one thing.", [])):
        status, _ = await _mcp(gateway, "/servers/paged/mcp", t.api_key, "tools/call",
                               {"name": "mutate", "arguments": {"to": to}})
        assert status == 200
        status, outcome = await gateway.admin("POST", f"/servers/{t.server_id}/discover")
        assert status == 200 and outcome["flagged"] == flagged, outcome
    assert outcome["restored"] == ["mutable"]
    status, page = await gateway.admin("GET", f"/servers/{t.server_id}/tools?pin_status=changed")
    assert page["items"] == []


# -- failures --------------------------------------------------------------------------------------
async def test_a_failed_discovery_keeps_the_last_one_and_says_why(gateway):
    proc, url, port = _spawn(PAGED, "--tools", "4", "--page-size", "3")
    try:
        t = await gateway.tenancy("acme", url, server_name="paged")
        first = await _discovered(gateway, t.server_id)
        assert first["discovery_error"] is None
        tools = await _all(gateway, f"/servers/{t.server_id}/tools")
        assert len(tools) == 6
    finally:
        _stop(proc)
    status, body = await gateway.admin("POST", f"/servers/{t.server_id}/discover")
    assert status == 502 and body["error"]["code"] == "discovery_failed", body
    assert "unreachable" in body["error"]["message"]
    status, server = await gateway.admin("GET", f"/servers/{t.server_id}")
    assert "unreachable" in server["discovery_error"]
    assert server["discovered_at"] == first["discovered_at"]  # when it last worked
    assert await _all(gateway, f"/servers/{t.server_id}/tools") == tools  # kept as they were

    # A server that answers but refuses its lists: the same, with its words.
    proc, url, _ = _spawn(PAGED, "--tools", "4", "--fail-lists", port=port)
    try:
        status, body = await gateway.admin("POST", f"/servers/{t.server_id}/discover")
        assert status == 502 and "being rebuilt" in body["error"]["message"], body
        assert await _all(gateway, f"/servers/{t.server_id}/tools") == tools
    finally:
        _stop(proc)
    # Back: the next discovery works and clears the error.
    proc, url, _ = _spawn(PAGED, "--tools", "5", "--page-size", "3", port=port)
    try:
        status, outcome = await gateway.admin("POST", f"/servers/{t.server_id}/discover")
        assert status == 200 and outcome["added"]["tools"] == ["tool_004"], outcome
        status, server = await gateway.admin("GET", f"/servers/{t.server_id}")
        assert server["discovery_error"] is None and server["discovered_at"] > first["discovered_at"]
    finally:
        _stop(proc)


# -- triggers ----------------------------------------------------------------------------------------
async def test_an_upstream_list_change_triggers_a_rediscovery(pg_url, make_gateway):
    proc, url = spawn_upstream("--extras")
    try:
        gw = await make_gateway(pg_url, dataplane={"list_watch_interval": 0.3})
        t = await gw.tenancy("acme", url)
        first = await _discovered(gw, t.server_id)
        assert "extra" not in {x["name"] for x in await _all(gw, f"/servers/{t.server_id}/tools")}
        async with gateway_client(f"{gw.url}/mcp", t.api_key, mode="2026-07-28") as client:
            async with client.listen(tools_list_changed=True) as subscription:
                # toggle_tool adds `extra` and announces tools/list_changed.
                assert (await client.call_tool("demo__toggle_tool", {})).content[0].text == "extra is present"
                async with asyncio.timeout(5):
                    await subscription.__anext__()
                server = await _discovered(gw, t.server_id, after=first["discovered_at"])
        assert server["discovery_error"] is None
        assert "extra" in {x["name"] for x in await _all(gw, f"/servers/{t.server_id}/tools")}
    finally:
        _stop(proc)


async def test_changing_a_servers_endpoint_rediscovers_it(gateway, mcp_upstream, small_paged):
    t = await gateway.tenancy("acme", mcp_upstream, server_name="moving")
    first = await _discovered(gateway, t.server_id)
    status, _ = await gateway.admin("PATCH", f"/servers/{t.server_id}", {"endpoint_url": small_paged})
    assert status == 200
    await _discovered(gateway, t.server_id, after=first["discovered_at"])
    assert {x["name"] for x in await _all(gateway, f"/servers/{t.server_id}/tools")} == {
        "tool_000", "tool_001", "tool_002", "mutable", "mutate"}
    assert await _all(gateway, f"/servers/{t.server_id}/prompts") == []  # the old server's are gone


async def test_an_endpoint_changed_elsewhere_is_rediscovered_by_one_process(
    pg_url, make_gateway, mcp_upstream, small_paged, redis_url, redis_prefix
):
    """A change made by another process (or `gateway servers update`, straight in the database) is seen in
    every snapshot; one process discovers the server again."""
    from gateway.controlplane import schemas, service

    shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}}
    a = await make_gateway(pg_url, **shared)
    b = await make_gateway(pg_url, **shared)
    t = await a.tenancy("acme", mcp_upstream, server_name="moving")
    first = await _discovered(a, t.server_id)
    await asyncio.sleep(discovery.FIRST_SIGHT_GRACE + 1.5)  # both have seen it as it was
    runs = a.gateway.discoverer.runs + b.gateway.discoverer.runs
    operator = await service.operator_actor(a.gateway.engine)
    body = schemas.validate(schemas.ServerUpdate, json.dumps({"endpoint_url": small_paged}).encode())
    await service.update_server(a.gateway.engine, operator, uuid.UUID(t.server_id), body, a.gateway.config.upstreams)
    await a.gateway.store.publish_change()  # as the CLI's change reaches running gateways (or their poll)
    await _discovered(a, t.server_id, after=first["discovered_at"])
    assert "mutate" in {x["name"] for x in await _all(a, f"/servers/{t.server_id}/tools")}
    await asyncio.sleep(1.0)
    assert a.gateway.discoverer.runs + b.gateway.discoverer.runs == runs + 1


# -- one discovery per server and interval, across processes ------------------------------------------
async def _server_row(gw, server_id: str):
    from gateway.db.tables import mcp_servers

    async with gw.gateway.engine.connect() as conn:
        return (await conn.execute(sa.select(mcp_servers).where(mcp_servers.c.id == uuid.UUID(server_id)))).first()


async def _tick(discoverer: Discoverer, server_id: uuid.UUID) -> None:
    """Make the server due now in this discoverer's schedule, run one round, wait for what it started."""
    await discoverer._tick()  # learn the server first
    discoverer._due[server_id] = 0.0
    await discoverer._tick()
    await asyncio.gather(*list(discoverer._tasks))


async def test_two_discoverers_on_one_redis_discover_a_server_once_per_interval(
    pg_url, make_gateway, mcp_upstream, redis_url, redis_prefix
):
    import redis.asyncio as redis

    shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}, "upstreams": {"discovery_interval": 10}}
    a = await make_gateway(pg_url, **shared)
    b = await make_gateway(pg_url, **shared)
    t = await a.tenancy("acme", mcp_upstream)
    await _discovered(a, t.server_id)
    server_id = uuid.UUID(t.server_id)
    # The registering process discovered it; the other one sees it within its snapshot and leaves it.
    async with asyncio.timeout(10):
        while b.gateway.store.current.server(uuid.UUID(t.tenant_id), "demo") is None:
            await asyncio.sleep(0.05)
    await asyncio.sleep(discovery.FIRST_SIGHT_GRACE + 1.5)
    assert (a.gateway.discoverer.runs, b.gateway.discoverer.runs) == (1, 0)

    # Both schedules look at it now, again and again: the lease (one interval) stops both.
    for _ in range(3):
        await asyncio.gather(_tick(a.gateway.discoverer, server_id), _tick(b.gateway.discoverer, server_id))
    assert a.gateway.discoverer.runs + b.gateway.discoverer.runs == 1
    client = redis.from_url(redis_url)
    try:
        key = f"{redis_prefix}discovery:{server_id}"
        assert 0 < await client.pttl(key) <= 10_000
        # The interval passes (the lease runs out): exactly one of the two discovers it again.
        await client.pexpire(key, 1)
        await asyncio.sleep(0.01)
        await asyncio.gather(_tick(a.gateway.discoverer, server_id), _tick(b.gateway.discoverer, server_id))
        assert a.gateway.discoverer.runs + b.gateway.discoverer.runs == 2
        assert 5_000 < await client.pttl(key) <= 10_000
    finally:
        await client.aclose()


async def test_without_redis_the_lease_is_held_in_process(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    await _discovered(gateway, t.server_id)
    d = gateway.gateway.discoverer
    runs = d.runs
    for _ in range(3):
        await _tick(d, uuid.UUID(t.server_id))
    assert d.runs == runs  # the registration's discovery holds the lease for the interval
    d.leases._local.clear()  # the interval passed
    await _tick(d, uuid.UUID(t.server_id))
    assert d.runs == runs + 1


async def test_the_schedule_resumes_from_the_last_discovery_after_a_restart(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", mcp_upstream)
    await _discovered(gw, t.server_id)
    await gw.gateway.stop()
    again = await make_gateway(pg_url)
    d = again.gateway.discoverer
    await d._tick()
    due_in = d._due[uuid.UUID(t.server_id)] - asyncio.get_running_loop().time()
    assert 290 < due_in <= 300  # the default interval, counted from the discovery before the restart
    assert d.runs == 0


# -- portability: the same store on SQLite ---------------------------------------------------------------
async def test_store_and_filters_on_sqlite(sqlite_url):
    from gateway.controlplane import schemas, service
    from gateway.db.engine import create_engine

    engine = create_engine(sqlite_url)
    try:
        await service.bootstrap(engine)
        operator = await service.operator_actor(engine)
        tenant = await service.create_tenant(engine, operator, schemas.TenantCreate(name="acme"))
        server = await service.create_server(engine, operator, schemas.ServerCreate(
            name="s", endpoint_url="http://127.0.0.1:9/mcp", tenant_id=tenant["id"], tags=["blue", "eu"]))
        tool = {"name": "t", "description": "first", "inputSchema": {"type": "object"}}
        fetched = discovery.Fetched(capabilities={"tools": {}}, lists={"tools": {"t": tool}})
        outcome = await discovery.store(engine, server["id"], fetched)
        assert outcome.added["tools"] == ["t"] and not outcome.configuration_changed
        fetched.lists["tools"]["t"] = {**tool, "description": "second"}
        outcome = await discovery.store(engine, server["id"], fetched)
        assert outcome.flagged == ["t"] and outcome.configuration_changed
        found = await service.list_servers(engine, operator, limit=10, after=None, tags=["eu", "blue"], tool="t")
        assert [s["id"] for s in found] == [server["id"]]
        assert await service.list_servers(engine, operator, limit=10, after=None, tags=["e"]) == []
        assert await service.list_servers(engine, operator, limit=10, after=None, tool="u") == []
    finally:
        await engine.dispose()
