"""Health monitoring of upstream servers: probes, passive health from real traffic, one prober per server.

What it owns: one monitoring loop per active server of the snapshot (started,
stopped and re-timed as servers come, go and change their settings), the
probe (`ping` with the gateway's own MCP client, or `tools/list` for a server
that answers ping with "method not found", remembered; a stdio server's
process state as well), the state machine over HEALTHY / DEGRADED / UNHEALTHY
/ UNKNOWN with thresholds and hysteresis, and the result in `mcp_servers`
(`health_checked_at`, `health_detail`, `avg_response_time` after every
judgement; `health_status` only on a transition, which bumps the
configuration version and signals the change, so every process's snapshot
carries it within a second).

States (each server's `config.UpstreamSettings`):
- UNKNOWN -> HEALTHY (or DEGRADED) on the first success;
- `unhealthy_after` consecutive failures -> UNHEALTHY (a stdio process found
  dead: at once); back from UNHEALTHY only after `healthy_after` consecutive
  successes;
- a success slower than `degraded_latency_ms`, or real traffic failing more
  than `degraded_error_rate` of at least `breaker_minimum_calls` calls in the
  last `breaker_window` seconds -> DEGRADED;
- MAINTENANCE is an admin's (PUT /api/v1/servers/{id}/maintenance): never
  probed, never overridden (every write is conditional on the status it
  read, so a probe that raced the admin loses).

Passive health: the data plane calls `observe(server_id, ok, latency_ms)` for
each real call (synchronous, no I/O, a few attribute updates). A server whose
last real call within the interval succeeded is not probed (that counts as a
success); real failures since the last call that succeeded count toward
`unhealthy_after`.

One prober per server across processes: a Redis lease
`<prefix>health-lease:<server id>` (SET NX PX, renewed by its holder at every
tick, released on stop, lasting two intervals plus the probe timeout so that
it never lapses between a live holder's ticks). The others skip probing and
see the result in their snapshots. The holder that takes a lease reads the
server's state back from the database first, so monitoring resumes where it
stopped after a restart or a takeover. Without Redis (embedded mode), or while
Redis does not answer, this process probes everything itself.

Traced when the data plane is (its `tracer`, tracing.py): each probe is a
`health.probe` span (CLIENT) starting a trace of its own, never a request's,
with the server's name, the method and the outcome; the probe carries it
upstream (`traceparent` header for HTTP, `params._meta` for every transport).

What it must not do: block the event loop (probes and writes are awaited, the
loop never waits on anything but them), let a probe error end a loop, probe a
server in MAINTENANCE, or touch the request path beyond `observe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import UpstreamSettings
from gateway.controlplane.service import bump_version
from gateway.dataplane.mcp_client import UpstreamClient, UpstreamRpcError
from gateway.dataplane.upstream import UpstreamError
from gateway.db.tables import HEALTH_STATES, mcp_servers, utcnow
from gateway.snapshot import ServerEntry, Snapshot
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.health")

HEALTHY, DEGRADED, UNHEALTHY, UNKNOWN, MAINTENANCE = "HEALTHY", "DEGRADED", "UNHEALTHY", "UNKNOWN", "MAINTENANCE"
METHOD_NOT_FOUND = -32601
# avg_response_time: an exponentially weighted mean of the latencies judged (probes, or real calls standing in).
EWMA_WEIGHT = 0.3
# Real traffic is counted in one-second buckets, as far back as the longest breaker window.
_MAX_BUCKETS = 3601
# The settings that decide health, shown by GET /api/v1/servers/{id}/health.
THRESHOLD_KEYS = (
    "health_interval", "health_timeout", "health_probe", "unhealthy_after", "healthy_after",
    "degraded_latency_ms", "degraded_error_rate", "breaker_window", "breaker_minimum_calls",
)

# KEYS[1] the lease; ARGV: this monitor's id, the lease's length (ms). 2: taken, 1: renewed, 0: another's.
TAKEN, HELD = 2, 1
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(slots=True)
class Verdict:
    """What one judgement saw: a probe's outcome, or real traffic standing in for one."""

    ok: bool
    source: str  # "probe", "traffic" or "process"
    method: str | None = None  # the probe's method
    latency_ms: float | None = None
    error: str | None = None
    forced: bool = False  # UNHEALTHY at once (a stdio process found dead)


