"""Configuration changes reach every gateway process: by Redis pub/sub at once, by polling as a fallback."""

from __future__ import annotations

import asyncio
import time

import aiohttp

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


async def _status(url: str, key: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, json=INIT, headers={"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
        ) as resp:
            await resp.read()
            return resp.status


async def _seconds_until(predicate, limit: float = 5.0) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < limit, "the change never arrived"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_changes_reach_another_process_through_redis(pg_url, redis_url, redis_prefix, mcp_upstream, make_gateway):
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    # Polling every 60 s: only the Redis signal can deliver a change within the test.
    a = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    b = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    await asyncio.sleep(0.2)  # both subscribed

    t = await a.tenancy("acme", mcp_upstream)  # key and server made through a's admin API
    on_b = f"{b.url}/servers/demo/mcp"
    took = await _seconds_until(lambda: _is(200, on_b, t.api_key))
    assert took < 1.0

    status, _ = await a.admin("DELETE", f"/api-keys/{t.api_key_id}")
    assert status == 200
    took = await _seconds_until(lambda: _is(401, on_b, t.api_key))
    assert took < 1.0


async def test_polling_catches_changes_without_redis(pg_url, mcp_upstream, make_gateway):
    a = await make_gateway(pg_url, snapshot={"poll_interval": 0.2})
    b = await make_gateway(pg_url, snapshot={"poll_interval": 0.2})
    t = await a.tenancy("acme", mcp_upstream)
    await _seconds_until(lambda: _is(200, f"{b.url}/servers/demo/mcp", t.api_key))


async def _is(expected: int, url: str, key: str) -> bool:
    return await _status(url, key) == expected
