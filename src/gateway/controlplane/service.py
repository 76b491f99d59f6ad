"""Control-plane operations over the schema, scoped by tenant in one place.

Every operation takes an `Actor` (who is asking). `Actor.tenant_filter` and
`Actor.own_tenant` are the only places that decide which tenant's rows a caller
may see or touch: the operator (an ADMIN of the platform tenant) sees all; a
tenant ADMIN sees only their tenant. A row outside the caller's reach is
reported exactly like a row that does not exist.

Every transaction opened for an actor goes through `scoped`, which on
PostgreSQL also makes the database enforce the same tenant (row-level
security, migration 0006): the second wall, for a query that forgets its filter.

Every write that changes what the data plane serves bumps
`config_state.version` in the same transaction; the caller then signals the
change (`SnapshotStore.publish_change`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets as _random
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import msgspec

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.auth.keys import hash_key, mint_key, parse_key, verify_key
from gateway.config import LimitSettings
from gateway.controlplane import permissions, schemas
from gateway.db.tables import config_state, enhanced_api_keys, limit_settings, mcp_servers, tenants, users, utcnow
from gateway.db.tables import routing_rules, server_access_rules
from gateway.db.tables import server_tools
from gateway.records import analytics
from gateway.snapshot import MERGED_LIMIT_KEYS, apply_limit_overrides
from gateway.config import UpstreamSettings, server_settings

if TYPE_CHECKING:
    from gateway.auth.sealing import GatewaySecrets

PLATFORM_TENANT = "platform"
OPERATOR_USERNAME = "operator"
OPERATOR_SCOPES = ["admin", "read", "write", "proxy", "metrics", "health"]

log = logging.getLogger("gateway.controlplane")


class NotFound(Exception):
    """No such object within the caller's reach."""


class Conflict(Exception):
    """The write would break a uniqueness rule."""


class Forbidden(Exception):
    """The caller may not do this at all."""


class Unauthenticated(Exception):
    """The credential is genuine but no longer valid (revoked, expired, its user deactivated)."""


@dataclass(frozen=True, slots=True)
class Actor:
    user_id: uuid.UUID
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    role: str
    is_operator: bool
    scopes: frozenset[str] = frozenset(OPERATOR_SCOPES)
    # What `permit` granted for the action at hand: "all", "tenant" or "own"
    # (permissions.py). None: nothing was permitted yet, and only the operator
    # (local tools acting as it) may then query.
    reach: str | None = None

    def permit(self, action: str | None) -> Actor:
        """This actor with its reach for `action` (permissions.PERMISSIONS), or Forbidden."""
        try:
            reach = permissions.reach_of(action, role=self.role, scopes=self.scopes, is_operator=self.is_operator)
        except permissions.Refused as exc:
            raise Forbidden(str(exc)) from None
        return dataclasses.replace(self, reach=reach)

    def tenant_filter(self, table: sa.Table) -> sa.ColumnElement[bool]:
        """The predicate that keeps a query inside the caller's reach: its tenants, or its own rows."""
        if self.is_operator:
            return sa.true()
        if self.reach is None:
            raise Forbidden("no permission was granted for this action")
        in_tenant = table.c.tenant_id == self.tenant_id
        if self.reach != permissions.OWN:
            return in_tenant
        # Own rows: the caller's user row, or rows that belong to it (its API keys).
        owner = table.c.id if table.name == "users" else table.c.user_id
        return sa.and_(in_tenant, owner == self.user_id)

    def own_tenant(self, requested: uuid.UUID | None) -> uuid.UUID:
        """The tenant a new object goes to: the requested one, if the caller may use it."""
        if requested is None:
            if self.is_operator:
                raise schemas.ValidationFailed([{"field": "tenant_id", "message": "is required for the operator"}])
            return self.tenant_id
        if not self.is_operator and requested != self.tenant_id:
            raise NotFound("tenant not found")
        return requested


# The role row-level security applies to (migration 0006) and the setting its policies read.
TENANT_ROLE = "gateway_tenant"
_ENTER_TENANT = sa.text(
    f"SELECT set_config('role', '{TENANT_ROLE}', true), set_config('gateway.tenant_id', :tenant, true)"
)


@asynccontextmanager
async def scoped(engine: AsyncEngine, actor: Actor) -> AsyncIterator[AsyncConnection]:
    """A transaction for `actor`: committed on success, and on PostgreSQL confined to its tenant.

    For anyone but the operator the transaction runs as `gateway_tenant` with
    `gateway.tenant_id` set (both transaction-local, in one round trip), so the
    row-level security policies hide and refuse other tenants' rows even if a
    query lacks `tenant_filter`. The operator keeps the owner's view. SQLite
    has no row-level security: there `tenant_filter` is the only wall.
    """
    async with engine.begin() as conn:
        if not actor.is_operator and conn.dialect.name == "postgresql":
            await conn.execute(_ENTER_TENANT, {"tenant": str(actor.tenant_id)})
        yield conn


async def bump_version(conn: AsyncConnection) -> int:
    result = await conn.execute(
        sa.update(config_state)
        .where(config_state.c.id == 1)
        .values(version=config_state.c.version + 1, updated_at=utcnow())
        .returning(config_state.c.version)
    )
    return result.scalar_one()


def _unique_violation(exc: IntegrityError, what: str) -> Conflict:
    return Conflict(f"{what} already exists")


# -- credentials ------------------------------------------------------------------------------
async def authenticate_admin(
    engine: AsyncEngine, token: str | None, *, legacy_digest: Callable[[str], str] | None = None
) -> Actor | None:
    """The actor behind an admin credential, read fresh from the database (revocation is immediate).

    Any valid key of an active user in an active tenant is an actor; what it may
    do is decided per route by `Actor.permit` (role and scopes). An imported
    legacy key is found by its lookup digest when `legacy_digest` is given.
    """
    if not token:
        return None
    parsed = parse_key(token)
    if parsed is not None:
        plaintext, found_by = parsed.plaintext, enhanced_api_keys.c.key_prefix == parsed.prefix
    elif legacy_digest is not None and schemas.legacy_key_problem(token) is None:
        plaintext, found_by = token, enhanced_api_keys.c.lookup_digest == legacy_digest(token)
    else:
        return None
    query = (
        sa.select(
            enhanced_api_keys.c.id,
            enhanced_api_keys.c.key_hash,
            enhanced_api_keys.c.salt,
            enhanced_api_keys.c.scopes,
            enhanced_api_keys.c.expires_at,
            enhanced_api_keys.c.is_active,
            users.c.id.label("user_id"),
            users.c.role,
            users.c.is_active.label("user_active"),
            tenants.c.id.label("tenant_id"),
            tenants.c.status,
            tenants.c.is_platform,
        )
        .join(users, users.c.id == enhanced_api_keys.c.user_id)
        .join(tenants, tenants.c.id == users.c.tenant_id)
        .where(found_by)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).mappings().first()
    if row is None or not verify_key(plaintext, row["salt"], row["key_hash"]):
        return None
    # Past this point the caller proved the secret: it may hear why the key does not work.
    expires = _aware(row["expires_at"])
    if not row["is_active"]:
        raise Unauthenticated("this API key has been revoked")
    if expires is not None and expires <= datetime.now(timezone.utc):
        raise Unauthenticated(f"this API key expired at {expires.isoformat(timespec='seconds')}")
    if not row["user_active"]:
        raise Unauthenticated("the user this API key belongs to is deactivated")
    if row["status"] != "active":
        raise Forbidden("this key's tenant is suspended; contact the gateway operator")
    return Actor(
        user_id=row["user_id"],
        tenant_id=row["tenant_id"],
        api_key_id=row["id"],
        role=row["role"],
        # The operator: an ADMIN of the platform tenant (its other users are members of that tenant only).
        is_operator=bool(row["is_platform"]) and row["role"] == "ADMIN",
        scopes=frozenset(row["scopes"] or ()),
    )


