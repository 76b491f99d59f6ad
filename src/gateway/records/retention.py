"""Retention: records older than their policy allows are deleted, in batches, by one process at a time.

What is kept, per record table (`tables.RETENTION_TABLES`) and tenant: the
tenant's enabled `retention_policies` row, else the deployment's (tenant_id
NULL) enabled row, else the `[retention]` setting `<table>_days`. A disabled
tenant row is ignored (the deployment's applies); a disabled deployment row
keeps the rows of tenants without their own policy; 0 days (a setting) keeps
everything.

How: every DELETE removes at most `batch_size` rows, picked through an index
(`id IN (SELECT id ... ORDER BY <time> LIMIT n)`), commits on its own and is
followed by `batch_pause`, so a table is never locked for long and the
writer's COPY keeps appending. The tenants (and, for server_metrics, the
servers) present in a table are found by a loose index scan, one probe per
value, so a run that has nothing to delete costs a few index probes per
tenant and table, not a table scan. `statements` counts the DELETEs.

Audit entries in a tenant's hash chain (records/audit.py) go from the oldest
end only: a batch reads the chain in `chain_seq` order, deletes the leading
entries older than the cutoff up to the first newer one, and never the
newest entry (the chain's head, which the next entry links to). In the same
transaction it records the last deleted link in `system_config` (key
`records.audit_anchor`, the tenant's row: `{"chain_seq", "entry_hash",
"created_at", "deleted_at"}`), so `gateway audit verify` can start from it:
the first remaining entry must be `chain_seq + 1` with `prev_hash =
entry_hash`. Entries outside any chain (chain_seq NULL) go by age alone.

When: `RetentionJob` wakes every `interval`; the process that takes the job
lock (records/joblock.py) runs only if the last run of any process
(`system_config` key `records.retention_run`, the deployment's row) is at
least `interval` old, so a deployment runs it about once per interval
whatever its number of processes. `run_now` (the admin API) runs at once.
Each run sets `last_run_at` and `last_deleted` on the policy rows it applied.

This module must not delete anything outside the four record tables, and
never from the middle of an audit chain.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.config import RetentionConfig
from gateway.db.tables import (
    RETENTION_TABLES,
    alert_events,
    audit_logs,
    mcp_servers,
    request_logs,
    retention_policies,
    server_metrics,
    system_config,
    utcnow,
)
from gateway.records.joblock import JobLock
from gateway.tasks import cancel_all

log = logging.getLogger("gateway.records")

# system_config keys written by this job (not settings: nobody else writes them).
RUN_KEY = "records.retention_run"
ANCHOR_KEY = "records.audit_anchor"
SYSTEM_CATEGORY = "records"

# Per table: the column that says how old a row is, and the one its batches are picked by
# (the leading column of an index that has the time column second).
_AGE = {
    "request_logs": (request_logs.c.created_at, request_logs.c.tenant_id),
    "audit_logs": (audit_logs.c.created_at, audit_logs.c.tenant_id),
    "server_metrics": (server_metrics.c.window_start, server_metrics.c.server_id),
    "alert_events": (alert_events.c.fired_at, alert_events.c.tenant_id),
}
_TABLES = {t.name: t for t in (request_logs, audit_logs, server_metrics, alert_events)}


class RetentionBusy(Exception):
    """Another run (in this process or another) holds the job now."""


@dataclass(frozen=True, slots=True)
class Policy:
    days: int  # 0: keep everything
    row_id: uuid.UUID | None  # the retention_policies row that decided, None: the configuration


@dataclass
class RunReport:
    """What one run did."""

    started_at: datetime
    finished_at: datetime | None = None
    deleted: dict[str, int] = field(default_factory=lambda: {t: 0 for t in RETENTION_TABLES})
    # tenant id (None: rows without a tenant) -> table -> rows deleted; only where something was
    by_tenant: dict[uuid.UUID | None, dict[str, int]] = field(default_factory=dict)
    statements: int = 0  # DELETE statements, each one batch in a transaction of its own

    def add(self, table: str, tenant_id: uuid.UUID | None, count: int) -> None:
        if count:
            self.deleted[table] += count
            per = self.by_tenant.setdefault(tenant_id, {})
            per[table] = per.get(table, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "deleted": dict(self.deleted),
            "total": sum(self.deleted.values()),
            "statements": self.statements,
            "by_tenant": [{"tenant_id": tenant, "deleted": counts} for tenant, counts in self.by_tenant.items()],
        }


class Policies:
    """The policies in force for one run: tenant rows over deployment rows over the configuration."""

    def __init__(self, rows: list[Any], settings: RetentionConfig) -> None:
        self.settings = settings
        self.defaults: dict[str, Policy] = {}
        self.overrides: dict[tuple[str, uuid.UUID], Policy] = {}
        for row in rows:
            if row.tenant_id is None:
                self.defaults[row.table_name] = Policy(row.days if row.enabled else 0, row.id)
            elif row.enabled:
                self.overrides[(row.table_name, row.tenant_id)] = Policy(row.days, row.id)

    def for_tenant(self, table: str, tenant_id: uuid.UUID | None) -> Policy:
        if tenant_id is not None and (table, tenant_id) in self.overrides:
            return self.overrides[(table, tenant_id)]
        if table in self.defaults:
            return self.defaults[table]
        return Policy(getattr(self.settings, f"{table}_days"), None)

    @property
    def rows(self) -> set[uuid.UUID]:
        return {p.row_id for p in (*self.defaults.values(), *self.overrides.values()) if p.row_id is not None}


def _is(column: sa.ColumnElement, value: Any) -> sa.ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


async def distinct_values(conn: AsyncConnection, column: sa.Column) -> list[Any]:
    """The distinct values of an indexed column (None among them if present): one index probe per value.

    A recursive query stepping from each value to the next larger one (a
    "loose index scan"), so a table of millions of rows from a few hundred
    tenants costs a few hundred probes, not a scan.
    """
    table = column.table
    step_table = table.alias("following")
    following = step_table.c[column.name]
    first = sa.select(column).where(column.is_not(None)).order_by(column).limit(1).scalar_subquery()
    keys = sa.select(first.label("value")).cte("present", recursive=True)
    nxt = sa.select(following).where(following > keys.c.value).order_by(following).limit(1).scalar_subquery()
    keys = keys.union_all(sa.select(nxt).where(keys.c.value.is_not(None)))
    values: list[Any] = list((await conn.execute(sa.select(keys.c.value).where(keys.c.value.is_not(None)))).scalars())
    has_null = (await conn.execute(sa.select(sa.exists().where(column.is_(None))))).scalar()
    if has_null:
        values.append(None)
    return values


class RetentionJob:
    """Applies the retention policies: on a schedule (`start`), or at once (`run_now`)."""

    def __init__(self, engine: AsyncEngine, settings: RetentionConfig | None = None) -> None:
        self.engine = engine
        self.settings = settings or RetentionConfig()
        self.lock = JobLock(engine, "retention")
        self.statements = 0  # DELETE statements over this job's life (tests count batches with it)
        self.runs = 0
        self.last_report: RunReport | None = None
        self._running = asyncio.Lock()  # one run at a time within this process
        self._task: asyncio.Task | None = None

    # -- schedule ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        await cancel_all([self._task])
        self._task = None
        await self.lock.release()

    async def _loop(self) -> None:
        interval = self.settings.interval
        wait = min(interval, 60.0)  # not at once: start-up has enough to do
        while True:
            await asyncio.sleep(wait * random.uniform(1.0, 1.05))
            try:
                report, last = await self.run_if_due()
            except RetentionBusy:
                wait = min(interval, 60.0)  # someone is running it: look again soon, it will say when it ran
                continue
            except Exception:  # noqa: BLE001 - the job must outlive a bad run (database away, ...)
                log.exception("retention run failed; trying again in %.0f s", interval)
                wait = interval
                continue
            if report is not None:
                wait = interval
            else:  # ran recently elsewhere: due again `interval` after that run
                age = (utcnow() - last).total_seconds() if last is not None else 0.0
                wait = max(interval - age, 0.05)

    async def run_if_due(self) -> tuple[RunReport | None, datetime | None]:
        """Run if no process ran within `interval`: (the report, None), or (None, when the last run ended)."""
        async with self._hold():
            last = await self._last_run()
            if last is not None and (utcnow() - last).total_seconds() < self.settings.interval:
                return None, last
            return await self._run(), None

    async def run_now(self) -> RunReport:
        """Run at once, or RetentionBusy while a run is in progress anywhere."""
        async with self._hold():
            return await self._run()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        """The job for one run: this process's only run, and the only one across processes (the job lock)."""
        if self._running.locked():
            raise RetentionBusy("a retention run is in progress in this process")
        async with self._running:
            if not await self.lock.try_acquire():
                raise RetentionBusy("a retention run is in progress in another gateway process")
            try:
                yield
            finally:
                await self.lock.release()

    async def _last_run(self) -> datetime | None:
        async with self.engine.connect() as conn:
            value = (await conn.execute(
                sa.select(system_config.c.value).where(system_config.c.tenant_id.is_(None),
                                                        system_config.c.key == RUN_KEY)
            )).scalar()
        if not isinstance(value, dict) or not value.get("finished_at"):
            return None
        try:
            return datetime.fromisoformat(value["finished_at"])
        except (TypeError, ValueError):
            return None

    # -- one run ----------------------------------------------------------------------------------
    async def _run(self) -> RunReport:
        report = RunReport(started_at=utcnow())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(retention_policies))).all()
        policies = Policies(list(rows), self.settings)
        by_row: dict[uuid.UUID, int] = dict.fromkeys(policies.rows, 0)
        for table in RETENTION_TABLES:
            await self._apply(table, policies, report, by_row)
        report.finished_at = utcnow()
        async with self.engine.begin() as conn:
            for row_id, count in by_row.items():
                await conn.execute(
                    sa.update(retention_policies).where(retention_policies.c.id == row_id)
                    # the job's bookkeeping, not a change of the policy: updated_at stays
                    .values(last_run_at=report.finished_at, last_deleted=count,
                            updated_at=retention_policies.c.updated_at)
                )
            await _put_system_value(conn, None, RUN_KEY, {
                "started_at": report.started_at.isoformat(), "finished_at": report.finished_at.isoformat(),
                "deleted": report.deleted, "statements": report.statements,
            }, "when the retention job (records/retention.py) last ran, and what it deleted")
        self.runs += 1
        self.last_report = report
        total = sum(report.deleted.values())
        log.log(logging.INFO if total else logging.DEBUG, "retention deleted %d records (%s) in %d statements",
                total, ", ".join(f"{t} {n}" for t, n in report.deleted.items() if n) or "nothing", report.statements)
        return report

    async def _apply(self, table: str, policies: Policies, report: RunReport, by_row: dict[uuid.UUID, int]) -> None:
        age, part = _AGE[table]
        owners: dict[uuid.UUID, uuid.UUID | None] = {}
        async with self.engine.connect() as conn:
            keys = await distinct_values(conn, part)
            if table == "server_metrics":
                owners = await self._server_tenants(conn, [k for k in keys if k is not None])
        now = utcnow()
        for key in keys:
            tenant = owners.get(key) if table == "server_metrics" else key
            policy = policies.for_tenant(table, tenant)
            if not policy.days:
                continue
            cutoff = now - timedelta(days=policy.days)
            count = 0
            if table == "audit_logs":
                count += await self._delete_chain_prefix(tenant, cutoff, report)
                count += await self._delete_batches(table, [_is(part, key), age < cutoff,
                                                            audit_logs.c.chain_seq.is_(None)], report)
            elif table == "alert_events":
                # An alert still firing is kept whatever its age: the evaluator holds it open.
                count += await self._delete_batches(table, [_is(part, key), age < cutoff,
                                                            alert_events.c.state == "resolved",
                                                            alert_events.c.resolved_at < cutoff], report)
            else:
                count += await self._delete_batches(table, [_is(part, key), age < cutoff], report)
            report.add(table, tenant, count)
            if policy.row_id is not None:
                by_row[policy.row_id] += count

    async def _server_tenants(self, conn: AsyncConnection, server_ids: list[uuid.UUID]) -> dict:
        """Each server's tenant: the registry's, or for a server unregistered since, its newest metrics row's."""
        owners: dict[uuid.UUID, uuid.UUID | None] = {}
        if server_ids:
            found = await conn.execute(
                sa.select(mcp_servers.c.id, mcp_servers.c.tenant_id).where(mcp_servers.c.id.in_(server_ids))
            )
            owners = {row.id: row.tenant_id for row in found}
        for server_id in server_ids:
            if server_id not in owners:
                owners[server_id] = (await conn.execute(
                    sa.select(server_metrics.c.tenant_id).where(server_metrics.c.server_id == server_id)
                    .order_by(server_metrics.c.window_start.desc()).limit(1)
                )).scalar()
        return owners

    async def _delete_batches(self, table_name: str, where: list, report: RunReport) -> int:
        """DELETE the rows matching `where`, `batch_size` at a time, each batch committed, a pause between."""
        table = _TABLES[table_name]
        age, _ = _AGE[table_name]
        batch = self.settings.batch_size
        picked = sa.select(table.c.id).where(*where).order_by(age).limit(batch).scalar_subquery()
        deleted = 0
        while True:
            async with self.engine.begin() as conn:
                count = (await conn.execute(sa.delete(table).where(table.c.id.in_(picked)))).rowcount
            self._counted(report)
            deleted += count
            if count < batch:
                return deleted
            await asyncio.sleep(self.settings.batch_pause)

    async def _delete_chain_prefix(self, tenant: uuid.UUID | None, cutoff: datetime, report: RunReport) -> int:
        """Delete the oldest end of the tenant's audit chain: entries older than `cutoff` up to the first newer
        one, never the newest, and record the last one deleted as the chain's anchor."""
        chained = sa.and_(_is(audit_logs.c.tenant_id, tenant), audit_logs.c.chain_seq.is_not(None))
        batch = self.settings.batch_size
        deleted = 0
        async with self.engine.connect() as conn:
            head = (await conn.execute(sa.select(sa.func.max(audit_logs.c.chain_seq)).where(chained))).scalar()
        if head is None:
            return 0
        while True:
            async with self.engine.begin() as conn:
                rows = (await conn.execute(
                    sa.select(audit_logs.c.chain_seq, audit_logs.c.created_at, audit_logs.c.entry_hash)
                    .where(chained).order_by(audit_logs.c.chain_seq).limit(batch)
                )).all()
                prefix = []
                for row in rows:
                    if row.chain_seq >= head or _aware(row.created_at) >= cutoff:
                        break
                    prefix.append(row)
                if not prefix:
                    return deleted
                last = prefix[-1]
                count = (await conn.execute(
                    sa.delete(audit_logs).where(chained, audit_logs.c.chain_seq <= last.chain_seq)
                )).rowcount
                await _move_anchor(conn, tenant, last)
            self._counted(report)
            deleted += count
            if len(prefix) < len(rows) or len(rows) < batch:
                return deleted
            await asyncio.sleep(self.settings.batch_pause)

    def _counted(self, report: RunReport) -> None:
        self.statements += 1
        report.statements += 1


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes (stored as UTC).
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


