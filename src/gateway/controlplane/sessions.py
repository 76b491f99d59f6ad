"""Sign-in sessions over the schema: pending sign-ins, the user a sign-in maps to, sessions and their tokens.

A session token reads `gws_<43 characters>` (256 random bits). It is shown
once, when the session is made, and stored only as its SHA-256 (a fast hash
is enough for a machine-made secret of that size, as for API keys: see
auth/keys.py). The admin API reads the session, its user and tenant from the
database on every request, so sign-out, revocation, expiry, a deactivated user
and a suspended tenant take effect at once. The role and tenant come from the
user; a session holds every control-plane scope, so the role alone decides
what it may do (permissions.py).

Pending sign-ins (`signin_states`) are found by the SHA-256 of their `state`
and deleted as they are read, so a state works once; expired ones are pruned
when new ones are made.

Must not: keep a token, a state or a verifier anywhere but in the row that
needs it (and tokens and states not even there), or log any of them.
"""

from __future__ import annotations

import hashlib
import re
import secrets as _random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth.signin import Identity, SigninError
from gateway.config import SigninProviderConfig
from gateway.controlplane import service
from gateway.db.tables import sessions, signin_states, tenants, users, utcnow

TOKEN_SCHEME = "gws_"
_TOKEN = re.compile(r"gws_[A-Za-z0-9_-]{43}")
# A session's scopes: all of them, so that the user's role alone decides (permissions.py).
SESSION_SCOPES = frozenset({"read", "write", "admin", "proxy", "metrics", "health"})
# last_seen_at is written at most this often per session (one UPDATE, not one per request).
_SEEN_EVERY = timedelta(seconds=60)
# Ended and expired sessions are kept this long (they show who signed in), then pruned.
_KEEP_ENDED = timedelta(days=30)


def mint_token() -> str:
    return TOKEN_SCHEME + _random.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_session_token(token: str | None) -> bool:
    """A well-formed session token (API keys read `gw_...`, so the two never collide)."""
    return token is not None and _TOKEN.fullmatch(token) is not None


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes (stored in UTC).
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


# -- pending sign-ins -----------------------------------------------------------------------------
async def begin_signin(
    engine: AsyncEngine, provider: str, state: str, verifier: str, nonce: str | None, ttl: int
) -> None:
    """Remember a sign-in that went to the provider: its verifier and nonce, under the hash of its state."""
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(sa.delete(signin_states).where(signin_states.c.expires_at < now))
        await conn.execute(
            sa.insert(signin_states).values(
                id=uuid.uuid4(), state_hash=token_hash(state), provider=provider, code_verifier=verifier,
                nonce=nonce, expires_at=now + timedelta(seconds=ttl), created_at=now,
            )
        )


async def consume_signin(engine: AsyncEngine, provider: str, state: str) -> tuple[str, str | None]:
    """The verifier and nonce of a pending sign-in, deleted as they are read; SigninError if unknown or expired."""
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                sa.delete(signin_states)
                .where(signin_states.c.state_hash == token_hash(state))
                .returning(signin_states.c.provider, signin_states.c.code_verifier, signin_states.c.nonce,
                           signin_states.c.expires_at)
            )
        ).first()
    again = f"start again at /auth/login/{provider}"
    if row is None:
        raise SigninError(400, "invalid_state", f"This sign-in is unknown or was already used; {again}")
    if row.provider != provider:
        raise SigninError(400, "invalid_state", f"This sign-in was started with another provider; {again}")
    if _aware(row.expires_at) <= utcnow():
        raise SigninError(400, "invalid_state", f"This sign-in took too long and expired; {again}")
    return row.code_verifier, row.nonce


# -- who signed in -------------------------------------------------------------------------------
_USER_COLUMNS = (
    users.c.id, users.c.tenant_id, users.c.username, users.c.email, users.c.role, users.c.is_active,
    tenants.c.status.label("tenant_status"),
)


