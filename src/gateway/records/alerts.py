"""Performance alerts: rules evaluated on a schedule, firing and resolving as alert_events, with webhooks.

A rule (`alert_rules`, `/api/v1/alerts`) watches one metric of one server,
or of each active server of its tenant (server_id NULL), over the last
`window_minutes`:

- `error_rate`: errors / requests in `request_logs`, a fraction 0..1. An
  error is an answer with status >= 500 (the upstream failing, timing out, its
  breaker open): the server's health, not its callers' mistakes, so the
  gateway's own 4xx refusals (limits, access, malformed requests, clients
  leaving) do not count. No request in the window: no value.
- `latency_p95`, `latency_p99`: the percentile of `duration_ms` (linear
  interpolation, PostgreSQL's `percentile_cont`; computed in Python on SQLite).
- `request_rate`: requests per minute.
- `health`: `mcp_servers.health_status` (registry/health.py); 1 when
  UNHEALTHY, else 0. The threshold is not used.

A numeric rule fires when its value is above the threshold, and resolves when
it is at or below it again, or has no value. Firing inserts an
`alert_events` row (state `firing`, the value, threshold and a message);
resolving turns that row `resolved` with `resolved_at`. An open row is the
condition: while it exists no second one is made for the same rule and
server, whichever process evaluates. A disabled rule, or a server the rule no
longer covers, has its open rows resolved.

Webhooks: a rule with `webhook_url` gets a JSON POST for each firing and
each resolution (`payload`), sent by a task of its own (never awaited by the
evaluation), with `webhook_timeout`, `webhook_retries` retries after
`webhook_backoff`, 2x, 4x... seconds, and no redirects followed. Success
(2xx) sets `notified_at`. Deliveries of one event go in order (its
resolution waits for its firing). A delivery lost with its process (or never
made) is found again by the next evaluation: events of the last day whose
state was not notified yet (`notified_at` NULL, or before `resolved_at`); one
that failed every retry rests `RESTING` seconds, then goes again the same
way. So delivery is at least once; `X-Gateway-Alert-Event` and the state let
a receiver drop duplicates. A process never sends what its receiver took
again (a redelivery that read the event before that delivery ended included).

One process evaluates at a time: the evaluator that holds the job lock
(records/joblock.py) keeps it while its process lives; the others try again
every interval and take over when it goes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import AlertsConfig
from gateway.db.tables import alert_events, alert_rules, mcp_servers, request_logs, tenants, utcnow
from gateway.records.joblock import JobLock
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.records")

# A delivery of an event older than this (fired or resolved) is not attempted again after a restart.
REDELIVERY_WINDOW = timedelta(days=1)
# After every retry of a delivery failed, it rests this long (seconds); then the next evaluation starts it again.
RESTING = 300.0
MAX_CONCURRENT_DELIVERIES = 16
_QUANTILES = {"latency_p95": 0.95, "latency_p99": 0.99}
_DESCRIBED = {
    "error_rate": "error rate", "latency_p95": "p95 latency (ms)", "latency_p99": "p99 latency (ms)",
    "request_rate": "requests per minute", "health": "health",
}


@dataclass
class Evaluation:
    """What one evaluation did: (rule id, server id) of each firing and resolution."""

    at: datetime
    rules: int = 0
    fired: list[tuple[uuid.UUID, uuid.UUID | None]] = field(default_factory=list)
    resolved: list[tuple[uuid.UUID, uuid.UUID | None]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile with linear interpolation between closest ranks (as PostgreSQL's percentile_cont)."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def crosses(metric: str, value: float | None, threshold: float) -> bool:
    """Whether a rule of `metric` fires at `value`."""
    if value is None:
        return False
    if metric == "health":
        return value >= 1.0
    return value > threshold


def payload(event: dict[str, Any], sent_at: datetime) -> dict[str, Any]:
    """The JSON a webhook receives for an event (a row of alert_events with its rule, tenant and server)."""
    return {
        "event_id": event["id"],
        "state": event["state"],
        "rule": {"id": event["rule_id"], "name": event["rule_name"], "metric": event["metric"],
                 "window_minutes": event["window_minutes"]},
        "tenant": {"id": event["tenant_id"], "name": event["tenant_name"]},
        "server": {"id": event["server_id"], "name": event["server_name"]},
        "value": event["value"],
        "threshold": event["threshold"],
        "message": event["message"],
        "fired_at": event["fired_at"],
        "resolved_at": event["resolved_at"],
        "sent_at": sent_at,
    }


def _encode(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _number(value: float | None) -> str:
    if value is None:
        return "no value"
    return f"{value:.4g}"


class AlertEvaluator:
    """Evaluates every enabled rule each `interval` while it holds the job lock; sends the webhooks."""

    def __init__(self, engine: AsyncEngine, settings: AlertsConfig | None = None) -> None:
        self.engine = engine
        self.settings = settings or AlertsConfig()
        self.lock = JobLock(engine, "alerts")
        self.evaluations = 0  # evaluations made (while holding the lock)
        self.delivered = 0  # webhook POSTs answered 2xx
        self.failed_attempts = 0  # webhook POSTs that failed (each retry counts)
        self.given_up = 0  # deliveries abandoned after every retry
        self._task: asyncio.Task | None = None
        self._evaluating = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        # (event id, state) -> its delivery task; an event's tasks run in order.
        self._deliveries: dict[tuple[uuid.UUID, str], asyncio.Task] = {}
        self._last_delivery: dict[uuid.UUID, asyncio.Task] = {}
        self._resting: dict[tuple[uuid.UUID, str], float] = {}  # deliveries that failed every retry: until when
        # (event id, state) -> when its receiver took it (monotonic). `_redeliver` reads what is not notified yet,
        # then schedules: a delivery that ends between the two is no longer in `_deliveries`, and without this
        # the stale row would send it again.
        self._told: dict[tuple[uuid.UUID, str], float] = {}

    # -- schedule ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="alerts")

    async def stop(self) -> None:
        """Stop evaluating, cancel deliveries in flight (the next evaluator finds them again), let the lock go."""
        await cancel_all([self._task])
        self._task = None
        pending = list(self._deliveries.values())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.lock.release()

    async def _loop(self) -> None:
        while True:
            try:
                await self.evaluate_once()
            except Exception:  # noqa: BLE001 - the loop must outlive a bad tick (database away, ...)
                log.exception("alert evaluation failed; trying again in %.0f s", self.settings.interval)
            await asyncio.sleep(self.settings.interval)

    async def evaluate_once(self) -> Evaluation | None:
        """Evaluate every enabled rule and send what must be sent; None when another process evaluates."""
        async with self._evaluating:  # the loop's tick and a caller's never interleave
            if not await self.lock.try_acquire():
                return None
            result = await self._evaluate()
            self.evaluations += 1
            await self._redeliver()
            return result

    # -- evaluation -------------------------------------------------------------------------------
    async def _evaluate(self) -> Evaluation:
        now = utcnow()
        result = Evaluation(at=now)
        async with self.engine.connect() as conn:
            rules = (await conn.execute(
                sa.select(alert_rules, tenants.c.name.label("tenant_name"))
                .select_from(alert_rules.outerjoin(tenants, tenants.c.id == alert_rules.c.tenant_id))
            )).mappings().all()
            open_rows = (await conn.execute(
                sa.select(alert_events).where(alert_events.c.state == "firing")
            )).mappings().all()
            tenant_ids = {r["tenant_id"] for r in rules if r["enabled"]}
            servers = (await conn.execute(
                sa.select(mcp_servers.c.id, mcp_servers.c.tenant_id, mcp_servers.c.name, mcp_servers.c.health_status,
                          mcp_servers.c.is_active).where(mcp_servers.c.tenant_id.in_(tenant_ids))
            )).mappings().all() if tenant_ids else []
        by_id = {s["id"]: s for s in servers}
        open_events: dict[tuple[uuid.UUID, uuid.UUID | None], Any] = {
            (e["rule_id"], e["server_id"]): e for e in open_rows
        }
        for rule in rules:
            watched: dict[uuid.UUID | None, float | None] = {}
            if rule["enabled"]:
                result.rules += 1
                if rule["server_id"] is None:
                    covered = [s for s in servers if s["tenant_id"] == rule["tenant_id"]]
                else:  # its own tenant's server only (the API checks it; a row written otherwise watches nothing)
                    named = by_id.get(rule["server_id"])
                    covered = [named] if named is not None and named["tenant_id"] == rule["tenant_id"] else []
                covered = [s for s in covered if s["is_active"]]
                watched = await self._measure(rule, covered, now)
            await self._transitions(rule, watched, by_id, open_events, now, result)
        return result

    async def _measure(self, rule: Any, servers: list[Any], now: datetime) -> dict[uuid.UUID, float | None]:
        """The rule's metric for each server it covers (None: no value in the window)."""
        metric = rule["metric"]
        if metric == "health":
            return {s["id"]: 1.0 if s["health_status"] == "UNHEALTHY" else 0.0 for s in servers}
        ids = [s["id"] for s in servers]
        if not ids:
            return {}
        since = now - timedelta(minutes=rule["window_minutes"])
        rl = request_logs
        where = (rl.c.tenant_id == rule["tenant_id"], rl.c.created_at >= since, rl.c.server_id.in_(ids))
        values: dict[uuid.UUID, float | None] = dict.fromkeys(ids)
        async with self.engine.connect() as conn:
            if metric in ("error_rate", "request_rate"):
                errors = sa.func.sum(sa.case((rl.c.status_code >= 500, 1), else_=0))
                rows = await conn.execute(
                    sa.select(rl.c.server_id, sa.func.count().label("n"), errors.label("errors"))
                    .where(*where).group_by(rl.c.server_id)
                )
                counts = {r.server_id: (r.n, r.errors or 0) for r in rows}
                for server_id in ids:
                    n, failed = counts.get(server_id, (0, 0))
                    if metric == "request_rate":
                        values[server_id] = n / rule["window_minutes"]
                    else:
                        values[server_id] = failed / n if n else None
            elif conn.dialect.name == "postgresql":
                q = _QUANTILES[metric]
                rows = await conn.execute(
                    sa.select(rl.c.server_id, sa.func.percentile_cont(q).within_group(rl.c.duration_ms).label("v"))
                    .where(*where).group_by(rl.c.server_id)
                )
                values.update({r.server_id: r.v for r in rows})
            else:
                samples: dict[uuid.UUID, list[float]] = {}
                for r in await conn.execute(sa.select(rl.c.server_id, rl.c.duration_ms).where(*where)):
                    samples.setdefault(r.server_id, []).append(r.duration_ms)
                values.update({sid: percentile(v, _QUANTILES[metric]) for sid, v in samples.items()})
        return values

    async def _transitions(self, rule: Any, watched: dict, by_id: dict, open_events: dict, now: datetime,
                           result: Evaluation) -> None:
        """Fire where the rule crosses and nothing is open; resolve open events that no longer cross."""
        changes: list[tuple[str, dict[str, Any]]] = []
        what = _DESCRIBED[rule["metric"]]
        window = f"over the last {rule['window_minutes']} min"
        for server_id, value in watched.items():
            server = by_id[server_id]["name"]
            firing = crosses(rule["metric"], value, rule["threshold"])
            event = open_events.get((rule["id"], server_id))
            if firing and event is None:
                message = (f"server '{server}' is UNHEALTHY" if rule["metric"] == "health"
                           else f"{what} {_number(value)} above {rule['threshold']:g} {window} on server '{server}'")
                changes.append(("fire", {
                    "id": uuid.uuid4(), "tenant_id": rule["tenant_id"], "rule_id": rule["id"], "server_id": server_id,
                    "state": "firing", "value": value, "threshold": rule["threshold"], "message": message,
                    "fired_at": now, "resolved_at": None, "notified_at": None, "created_at": now,
                }))
            elif not firing and event is not None:
                message = (f"server '{server}' is {by_id[server_id]['health_status']} again"
                           if rule["metric"] == "health" else
                           f"{what} {_number(value)} at or below {event['threshold']:g} {window} on server "
                           f"'{server}' (fired at {_number(event['value'])})")
                changes.append(("resolve", {**event, "state": "resolved", "value": value, "message": message,
                                            "resolved_at": now}))
        # Open events the rule no longer watches: disabled, another server, a server gone or inactive.
        for (rule_id, server_id), event in open_events.items():
            if rule_id == rule["id"] and server_id not in watched:
                reason = "the rule is disabled" if not rule["enabled"] else "the rule no longer watches this server"
                changes.append(("resolve", {**event, "state": "resolved", "resolved_at": now,
                                            "message": f"{event['message']}; resolved: {reason}"}))
        if not changes:
            return
        async with self.engine.begin() as conn:
            for kind, row in changes:
                if kind == "fire":
                    await conn.execute(sa.insert(alert_events).values(**row))
                else:
                    await conn.execute(
                        sa.update(alert_events).where(alert_events.c.id == row["id"],
                                                      alert_events.c.state == "firing")
                        .values(state="resolved", value=row["value"], message=row["message"],
                                resolved_at=row["resolved_at"])
                    )
        for kind, row in changes:
            (result.fired if kind == "fire" else result.resolved).append((rule["id"], row["server_id"]))
            log.info("alert %s %s: %s", rule["name"], "firing" if kind == "fire" else "resolved", row["message"])
            if rule["webhook_url"]:
                server = by_id.get(row["server_id"])
                self._schedule(rule["webhook_url"], {
                    **row, "rule_name": rule["name"], "metric": rule["metric"],
                    "window_minutes": rule["window_minutes"], "tenant_name": rule["tenant_name"],
                    "server_name": server["name"] if server is not None else None,
                })

    # -- webhooks ---------------------------------------------------------------------------------
    async def _redeliver(self) -> None:
        """Schedule what was not notified yet and is not on its way (a delivery lost with its process, or one
        that failed every retry and has rested)."""
        now = time.monotonic()
        self._resting = {key: until for key, until in self._resting.items() if until > now}
        kept = now - REDELIVERY_WINDOW.total_seconds()  # older events are not looked at again
        self._told = {key: at for key, at in self._told.items() if at > kept}
        since = utcnow() - REDELIVERY_WINDOW
        e = alert_events
        query = (
            sa.select(e, alert_rules.c.name.label("rule_name"), alert_rules.c.metric, alert_rules.c.window_minutes,
                      alert_rules.c.webhook_url, tenants.c.name.label("tenant_name"),
                      mcp_servers.c.name.label("server_name"))
            .select_from(e.join(alert_rules, alert_rules.c.id == e.c.rule_id)
                         .outerjoin(tenants, tenants.c.id == e.c.tenant_id)
                         .outerjoin(mcp_servers, mcp_servers.c.id == e.c.server_id))
            .where(alert_rules.c.webhook_url.is_not(None),
                   sa.or_(sa.and_(e.c.state == "firing", e.c.notified_at.is_(None), e.c.fired_at >= since),
                          sa.and_(e.c.state == "resolved", e.c.resolved_at >= since,
                                  sa.or_(e.c.notified_at.is_(None), e.c.notified_at < e.c.resolved_at))))
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        for row in rows:
            self._schedule(row["webhook_url"], dict(row))

    def _schedule(self, url: str, event: dict[str, Any]) -> None:
        key = (event["id"], event["state"])
        if key in self._deliveries or key in self._resting or key in self._told:
            return
        before = self._last_delivery.get(event["id"])
        task = asyncio.create_task(self._deliver(url, event, before), name=f"alert-webhook-{event['id']}")
        self._deliveries[key] = task
        self._last_delivery[event["id"]] = task

        def done(t: asyncio.Task) -> None:
            self._deliveries.pop(key, None)
            if self._last_delivery.get(event["id"]) is t:
                del self._last_delivery[event["id"]]

        task.add_done_callback(done)

    async def _deliver(self, url: str, event: dict[str, Any], before: asyncio.Task | None) -> None:
        if before is not None:  # this event's earlier state goes first
            await asyncio.gather(before, return_exceptions=True)
        settings = self.settings
        attempts = 1 + settings.webhook_retries
        error = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(settings.webhook_backoff * 2 ** (attempt - 1))
            sent_at = utcnow()
            body = orjson.dumps(payload(event, sent_at), default=_encode, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)
            try:
                async with self._slots:
                    async with self._session().post(
                        url, data=body, allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout),
                        headers={"Content-Type": "application/json", "User-Agent": "mcp-gateway-alerts",
                                 "X-Gateway-Alert-Event": str(event["id"]),
                                 "X-Gateway-Alert-State": event["state"]},
                    ) as response:
                        await response.read()
                        if 200 <= response.status < 300:
                            self._told[(event["id"], event["state"])] = time.monotonic()
                            await self._notified(event["id"], event["state"], sent_at)
                            self.delivered += 1
                            return
                        error = f"answered HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.failed_attempts += 1
        self.given_up += 1
        self._resting[(event["id"], event["state"])] = time.monotonic() + RESTING
        log.warning("alert webhook for event %s (%s) failed %d times, last: %s; trying again in %.0f s",
                    event["id"], event["state"], attempts, error, RESTING)

    async def _notified(self, event_id: uuid.UUID, state: str, at: datetime) -> None:
        # Only while the event is still in the state told: a firing told after the event resolved must not
        # make its resolution look told (the resolution's own delivery sets it).
        async with self.engine.begin() as conn:
            await conn.execute(sa.update(alert_events).where(alert_events.c.id == event_id,
                                                             alert_events.c.state == state).values(notified_at=at))

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_CONCURRENT_DELIVERIES))
        return self._http

