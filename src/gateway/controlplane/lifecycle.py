"""Admin operations on the records' lifecycle: retention policies and performance alert rules.

`/api/v1/retention-policies` and `/api/v1/alerts` (controlplane/api.py) call
these. Tenant scoping is `service.Actor` and `service.scoped`, as everywhere:
a row outside the caller's reach is "not found" exactly like a missing one.

- Retention policies: the operator sets the deployment's (tenant_id NULL) and
  any tenant's; a tenant ADMIN sets its own tenant's overrides, and may keep
  its audit trail longer than the deployment, not shorter. The deployment's
  rows are nobody's tenant (row-level security hides them from
  `gateway_tenant`): what is in force for a tenant is read on a connection of
  the owner by a query that names `tenant_id IS NULL` and nothing else.
- Alert rules: a tenant's, watching one of its servers or all of them; a
  server of another tenant is refused exactly like one that does not exist.

Neither is read by the data plane (records/retention.py and records/alerts.py
read them from the database at each run), so no write here bumps the
configuration version or signals a change.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.config import RetentionConfig
from gateway.controlplane import schemas
from gateway.controlplane.service import Actor, Conflict, NotFound, scoped
from gateway.db.tables import (
    RETENTION_TABLES,
    alert_events,
    alert_rules,
    mcp_servers,
    retention_policies,
    tenants,
    utcnow,
)

_POLICY_COLUMNS = (
    "id", "tenant_id", "table_name", "days", "enabled", "last_run_at", "last_deleted", "created_at", "updated_at",
)
_ALERT_COLUMNS = (
    "id", "tenant_id", "name", "server_id", "metric", "threshold", "window_minutes", "webhook_url", "enabled",
    "description", "created_at", "updated_at",
)
_EVENT_COLUMNS = (
    "id", "rule_id", "tenant_id", "server_id", "state", "value", "threshold", "message", "fired_at", "resolved_at",
    "notified_at", "created_at",
)
# Said alike of a server that does not exist and of another tenant's: the answer must not tell them apart.
_NO_SUCH_SERVER = "no server with this id in the rule's tenant"


async def _require_tenant(conn: AsyncConnection, tenant_id: uuid.UUID) -> None:
    if (await conn.execute(sa.select(tenants.c.id).where(tenants.c.id == tenant_id))).first() is None:
        raise NotFound("tenant not found")


async def _page(conn: AsyncConnection, query: sa.Select, table: sa.Table, limit: int, after: uuid.UUID | None):
    """Keyset pagination by id, like the other lists."""
    if after is not None:
        query = query.where(table.c.id > after)
    return (await conn.execute(query.order_by(table.c.id).limit(limit))).mappings().all()


# -- retention policies -------------------------------------------------------------------------
def _policy_out(row: Any) -> dict[str, Any]:
    out = {k: row[k] for k in _POLICY_COLUMNS}
    out["scope"] = "deployment" if row["tenant_id"] is None else "tenant"
    return out


async def _deployment_policies(engine: AsyncEngine) -> dict[str, Any]:
    """The deployment's policy rows by table (tenant_id NULL: not any tenant's; no tenant data is read)."""
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(retention_policies).where(retention_policies.c.tenant_id.is_(None)))
        return {row.table_name: row for row in rows}


def _deployment_days(table: str, deployment: dict[str, Any], settings: RetentionConfig) -> tuple[int, str]:
    """(days kept, where that comes from) for tenants without their own policy; 0 days: kept forever."""
    row = deployment.get(table)
    if row is not None:
        return (row.days if row.enabled else 0), "deployment policy"
    return getattr(settings, f"{table}_days"), "configuration"


async def in_force(engine: AsyncEngine, actor: Actor, settings: RetentionConfig,
                   tenant_id: uuid.UUID | None = None) -> dict[str, dict[str, Any]]:
    """Per table, what the retention job keeps for the caller's tenant (the operator: a tenant it names, else
    tenants without their own policy): {"days" (0: forever), "source"}."""
    deployment = await _deployment_policies(engine)
    own: dict[str, Any] = {}
    tenant = tenant_id if actor.is_operator else actor.tenant_id
    if tenant is not None:
        async with scoped(engine, actor) as conn:
            rows = await conn.execute(sa.select(retention_policies).where(
                retention_policies.c.tenant_id == tenant, actor.tenant_filter(retention_policies)))
            own = {row.table_name: row for row in rows if row.enabled}
    out = {}
    for table in RETENTION_TABLES:
        if table in own:
            out[table] = {"days": own[table].days, "source": "tenant policy"}
        else:
            days, source = _deployment_days(table, deployment, settings)
            out[table] = {"days": days, "source": source}
    return out


async def list_retention_policies(
    engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None, tenant_id: uuid.UUID | None = None,
) -> list[dict[str, Any]]:
    """The policies in reach: the operator's are every row (`tenant_id` narrows to one tenant's), a tenant
    ADMIN's its own tenant's overrides."""
    query = sa.select(retention_policies).where(actor.tenant_filter(retention_policies))
    if tenant_id is not None:
        query = query.where(retention_policies.c.tenant_id == tenant_id)
    async with scoped(engine, actor) as conn:
        return [_policy_out(r) for r in await _page(conn, query, retention_policies, limit, after)]


async def _check_audit_floor(engine: AsyncEngine, actor: Actor, table: str, days: int,
                             settings: RetentionConfig) -> None:
    """A tenant ADMIN keeps its audit trail at least as long as the deployment does (evidence of its own
    actions is not its to shorten); the operator sets any."""
    if actor.is_operator or table != "audit_logs":
        return
    floor, _ = _deployment_days(table, await _deployment_policies(engine), settings)
    if floor and days < floor:
        raise schemas.ValidationFailed([{"field": "days", "message": f"a tenant may keep its audit trail longer "
                                                                     f"than the deployment's {floor} days, not shorter"}])


def _policy_conflict(table: str, tenant_id: uuid.UUID | None) -> Conflict:
    whose = "the deployment" if tenant_id is None else "this tenant"
    return Conflict(f"a retention policy for {table} already exists for {whose}: change it (PATCH) instead")


async def create_retention_policy(engine: AsyncEngine, actor: Actor, body: schemas.RetentionPolicyCreate,
                                  settings: RetentionConfig) -> dict[str, Any]:
    """The operator: the deployment's policy (no tenant_id) or a tenant's; a tenant ADMIN: its own tenant's."""
    if actor.is_operator:
        tenant_id = body.tenant_id
    else:
        tenant_id = actor.own_tenant(body.tenant_id)
    if body.enabled:
        await _check_audit_floor(engine, actor, body.table_name, body.days, settings)
    now = utcnow()
    row = {"id": uuid.uuid4(), "tenant_id": tenant_id, "table_name": body.table_name, "days": body.days,
           "enabled": body.enabled, "last_run_at": None, "last_deleted": 0, "created_at": now, "updated_at": now}
    async with scoped(engine, actor) as conn:
        if tenant_id is not None:
            await _require_tenant(conn, tenant_id)
        try:
            await conn.execute(sa.insert(retention_policies).values(**row))
        except IntegrityError:
            raise _policy_conflict(body.table_name, tenant_id) from None
    return _policy_out(row)


