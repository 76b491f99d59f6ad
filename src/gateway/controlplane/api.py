"""The admin API: JSON over HTTP under /api/v1/, admin credentials as bearer.

Handlers translate HTTP to `service` calls and back; they hold no business
rules. Errors share one shape: `{"error": {"code", "message", "details"?}}`
with 401, 403, 404, 409 or 422. After a successful write the configuration
change is signalled so every data-plane process reloads its snapshot.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import orjson
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth.keys import bearer_token
from gateway.auth.signin import SignIn
from gateway.config import KeysConfig, LimitSettings, RetentionConfig, UpstreamSettings
from gateway.controlplane import permissions, schemas, service
from gateway.controlplane import sessions, signin_api
from gateway.controlplane import lifecycle
from gateway.controlplane import system_config
from gateway.limits.bans import MAX_BAN_SECONDS, NeverBanned
from gateway.db.tables import HEALTH_STATES, TOOL_PIN_STATES, TRANSPORTS
from gateway.db.tables import ALERT_STATES
from gateway.records.audit import AdminDetails, AuditTrail
from gateway.registry import catalog
from gateway.registry.discovery import NotServed

if TYPE_CHECKING:
    from gateway.auth.key_usage import KeyUsage
    from gateway.auth.sealing import GatewaySecrets
    from gateway.limits.bans import Ban, BanList
    from gateway.records.writer import RecordWriter
    from gateway.records.retention import RetentionJob
    from gateway.registry.discovery import Discoverer

log = logging.getLogger("gateway.controlplane")

Handler = Callable[[web.Request, service.Actor], Awaitable[web.Response]]
# What a write handler wants done once its change is committed and this process's snapshot holds it.
AFTER_CHANGE = web.RequestKey("after_change", list)
# The authenticated caller of an admin call, for its audit entry.
ACTOR = web.RequestKey("actor", object)
MAX_PAGE = 500


def _encode_other(value: Any) -> Any:
    # asyncpg returns its own UUID subclass, which orjson does not take as a UUID.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=_encode_other, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC),
        status=status,
        content_type="application/json",
    )


def _error(status: int, code: str, message: str, details: list | None = None, headers=None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    response = _json({"error": error}, status)
    if headers:
        response.headers.update(headers)
    return response


class ControlPlane:
    # The audit trail (records/audit.py) and the writer its entries go through, set by app.py; with
    # none, admin calls write no audit entries.
    audit: AuditTrail | None = None
    writer: RecordWriter | None = None

    def __init__(
        self,
        engine: AsyncEngine,
        on_change: Callable[[], Awaitable[None]],
        *,
        secrets: GatewaySecrets | None = None,
        keys: KeysConfig | None = None,
        key_usage: KeyUsage | None = None,
        signin: SignIn | None = None,
        discoverer: Discoverer | None = None,
        limit_defaults: LimitSettings | None = None,
        bans: BanList | None = None,
        upstream_defaults: UpstreamSettings | None = None,
        retention: RetentionJob | None = None,
        retention_defaults: RetentionConfig | None = None,
    ) -> None:
        self.engine = engine
        # The `[upstreams]` section: a server's health thresholds where it sets none of its own.
        self.upstream_defaults = upstream_defaults or UpstreamSettings()
        # The `[limits]` section: what /rate-limits reports where no override applies.
        self.limit_defaults = limit_defaults or LimitSettings()
        self.on_change = on_change
        self.secrets = secrets  # seals upstream credentials, finds imported legacy keys
        self.keys = keys or KeysConfig()
        self.key_usage = key_usage  # admin keys' last_used_at, like the data plane's
        self.signin = signin_api.SigninRoutes(engine, signin)  # /auth/*; sessions work wherever keys do
        self.bans = bans  # per-address bans (limits/bans.py); None when [limits] is off
        self.discoverer = discoverer  # capability discovery (registry/discovery.py); None: not in this process
        self.retention = retention  # the retention job (records/retention.py), for "run now"; None: not here
        self.retention_defaults = retention_defaults or RetentionConfig()  # the [retention] section's days

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/api/v1/openapi.json", _public(self.openapi))
        r.add_post("/api/v1/tenants", self._admin(self.create_tenant, writes=True, action="tenants.create"))
        r.add_get("/api/v1/tenants", self._admin(self.list_tenants, action="tenants.read"))
        r.add_get("/api/v1/tenants/{id}", self._admin(self.get_tenant, action="tenants.read"))
        r.add_patch("/api/v1/tenants/{id}", self._admin(self.update_tenant, writes=True, action="tenants.update"))
        r.add_post("/api/v1/users", self._admin(self.create_user, writes=True, action="users.write"))
        r.add_get("/api/v1/users", self._admin(self.list_users, action="users.read"))
        r.add_patch("/api/v1/users/{id}", self._admin(self.update_user, writes=True, action="users.write"))
        r.add_post("/api/v1/api-keys", self._admin(self.create_api_key, writes=True, action="keys.write"))
        r.add_get("/api/v1/api-keys", self._admin(self.list_api_keys, action="keys.read"))
        r.add_post("/api/v1/api-keys/import", self._admin(self.import_api_key, writes=True, action="keys.import"))
        r.add_delete("/api/v1/api-keys/{id}", self._admin(self.revoke_api_key, writes=True, action="keys.write"))
        r.add_post(
            "/api/v1/api-keys/{id}/rotate", self._admin(self.rotate_api_key, writes=True, action="keys.write")
        )
        r.add_post("/api/v1/servers", self._admin(self.create_server, writes=True, action="servers.write"))
        r.add_get("/api/v1/servers", self._admin(self.list_servers, action="servers.read"))
        r.add_get("/api/v1/servers/{id}", self._admin(self.get_server, action="servers.read"))
        r.add_put("/api/v1/servers/{id}/auth", self._admin(self.set_server_auth, writes=True, action="servers.write"))
        # The registry: change and unregister servers, what discovery found, tool-definition approval.
        r.add_patch("/api/v1/servers/{id}", self._admin(self.update_server, writes=True, action="servers.write"))
        r.add_delete("/api/v1/servers/{id}", self._admin(self.delete_server, writes=True, action="servers.write"))
        for kind in catalog.KINDS:
            r.add_get(f"/api/v1/servers/{{id}}/{kind}",
                      self._admin(functools.partial(self.list_server_items, kind=kind), action="servers.read"))
        r.add_post("/api/v1/servers/{id}/discover", self._admin(self.discover_server, action="servers.write"))
        r.add_post(
            "/api/v1/servers/{id}/tools/{name}/approve",
            self._admin(self.approve_tool, writes=True, action="servers.write"),
        )
        r.add_get("/api/v1/servers/{id}/health", self._admin(self.get_server_health, action="servers.health"))
        r.add_put(
            "/api/v1/servers/{id}/maintenance",
            self._admin(self.set_server_maintenance, writes=True, action="servers.maintenance"),
        )
        r.add_get("/api/v1/analytics/server-health", self._admin(self.analytics_server_health, action="analytics.read"))
        r.add_get(
            "/api/v1/analytics/request-performance",
            self._admin(self.analytics_request_performance, action="analytics.read"),
        )
        r.add_get(
            "/api/v1/analytics/tenant-usage/{tenant_id}",
            self._admin(self.analytics_tenant_usage, action="analytics.read"),
        )
        r.add_get("/api/v1/analytics/database", self._admin(self.analytics_database, action="analytics.database"))
        r.add_post("/api/v1/access-rules", self._admin(self.create_access_rule, writes=True))
        r.add_get("/api/v1/access-rules", self._admin(self.list_access_rules))
        r.add_get("/api/v1/access-rules/{id}", self._admin(self.get_access_rule))
        r.add_delete("/api/v1/access-rules/{id}", self._admin(self.delete_access_rule, writes=True))
        r.add_post("/api/v1/routing-rules", self._admin(self.create_routing_rule, writes=True, action="routing.write"))
        r.add_get("/api/v1/routing-rules", self._admin(self.list_routing_rules, action="routing.read"))
        r.add_get("/api/v1/routing-rules/{id}", self._admin(self.get_routing_rule, action="routing.read"))
        r.add_patch(
            "/api/v1/routing-rules/{id}", self._admin(self.update_routing_rule, writes=True, action="routing.write")
        )
        r.add_delete(
            "/api/v1/routing-rules/{id}", self._admin(self.delete_routing_rule, writes=True, action="routing.write")
        )
        # Retention policies and alert rules: the data plane does not read them (the jobs read the database),
        # so their writes need no version bump nor change signal (writes=False).
        r.add_get("/api/v1/retention-policies", self._admin(self.list_retention_policies, action="retention.read"))
        r.add_post("/api/v1/retention-policies", self._admin(self.create_retention_policy, action="retention.write"))
        r.add_post("/api/v1/retention-policies/run", self._admin(self.run_retention, action="retention.run"))
        r.add_patch(
            "/api/v1/retention-policies/{id}", self._admin(self.update_retention_policy, action="retention.write")
        )
        r.add_delete(
            "/api/v1/retention-policies/{id}", self._admin(self.delete_retention_policy, action="retention.write")
        )
        r.add_get("/api/v1/alerts", self._admin(self.list_alert_rules, action="alerts.read"))
        r.add_post("/api/v1/alerts", self._admin(self.create_alert_rule, action="alerts.write"))
        r.add_get("/api/v1/alerts/{id}", self._admin(self.get_alert_rule, action="alerts.read"))
        r.add_patch("/api/v1/alerts/{id}", self._admin(self.update_alert_rule, action="alerts.write"))
        r.add_delete("/api/v1/alerts/{id}", self._admin(self.delete_alert_rule, action="alerts.write"))
        r.add_get("/api/v1/alerts/{id}/events", self._admin(self.list_alert_events, action="alerts.read"))
        r.add_get("/api/v1/sessions", self._admin(self.list_sessions, action="sessions.read"))
        r.add_delete("/api/v1/sessions/{id}", self._admin(self.revoke_session, action="sessions.revoke"))
        r.add_get("/api/v1/rate-limits", self._admin(self.get_rate_limits, action="limits.read"))
        r.add_patch("/api/v1/rate-limits", self._admin(self.update_rate_limits, writes=True, action="limits.write"))
        r.add_delete("/api/v1/rate-limits", self._admin(self.reset_rate_limits, writes=True, action="limits.write"))
        r.add_get("/api/v1/bans", self._admin(self.list_bans, action="bans.read"))
        r.add_post("/api/v1/bans", self._admin(self.create_ban, action="bans.write"))
        r.add_delete("/api/v1/bans/{address}", self._admin(self.lift_ban, action="bans.write"))
        r.add_get("/api/v1/config", self._admin(self.list_config, action="config.read"))
        r.add_get("/api/v1/config/{key}", self._admin(self.get_config, action="config.read"))
        r.add_put("/api/v1/config/{key}", self._admin(self.set_config, writes=True, action="config.write"))
        r.add_delete("/api/v1/config/{key}", self._admin(self.delete_config, writes=True, action="config.write"))
        r.add_get("/api/v1/config/{key}/history", self._admin(self.config_history, action="config.read"))
        self.signin.audit, self.signin.writer = self.audit, self.writer  # sign-in and sign-out entries
        self.signin.add_routes(r)
        return app

    def _admin(
        self, handler: Handler, *, writes: bool = False, action: str | None = None
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Authenticate the caller, check `action` against the permission table, run the handler, map errors.

        `action` names a row of `permissions.PERMISSIONS`; a route without one
        gets `permissions.STRICT` (a tenant ADMIN with the `admin` scope).
        """
        if action is not None and action not in permissions.PERMISSIONS:
            raise ValueError(f"unknown action {action!r}: add it to controlplane/permissions.py")

        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.Response:
            token = bearer_token(request.headers.get("Authorization"))
            challenge = {"WWW-Authenticate": 'Bearer realm="mcp-gateway-admin"'}
            try:
                if token is None:
                    token = self.signin.cookie_credential(request)  # a browser's sign-in session
                if sessions.is_session_token(token):
                    actor = await sessions.authenticate(self.engine, token)
                else:
                    actor = await service.authenticate_admin(
                        self.engine, token, legacy_digest=self.secrets.legacy_digest if self.secrets else None
                    )
            except service.Forbidden as exc:
                return _error(403, "forbidden", str(exc))
            except service.Unauthenticated as exc:
                return _error(401, "unauthenticated", str(exc), headers=challenge)
            if actor is None:
                return _error(401, "unauthenticated", "a valid admin API key is required as a bearer token",
                              headers=challenge)
            if self.key_usage is not None and actor.api_key_id is not None:
                self.key_usage.note(actor.api_key_id)
            request[ACTOR] = actor  # authenticated: the call gets an audit entry
            try:
                actor = actor.permit(action)
                response = await handler(request, actor)
            except schemas.ValidationFailed as exc:
                return _error(422, "validation_failed", "the request has invalid fields", exc.errors)
            except service.NotFound as exc:
                return _error(404, "not_found", str(exc))
            except service.Conflict as exc:
                return _error(409, "conflict", str(exc))
            except service.Forbidden as exc:
                return _error(403, "forbidden", str(exc))
            except web.HTTPRequestEntityTooLarge:
                return _error(413, "too_large", "the request body is larger than 1 MiB")
            if writes and response.status < 300:
                await self.on_change()
                for after_change in request.get(AFTER_CHANGE, ()):
                    after_change()  # what needs the new configuration loaded (discovery of a server)
            return response

        wrapped.permission = action  # type: ignore[attr-defined] - read by the route table test
        if self.audit is None:
            return wrapped
        audit_action = "admin." + (action or handler.__name__)

        @functools.wraps(handler)
        async def audited(request: web.Request) -> web.StreamResponse:
            # One audit entry per authenticated call, whatever its answer (records/audit.py).
            started = time.perf_counter()
            response = None
            try:
                response = await wrapped(request)
                return response
            finally:
                actor = request.get(ACTOR)
                if actor is not None:
                    await self._audit(request, actor, audit_action, response, started)

        audited.permission = action  # type: ignore[attr-defined]
        return audited

    async def _audit(self, request: web.Request, actor: service.Actor, action: str,
                     response: web.StreamResponse | None, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        status = response.status if response is not None else 500  # None: the handler raised
        try:
            body = await request.read() if request.body_exists else b""
        except Exception:  # noqa: BLE001 - too large or cut off: the entry says so
            body = b'"[not read]"'
        kind = request.path.removeprefix("/api/v1/").split("/", 1)[0] or None
        resource = next((request.match_info[name] for name in ("id", "address", "key", "tenant_id")
                         if name in request.match_info), None)
        error = None
        answer = getattr(response, "body", None) if response is not None else None
        if isinstance(answer, bytes) and (status >= 400 or (resource is None and status == 201)):
            try:
                decoded = orjson.loads(answer)
            except orjson.JSONDecodeError:
                decoded = None
            if isinstance(decoded, dict):
                if status >= 400 and isinstance(decoded.get("error"), dict):
                    error = {k: decoded["error"][k] for k in ("code", "message") if k in decoded["error"]}
                elif isinstance(decoded.get("id"), str):
                    resource = decoded["id"]  # what a create made (never more of the answer: it may hold a key)
        elif status >= 400:
            error = {"code": "internal_error"} if response is None else None
        details = AdminDetails(request.method, request.path, dict(request.query), body, status, error)
        self.writer.submit("audit_logs", self.audit.admin_row(
            actor, action, kind, resource, details, status >= 400, status if status >= 400 else None, elapsed_ms,
            request.remote,
        ))

    # -- tenants -------------------------------------------------------------------------------
    async def create_tenant(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.TenantCreate, await request.read())
        return _json(await service.create_tenant(self.engine, actor, body), 201)

    async def list_tenants(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        return _page(await service.list_tenants(self.engine, actor, limit=limit, after=after), limit)

    async def get_tenant(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.get_tenant(self.engine, actor, _path_id(request, "tenant")))

    async def update_tenant(self, request: web.Request, actor: service.Actor) -> web.Response:
        tenant_id = _path_id(request, "tenant")
        body = schemas.validate(schemas.TenantUpdate, await request.read())
        return _json(await service.update_tenant(self.engine, actor, tenant_id, body))

    # -- users ---------------------------------------------------------------------------------
    async def create_user(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.UserCreate, await request.read())
        return _json(await service.create_user(self.engine, actor, body), 201)

    async def list_users(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        return _page(await service.list_users(self.engine, actor, limit=limit, after=after), limit)

    async def update_user(self, request: web.Request, actor: service.Actor) -> web.Response:
        user_id = _path_id(request, "user")
        body = schemas.validate(schemas.UserUpdate, await request.read())
        return _json(await service.update_user(self.engine, actor, user_id, body))

    # -- API keys ------------------------------------------------------------------------------
    async def create_api_key(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.ApiKeyCreate, await request.read())
        return _json(await service.create_api_key(self.engine, actor, body), 201)

    async def list_api_keys(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        return _page(await service.list_api_keys(self.engine, actor, limit=limit, after=after), limit)

    async def revoke_api_key(self, request: web.Request, actor: service.Actor) -> web.Response:
        key_id = _path_id(request, "API key")
        return _json(await service.revoke_api_key(self.engine, actor, key_id))

    async def rotate_api_key(self, request: web.Request, actor: service.Actor) -> web.Response:
        key_id = _path_id(request, "API key")
        raw = await request.read()
        body = schemas.validate(schemas.ApiKeyRotate, raw) if raw.strip() else schemas.ApiKeyRotate()
        rotated = await service.rotate_api_key(
            self.engine, actor, key_id, body, default_grace=self.keys.rotation_grace,
            max_grace=self.keys.rotation_grace_max,
        )
        return _json(rotated, 201)

    async def import_api_key(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.ApiKeyImport, await request.read())
        return _json(await service.import_api_key(self.engine, actor, body, self._secrets()), 201)

    def _secrets(self) -> GatewaySecrets:
        if self.secrets is None:  # pragma: no cover - app.py always passes them
            raise service.Conflict("this admin API runs without the gateway's secrets key")
        return self.secrets

    # -- servers -------------------------------------------------------------------------------
    async def create_server(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.ServerCreate, await request.read())
        server = await service.create_server(self.engine, actor, body, self.secrets)
        self._discover_after_change(request, server["id"])
        return _json(server, 201)

    async def set_server_auth(self, request: web.Request, actor: service.Actor) -> web.Response:
        server_id = _path_id(request, "server")
        body = schemas.validate(schemas.ServerAuthUpdate, await request.read())
        return _json(await service.set_server_auth(self.engine, actor, server_id, body, self._secrets()))

    async def list_servers(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        tenant = _uuid_param(request, "tenant_id")
        items = await service.list_servers(
            self.engine, actor, limit=limit, after=after, tenant_id=tenant, **_server_filters(request)
        )
        return _page(items, limit)

    # -- the registry: changes, discovery, pinning (registry/discovery.py, registry/catalog.py) -------
    async def update_server(self, request: web.Request, actor: service.Actor) -> web.Response:
        server_id = _path_id(request, "server")
        body = schemas.validate(schemas.ServerUpdate, await request.read())
        # A changed endpoint, transport or credential is discovered again by whichever process sees it
        # first in its snapshot (registry/discovery.py), this one included.
        return _json(await service.update_server(self.engine, actor, server_id, body, self.upstream_defaults))

    async def delete_server(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.delete_server(self.engine, actor, _path_id(request, "server")))

    async def list_server_items(self, request: web.Request, actor: service.Actor, *, kind: str) -> web.Response:
        server_id = _path_id(request, "server")
        limit, after = _paging(request)
        pin_status = request.query.get("pin_status")
        if kind != "tools" and pin_status is not None:
            raise schemas.ValidationFailed([{"field": "pin_status", "message": "only tools are pinned"}])
        if pin_status is not None and pin_status not in TOOL_PIN_STATES:
            raise schemas.ValidationFailed(
                [{"field": "pin_status", "message": f"must be one of {', '.join(TOOL_PIN_STATES)}"}]
            )
        items = await catalog.list_items(
            self.engine, actor, server_id, kind, limit=limit, after=after, pin_status=pin_status
        )
        return _page(items, limit)

    async def discover_server(self, request: web.Request, actor: service.Actor) -> web.Response:
        server_id = _path_id(request, "server")
        server = await service.get_server(self.engine, actor, server_id)  # another tenant's: 404
        if self.discoverer is None:
            raise service.Conflict("capability discovery does not run in this process")
        try:
            outcome = await self.discoverer.discover(server_id)
        except NotServed as exc:
            raise service.Conflict(f"server '{server['name']}' cannot be discovered: {exc}") from None
        if not outcome.ok:
            return _error(502, "discovery_failed", f"discovering server '{server['name']}' failed: {outcome.error}")
        return _json(outcome.as_dict())

    async def approve_tool(self, request: web.Request, actor: service.Actor) -> web.Response:
        server_id = _path_id(request, "server")
        raw = await request.read()
        body = schemas.validate(schemas.ToolApproval, raw) if raw.strip() else schemas.ToolApproval()
        tool = await catalog.approve_tool(
            self.engine, actor, server_id, request.match_info["name"], expected_hash=body.definition_hash
        )
        log.info("user %s approved the definition %s of tool %r on server %s", actor.user_id,
                 tool["definition_hash"][:12], tool["name"], server_id)
        return _json(tool)

    def _discover_after_change(self, request: web.Request, server_id: uuid.UUID) -> None:
        """Ask for a discovery of the server once the change is committed and this process's snapshot has it."""
        if self.discoverer is not None:
            request.setdefault(AFTER_CHANGE, []).append(functools.partial(self.discoverer.request, server_id))

    async def get_server(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.get_server(self.engine, actor, _path_id(request, "server")))

    # -- server health (registry/health.py) ----------------------------------------------------
    async def get_server_health(self, request: web.Request, actor: service.Actor) -> web.Response:
        server_id = _path_id(request, "server")
        return _json(await service.get_server_health(self.engine, actor, server_id, self.upstream_defaults))

    async def set_server_maintenance(self, request: web.Request, actor: service.Actor) -> web.Response:
        server_id = _path_id(request, "server")
        body = schemas.validate(schemas.ServerMaintenance, await request.read())
        return _json(
            await service.set_server_maintenance(self.engine, actor, server_id, body, self.upstream_defaults)
        )

    # -- analytics (records/analytics.py) -------------------------------------------------------
    async def analytics_server_health(self, request: web.Request, actor: service.Actor) -> web.Response:
        tenant = _uuid_param(request, "tenant_id")
        return _json(await service.analytics_server_health(self.engine, actor, tenant_id=tenant))

    async def analytics_request_performance(self, request: web.Request, actor: service.Actor) -> web.Response:
        hours = schemas.analytics_hours(request.query.get("hours"))
        tenant = _uuid_param(request, "tenant_id")
        return _json(await service.analytics_request_performance(self.engine, actor, hours=hours, tenant_id=tenant))

    async def analytics_tenant_usage(self, request: web.Request, actor: service.Actor) -> web.Response:
        hours = schemas.analytics_hours(request.query.get("hours"))
        try:
            tenant_id = uuid.UUID(request.match_info["tenant_id"])
        except ValueError:
            raise service.NotFound("tenant not found") from None
        return _json(await service.analytics_tenant_usage(self.engine, actor, tenant_id, hours=hours))

    async def analytics_database(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.analytics_database(self.engine, actor))

    # -- access rules ------------------------------------------------------------------------
    async def create_access_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.AccessRuleCreate, await request.read())
        return _json(await service.create_access_rule(self.engine, actor, body), 201)

    async def list_access_rules(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        tenant, server = _uuid_param(request, "tenant_id"), _uuid_param(request, "server_id")
        items = await service.list_access_rules(
            self.engine, actor, limit=limit, after=after, tenant_id=tenant, server_id=server
        )
        return _page(items, limit)

    async def get_access_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.get_access_rule(self.engine, actor, _path_id(request, "access rule")))

    async def delete_access_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.delete_access_rule(self.engine, actor, _path_id(request, "access rule")))

    # -- routing rules (registry/routing.py) -----------------------------------------------------
    async def create_routing_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.RoutingRuleCreate, await request.read())
        return _json(await service.create_routing_rule(self.engine, actor, body), 201)

    async def list_routing_rules(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        tenant = _uuid_param(request, "tenant_id")
        return _page(await service.list_routing_rules(self.engine, actor, limit=limit, after=after, tenant_id=tenant),
                     limit)

    async def get_routing_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.get_routing_rule(self.engine, actor, _path_id(request, "routing rule")))

    async def update_routing_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        rule_id = _path_id(request, "routing rule")
        body = schemas.validate(schemas.RoutingRuleUpdate, await request.read())
        return _json(await service.update_routing_rule(self.engine, actor, rule_id, body))

    async def delete_routing_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.delete_routing_rule(self.engine, actor, _path_id(request, "routing rule")))

    # -- retention policies (records/retention.py, controlplane/lifecycle.py) ---------------------
    async def list_retention_policies(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        tenant = _uuid_param(request, "tenant_id")
        items = await lifecycle.list_retention_policies(self.engine, actor, limit=limit, after=after, tenant_id=tenant)
        return _json({"items": items, "next_cursor": str(items[-1]["id"]) if len(items) == limit else None,
                      "in_force": await lifecycle.in_force(self.engine, actor, self.retention_defaults, tenant)})

    async def create_retention_policy(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.RetentionPolicyCreate, await request.read())
        return _json(await lifecycle.create_retention_policy(self.engine, actor, body, self.retention_defaults), 201)

    async def update_retention_policy(self, request: web.Request, actor: service.Actor) -> web.Response:
        policy_id = _path_id(request, "retention policy")
        body = schemas.validate(schemas.RetentionPolicyUpdate, await request.read())
        return _json(await lifecycle.update_retention_policy(self.engine, actor, policy_id, body,
                                                             self.retention_defaults))

    async def delete_retention_policy(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await lifecycle.delete_retention_policy(self.engine, actor, _path_id(request, "retention policy")))

    async def run_retention(self, request: web.Request, actor: service.Actor) -> web.Response:
        from gateway.records.retention import RetentionBusy

        if self.retention is None:
            raise service.Conflict("the retention job does not run in this process")
        try:
            report = await self.retention.run_now()
        except RetentionBusy as exc:
            raise service.Conflict(f"{exc}; try again when it is done") from None
        log.info("operator %s ran retention: %d records deleted", actor.user_id, sum(report.deleted.values()))
        return _json(report.as_dict())

    # -- alert rules and their events (records/alerts.py, controlplane/lifecycle.py) ---------------
    async def list_alert_rules(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        tenant, server = _uuid_param(request, "tenant_id"), _uuid_param(request, "server_id")
        items = await lifecycle.list_alert_rules(self.engine, actor, limit=limit, after=after, tenant_id=tenant,
                                                 server_id=server)
        return _page(items, limit)

    async def create_alert_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.AlertRuleCreate, await request.read())
        return _json(await lifecycle.create_alert_rule(self.engine, actor, body), 201)

    async def get_alert_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await lifecycle.get_alert_rule(self.engine, actor, _path_id(request, "alert rule")))

    async def update_alert_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        rule_id = _path_id(request, "alert rule")
        body = schemas.validate(schemas.AlertRuleUpdate, await request.read())
        return _json(await lifecycle.update_alert_rule(self.engine, actor, rule_id, body))

    async def delete_alert_rule(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await lifecycle.delete_alert_rule(self.engine, actor, _path_id(request, "alert rule")))

    async def list_alert_events(self, request: web.Request, actor: service.Actor) -> web.Response:
        rule_id = _path_id(request, "alert rule")
        limit, after = _paging(request)
        state = request.query.get("state")
        if state is not None and state not in ALERT_STATES:
            raise schemas.ValidationFailed([{"field": "state", "message": f"must be one of {', '.join(ALERT_STATES)}"}])
        return _page(await lifecycle.list_alert_events(self.engine, actor, rule_id, limit=limit, after=after,
                                                       state=state), limit)

    # -- sign-in sessions ----------------------------------------------------------------------
    async def list_sessions(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        return _page(await sessions.list_sessions(self.engine, actor, limit=limit, after=after), limit)

    async def revoke_session(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await sessions.revoke_session(self.engine, actor, _path_id(request, "session")))

    # -- rate limits ---------------------------------------------------------------------------
    async def get_rate_limits(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.get_limit_settings(self.engine, actor, self.limit_defaults))

    async def update_rate_limits(self, request: web.Request, actor: service.Actor) -> web.Response:
        patch = schemas.validate_limit_patch(await request.read())
        return _json(await service.update_limit_settings(self.engine, actor, self.limit_defaults, patch))

    async def reset_rate_limits(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json(await service.reset_limit_settings(self.engine, actor, self.limit_defaults))

    # -- bans ----------------------------------------------------------------------------------
    # Not configuration: bans live in Redis (limits/bans.py), so no version bump follows a change.
    async def list_bans(self, request: web.Request, actor: service.Actor) -> web.Response:
        return _json({"items": [_ban_out(b) for b in await self._ban_list().list()], "next_cursor": None})

    async def create_ban(self, request: web.Request, actor: service.Actor) -> web.Response:
        bans = self._ban_list()
        body = schemas.validate(BanCreate, await request.read())
        seconds = bans.ban_seconds if body.seconds is None else body.seconds
        try:
            ban = await bans.ban(body.address, seconds, body.reason)
        except NeverBanned as exc:
            return _error(409, "conflict", str(exc))
        except ValueError as exc:
            return _error(400, "bad_address", str(exc))
        log.info("operator %s banned %s for %g s", actor.user_id, ban.address, seconds)
        return _json(_ban_out(ban), 201)

    async def lift_ban(self, request: web.Request, actor: service.Actor) -> web.Response:
        address = request.match_info["address"]
        try:
            lifted = await self._ban_list().lift(address)
        except ValueError as exc:
            return _error(400, "bad_address", str(exc))
        if not lifted:
            raise service.NotFound(f"{address} is not banned")
        log.info("operator %s lifted the ban on %s", actor.user_id, address)
        return web.Response(status=204)

    def _ban_list(self) -> BanList:
        if self.bans is None:
            raise service.Conflict("per-address bans are off: [limits] enabled is false")
        return self.bans

    # -- system configuration (controlplane/system_config.py) -----------------------------------
    async def list_config(self, request: web.Request, actor: service.Actor) -> web.Response:
        limit, after = _paging(request)
        category = request.query.get("category")
        if category is not None:
            try:
                msgspec.convert(category, schemas.ConfigCategory)
            except msgspec.ValidationError:
                raise schemas.ValidationFailed(
                    [{"field": "category", "message": f"must match {schemas.CONFIG_CATEGORY_PATTERN}"}]
                ) from None
        items = await system_config.list_settings(
            self.engine, actor, limit=limit, after=after, requested=_config_scope(request), category=category
        )
        return _page(items, limit)

    async def get_config(self, request: web.Request, actor: service.Actor) -> web.Response:
        key = request.match_info["key"]
        return _json(await system_config.get_effective(self.engine, actor, key, _config_scope(request)))

    async def set_config(self, request: web.Request, actor: service.Actor) -> web.Response:
        body = schemas.validate(schemas.ConfigSet, await request.read())
        key = request.match_info["key"]
        return _json(await system_config.set_setting(self.engine, actor, key, body, self._secrets()))

    async def delete_config(self, request: web.Request, actor: service.Actor) -> web.Response:
        key = request.match_info["key"]
        return _json(await system_config.delete_setting(self.engine, actor, key, _config_scope(request)))

    async def config_history(self, request: web.Request, actor: service.Actor) -> web.Response:
        # Newest first, paged by version: the cursor is the last version of the page.
        errors, limit, before = [], 100, None
        raw, cursor = request.query.get("limit"), request.query.get("cursor")
        if raw is not None and not (raw.isdigit() and 1 <= int(raw) <= MAX_PAGE):
            errors.append({"field": "limit", "message": f"must be an integer from 1 to {MAX_PAGE}"})
        elif raw is not None:
            limit = int(raw)
        if cursor and not (cursor.isdigit() and int(cursor) > 0):
            errors.append({"field": "cursor", "message": "is not a cursor this API returned"})
        elif cursor:
            before = int(cursor)
        if errors:
            raise schemas.ValidationFailed(errors)
        items = await system_config.history(self.engine, actor, request.match_info["key"], _config_scope(request),
                                            limit=limit, before=before)
        next_cursor = str(items[-1]["version"]) if len(items) == limit else None
        return _json({"items": items, "next_cursor": next_cursor})

    # -- OpenAPI -------------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())


class BanCreate(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/v1/bans: one address (IPv4 or IPv6, not a range), for `seconds` (default limits.ban_seconds)."""

    address: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_BAN_SECONDS)] | None = None
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)] = "banned by the operator"


def _ban_out(ban: Ban) -> dict[str, Any]:
    return {
        "address": ban.address,
        "reason": ban.reason,
        "until": datetime.fromtimestamp(ban.until, timezone.utc),
        "seconds_left": round(ban.seconds_left(), 3),
    }


def _public(handler: Callable[[web.Request], Awaitable[web.Response]]):
    """A route that answers without credentials (it describes the API, not its data)."""
    handler.__func__.permission = permissions.PUBLIC  # type: ignore[attr-defined]
    return handler


def _path_id(request: web.Request, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise service.NotFound(f"{what} not found") from None


def _config_scope(request: web.Request) -> system_config.Scope:
    """`tenant_id` of the config routes: a tenant's id, `default` (the deployment's value), or left out."""
    value = request.query.get("tenant_id")
    if value is None:
        return msgspec.UNSET
    if value == system_config.DEFAULT_SCOPE:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise schemas.ValidationFailed(
            [{"field": "tenant_id", "message": f"must be a tenant's UUID or '{system_config.DEFAULT_SCOPE}'"}]
        ) from None


def _uuid_param(request: web.Request, name: str) -> uuid.UUID | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise schemas.ValidationFailed([{"field": name, "message": "must be a UUID"}]) from None


def _server_filters(request: web.Request) -> dict[str, Any]:
    """GET /servers filters: tag (repeatable: every one), transport_type, health_status, tool (offering a
    tool of that name), name."""
    filters: dict[str, Any] = {}
    errors = []
    for name in ("tag", "transport_type", "health_status", "tool", "name"):
        for value in request.query.getall(name, []) if name == "tag" else [request.query.get(name)]:
            if value is None:
                continue
            if not 1 <= len(value) <= 255:
                errors.append({"field": name, "message": "must be 1 to 255 characters"})
            elif name == "transport_type" and value not in TRANSPORTS:
                errors.append({"field": name, "message": f"must be one of {', '.join(TRANSPORTS)}"})
            elif name == "health_status" and value not in HEALTH_STATES:
                errors.append({"field": name, "message": f"must be one of {', '.join(HEALTH_STATES)}"})
            elif name == "tag":
                filters.setdefault("tags", []).append(value)
            else:
                filters[name] = value
    if errors:
        raise schemas.ValidationFailed(errors)
    return filters


def _paging(request: web.Request) -> tuple[int, uuid.UUID | None]:
    errors = []
    limit = 100
    raw = request.query.get("limit")
    if raw is not None:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
            errors.append({"field": "limit", "message": f"must be an integer from 1 to {MAX_PAGE}"})
        else:
            limit = int(raw)
    after = None
    cursor = request.query.get("cursor")
    if cursor:
        try:
            after = uuid.UUID(cursor)
        except ValueError:
            errors.append({"field": "cursor", "message": "is not a cursor this API returned"})
    if errors:
        raise schemas.ValidationFailed(errors)
    return limit, after


def _page(items: list[dict], limit: int) -> web.Response:
    next_cursor = str(items[-1]["id"]) if len(items) == limit else None
    return _json({"items": items, "next_cursor": next_cursor})


def openapi_document() -> dict[str, Any]:
    def body(name: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    listing = {"200": {"description": "a page: {items, next_cursor}"}}
    created = {"201": {"description": "created"}, "422": {"description": "invalid fields, all listed"}}
    paging = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    ]
    document = {
        "openapi": "3.1.0",
        "info": {"title": "MCP gateway admin API", "version": "1"},
        "components": {
            "schemas": schemas.schema_components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/access-rules": {
                "post": {"requestBody": body("AccessRuleCreate"), "responses": created},
                "get": {
                    "parameters": paging + [
                        {"name": "tenant_id", "in": "query", "schema": {"type": "string", "format": "uuid"}},
                        {"name": "server_id", "in": "query", "schema": {"type": "string", "format": "uuid"}},
                    ],
                    "responses": listing,
                },
            },
            "/api/v1/access-rules/{id}": {
                "get": {"responses": {"200": {"description": "the rule"}}},
                "delete": {"responses": {"200": {"description": "deleted: the rule as it was"}}},
            },
            "/api/v1/tenants": {
                "post": {"requestBody": body("TenantCreate"), "responses": created},
                "get": {"parameters": paging, "responses": listing},
            },
            "/api/v1/users": {
                "post": {"requestBody": body("UserCreate"), "responses": created},
                "get": {"parameters": paging, "responses": listing},
            },
            "/api/v1/api-keys": {
                "post": {"requestBody": body("ApiKeyCreate"), "responses": created},
                "get": {"parameters": paging, "responses": listing},
            },
            "/api/v1/api-keys/{id}": {"delete": {"responses": {"200": {"description": "revoked"}}}},
            "/api/v1/api-keys/{id}/rotate": {
                "post": {
                    "requestBody": {**body("ApiKeyRotate"), "required": False},
                    "responses": {"201": {"description": "the new key (plaintext shown once); the old one "
                                                         "works until replaces.valid_until"},
                                  "409": {"description": "revoked, expired, or already rotated"}},
                },
            },
            "/api/v1/api-keys/import": {
                "post": {"requestBody": body("ApiKeyImport"), "responses": {**created, "409": {
                    "description": "this key is already imported"}}},
            },
            "/api/v1/tenants/{id}": {
                "get": {"responses": {"200": {"description": "the tenant"}}},
                "patch": {"requestBody": body("TenantUpdate"),
                          "responses": {"200": {"description": "the tenant as changed (operator only)"}}},
            },
            "/api/v1/users/{id}": {
                "patch": {"requestBody": body("UserUpdate"), "responses": {"200": {"description": "the user"}}},
            },
            "/api/v1/servers/{id}/auth": {
                "put": {"requestBody": body("ServerAuthUpdate"),
                        "responses": {"200": {"description": "the server; its credential is never shown"}}},
            },
            "/api/v1/servers": {
                "post": {"requestBody": body("ServerCreate"), "responses": created},
                "get": {"parameters": paging, "responses": listing},
            },
            "/api/v1/servers/{id}": {"get": {"responses": {"200": {"description": "the server"}}}},
            "/api/v1/servers/{id}/health": {"get": {"responses": {"200": {
                "description": "{server_id, name, status, checked_at, detail (the last judgement: source, probe, "
                               "latency_ms, error, consecutive_failures, consecutive_successes, traffic, "
                               "last_transition), avg_response_time, thresholds (the settings in force)}"}}}},
            "/api/v1/servers/{id}/maintenance": {"put": {
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": msgspec.json.schema(schemas.ServerMaintenance)}}},
                "responses": {"200": {"description": "the server's health after the change (true: MAINTENANCE, "
                                                     "never overridden by probes; false: UNKNOWN, probes resume)"},
                              "422": {"description": "invalid fields, all listed"}}}},
            "/api/v1/rate-limits": {
                "get": {"responses": {"200": {"description": "{limits (effective), overridden (keys), ignored "
                                                            "(stored overrides that no longer validate), defaults, "
                                                            "updated_by, updated_at, tenant_weights}"}}},
                "patch": {
                    "requestBody": {**body("LimitSettings"), "description": "any subset of the keys; null removes "
                                    "an override (the default applies again); roles and costs merge by entry"},
                    "responses": {"200": {"description": "as GET, after the change (operator only)"},
                                  "422": {"description": "unknown key, wrong type or out of range: nothing changed"}},
                },
                "delete": {"responses": {"200": {"description": "every override removed; as GET"}}},
            },
            "/api/v1/bans": {
                "get": {"responses": {"200": {"description": "every ban in force: {items: [{address, reason, until, "
                                                            "seconds_left}], next_cursor: null} (operator only)"}}},
                "post": {
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": msgspec.json.schema(BanCreate)}}},
                    "responses": {"201": {"description": "the ban, in force in every gateway process"},
                                  "400": {"description": "not a single IPv4 or IPv6 address"},
                                  "409": {"description": "the address is in limits.ip_allow: never banned"},
                                  "422": {"description": "invalid fields, all listed"}},
                },
            },
            "/api/v1/bans/{address}": {"delete": {"responses": {
                "204": {"description": "lifted in every gateway process"},
                "400": {"description": "not an IPv4 or IPv6 address"},
                "404": {"description": "the address is not banned"}}}},
            "/api/v1/sessions": {"get": {"parameters": paging, "responses": listing}},
            "/api/v1/sessions/{id}": {"delete": {"responses": {"200": {"description": "ended: the session"}}}},
            "/auth/login/{provider}": {"get": {"security": [], "responses": {"302": {"description": "to the provider"}}}},
            "/auth/callback/{provider}": {"get": {"security": [], "responses": {
                "200": {"description": "signed in: the session and its token (shown once), also set as a cookie"},
                "400": {"description": "bad or used state, or the provider refused"},
                "403": {"description": "no active gateway user for this account"}}}},
            "/auth/logout": {"post": {"responses": {"200": {"description": "the caller's session ended"}}}},
        },
    }
    for path, operations in _registry_paths(body, paging, listing).items():
        document["paths"].setdefault(path, {}).update(operations)
    document["paths"].update(_analytics_paths())
    document["paths"].update(_routing_paths(body, paging, listing))
    document["paths"].update(_lifecycle_paths(paging, listing))
    document["paths"].update(_config_paths(paging, listing))
    return document


def _config_paths(paging: list[dict], listing: dict) -> dict[str, dict]:
    """System configuration (controlplane/system_config.py): settings, tenant overrides, their history."""
    scope = {"name": "tenant_id", "in": "query", "schema": {"type": "string"},
             "description": "a tenant's UUID (its override; a tenant ADMIN: only its own) or 'default' (the "
                            "deployment's value); left out: the operator's is the deployment's value, a tenant "
                            "ADMIN's its own tenant's override"}
    key = {"name": "key", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": schemas.CONFIG_KEY_PATTERN}}
    invalid = {"422": {"description": "invalid fields, all listed (key, category, value over 64 KiB): nothing "
                                      "written"}}
    missing = {"404": {"description": "no such setting in this scope (also another tenant's override)"}}
    shown = ("sensitive values are never shown: value null, sensitive true, set true")
    return {
        "/api/v1/config": {"get": {
            "parameters": paging + [
                {**scope, "description": "a tenant's UUID: its overrides; 'default': the deployment's values; left "
                                         "out: everything within reach (a tenant ADMIN: the deployment's values "
                                         "and its own overrides)"},
                {"name": "category", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {**listing, **invalid},
            "description": f"stored settings ({shown})",
        }},
        "/api/v1/config/{key}": {
            "get": {"parameters": [key, {**scope, "description": "the tenant whose effective value is asked "
                                                                 "(default: the caller's); 'default': the "
                                                                 "deployment's value itself"}],
                    "responses": {"200": {"description": "the value in force: the tenant's override, else the "
                                                         f"deployment's value (source says which); {shown}"},
                                  **missing, **invalid}},
            "put": {"parameters": [key],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": msgspec.json.schema(schemas.ConfigSet)}}},
                    "responses": {"200": {"description": "the setting as stored (version + 1, a history row); a "
                                                         "runtime setting reaches every process within a second, "
                                                         "others apply after a restart"},
                                  "403": {"description": "a tenant ADMIN naming the deployment's value"},
                                  "404": {"description": "no such tenant (also another tenant)"}, **invalid}},
            "delete": {"parameters": [key, scope],
                       "responses": {"200": {"description": "deleted: the setting as it was"}, **missing}},
        },
        "/api/v1/config/{key}/history": {"get": {
            "parameters": [key, scope, *paging],
            "responses": {"200": {"description": "every change in this scope, newest first: {items: [{version, "
                                                 f"change (set|delete), value, sensitive, set, changed_by, "
                                                 f"created_at}}], next_cursor (a version)}}; {shown}"},
                          **missing, **invalid}}},
    }


def _lifecycle_paths(paging: list[dict], listing: dict) -> dict[str, dict]:
    """Retention policies (records/retention.py) and alert rules with their events (records/alerts.py)."""
    def body(cls: type) -> dict:
        return {"required": True, "content": {"application/json": {"schema": msgspec.json.schema(cls)}}}

    tenant = {"name": "tenant_id", "in": "query", "schema": {"type": "string", "format": "uuid"},
              "description": "this tenant's (operator)"}
    invalid = {"422": {"description": "invalid fields, all listed: nothing written"}}
    missing = {"404": {"description": "not found (also another tenant's)"}}
    return {
        "/api/v1/retention-policies": {
            "get": {"parameters": paging + [tenant], "responses": {"200": {
                "description": "{items, next_cursor, in_force: per table the days kept for the caller's tenant "
                               "(the operator: the tenant named, else tenants without a policy) and where that "
                               "comes from}"}}},
            "post": {"requestBody": body(schemas.RetentionPolicyCreate), "responses": {
                "201": {"description": "the policy; the next run applies it"}, **invalid,
                "409": {"description": "a policy for this table and tenant (or the deployment) exists"}}},
        },
        "/api/v1/retention-policies/{id}": {
            "patch": {"requestBody": body(schemas.RetentionPolicyUpdate),
                      "responses": {"200": {"description": "the policy as changed"}, **invalid, **missing}},
            "delete": {"responses": {"200": {"description": "deleted: the policy as it was"}, **missing}},
        },
        "/api/v1/retention-policies/run": {"post": {"responses": {
            "200": {"description": "{started_at, finished_at, deleted (per table), total, statements, by_tenant}"},
            "409": {"description": "a run is in progress (here or in another process)"}}}},
        "/api/v1/alerts": {
            "get": {"parameters": paging + [tenant, {"name": "server_id", "in": "query",
                                                      "schema": {"type": "string", "format": "uuid"}}],
                    "responses": listing},
            "post": {"requestBody": body(schemas.AlertRuleCreate), "responses": {
                "201": {"description": "the rule (firing: its events firing now)"}, **invalid,
                "409": {"description": "the tenant has an alert rule of this name"}}},
        },
        "/api/v1/alerts/{id}": {
            "get": {"responses": {"200": {"description": "the rule"}, **missing}},
            "patch": {"requestBody": body(schemas.AlertRuleUpdate),
                      "responses": {"200": {"description": "the rule as changed"}, **invalid, **missing}},
            "delete": {"responses": {"200": {"description": "deleted with its events: the rule as it was"},
                                     **missing}},
        },
        "/api/v1/alerts/{id}/events": {"get": {
            "parameters": paging + [{"name": "state", "in": "query", "schema": {"enum": list(ALERT_STATES)}}],
            "responses": {"200": {"description": "a page of the rule's events, newest first: {items, next_cursor}"},
                          **missing}}},
    }


def _routing_paths(body, paging: list[dict], listing: dict) -> dict[str, dict]:
    """Routing rules (registry/routing.py): which replica of a server answers a call."""
    tenant = {"name": "tenant_id", "in": "query", "schema": {"type": "string", "format": "uuid"},
              "description": "rules of this tenant (operator)"}
    invalid = {"422": {"description": "invalid fields, all listed (a target that is not a server of the rule's "
                                      "tenant, no replica at all, a bad strategy or weight): nothing written"}}
    named = {"409": {"description": "the tenant has a routing rule of this name"}}
    return {
        "/api/v1/routing-rules": {
            "post": {"requestBody": body("RoutingRuleCreate"),
                     "responses": {"201": {"description": "the rule; every gateway process routes by it within a "
                                                          "second"}, **invalid, **named}},
            "get": {"parameters": paging + [tenant], "responses": listing},
        },
        "/api/v1/routing-rules/{id}": {
            "get": {"responses": {"200": {"description": "the rule (targets with their server names)"},
                                  "404": {"description": "no such rule"}}},
            "patch": {"requestBody": body("RoutingRuleUpdate"),
                      "responses": {"200": {"description": "the rule as changed"}, **invalid, **named,
                                    "404": {"description": "no such rule"}}},
            "delete": {"responses": {"200": {"description": "deleted: the rule as it was"},
                                     "404": {"description": "no such rule"}}},
        },
    }


def _analytics_paths() -> dict[str, dict]:
    """Analytics (records/analytics.py): the same answers from PostgreSQL's SQL functions or SQLite."""
    hours = {"name": "hours", "in": "query", "description": "the window: the last N hours (default "
             f"{schemas.ANALYTICS_HOURS_DEFAULT})", "schema": {"type": "integer", "minimum": 1,
                                                               "maximum": schemas.ANALYTICS_HOURS_MAX}}
    tenant = {"name": "tenant_id", "in": "query", "schema": {"type": "string", "format": "uuid"},
              "description": "this tenant only (the operator; a tenant admin always sees its own)"}
    bad_hours = {"422": {"description": "hours is not a whole number from 1 to "
                                        f"{schemas.ANALYTICS_HOURS_MAX}"}}
    return {
        "/api/v1/analytics/server-health": {"get": {"parameters": [tenant], "responses": {"200": {
            "description": "{items: [{server_id, tenant_id, name, health_status, health_checked_at, "
                           "avg_response_time, requests, errors, error_rate (of the last hour)}], next_cursor: "
                           "null, as_of, window_hours: 1}"}}}},
        "/api/v1/analytics/request-performance": {"get": {"parameters": [hours, tenant], "responses": {"200": {
            "description": "{items: [{tenant_id, server_id, server_name, method, requests, errors, error_rate, "
                           "avg_ms, p50_ms, p95_ms, p99_ms}], next_cursor: null, as_of, hours}"}, **bad_hours}}},
        "/api/v1/analytics/tenant-usage/{tenant_id}": {"get": {"parameters": [hours], "responses": {
            "200": {"description": "{tenant_id, hours, as_of, requests, errors, error_rate, tools_used, users, "
                                   "top_tools: [{tool_name, calls, errors}], api_keys: [{api_key_id, name, "
                                   "requests_last_hour, rate_limit_per_hour, hour_used, requests_last_day, "
                                   "rate_limit_per_day, day_used}]}"},
            "404": {"description": "no such tenant within reach (another tenant's is not found alike)"},
            **bad_hours}}},
        "/api/v1/analytics/database": {"get": {"responses": {"200": {
            "description": "{dialect, database, size_bytes, tables, indexes} (operator only): on PostgreSQL per "
                           "table its live-row estimate, sizes, scans, changes and vacuums, per index its scans "
                           "and size; on SQLite exact row counts and free_bytes, no index statistics"}}}},
    }


def _registry_paths(body, paging: list[dict], listing: dict) -> dict[str, dict]:
    """The registry's routes: server filters, changes, what discovery found, approval of tool definitions."""
    def query(name: str, schema: dict, description: str) -> dict:
        return {"name": name, "in": "query", "schema": schema, "description": description}

    filters = [
        query("tenant_id", {"type": "string", "format": "uuid"}, "servers of this tenant (operator)"),
        query("tag", {"type": "string"}, "servers carrying this tag (repeat it: every one of them)"),
        query("transport_type", {"enum": list(TRANSPORTS)}, "servers of this transport"),
        query("health_status", {"enum": list(HEALTH_STATES)}, "servers in this health status"),
        query("tool", {"type": "string"}, "servers whose last discovery found a tool of this name"),
        query("name", {"type": "string"}, "the server of this name"),
    ]
    found = {"200": {"description": "a page: {items, next_cursor}"}, "404": {"description": "no such server"}}
    paths = {
        "/api/v1/servers": {"get": {"parameters": paging + filters, "responses": listing}},
        "/api/v1/servers/{id}": {
            "patch": {"requestBody": body("ServerUpdate"), "responses": {
                "200": {"description": "the server as changed; a changed endpoint is discovered again"},
                "422": {"description": "invalid fields (settings name the bad key): nothing changed"}}},
            "delete": {"responses": {"200": {"description": "unregistered: the server as it was (what discovery "
                                                            "found and the access rules naming it went with it)"}}},
        },
        "/api/v1/servers/{id}/discover": {"post": {"responses": {
            "200": {"description": "{server_id, ok, discovered_at, capabilities, counts, added, updated, removed, "
                                   "flagged (tools whose definition changed), restored, notes}"},
            "409": {"description": "the server is inactive (not served)"},
            "502": {"description": "the server could not be discovered; its last discovery is kept"}}}},
        "/api/v1/servers/{id}/tools/{name}/approve": {"post": {
            "requestBody": {**body("ToolApproval"), "required": False},
            "responses": {"200": {"description": "the tool, its current definition approved (no longer withheld)"},
                          "404": {"description": "no such server or tool"},
                          "409": {"description": "the definition changed again since the hash given"}}}},
    }
    for kind in catalog.KINDS:
        parameters = paging
        if kind == "tools":
            parameters = paging + [query("pin_status", {"enum": list(TOOL_PIN_STATES)}, "approved or changed")]
        paths[f"/api/v1/servers/{{id}}/{kind}"] = {"get": {"parameters": parameters, "responses": found}}
    return paths
