"""`sessions.max_per_key`: open sessions per API key, across gateway processes (Redis) or in one.

Sessions are real 2025-era sessions with the demo server (official SDK) and
bridged SSE connections; the count is what the gateway admits at initialize.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from gateway.demo.client import gateway_client

_INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def _initialize(url: str, api_key: str) -> tuple[int, str | None, dict]:
    """One raw initialize: (status, sealed session id, JSON-RPC body)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=_INITIALIZE, headers={**_HEADERS, "Authorization": f"Bearer {api_key}"}) as r:
            text = await r.text()
            body = {}
            for line in text.splitlines():  # JSON, or one SSE event
                if line.startswith("data:"):
                    text = line[5:]
            if text.strip():
                body = json.loads(text)
            return r.status, r.headers.get("Mcp-Session-Id"), body


async def _delete(url: str, api_key: str, session: str) -> int:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {api_key}", "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        async with http.delete(url, headers=headers) as r:
            return r.status


async def test_the_cap_holds_across_processes(pg_url, redis_url, redis_prefix, mcp_upstream, make_gateway):
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    a = await make_gateway(pg_url, redis=redis, sessions={"max_per_key": 2})
    b = await make_gateway(pg_url, redis=redis, sessions={"max_per_key": 2})
    t = await a.tenancy("acme", mcp_upstream)
    other = await a.tenancy("globex", mcp_upstream)
    await asyncio.sleep(0.5)  # b hears of the new keys (pub/sub)
    url_a, url_b = f"{a.url}/servers/demo/mcp", f"{b.url}/servers/demo/mcp"

    status, first, _ = await _initialize(url_a, t.api_key)
    assert status == 200 and first
    status, second, _ = await _initialize(url_b, t.api_key)
    assert status == 200 and second
    # A third, on either process, is refused with a clear JSON-RPC error.
    for url in (url_a, url_b):
        status, third, body = await _initialize(url, t.api_key)
        assert status == 429 and third is None
        assert body["error"]["code"] == -32034 and "Too many sessions" in body["error"]["message"]
        assert body["error"]["data"] == {"tier": "sessions", "limit": 2}
    # Another key is not affected.
    status, theirs, _ = await _initialize(url_b, other.api_key)
    assert status == 200 and theirs

    # Ending a session (on the other process) frees its place.
    assert await _delete(url_b, t.api_key, first) < 300
    # The other process forgets it in a task of its own: wait for that (a loaded CI machine has taken
    # longer than a second), and say so if it never happens.
    for _ in range(500):
        if await a.gateway.dataplane.session_counter.count(uuid.UUID(t.api_key_id)) < 2:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the ended session is still counted after 10 s")
    status, again, _ = await _initialize(url_a, t.api_key)
    assert status == 200 and again
    # The SDK client, at the cap, is refused at connect.
    with pytest.raises(Exception):
        async with gateway_client(url_a, t.api_key, mode="legacy"):
            pass


async def test_idle_sessions_stop_counting(pg_url, mcp_upstream, make_gateway):
    gw = await make_gateway(pg_url, sessions={"max_per_key": 1, "idle_timeout": 0.5})
    t = await gw.tenancy("acme", mcp_upstream)
    url = f"{gw.url}/servers/demo/mcp"
    status, first, _ = await _initialize(url, t.api_key)
    assert status == 200
    assert (await _initialize(url, t.api_key))[0] == 429
    await asyncio.sleep(0.7)
    status, second, _ = await _initialize(url, t.api_key)
    assert status == 200 and second


async def test_bridged_connections_count_as_sessions(pg_url, mcp_upstream, make_gateway):
    gw = await make_gateway(pg_url, sessions={"max_per_key": 1})
    t = await gw.tenancy("acme", mcp_upstream)
    headers = {"Authorization": f"Bearer {t.api_key}", "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/servers/demo/sse", headers=headers) as stream:
            assert stream.status == 200
            assert (await stream.content.readline()).startswith(b"event: endpoint")
            # The SSE connection holds the key's one place.
            status, session, body = await _initialize(f"{gw.url}/servers/demo/mcp", t.api_key)
            assert status == 429 and "Too many sessions" in body["error"]["message"]
            async with http.get(f"{gw.url}/servers/demo/sse", headers=headers) as refused:
                assert refused.status == 429
        # Closed: its place is free again.
        for _ in range(100):
            status, session, _ = await _initialize(f"{gw.url}/servers/demo/mcp", t.api_key)
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200 and session


async def test_no_cap_when_zero(pg_url, mcp_upstream, make_gateway):
    gw = await make_gateway(pg_url, sessions={"max_per_key": 0})
    t = await gw.tenancy("acme", mcp_upstream)
    assert gw.gateway.dataplane.session_counter is None
    for _ in range(3):
        assert (await _initialize(f"{gw.url}/servers/demo/mcp", t.api_key))[0] == 200


async def test_without_redis_the_cap_is_kept_in_the_process(pg_url, mcp_upstream, make_gateway):
    from harness import free_port

    # Redis configured but unreachable: sessions are counted here, and nothing fails.
    gw = await make_gateway(
        pg_url, redis={"url": f"redis://127.0.0.1:{free_port()}/0"}, sessions={"max_per_key": 1}
    )
    t = await gw.tenancy("acme", mcp_upstream)
    url = f"{gw.url}/servers/demo/mcp"
    status, first, _ = await _initialize(url, t.api_key)
    assert status == 200 and first
    assert (await _initialize(url, t.api_key))[0] == 429
    assert await _delete(url, t.api_key, first) < 300
    assert (await _initialize(url, t.api_key))[0] == 200


async def test_a_delete_on_another_process_leaves_the_session_uncounted(redis_url, redis_prefix):
    """A DELETE reaching a process that never saw its session first writes the session as seen, then removes
    it: the two Redis writes must land in that order, or the ended session stays counted until it idles out.
    Two counters stand for two processes; the second one's writes are asked for back to back, and its
    scripts reach Redis late (as after a Redis restart, when each script is loaded again first)."""
    import redis.asyncio as aioredis

    from gateway.limits.sessions import SessionCounter

    clients = [aioredis.from_url(redis_url) for _ in range(2)]
    evalsha = clients[1].evalsha

    async def late_evalsha(*args, **kwargs):
        await asyncio.sleep(0.02)
        return await evalsha(*args, **kwargs)

    clients[1].evalsha = late_evalsha
    opening, deleting = (SessionCounter(max_per_key=2, idle_timeout=600, redis=client, prefix=redis_prefix)
                         for client in clients)
    key = uuid.uuid4()
    try:
        for round_ in range(5):
            session = f"session-{round_}"
            ticket = await opening.admit(key)
            assert ticket is not None
            opening.opened(key, ticket, session)
            await opening.close()  # its writes done
            assert await opening.count(key) == 1
            deleting.seen(key, session)  # the DELETE's own request...
            deleting.ended(key, session)  # ...and its answer
            await deleting.close()
            assert await opening.count(key) == 0, round_
    finally:
        for client in clients:
            await client.delete(f"{redis_prefix}sessions:{key}")
            await client.aclose()