async def user_for(engine: AsyncEngine, identity: Identity, provider: SigninProviderConfig) -> Any:
    """The gateway user a sign-in maps to, by verified email; created only if the provider's config says so.

    Refused (SigninError 403): no verified address, no user with one of them,
    addresses of two different users, an inactive user, a suspended tenant.
    """
    if not identity.emails:
        raise SigninError(
            403, "no_verified_email",
            f"{provider.name} did not vouch for any email address of this account (a verified one is needed to "
            "find your gateway user)",
        )
    wanted = [email.lower() for email in identity.emails]
    query = (
        sa.select(*_USER_COLUMNS)
        .join(tenants, tenants.c.id == users.c.tenant_id)
        .where(sa.func.lower(users.c.email).in_(wanted))
    )
    async with engine.connect() as conn:
        found = (await conn.execute(query)).mappings().all()
    if len(found) > 1:
        raise SigninError(
            403, "ambiguous_user",
            "The verified addresses of this account belong to more than one gateway user; ask an admin to fix that",
        )
    if not found:
        user = await _create_user(engine, identity, provider)
        if user is None:
            shown = ", ".join(identity.emails)
            raise SigninError(
                403, "unknown_user",
                f"No gateway user has the address {shown}; ask your tenant's admin to create one",
            )
    else:
        user = found[0]
    if not user["is_active"]:
        raise SigninError(403, "user_inactive", "Your gateway user is deactivated; ask your tenant's admin")
    if user["tenant_status"] != "active":
        raise SigninError(403, "tenant_suspended", "Your tenant is suspended; contact the gateway operator")
    return user


async def _create_user(engine: AsyncEngine, identity: Identity, provider: SigninProviderConfig) -> Any:
    """A new user for a verified address in one of the provider's create_users_domains, or None."""
    if not provider.create_users_tenant:
        return None
    domains = {d.lower().lstrip("@") for d in provider.create_users_domains}
    email = next((e for e in identity.emails if e.rpartition("@")[2].lower() in domains), None)
    if email is None:
        return None
    ref = provider.create_users_tenant
    try:
        by = tenants.c.id == uuid.UUID(ref)
    except ValueError:
        by = tenants.c.name == ref
    base = re.sub(r"[^A-Za-z0-9._-]", "-", identity.login or email.partition("@")[0])[:200] or "user"
    async with engine.begin() as conn:
        tenant = (await conn.execute(sa.select(tenants.c.id, tenants.c.status).where(by))).first()
        if tenant is None:
            raise SigninError(
                503, "misconfigured",
                f"Sign-in with {provider.name} would create your user in tenant '{ref}', which does not exist; "
                "tell the gateway operator",
            )
    for attempt in range(5):
        username = base if attempt == 0 else f"{base}-{_random.token_hex(3)}"
        now = utcnow()
        row = {"id": uuid.uuid4(), "tenant_id": tenant.id, "username": username, "email": email,
               "role": provider.create_users_role, "is_active": True, "created_at": now, "updated_at": now}
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.insert(users).values(**row))
                await service.bump_version(conn)
        except IntegrityError:
            continue  # the username is taken (or the address was registered meanwhile: then it is found)
        return {**row, "tenant_status": tenant.status}
    raise SigninError(409, "conflict", "Could not create your gateway user; try signing in again")


# -- sessions ------------------------------------------------------------------------------------
async def open_session(
    engine: AsyncEngine, user: Any, identity: Identity, *, ttl: int, ip: str | None, user_agent: str | None
) -> tuple[str, dict[str, Any]]:
    """A new session for `user`: (its token, shown once; the session as the API shows it)."""
    token = mint_token()
    now = utcnow()
    row = {
        "id": uuid.uuid4(), "tenant_id": user["tenant_id"], "user_id": user["id"], "token_hash": token_hash(token),
        "is_active": True, "expires_at": now + timedelta(seconds=ttl), "last_seen_at": now,
        "provider": identity.provider, "subject": identity.subject[:255], "created_ip": (ip or "")[:64] or None,
        "user_agent": (user_agent or "")[:512] or None, "ended_at": None, "created_at": now, "updated_at": now,
    }
    async with engine.begin() as conn:
        # This user's sessions that ended or expired long ago go (the index on user_id finds them).
        await conn.execute(
            sa.delete(sessions).where(sessions.c.user_id == user["id"], sessions.c.expires_at < now - _KEEP_ENDED)
        )
        await conn.execute(sa.insert(sessions).values(**row))
    out = _session_out({**row, "username": user["username"]})
    out["role"] = user["role"]
    return token, out