async def _move_anchor(conn: AsyncConnection, tenant: uuid.UUID | None, last: Any) -> None:
    """The tenant's audit anchor becomes `last`, unless it already stands later (it only moves forward)."""
    current = (await conn.execute(
        sa.select(system_config.c.value).where(_is(system_config.c.tenant_id, tenant),
                                               system_config.c.key == ANCHOR_KEY).with_for_update()
    )).scalar()
    if isinstance(current, dict) and isinstance(current.get("chain_seq"), int) and current["chain_seq"] >= last.chain_seq:
        return
    await _put_system_value(conn, tenant, ANCHOR_KEY, {
        "chain_seq": last.chain_seq, "entry_hash": last.entry_hash,
        "created_at": _aware(last.created_at).isoformat(), "deleted_at": utcnow().isoformat(),
    }, "the last audit entry retention deleted from this tenant's chain: verification starts after it")


async def _put_system_value(conn: AsyncConnection, tenant: uuid.UUID | None, key: str, value: Any,
                            description: str) -> None:
    """Set a system_config value the records jobs keep (not a setting: no history row, runtime false)."""
    now = utcnow()
    where = (_is(system_config.c.tenant_id, tenant), system_config.c.key == key)
    updated = await conn.execute(
        sa.update(system_config).where(*where)
        .values(value=value, version=system_config.c.version + 1, updated_at=now)
    )
    if updated.rowcount == 0:
        await conn.execute(sa.insert(system_config).values(
            id=uuid.uuid4(), tenant_id=tenant, key=key, category=SYSTEM_CATEGORY, value=value, sensitive=False,
            runtime=False, description=description, version=1, created_at=now, updated_at=now,
        ))


async def audit_anchor(engine: AsyncEngine, tenant: uuid.UUID | None) -> dict[str, Any] | None:
    """Where the tenant's audit chain starts after retention: {"chain_seq", "entry_hash", ...}, or None."""
    async with engine.connect() as conn:
        value = (await conn.execute(
            sa.select(system_config.c.value).where(_is(system_config.c.tenant_id, tenant),
                                                   system_config.c.key == ANCHOR_KEY)
        )).scalar()
    return value if isinstance(value, dict) else None
