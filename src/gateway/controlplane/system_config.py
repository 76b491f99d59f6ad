"""System configuration: key/value settings by category, tenant overrides, versions and their history.

Owns the `system_config` and `system_config_history` tables (migration 0009)
behind `/api/v1/config` and `gateway config set|list|history`:

- A row with `tenant_id` NULL is the deployment's value of a key; a tenant's
  row overrides it for that tenant. The effective value for a tenant is its
  override, else the deployment's value.
- A sensitive value is sealed (`auth/sealing.py`, the gateway secret's
  credential key, the row's id as associated data) into `value_sealed`; the
  `value` column stays NULL. Nothing here returns or logs it: answers say
  `"value": null, "sensitive": true, "set": true`. `open_value` opens it, for
  code in the gateway that needs it (none of the data plane does today).
- Every write bumps `config_state.version` first (its row lock orders
  concurrent configuration writes), then writes the row with `version` + 1
  and appends a history row, in one transaction. Versions of a key in one
  scope keep counting across a delete and a later set.
- `runtime` settings reach every process through the snapshot
  (`Snapshot.setting`, only non-sensitive ones); the others are stored and
  reported as applying after a restart.

Tenant isolation is `service.Actor` and `service.scoped` as everywhere. The
deployment's values are nobody's tenant: row-level security hides them from
`gateway_tenant`, so a tenant admin reads them (never writes) on a connection
of the owner, by a query that names `tenant_id IS NULL` and nothing else.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.controlplane import schemas
from gateway.controlplane.service import Actor, Conflict, Forbidden, NotFound, bump_version, scoped
from gateway.db.tables import system_config, system_config_history, tenants, utcnow

if TYPE_CHECKING:
    from gateway.auth.sealing import GatewaySecrets

log = logging.getLogger("gateway.controlplane")

DEFAULT_CATEGORY = "general"
# The query-string spelling of "the deployment's value" for `tenant_id` (the body says null).
DEFAULT_SCOPE = "default"
RUNTIME, AFTER_RESTART = "at runtime", "after a restart"
# Keys the gateway's own jobs keep in this table (records/retention.py: `records.retention_run`, and each
# tenant's `records.audit_anchor`, where `gateway audit verify` starts). Shown like any setting, never written
# through the API or the CLI: a tenant ADMIN moving its anchor could hide the deletion of audit entries.
RESERVED_PREFIXES = ("records.",)

Scope = uuid.UUID | None | msgspec.UnsetType  # a tenant, the deployment's value, or "the caller's"


def _not_found(key: str) -> NotFound:
    # Said alike of a key nobody set and of another tenant's override: the answer must not tell them apart.
    return NotFound(f"setting '{key}' not found")


def _check_key(key: str) -> None:
    problem = schemas.config_key_problem(key)
    if problem is not None:
        raise schemas.ValidationFailed([{"field": "key", "message": problem}])


def _check_writable(key: str) -> None:
    if key.startswith(RESERVED_PREFIXES):
        raise Forbidden(f"'{key}' is kept by the gateway itself (keys under "
                        f"{', '.join(repr(p) for p in RESERVED_PREFIXES)}); it is read-only here")


def row_scope(actor: Actor, requested: Scope) -> uuid.UUID | None:
    """Whose row a write (or a history read) is about: a tenant's id, or None for the deployment's value.

    Left out (UNSET): the operator's is the deployment's value, a tenant
    ADMIN's its own tenant's override. The deployment's value is the
    operator's alone; another tenant is "not found" like a missing one.
    """
    if requested is msgspec.UNSET:
        return None if actor.is_operator else actor.tenant_id
    if requested is None:
        if not actor.is_operator:
            raise Forbidden("only the gateway operator changes the deployment's configuration (or reads its "
                            "history); a tenant ADMIN sets its own tenant's overrides")
        return None
    return actor.own_tenant(requested)


async def _require_tenant(conn: AsyncConnection, tenant_id: uuid.UUID | None) -> None:
    if tenant_id is None:
        return
    if (await conn.execute(sa.select(tenants.c.id).where(tenants.c.id == tenant_id))).first() is None:
        raise NotFound("tenant not found")


def _in_scope(tenant_id: uuid.UUID | None) -> sa.ColumnElement[bool]:
    column = system_config.c.tenant_id
    return column.is_(None) if tenant_id is None else column == tenant_id


async def _deployment_row(engine: AsyncEngine, key: str) -> Any:
    """The deployment's row for `key`, read as the owner (no tenant sees it through row-level security)."""
    async with engine.connect() as conn:
        return (
            await conn.execute(sa.select(system_config).where(system_config.c.tenant_id.is_(None),
                                                              system_config.c.key == key))
        ).mappings().first()