async def _find_policy(conn: AsyncConnection, actor: Actor, policy_id: uuid.UUID, *, for_update: bool = False):
    query = sa.select(retention_policies).where(retention_policies.c.id == policy_id,
                                                actor.tenant_filter(retention_policies))
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        raise NotFound("retention policy not found")  # also another tenant's, and the deployment's to a tenant
    return row


async def update_retention_policy(engine: AsyncEngine, actor: Actor, policy_id: uuid.UUID,
                                  body: schemas.RetentionPolicyUpdate, settings: RetentionConfig) -> dict[str, Any]:
    changes = {k: v for k, v in (("days", body.days), ("enabled", body.enabled)) if v is not schemas.UNSET}
    async with scoped(engine, actor) as conn:
        row = await _find_policy(conn, actor, policy_id, for_update=True)
        if changes.get("enabled", row["enabled"]):
            await _check_audit_floor(engine, actor, row["table_name"], changes.get("days", row["days"]), settings)
        row = (await conn.execute(
            sa.update(retention_policies).where(retention_policies.c.id == policy_id)
            .values(**changes, updated_at=utcnow()).returning(*retention_policies.c)
        )).mappings().one()
    return _policy_out(row)


async def delete_retention_policy(engine: AsyncEngine, actor: Actor, policy_id: uuid.UUID) -> dict[str, Any]:
    """Delete a policy (the deployment's, or the configuration's, applies again); the answer is it as it was."""
    async with scoped(engine, actor) as conn:
        row = await _find_policy(conn, actor, policy_id)
        await conn.execute(sa.delete(retention_policies).where(retention_policies.c.id == policy_id,
                                                               actor.tenant_filter(retention_policies)))
    return _policy_out(row)


# -- alert rules --------------------------------------------------------------------------------
async def _check_server(conn: AsyncConnection, actor: Actor, tenant_id: uuid.UUID, server_id: uuid.UUID | None):
    if server_id is None:
        return
    found = (await conn.execute(sa.select(mcp_servers.c.id).where(
        mcp_servers.c.id == server_id, mcp_servers.c.tenant_id == tenant_id, actor.tenant_filter(mcp_servers)
    ))).first()
    if found is None:
        raise schemas.ValidationFailed([{"field": "server_id", "message": _NO_SUCH_SERVER}])


async def _rules_out(conn: AsyncConnection, rows: list[Any]) -> list[dict[str, Any]]:
    """The rules, each with how many of its events are firing now."""
    firing: dict[uuid.UUID, int] = {}
    if rows:
        counted = await conn.execute(
            sa.select(alert_events.c.rule_id, sa.func.count()).where(
                alert_events.c.rule_id.in_([r["id"] for r in rows]), alert_events.c.state == "firing")
            .group_by(alert_events.c.rule_id)
        )
        firing = {rule_id: n for rule_id, n in counted}
    return [{**{k: r[k] for k in _ALERT_COLUMNS}, "firing": firing.get(r["id"], 0)} for r in rows]


