"""The rate-limit tiers on the MCP path: real gateways, PostgreSQL, Redis and an SDK upstream.

Refusals (status, headers, JSON-RPC error naming the tier, metrics, request
log), the address tiers (deny, allow, anonymous, bans), costs, limits changed
at runtime and shared by two processes, and weighted fairness under contention.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import orjson
import pytest
import sqlalchemy as sa

from gateway.dataplane import jsonrpc
from gateway.db.tables import request_logs

pytestmark = pytest.mark.asyncio

MODERN = "2026-07-28"
ACCEPT = "application/json, text/event-stream"
CALL = orjson.dumps({
    "jsonrpc": "2.0", "id": 1, "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "hi"},
               "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                         "io.modelcontextprotocol/clientCapabilities": {}}},
})


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Accept": ACCEPT, "Content-Type": "application/json",
            "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}


async def _call(http: aiohttp.ClientSession, endpoint: str, key: str) -> tuple[int, dict, dict | None]:
    async with http.post(endpoint, data=CALL, headers=_headers(key)) as resp:
        raw = await resp.read()
        body = orjson.loads(raw) if raw and resp.content_type == "application/json" else None
        return resp.status, dict(resp.headers), body


def _limits(**values) -> dict:
    """A [limits] section for the harness: tables as JSON, every count a whole minute's burst."""
    section = {"burst_seconds": 60}
    for name, value in values.items():
        if isinstance(value, list):
            value = ",".join(value)
        section[name] = json.dumps(value) if isinstance(value, dict) else value
    return section


async def test_a_tier_refuses_with_429_headers_and_a_jsonrpc_error_naming_it(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(roles={"USER": 3}))
    t = await gw.tenancy("acme", mcp_upstream_json)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            status, _, body = await _call(http, t.endpoint, t.api_key)
            assert status == 200, body
        status, headers, body = await _call(http, t.endpoint, t.api_key)
    assert status == 429
    retry = int(headers["Retry-After"])
    assert 1 <= retry <= 20  # one request's refill at 3 a minute
    assert headers["RateLimit-Limit"] == "3"
    assert headers["RateLimit-Remaining"] == "0"
    assert headers["RateLimit-Reset"] == str(retry)
    error = body["error"]
    assert body["id"] == 1
    assert error["code"] == jsonrpc.RATE_LIMITED
    assert error["data"] == {"tier": "user", "limit": 3, "window": "minute", "retry_after": retry}
    assert "this user's role allows 3 requests per minute" in error["message"]
    assert gw.gateway.limiter.refusals == {"user": 1}
    metrics = gw.gateway.metrics.render()
    assert 'gateway_rate_limited_total{tier="user"} 1' in metrics
    assert "gateway_rate_limit_admitted_total 3" in metrics  # the three before: every tier admitted them
    assert 'gateway_fair_queue{state="waiting"} 0' in metrics
    assert 'gateway_limit_sync{what="redis_down"} 0' in metrics
    # The request log keeps the refusal and which tier made it.
    deadline = time.monotonic() + 5
    while True:
        async with gw.gateway.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(request_logs.c.status_code, request_logs.c.error_code, request_logs.c.error)
                .where(request_logs.c.status_code == 429)
            )).all()
        if rows or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 1
    assert rows[0].error_code == jsonrpc.RATE_LIMITED and "user's role" in rows[0].error