# -- tenants ------------------------------------------------------------------------------------
async def create_tenant(engine: AsyncEngine, actor: Actor, body: schemas.TenantCreate) -> dict[str, Any]:
    if not actor.is_operator:
        raise Forbidden("only the gateway operator creates tenants")
    row = {"id": uuid.uuid4(), "name": body.name, "status": "active", "settings": body.settings,
           "weight": body.weight, "is_platform": False, "created_at": utcnow(), "updated_at": utcnow()}
    async with scoped(engine, actor) as conn:
        try:
            await conn.execute(sa.insert(tenants).values(**row))
        except IntegrityError as exc:
            raise _unique_violation(exc, f"a tenant named '{body.name}'") from None
        await bump_version(conn)
    return _tenant_out(row)


async def list_tenants(engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None) -> list[dict]:
    query = sa.select(tenants).where(tenants.c.id == actor.tenant_id if not actor.is_operator else sa.true())
    return [_tenant_out(r) for r in await _page(engine, actor, query, tenants, limit, after)]


async def get_tenant(engine: AsyncEngine, actor: Actor, tenant_id: uuid.UUID) -> dict[str, Any]:
    reach = tenants.c.id == actor.tenant_id if not actor.is_operator else sa.true()
    async with scoped(engine, actor) as conn:
        row = (await conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id, reach))).mappings().first()
    if row is None:
        raise NotFound("tenant not found")
    return _tenant_out(row)


async def update_tenant(
    engine: AsyncEngine, actor: Actor, tenant_id: uuid.UUID, body: schemas.TenantUpdate
) -> dict[str, Any]:
    """Change status, settings or weight (operator only). Suspension takes effect with the next snapshot."""
    if not actor.is_operator:
        raise Forbidden("only the gateway operator changes tenants")
    changes = _given(body)
    async with scoped(engine, actor) as conn:
        row = (await conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id))).mappings().first()
        if row is None:
            raise NotFound("tenant not found")
        if row["is_platform"] and changes.get("status", "active") != "active":
            raise Conflict("the platform tenant cannot be suspended: the operator's own credentials live there")
        result = await conn.execute(
            sa.update(tenants).where(tenants.c.id == tenant_id).values(**changes, updated_at=utcnow())
            .returning(*tenants.c)
        )
        row = result.mappings().one()
        await bump_version(conn)
    return _tenant_out(row)


def _given(body: Any) -> dict[str, Any]:
    """The fields a PATCH body set (the others are UNSET)."""
    return {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not schemas.UNSET}


def _tenant_out(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "status", "settings", "weight", "created_at", "updated_at")}


# -- users --------------------------------------------------------------------------------------
async def create_user(engine: AsyncEngine, actor: Actor, body: schemas.UserCreate) -> dict[str, Any]:
    tenant_id = actor.own_tenant(body.tenant_id)
    row = {"id": uuid.uuid4(), "tenant_id": tenant_id, "username": body.username, "email": body.email,
           "role": body.role, "is_active": True, "created_at": utcnow(), "updated_at": utcnow()}
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        try:
            await conn.execute(sa.insert(users).values(**row))
        except IntegrityError as exc:
            raise _unique_violation(exc, "a user with this username or email") from None
        await bump_version(conn)
    return _user_out(row)


async def list_users(engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None) -> list[dict]:
    query = sa.select(users).where(actor.tenant_filter(users))
    return [_user_out(r) for r in await _page(engine, actor, query, users, limit, after)]


async def update_user(
    engine: AsyncEngine, actor: Actor, user_id: uuid.UUID, body: schemas.UserUpdate
) -> dict[str, Any]:
    """Change role, active flag or email. Deactivating refuses every key of the user with the next snapshot."""
    changes = _given(body)
    demoted = changes.get("role", actor.role) != actor.role
    if user_id == actor.user_id and (changes.get("is_active") is False or demoted):
        raise Conflict("you cannot deactivate yourself or change your own role; ask another admin")
    async with scoped(engine, actor) as conn:
        try:
            result = await conn.execute(
                sa.update(users).where(users.c.id == user_id, actor.tenant_filter(users))
                .values(**changes, updated_at=utcnow()).returning(*users.c)
            )
        except IntegrityError:
            raise Conflict("a user with this email already exists") from None
        row = result.mappings().first()
        if row is None:
            raise NotFound("user not found")
        await bump_version(conn)
    return _user_out(row)


def _user_out(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "tenant_id", "username", "email", "role", "is_active", "created_at", "updated_at")}


async def _require_tenant(conn: AsyncConnection, tenant_id: uuid.UUID) -> None:
    found = (await conn.execute(sa.select(tenants.c.id).where(tenants.c.id == tenant_id))).first()
    if found is None:
        raise NotFound("tenant not found")


# -- API keys -----------------------------------------------------------------------------------
def _check_grant(actor: Actor, scopes: list[str]) -> None:
    """A caller grants only scopes it holds, unless it administers (ADMIN role, `admin` scope)."""
    if "metrics" in scopes and not actor.is_operator:
        raise Forbidden("only the gateway operator grants the 'metrics' scope (/metrics shows every tenant's traffic)")
    if actor.is_operator or (actor.role == "ADMIN" and "admin" in actor.scopes):
        return
    missing = sorted(set(scopes) - actor.scopes)
    if missing:
        raise Forbidden(f"a key can only be given scopes your own key holds; yours lacks {', '.join(missing)}")


