"""Breakers, routing, failover, per-upstream queues and retries, end to end.

The upstreams are real HTTP servers (aiohttp) answering JSON-RPC, told by the
test to answer, fail with a 500, drop the connection or be slow, and counting
what reached them by method, so "refused without calling the upstream" is a
count. Routing rules are rows in `routing_rules` written the way the control
plane writes them (then a configuration change is published).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone

import aiohttp
import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web
from harness import LocalPeer

from gateway.dataplane import jsonrpc
from gateway.db.engine import create_engine
from gateway.db.tables import routing_rules

CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "work", "arguments": {}}}
LIST = {"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {}}
FAST_BREAKER = {
    "breaker_consecutive_failures": 3, "breaker_open_seconds": 1, "breaker_max_open_seconds": 5,
    "breaker_half_open_calls": 1, "retry_attempts": 2,
}


class Peer(LocalPeer):
    """An upstream whose behaviour the test sets: ok, fail (HTTP 500), drop (closes the connection), slow."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.delay = 0.0
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.most_in_flight = 0

    def count(self, method: str) -> int:
        return self.calls.get(method, 0)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        message = await request.json()
        method = message.get("method", "")
        self.calls[method] = self.calls.get(method, 0) + 1
        if "id" not in message:
            return web.Response(status=202)  # a notification
        if method == "initialize":
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {
                "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                "serverInfo": {"name": self.name, "version": "1"}}})
        if method == "server/discover":
            return web.json_response({"jsonrpc": "2.0", "id": message["id"],
                                      "error": {"code": -32601, "message": "Method not found"}})
        if method != "tools/call" and method != "tools/list":
            # Discovery and the like: a plain answer, whatever the mode.
            return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": {"tools": []}})
        calling = method == "tools/call"  # discovery lists tools on its own, outside the guard
        self.in_flight += calling
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "fail":
                return web.json_response({"error": "boom"}, status=500)
            if self.mode == "drop":
                request.transport.close()
                return web.Response()
            result = {"content": [{"type": "text", "text": self.name}]} if method == "tools/call" else {"tools": []}
            return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": result})
        finally:
            self.in_flight -= calling


@pytest.fixture
async def peers():
    made: list[Peer] = []

    async def make(name: str) -> tuple[Peer, str]:
        peer = Peer(name)
        url = await peer.start()
        made.append(peer)
        return peer, url

    yield make
    for peer in made:
        await peer.stop()


async def post(gw, tenancy, server: str, body: dict) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(
            f"{gw.url}/servers/{server}/mcp", json=body,
            headers={"Authorization": f"Bearer {tenancy.api_key}", "Accept": "application/json, text/event-stream"},
        ) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else {}), resp.headers


async def register(gw, tenancy, name: str, url: str, tags=()) -> str:
    status, body = await gw.admin(
        "POST", "/servers", {"tenant_id": tenancy.tenant_id, "name": name, "endpoint_url": url, "tags": list(tags)}
    )
    assert status == 201, body
    return body["id"]


async def add_rule(gw, db_url: str, tenancy, *, targets, strategy="weighted_round_robin", match_server=None,
                   match_tool=None, target_tags=()) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            now = datetime.now(timezone.utc)
            await conn.execute(sa.insert(routing_rules).values(
                id=uuid.uuid4(), tenant_id=uuid.UUID(tenancy.tenant_id), name=f"rule-{uuid.uuid4().hex[:6]}",
                priority=10, enabled=True, match_server=match_server, match_tool=match_tool, match_tags=[],
                strategy=strategy, targets=[{"server_id": s, "weight": w} for s, w in targets],
                target_tags=list(target_tags), created_at=now, updated_at=now,
            ))
            await conn.execute(sa.text("UPDATE config_state SET version = version + 1"))
    finally:
        await engine.dispose()
    await gw.gateway.store.publish_change()


