"""Per-server and per-tool call figures: from real calls through the gateway to server_metrics and server_tools."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import sqlalchemy as sa

from gateway.db.engine import create_engine
from gateway.db.tables import server_metrics, server_tools
from gateway.records.server_stats import percentile


async def _until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_calls_reach_server_metrics_and_the_tool_counters(pg_url, make_gateway, mcp_upstream):
    gw = await make_gateway(pg_url, writer={"server_metrics_window": 0.3})
    t = await gw.tenancy("acme", mcp_upstream)
    server_id = uuid.UUID(t.server_id)
    engine = create_engine(pg_url)
    try:
        async def echo_known():
            async with engine.connect() as conn:
                return (await conn.execute(sa.select(server_tools.c.id).where(
                    server_tools.c.server_id == server_id, server_tools.c.name == "echo"))).first()

        await _until(echo_known)  # discovery on registration stored the demo's tools
        async with aiohttp.ClientSession() as http:
            for i in range(5):
                body = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                        "params": {"name": "demo__echo", "arguments": {"text": f"hi {i}"}}}
                async with http.post(f"{gw.url}/mcp", json=body, headers={
                    "Authorization": f"Bearer {t.api_key}", "Accept": "application/json",
                    "MCP-Protocol-Version": "2025-11-25",
                }) as resp:
                    assert resp.status == 200, await resp.text()

        async def echo_rows():
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.select(server_metrics).where(
                    server_metrics.c.server_id == server_id, server_metrics.c.tool_name == "echo"))).mappings().all()
            return rows if sum(r["request_count"] for r in rows) == 5 else None

        rows = await _until(echo_rows)
        for r in rows:
            assert r["error_count"] == 0 and r["tenant_id"] == uuid.UUID(t.tenant_id)
            assert 0 < r["p50_response_ms"] <= r["p95_response_ms"] <= r["p99_response_ms"]
            assert r["avg_response_ms"] > 0 and r["window_seconds"] >= 1
        async with engine.connect() as conn:
            every = (await conn.execute(sa.select(sa.func.sum(server_metrics.c.request_count)).where(
                server_metrics.c.server_id == server_id, server_metrics.c.tool_name.is_(None)))).scalar_one()
        assert every >= 5  # the server's own rows count every call (lists too)

        async def counted():
            async with engine.connect() as conn:
                return (await conn.execute(sa.select(server_tools).where(
                    server_tools.c.server_id == server_id, server_tools.c.name == "echo",
                    server_tools.c.success_count == 5))).mappings().first()

        tool = await _until(counted)
        assert tool["error_count"] == 0 and tool["avg_execution_time"] > 0
    finally:
        await engine.dispose()


def test_percentile_is_the_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 0.99)) == (50.0, 95.0, 99.0)
    assert percentile([7.0], 0.99) == 7.0