async def _key_owner(conn: AsyncConnection, actor: Actor, user_id: uuid.UUID):
    owner = (
        await conn.execute(
            sa.select(users.c.id, users.c.tenant_id).where(users.c.id == user_id, actor.tenant_filter(users))
        )
    ).first()
    if owner is None:
        raise NotFound("user not found")
    return owner


async def create_api_key(engine: AsyncEngine, actor: Actor, body: schemas.ApiKeyCreate) -> dict[str, Any]:
    minted = mint_key()
    _check_grant(actor, body.scopes)
    async with scoped(engine, actor) as conn:
        owner = await _key_owner(conn, actor, body.user_id)
        row = {
            "id": uuid.uuid4(), "tenant_id": owner.tenant_id, "user_id": owner.id, "name": body.name,
            "key_prefix": minted.prefix, "key_hash": minted.key_hash, "salt": minted.salt,
            "scopes": sorted(set(body.scopes)), "rate_limit_per_hour": body.rate_limit_per_hour,
            "rate_limit_per_day": body.rate_limit_per_day, "expires_at": body.expires_at, "is_active": True,
            "created_at": utcnow(), "updated_at": utcnow(),
        }
        await conn.execute(sa.insert(enhanced_api_keys).values(**row))
        await bump_version(conn)
    out = _key_out(row)
    out["key"] = minted.plaintext  # the only time the plaintext exists outside its owner
    return out


async def rotate_api_key(
    engine: AsyncEngine, actor: Actor, key_id: uuid.UUID, body: schemas.ApiKeyRotate, *, default_grace: int,
    max_grace: int,
) -> dict[str, Any]:
    """Mint a key with the same owner, name, scopes, limits and expiry; the old one works for a grace period.

    The old key's `expires_at` becomes now + grace (or stays, if earlier) and
    it points at its replacement; a key is rotated once (rotate the replacement
    next). The new key's plaintext is in the answer, as on creation.
    """
    grace = default_grace if body.grace_seconds is schemas.UNSET else body.grace_seconds
    if grace > max_grace:
        raise schemas.ValidationFailed(
            [{"field": "grace_seconds", "message": f"must be at most {max_grace} (keys.rotation_grace_max)"}]
        )
    minted = mint_key()
    now = utcnow()
    async with scoped(engine, actor) as conn:
        old = (
            await conn.execute(
                sa.select(enhanced_api_keys)
                .where(enhanced_api_keys.c.id == key_id, actor.tenant_filter(enhanced_api_keys))
                .with_for_update()
            )
        ).mappings().first()
        if old is None:
            raise NotFound("API key not found")
        old_expiry = _aware(old["expires_at"])
        if not old["is_active"]:
            raise Conflict("this API key is revoked; a revoked key cannot be rotated")
        if old["replaced_by"] is not None:
            raise Conflict(f"this API key was already rotated; rotate its replacement {old['replaced_by']}")
        if old_expiry is not None and old_expiry <= now:
            raise Conflict("this API key has expired; create a new one")
        row = {
            "id": uuid.uuid4(), "tenant_id": old["tenant_id"], "user_id": old["user_id"], "name": old["name"],
            "key_prefix": minted.prefix, "key_hash": minted.key_hash, "salt": minted.salt, "scopes": old["scopes"],
            "rate_limit_per_hour": old["rate_limit_per_hour"], "rate_limit_per_day": old["rate_limit_per_day"],
            "expires_at": old_expiry, "is_active": True, "created_at": now, "updated_at": now,
        }
        await conn.execute(sa.insert(enhanced_api_keys).values(**row))
        valid_until = now + timedelta(seconds=grace)
        if old_expiry is not None:
            valid_until = min(valid_until, old_expiry)
        await conn.execute(
            sa.update(enhanced_api_keys)
            .where(enhanced_api_keys.c.id == key_id)
            .values(replaced_by=row["id"], expires_at=valid_until, updated_at=now)
        )
        await bump_version(conn)
    out = _key_out(row)
    out["key"] = minted.plaintext  # the only time the plaintext exists outside its owner
    out["replaces"] = {"id": key_id, "valid_until": valid_until}
    return out


async def import_api_key(
    engine: AsyncEngine, actor: Actor, body: schemas.ApiKeyImport, secrets: GatewaySecrets
) -> dict[str, Any]:
    """Accept a legacy key as it is: stored as a salted hash plus its keyed lookup digest, never in clear.

    `key_prefix` gets a random handle (`legacy.<hex>`): it names the key in
    listings without saying anything about it. The same key imported twice is a conflict.
    """
    _check_grant(actor, body.scopes)
    salt = _random.token_hex(16)
    async with scoped(engine, actor) as conn:
        owner = await _key_owner(conn, actor, body.user_id)
        row = {
            "id": uuid.uuid4(), "tenant_id": owner.tenant_id, "user_id": owner.id, "name": body.name,
            "key_prefix": f"legacy.{_random.token_hex(8)}", "key_hash": hash_key(body.key, salt), "salt": salt,
            "lookup_digest": secrets.legacy_digest(body.key), "scopes": sorted(set(body.scopes)),
            "rate_limit_per_hour": body.rate_limit_per_hour, "rate_limit_per_day": body.rate_limit_per_day,
            "expires_at": body.expires_at, "is_active": True, "created_at": utcnow(), "updated_at": utcnow(),
        }
        try:
            await conn.execute(sa.insert(enhanced_api_keys).values(**row))
        except IntegrityError:
            raise Conflict("this key is already imported") from None
        await bump_version(conn)
    return _key_out(row)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp stored is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


async def list_api_keys(engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None) -> list[dict]:
    query = sa.select(enhanced_api_keys).where(actor.tenant_filter(enhanced_api_keys))
    return [_key_out(r) for r in await _page(engine, actor, query, enhanced_api_keys, limit, after)]


async def revoke_api_key(engine: AsyncEngine, actor: Actor, key_id: uuid.UUID) -> dict[str, Any]:
    async with scoped(engine, actor) as conn:
        result = await conn.execute(
            sa.update(enhanced_api_keys)
            .where(enhanced_api_keys.c.id == key_id, actor.tenant_filter(enhanced_api_keys))
            .values(is_active=False, updated_at=utcnow())
            .returning(*enhanced_api_keys.c)
        )
        row = result.mappings().first()
        if row is None:
            raise NotFound("API key not found")
        await bump_version(conn)
    return _key_out(row)


def _key_out(row: Any) -> dict[str, Any]:
    out = {
        k: row[k]
        for k in (
            "id", "tenant_id", "user_id", "name", "key_prefix", "scopes", "rate_limit_per_hour",
            "rate_limit_per_day", "expires_at", "is_active", "last_used_at", "created_at", "updated_at",
            "replaced_by",
        )
        if k in row
    }
    # Never the digest itself: only whether this is an imported legacy key.
    out["legacy"] = row.get("lookup_digest") is not None
    return out


