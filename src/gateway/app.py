"""Wiring: build every part from the configuration, start them in order, stop them in reverse.

Start: database engine -> schema check (refuse an unmigrated database) ->
Redis (if configured) -> snapshot -> record writer -> upstream health
monitor -> data plane and control plane listeners. Stop: listeners first (no
new requests, in-flight ones finish), the health monitor, then the writer
flushes everything queued, then pools and connections close. `serve` runs
this under uvloop until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import asyncpg
from aiohttp import web

from gateway.auth.oidc import TokenVerifier
from gateway.auth.key_usage import KeyUsage
from gateway.auth.sealing import GatewaySecrets, load_secrets
from gateway.auth.signin import SignIn
from gateway.config import Config
from gateway.controlplane.api import ControlPlane
from gateway.dataplane.credentials import UpstreamCredentials
from gateway.dataplane.server import DataPlane
from gateway.dataplane.sessions import SessionSealer, shared_secret
from gateway.db import migrate
from gateway.db.engine import create_engine
from gateway.limits.bans import BanList
from gateway.limits.limiter import Limiter
from gateway.limits.shared import SharedBuckets
from gateway.limits.sessions import SessionCounter
from gateway.records.alerts import AlertEvaluator
from gateway.records.audit import AuditTrail
from gateway.records.metrics import Registry
from gateway.records.retention import RetentionJob
from gateway.records.sinks import sink_for
from gateway.records.spill import Spill, default_dir
from gateway.records.writer import RecordWriter
from gateway.dataplane.guard import UpstreamGuard
from gateway.records.server_stats import ServerStats
from gateway.registry.breakers import BreakerBoard
from gateway.registry.discovery import Discoverer, OneShotClients
from gateway.registry.health import HealthMonitor
from gateway.snapshot import SnapshotStore
from gateway import tracing

log = logging.getLogger("gateway")


class Gateway:
    def __init__(self, config: Config, *, reuse_port: bool = False, check_schema: bool = True,
                 before_listen=None) -> None:
        self.config = config
        # `serve --workers N` (workers.py): every worker binds the same ports (SO_REUSEPORT), the
        # supervisor has checked the schema once for all of them, and `before_listen(gateway)` makes
        # the data plane a worker's before the first connection.
        self.reuse_port = reuse_port
        self.check_schema = check_schema
        self.before_listen = before_listen
        self.engine = None
        self.redis = None
        self.store: SnapshotStore | None = None
        self.writer: RecordWriter | None = None
        self.dataplane: DataPlane | None = None
        self.metrics = Registry()
        self._runners: list[web.AppRunner] = []
        self.dataplane_port: int | None = None
        self.controlplane_port: int | None = None
        self._sink = None
        self.secrets: GatewaySecrets | None = None
        self.key_usage: KeyUsage | None = None
        self.discoverer: Discoverer | None = None  # capability discovery: on registration, schedule, list changes
        self.tokens = None  # TokenVerifier, when JWT issuers are configured
        self.signin: SignIn | None = None  # sign-in providers of the control plane
        self.shared_buckets: SharedBuckets | None = None  # limiter state, synchronized through Redis
        self.limiter: Limiter | None = None  # the rate-limit tiers, when [limits] is enabled
        self.bans: BanList | None = None  # per-address bans, when [limits] is enabled
        self.health: HealthMonitor | None = None  # upstream health probes; `observe` takes real calls
        self.breakers: BreakerBoard | None = None  # a circuit breaker per upstream, shared through Redis
        self.guard: UpstreamGuard | None = None  # routing, breakers, queues and retries around upstream calls
        self.server_stats: ServerStats | None = None  # per-server and per-tool call figures, flushed per window
        self.audit: AuditTrail | None = None  # builds audit entries; the writer prepares, chains, spills them
        self.retention: RetentionJob | None = None  # deletes records older than their policy (one process at a time)
        self.alerts: AlertEvaluator | None = None  # evaluates alert rules, sends their webhooks (one process at a time)
        self.tracer: tracing.RequestTracer | None = None  # spans of proxied requests, when OTEL_* asks for them

    def add_runner(self, runner: web.BaseRunner) -> None:
        """A listener started outside `_listen` (a worker's metrics socket), stopped with the others."""
        self._runners.append(runner)

    @property
    def dataplane_url(self) -> str:
        return f"http://{_host(self.config.dataplane.host)}:{self.dataplane_port}"

    @property
    def controlplane_url(self) -> str:
        return f"http://{_host(self.config.controlplane.host)}:{self.controlplane_port}"

    async def start(self) -> None:
        cfg = self.config
        if self.check_schema:
            await migrate.check_current(cfg.database.url)
        self.engine = create_engine(cfg.database.url, pool_size=cfg.database.pool_max)
        if cfg.redis.url:
            import redis.asyncio as redis

            self.redis = redis.from_url(cfg.redis.url)
        # Seals upstream credentials and finds imported legacy keys (secrets.key, or one kept in the database).
        self.secrets = await load_secrets(self.engine, cfg.secrets.key)
        self.store = SnapshotStore(
            self.engine,
            poll_interval=cfg.snapshot.poll_interval,
            redis=self.redis,
            channel=f"{cfg.redis.key_prefix}config-changed",
            legacy_digest=self.secrets.legacy_digest,
            limit_defaults=cfg.limits,
            upstream_defaults=cfg.upstreams,
        )
        await self.store.start()

        # COPY into PostgreSQL, batched INSERTs into SQLite; the sink owns its connections.
        self._sink = await sink_for(cfg.database.url)
        # Audit entries: built on the request path, prepared (decoded, sanitized, logged) by the
        # writer, chained when written, spilled to local files while the database cannot take them.
        if cfg.audit.enabled:
            self.audit = AuditTrail(extra_names=cfg.audit.redact_keys, tenant_names=self._redact_keys,
                                    log=cfg.audit.log)
        spill = Spill(cfg.writer.spill_dir or default_dir(cfg.database.url), cfg.database.url,
                      segment_bytes=cfg.writer.spill_segment_bytes)
        self.writer = RecordWriter(
            self._sink,
            max_queue=cfg.writer.max_queue,
            batch_size=cfg.writer.batch_size,
            flush_interval=cfg.writer.flush_interval,
            spill=spill,
            prepare_audit=self.audit.prepare if self.audit is not None else None,
        )
        await self.writer.start()
        self._register_writer_metrics()
        self._register_pool_metrics()
        # Calls, errors and latency per upstream and tool, a server_metrics row per window.
        if cfg.writer.request_logs:
            self.server_stats = ServerStats(self.writer, self.engine, window=cfg.writer.server_metrics_window)
            await self.server_stats.start()
        self.key_usage = KeyUsage(self.engine, interval=cfg.keys.last_used_flush_interval)
        await self.key_usage.start()
        # The records' lifecycle, each run by one process of the deployment at a time (records/joblock.py).
        self.retention = RetentionJob(self.engine, cfg.retention)
        await self.retention.start()
        self.alerts = AlertEvaluator(self.engine, cfg.alerts)
        await self.alerts.start()

        secret = cfg.sessions.secret or await shared_secret(self.engine)
        if cfg.auth.issuers:
            # Fetches every issuer's keys before the first request (an unreachable
            # issuer is logged and tried again when a token needs it).
            self.tokens = TokenVerifier(cfg.auth)
            await self.tokens.start()
        if cfg.limits.enabled:
            self.bans = BanList(self.redis, cfg.redis.key_prefix, cfg.limits)
            await self.bans.start()
            self.shared_buckets = SharedBuckets(
                self.redis, cfg.redis.key_prefix, sync_interval=cfg.limits.sync_interval,
                down_policy=cfg.limits.redis_down_policy,
            )
            await self.shared_buckets.start()
            self.limiter = Limiter(self.shared_buckets, self.store.current.limits, self.bans)
            self.store.on_change(self._limits_changed)
            self._register_limit_metrics()
        # A circuit breaker per upstream, transitions shared through Redis; the guard
        # around every upstream call (routing, breaker, queue, retries) holds it.
        self.breakers = BreakerBoard(self.redis, cfg.redis.key_prefix)
        await self.breakers.start()
        self.guard = UpstreamGuard(self.breakers, stats=self.server_stats)
        self.guard.configure(self.store.current)
        self.store.on_change(self.guard.configure)
        self._register_guard_metrics()
        # Built at start, not at import: the SDK reads OTEL_* now, and each worker process exports on its own.
        self.tracer = tracing.setup()
        self.dataplane = DataPlane(
            cfg.dataplane,
            self.store,
            self.writer,
            self.metrics,
            limiter=self.limiter,
            sessions=SessionSealer(secret),
            session_counter=SessionCounter(
                max_per_key=cfg.sessions.max_per_key,
                idle_timeout=cfg.sessions.idle_timeout,
                redis=self.redis,
                prefix=cfg.redis.key_prefix,
            ),
            tokens=self.tokens,
            ready=lambda: self.writer.running,
            credentials=UpstreamCredentials(self.secrets.credentials, timeout=cfg.dataplane.upstream_timeout),
            key_usage=self.key_usage,
            guard=self.guard if cfg.dataplane.upstream_guard else None,
            audit=self.audit,
            tracer=self.tracer,
        )
        self.dataplane.request_logs = cfg.writer.request_logs
        self.store.on_change(self.dataplane.on_snapshot)
        # One prober per upstream across processes (a Redis lease); results reach every snapshot.
        self.health = HealthMonitor(
            self.engine, self.dataplane, publish_change=self.store.publish_change, redis=self.redis,
            key_prefix=cfg.redis.key_prefix,
        )
        await self.health.start(self.store)
        self.guard.health = self.health  # real calls count as passive health
        self.metrics.gauge(
            "gateway_upstream_health", "Upstream servers by health status", self.health.status_counts, ("status",)
        )
        if self.before_listen is not None:
            await self.before_listen(self)
        self.dataplane_port = await self._listen(
            web.ServerRunner(self.dataplane.build_server(), shutdown_timeout=10.0), cfg.dataplane.host, cfg.dataplane.port
        )
        self.discoverer = Discoverer(
            self.engine, self.store, self.dataplane.client_for, on_change=self.store.publish_change,
            own_clients=OneShotClients(self.secrets, timeout=cfg.dataplane.upstream_timeout,
                                       connect_timeout=cfg.dataplane.upstream_connect_timeout),
            defaults=cfg.upstreams, redis=self.redis, key_prefix=cfg.redis.key_prefix,
        )
        self.dataplane.watcher.upstream_changed.append(self.discoverer.upstream_changed)
        await self.discoverer.start()
        if cfg.controlplane.enabled:
            self.signin = SignIn(cfg.signin, cfg.auth)
            control = ControlPlane(
                self.engine, self.store.publish_change, secrets=self.secrets, keys=cfg.keys, key_usage=self.key_usage,
                signin=self.signin, limit_defaults=cfg.limits, discoverer=self.discoverer,
                bans=self.bans,
                upstream_defaults=cfg.upstreams,
                retention=self.retention, retention_defaults=cfg.retention,
            )
            control.audit, control.writer = self.audit, self.writer  # an audit entry per admin call
            self.controlplane_port = await self._listen(
                web.AppRunner(control.build_app(), access_log=None, shutdown_timeout=10.0),
                cfg.controlplane.host,
                cfg.controlplane.port,
            )
        _tune_gc()
        log.info(
            "gateway serving MCP on %s%s",
            self.dataplane_url,
            f", admin API on {self.controlplane_url}" if self.controlplane_port else "",
        )

    def _register_limit_metrics(self) -> None:
        fair, shared = self.limiter.fair, self.shared_buckets
        self.metrics.gauge(
            "gateway_fair_queue", "Requests waiting for global capacity now, and totals by outcome",
            lambda: [(("waiting",), fair.queued), (("served_after_waiting",), fair.waited_total),
                     (("refused_full",), fair.refused_full), (("refused_deadline",), fair.refused_deadline),
                     (("cancelled",), fair.cancelled_total)],
            ("state",),
        )
        self.metrics.gauge(
            "gateway_limit_sync", "Shared limit state: buckets held, processes alive, reports, failed reports, Redis down",
            lambda: [(("buckets",), len(shared)), (("processes_alive",), shared.alive), (("reports",), shared.syncs),
                     (("failed_reports",), shared.sync_failures), (("redis_down",), int(shared.redis_down))],
            ("what",),
        )

    def _register_guard_metrics(self) -> None:
        breakers, guard = self.breakers, self.guard
        self.metrics.gauge(
            "gateway_upstream_breaker", "Circuit breaker per upstream server: 0 closed, 1 half-open, 2 open",
            lambda: [((str(server_id),), _BREAKER_LEVEL.get(status.state, 0))
                     for server_id, status in breakers.states().items()],
            ("server_id",),
        )
        self.metrics.gauge(
            "gateway_upstream_calls", "Calls per upstream server in flight and waiting for a slot",
            guard.queue_figures, ("server_id", "state"),
        )

    def _limits_changed(self, snapshot) -> None:
        if snapshot.limits != self.limiter.settings:
            self.limiter.configure(snapshot.limits)

    async def _listen(self, runner: web.BaseRunner, host: str, port: int) -> int:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=self.reuse_port or None)
        await site.start()
        self._runners.append(runner)
        return site._server.sockets[0].getsockname()[1]

    def _redact_keys(self, tenant_id) -> tuple[str, ...]:
        """A tenant's own audit redaction names (its settings' audit_redact_keys), from the snapshot."""
        tenant = self.store.current.tenants.get(tenant_id) if tenant_id is not None else None
        return tenant.audit_redact_keys if tenant is not None else ()

    def _register_writer_metrics(self) -> None:
        writer = self.writer

        def stats():
            s = writer.stats
            return [
                (("submitted",), s.submitted),
                (("written",), s.written),
                (("dropped",), s.dropped),
                (("failed_flushes",), s.failed_flushes),
                (("queued",), s.queued),
                (("spilled",), s.spilled),
                (("spilled_total",), s.spilled_total),
                (("recovered",), s.recovered),
            ]

        # Kept for dashboards and tests that read it; the series below give the same figures
        # with their proper types (totals as counters, which workers.py sums over workers).
        self.metrics.gauge("gateway_writer_records", "Record writer counts by kind", stats, ("kind",))
        self.metrics.gauge("gateway_writer_queue_depth", "Records in memory waiting to be written (audit entries too)",
                           lambda: [((), writer.stats.queued)])
        self.metrics.gauge("gateway_writer_spill_pending", "Audit entries in spill files, not yet in the database",
                           lambda: [((), writer.stats.spilled)])
        for name, help_text, figure in _WRITER_TOTALS:
            self.metrics.counter_from(name, help_text, lambda figure=figure: [((), getattr(writer.stats, figure))])
        self.metrics.add(writer.flush_seconds)
        if self.audit is not None:
            audit = self.audit
            self.metrics.gauge("gateway_audit_entries", "Audit entries by stage (prepared: sanitized and logged)",
                               lambda: [(("prepared",), audit.prepared)], ("stage",))

    def _register_pool_metrics(self) -> None:
        pools = (("control", self.engine.pool), ("writer", getattr(self._sink, "pool", None)))

        def connections():
            figures = []
            for name, pool in pools:
                counts = _pool_connections(pool)
                if counts is not None:
                    figures += [((name, "in_use"), counts[0]), ((name, "idle"), counts[1])]
            return figures

        self.metrics.gauge(
            "gateway_db_connections", "Database connections by pool (control: snapshot, admin API, jobs; writer: "
            "records) and state", connections, ("pool", "state"),
        )
        self.metrics.gauge(
            "gateway_db_connections_max", "The most connections a pool opens, where the pool says",
            lambda: [((name,), counts[2]) for name, pool in pools
                     if (counts := _pool_connections(pool)) is not None and counts[2] is not None],
            ("pool",),
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush every record, close."""
        if self.dataplane is not None:
            await self.dataplane.end_streams()
        # Requests waiting for capacity are in flight: served or refused at their deadline
        # while the listeners drain.
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.health is not None:
            await self.health.stop()  # before the upstream clients and the engine go
        if self.alerts is not None:
            await self.alerts.stop()  # webhooks in flight are cancelled: the next evaluator sends them
        if self.retention is not None:
            await self.retention.stop()  # a run in progress stops, its current batch rolled back
        if self.limiter is not None:
            self.limiter.close()
        if self.guard is not None:
            self.guard.close()
        if self.server_stats is not None:
            await self.server_stats.stop()  # the window in progress, into the writer before it stops
        if self.writer is not None:
            await self.writer.stop(timeout=self.config.writer.shutdown_timeout)
        if self.discoverer is not None:
            await self.discoverer.stop()  # before the upstream clients and the engine go
        if self.dataplane is not None:
            await self.dataplane.close()
        if self.tracer is not None:
            # The last spans are exported (the SDK's export timeout bounds it); it blocks, so off the loop.
            await asyncio.to_thread(self.tracer.shutdown)
        if self.bans is not None:
            await self.bans.stop()
        if self.breakers is not None:
            await self.breakers.close()  # writes the last transitions
        if self.shared_buckets is not None:
            await self.shared_buckets.stop()  # reports what was admitted since the last report
        if self.key_usage is not None:
            await self.key_usage.stop()  # the last uses are written before the engine goes
        if self.tokens is not None:
            await self.tokens.close()
        if self.signin is not None:
            await self.signin.close()
        if self.store is not None:
            await self.store.stop()
        if self._sink is not None:
            await self._sink.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.engine is not None:
            await self.engine.dispose()


_BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}

# The writer's totals that only grow: (metric, help, WriterStats field).
_WRITER_TOTALS = (
    ("gateway_writer_written_total", "Records the database confirmed", "written"),
    ("gateway_writer_dropped_total", "Records dropped: refused with the queue full or the writer stopped, rejected by "
     "the database, or unwritten at the stop deadline", "dropped"),
    ("gateway_writer_spilled_total", "Audit entries this process wrote to its spill file", "spilled_total"),
    ("gateway_writer_recovered_total", "Audit entries written from spill files an earlier process left", "recovered"),
    ("gateway_writer_failed_flushes_total", "Batch writes that failed (their records are kept and retried)",
     "failed_flushes"),
)


def _pool_connections(pool) -> tuple[int, int, int | None] | None:
    """(in use, idle, most allowed or None) of an asyncpg or SQLAlchemy pool; None for one that counts nothing."""
    if isinstance(pool, asyncpg.Pool):
        size, idle = pool.get_size(), pool.get_idle_size()
        return size - idle, idle, pool.get_max_size()
    checkedout = getattr(pool, "checkedout", None)  # QueuePool; NullPool and StaticPool keep no counts
    if checkedout is None:
        return None
    return checkedout(), pool.checkedin(), None


def _tune_gc() -> None:
    """Move everything built at start-up out of the collector's way, and collect young objects less often.

    A request allocates many short-lived objects while tens of thousands of
    long-lived ones (SQLAlchemy, the MCP SDK, the snapshot) sit in the tracked
    generations; freezing them makes each full collection skip them, and a
    larger first-generation threshold runs the collector less often. Request
    objects form no cycles of note, so memory does not grow from this.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(20_000, second, third)


def _host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def serve_until_signalled(gateway: Gateway, on_ready=None) -> None:
    """Start the gateway, call `on_ready`, serve until SIGINT/SIGTERM, then stop cleanly."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await gateway.start()
        if on_ready is not None:
            await on_ready(gateway)
        await stopping.wait()
        log.info("stopping: draining requests and flushing records")
    finally:
        await gateway.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(coro) -> None:
    """Run a coroutine on uvloop (the production loop)."""
    import uvloop

    uvloop.run(coro)
