"""/healthz, /readyz and /metrics: liveness, readiness, and counters a scraper can read."""

from __future__ import annotations

import aiohttp

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


async def _get(url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            return resp.status, await resp.text()


async def test_health_and_readiness(gateway):
    assert await _get(f"{gateway.url}/healthz") == (200, '{"status": "ok"}')
    status, body = await _get(f"{gateway.url}/readyz")
    assert status == 200 and '"ready"' in body


async def test_metrics_needs_the_metrics_scope(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    assert (await _get(f"{gateway.url}/metrics"))[0] == 401
    assert (await _get(f"{gateway.url}/metrics", t.api_key))[0] == 403  # proxy scope only
    status, text = await _get(f"{gateway.url}/metrics", gateway.admin_key)  # the operator has `metrics`
    assert status == 200 and "# TYPE gateway_requests_total counter" in text


async def test_metrics_count_requests_refusals_and_writer_drops(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, writer={"max_queue": 2, "flush_interval": 3600, "batch_size": 1000})
    t = await gw.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(
                t.endpoint, json=INIT,
                headers={"Authorization": f"Bearer {t.api_key}", "Accept": "application/json, text/event-stream"},
            ) as resp:
                assert resp.status == 200
        async with http.post(t.endpoint, json=INIT) as resp:
            assert resp.status == 401
    _, text = await _get(f"{gw.url}/metrics", gw.admin_key)
    assert 'gateway_requests_total{tenant="acme",server="demo",method="initialize",status="200"} 3' in text
    assert 'gateway_refusals_total{reason="-32030"} 1' in text
    # Four records, room for two: two dropped and counted.
    assert 'gateway_writer_records{kind="dropped"} 2' in text
    assert "\ngateway_writer_dropped_total 2\n" in text
    assert 'gateway_request_duration_seconds_count{tenant="acme",server="demo"} 3' in text
