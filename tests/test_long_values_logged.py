"""What clients send into request_logs (a tool name, a resource URI, a method of their own) is logged as the
audit trail logs it: cut to its column, without NULs or lone surrogates, its secrets redacted; and what
upstreams send (an error code of any shape) is kept only as the columns can hold it. No such row is refused by
the database, dropped with its batch's other rows, or left stuck in the writer."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg

from gateway.db import tables


def _headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}


async def test_long_targets_and_methods_are_cut_to_their_columns(gateway, pg_url, mcp_upstream_json):
    t = await gateway.tenancy("acme", mcp_upstream_json, rate_limit_per_hour=100_000)
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(150):  # discovery on registration stores the upstream's tools
            if await conn.fetchval("SELECT count(*) FROM server_tools WHERE name = 'echo'"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the upstream's tools were never discovered")
    finally:
        await conn.close()
    tool, uri, method = "t" * 300, "file:///" + "d/" * 200, "x/" + "m" * 300
    bodies = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}},
        {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": uri}},
        {"jsonrpc": "2.0", "id": 3, "method": method, "params": {}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}},
    ]
    # Raw JSON: a NUL and a lone surrogate escaped in tool names (the second is no JSON msgspec takes), and a URI
    # carrying a password.
    raw = [
        b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"nul\\u0000here","arguments":{}}}',
        b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"half\\ud800pair","arguments":{}}}',
        b'{"jsonrpc":"2.0","id":7,"method":"resources/read","params":{"uri":"postgres://admin:hunter2secret@db/x"}}',
    ]
    async with aiohttp.ClientSession() as http:
        async def one(body: dict) -> int:
            async with http.post(t.endpoint, json=body, headers=_headers(t.api_key)) as resp:
                await resp.read()
                return resp.status

        async def raw_one(body: bytes) -> int:
            headers = {**_headers(t.api_key), "Content-Type": "application/json"}
            async with http.post(t.endpoint, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        await asyncio.gather(*(one(body) for body in bodies), *(raw_one(body) for body in raw))
    writer = gateway.gateway.writer
    await gateway.gateway.server_stats.flush()  # the period's server_metrics rows, and server_tools' counts
    await writer.flush()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT method, tool_name FROM request_logs ORDER BY created_at")
        metrics = {row["tool_name"] for row in await conn.fetch("SELECT tool_name FROM server_metrics")}
        echo_calls = await conn.fetchval("SELECT success_count + error_count FROM server_tools WHERE name = 'echo'")
    finally:
        await conn.close()
    tool_length = tables.request_logs.c.tool_name.type.length
    method_length = tables.request_logs.c.method.type.length
    logged = {(row["method"], row["tool_name"]) for row in rows}
    assert ("tools/call", tool[:tool_length]) in logged
    assert ("resources/read", uri[:tool_length]) in logged
    assert any(m == method[:method_length] for m, _ in logged), logged
    assert ("tools/call", "echo") in logged
    assert ("tools/call", "nul\ufffdhere") in logged
    assert (None, None) in logged  # the lone surrogate's body: refused as JSON, logged all the same
    assert ("resources/read", "postgres://admin:[REDACTED]@db/x") in logged
    assert not any("hunter2" in (name or "") for _, name in logged)
    assert len(rows) == 7 and writer.stats.dropped == 0
    # The calls that reached the upstream: their server_metrics rows hold the names as request_logs does, and
    # the odd names fail nothing of the known tool's counts.
    assert {"echo", "nul\ufffdhere", tool[:tool_length]} <= metrics
    assert echo_calls == 1


class _OddErrors:
    """An upstream answering tools/call with JSON-RPC errors of every odd shape: a code that is no integer, one
    past 32 bits, an error that is no object."""

    ERRORS = {"text": {"code": "oops", "message": "m"}, "big": {"code": 2**40, "message": "m"},
              "float": {"code": 1.5, "message": "m"}, "flat": "an error as a string",
              "usual": {"code": -32000, "message": "m"}}

    def __init__(self) -> None:
        from harness import LocalPeer

        peer = self

        class Peer(LocalPeer):
            async def _handle(self, request):
                from aiohttp import web

                message = await request.json()
                if "id" not in message:
                    return web.Response(status=202)
                if message["method"] == "tools/list":
                    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in peer.ERRORS]
                    return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}})
                if message["method"] == "tools/call":
                    error = peer.ERRORS[message["params"]["name"]]
                    return web.json_response({"jsonrpc": "2.0", "id": message["id"], "error": error})
                return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {}})

        self.peer = Peer()


async def test_an_upstreams_odd_error_codes_are_logged_without_losing_a_row(gateway, pg_url):
    """The tenant endpoint records the JSON-RPC error code of an upstream's answer: a code that is no 32-bit
    integer is recorded as no code (the client gets it as it came), and every row reaches both tables. (An
    error that is no object reaches the client as an internal error of the upstream's message, so that code.)"""
    odd = _OddErrors()
    url = await odd.peer.start()
    try:
        t = await gateway.tenancy("acme", url, rate_limit_per_hour=100_000)
        async with aiohttp.ClientSession() as http:
            for name in odd.ERRORS:
                body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"name": f"demo__{name}", "arguments": {}}}
                async with http.post(f"{gateway.url}/mcp", json=body, headers={
                        **_headers(t.api_key), "MCP-Protocol-Version": "2025-11-25"}) as resp:
                    answer = await resp.json()
                    assert resp.status == 200 and "error" in answer, answer
        await gateway.gateway.writer.flush()
        conn = await asyncpg.connect(pg_url)
        try:
            logged = {row["tool_name"]: row["error_code"] for row in await conn.fetch(
                "SELECT tool_name, error_code FROM request_logs WHERE method = 'tools/call'")}
            audited = {row["resource_id"]: row["error_code"] for row in await conn.fetch(
                "SELECT resource_id, error_code FROM audit_logs WHERE action = 'mcp.tools/call'")}
        finally:
            await conn.close()
    finally:
        await odd.peer.stop()
    expected = {"demo__text": None, "demo__big": None, "demo__float": None, "demo__flat": -32603,
                "demo__usual": -32000}
    assert logged == expected
    assert audited == expected
    assert gateway.gateway.writer.stats.dropped == 0