# -- reading ----------------------------------------------------------------------------------------
def setting_out(row: Any) -> dict[str, Any]:
    """A stored setting as answered: a sensitive value never in clear."""
    sensitive = bool(row["sensitive"])
    return {
        "id": row["id"],
        "key": row["key"],
        "tenant_id": row["tenant_id"],
        "scope": DEFAULT_SCOPE if row["tenant_id"] is None else "tenant",
        "category": row["category"],
        "value": None if sensitive else row["value"],
        "sensitive": sensitive,
        "set": row["value_sealed"] is not None if sensitive else True,
        "runtime": bool(row["runtime"]),
        "applies": RUNTIME if row["runtime"] else AFTER_RESTART,
        "description": row["description"],
        "version": row["version"],
        "updated_by": row["updated_by"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


async def get_effective(engine: AsyncEngine, actor: Actor, key: str, requested: Scope) -> dict[str, Any]:
    """The value of `key` in force for a tenant: its override, else the deployment's value (`source` says which).

    The tenant is `requested` (a tenant ADMIN: only its own), else the
    caller's; `requested` None asks for the deployment's value itself.
    """
    _check_key(key)
    if requested is msgspec.UNSET:
        tenant_id = actor.tenant_id
    elif requested is None:
        tenant_id = None
    else:
        tenant_id = actor.own_tenant(requested)
    if tenant_id is not None:
        async with scoped(engine, actor) as conn:
            if actor.is_operator:
                await _require_tenant(conn, tenant_id)
            row = (
                await conn.execute(sa.select(system_config).where(
                    system_config.c.tenant_id == tenant_id, system_config.c.key == key,
                    actor.tenant_filter(system_config),
                ))
            ).mappings().first()
        if row is not None:
            return {**setting_out(row), "source": "tenant", "for_tenant_id": tenant_id}
    row = await _deployment_row(engine, key)
    if row is None:
        raise _not_found(key)
    return {**setting_out(row), "source": DEFAULT_SCOPE, "for_tenant_id": tenant_id}


async def list_settings(
    engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None, requested: Scope = msgspec.UNSET,
    category: str | None = None,
) -> list[dict[str, Any]]:
    """Stored settings, keyset-paginated by id.

    `requested` a tenant: that tenant's overrides; None: the deployment's
    values; left out: everything within reach (a tenant ADMIN: the
    deployment's values and its own tenant's overrides).
    """
    def page(query: sa.Select) -> sa.Select:
        if category is not None:
            query = query.where(system_config.c.category == category)
        if after is not None:
            query = query.where(system_config.c.id > after)
        return query.order_by(system_config.c.id).limit(limit)

    rows = []
    if requested is not None:  # a tenant's overrides, or everything the caller reaches
        query = sa.select(system_config).where(actor.tenant_filter(system_config))
        if requested is not msgspec.UNSET:
            query = query.where(system_config.c.tenant_id == requested)
        async with scoped(engine, actor) as conn:
            rows += (await conn.execute(page(query))).mappings().all()
    if requested is None or (requested is msgspec.UNSET and not actor.is_operator):
        async with engine.connect() as conn:  # the deployment's values, as the owner (see the module's docstring)
            rows += (await conn.execute(page(sa.select(system_config).where(
                system_config.c.tenant_id.is_(None))))).mappings().all()
    rows.sort(key=lambda r: r["id"])
    return [setting_out(r) for r in rows[:limit]]


def _history_out(row: Any) -> dict[str, Any]:
    sensitive = bool(row["sensitive"])
    return {
        "id": row["id"],
        "config_id": row["config_id"],
        "key": row["key"],
        "tenant_id": row["tenant_id"],
        "version": row["version"],
        "change": row["change"],
        "value": None if sensitive else row["value"],
        "sensitive": sensitive,
        "set": row["change"] == "set",
        "changed_by": row["changed_by"],
        "created_at": row["created_at"],
    }


async def history(
    engine: AsyncEngine, actor: Actor, key: str, requested: Scope, *, limit: int, before: int | None = None,
) -> list[dict[str, Any]]:
    """Every change of `key` in one scope (`row_scope`), newest first; paginated by version (`before`)."""
    _check_key(key)
    tenant_id = row_scope(actor, requested)
    column = system_config_history.c.tenant_id
    query = sa.select(system_config_history).where(
        system_config_history.c.key == key, column.is_(None) if tenant_id is None else column == tenant_id,
        actor.tenant_filter(system_config_history),
    )
    if before is not None:
        query = query.where(system_config_history.c.version < before)
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        rows = (await conn.execute(
            query.order_by(system_config_history.c.version.desc()).limit(limit)
        )).mappings().all()
    if not rows and before is None:
        raise _not_found(key)
    return [_history_out(r) for r in rows]


# -- writing ----------------------------------------------------------------------------------------
def _given(body: schemas.ConfigSet, name: str, fallback: Any) -> Any:
    value = getattr(body, name)
    return fallback if value is msgspec.UNSET else value


async def set_setting(
    engine: AsyncEngine, actor: Actor, key: str, body: schemas.ConfigSet, secrets: GatewaySecrets | None,
) -> dict[str, Any]:
    """Create or replace the value of `key` in one scope; the answer is the setting as stored (never in clear)."""
    _check_key(key)
    _check_writable(key)
    tenant_id = row_scope(actor, body.tenant_id)
    # A new override takes what the body leaves out from the deployment's value of the key.
    inherited = await _deployment_row(engine, key) if tenant_id is not None else None
    now = utcnow()
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        await bump_version(conn)  # first: its row lock orders concurrent configuration writes
        row = (
            await conn.execute(
                sa.select(system_config)
                .where(_in_scope(tenant_id), system_config.c.key == key, actor.tenant_filter(system_config))
                .with_for_update()
            )
        ).mappings().first()
        base = row or inherited or {}
        sensitive = _given(body, "sensitive", base.get("sensitive", False))
        values = {
            "category": _given(body, "category", base.get("category", DEFAULT_CATEGORY)),
            "sensitive": sensitive,
            "runtime": _given(body, "runtime", base.get("runtime", True)),
            "description": _given(body, "description", base.get("description")),
            "updated_by": actor.user_id,
            "updated_at": now,
        }
        if row is not None:
            config_id, version = row["id"], row["version"] + 1
        else:
            config_id, version = uuid.uuid4(), await _last_version(conn, actor, tenant_id, key) + 1
        value, sealed = _stored_value(body.value, sensitive, config_id, secrets)
        values.update(value=value, value_sealed=sealed, version=version)
        if row is not None:
            stored = (await conn.execute(
                sa.update(system_config).where(system_config.c.id == config_id).values(**values)
                .returning(*system_config.c)
            )).mappings().one()
        else:
            stored = (await conn.execute(
                sa.insert(system_config).values(id=config_id, tenant_id=tenant_id, key=key, created_at=now, **values)
                .returning(*system_config.c)
            )).mappings().one()
        await _record(conn, stored, "set", actor, now)
    log.info("setting %r (%s) set to version %d by user %s%s", key, _scope_name(tenant_id), version, actor.user_id,
             " (sensitive)" if sensitive else "")
    return setting_out(stored)


async def delete_setting(engine: AsyncEngine, actor: Actor, key: str, requested: Scope) -> dict[str, Any]:
    """Delete the value of `key` in one scope (a tenant's override: the deployment's value applies again).

    The answer is the setting as it was; the history keeps a `delete` row.
    """
    _check_key(key)
    _check_writable(key)
    tenant_id = row_scope(actor, requested)
    now = utcnow()
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        await bump_version(conn)
        row = (
            await conn.execute(
                sa.delete(system_config)
                .where(_in_scope(tenant_id), system_config.c.key == key, actor.tenant_filter(system_config))
                .returning(*system_config.c)
            )
        ).mappings().first()
        if row is None:
            raise _not_found(key)  # rolls the version bump back
        gone = {**row, "version": row["version"] + 1, "value": None, "value_sealed": None}
        await _record(conn, gone, "delete", actor, now)
    log.info("setting %r (%s) deleted by user %s", key, _scope_name(tenant_id), actor.user_id)
    return setting_out(row)


async def _last_version(conn: AsyncConnection, actor: Actor, tenant_id: uuid.UUID | None, key: str) -> int:
    """The last version of `key` in this scope's history (0: never set), so a key set again keeps counting."""
    column = system_config_history.c.tenant_id
    found = await conn.execute(
        sa.select(sa.func.max(system_config_history.c.version)).where(
            system_config_history.c.key == key, column.is_(None) if tenant_id is None else column == tenant_id,
            actor.tenant_filter(system_config_history),
        )
    )
    return found.scalar() or 0


async def _record(conn: AsyncConnection, row: Any, change: str, actor: Actor, now) -> None:
    await conn.execute(
        sa.insert(system_config_history).values(
            id=uuid.uuid4(), tenant_id=row["tenant_id"], config_id=row["id"], key=row["key"], version=row["version"],
            # No value for a delete, nor beside a sealed one.
            value=sa.null() if row["sensitive"] or change == "delete" else row["value"],
            value_sealed=row["value_sealed"], sensitive=row["sensitive"], change=change,
            changed_by=actor.user_id, created_at=now,
        )
    )


def _stored_value(value: Any, sensitive: bool, config_id: uuid.UUID, secrets: GatewaySecrets | None):
    """(value, value_sealed): the value in clear, or sealed to this row."""
    if not sensitive:
        return value, None
    if secrets is None:  # pragma: no cover - every caller that takes values passes the secrets
        raise Conflict("this gateway cannot store sensitive values (no secrets key loaded)")
    return sa.null(), secrets.credentials.seal(msgspec.json.encode(value), config_id)


def open_value(row: Any, secrets: GatewaySecrets) -> Any:
    """A stored setting's value, opened if sealed: for code in the gateway that needs it, never for an answer."""
    if not row["sensitive"]:
        return row["value"]
    if row["value_sealed"] is None:
        return None
    return msgspec.json.decode(secrets.credentials.open(row["value_sealed"], row["id"]))


def _scope_name(tenant_id: uuid.UUID | None) -> str:
    return "deployment" if tenant_id is None else f"tenant {tenant_id}"