def _name_conflict(name: str) -> Conflict:
    return Conflict(f"an alert rule named '{name}' already exists in this tenant")


async def create_alert_rule(engine: AsyncEngine, actor: Actor, body: schemas.AlertRuleCreate) -> dict[str, Any]:
    """A rule for the caller's tenant (the operator names one); its server, if any, must be one of the tenant's."""
    tenant_id = actor.own_tenant(body.tenant_id)
    now = utcnow()
    row = {
        "id": uuid.uuid4(), "tenant_id": tenant_id, "name": body.name, "server_id": body.server_id,
        "metric": body.metric, "threshold": body.threshold if body.threshold is not None else 0.0,
        "window_minutes": body.window_minutes, "webhook_url": body.webhook_url, "enabled": body.enabled,
        "description": body.description, "created_at": now, "updated_at": now,
    }
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        await _check_server(conn, actor, tenant_id, body.server_id)
        try:
            await conn.execute(sa.insert(alert_rules).values(**row))
        except IntegrityError:
            raise _name_conflict(body.name) from None
        return (await _rules_out(conn, [row]))[0]


async def list_alert_rules(
    engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None,
    tenant_id: uuid.UUID | None = None, server_id: uuid.UUID | None = None,
) -> list[dict[str, Any]]:
    query = sa.select(alert_rules).where(actor.tenant_filter(alert_rules))
    if tenant_id is not None:
        query = query.where(alert_rules.c.tenant_id == tenant_id)
    if server_id is not None:
        query = query.where(alert_rules.c.server_id == server_id)
    async with scoped(engine, actor) as conn:
        return await _rules_out(conn, list(await _page(conn, query, alert_rules, limit, after)))


async def _find_alert_rule(conn: AsyncConnection, actor: Actor, rule_id: uuid.UUID, *, for_update: bool = False):
    query = sa.select(alert_rules).where(alert_rules.c.id == rule_id, actor.tenant_filter(alert_rules))
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        raise NotFound("alert rule not found")  # also another tenant's
    return row


async def get_alert_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID) -> dict[str, Any]:
    async with scoped(engine, actor) as conn:
        return (await _rules_out(conn, [await _find_alert_rule(conn, actor, rule_id)]))[0]


async def update_alert_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID,
                            body: schemas.AlertRuleUpdate) -> dict[str, Any]:
    """Change what a PATCH gives; the rule as changed is checked whole (a threshold that suits its metric, a
    server of its tenant), nothing is written otherwise. Events already open keep the threshold they fired at;
    the next evaluation resolves them by the rule as it now is."""
    changes = {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not schemas.UNSET}
    async with scoped(engine, actor) as conn:
        row = await _find_alert_rule(conn, actor, rule_id, for_update=True)
        merged = {**row, **changes}
        problems = schemas.alert_threshold_problems(merged["metric"], merged["threshold"])
        if problems:
            raise schemas.ValidationFailed(problems)
        if "server_id" in changes:
            await _check_server(conn, actor, row["tenant_id"], changes["server_id"])
        try:
            row = (await conn.execute(
                sa.update(alert_rules).where(alert_rules.c.id == rule_id)
                .values(**changes, updated_at=utcnow()).returning(*alert_rules.c)
            )).mappings().one()
        except IntegrityError:
            raise _name_conflict(changes.get("name", row["name"])) from None
        return (await _rules_out(conn, [row]))[0]


async def delete_alert_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID) -> dict[str, Any]:
    """Delete a rule and its events; the answer is the rule as it was."""
    async with scoped(engine, actor) as conn:
        out = (await _rules_out(conn, [await _find_alert_rule(conn, actor, rule_id)]))[0]
        await conn.execute(sa.delete(alert_rules).where(alert_rules.c.id == rule_id, actor.tenant_filter(alert_rules)))
    return out


async def list_alert_events(
    engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID, *, limit: int, after: uuid.UUID | None,
    state: str | None = None,
) -> list[dict[str, Any]]:
    """A rule's events, newest first (by fired_at); the cursor is the last event's id."""
    e = alert_events
    async with scoped(engine, actor) as conn:
        await _find_alert_rule(conn, actor, rule_id)
        query = sa.select(e).where(e.c.rule_id == rule_id, actor.tenant_filter(e))
        if state is not None:
            query = query.where(e.c.state == state)
        if after is not None:
            cursor = (await conn.execute(sa.select(e.c.fired_at, e.c.id).where(
                e.c.id == after, e.c.rule_id == rule_id, actor.tenant_filter(e)))).first()
            if cursor is None:
                raise schemas.ValidationFailed([{"field": "cursor", "message": "is not a cursor this API returned"}])
            query = query.where(sa.or_(e.c.fired_at < cursor.fired_at,
                                       sa.and_(e.c.fired_at == cursor.fired_at, e.c.id < cursor.id)))
        rows = (await conn.execute(query.order_by(e.c.fired_at.desc(), e.c.id.desc()).limit(limit))).mappings()
        return [{k: r[k] for k in _EVENT_COLUMNS} for r in rows]
