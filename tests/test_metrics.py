"""/metrics as issue 7 asks for it: requests by tenant, server, method and outcome, latency by tenant
and server, the writer's queue, totals and flush latency, the database pools, and the merge of
those series over workers.

Real gateways on PostgreSQL (and one on SQLite) with the SDK's demo server upstream; every figure
is checked against what the test did or what the database holds.
"""

from __future__ import annotations

import re

import aiohttp
import asyncpg
import pytest

from gateway.records.metrics import Registry, tenant_names
from gateway.workers import merge_metrics

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
ACCEPT = "application/json, text/event-stream"


async def _scrape(url: str, admin_key: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"}) as resp:
            assert resp.status == 200
            return await resp.text()


def _series(text: str, name: str) -> dict[str, float]:
    """Every series of `name` (its labels as written, "" for none) -> value."""
    found = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        found[match.group(1) or ""] = float(match.group(2))
    return found


def _type(text: str, name: str) -> str | None:
    match = re.search(rf"^# TYPE {re.escape(name)} (\S+)$", text, re.M)
    return match.group(1) if match else None


async def _post(http: aiohttp.ClientSession, endpoint: str, key: str | None, message: dict) -> int:
    headers = {"Accept": ACCEPT, **({"Authorization": f"Bearer {key}"} if key else {})}
    async with http.post(endpoint, json=message, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_requests_and_latency_are_counted_by_tenant(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url)
    # Two tenants, each with a server named "demo": only the tenant label tells them apart.
    alpha = await gw.tenancy("alpha", mcp_upstream)
    beta = await gw.tenancy("beta", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        for tenancy, count in ((alpha, 3), (beta, 2)):
            for _ in range(count):
                assert await _post(http, tenancy.endpoint, tenancy.api_key, INIT) == 200
        # A method a client made up is counted, but as "other": clients cannot add series.
        made_up = await _post(http, alpha.endpoint, alpha.api_key,
                              {"jsonrpc": "2.0", "id": 2, "method": "vendor/made-up-7f3a"})
        assert await _post(http, beta.endpoint, None, INIT) == 401

    text = await _scrape(gw.url, gw.admin_key)
    assert _type(text, "gateway_requests_total") == "counter"
    assert _series(text, "gateway_requests_total") == {
        '{tenant="alpha",server="demo",method="initialize",status="200"}': 3,
        f'{{tenant="alpha",server="demo",method="other",status="{made_up}"}}': 1,
        '{tenant="beta",server="demo",method="initialize",status="200"}': 2,
        '{tenant="",server="",method="",status="401"}': 1,  # no caller known, no server looked up
    }
    assert "made-up" not in text
    counts = _series(text, "gateway_request_duration_seconds_count")
    assert counts == {'{tenant="alpha",server="demo"}': 4, '{tenant="beta",server="demo"}': 2,
                      '{tenant="",server=""}': 1}
    buckets = _series(text, "gateway_request_duration_seconds_bucket")
    assert buckets['{tenant="alpha",server="demo",le="+Inf"}'] == 4
    assert buckets['{tenant="beta",server="demo",le="+Inf"}'] == 2
    assert _series(text, "gateway_request_duration_seconds_sum")['{tenant="beta",server="demo"}'] > 0


async def test_writer_queue_totals_and_flush_latency(pg_url, make_gateway, mcp_upstream):
    # Nothing is written until the test flushes: one batch per table.
    gw = await make_gateway(pg_url, writer={"flush_interval": 3600, "batch_size": 1000})
    t = await gw.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            assert await _post(http, t.endpoint, t.api_key, INIT) == 200

    before = await _scrape(gw.url, gw.admin_key)
    # Queued now: 3 request logs and the audit entries (3 calls, plus the admin calls of tenancy()).
    assert _type(before, "gateway_writer_queue_depth") == "gauge"
    queued = _series(before, "gateway_writer_queue_depth")[""]
    assert queued >= 6
    assert _series(before, "gateway_writer_written_total") == {"": 0}
    assert _series(before, "gateway_writer_flush_seconds_count") == {}

    await gw.gateway.writer.flush()
    after = await _scrape(gw.url, gw.admin_key)
    conn = await asyncpg.connect(pg_url)
    try:
        logs = await conn.fetchval("SELECT count(*) FROM request_logs")
        audit = await conn.fetchval("SELECT count(*) FROM audit_logs")
    finally:
        await conn.close()
    assert logs == 3
    assert _series(after, "gateway_writer_queue_depth") == {"": 0}
    assert _type(after, "gateway_writer_written_total") == "counter"
    assert _series(after, "gateway_writer_written_total") == {"": logs + audit} == {"": queued}
    assert _series(after, "gateway_writer_dropped_total") == {"": 0}
    assert _series(after, "gateway_writer_spilled_total") == {"": 0}
    assert _series(after, "gateway_writer_failed_flushes_total") == {"": 0}
    assert _type(after, "gateway_writer_flush_seconds") == "histogram"
    assert _series(after, "gateway_writer_flush_seconds_count") == {
        '{table="audit_logs"}': 1, '{table="request_logs"}': 1,
    }
    assert _series(after, "gateway_writer_flush_seconds_bucket")['{table="request_logs",le="+Inf"}'] == 1
    assert _series(after, "gateway_writer_flush_seconds_sum")['{table="request_logs"}'] > 0


async def test_database_pools_in_use_and_idle(pg_url, make_gateway):
    gw = await make_gateway(pg_url)
    text = await _scrape(gw.url, gw.admin_key)
    assert _type(text, "gateway_db_connections") == "gauge"
    pools = _series(text, "gateway_db_connections")
    assert set(pools) == {f'{{pool="{pool}",state="{state}"}}' for pool in ("control", "writer")
                          for state in ("in_use", "idle")}
    assert pools['{pool="writer",state="in_use"}'] == 0  # nothing to write
    assert pools['{pool="writer",state="idle"}'] >= 1  # the pool keeps one open (min_size)
    assert _series(text, "gateway_db_connections_max") == {'{pool="writer"}': 2}

    # A connection taken from each pool shows as in use.
    async with gw.gateway._sink.pool.acquire(), gw.gateway.engine.connect() as control:
        await control.exec_driver_sql("SELECT 1")
        held = _series(await _scrape(gw.url, gw.admin_key), "gateway_db_connections")
    assert held['{pool="writer",state="in_use"}'] == 1
    assert held['{pool="control",state="in_use"}'] >= 1


async def test_database_pools_on_sqlite(sqlite_url, make_gateway):
    gw = await make_gateway(sqlite_url)
    async with gw.gateway.engine.connect() as control:
        await control.exec_driver_sql("SELECT 1")
        pools = _series(await _scrape(gw.url, gw.admin_key), "gateway_db_connections")
    assert set(pools) == {f'{{pool="{pool}",state="{state}"}}' for pool in ("control", "writer")
                          for state in ("in_use", "idle")}
    assert pools['{pool="control",state="in_use"}'] >= 1
    assert "gateway_db_connections_max{" not in await _scrape(gw.url, gw.admin_key)  # SQLAlchemy does not say


def _worker_text(tenants: dict, counts: dict, flushes: list[float], queued: int) -> str:
    """One worker's /metrics, rendered by a real Registry the way the gateway builds its series."""
    registry = Registry()
    requests = registry.counter("gateway_requests_total", "requests", ("tenant", "server", "method", "status"),
                                {"tenant": tenant_names(lambda: tenants)})
    for labels, count in counts.items():
        requests.inc(*labels, amount=count)
    histogram = registry.histogram("gateway_writer_flush_seconds", "flushes", ("table",))
    for seconds in flushes:
        histogram.observe(seconds, "request_logs")
    registry.gauge("gateway_writer_queue_depth", "queued", lambda: [((), queued)])
    registry.counter_from("gateway_writer_written_total", "written", lambda: [((), 10 * len(flushes))])
    return registry.render()


def test_workers_merge_sums_the_new_counters_and_histograms_and_keeps_gauges_per_worker():
    class Tenant:
        def __init__(self, name: str) -> None:
            self.name = name

    alpha, beta = object(), object()
    tenants = {alpha: Tenant("alpha"), beta: Tenant("beta")}
    merged = merge_metrics({
        0: _worker_text(tenants, {(alpha, "demo", "initialize", 200): 3, (None, "", "", 401): 1}, [0.002, 0.2], 5),
        1: _worker_text(tenants, {(alpha, "demo", "initialize", 200): 4, (beta, "demo", "tools/call", 200): 2},
                        [0.02], 7),
    }, 2)
    assert _series(merged, "gateway_requests_total") == {
        '{tenant="alpha",server="demo",method="initialize",status="200"}': 7,
        '{tenant="",server="",method="",status="401"}': 1,
        '{tenant="beta",server="demo",method="tools/call",status="200"}': 2,
    }
    buckets = _series(merged, "gateway_writer_flush_seconds_bucket")
    assert buckets['{table="request_logs",le="0.0025"}'] == 1
    assert buckets['{table="request_logs",le="0.025"}'] == 2
    assert buckets['{table="request_logs",le="+Inf"}'] == 3
    assert _series(merged, "gateway_writer_flush_seconds_count") == {'{table="request_logs"}': 3}
    assert _series(merged, "gateway_writer_flush_seconds_sum")['{table="request_logs"}'] == pytest.approx(0.222)
    assert _series(merged, "gateway_writer_written_total") == {"": 30}
    assert _series(merged, "gateway_writer_queue_depth") == {'{worker="0"}': 5, '{worker="1"}': 7}
    assert _series(merged, "gateway_worker_requests_total") == {'{worker="0"}': 4, '{worker="1"}': 6}


def test_a_tenant_is_named_when_scraped_and_its_id_shown_once_it_is_gone():
    class Tenant:
        name = "acme"

    tenant_id, gone = object(), "5d1c2a5e-0000-4000-8000-000000000000"
    tenants = {tenant_id: Tenant()}
    registry = Registry()
    counter = registry.counter("c_total", "c", ("tenant", "server"), {"tenant": tenant_names(lambda: tenants)})
    counter.inc(tenant_id, "demo")
    counter.inc(gone, "demo")
    counter.inc(None, "")
    assert _series(registry.render(), "c_total") == {
        '{tenant="acme",server="demo"}': 1, f'{{tenant="{gone}",server="demo"}}': 1, '{tenant="",server=""}': 1,
    }
