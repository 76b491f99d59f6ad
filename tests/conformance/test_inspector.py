"""The MCP Inspector CLI lists and calls tools through the gateway, in both protocol eras.

`@modelcontextprotocol/inspector --cli` (v2, pinned in scripts/node22.sh) against
`/servers/{name}/mcp` in front of the demo upstream, with the API key as
`--header "Authorization: Bearer ..."`. `--protocol-era legacy` speaks 2025-11-25
(initialize, session); `--protocol-era modern` speaks 2026-07-28 (stateless). The
gateway's request log shows which one arrived, so each era is checked on the wire.
"""

from __future__ import annotations

import asyncio
import json
import os

import asyncpg
import pytest

ERAS = ("legacy", "modern")


async def inspector(node22, home, endpoint: str, key: str, era: str, *method_args: str) -> dict:
    """One Inspector CLI call (bounded); its JSON result."""
    proc = await asyncio.create_subprocess_exec(
        str(node22.node), str(node22.inspector), "--cli", endpoint,
        "--transport", "http", "--protocol-era", era, "--header", f"Authorization: Bearer {key}",
        "--format", "json", "--connect-timeout", "10000", *method_args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        # Its catalog, client config and OAuth store live under HOME: keep them in the test's tmp dir.
        env={**os.environ, "HOME": str(home)},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"the Inspector did not finish within 60 s ({era}, {method_args})") from None
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout: {out.decode()[-2000:]}\nstderr: {err.decode()[-2000:]}"
    )
    return json.loads(out)


async def logged_methods(pg_url: str, key_id: str) -> list[str]:
    """Methods the gateway recorded for this key, once its writer has flushed them."""
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(100):
            rows = await conn.fetch(
                "SELECT method FROM request_logs WHERE api_key_id = $1 ORDER BY created_at", key_id
            )
            methods = [row["method"] for row in rows]
            if "tools/call" in methods:
                return methods
            await asyncio.sleep(0.05)
        return methods
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.parametrize("era", ERAS)
async def test_inspector_lists_and_calls_tools_through_the_gateway(
    era, node22, gateway, pg_url, mcp_upstream, tmp_path
):
    tenancy = await gateway.tenancy(f"inspector-{era}", mcp_upstream)

    listed = await inspector(node22, tmp_path, tenancy.endpoint, tenancy.api_key, era, "--method", "tools/list")
    names = {tool["name"] for tool in listed["result"]["tools"]}
    assert {"echo", "add", "count"} <= names

    called = await inspector(
        node22, tmp_path, tenancy.endpoint, tenancy.api_key, era,
        "--method", "tools/call", "--tool-name", "echo", "--tool-arg", "text=hi",
    )
    result = called["result"]
    assert result["isError"] is False
    assert result["content"] == [{"type": "text", "text": "hi"}]

    methods = await logged_methods(pg_url, tenancy.api_key_id)
    assert "tools/list" in methods and "tools/call" in methods, methods
    if era == "legacy":
        # 2025-11-25: a handshake per CLI run, and the session it opened.
        assert "initialize" in methods, methods
    else:
        # 2026-07-28: no handshake at all; results carry the server's identity in _meta.
        assert "initialize" not in methods, methods
        assert "io.modelcontextprotocol/serverInfo" in result.get("_meta", {}), result