# -- servers ------------------------------------------------------------------------------------
async def create_server(
    engine: AsyncEngine, actor: Actor, body: schemas.ServerCreate, secrets: GatewaySecrets | None = None
) -> dict[str, Any]:
    if body.transport_type == "stdio" and not actor.is_operator:
        # A stdio server is a command the gateway runs on its own host: letting a
        # tenant admin choose it would hand every tenant a shell on the gateway.
        raise Forbidden("only the gateway operator registers stdio servers (they run commands on the gateway host)")
    tenant_id = actor.own_tenant(body.tenant_id)
    row = {
        "id": uuid.uuid4(), "tenant_id": tenant_id, "name": body.name, "description": body.description,
        "endpoint_url": body.endpoint_url, "transport_type": body.transport_type, "health_status": "UNKNOWN",
        "tags": body.tags, "capabilities": {}, "is_active": True, "created_at": utcnow(), "updated_at": utcnow(),
    }
    row.update(_sealed_auth(body.auth, row["id"], secrets))
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        try:
            await conn.execute(sa.insert(mcp_servers).values(**row))
        except IntegrityError as exc:
            raise _unique_violation(exc, f"a server named '{body.name}' in this tenant") from None
        await bump_version(conn)
    row["avg_response_time"] = None
    return _server_out(row)


async def list_servers(
    engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None, tenant_id: uuid.UUID | None = None,
    name: str | None = None, tags: Sequence[str] = (), transport_type: str | None = None,
    health_status: str | None = None, tool: str | None = None,
) -> list[dict]:
    """Servers within reach; each filter given narrows (`tags`: every one of them; `tool`: servers whose
    last discovery found a tool of that name)."""
    query = sa.select(mcp_servers).where(actor.tenant_filter(mcp_servers))
    if tenant_id is not None:
        query = query.where(mcp_servers.c.tenant_id == tenant_id)
    if name is not None:
        query = query.where(mcp_servers.c.name == name)
    if transport_type is not None:
        query = query.where(mcp_servers.c.transport_type == transport_type)
    if health_status is not None:
        query = query.where(mcp_servers.c.health_status == health_status)
    for tag in tags:
        query = query.where(_has_tag(engine.dialect.name, tag))
    if tool is not None:
        query = query.where(
            sa.exists().where(server_tools.c.server_id == mcp_servers.c.id, server_tools.c.name == tool)
        )
    return [_server_out(r) for r in await _page(engine, actor, query, mcp_servers, limit, after)]


def _has_tag(dialect: str, tag: str) -> sa.ColumnElement[bool]:
    """`tags` (a JSON array of strings) holds `tag`: JSONB containment on PostgreSQL, json_each on SQLite."""
    if dialect == "postgresql":
        return mcp_servers.c.tags.op("@>")(sa.cast(sa.literal(msgspec.json.encode([tag]).decode()), JSONB))
    # One bound parameter per tag: several of these may be in one query.
    name = f"tag_{uuid.uuid4().hex[:8]}"
    return sa.text(f"EXISTS (SELECT 1 FROM json_each(mcp_servers.tags) WHERE json_each.value = :{name})").bindparams(
        **{name: tag}
    )


async def get_server(engine: AsyncEngine, actor: Actor, server_id: uuid.UUID) -> dict[str, Any]:
    async with scoped(engine, actor) as conn:
        row = (
            await conn.execute(
                sa.select(mcp_servers).where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
            )
        ).mappings().first()
    if row is None:
        raise NotFound("server not found")
    return _server_out(row)


async def set_server_auth(
    engine: AsyncEngine, actor: Actor, server_id: uuid.UUID, body: schemas.ServerAuthUpdate, secrets: GatewaySecrets
) -> dict[str, Any]:
    """Replace the credential the gateway presents to this server (`{"kind": "none"}` removes it)."""
    async with scoped(engine, actor) as conn:
        result = await conn.execute(
            sa.update(mcp_servers)
            .where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
            .values(**_sealed_auth(body.auth, server_id, secrets), updated_at=utcnow())
            .returning(*mcp_servers.c)
        )
        row = result.mappings().first()
        if row is None:
            raise NotFound("server not found")
        await bump_version(conn)
    return _server_out(row)


async def update_server(
    engine: AsyncEngine, actor: Actor, server_id: uuid.UUID, body: schemas.ServerUpdate, defaults: UpstreamSettings
) -> dict[str, Any]:
    """Change what a PATCH gives; return the server as changed.

    `settings` merges into the server's overrides (a null removes one), and the
    result must validate over `defaults` (the `[upstreams]` section). The
    endpoint is checked against the transport it will have. Nothing is written
    unless everything validates.
    """
    changes = _given(body)
    async with scoped(engine, actor) as conn:
        row = (
            await conn.execute(
                sa.select(mcp_servers)
                .where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
                .with_for_update()
            )
        ).mappings().first()
        if row is None:
            raise NotFound("server not found")
        transport = changes.get("transport_type", row["transport_type"])
        endpoint = changes.get("endpoint_url", row["endpoint_url"])
        moved = transport != row["transport_type"] or endpoint != row["endpoint_url"]
        if moved and "stdio" in (transport, row["transport_type"]) and not actor.is_operator:
            raise Forbidden("only the gateway operator changes stdio servers (they run commands on the gateway host)")
        errors = []
        if moved:
            errors += [{"field": "endpoint_url" if "endpoint_url" in changes else "transport_type", "message": m}
                       for m in schemas.endpoint_problems(transport, endpoint)]
        if transport == "stdio" and row["auth_kind"] != "none":
            errors.append({"field": "transport_type", "message": 'a stdio server takes no credential: remove it '
                           'first (PUT /servers/{id}/auth {"kind": "none"})'})
        if "settings" in changes:
            stored = row["settings"] if isinstance(row["settings"], dict) else {}
            merged = {**stored, **changes["settings"]}
            changes["settings"] = {k: v for k, v in merged.items() if v is not None}
            try:
                server_settings(defaults, changes["settings"])
            except msgspec.ValidationError as exc:
                errors.append({"field": "settings", "message": str(exc).split(" - at ")[0].replace("`", "")})
        if errors:
            raise schemas.ValidationFailed(errors)
        row = (
            await conn.execute(
                sa.update(mcp_servers).where(mcp_servers.c.id == server_id)
                .values(**changes, updated_at=utcnow()).returning(*mcp_servers.c)
            )
        ).mappings().one()
        await bump_version(conn)
    return _server_out(row)


