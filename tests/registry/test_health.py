"""Health monitoring of upstreams (registry/health.py): states, thresholds, hysteresis, leases, passive health.

Real peers: the SDK demo server behind a TCP relay the test cuts, the SDK's
stdio server (killed), and a hand-written Streamable HTTP peer in the test's
own loop that can lack `ping`, answer slowly or fail, and counts every probe
by the session it came on (so "only one process probes" is a count). Short
intervals come from each server's own settings, as an admin would set them;
the harness's default interval keeps probes out of every other test.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from aiohttp import web
from harness import LocalPeer
from tcp_relay import TcpRelay

from gateway.controlplane.service import bump_version
from gateway.db.tables import mcp_servers

SDK_STDIO = Path(__file__).parent.parent / "stdio_servers" / "sdk_server.py"
# A probe every 0.2 s; a timeout long enough that a loaded machine does not fail probes by itself.
FAST = {"health_interval": 0.2, "health_timeout": 5.0, "unhealthy_after": 3, "healthy_after": 2}
WAIT = 30.0


class Peer(LocalPeer):
    """A 2025-11-25 Streamable HTTP MCP server (JSON answers) whose probes the test can count and steer."""

    def __init__(self, *, ping: bool = True, delay: float = 0.0) -> None:
        self.ping = ping  # False: ping is "method not found", as some servers in the field answer
        self.delay = delay  # seconds before answering ping and tools/list
        self.fail = False  # True: ping and tools/list get HTTP 500
        self.methods: collections.Counter[str] = collections.Counter()
        self.probes_by_session: collections.Counter[str | None] = collections.Counter()
        self._sessions = itertools.count(1)

    @property
    def probes(self) -> int:
        """Pings: only the health monitor sends them (capability discovery lists too)."""
        return self.methods["ping"]

    async def _handle(self, request: web.Request) -> web.Response:
        message = await request.json()
        method, request_id = message.get("method"), message.get("id")
        self.methods[method] += 1
        if request_id is None:
            return web.Response(status=202)
        headers = {}
        if method == "ping":
            self.probes_by_session[request.headers.get("Mcp-Session-Id")] += 1
        if method in ("ping", "tools/list"):
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail:
                return web.json_response({"error": "broken on purpose"}, status=500)
        if method == "initialize":
            headers["Mcp-Session-Id"] = f"session-{next(self._sessions)}"
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "peer", "version": "0"}}
        elif method == "ping" and self.ping:
            result = {}
        elif method == "tools/list":
            result = {"tools": [{"name": "noop", "inputSchema": {"type": "object"}}]}
        else:  # server/discover too: this peer is of the handshake era
            return web.json_response({"jsonrpc": "2.0", "id": request_id,
                                      "error": {"code": -32601, "message": "Method not found"}})
        return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": result}, headers=headers)


@pytest.fixture
async def peer():
    made: list[Peer] = []

    async def make(**options) -> tuple[Peer, str]:
        p = Peer(**options)
        made.append(p)
        return p, await p.start()

    yield make
    for p in made:
        await p.stop()


@pytest.fixture
async def relay(mcp_upstream):
    """The SDK demo server behind a relay the test can cut."""
    parts = urlsplit(mcp_upstream)
    r = await TcpRelay(parts.hostname, parts.port).start()
    yield r, f"http://127.0.0.1:{r.port}{parts.path}"
    await r.stop()


# -- helpers ------------------------------------------------------------------------------------
async def _register(gw, tenant_id: str, name: str, url: str, *, transport: str = "http", **settings) -> uuid.UUID:
    status, body = await gw.admin("POST", "/servers", {"tenant_id": tenant_id, "name": name, "endpoint_url": url,
                                                       "transport_type": transport})
    assert status == 201, body
    server_id = uuid.UUID(body["id"])
    await _settings(gw, server_id, **{**FAST, **settings})
    return server_id


async def _settings(gw, server_id: uuid.UUID, **settings) -> None:
    """The server's own settings, written as a control-plane write is (version bumped, change signalled)."""
    async with gw.gateway.engine.begin() as conn:
        await conn.execute(sa.update(mcp_servers).where(mcp_servers.c.id == server_id).values(settings=settings))
        await bump_version(conn)
    await gw.gateway.store.publish_change()