async def test_a_refused_request_costs_nothing_on_the_tiers_before(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(roles={"USER": 2}))
    t = await gw.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=4)
    async with aiohttp.ClientSession() as http:
        statuses = [(await _call(http, t.endpoint, t.api_key))[0] for _ in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    # The key's hour quota (met before the user's tier) lost the 2 admitted requests, not the 4 refused.
    import uuid

    hour = gw.gateway.shared_buckets._buckets[("key-hour", uuid.UUID(t.api_key_id))]
    assert round(hour.remaining(time.monotonic()), 2) == 2.0


async def test_costs_by_tool(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(roles={"USER": 10}, costs={"tools/call:echo": 4}))
    t = await gw.tenancy("acme", mcp_upstream_json)
    async with aiohttp.ClientSession() as http:
        statuses = [(await _call(http, t.endpoint, t.api_key))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_failed_credentials_are_limited_per_address(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(anonymous_per_minute=3))
    t = await gw.tenancy("acme", mcp_upstream_json)
    forged = t.api_key[:-1] + ("A" if t.api_key[-1] != "A" else "B")
    async with aiohttp.ClientSession() as http:
        statuses = [(await _call(http, t.endpoint, forged))[0] for _ in range(3)]
        status, headers, body = await _call(http, t.endpoint, forged)
        assert statuses == [401, 401, 401]
        assert status == 429 and body["error"]["data"]["tier"] == "anonymous"
        assert "Retry-After" in headers
        # Valid credentials from the same address still work.
        assert (await _call(http, t.endpoint, t.api_key))[0] == 200


async def test_deny_and_allow_ranges(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(ip_deny=["127.0.0.0/8"]))
    t = await gw.tenancy("acme", mcp_upstream_json)
    async with aiohttp.ClientSession() as http:
        status, _, body = await _call(http, t.endpoint, t.api_key)
    assert status == 403
    assert body["error"]["code"] == jsonrpc.FORBIDDEN and body["error"]["data"] == {"tier": "ip_deny"}

    allowed = await make_gateway(pg_url, limits=_limits(ip_per_minute=2, ip_allow=["127.0.0.1/32", "::1/128"]))
    limited = await make_gateway(pg_url, limits=_limits(ip_per_minute=2))
    async with aiohttp.ClientSession() as http:
        assert [(await _call(http, f"{allowed.url}/servers/demo/mcp", t.api_key))[0] for _ in range(4)] == [200] * 4
        results = [await _call(http, f"{limited.url}/servers/demo/mcp", t.api_key) for _ in range(3)]
    assert [s for s, _, _ in results] == [200, 200, 429]
    assert results[2][2]["error"]["data"]["tier"] == "ip"


async def test_an_address_that_keeps_violating_is_banned_then_released(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(roles={"USER": 1}, ban_violations=3, ban_seconds=1))
    t = await gw.tenancy("acme", mcp_upstream_json)
    async with aiohttp.ClientSession() as http:
        assert (await _call(http, t.endpoint, t.api_key))[0] == 200
        tiers = [(await _call(http, t.endpoint, t.api_key))[2]["error"]["data"]["tier"] for _ in range(4)]
        assert tiers == ["user", "user", "user", "ip_ban"]
        status, headers, body = await _call(http, t.endpoint, t.api_key)
        assert status == 429 and body["error"]["data"]["tier"] == "ip_ban"
        assert "banned" in body["error"]["message"]
        await asyncio.sleep(1.2)
        # Released: the user's own limit answers again.
        status, _, body = await _call(http, t.endpoint, t.api_key)
        assert body["error"]["data"]["tier"] == "user"


async def test_limits_change_at_runtime_and_are_shared_by_processes(
    make_gateway, pg_url, redis_url, redis_prefix, mcp_upstream_json
):
    shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}, "snapshot": {"poll_interval": 30}}
    one = await make_gateway(pg_url, limits=_limits(), **shared)
    two = await make_gateway(pg_url, limits=_limits(), **shared)
    t = await one.tenancy("acme", mcp_upstream_json)
    status, body = await one.admin("PATCH", "/rate-limits", {"roles": {"USER": 4}})
    assert status == 200, body
    changed = time.monotonic()
    while two.gateway.limiter.settings.roles["USER"] != 4:
        assert time.monotonic() - changed < 1.0, "the change did not reach the other process within a second"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # both processes count each other alive
    async with aiohttp.ClientSession() as http:
        statuses = []
        for endpoint in [f"{gw.url}/servers/demo/mcp" for gw in (one, two, one, two, one, two)]:
            statuses.append((await _call(http, endpoint, t.api_key))[0])
            await asyncio.sleep(0.1)  # past a synchronization
    # One user, two processes, one limit of 4.
    assert statuses.count(200) == 4 and statuses.count(429) == 2, statuses