async def delete_server(engine: AsyncEngine, actor: Actor, server_id: uuid.UUID) -> dict[str, Any]:
    """Unregister a server: its discovered tools, resources and prompts and the access rules naming it go with it."""
    async with scoped(engine, actor) as conn:
        result = await conn.execute(
            sa.delete(mcp_servers)
            .where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
            .returning(*mcp_servers.c)
        )
        row = result.mappings().first()
        if row is None:
            raise NotFound("server not found")
        await bump_version(conn)
    log.info("server %s (%s) unregistered by user %s", row["name"], server_id, actor.user_id)
    return _server_out(row)


def _sealed_auth(auth: Any, server_id: uuid.UUID, secrets: GatewaySecrets | None) -> dict[str, Any]:
    """The auth columns: the kind and what may be shown in clear, and the whole credential sealed to this server."""
    if auth is None or isinstance(auth, schemas.NoAuth):
        return {"auth_kind": "none", "auth_summary": None, "auth_sealed": None}
    if secrets is None:  # pragma: no cover - every caller that takes credentials passes the secrets
        raise Conflict("this gateway cannot store credentials (no secrets key loaded)")
    if isinstance(auth, schemas.HeaderAuth):
        kind, summary = "header", {"header_name": auth.header_name}
    else:
        kind = "oauth2_client_credentials"
        summary = {"token_url": auth.token_url, "client_id": auth.client_id, "scope": auth.scope,
                   "client_auth": auth.client_auth}
    sealed = secrets.credentials.seal(msgspec.json.encode(auth), server_id)
    return {"auth_kind": kind, "auth_summary": summary, "auth_sealed": sealed}


def _server_out(row: Any) -> dict[str, Any]:
    out = {
        k: row[k]
        for k in (
            "id", "tenant_id", "name", "description", "endpoint_url", "transport_type", "health_status",
            "avg_response_time", "tags", "capabilities", "is_active", "created_at", "updated_at",
        )
    }
    # Write-only credential: its kind and what is not secret (never auth_sealed).
    out["auth"] = {"kind": row.get("auth_kind") or "none", **(row.get("auth_summary") or {})}
    # Per-server setting overrides, and the last capability discovery (registry/discovery.py).
    out.update({k: row.get(k) for k in ("settings", "discovered_at", "discovery_error")})
    out["settings"] = out["settings"] or {}
    return out


# -- server health ------------------------------------------------------------------------------
_HEALTH_COLUMNS = (
    mcp_servers.c.id, mcp_servers.c.name, mcp_servers.c.health_status, mcp_servers.c.health_checked_at,
    mcp_servers.c.health_detail, mcp_servers.c.avg_response_time, mcp_servers.c.settings,
)


async def get_server_health(
    engine: AsyncEngine, actor: Actor, server_id: uuid.UUID, defaults: UpstreamSettings
) -> dict[str, Any]:
    """The server's health as the monitor last recorded it, and the thresholds in force for it."""
    async with scoped(engine, actor) as conn:
        row = (
            await conn.execute(
                sa.select(*_HEALTH_COLUMNS).where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
            )
        ).mappings().first()
    if row is None:
        raise NotFound("server not found")
    return _health_out(row, defaults)


async def set_server_maintenance(
    engine: AsyncEngine, actor: Actor, server_id: uuid.UUID, body: schemas.ServerMaintenance,
    defaults: UpstreamSettings,
) -> dict[str, Any]:
    """Put a server in MAINTENANCE (probes stop, nothing overrides it), or take it out to UNKNOWN.

    Taking out a server that is not in maintenance changes nothing. The
    consecutive counts start again from zero either way.
    """
    async with scoped(engine, actor) as conn:
        row = (
            await conn.execute(
                sa.select(*_HEALTH_COLUMNS)
                .where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
                .with_for_update()
            )
        ).mappings().first()
        if row is None:
            raise NotFound("server not found")
        old = row["health_status"]
        new = "MAINTENANCE" if body.maintenance else ("UNKNOWN" if old == "MAINTENANCE" else old)
        if new != old:
            detail = dict(row["health_detail"]) if isinstance(row["health_detail"], dict) else {}
            detail.update(
                consecutive_failures=0, consecutive_successes=0,
                last_transition={
                    "from": old, "to": new, "at": utcnow().isoformat(), "by": str(actor.user_id),
                    "reason": "maintenance set by an admin" if body.maintenance else "maintenance ended by an admin",
                },
            )
            row = (
                await conn.execute(
                    sa.update(mcp_servers)
                    .where(mcp_servers.c.id == server_id)
                    .values(health_status=new, health_detail=detail, updated_at=utcnow())
                    .returning(*_HEALTH_COLUMNS)
                )
            ).mappings().one()
            await bump_version(conn)
            log.info("%s put server %s (%s) %s", actor.user_id, row["name"], server_id,
                     "in maintenance" if body.maintenance else "out of maintenance")
    return _health_out(row, defaults)


def _health_out(row: Any, defaults: UpstreamSettings) -> dict[str, Any]:
    from gateway.registry.health import thresholds  # imported here: registry/health.py builds on this module

    try:
        settings = server_settings(defaults, row["settings"] if isinstance(row["settings"], dict) else None)
    except msgspec.ValidationError:
        settings = defaults  # as the snapshot does: a stored value that no longer validates is ignored
    return {
        "server_id": row["id"],
        "name": row["name"],
        "status": row["health_status"],
        "checked_at": row["health_checked_at"],
        "detail": row["health_detail"],
        "avg_response_time": row["avg_response_time"],
        "thresholds": thresholds(settings),
    }


# -- analytics (records/analytics.py computes; this decides whose rows) ----------------------------
def _analytics_tenant(actor: Actor, requested: uuid.UUID | None) -> tuple[bool, uuid.UUID | None]:
    """(whether anything can match, the tenant to summarize: None is every tenant, the operator's view).

    A tenant's actor always gets its own tenant; asking for another one is a
    filter that matches nothing, as on the listing routes.
    """
    if actor.is_operator:
        return True, requested
    if actor.reach != permissions.TENANT:
        raise Forbidden("analytics cover a whole tenant")
    return requested in (None, actor.tenant_id), actor.tenant_id