async def _row(gw, server_id: uuid.UUID) -> dict:
    async with gw.gateway.engine.connect() as conn:
        row = (await conn.execute(sa.select(mcp_servers).where(mcp_servers.c.id == server_id))).mappings().one()
    return dict(row)


async def _until(gw, server_id: uuid.UUID, status: str, timeout: float = WAIT) -> dict:
    """The server's row once its stored status is `status`."""
    deadline = time.monotonic() + timeout
    while True:
        row = await _row(gw, server_id)
        if row["health_status"] == status:
            return row
        assert time.monotonic() < deadline, f"still {row['health_status']} after {timeout}s: {row['health_detail']}"
        await asyncio.sleep(0.05)


async def _eventually(predicate, timeout: float = WAIT, what: str = "", context=None) -> None:
    """Wait for `predicate`; on timeout the message names `what` and, if given, what `context()` says."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}" + (f" ({context()})" if context else "")
        await asyncio.sleep(0.05)


def _snapshot_status(gw, server_id: uuid.UUID) -> str | None:
    for entry in gw.gateway.store.current.servers.values():
        if entry.id == server_id:
            return entry.health_status
    return None


async def _tenant(gw, name: str) -> str:
    status, body = await gw.admin("POST", "/tenants", {"name": name})
    assert status == 201, body
    return body["id"]


# -- states, thresholds, hysteresis -------------------------------------------------------------
async def test_healthy_then_unhealthy_after_exactly_n_failures_and_back_after_m_successes(gateway, relay):
    r, url = relay
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "demo", url)

    row = await _until(gateway, server_id, "HEALTHY")
    assert row["health_detail"]["last_transition"]["from"] == "UNKNOWN"
    # The demo server speaks 2026-07-28, which has no ping (SEP-2575): server/discover stands in.
    assert row["health_detail"]["probe"] == "server/discover" and row["avg_response_time"] > 0
    # The transition bumped the configuration version: the snapshot carries it.
    await _eventually(lambda: _snapshot_status(gateway, server_id) == "HEALTHY", what="snapshot HEALTHY")

    r.cut()
    row = await _until(gateway, server_id, "UNHEALTHY")
    transition = row["health_detail"]["last_transition"]
    assert transition["from"] == "HEALTHY"
    assert transition["reason"].startswith("3 consecutive failures"), transition  # not 2, not 4
    assert row["health_detail"]["ok"] is False and row["health_detail"]["error"]

    r.restore()
    row = await _until(gateway, server_id, "HEALTHY")
    transition = row["health_detail"]["last_transition"]
    assert transition == {**transition, "from": "UNHEALTHY", "reason": "2 consecutive successes"}
    await _eventually(lambda: _snapshot_status(gateway, server_id) == "HEALTHY", what="snapshot HEALTHY again")


async def test_a_slow_server_is_degraded_not_unhealthy(gateway, peer):
    slow, url = await peer(delay=0.3)
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "slow", url, degraded_latency_ms=100)

    row = await _until(gateway, server_id, "DEGRADED")
    detail = row["health_detail"]
    # The peer's 0.3 s sleep is timed from its loop's cached clock (libuv's), which can lag the moment the
    # request arrived by a millisecond or so: the probe may measure 299.5 ms. Far above the 100 ms bound all
    # the same.
    assert detail["ok"] is True and detail["latency_ms"] >= 290 and detail["consecutive_failures"] == 0
    assert "degraded above 100 ms" in detail["last_transition"]["reason"]
    probes = slow.probes
    await _eventually(lambda: slow.probes >= probes + 3, what="three more slow probes")
    assert (await _row(gateway, server_id))["health_status"] == "DEGRADED"  # slow is never a failure

    slow.delay = 0.0
    row = await _until(gateway, server_id, "HEALTHY")
    assert row["health_detail"]["last_transition"]["from"] == "DEGRADED"


async def test_a_server_without_ping_is_probed_with_tools_list(gateway, peer):
    quiet, url = await peer(ping=False)
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "noping", url)

    row = await _until(gateway, server_id, "HEALTHY")
    assert row["health_detail"]["probe"] == "tools/list" and row["health_detail"]["no_ping"] is True
    listed = quiet.methods["tools/list"]
    await _eventually(lambda: quiet.methods["tools/list"] >= listed + 3, what="more tools/list probes")
    assert quiet.methods["ping"] == 1  # asked once, remembered


async def test_maintenance_is_never_overridden_by_probes(gateway, peer):
    up, url = await peer()
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "svc", url)
    await _until(gateway, server_id, "HEALTHY")

    status, body = await gateway.admin("PUT", f"/servers/{server_id}/maintenance", {"maintenance": True})
    assert status == 200 and body["status"] == "MAINTENANCE", body
    assert _snapshot_status(gateway, server_id) == "MAINTENANCE"
    await asyncio.sleep(0.5)  # a probe that was in flight has landed (and lost)
    probes = up.probes
    await asyncio.sleep(1.5)  # seven intervals
    assert up.probes == probes, "a server in maintenance is not probed"
    row = await _row(gateway, server_id)
    assert row["health_status"] == "MAINTENANCE"
    assert row["health_detail"]["last_transition"]["reason"] == "maintenance set by an admin"

    status, body = await gateway.admin("PUT", f"/servers/{server_id}/maintenance", {"maintenance": False})
    assert status == 200 and body["status"] == "UNKNOWN", body
    row = await _until(gateway, server_id, "HEALTHY")
    assert row["health_detail"]["last_transition"]["from"] == "UNKNOWN"


async def test_a_killed_stdio_server_is_unhealthy_at_once(gateway):
    tenant = await _tenant(gateway, "acme")
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(SDK_STDIO))}"
    server_id = await _register(gateway, tenant, "local", command, transport="stdio", unhealthy_after=10)
    await _until(gateway, server_id, "HEALTHY")
    process = gateway.gateway.dataplane.stdio_clients[server_id]
    pid = process.pid
    assert pid

    os.kill(pid, signal.SIGKILL)
    row = await _until(gateway, server_id, "UNHEALTHY")
    transition = row["health_detail"]["last_transition"]
    assert transition["from"] == "HEALTHY" and f"(pid {pid})" in transition["reason"], transition
    assert row["health_detail"]["consecutive_failures"] < 10  # at once, not after unhealthy_after

    # The next probe starts it again; healthy_after successes later it is back.
    row = await _until(gateway, server_id, "HEALTHY")
    assert process.pid not in (None, pid)


# -- passive health -------------------------------------------------------------------------------
async def test_real_traffic_that_succeeds_suppresses_probes(gateway, peer):
    up, url = await peer()
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "busy", url, health_interval=0.5)
    await _until(gateway, server_id, "HEALTHY")
    monitor = gateway.gateway.health

    async def traffic(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            monitor.observe(server_id, True, 4.0)  # what the data plane reports after each real call
            await asyncio.sleep(0.02)

    feeding = asyncio.create_task(traffic(4.0))
    await asyncio.sleep(1.0)  # the tick under way when the traffic started has finished
    probes, passive = up.probes, monitor.states[server_id].passive
    await feeding
    assert up.probes == probes, "a server with successful real traffic is not probed"
    assert monitor.states[server_id].passive >= passive + 4
    row = await _row(gateway, server_id)
    assert row["health_status"] == "HEALTHY" and row["health_detail"]["source"] == "traffic"
    await _eventually(lambda: up.probes > probes, what="probes resume when the traffic stops")


async def test_real_failures_count_toward_the_threshold(gateway, peer):
    up, url = await peer()
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "flaky", url, unhealthy_after=20)
    await _until(gateway, server_id, "HEALTHY")
    monitor = gateway.gateway.health

    up.fail = True
    for _ in range(19):
        monitor.observe(server_id, False, 30.0)
    row = await _until(gateway, server_id, "UNHEALTHY")
    failed_probes = row["health_detail"]["consecutive_failures"] - 19
    assert 1 <= failed_probes < 20, row["health_detail"]  # 19 real failures + the probe's own


async def test_a_high_error_rate_in_real_traffic_is_degraded(gateway, peer):
    up, url = await peer()
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "partial", url, breaker_window=2.0, breaker_minimum_calls=10)
    await _until(gateway, server_id, "HEALTHY")
    monitor = gateway.gateway.health

    for i in range(20):
        monitor.observe(server_id, i % 2 == 1, 10.0)  # half fail, the last succeeds
    row = await _until(gateway, server_id, "DEGRADED")
    assert "of 20 real calls failed" in row["health_detail"]["last_transition"]["reason"]
    # Once the window holds no failing traffic, the probes judge it healthy again.
    await _until(gateway, server_id, "HEALTHY")


# -- one prober across processes, restarts ---------------------------------------------------------
async def test_two_gateways_one_prober_the_same_status(pg_url, make_gateway, redis_url, redis_prefix, peer):
    up, url = await peer()
    shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}}
    one = await make_gateway(pg_url, **shared)
    two = await make_gateway(pg_url, **shared)
    tenant = await _tenant(one, "acme")
    server_id = await _register(one, tenant, "svc", url)

    await _until(one, server_id, "HEALTHY")
    for gw in (one, two):
        await _eventually(lambda gw=gw: _snapshot_status(gw, server_id) == "HEALTHY", what="both snapshots")
        await _eventually(lambda gw=gw: gw.gateway.health.states[server_id].status == "HEALTHY", what="monitors")
    before = up.probes
    await asyncio.sleep(2.0)  # ten intervals
    assert len(up.probes_by_session) == 1, f"probes came from more than one process: {up.probes_by_session}"
    assert 3 <= up.probes - before <= 12  # one process's pace (0.2 s), not two
    states = [gw.gateway.health.states[server_id] for gw in (one, two)]
    assert sorted(s.holding for s in states) == [False, True]
    (holder,) = [gw for gw, s in zip((one, two), states) if s.holding]
    (other,) = [gw for gw in (one, two) if gw is not holder]
    assert other.gateway.health.states[server_id].probes == 0

    # The holder goes away: the other takes the lease over, reads the state back, and carries on.
    sessions = set(up.probes_by_session)  # before the stop: the other may take over while it runs
    await holder.gateway.stop()
    monitor = other.gateway.health

    def seen() -> str:  # what to look at if the takeover does not come (it once did not, under a loaded CI)
        state = monitor.states.get(server_id)
        return (f"pings by session {dict(up.probes_by_session)}, methods {dict(up.methods)}; the other monitor: "
                + (f"holding={state.holding} probes={state.probes} status={state.status} "
                   f"tick_failing={state.tick_failing} task_done={state.task is None or state.task.done()}"
                   if state is not None else "no state for the server"))

    await _eventually(lambda: set(up.probes_by_session) - sessions, what="the other process probes", context=seen)
    assert other.gateway.health.states[server_id].holding
    assert (await _row(other, server_id))["health_status"] == "HEALTHY"


async def test_a_restarted_gateway_resumes_from_the_stored_state(pg_url, make_gateway, relay):
    r, url = relay
    first = await make_gateway(pg_url)
    tenant = await _tenant(first, "acme")
    server_id = await _register(first, tenant, "demo", url)
    await _until(first, server_id, "HEALTHY")
    await first.gateway.stop()

    r.cut()
    second = await make_gateway(pg_url)
    row = await _until(second, server_id, "UNHEALTHY")
    assert row["health_detail"]["last_transition"]["from"] == "HEALTHY"  # not a fresh UNKNOWN
    assert row["health_detail"]["last_transition"]["reason"].startswith("3 consecutive failures")


async def test_embedded_mode_probes_without_redis(sqlite_url, make_gateway, peer):
    up, url = await peer()
    gw = await make_gateway(sqlite_url)
    tenant = await _tenant(gw, "acme")
    server_id = await _register(gw, tenant, "svc", url)
    await _until(gw, server_id, "HEALTHY")
    assert gw.gateway.health.states[server_id].holding


# -- the admin API --------------------------------------------------------------------------------
async def _tenant_admin(gw, tenant_id: str, name: str) -> str:
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant_id, "username": f"{name}-admin",
                                                     "email": f"{name}-admin@example.com", "role": "ADMIN"})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": "admin",
                                                       "scopes": ["admin", "read"]})
    assert status == 201, key
    return key["key"]


async def test_maintenance_set_while_a_probe_is_out_is_not_written_over(gateway, peer):
    """An admin's MAINTENANCE that reaches the monitor while its probe is out: the probe's answer is not
    judged and the stored status stays MAINTENANCE (a run of the suite once saw it come back HEALTHY)."""
    up, url = await peer(delay=0.4)  # every probe is out for 0.4 s
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "svc", url)
    await _until(gateway, server_id, "HEALTHY")
    for _ in range(3):
        pings = up.probes
        await _eventually(lambda: up.probes > pings, what="a probe going out")  # out now, for 0.4 s
        status, health = await gateway.admin("PUT", f"/servers/{server_id}/maintenance", {"maintenance": True})
        assert status == 200 and health["status"] == "MAINTENANCE", health
        await asyncio.sleep(0.8)  # the probe came back meanwhile
        assert (await _row(gateway, server_id))["health_status"] == "MAINTENANCE"
        assert gateway.gateway.health.states[server_id].status == "MAINTENANCE"
        status, health = await gateway.admin("PUT", f"/servers/{server_id}/maintenance", {"maintenance": False})
        assert status == 200, health
        await _until(gateway, server_id, "HEALTHY")


async def test_health_and_maintenance_routes_are_tenant_scoped(gateway, peer):
    _, url = await peer()
    acme, globex = await _tenant(gateway, "acme"), await _tenant(gateway, "globex")
    mine = await _register(gateway, acme, "svc", url, degraded_latency_ms=750)
    theirs = await _register(gateway, globex, "svc", url)
    await _until(gateway, mine, "HEALTHY")
    await _until(gateway, theirs, "HEALTHY")
    key = await _tenant_admin(gateway, acme, "acme")

    status, health = await gateway.admin("GET", f"/servers/{mine}/health", key=key)
    assert status == 200, health
    assert health["server_id"] == str(mine) and health["status"] == "HEALTHY" and health["checked_at"]
    assert health["detail"]["ok"] is True and health["avg_response_time"] > 0
    assert health["thresholds"] == {**health["thresholds"], **FAST, "degraded_latency_ms": 750,
                                    "health_probe": "auto", "degraded_error_rate": 0.2}

    # Another tenant's server is not found, exactly like one that does not exist.
    for path, body in ((f"/servers/{theirs}/health", None), (f"/servers/{theirs}/maintenance", {"maintenance": True})):
        method = "GET" if body is None else "PUT"
        status, answer = await gateway.admin(method, path, body, key=key)
        missing = await gateway.admin(method, path.replace(str(theirs), str(uuid.uuid4())), body, key=key)
        assert status == 404 and (status, answer) == missing, answer
    assert (await gateway.admin("GET", "/servers/not-a-uuid/health", key=key))[0] == 404
    assert (await _row(gateway, theirs))["health_status"] == "HEALTHY"

    status, answer = await gateway.admin("PUT", f"/servers/{mine}/maintenance", {"maintenance": "yes"}, key=key)
    assert status == 422 and answer["error"]["details"][0]["field"] == "maintenance", answer
    status, answer = await gateway.admin("PUT", f"/servers/{mine}/maintenance", {}, key=key)
    assert status == 422, answer

    status, health = await gateway.admin("PUT", f"/servers/{mine}/maintenance", {"maintenance": True}, key=key)
    assert status == 200 and health["status"] == "MAINTENANCE", health
    assert _snapshot_status(gateway, mine) == "MAINTENANCE"  # the write signalled the change
    status, listed = await gateway.admin("GET", f"/servers/{mine}", key=key)
    assert listed["health_status"] == "MAINTENANCE"
    # Taking a server that is not in maintenance out of it changes nothing.
    status, health = await gateway.admin("PUT", f"/servers/{theirs}/maintenance", {"maintenance": False})
    assert status == 200 and health["status"] == "HEALTHY"

    status, health = await gateway.admin("PUT", f"/servers/{mine}/maintenance", {"maintenance": False}, key=key)
    assert status == 200 and health["status"] in ("UNKNOWN", "HEALTHY"), health
    await _until(gateway, mine, "HEALTHY")


async def test_the_metrics_count_servers_by_health(gateway, peer):
    _, url = await peer()
    tenant = await _tenant(gateway, "acme")
    server_id = await _register(gateway, tenant, "svc", url)
    await _until(gateway, server_id, "HEALTHY")
    await _eventually(lambda: 'gateway_upstream_health{status="HEALTHY"} 1' in gateway.gateway.metrics.render(),
                      what="the gauge")
    assert 'gateway_upstream_health{status="UNHEALTHY"} 0' in gateway.gateway.metrics.render()
