"""StdioUpstream against real MCP servers over stdio: the official SDK's, and a tiny stdlib one.

Every test is also checked for leaks: no child of this process it started may
be left, running or as a zombie (read from /proc, since psutil is not here).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import orjson
import pytest

from gateway.dataplane.mcp_client import UpstreamRpcError
from gateway.dataplane.stdio import MAX_LINE, StdioUpstream
from gateway.dataplane.upstream import UpstreamError, UpstreamTimeout

SERVERS = Path(__file__).parent / "stdio_servers"


def sdk_server(*flags: str) -> str:
    return shlex.join([sys.executable, str(SERVERS / "sdk_server.py"), *flags])


def tiny_server(*flags: str) -> str:
    return shlex.join([sys.executable, str(SERVERS / "tiny_server.py"), *flags])


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1])


def children() -> dict[int, str]:
    """This process's children and their states (Z for a zombie)."""
    me, found = os.getpid(), {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == me:
                found[int(entry.name)] = stat[0]
    return found


def is_dead(pid: int, within: float = 2.0) -> bool:
    """Gone, or a zombie awaiting its new parent (an orphaned grandchild's reaper is not us).

    A process sent SIGKILL runs no more code, but it is gone only once the kernel
    has scheduled it; and it is not our child, so there is nothing to wait on: poll.
    """
    deadline = time.monotonic() + within
    while True:
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaked_children():
    before = set(children())
    yield
    left = {pid: state for pid, state in children().items() if pid not in before}
    for pid in left:  # this test's own leftovers: end them, so a leak cannot hang the run
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    assert left == {}, f"child processes left behind (pid: state): {left}"


def text_of(result: dict) -> str:
    return result["content"][0]["text"]


async def test_lists_and_calls_tools():
    upstream = StdioUpstream(sdk_server(), timeout=10)
    try:
        assert upstream.pid is None  # started on first use
        listed = await upstream.request("tools/list", {})
        assert {"echo", "add", "slow", "crash", "flood", "pids"} <= {t["name"] for t in listed["tools"]}
        assert upstream.era == "legacy"
        assert "tools" in upstream.server_capabilities
        assert upstream.protocol_version == "2025-11-25"
        pid = upstream.pid
        assert pid is not None and pid in children()
        assert text_of(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "ünïcode ✓\nline"}})) == "ünïcode ✓\nline"
        assert text_of(await upstream.request("tools/call", {"name": "add", "arguments": {"a": 20, "b": 22}})) == "42.0"
        assert (await upstream.request("ping")) == {}
        await upstream.notify("notifications/roots/list_changed")
        assert (await upstream.request("resources/read", {"uri": "test://readme"}))["contents"][0]["text"] == "a test server"
        assert upstream.pid == pid and upstream.restarts == 0
    finally:
        await upstream.close()
    assert upstream.pid is None


async def test_concurrent_calls_are_multiplexed():
    upstream = StdioUpstream(sdk_server(), timeout=20)
    try:
        texts = [f"call {i} " + "x" * (i * 997) for i in range(50)]
        results = await asyncio.gather(
            *(upstream.request("tools/call", {"name": "echo", "arguments": {"text": t}}) for t in texts),
            *(upstream.request("tools/call", {"name": "add", "arguments": {"a": i, "b": 1000}}) for i in range(10)),
        )
        assert [text_of(r) for r in results[:50]] == texts
        assert [text_of(r) for r in results[50:]] == [f"{i + 1000}.0" for i in range(10)]
        assert upstream.restarts == 0
    finally:
        await upstream.close()


async def test_jsonrpc_error_comes_back_as_rpc_error():
    upstream = StdioUpstream(sdk_server(), timeout=10)
    try:
        with pytest.raises(UpstreamRpcError) as caught:
            await upstream.request("resources/read", {"uri": "test://nothing-here"})
        assert caught.value.error["code"] == -32602
        with pytest.raises(UpstreamRpcError) as caught:
            await upstream.request("no/such/method", {})
        assert caught.value.error["code"] == -32601
        # This SDK answers an unknown tool with a result flagged isError, not a JSON-RPC error.
        answer = await upstream.request("tools/call", {"name": "nope", "arguments": {}})
        assert answer["isError"] is True
        # The process is fine afterwards.
        assert text_of(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "ok"}})) == "ok"
    finally:
        await upstream.close()