async def analytics_server_health(
    engine: AsyncEngine, actor: Actor, *, tenant_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """Every server within reach (the operator's: every tenant's, or `tenant_id`'s) and its last hour."""
    possible, tenant = _analytics_tenant(actor, tenant_id)
    as_of = utcnow()
    items = []
    if possible:
        async with scoped(engine, actor) as conn:
            items = await analytics.server_health(conn, tenant_id=tenant, as_of=as_of)
    return {"items": items, "next_cursor": None, "as_of": as_of, "window_hours": 1}


async def analytics_request_performance(
    engine: AsyncEngine, actor: Actor, *, hours: int, tenant_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """Requests by tenant, server and method over the last `hours`, within reach."""
    possible, tenant = _analytics_tenant(actor, tenant_id)
    as_of = utcnow()
    items = []
    if possible:
        async with scoped(engine, actor) as conn:
            items = await analytics.request_performance(conn, hours=hours, tenant_id=tenant, as_of=as_of)
    return {"items": items, "next_cursor": None, "as_of": as_of, "hours": hours}


async def analytics_tenant_usage(engine: AsyncEngine, actor: Actor, tenant_id: uuid.UUID, *, hours: int) -> dict:
    """A tenant's usage; another tenant's is "not found", like a tenant that does not exist."""
    _analytics_tenant(actor, None)
    reach = tenants.c.id == actor.tenant_id if not actor.is_operator else sa.true()
    async with scoped(engine, actor) as conn:
        if (await conn.execute(sa.select(tenants.c.id).where(tenants.c.id == tenant_id, reach))).first() is None:
            raise NotFound("tenant not found")
        return await analytics.tenant_usage(conn, tenant_id=tenant_id, hours=hours, as_of=utcnow())


async def analytics_database(engine: AsyncEngine, actor: Actor) -> dict[str, Any]:
    """The database's size, tables and indexes: the deployment's, so the operator's alone."""
    if not actor.is_operator:
        raise Forbidden("only the gateway operator reads the database's statistics")
    async with scoped(engine, actor) as conn:
        return await analytics.database_report(conn)


# -- access rules -------------------------------------------------------------------------------
_RULE_COLUMNS = (
    "id", "tenant_id", "effect", "role", "user_id", "api_key_id", "server_id", "tool", "resource", "prompt",
    "description", "created_at", "updated_at",
)


def _rules_query() -> sa.Select:
    return sa.select(server_access_rules, mcp_servers.c.name.label("server_name")).select_from(
        server_access_rules.outerjoin(mcp_servers, mcp_servers.c.id == server_access_rules.c.server_id)
    )


async def create_access_rule(engine: AsyncEngine, actor: Actor, body: schemas.AccessRuleCreate) -> dict[str, Any]:
    """A rule for the caller's tenant (the operator names one). Every object it names must be in that tenant."""
    tenant_id = actor.own_tenant(body.tenant_id)
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        server_name = None
        server_id = body.server_id
        if server_id is not None or body.server_name is not None:
            # Another tenant's server is "not found", like one that does not exist.
            found = (
                await conn.execute(
                    sa.select(mcp_servers.c.id, mcp_servers.c.name).where(
                        mcp_servers.c.tenant_id == tenant_id,
                        actor.tenant_filter(mcp_servers),
                        mcp_servers.c.id == server_id if server_id is not None
                        else mcp_servers.c.name == body.server_name,
                    )
                )
            ).first()
            if found is None:
                raise NotFound("server not found")
            server_id, server_name = found.id, found.name
        for table, value, what in ((users, body.user_id, "user"), (enhanced_api_keys, body.api_key_id, "API key")):
            if value is None:
                continue
            found = (
                await conn.execute(
                    sa.select(table.c.id).where(
                        table.c.id == value, table.c.tenant_id == tenant_id, actor.tenant_filter(table)
                    )
                )
            ).first()
            if found is None:
                raise NotFound(f"{what} not found")
        now = utcnow()
        row = {
            "id": uuid.uuid4(), "tenant_id": tenant_id, "effect": body.effect, "role": body.role,
            "user_id": body.user_id, "api_key_id": body.api_key_id, "server_id": server_id, "tool": body.tool,
            "resource": body.resource, "prompt": body.prompt, "description": body.description,
            "created_at": now, "updated_at": now,
        }
        await conn.execute(sa.insert(server_access_rules).values(**row))
        await bump_version(conn)
    return _rule_out({**row, "server_name": server_name})


async def list_access_rules(
    engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None,
    tenant_id: uuid.UUID | None = None, server_id: uuid.UUID | None = None,
) -> list[dict]:
    query = _rules_query().where(actor.tenant_filter(server_access_rules))
    if tenant_id is not None:
        query = query.where(server_access_rules.c.tenant_id == tenant_id)
    if server_id is not None:
        query = query.where(server_access_rules.c.server_id == server_id)
    return [_rule_out(r) for r in await _page(engine, actor, query, server_access_rules, limit, after)]


async def get_access_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID) -> dict[str, Any]:
    async with scoped(engine, actor) as conn:
        row = await _find_rule(conn, actor, rule_id)
    return _rule_out(row)


async def delete_access_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID) -> dict[str, Any]:
    """Delete a rule; the answer is the rule as it was."""
    async with scoped(engine, actor) as conn:
        row = await _find_rule(conn, actor, rule_id)
        await conn.execute(
            sa.delete(server_access_rules).where(
                server_access_rules.c.id == rule_id, actor.tenant_filter(server_access_rules)
            )
        )
        await bump_version(conn)
    return _rule_out(row)


async def _find_rule(conn: AsyncConnection, actor: Actor, rule_id: uuid.UUID):
    row = (
        await conn.execute(
            _rules_query().where(server_access_rules.c.id == rule_id, actor.tenant_filter(server_access_rules))
        )
    ).mappings().first()
    if row is None:
        raise NotFound("access rule not found")  # also another tenant's
    return row


def _rule_out(row: Any) -> dict[str, Any]:
    out = {k: row[k] for k in _RULE_COLUMNS}
    out["server_name"] = row["server_name"]
    if row["role"] is not None:
        out["subject_type"] = "role"
    elif row["user_id"] is not None:
        out["subject_type"] = "user"
    elif row["api_key_id"] is not None:
        out["subject_type"] = "api_key"
    else:
        out["subject_type"] = "tenant"
    out["object_type"] = next((k for k in ("tool", "resource", "prompt") if row[k] is not None), "server")
    return out


async def _page(
    engine: AsyncEngine, actor: Actor, query: sa.Select, table: sa.Table, limit: int, after: uuid.UUID | None
):
    """Keyset pagination by id: stable under inserts, no OFFSET scans."""
    if after is not None:
        query = query.where(table.c.id > after)
    query = query.order_by(table.c.id).limit(limit)
    async with scoped(engine, actor) as conn:
        return (await conn.execute(query)).mappings().all()


# -- routing rules ------------------------------------------------------------------------------
# Rows of `routing_rules`; the snapshot compiles them (registry/routing.py, RoutingTable.build).
_ROUTE_COLUMNS = (
    "id", "tenant_id", "name", "priority", "enabled", "match_server", "match_tool", "match_tags", "strategy",
    "targets", "target_tags", "description", "created_at", "updated_at",
)
# Said alike of a server that does not exist and of another tenant's: the answer must not tell them apart.
_NO_SUCH_TARGET = "no server with this id in the rule's tenant"


