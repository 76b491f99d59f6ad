"""`gateway demo` as a new user runs it: embedded defaults, a real MCP client, Ctrl-C to stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from gateway.demo.client import gateway_client
from harness import free_port


def _start_demo(cwd) -> tuple[subprocess.Popen, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATAPLANE_PORT"] = str(free_port())
    env["GATEWAY_CONTROLPLANE_PORT"] = str(free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo"], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    values: dict[str, str] = {}
    while not {"endpoint", "api_key"} <= set(values):
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"demo exited early: {proc.stderr.read()}")
        name, _, value = line.strip().partition("=")
        values[name] = value
    return proc, values


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_demo_serves_a_real_mcp_server(tmp_path, mode):
    proc, values = await asyncio.to_thread(_start_demo, tmp_path)
    try:
        assert values["endpoint"].endswith("/servers/demo/mcp")
        assert values["api_key"].startswith("gw_")
        async with gateway_client(values["endpoint"], values["api_key"], mode=mode) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"echo", "add"} <= tools
            result = await client.call_tool("echo", {"text": "hello"})
            assert result.content[0].text == "hello"
    finally:
        code = await asyncio.to_thread(_stop, proc)
    assert code == 0
    assert (tmp_path / "gateway.db").exists()  # the embedded default: a SQLite file


async def test_demo_runs_again_in_the_same_place(tmp_path):
    for _ in range(2):
        proc, values = await asyncio.to_thread(_start_demo, tmp_path)
        try:
            async with gateway_client(values["endpoint"], values["api_key"]) as client:
                assert (await client.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3.0"
        finally:
            assert await asyncio.to_thread(_stop, proc) == 0
