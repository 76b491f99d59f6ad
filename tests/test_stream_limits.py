"""Relayed SSE streams: progress keeps a call alive, silence or an over-long stream ends it with an error."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError

from gateway.dataplane import jsonrpc
from gateway.demo.client import gateway_client

MODES = ["legacy", "2026-07-28"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_silent_call_is_abandoned_with_an_error(pg_url, make_gateway, mcp_upstream, mode):
    gw = await make_gateway(pg_url, dataplane={"upstream_timeout": 0.5})
    t = await gw.tenancy("acme", mcp_upstream)
    async with gateway_client(t.endpoint, t.api_key, mode=mode) as client:
        with pytest.raises(MCPError) as err:
            await client.call_tool("count", {"n": 2, "delay": 1.5})
        assert err.value.error.code == jsonrpc.UPSTREAM_TIMEOUT
        # Legacy: the stream opened, then went silent. 2026-07-28: the SDK server holds
        # its answer until the call ends, so the answer's own deadline fires first.
        assert "0.5s" in err.value.error.message
        # The session is still good for the next call.
        assert (await client.call_tool("add", {"a": 1, "b": 1})).content[0].text == "2.0"


@pytest.mark.parametrize("mode", MODES)
async def test_progress_keeps_a_long_call_alive(pg_url, make_gateway, mcp_upstream, mode):
    gw = await make_gateway(pg_url, dataplane={"upstream_timeout": 1.0})
    t = await gw.tenancy("acme", mcp_upstream)
    seen = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async with gateway_client(t.endpoint, t.api_key, mode=mode) as client:
        # 4 steps 0.4 s apart: 1.6 s in all, longer than the 1 s timeout, never silent for 1 s.
        result = await client.call_tool("count", {"n": 4, "delay": 0.4}, progress_callback=on_progress)
    assert result.content[0].text == "counted to 4" and seen == [1, 2, 3, 4]


async def test_no_stream_outlives_the_maximum(pg_url, make_gateway, mcp_upstream):
    # 2025 era here: without a progress token (the SDK client sends one only with a
    # progress callback) the SDK's 2026-07-28 server holds the whole answer until the
    # call ends, so there is no stream to cap; upstream_timeout bounds that answer.
    gw = await make_gateway(pg_url, dataplane={"upstream_timeout": 5, "stream_max_duration": 1.0})
    t = await gw.tenancy("acme", mcp_upstream)
    async with gateway_client(t.endpoint, t.api_key, mode="legacy") as client:
        with pytest.raises(MCPError) as err:
            await client.call_tool("count", {"n": 5, "delay": 0.4})
    assert err.value.error.code == jsonrpc.UPSTREAM_TIMEOUT
    assert "maximum duration of 1s" in err.value.error.message