async def _check_targets(
    conn: AsyncConnection, actor: Actor, tenant_id: uuid.UUID, targets: Sequence[schemas.RoutingTarget]
) -> list[dict[str, Any]]:
    """The targets as stored ({"server_id": str, "weight"}), or ValidationFailed naming each unknown server."""
    ids = {t.server_id for t in targets}
    found = set()
    if ids:
        found = set((await conn.execute(
            sa.select(mcp_servers.c.id).where(
                mcp_servers.c.id.in_(ids), mcp_servers.c.tenant_id == tenant_id, actor.tenant_filter(mcp_servers)
            )
        )).scalars())
    errors = [{"field": f"targets[{i}].server_id", "message": _NO_SUCH_TARGET}
              for i, t in enumerate(targets) if t.server_id not in found]
    if errors:
        raise schemas.ValidationFailed(errors)
    return [{"server_id": str(t.server_id), "weight": t.weight} for t in targets]


async def create_routing_rule(engine: AsyncEngine, actor: Actor, body: schemas.RoutingRuleCreate) -> dict[str, Any]:
    """A rule for the caller's tenant (the operator names one); every target must be a server of that tenant."""
    tenant_id = actor.own_tenant(body.tenant_id)
    now = utcnow()
    async with scoped(engine, actor) as conn:
        await _require_tenant(conn, tenant_id)
        row = {
            "id": uuid.uuid4(), "tenant_id": tenant_id, "name": body.name, "priority": body.priority,
            "enabled": body.enabled, "match_server": body.match_server, "match_tool": body.match_tool,
            "match_tags": body.match_tags, "strategy": body.strategy,
            "targets": await _check_targets(conn, actor, tenant_id, body.targets), "target_tags": body.target_tags,
            "description": body.description, "created_at": now, "updated_at": now,
        }
        try:
            await conn.execute(sa.insert(routing_rules).values(**row))
        except IntegrityError as exc:
            raise _unique_violation(exc, f"a routing rule named '{body.name}' in this tenant") from None
        await bump_version(conn)
        return await _route_out(conn, actor, row)


async def list_routing_rules(
    engine: AsyncEngine, actor: Actor, *, limit: int, after: uuid.UUID | None, tenant_id: uuid.UUID | None = None,
) -> list[dict]:
    query = sa.select(routing_rules).where(actor.tenant_filter(routing_rules))
    if tenant_id is not None:
        query = query.where(routing_rules.c.tenant_id == tenant_id)
    rows = await _page(engine, actor, query, routing_rules, limit, after)
    async with scoped(engine, actor) as conn:
        return await _routes_out(conn, actor, rows)


async def get_routing_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID) -> dict[str, Any]:
    async with scoped(engine, actor) as conn:
        return await _route_out(conn, actor, await _find_route(conn, actor, rule_id))


async def update_routing_rule(
    engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID, body: schemas.RoutingRuleUpdate
) -> dict[str, Any]:
    """Change what a PATCH gives. The rule as changed must still have a replica (targets or target_tags),
    and new targets must be servers of its tenant; nothing is written otherwise."""
    changes = _given(body)
    async with scoped(engine, actor) as conn:
        row = await _find_route(conn, actor, rule_id, for_update=True)
        if "targets" in changes:
            changes["targets"] = await _check_targets(conn, actor, row["tenant_id"], body.targets)
        targets = changes.get("targets", row["targets"]) or []
        target_tags = changes.get("target_tags", row["target_tags"]) or []
        if not targets and not target_tags:
            field = "targets" if "targets" in changes else "target_tags"
            raise schemas.ValidationFailed([{"field": field, "message": "would leave the rule without a replica: "
                                                                        "targets and target_tags both empty"}])
        try:
            row = (
                await conn.execute(
                    sa.update(routing_rules).where(routing_rules.c.id == rule_id)
                    .values(**changes, updated_at=utcnow()).returning(*routing_rules.c)
                )
            ).mappings().one()
        except IntegrityError:
            raise Conflict(f"a routing rule named '{changes.get('name')}' already exists in this tenant") from None
        await bump_version(conn)
        return await _route_out(conn, actor, row)


async def delete_routing_rule(engine: AsyncEngine, actor: Actor, rule_id: uuid.UUID) -> dict[str, Any]:
    """Delete a rule; the answer is the rule as it was."""
    async with scoped(engine, actor) as conn:
        row = await _find_route(conn, actor, rule_id)
        out = await _route_out(conn, actor, row)
        await conn.execute(
            sa.delete(routing_rules).where(routing_rules.c.id == rule_id, actor.tenant_filter(routing_rules))
        )
        await bump_version(conn)
    return out


async def _find_route(conn: AsyncConnection, actor: Actor, rule_id: uuid.UUID, *, for_update: bool = False):
    query = sa.select(routing_rules).where(routing_rules.c.id == rule_id, actor.tenant_filter(routing_rules))
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        raise NotFound("routing rule not found")  # also another tenant's
    return row


async def _route_out(conn: AsyncConnection, actor: Actor, row: Any) -> dict[str, Any]:
    return (await _routes_out(conn, actor, [row]))[0]


