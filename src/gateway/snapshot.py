"""The data plane's read-only view of configuration, and what keeps it fresh.

`Snapshot` is immutable: built in one go from the database, validated, turned
into lookup tables, and swapped in atomically. The request path reads
`SnapshotStore.current` and never touches the database.

`SnapshotStore` rebuilds it when configuration changes. The control plane bumps
`config_state.version` in the same transaction as every write, then (after
commit) publishes on Redis `<prefix>config-changed` and calls `refresh()` on
its own process. Other processes hear the Redis message; a periodic version
check is the safety net when Redis is absent or a message is lost.

`Snapshot.limits` is the effective `LimitSettings`: the `[limits]` defaults
this process was configured with, and over them the overrides an admin set
through `/api/v1/rate-limits` (table `limit_settings`). An override that no
longer validates (a key since removed, a range since narrowed) is logged and
ignored: a stored value must never stop a process from loading its snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import LimitSettings, UpstreamSettings, server_settings
from gateway.dataplane.upstream import request_target
from gateway.db.tables import config_state, enhanced_api_keys, limit_settings, mcp_servers, tenants, users
from gateway.auth.access import EMPTY_POLICY, AccessPolicy, AccessRule
from gateway.db.tables import routing_rules, server_access_rules
from gateway.registry.routing import EMPTY_ROUTING, RoutingTable
from gateway.db.tables import server_tools
from gateway.db.tables import system_config

log = logging.getLogger("gateway.snapshot")


@dataclass(frozen=True, slots=True)
class TenantEntry:
    id: uuid.UUID
    name: str
    status: str
    is_platform: bool
    weight: int = 100  # share under fair scheduling (1..1000)
    # Parameter names this tenant wants redacted from its audit entries, besides the built-in
    # ones (its settings' "audit_redact_keys"; records/sanitize.py).
    audit_redact_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """An API key as the data plane needs it; the hash and salt verify a presented key."""

    id: uuid.UUID
    prefix: str
    key_hash: str = field(repr=False)
    salt: str = field(repr=False)
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    scopes: frozenset[str]
    rate_limit_per_hour: int
    rate_limit_per_day: int
    expires_at: float | None  # epoch seconds
    key_active: bool
    user_active: bool
    rotated: bool = False  # replaced by a rotation: valid until expires_at (its grace period)
    legacy: bool = False  # an imported legacy key, found by its lookup digest


@dataclass(frozen=True, slots=True)
class ServerEntry:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    endpoint_url: str
    transport_type: str
    health_status: str
    origin: str  # scheme://host:port, the key of its connection pool
    target: str  # path and query: the request line's target on that origin
    # The gateway's own credential for this server, sealed (dataplane/credentials.py opens it); None: none.
    auth_sealed: str | None = field(default=None, repr=False)
    tags: tuple[str, ...] = ()
    # The `[upstreams]` settings with this server's own overrides applied (health, breaker, queue, retries).
    settings: UpstreamSettings = field(default_factory=UpstreamSettings, repr=False)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    tenants: dict[uuid.UUID, TenantEntry]
    keys_by_prefix: dict[str, KeyEntry]
    servers: dict[tuple[uuid.UUID, str], ServerEntry]
    by_tenant: dict[uuid.UUID, tuple[ServerEntry, ...]] = field(default_factory=dict)
    # Access rules, compiled and indexed by server (auth/access.py).
    access: AccessPolicy = EMPTY_POLICY
    # Imported legacy keys by lookup digest, and the function computing a presented key's digest.
    keys_by_digest: dict[str, KeyEntry] = field(default_factory=dict)
    legacy_digest: Callable[[str], str] | None = field(default=None, repr=False)
    # The effective limits (defaults with the admin's overrides applied, validated),
    # and which of its keys an override set.
    limits: LimitSettings = field(default_factory=LimitSettings)
    limits_overridden: frozenset[str] = frozenset()
    # Tools withheld until an admin approves their changed definition, by server (registry/discovery.py):
    # only on servers of tenants whose settings say "tool_pinning": "withhold". Enforced in dataplane/enforce.py.
    withheld: dict[uuid.UUID, frozenset[str]] = field(default_factory=dict)
    # Routing rules, compiled against `servers` (registry/routing.py).
    routing: RoutingTable = EMPTY_ROUTING
    # Tools a server marks readOnlyHint or idempotentHint (as discovered), by server: calls that may be retried.
    safe_tools: dict[uuid.UUID, frozenset[str]] = field(default_factory=dict)
    # Runtime system settings (/api/v1/config): (tenant id or None for the deployment's, key) -> value; read
    # them through `setting`. Only non-sensitive runtime values are here (the data plane needs no sealed
    # ones); values are shared between readers, never to be changed in place.
    settings: dict[tuple[uuid.UUID | None, str], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.by_tenant and self.servers:
            index: dict[uuid.UUID, list[ServerEntry]] = {}
            for entry in self.servers.values():
                index.setdefault(entry.tenant_id, []).append(entry)
            object.__setattr__(self, "by_tenant", {t: tuple(s) for t, s in index.items()})

    def server(self, tenant_id: uuid.UUID, name: str) -> ServerEntry | None:
        return self.servers.get((tenant_id, name))

    def servers_of(self, tenant_id: uuid.UUID) -> tuple[ServerEntry, ...]:
        return self.by_tenant.get(tenant_id, ())

    def setting(self, key: str, tenant_id: uuid.UUID | None = None, default: Any = None) -> Any:
        """A runtime system setting for a tenant: its override, else the deployment's value, else `default`.

        A tenant override that is not carried here (sensitive, or not a runtime
        setting) still hides the deployment's value from that tenant: `default`.
        """
        if tenant_id is not None:
            found = self.settings.get((tenant_id, key), _NO_SETTING)
            if found is not _NO_SETTING:
                return default if found is _WITHHELD_SETTING else found
        found = self.settings.get((None, key), _NO_SETTING)
        return default if found is _NO_SETTING or found is _WITHHELD_SETTING else found

    def legacy_key(self, token: str) -> KeyEntry | None:
        """The imported legacy key this token would be, found in one lookup (the secret is not checked here)."""
        if self.legacy_digest is None or not self.keys_by_digest:
            return None
        return self.keys_by_digest.get(self.legacy_digest(token))


EMPTY = Snapshot(version=0, tenants={}, keys_by_prefix={}, servers={})
_NO_SETTING = object()
_WITHHELD_SETTING = object()  # stored, but not for the data plane (sensitive, or applies after a restart)
_SETTINGS = sa.select(system_config.c.tenant_id, system_config.c.key, system_config.c.value,
                      system_config.c.sensitive, system_config.c.runtime)


def _runtime_settings(rows) -> dict[tuple[uuid.UUID | None, str], Any]:
    return {(tenant_id, key): value if runtime and not sensitive else _WITHHELD_SETTING
            for tenant_id, key, value, sensitive, runtime in rows}


def _redact_keys(settings: object) -> tuple[str, ...]:
    names = settings.get("audit_redact_keys") if isinstance(settings, dict) else None
    if not isinstance(names, list):
        return ()
    return tuple(name for name in names if isinstance(name, str) and name.strip())


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


_VERSION = sa.select(config_state.c.version).where(config_state.c.id == 1)
_OVERRIDES = sa.select(limit_settings.c.overrides).where(limit_settings.c.id == 1)


# -- limit settings ---------------------------------------------------------------------------
LIMIT_KEYS: tuple[str, ...] = tuple(f.name for f in msgspec.structs.fields(LimitSettings))
_LIMIT_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(LimitSettings)}
# Settings that are tables (role -> limit, method -> cost): an override changes the
# entries it names and keeps the defaults' others.
MERGED_LIMIT_KEYS = frozenset(k for k, t in _LIMIT_TYPES.items() if getattr(t, "__origin__", None) is dict)


def limit_setting_problems(key: str, value: Any) -> list[tuple[str, str]]:
    """Why `value` cannot be the limit setting `key`, as (field, message) pairs; none when it can.

    The value goes through `LimitSettings` itself (the other keys at their
    built-in defaults): strict JSON types (no strings for numbers, no floats
    for integers), the declared ranges, and the struct's own checks (address
    and CIDR syntax). A table setting is checked entry by entry so that a
    message names the entry (`roles.USER`).
    """
    if key not in _LIMIT_TYPES:
        return [(key, f"unknown limit setting (known: {', '.join(LIMIT_KEYS)})")]
    if key in MERGED_LIMIT_KEYS and isinstance(value, dict):
        parts = [(f"{key}.{entry}", {entry: item}, False) for entry, item in value.items()]
    else:
        parts = [(key, value, True)]
    problems = []
    for name, part, with_path in parts:
        try:
            msgspec.convert({key: part}, LimitSettings)
        except msgspec.ValidationError as exc:
            text = str(exc)
            at = text.partition(" - at `$")[2].rstrip("`").removeprefix(f".{key}") if with_path else ""
            problems.append((name + at, text.split(" - at ")[0].replace("`", "")))
    return problems


def apply_limit_overrides(
    defaults: LimitSettings | None, overrides: Mapping[str, Any]
) -> tuple[LimitSettings, frozenset[str], dict[str, str]]:
    """The effective limits: `defaults` with every valid override applied.

    Returns the limits, the keys applied, and the keys ignored with why. A
    table setting's override (`roles`, `costs`) is laid over the default table.
    Each override is checked on its own and then with the others, in key order,
    so one bad value never takes the valid ones down with it.
    """
    base = {key: msgspec.to_builtins(getattr(defaults or LimitSettings(), key)) for key in LIMIT_KEYS}
    limits = msgspec.convert(base, LimitSettings)
    applied: set[str] = set()
    ignored: dict[str, str] = {}
    for key in sorted(overrides):
        value = overrides[key]
        problems = limit_setting_problems(key, value)
        if problems:
            ignored[key] = "; ".join(f"{field}: {message}" for field, message in problems)
            continue
        if key in MERGED_LIMIT_KEYS:
            value = {**base[key], **value}
        try:
            candidate = msgspec.convert({**base, key: value}, LimitSettings)
        except msgspec.ValidationError as exc:  # a rule across settings
            ignored[key] = str(exc)
            continue
        base[key], limits = value, candidate
        applied.add(key)
    return limits, frozenset(applied), ignored


async def read_version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(_VERSION)).scalar_one()


async def load_snapshot(
    engine: AsyncEngine,
    legacy_digest: Callable[[str], str] | None = None,
    limit_defaults: LimitSettings | None = None,
    upstream_defaults: UpstreamSettings | None = None,
) -> Snapshot:
    """Read everything the data plane needs in one transaction."""
    async with engine.connect() as conn:
        version = (await conn.execute(_VERSION)).scalar_one()
        overrides = (await conn.execute(_OVERRIDES)).scalar_one_or_none()
        tenant_rows = (await conn.execute(sa.select(tenants))).mappings().all()
        key_rows = (
            await conn.execute(
                sa.select(
                    enhanced_api_keys,
                    users.c.role,
                    users.c.is_active.label("user_active"),
                ).join(users, users.c.id == enhanced_api_keys.c.user_id)
            )
        ).mappings().all()
        server_rows = (
            await conn.execute(sa.select(mcp_servers).where(mcp_servers.c.is_active.is_(True)))
        ).mappings().all()
        rule_rows = (await conn.execute(sa.select(server_access_rules))).mappings().all()
        route_rows = (await conn.execute(sa.select(routing_rules))).mappings().all()
        changed_tools = (await conn.execute(_CHANGED_TOOLS)).all()
        hinted_tools = (await conn.execute(_HINTED_TOOLS)).all()
        setting_rows = (await conn.execute(_SETTINGS)).all()

    tenant_map = {
        r["id"]: TenantEntry(
            id=r["id"], name=r["name"], status=r["status"], is_platform=r["is_platform"], weight=r["weight"],
            audit_redact_keys=_redact_keys(r["settings"]),
        )
        for r in tenant_rows
    }
    keys = {
        r["key_prefix"]: KeyEntry(
            id=r["id"],
            prefix=r["key_prefix"],
            key_hash=r["key_hash"],
            salt=r["salt"],
            tenant_id=r["tenant_id"],
            user_id=r["user_id"],
            role=r["role"],
            scopes=frozenset(r["scopes"] or ()),
            rate_limit_per_hour=r["rate_limit_per_hour"],
            rate_limit_per_day=r["rate_limit_per_day"],
            expires_at=_epoch(r["expires_at"]),
            key_active=r["is_active"],
            user_active=r["user_active"],
            rotated=r["replaced_by"] is not None,
            legacy=r["lookup_digest"] is not None,
        )
        for r in key_rows
    }
    by_digest = {r["lookup_digest"]: keys[r["key_prefix"]] for r in key_rows if r["lookup_digest"] is not None}
    servers = {
        (r["tenant_id"], r["name"]): ServerEntry(
            id=r["id"],
            tenant_id=r["tenant_id"],
            name=r["name"],
            endpoint_url=r["endpoint_url"],
            transport_type=r["transport_type"],
            health_status=r["health_status"],
            origin=_origin(r["endpoint_url"]),
            target=request_target(r["endpoint_url"]),
            auth_sealed=r["auth_sealed"] if r["auth_kind"] != "none" else None,
            tags=tuple(r["tags"] or ()),
            settings=_server_settings(upstream_defaults or UpstreamSettings(), r, version),
        )
        for r in server_rows
    }
    access = AccessPolicy((_access_rule(r) for r in rule_rows), servers.values())
    limits, overridden = _effective_limits(limit_defaults, overrides, version)
    return Snapshot(
        access=access,
        version=version, tenants=tenant_map, keys_by_prefix=keys, servers=servers, keys_by_digest=by_digest,
        legacy_digest=legacy_digest, limits=limits, limits_overridden=overridden,
        withheld=_withheld(changed_tools, tenant_rows, servers.values()),
        routing=RoutingTable.build(route_rows, servers.values()),
        safe_tools=_safe_tools(hinted_tools),
        settings=_runtime_settings(setting_rows),
    )


# Tools whose definition changed since it was approved (few: pinning flags them one by one).
_HINTED_TOOLS = sa.select(server_tools.c.server_id, server_tools.c.name, server_tools.c.annotations).where(
    server_tools.c.annotations.is_not(None)
)


def _safe_tools(rows) -> dict[uuid.UUID, frozenset[str]]:
    safe: dict[uuid.UUID, set[str]] = {}
    for server_id, name, annotations in rows:
        if isinstance(annotations, dict) and (
            annotations.get("readOnlyHint") is True or annotations.get("idempotentHint") is True
        ):
            safe.setdefault(server_id, set()).add(name)
    return {server_id: frozenset(names) for server_id, names in safe.items()}


_CHANGED_TOOLS = sa.select(server_tools.c.tenant_id, server_tools.c.server_id, server_tools.c.name).where(
    server_tools.c.pin_status == "changed"
)


def _withheld(changed, tenant_rows, served) -> dict[uuid.UUID, frozenset[str]]:
    """Changed tools by server, for tenants that withhold them (tenants.settings "tool_pinning": "withhold")."""
    withholding = {
        r["id"] for r in tenant_rows
        if isinstance(r["settings"], dict) and r["settings"].get("tool_pinning") == "withhold"
    }
    live = {s.id for s in served}
    names: dict[uuid.UUID, set[str]] = {}
    for tenant_id, server_id, name in changed:
        if tenant_id in withholding and server_id in live:
            names.setdefault(server_id, set()).add(name)
    return {server_id: frozenset(tools) for server_id, tools in names.items()}


def _server_settings(defaults: UpstreamSettings, row: Mapping[str, Any], version: int) -> UpstreamSettings:
    overrides = row["settings"]
    if overrides and not isinstance(overrides, dict):
        log.warning("server %s: settings is not a JSON object (ignored): %r", row["id"], overrides)
        return defaults
    try:
        return server_settings(defaults, overrides)
    except msgspec.ValidationError as exc:
        # The admin API validates; a stored value that no longer does must not stop the snapshot.
        log.warning("server %s: settings ignored (configuration version %d): %s", row["id"], version, exc)
        return defaults


def _effective_limits(
    defaults: LimitSettings | None, overrides: Any, version: int
) -> tuple[LimitSettings, frozenset[str]]:
    if not isinstance(overrides, dict):
        if overrides is not None:
            log.warning("limit_settings.overrides is not a JSON object (ignored): %r", overrides)
        overrides = {}
    limits, applied, ignored = apply_limit_overrides(defaults, overrides)
    for key, why in ignored.items():
        log.warning("limit override %r ignored (configuration version %d): %s", key, version, why)
    return limits, applied


def _access_rule(r) -> AccessRule:
    return AccessRule(
        id=r["id"], tenant_id=r["tenant_id"], effect=r["effect"], role=r["role"], user_id=r["user_id"],
        api_key_id=r["api_key_id"], server_id=r["server_id"], tool=r["tool"], resource=r["resource"],
        prompt=r["prompt"],
    )


class SnapshotStore:
    """Holds the current snapshot; rebuilds it on signal or when the version moves."""

    def __init__(
        self, engine: AsyncEngine, *, poll_interval: float = 1.0, redis=None, channel: str = "",
        legacy_digest: Callable[[str], str] | None = None, limit_defaults: LimitSettings | None = None,
        upstream_defaults: UpstreamSettings | None = None,
    ) -> None:
        self.engine = engine
        self.legacy_digest = legacy_digest
        # The `[upstreams]` section: each server's settings where it sets none of its own.
        self.upstream_defaults = upstream_defaults
        # The `[limits]` section: what `Snapshot.limits` is where no admin override applies.
        self.limit_defaults = limit_defaults
        self.poll_interval = poll_interval
        self.redis = redis
        self.channel = channel
        self.current: Snapshot = dataclasses.replace(EMPTY, limits=apply_limit_overrides(limit_defaults, {})[0])
        self.loaded = False
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._listeners: list = []

    def on_change(self, callback) -> None:
        """Call `callback(snapshot)` after every swap (limiters resize their buckets)."""
        self._listeners.append(callback)

    async def refresh(self) -> Snapshot:
        async with self._lock:
            snapshot = await load_snapshot(
                self.engine, self.legacy_digest, self.limit_defaults, self.upstream_defaults
            )
            if snapshot.version >= self.current.version:
                self.current = snapshot
                self.loaded = True
                for callback in self._listeners:
                    callback(snapshot)
            return self.current

    async def start(self) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._poll(), name="snapshot-poll"))
        if self.redis is not None:
            self._tasks.append(asyncio.create_task(self._listen(), name="snapshot-listen"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def publish_change(self) -> None:
        """Tell every process (this one included) that configuration changed."""
        await self.refresh()
        if self.redis is not None:
            try:
                await self.redis.publish(self.channel, str(self.current.version))
            except Exception as exc:  # noqa: BLE001 - the poll still catches the change
                log.warning("could not publish a configuration change on Redis: %s", exc)

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if await read_version(self.engine) != self.current.version:
                    await self.refresh()
                if failing:
                    log.info("configuration database reachable again")
                failing = False
            except Exception as exc:  # noqa: BLE001 - keep serving the last snapshot
                if not failing:
                    log.warning("cannot check the configuration version (serving the last snapshot): %s", exc)
                failing = True

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        if int(message["data"]) > self.current.version:
                            await self.refresh()
                    except (ValueError, TypeError):
                        await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: the poll covers us
                log.warning("configuration change channel lost (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