async def test_crash_fails_pending_calls_and_the_next_call_restarts():
    upstream = StdioUpstream(sdk_server(), timeout=20, restart_backoff=(0.05, 1.0))
    try:
        await upstream.request("tools/list", {})
        first = upstream.pid
        slow = asyncio.ensure_future(upstream.request("tools/call", {"name": "slow", "arguments": {"seconds": 30}}))
        await asyncio.sleep(0.2)
        with pytest.raises(UpstreamError, match="exited with status 3"):
            await upstream.request("tools/call", {"name": "crash", "arguments": {"status": 3}})
        with pytest.raises(UpstreamError, match="exited with status 3"):
            await slow
        assert upstream.pid is None
        assert text_of(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "again"}})) == "again"
        assert upstream.pid not in (None, first)
        assert upstream.restarts == 1
        assert is_dead(first)
    finally:
        await upstream.close()


async def test_restart_backoff_grows_between_quick_deaths():
    command = shlex.join([sys.executable, "-c", "import sys; sys.exit(4)"])
    upstream = StdioUpstream(command, timeout=5, restart_backoff=(0.2, 0.4))
    try:
        started = time.monotonic()
        for _ in range(4):
            with pytest.raises(UpstreamError, match=r"did not start: .*exited with status 4") as caught:
                await upstream.request("tools/list", {})
            assert repr(command) in str(caught.value)
        # Waits of 0.2, 0.4, 0.4 (capped) between the four attempts.
        assert time.monotonic() - started >= 0.9
        assert upstream.restarts == 3
    finally:
        await upstream.close()


async def test_timeout_cancels_the_request_and_the_process_stays():
    upstream = StdioUpstream(sdk_server(), timeout=1.0)
    try:
        await upstream.ensure_ready()  # start-up has its own, longer deadline
        pid = upstream.pid
        with pytest.raises(UpstreamTimeout, match="within 1s"):
            await upstream.request("tools/call", {"name": "slow", "arguments": {"seconds": 5}})
        assert text_of(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "still here"}})) == "still here"
        assert upstream.pid == pid and upstream.restarts == 0
    finally:
        await upstream.close()


async def test_timeout_and_cancellation_tell_the_server():
    upstream = StdioUpstream(tiny_server(), timeout=1.0)
    try:
        with pytest.raises(UpstreamTimeout):
            await upstream.request("tools/call", {"name": "hang", "arguments": {}})
        call = asyncio.ensure_future(upstream.request("tools/call", {"name": "hang", "arguments": {}}))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        reported = orjson.loads(text_of(await upstream.request("tools/call", {"name": "cancelled", "arguments": {}})))
        assert [r["reason"] for r in reported] == ["timeout", "the client went away"]
        assert all(isinstance(r["requestId"], int) for r in reported)
        assert upstream.restarts == 0
    finally:
        await upstream.close()


async def test_environment_and_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("GATEWAY_SESSIONS_SECRET", "not for upstreams")
    upstream = StdioUpstream(tiny_server(), timeout=5, env={"API_TOKEN": "for this server"}, cwd=tmp_path)
    try:
        seen = orjson.loads(text_of(await upstream.request("tools/call", {"name": "environ", "arguments": {}})))
        assert seen["env"]["API_TOKEN"] == "for this server"
        assert seen["env"]["PATH"] == os.environ["PATH"]
        assert "GATEWAY_SESSIONS_SECRET" not in seen["env"]
        assert seen["cwd"] == str(tmp_path)
    finally:
        await upstream.close()


async def test_missing_command_is_named():
    upstream = StdioUpstream("/nonexistent/mcp-server-xyz --port 1", timeout=5)
    with pytest.raises(UpstreamError, match=r"cannot start the stdio server '/nonexistent/mcp-server-xyz --port 1'"):
        await upstream.request("tools/list", {})
    await upstream.close()


async def test_command_that_is_not_executable(tmp_path):
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    upstream = StdioUpstream(str(script), timeout=5)
    with pytest.raises(UpstreamError, match="cannot start the stdio server .*server.sh.*Permission denied"):
        await upstream.request("tools/list", {})
    await upstream.close()


async def test_bad_command_lines():
    for command, message in (("", "empty"), ("python -c 'unbalanced", "No closing quotation")):
        upstream = StdioUpstream(command, timeout=5)
        with pytest.raises(UpstreamError, match=message):
            await upstream.request("tools/list", {})
        await upstream.close()


async def test_closed_upstream_refuses_and_close_is_idempotent():
    upstream = StdioUpstream(tiny_server(), timeout=5)
    await upstream.request("tools/list", {})
    pending = asyncio.ensure_future(upstream.request("tools/call", {"name": "hang", "arguments": {}}))
    await asyncio.sleep(0.1)
    await asyncio.gather(upstream.close(), upstream.close())
    with pytest.raises(UpstreamError, match="closed"):
        await pending
    await upstream.close()
    with pytest.raises(UpstreamError, match="closed"):
        await upstream.request("tools/list", {})
    assert upstream.pid is None