async def authenticate(engine: AsyncEngine, token: str) -> service.Actor:
    """The actor behind a session token, read fresh from the database; Unauthenticated or Forbidden if it no longer works."""
    query = (
        sa.select(
            sessions.c.id, sessions.c.is_active, sessions.c.expires_at, sessions.c.last_seen_at,
            users.c.id.label("user_id"), users.c.role, users.c.is_active.label("user_active"),
            tenants.c.id.label("tenant_id"), tenants.c.status, tenants.c.is_platform,
        )
        .join(users, users.c.id == sessions.c.user_id)
        .join(tenants, tenants.c.id == users.c.tenant_id)
        .where(sessions.c.token_hash == token_hash(token))
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).mappings().first()
    now = utcnow()
    if row is None:
        raise service.Unauthenticated("this sign-in session is not known; sign in again")
    if not row["is_active"]:
        raise service.Unauthenticated("this sign-in session has ended (signed out or revoked); sign in again")
    expires = _aware(row["expires_at"])
    if expires <= now:
        raise service.Unauthenticated(
            f"this sign-in session expired at {expires.isoformat(timespec='seconds')}; sign in again"
        )
    if not row["user_active"]:
        raise service.Unauthenticated("the user this session belongs to is deactivated")
    if row["status"] != "active":
        raise service.Forbidden("this session's tenant is suspended; contact the gateway operator")
    seen = _aware(row["last_seen_at"])
    if seen is None or now - seen >= _SEEN_EVERY:
        async with engine.begin() as conn:
            await conn.execute(sa.update(sessions).where(sessions.c.id == row["id"]).values(last_seen_at=now))
    return service.Actor(
        user_id=row["user_id"],
        tenant_id=row["tenant_id"],
        api_key_id=None,
        role=row["role"],
        is_operator=bool(row["is_platform"]) and row["role"] == "ADMIN",
        scopes=SESSION_SCOPES,
    )


async def end_session(engine: AsyncEngine, token: str) -> bool:
    """Sign out: end the session of this token; False if there was no active one."""
    now = utcnow()
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(sessions)
            .where(sessions.c.token_hash == token_hash(token), sessions.c.is_active.is_(True))
            .values(is_active=False, ended_at=now, updated_at=now)
        )
    return result.rowcount > 0


async def list_sessions(
    engine: AsyncEngine, actor: service.Actor, *, limit: int, after: uuid.UUID | None
) -> list[dict[str, Any]]:
    """Sessions that still work, within the caller's reach (own; a tenant ADMIN: the tenant's; the operator: all)."""
    query = (
        sa.select(*sessions.c, users.c.username)
        .join(users, users.c.id == sessions.c.user_id)
        .where(actor.tenant_filter(sessions), sessions.c.is_active.is_(True), sessions.c.expires_at > utcnow())
    )
    if after is not None:
        query = query.where(sessions.c.id > after)
    query = query.order_by(sessions.c.id).limit(limit)
    async with service.scoped(engine, actor) as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [_session_out(row) for row in rows]


async def revoke_session(engine: AsyncEngine, actor: service.Actor, session_id: uuid.UUID) -> dict[str, Any]:
    """End a session within the caller's reach; another tenant's is not found, like a missing one."""
    now = utcnow()
    async with service.scoped(engine, actor) as conn:
        row = (
            await conn.execute(
                sa.update(sessions)
                .where(sessions.c.id == session_id, actor.tenant_filter(sessions))
                .values(is_active=False, ended_at=sa.func.coalesce(sessions.c.ended_at, now), updated_at=now)
                .returning(*sessions.c)
            )
        ).mappings().first()
        if row is None:
            raise service.NotFound("session not found")
        username = (await conn.execute(sa.select(users.c.username).where(users.c.id == row["user_id"]))).scalar()
    return _session_out({**row, "username": username})


def _session_out(row: Any) -> dict[str, Any]:
    # Never the token or its hash.
    return {
        k: row[k]
        for k in (
            "id", "tenant_id", "user_id", "username", "provider", "is_active", "created_at", "expires_at",
            "last_seen_at", "ended_at", "created_ip", "user_agent",
        )
    }