async def _routes_out(conn: AsyncConnection, actor: Actor, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The rules, each target with its server's name (None: the server was unregistered since)."""
    ids = set()
    for row in rows:
        for target in row["targets"] or ():
            try:
                ids.add(uuid.UUID(str(target["server_id"])))
            except (KeyError, TypeError, ValueError):
                continue
    names = {}
    if ids:
        found = await conn.execute(
            sa.select(mcp_servers.c.id, mcp_servers.c.tenant_id, mcp_servers.c.name).where(
                mcp_servers.c.id.in_(ids), actor.tenant_filter(mcp_servers)
            )
        )
        names = {(r.tenant_id, str(r.id)): r.name for r in found}
    out = []
    for row in rows:
        rule = {k: row[k] for k in _ROUTE_COLUMNS}
        rule["targets"] = [{**t, "server_name": names.get((row["tenant_id"], str(t.get("server_id"))))}
                           for t in row["targets"] or ()]
        out.append(rule)
    return out


# -- limit settings -----------------------------------------------------------------------------
# One row (migration 0007) of overrides over the `[limits]` defaults; the
# snapshot applies them the same way (snapshot.apply_limit_overrides), so what
# these answers call effective is what every process enforces after its reload.
async def get_limit_settings(engine: AsyncEngine, actor: Actor, defaults: LimitSettings) -> dict[str, Any]:
    """The deployment's effective limits, which keys are overridden, and the tenant weights within reach."""
    async with scoped(engine, actor) as conn:
        row = await _limit_row(conn)
        return _limits_out(row, defaults, await _weights(conn, actor))


async def update_limit_settings(
    engine: AsyncEngine, actor: Actor, defaults: LimitSettings, patch: dict[str, Any]
) -> dict[str, Any]:
    """Apply a validated PATCH (schemas.validate_limit_patch): a value sets an override, null removes it.

    A table setting's entries merge into its override (a null entry removes
    that entry). Nothing is written unless every key given still validates
    together with the overrides already stored.
    """
    if not actor.is_operator:
        raise Forbidden("only the gateway operator changes the deployment's limits")
    async with scoped(engine, actor) as conn:
        await bump_version(conn)  # first: its row lock orders concurrent configuration writes
        row = await _limit_row(conn, for_update=True)
        overrides = dict(row["overrides"])
        for key, value in patch.items():
            if value is None:
                overrides.pop(key, None)
            elif key in MERGED_LIMIT_KEYS:
                merged = {**(overrides.get(key) or {}), **value}
                overrides[key] = {entry: item for entry, item in merged.items() if item is not None}
                if not overrides[key]:
                    del overrides[key]
            else:
                overrides[key] = value
        _, _, ignored = apply_limit_overrides(defaults, overrides)
        refused = [{"field": key, "message": ignored[key]} for key in patch if key in ignored]
        if refused:
            raise schemas.ValidationFailed(refused)  # rolls the transaction (and the version bump) back
        row = await _store_overrides(conn, actor, overrides)
        out = _limits_out(row, defaults, await _weights(conn, actor))
    log.info("limit settings changed by user %s (key %s): %s", actor.user_id, actor.api_key_id,
             ", ".join(f"{key}={'default' if value is None else value!r}" for key, value in patch.items()))
    return out


async def reset_limit_settings(engine: AsyncEngine, actor: Actor, defaults: LimitSettings) -> dict[str, Any]:
    """Remove every override: the `[limits]` defaults apply again."""
    if not actor.is_operator:
        raise Forbidden("only the gateway operator changes the deployment's limits")
    async with scoped(engine, actor) as conn:
        await bump_version(conn)
        row = await _store_overrides(conn, actor, {})
        out = _limits_out(row, defaults, await _weights(conn, actor))
    log.info("limit settings reset to the defaults by user %s (key %s)", actor.user_id, actor.api_key_id)
    return out


async def _limit_row(conn: AsyncConnection, *, for_update: bool = False) -> dict[str, Any]:
    query = sa.select(limit_settings).where(limit_settings.c.id == 1)
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    if row is None:  # pragma: no cover - migration 0007 creates the row
        return {"overrides": {}, "updated_by": None, "updated_by_key": None, "updated_at": None}
    overrides = row["overrides"] if isinstance(row["overrides"], dict) else {}
    return {**row, "overrides": overrides}


async def _store_overrides(conn: AsyncConnection, actor: Actor, overrides: dict[str, Any]) -> dict[str, Any]:
    values = {"overrides": overrides, "updated_by": actor.user_id, "updated_by_key": actor.api_key_id,
              "updated_at": utcnow()}
    result = await conn.execute(
        sa.update(limit_settings).where(limit_settings.c.id == 1).values(**values).returning(*limit_settings.c)
    )
    if result.first() is None:  # pragma: no cover - migration 0007 creates the row
        await conn.execute(sa.insert(limit_settings).values(id=1, **values))
    return values


async def _weights(conn: AsyncConnection, actor: Actor) -> list[dict[str, Any]]:
    """Fair-scheduling weights: every tenant's for the operator, a tenant admin's own tenant's."""
    reach = sa.true() if actor.is_operator else tenants.c.id == actor.tenant_id
    rows = await conn.execute(
        sa.select(tenants.c.id, tenants.c.name, tenants.c.weight).where(reach).order_by(tenants.c.name)
    )
    return [{"tenant_id": r.id, "name": r.name, "weight": r.weight} for r in rows]


def _limits_out(row: dict[str, Any], defaults: LimitSettings, weights: list[dict[str, Any]]) -> dict[str, Any]:
    limits, applied, ignored = apply_limit_overrides(defaults, row["overrides"])
    return {
        "limits": msgspec.to_builtins(limits),
        "overridden": sorted(applied),
        # Stored overrides that no longer validate (the snapshot ignores them too).
        "ignored": ignored,
        "defaults": msgspec.to_builtins(apply_limit_overrides(defaults, {})[0]),
        "updated_by": row["updated_by"],
        "updated_at": _aware(row["updated_at"]),
        "tenant_weights": weights,
    }


# -- bootstrap ----------------------------------------------------------------------------------
async def bootstrap(engine: AsyncEngine) -> str:
    """Create the platform tenant, the operator and its key; return the key's plaintext.

    Refuses (Conflict) when the platform tenant exists: an operator credential
    is minted once, and further keys are made through the admin API.
    """
    minted = mint_key()
    now = utcnow()
    tenant_id, user_id = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        exists = (await conn.execute(sa.select(tenants.c.id).where(tenants.c.is_platform.is_(True)))).first()
        if exists is not None:
            raise Conflict("the gateway is already bootstrapped (a platform tenant exists)")
        await conn.execute(
            sa.insert(tenants).values(id=tenant_id, name=PLATFORM_TENANT, status="active", settings={},
                                      is_platform=True, created_at=now, updated_at=now)
        )
        await conn.execute(
            sa.insert(users).values(id=user_id, tenant_id=tenant_id, username=OPERATOR_USERNAME,
                                    email="operator@gateway.invalid", role="ADMIN", is_active=True,
                                    created_at=now, updated_at=now)
        )
        await conn.execute(
            sa.insert(enhanced_api_keys).values(
                id=uuid.uuid4(), tenant_id=tenant_id, user_id=user_id, name="operator", key_prefix=minted.prefix,
                key_hash=minted.key_hash, salt=minted.salt, scopes=OPERATOR_SCOPES, rate_limit_per_hour=100_000,
                rate_limit_per_day=1_000_000, expires_at=None, is_active=True, created_at=now, updated_at=now,
            )
        )
        await bump_version(conn)
    return minted.plaintext


async def operator_actor(engine: AsyncEngine) -> Actor:
    """The operator as an actor, for local tools (CLI, demo) that hold the database itself."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(users.c.id, users.c.tenant_id)
                .join(tenants, tenants.c.id == users.c.tenant_id)
                .where(tenants.c.is_platform.is_(True), users.c.username == OPERATOR_USERNAME)
            )
        ).first()
    if row is None:
        raise NotFound("the gateway is not bootstrapped: run `gateway bootstrap`")
    return Actor(user_id=row.id, tenant_id=row.tenant_id, api_key_id=None, role="ADMIN", is_operator=True)