class Traffic:
    """Real calls to one server as the data plane reports them; `note` is on the request path."""

    __slots__ = ("ok", "errors", "ok_latency", "trailing_failures", "last_ok", "buckets")

    def __init__(self) -> None:
        self.ok = 0  # since the last tick
        self.errors = 0
        self.ok_latency = 0.0
        self.trailing_failures = 0  # failed calls since the last one that succeeded
        self.last_ok = -1e18  # monotonic time of the last successful call
        self.buckets: collections.deque[list[int]] = collections.deque(maxlen=_MAX_BUCKETS)  # [second, ok, errors]

    def note(self, ok: bool, latency_ms: float, now: float) -> None:
        second = int(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
        else:
            bucket = [second, 0, 0]
            buckets.append(bucket)
        if ok:
            bucket[1] += 1
            self.ok += 1
            self.ok_latency += latency_ms
            self.trailing_failures = 0
            self.last_ok = now
        else:
            bucket[2] += 1
            self.errors += 1
            self.trailing_failures += 1

    def take(self) -> tuple[int, int, float, int, float]:
        """(ok, errors, total latency of the ok calls, trailing failures, last ok) since the last take."""
        taken = (self.ok, self.errors, self.ok_latency, self.trailing_failures, self.last_ok)
        self.ok = self.errors = 0
        self.ok_latency = 0.0
        self.trailing_failures = 0
        return taken

    def window(self, seconds: float, now: float) -> tuple[int, int]:
        """(calls, errors) in the last `seconds`."""
        since = now - seconds
        calls = errors = 0
        for second, ok, failed in reversed(self.buckets):
            if second + 1 <= since:
                break
            calls += ok + failed
            errors += failed
        return calls, errors


class ServerHealth:
    """One server as this process's monitor sees it."""

    def __init__(self, server: ServerEntry) -> None:
        self.server = server
        self.status = server.health_status  # mirrors the snapshot until this process holds the lease
        self.failures = 0  # consecutive
        self.successes = 0  # consecutive
        self.probe_method: str | None = None  # "tools/list" once ping turned out not to exist
        self.avg_ms: float | None = None
        self.last_transition: dict[str, Any] | None = None
        self.holding = False  # this process holds the lease and has read the stored state back
        self.last_pid: int | None = None  # a stdio server's process, as the last probe found it
        self.traffic = Traffic()
        self.wake = asyncio.Event()
        self.probe_now = False
        self.task: asyncio.Task | None = None
        self.probes = 0  # probes this process sent (a stdio process check included)
        self.passive = 0  # judgements real traffic answered instead of a probe
        self.tick_failing = False  # the last tick raised (logged once per streak)


class HealthMonitor:
    """The monitoring loops of every active server, one lease per server across processes."""

    def __init__(
        self,
        engine: AsyncEngine,
        dataplane,
        *,
        publish_change: Callable[[], Awaitable[Any]],
        redis=None,
        key_prefix: str = "gw:",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`dataplane` supplies the upstream clients (`client_for`, `pool_for`, `credentials`);
        `publish_change` signals a configuration change (SnapshotStore.publish_change)."""
        self.engine = engine
        self.dataplane = dataplane
        self.publish_change = publish_change
        self.redis = redis
        self.key_prefix = key_prefix
        self.clock = clock
        self.monitor_id = uuid.uuid4().hex  # this monitor's name on the leases it holds
        self.states: dict[uuid.UUID, ServerHealth] = {}
        self._http_clients: dict[uuid.UUID, UpstreamClient] = {}
        self._releasing: set[asyncio.Task] = set()
        self._stopped = False
        self._redis_failing = False
        if redis is not None:
            self._hold = redis.register_script(_HOLD)
            self._release = redis.register_script(_RELEASE)

    # -- the data plane's report ----------------------------------------------------------------
    def observe(self, server_id: uuid.UUID, ok: bool, latency_ms: float) -> None:
        """A real call to `server_id` finished: `ok` False for a transport error, timeout or 5xx
        (a tool's own `isError` result is a success). Synchronous and without I/O."""
        state = self.states.get(server_id)
        if state is not None:
            state.traffic.note(ok, latency_ms, self.clock())

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, store) -> None:
        """Follow `store` (a SnapshotStore): a loop for each of its servers, now and after every change."""
        store.on_change(self.configure)
        self.configure(store.current)

    def configure(self, snapshot: Snapshot) -> None:
        """Start, stop and re-time the loops to match the snapshot's active servers (a store listener)."""
        if self._stopped:
            return
        live = {entry.id: entry for entry in snapshot.servers.values()}
        for server_id in [i for i in self.states if i not in live]:
            self._forget(self.states.pop(server_id))
        for server_id, entry in live.items():
            state = self.states.get(server_id)
            if state is None:
                state = self.states[server_id] = ServerHealth(entry)
                state.task = asyncio.get_running_loop().create_task(self._run(state), name=f"health-{entry.name}")
                continue
            retimed = entry.settings != state.server.settings
            state.server = entry
            stored = entry.health_status
            if stored != state.status and (MAINTENANCE in (stored, state.status) or not state.holding):
                # An admin's maintenance (or its end), or another process's judgement: adopted.
                if state.status == MAINTENANCE:
                    state.failures = state.successes = 0
                    state.probe_now = True
                state.status = stored
                retimed = True
            if retimed:
                state.wake.set()

    async def stop(self) -> None:
        """End every loop and give back the leases held (another process takes over at its next tick)."""
        self._stopped = True
        states = list(self.states.values())
        self.states.clear()
        await cancel_all(state.task for state in states)
        await asyncio.gather(*(self._give_back(s.server.id) for s in states if s.holding), return_exceptions=True)
        await cancel_all(self._releasing)
        self._http_clients.clear()

    def status_counts(self) -> list[tuple[tuple[str], int]]:
        """Servers by health status, as this process sees them (the metrics gauge)."""
        counts = collections.Counter(state.status for state in self.states.values())
        return [((status,), counts.get(status, 0)) for status in HEALTH_STATES]

    def _forget(self, state: ServerHealth) -> None:
        if state.task is not None:
            state.task.cancel()
        self._http_clients.pop(state.server.id, None)
        if state.holding and self.redis is not None:
            task = asyncio.get_running_loop().create_task(self._give_back(state.server.id))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _give_back(self, server_id: uuid.UUID) -> None:
        if self.redis is None:
            return
        try:
            await self._release(keys=[self._lease_key(server_id)], args=[self.monitor_id])
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.debug("could not release the health lease of %s: %s", server_id, exc)

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self, state: ServerHealth) -> None:
        loop = asyncio.get_running_loop()
        # The first tick comes half to one interval after start: a restart with many
        # servers spreads its probes instead of sending them all at once.
        since = loop.time() - state.server.settings.health_interval * random.uniform(0.0, 0.5)
        while True:
            await self._wait_next(state, since)
            since = loop.time()
            try:
                await self._tick(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one tick (the database down, say)
                if not state.tick_failing:
                    log.exception("health check of server %s (%s) failed; retrying every interval",
                                  state.server.name, state.server.id)
                else:
                    log.debug("health check of server %s failed again: %s", state.server.name, exc)
                state.tick_failing = True
            else:
                if state.tick_failing:
                    log.info("health check of server %s (%s) works again", state.server.name, state.server.id)
                state.tick_failing = False

    async def _wait_next(self, state: ServerHealth, since: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if state.probe_now:
                state.probe_now = False
                return
            left = since + state.server.settings.health_interval - loop.time()
            if left <= 0:
                return
            state.wake.clear()
            try:
                async with asyncio.timeout(left):
                    await state.wake.wait()  # settings changed or maintenance ended: look again
            except TimeoutError:
                return

    async def _tick(self, state: ServerHealth) -> None:
        settings = state.server.settings
        ok, _errors, ok_latency, trailing, last_ok = state.traffic.take()
        if state.status == MAINTENANCE:
            return
        lease = await self._lease(state)
        if not lease:
            # Another process probes it: its judgement arrives with the snapshot.
            state.holding = False
            state.status = state.server.health_status
            return
        if not state.holding or lease == TAKEN:
            # Taken just now (a start, a restart, a takeover): resume from the stored state.
            if not await self._read_back(state):
                return
            state.holding = True
            if state.status == MAINTENANCE:
                return
        now = self.clock()
        if ok and not trailing and now - last_ok <= settings.health_interval and state.status != DEGRADED:
            # Real calls answered within the interval, the last of them well: no probe needed.
            state.passive += 1
            verdict = Verdict(True, "traffic", latency_ms=ok_latency / ok)
        else:
            if trailing:
                state.failures += trailing  # real failures count toward the threshold
                state.successes = 0
            tracer = self.dataplane.tracer
            if tracer is None:
                verdict = await self._probe(state)
            else:
                verdict = await tracer.probe(state.server.name, self._probe(state, tracer))
            if state.status == MAINTENANCE:
                # An admin's maintenance arrived (configure) while the probe was out: it is not judged.
                return
        calls, failed = state.traffic.window(settings.breaker_window, now)
        new, reason = judge(state, verdict, settings, calls, failed)
        await self._record(state, verdict, new, reason, calls, failed)

    # -- leases ---------------------------------------------------------------------------------
    def _lease_key(self, server_id: uuid.UUID) -> str:
        return f"{self.key_prefix}health-lease:{server_id}"

    async def _lease(self, state: ServerHealth) -> int:
        """Whether this process probes `state`'s server now: TAKEN, HELD, or 0 (another process's)."""
        if self.redis is None:
            return HELD
        settings = state.server.settings
        lease_ms = int((2 * settings.health_interval + settings.health_timeout) * 1000)
        try:
            held = await self._hold(keys=[self._lease_key(state.server.id)], args=[self.monitor_id, lease_ms])
        except Exception as exc:  # noqa: BLE001 - Redis down: better every process probes than none
            if not self._redis_failing:
                log.warning("health leases unavailable (%s): this process probes every server itself", exc)
            self._redis_failing = True
            return HELD
        if self._redis_failing:
            log.info("health leases available again")
            self._redis_failing = False
        return int(held)

    # -- probing --------------------------------------------------------------------------------
    async def _probe(self, state: ServerHealth, tracer=None) -> Verdict:
        """One probe; `tracer`: it runs inside its span, which its requests carry (`params._meta`)."""
        server, settings = state.server, state.server.settings
        state.probes += 1
        if server.transport_type == "stdio":
            died = self._stdio_death(state)
            if died is not None:
                return died
        method = "ping"
        # Not loop.time(): uvloop's is the loop iteration's cached time, in whole milliseconds.
        clock = time.perf_counter
        try:
            client = self._client(server)
            # Started (stdio), connected (SSE, WebSocket), era known and session held (HTTP): not timed.
            await self._bounded(client, client.ensure_ready(), max(settings.health_timeout, 30.0))
            method = probe_method(settings, client.era, state.probe_method)
            params = {} if tracer is None else tracer.with_context({})
            started = clock()
            try:
                await self._bounded(client, client.request(method, params), settings.health_timeout)
            except UpstreamRpcError as exc:
                if exc.error.get("code") != METHOD_NOT_FOUND:
                    raise
                if method != "tools/list" and settings.health_probe == "auto":
                    state.probe_method = method = "tools/list"
                    log.info("server %s has no ping: probing it with tools/list", server.name)
                    started = clock()
                    try:
                        await self._bounded(client, client.request(method, params), settings.health_timeout)
                    except UpstreamRpcError as again:
                        if again.error.get("code") != METHOD_NOT_FOUND:
                            raise
                # "Method not found" is an answer: the server is up, it just lacks the method.
            latency = (clock() - started) * 1000.0
        except UpstreamRpcError as exc:
            return Verdict(False, "probe", method, error=f"{method} answered with error {exc.error.get('code')}: "
                                                         f"{str(exc.error.get('message', ''))[:200]}")
        except (UpstreamError, TimeoutError, OSError) as exc:
            return Verdict(False, "probe", method, error=str(exc)[:500] or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - whatever a probe meets is the server's failure, not the loop's
            log.debug("health probe of %s: %r", server.name, exc)
            return Verdict(False, "probe", method, error=f"{type(exc).__name__}: {exc}"[:500])
        if server.transport_type == "stdio":
            state.last_pid = getattr(client, "pid", None)
        return Verdict(True, "probe", method, latency_ms=latency)

    def _stdio_death(self, state: ServerHealth) -> Verdict | None:
        """A stdio server's process gone since the last probe (dead now, or restarted by a call): UNHEALTHY at once."""
        client = self.dataplane.client_for(state.server)
        seen, pid = state.last_pid, getattr(client, "pid", None)
        if seen is None or pid == seen:
            return None
        state.last_pid = None  # the next probe starts it again (after the data plane's backoff)
        if pid is None:
            return Verdict(False, "process", error=f"the stdio process (pid {seen}) has exited", forced=True)
        return Verdict(False, "process", error=f"the stdio process (pid {seen}) exited and was restarted (pid {pid})",
                       forced=True)

    def _client(self, server: ServerEntry):
        """The client a probe uses: the data plane's own for stdio, SSE and WebSocket servers (the same
        process or connection); for HTTP servers one of the monitor's own on the data plane's pool, whose
        every exchange is bounded by the probe timeout."""
        if server.transport_type != "http":
            return self.dataplane.client_for(server)
        pool = self.dataplane.pool_for(server)
        credential = self.dataplane.credentials.for_server(server)
        timeout = server.settings.health_timeout
        client = self._http_clients.get(server.id)
        if (
            client is None or client.pool is not pool or client.target != server.target
            or client.credential is not credential or client.timeout != timeout
        ):
            client = self._http_clients[server.id] = UpstreamClient(pool, server.target, timeout=timeout,
                                                                    credential=credential, tracer=self.dataplane.tracer)
        return client

    @staticmethod
    async def _bounded(client, call: Awaitable[Any], seconds: float) -> Any:
        # HTTP clients bound each exchange themselves (cancelling one mid-body would leave its
        # connection taken); the multiplexed ones (stdio, SSE, WebSocket) give up cleanly.
        if isinstance(client, UpstreamClient):
            return await call
        async with asyncio.timeout(seconds):
            return await call

    # -- the record -----------------------------------------------------------------------------
    async def _read_back(self, state: ServerHealth) -> bool:
        """Take the server's stored state (a restart, a takeover); False if its row is gone."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(mcp_servers.c.health_status, mcp_servers.c.health_detail, mcp_servers.c.avg_response_time)
                    .where(mcp_servers.c.id == state.server.id)
                )
            ).mappings().first()
        if row is None:
            return False
        detail = row["health_detail"] if isinstance(row["health_detail"], dict) else {}
        state.status = row["health_status"]
        state.failures = _count(detail.get("consecutive_failures"))
        state.successes = _count(detail.get("consecutive_successes"))
        state.probe_method = "tools/list" if detail.get("no_ping") is True else None
        state.last_transition = detail.get("last_transition")
        state.avg_ms = row["avg_response_time"]
        return True

    async def _record(
        self, state: ServerHealth, verdict: Verdict, new: str, reason: str | None, calls: int, failed: int
    ) -> None:
        old = state.status
        if verdict.ok and verdict.latency_ms is not None:
            sample = verdict.latency_ms
            state.avg_ms = sample if state.avg_ms is None else state.avg_ms + EWMA_WEIGHT * (sample - state.avg_ms)
        now = utcnow()
        transition = state.last_transition
        if new != old:
            transition = {"from": old, "to": new, "at": now.isoformat(), "reason": reason}
        detail = {
            "ok": verdict.ok,
            "source": verdict.source,
            "probe": verdict.method or state.probe_method,
            "no_ping": state.probe_method == "tools/list",  # remembered across restarts
            "latency_ms": None if verdict.latency_ms is None else round(verdict.latency_ms, 3),
            "error": verdict.error,
            "consecutive_failures": state.failures,
            "consecutive_successes": state.successes,
            "traffic": {"calls": calls, "errors": failed, "window_s": state.server.settings.breaker_window},
            "last_transition": transition,
        }
        values: dict[str, Any] = {"health_checked_at": now, "health_detail": detail,
                                  "avg_response_time": state.avg_ms}
        if new != old:
            values["health_status"] = new
        async with self.engine.begin() as conn:
            # Conditional on the status this process judged from: an admin's MAINTENANCE, or a
            # judgement by another process meanwhile, is never written over (nor is MAINTENANCE
            # left by a judgement: only an admin ends it).
            result = await conn.execute(
                sa.update(mcp_servers)
                .where(mcp_servers.c.id == state.server.id, mcp_servers.c.health_status == old,
                       mcp_servers.c.health_status != MAINTENANCE)
                .values(**values)
            )
            written = result.rowcount == 1
            if written and new != old:
                await bump_version(conn)
        if not written:
            await self._read_back(state)  # the stored status moved under us: start from it
            return
        state.status, state.last_transition = new, transition
        if new != old:
            log.info("server %s (%s): %s -> %s (%s)", state.server.name, state.server.id, old, new, reason)
            try:
                await self.publish_change()
            except Exception as exc:  # noqa: BLE001 - the snapshot poll still picks the version up
                log.warning("could not signal the health change of %s: %s", state.server.name, exc)


def judge(
    state: ServerHealth, verdict: Verdict, settings: UpstreamSettings, calls: int, failed: int
) -> tuple[str, str | None]:
    """The status after `verdict` (and the consecutive counts updated), with why it changed."""
    status = state.status
    if not verdict.ok:
        state.successes = 0
        state.failures += 1
        if verdict.forced:
            return UNHEALTHY, verdict.error
        if state.failures >= settings.unhealthy_after:
            return UNHEALTHY, f"{state.failures} consecutive failures, the last: {verdict.error}"
        return status, None
    state.failures = 0
    state.successes += 1
    if status == UNHEALTHY and state.successes < settings.healthy_after:
        return UNHEALTHY, None
    reason = None
    slow = settings.degraded_latency_ms
    if verdict.source == "probe" and verdict.latency_ms is not None and verdict.latency_ms > slow:
        reason = f"{verdict.method} took {verdict.latency_ms:.0f} ms (degraded above {slow:g} ms)"
    elif calls >= settings.breaker_minimum_calls and failed / calls > settings.degraded_error_rate:
        reason = (f"{failed} of {calls} real calls failed in {settings.breaker_window:g} s "
                  f"(degraded above {settings.degraded_error_rate:.0%})")
    if reason is not None:
        return DEGRADED, reason
    if status == UNHEALTHY:
        return HEALTHY, f"{state.successes} consecutive successes"
    return HEALTHY, "answered" if verdict.source == "probe" else "real calls succeed"


def probe_method(settings: UpstreamSettings, era: str | None, remembered: str | None) -> str:
    """The request a probe sends: `ping`, or `server/discover` to a 2026-07-28 upstream (that
    revision removed ping, SEP-2575); `tools/list` when configured, or once ping turned out missing."""
    if settings.health_probe == "list" or (settings.health_probe == "auto" and remembered == "tools/list"):
        return "tools/list"
    return "server/discover" if era == "modern" else "ping"


def thresholds(settings: UpstreamSettings) -> dict[str, Any]:
    """The settings in force that decide a server's health (for the admin API)."""
    return {key: getattr(settings, key) for key in THRESHOLD_KEYS}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