async def test_breaker_opens_refuses_without_calling_then_recovers(pg_url, make_gateway, mcp_upstream, peers):
    peer, url = await peers("flaky")
    gw = await make_gateway(pg_url, upstreams=FAST_BREAKER)
    t = await gw.tenancy("acme", mcp_upstream)
    await register(gw, t, "flaky", url)
    peer.mode = "fail"
    for _ in range(3):
        status, _, _ = await post(gw, t, "flaky", CALL)
        assert status == 500  # the upstream's own answer, passed through
    status, body, headers = await post(gw, t, "flaky", CALL)
    assert status == 503
    assert body["error"]["code"] == jsonrpc.UPSTREAM_UNAVAILABLE
    assert "circuit breaker is open" in body["error"]["message"]
    assert body["error"]["data"]["breaker"] == "open"
    assert int(headers["Retry-After"]) >= 1
    assert peer.count("tools/call") == 3  # refused at the gateway
    metrics = await _metrics(gw)
    assert 'gateway_upstream_breaker{server_id="' in metrics and '"} 2' in metrics
    # The upstream recovers; after the open time one trial call goes through and closes the breaker.
    peer.mode = "ok"
    await asyncio.sleep(1.1)
    for _ in range(5):
        status, body, _ = await post(gw, t, "flaky", CALL)
        assert status == 200, body
    assert peer.count("tools/call") == 8


async def test_calls_through_mcp_meet_the_same_breaker_and_routing(pg_url, make_gateway, mcp_upstream, peers):
    a, url_a = await peers("a")
    b, url_b = await peers("b")
    gw = await make_gateway(pg_url, upstreams=FAST_BREAKER)
    t = await gw.tenancy("acme", mcp_upstream)
    id_a = await register(gw, t, "search-a", url_a)
    id_b = await register(gw, t, "search-b", url_b)
    await add_rule(gw, pg_url, t, match_server="search-a", match_tool="work", targets=[(id_a, 1), (id_b, 1)])
    call = {**CALL, "params": {"name": "search-a__work", "arguments": {}}}
    answered = []
    for _ in range(4):
        status, body, _ = await post_mcp(gw, t, call)
        assert status == 200, body
        answered.append(body["result"]["content"][0]["text"])
    assert sorted(answered) == ["a", "a", "b", "b"]  # the rule spreads /mcp calls too
    b.mode = "fail"
    direct = {**CALL, "params": {"name": "search-b__other", "arguments": {}}}  # no rule: always search-b
    for _ in range(3):
        status, body, _ = await post_mcp(gw, t, direct)
        assert status == 502, body
    status, body, headers = await post_mcp(gw, t, direct)
    assert status == 503 and "circuit breaker is open" in body["error"]["message"] and "Retry-After" in headers
    # With search-b's breaker open, the rule sends every call to search-a.
    for _ in range(4):
        status, body, _ = await post_mcp(gw, t, call)
        assert status == 200 and body["result"]["content"][0]["text"] == "a"


async def post_mcp(gw, tenancy, body: dict):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(
            f"{gw.url}/mcp", json=body,
            headers={"Authorization": f"Bearer {tenancy.api_key}", "Accept": "application/json",
                     "MCP-Protocol-Version": "2025-11-25"},
        ) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else {}), resp.headers


async def test_a_failed_trial_reopens_for_longer(pg_url, make_gateway, mcp_upstream, peers):
    peer, url = await peers("flaky")
    gw = await make_gateway(pg_url, upstreams=FAST_BREAKER)
    t = await gw.tenancy("acme", mcp_upstream)
    await register(gw, t, "flaky", url)
    peer.mode = "fail"
    for _ in range(3):
        assert (await post(gw, t, "flaky", CALL))[0] == 500
    await asyncio.sleep(1.1)
    status, _, _ = await post(gw, t, "flaky", CALL)  # the half-open trial fails
    assert status == 500
    status, _, headers = await post(gw, t, "flaky", CALL)
    assert status == 503 and int(headers["Retry-After"]) == 2  # second opening in a row: 2 x 1 s
    assert peer.count("tools/call") == 4


async def test_replicas_share_calls_by_weight(pg_url, make_gateway, mcp_upstream, peers):
    a, url_a = await peers("a")
    b, url_b = await peers("b")
    gw = await make_gateway(pg_url, upstreams=FAST_BREAKER)
    t = await gw.tenancy("acme", mcp_upstream)
    id_a = await register(gw, t, "search-a", url_a)
    id_b = await register(gw, t, "search-b", url_b)
    await add_rule(gw, pg_url, t, match_server="search-*", targets=[(id_a, 3), (id_b, 1)])
    answered = []
    for _ in range(40):
        status, body, _ = await post(gw, t, "search-a", CALL)
        assert status == 200, body
        answered.append(body["result"]["content"][0]["text"])
    assert (answered.count("a"), answered.count("b")) == (30, 10)
    assert "bb" not in "".join(answered)  # smooth: never two b in a row at 3:1