async def test_tenants_share_contended_capacity_by_weight(make_gateway, pg_url, mcp_upstream_json):
    """Three tenants weighted 1:2:3 saturate the global limit: goodput follows the weights (Jain's index)."""
    rate = 60.0  # a second
    gw = await make_gateway(pg_url, limits=_limits(
        global_per_minute=int(rate * 60), burst_seconds=0.5, roles={"USER": 100000}, ip_per_minute=0,
        queue_max=64, queue_deadline=10,
    ))
    weights = {"a": 1, "b": 2, "c": 3}
    tenancies = {}
    for name, weight in weights.items():
        tenancies[name] = t = await gw.tenancy(name, mcp_upstream_json)
        status, body = await gw.admin("PATCH", f"/tenants/{t.tenant_id}", {"weight": weight})
        assert status == 200, body
    await asyncio.sleep(0.5)  # the weights reach the snapshot
    served: dict[str, list[float]] = {name: [] for name in weights}
    start = time.monotonic()
    stop = start + 5.0
    late = {"c": 2.5}  # tenant c sleeps until then: an idle tenant waking up

    async def client(http, name: str) -> None:
        t = tenancies[name]
        await asyncio.sleep(late.get(name, 0.0))
        while time.monotonic() < stop:
            status, _, body = await _call(http, t.endpoint, t.api_key)
            assert status == 200, body
            served[name].append(time.monotonic() - start)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http, name) for name in weights for _ in range(12)))

    def goodput(name: str, since: float, until: float) -> float:
        return sum(1 for at in served[name] if since <= at < until) / (until - since)

    # All three busy: from a second after c woke to the end.
    shares = {name: goodput(name, 3.5, 5.0) for name in weights}
    total = sum(shares.values())
    normalized = [shares[name] / (total * weight / sum(weights.values())) for name, weight in weights.items()]
    jain = sum(normalized) ** 2 / (len(normalized) * sum(x * x for x in normalized))
    # c's first second awake, beside a and b: its weight is half of 6. Counted from c's first answer, not
    # from 2.5 s: on a loaded machine its twelve clients take a while to send at all, and until they do
    # the queue cannot serve them.
    assert served["c"], "tenant c was never served"
    first = min(served["c"])
    assert first < 3.5, f"tenant c's first answer came {first - 2.5:.2f} s after it woke"
    woke = goodput("c", first, first + 1.0) / sum(goodput(name, first, first + 1.0) for name in weights)
    print(f"\ngoodput/s {({k: round(v, 1) for k, v in shares.items()})}, total {total:.1f} of {rate:.0f};"
          f" Jain's index {jain:.4f}; c's share in its first second awake {woke:.2f} (fair: 0.50)")
    assert jain >= 0.99
    assert woke >= 0.4
    assert total <= rate * 1.1


async def _saturate_gateways(gateways, keys, seconds: float, per_gateway: int = 12) -> tuple[int, int]:
    """Every gateway gets `per_gateway` clients calling flat out; (admitted, refused)."""
    counts = [0, 0]
    stop = time.monotonic() + seconds

    async def client(http, gw, key) -> None:
        endpoint = f"{gw.url}/servers/demo/mcp"
        while time.monotonic() < stop:
            status, _, body = await _call(http, endpoint, key)
            assert status in (200, 429), body
            counts[status == 429] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http, gw, key) for gw, key in zip(gateways, keys) for _ in range(per_gateway)))
    return counts[0], counts[1]


async def test_three_processes_hold_one_global_limit_through_redis_and_its_outage(
    make_gateway, pg_url, redis_url, redis_prefix, mcp_upstream_json
):
    from tcp_relay import TcpRelay

    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    relay = await TcpRelay(host, int(port)).start()
    # Low enough that 36 clients saturate it beside the rest of the suite on a slow 2-vCPU machine: at
    # 150/s the SDK upstream answered about 92 calls a second there, so the limit never bound.
    rate = 50.0  # a second
    section = _limits(global_per_minute=int(rate * 60), burst_seconds=1, roles={"USER": 100000}, ip_per_minute=0,
                      queue_max=0)
    shared = {"redis": {"url": f"redis://127.0.0.1:{relay.port}/0", "key_prefix": redis_prefix}}
    try:
        gateways = [await make_gateway(pg_url, limits=section, **shared) for _ in range(3)]
        t = await gateways[0].tenancy("acme", mcp_upstream_json, rate_limit_per_hour=100000,
                                      rate_limit_per_day=1000000)
        await asyncio.sleep(1.2)  # every process has counted the others alive; the burst is full again
        # Decisions are made within the 4 s the clients send in (answers may finish later).
        admitted, refused = await _saturate_gateways(gateways, [t.api_key] * 3, 4.0)
        allowed = rate + rate * 4.0
        error = (admitted - allowed) / allowed
        print(f"\n3 gateways, one limit of {rate:.0f}/s: admitted {admitted} of {allowed:.0f} allowed ({error:+.2%}),"
              f" {refused} refused")
        assert refused > admitted  # saturated
        # Never over; under by a little when a loaded machine leaves a process unscheduled while its
        # part fills (-0.4% to -0.7% on a quiet one, -2% beside the rest of the suite).
        # Over by at most a few requests (each process decides alone between syncs): 5 of 250 at 50/s.
        assert -0.05 < error <= 0.02

        # Redis goes away for two seconds: every process goes on alone on its third, nothing crashes.
        relay.cut()
        during, _ = await _saturate_gateways(gateways, [t.api_key] * 3, 2.0)
        relay.restore()
        after, _ = await _saturate_gateways(gateways, [t.api_key] * 3, 2.0)
        print(f"Redis cut: {during} admitted in 2 s ({during / 2:.0f}/s for {rate:.0f}/s),"
              f" then {after} in 2 s with Redis back")
        assert 0.7 * rate * 2 <= during <= rate * 1.5 + rate * 2
        # Each process finds Redis back at its next sync; on a loaded machine that can come after the 2 s.
        deadline = time.monotonic() + 10
        while any(gw.gateway.shared_buckets.redis_down for gw in gateways) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not any(gw.gateway.shared_buckets.redis_down for gw in gateways)
        # What the processes admitted alone is charged when Redis is back: a debt of up to one burst
        # (here 1 s of the rate) delays admissions after it; nothing is admitted twice.
        assert rate * 2 - rate * 1.5 <= after <= rate * 2 * 1.1
        assert {tier for gw in gateways for tier in gw.gateway.limiter.refusals} == {"global"}
    finally:
        await relay.stop()