async def test_close_during_start_leaves_nothing():
    upstream = StdioUpstream(sdk_server(), timeout=10)
    starting = asyncio.ensure_future(upstream.request("tools/list", {}))
    await asyncio.sleep(0.2)  # spawned, still importing the SDK
    await upstream.close()
    with pytest.raises((UpstreamError, asyncio.CancelledError)):
        await starting


async def test_many_starts_and_stops_leak_nothing():
    grandchildren = []

    async def one() -> None:
        upstream = StdioUpstream(tiny_server("--grandchild"), timeout=10)
        try:
            pids = orjson.loads(text_of(await upstream.request("tools/call", {"name": "pids", "arguments": {}})))
            assert pids["pid"] == upstream.pid
            grandchildren.append(pids["grandchild"])
        finally:
            await upstream.close()

    before = set(children())
    for _ in range(3):
        await asyncio.gather(*(one() for _ in range(10)))
    assert len(grandchildren) == 30
    left = {pid: state for pid, state in children().items() if pid not in before}
    assert left == {}
    assert [pid for pid in grandchildren if not is_dead(pid)] == []


async def test_server_ignoring_eof_and_sigterm_is_killed_with_its_child():
    upstream = StdioUpstream(sdk_server("--ignore-term", "--linger", "--grandchild"), timeout=10)
    try:
        pids = orjson.loads(text_of(await upstream.request("tools/call", {"name": "pids", "arguments": {}})))
        assert pids["pid"] == upstream.pid
        assert not is_dead(pids["grandchild"], within=0)
    finally:
        started = time.monotonic()
        await upstream.close()
        took = time.monotonic() - started
    assert 3.5 < took < 10  # stdin closed (2 s), SIGTERM ignored (2 s), then SIGKILL
    assert is_dead(pids["pid"])
    assert is_dead(pids["grandchild"])


async def test_stderr_flood_does_not_stall():
    upstream = StdioUpstream(sdk_server(), timeout=20)
    try:
        calls = [
            upstream.request("tools/call", {"name": "flood", "arguments": {"lines": 20000, "width": 500}}),
            upstream.request("tools/call", {"name": "flood", "arguments": {"lines": 1, "width": 4_000_000, "tail": 100_000}}),
            *(upstream.request("tools/call", {"name": "echo", "arguments": {"text": str(i)}}) for i in range(20)),
        ]
        results = await asyncio.gather(*calls)
        assert text_of(results[0]) == "20000"
        assert [text_of(r) for r in results[2:]] == [str(i) for i in range(20)]
        assert upstream.restarts == 0
    finally:
        await upstream.close()


async def test_noise_and_server_requests_on_stdout():
    upstream = StdioUpstream(tiny_server(), timeout=5)
    try:
        answers = orjson.loads(text_of(await upstream.request("tools/call", {"name": "probe", "arguments": {}})))
        assert answers["s1"] == {"jsonrpc": "2.0", "id": "s1", "result": {}}
        assert answers["s2"]["error"]["code"] == -32601
        assert text_of(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "fine"}})) == "fine"
        assert upstream.restarts == 0
    finally:
        await upstream.close()


async def test_over_long_line_fails_and_restarts():
    upstream = StdioUpstream(tiny_server(), timeout=10, restart_backoff=(0.01, 0.1))
    try:
        await upstream.request("tools/list", {})
        first = upstream.pid
        fits = await upstream.request("tools/call", {"name": "huge", "arguments": {"size": 1_000_000}})
        assert len(fits["x"]) == 1_000_000
        with pytest.raises(UpstreamError, match="longer than"):
            await upstream.request("tools/call", {"name": "huge", "arguments": {"size": MAX_LINE}})
        assert text_of(await upstream.request("tools/call", {"name": "echo", "arguments": {"text": "new"}})) == "new"
        assert upstream.pid != first and upstream.restarts == 1
    finally:
        await upstream.close()


async def test_server_killed_from_outside():
    upstream = StdioUpstream(tiny_server(), timeout=5, restart_backoff=(0.01, 0.1))
    try:
        await upstream.request("tools/list", {})
        pending = asyncio.ensure_future(upstream.request("tools/call", {"name": "hang", "arguments": {}}))
        await asyncio.sleep(0.1)
        os.kill(upstream.pid, signal.SIGKILL)
        with pytest.raises(UpstreamError, match=r"exited with status -9"):
            await pending
        assert (await upstream.request("ping")) == {}
        assert upstream.restarts == 1
    finally:
        await upstream.close()