async def test_failover_skips_a_dead_replica_and_retries_safe_calls_only(pg_url, make_gateway, mcp_upstream, peers):
    a, url_a = await peers("a")
    b, url_b = await peers("b")
    gw = await make_gateway(pg_url, upstreams=FAST_BREAKER)
    t = await gw.tenancy("acme", mcp_upstream)
    id_a = await register(gw, t, "search-a", url_a)
    id_b = await register(gw, t, "search-b", url_b)
    await add_rule(gw, pg_url, t, match_server="search-*", targets=[(id_a, 1), (id_b, 1)])
    a.mode = "drop"
    # tools/list is safe: a call that lands on the dead replica is retried on the live one.
    for _ in range(4):
        status, body, _ = await post(gw, t, "search-a", LIST)
        assert status == 200, body
    # A tool call without readOnlyHint/idempotentHint is never sent twice: some fail until the
    # dead replica's breaker opens (3 failures in a row), then every call goes to the live one.
    failures = 0
    for _ in range(12):
        status, body, _ = await post(gw, t, "search-a", CALL)
        if status != 200:
            assert status == 502 and body["error"]["code"] == jsonrpc.UPSTREAM_BAD_RESPONSE
            failures += 1
    assert a.count("tools/call") == failures
    assert b.count("tools/call") == 12 - failures
    assert failures <= 3  # the list calls that met the dead replica counted toward its breaker too
    assert gw.gateway.breakers.states()[uuid.UUID(id_a)].state == "open"
    status, body, _ = await post(gw, t, "search-a", CALL)
    assert status == 200 and body["result"]["content"][0]["text"] == "b"


async def test_no_usable_replica_is_a_clear_503(pg_url, make_gateway, mcp_upstream, peers):
    a, url_a = await peers("a")
    gw = await make_gateway(pg_url)
    t = await gw.tenancy("acme", mcp_upstream)
    id_a = await register(gw, t, "search-a", url_a)
    await add_rule(gw, pg_url, t, match_server="search-a", targets=[(id_a, 1)])
    status, _ = await gw.admin("PUT", f"/servers/{id_a}/maintenance", {"maintenance": True})
    assert status == 200
    await gw.gateway.store.refresh()
    status, body, headers = await post(gw, t, "search-a", CALL)
    assert status == 503 and body["error"]["code"] == jsonrpc.UPSTREAM_UNAVAILABLE
    assert "No replica" in body["error"]["message"] and "Retry-After" in headers
    assert a.count("tools/call") == 0


async def test_concurrency_limit_queues_then_refuses(pg_url, make_gateway, mcp_upstream, peers):
    peer, url = await peers("slow")
    peer.delay = 0.5
    gw = await make_gateway(pg_url, upstreams={"max_concurrency": 1, "queue_max": 1, "queue_deadline": 5})
    t = await gw.tenancy("acme", mcp_upstream)
    await register(gw, t, "slow", url)
    results = await asyncio.gather(*(post(gw, t, "slow", CALL) for _ in range(3)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 503], results
    refused = next(body for status, body, _ in results if status == 503)
    assert "queue is full" in refused["error"]["message"]
    assert peer.most_in_flight == 1
    assert peer.count("tools/call") == 2


async def test_a_trip_on_one_gateway_opens_the_breaker_on_another(
    pg_url, make_gateway, mcp_upstream, peers, redis_url, redis_prefix
):
    peer, url = await peers("flaky")
    shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}, "upstreams": FAST_BREAKER}
    one = await make_gateway(pg_url, **shared)
    two = await make_gateway(pg_url, **shared)
    t = await one.tenancy("acme", mcp_upstream)
    await register(one, t, "flaky", url)
    await two.gateway.store.refresh()
    peer.mode = "fail"
    for _ in range(3):
        assert (await post(one, t, "flaky", CALL))[0] == 500
    deadline = time.monotonic() + 1.0
    while True:
        status, body, _ = await post(two, t, "flaky", CALL)
        if status == 503:
            break
        assert time.monotonic() < deadline, "the other gateway did not hear of the trip within a second"
        await asyncio.sleep(0.05)
    assert body["error"]["data"]["breaker"] == "open"


async def _metrics(gw) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {gw.admin_key}"}) as resp:
            return await resp.text()