async def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(make_gateway, pg_url, mcp_upstream_json):
    gw = await make_gateway(pg_url, limits=_limits(ip_per_minute=2), dataplane={"trusted_proxies": "127.0.0.0/8"})
    t = await gw.tenancy("acme", mcp_upstream_json)
    untrusted = await make_gateway(pg_url, limits=_limits(ip_per_minute=2))

    async def call(gateway, forwarded: str) -> int:
        headers = {**_headers(t.api_key), "X-Forwarded-For": forwarded}
        async with http.post(f"{gateway.url}/servers/demo/mcp", data=CALL, headers=headers) as resp:
            return resp.status

    async with aiohttp.ClientSession() as http:
        # Each client behind the proxy has its own bucket; what a client claims about
        # hops before it (the first entry) is not believed.
        assert [await call(gw, "203.0.113.5") for _ in range(3)] == [200, 200, 429]
        assert await call(gw, "198.51.100.1, 203.0.113.6") == 200
        assert await call(gw, "198.51.100.2, 203.0.113.6") == 200
        assert await call(gw, "198.51.100.3, 203.0.113.6") == 429
        # Not a trusted proxy: the header changes nothing, the peer is limited.
        assert [await call(untrusted, f"203.0.113.{i}") for i in range(3)] == [200, 200, 429]
    deadline = time.monotonic() + 5
    while True:
        async with gw.gateway.engine.connect() as conn:
            addresses = set((await conn.execute(sa.select(request_logs.c.client_ip))).scalars())
        if {"203.0.113.5", "203.0.113.6"} <= addresses or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert {"203.0.113.5", "203.0.113.6", "127.0.0.1"} >= addresses >= {"203.0.113.5", "203.0.113.6"}


async def test_a_tenant_may_borrow_only_up_to_its_burst_factor(make_gateway, pg_url, mcp_upstream_json):
    # A slow refill (a token every 2 s for a's half), so that the 12 calls end before it adds one even on a
    # loaded machine.
    gw = await make_gateway(pg_url, limits=_limits(global_per_minute=60, burst_seconds=10, tenant_burst_factor=1.0,
                                                   queue_max=0))
    a = await gw.tenancy("a", mcp_upstream_json)
    b = await gw.tenancy("b", mcp_upstream_json)
    async with aiohttp.ClientSession() as http:
        assert (await _call(http, b.endpoint, b.api_key))[0] == 200  # b is active: a's share is half
        results = [await _call(http, a.endpoint, a.api_key) for _ in range(12)]
    statuses = [status for status, _, _ in results]
    # Half of a 10-request burst at factor 1: about 5 for a, the rest refused by the tenant tier
    # while the global bucket still holds b's half.
    assert 4 <= statuses.count(200) <= 6, statuses
    refused = [body["error"]["data"] for status, _, body in results if status == 429]
    assert {data["tier"] for data in refused} == {"tenant"}
    first_refused = next(body for status, _, body in results if status == 429)
    assert "this tenant's share of the gateway allows 30 requests per minute" in first_refused["error"]["message"]
