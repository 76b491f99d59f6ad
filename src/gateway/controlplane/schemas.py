"""Request bodies of the admin API, and validation that reports every bad field.

msgspec stops at the first error; an admin fixing a request wants them all.
`validate` decodes the JSON once, then converts field by field, collecting
one message per invalid or unknown field, and raises `ValidationFailed` (422).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from gateway.config import LimitSettings, UpstreamSettings
from gateway.db.tables import ACCESS_EFFECTS
from gateway.db.tables import HEALTH_STATES, ROLES, SCOPES, TENANT_STATES, TRANSPORTS, UPSTREAM_AUTH_KINDS
from gateway.db.tables import ROUTING_STRATEGIES
from gateway.db.tables import ALERT_METRICS, RETENTION_TABLES

Name = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"\S")]
ServerName = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Email = Annotated[str, Meta(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Role = Literal[ROLES]  # type: ignore[valid-type]
Scope = Literal[SCOPES]  # type: ignore[valid-type]
Transport = Literal[TRANSPORTS]  # type: ignore[valid-type]
Health = Literal[HEALTH_STATES]  # type: ignore[valid-type]
Tag = Annotated[str, Meta(min_length=1, max_length=64)]
TenantStatus = Literal[TENANT_STATES]  # type: ignore[valid-type]
Weight = Annotated[int, Meta(ge=1, le=1000)]
PerHour = Annotated[int, Meta(ge=1, le=100_000)]
PerDay = Annotated[int, Meta(ge=1, le=1_000_000)]
Unset = msgspec.UnsetType
UNSET = msgspec.UNSET
# An HTTP header name (RFC 9110 token) and a value without control characters (no CR/LF injection).
HeaderName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
HeaderValue = Annotated[str, Meta(min_length=1, max_length=8192, pattern=r"^[\x20-\x7e\t]+$")]
Secret = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^[\x20-\x7e]+$")]
# Headers the gateway sets itself on upstream requests: a credential may not replace them.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "accept", "connection", "keep-alive", "transfer-encoding", "te",
    "trailer", "upgrade", "proxy-connection", "expect", "mcp-session-id", "mcp-protocol-version", "mcp-method",
    "mcp-name", "last-event-id", "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
    "sec-websocket-extensions", "user-agent",
})


class ValidationFailed(Exception):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    settings: dict[str, Any] = {}
    weight: Weight = 100


class TenantUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH: only the fields given change. Suspending refuses every credential of the tenant."""

    status: TenantStatus | Unset = UNSET
    settings: dict[str, Any] | Unset = UNSET
    weight: Weight | Unset = UNSET


class UserCreate(msgspec.Struct, forbid_unknown_fields=True):
    username: Name
    email: Email
    tenant_id: uuid.UUID | None = None
    role: Role = "USER"


class UserUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH: only the fields given change. Deactivating refuses every key of the user."""

    role: Role | Unset = UNSET
    is_active: bool | Unset = UNSET
    email: Email | Unset = UNSET


class ApiKeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    name: Name
    scopes: Annotated[list[Scope], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["proxy"])
    rate_limit_per_hour: PerHour = 1000
    rate_limit_per_day: PerDay = 10000
    expires_at: datetime | None = None


class ApiKeyRotate(msgspec.Struct, forbid_unknown_fields=True):
    """How long the old key keeps working, in seconds.

    Default `keys.rotation_grace`; at most `keys.rotation_grace_max`.
    """

    grace_seconds: Annotated[int, Meta(ge=0)] | Unset = UNSET


class ApiKeyImport(msgspec.Struct, forbid_unknown_fields=True):
    """A legacy key (any format but the gateway's own) to accept as it is, mapped to a user with its own scopes."""

    user_id: uuid.UUID
    name: Name
    key: Annotated[str, Meta(min_length=1, max_length=512)]
    scopes: Annotated[list[Scope], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["proxy"])
    rate_limit_per_hour: PerHour = 1000
    rate_limit_per_day: PerDay = 10000
    expires_at: datetime | None = None


class NoAuth(msgspec.Struct, tag="none", tag_field="kind", forbid_unknown_fields=True):
    """The gateway sends no credential of its own to this server."""


class HeaderAuth(msgspec.Struct, tag="header", tag_field="kind", forbid_unknown_fields=True):
    """One static header on every upstream request, e.g. `Authorization: Bearer …` or `X-API-Key: …`."""

    header_name: HeaderName
    header_value: HeaderValue


class ClientCredentialsAuth(msgspec.Struct, tag="oauth2_client_credentials", tag_field="kind",
                            forbid_unknown_fields=True):
    """OAuth 2.0 client credentials (RFC 6749 4.4): the gateway gets a token, caches it until it expires."""

    token_url: Annotated[str, Meta(min_length=1, max_length=2048)]
    client_id: Secret
    client_secret: Secret
    scope: Annotated[str, Meta(max_length=1024, pattern=r"^[\x21\x23-\x5b\x5d-\x7e ]*$")] | None = None
    # How the client authenticates to the token endpoint (RFC 6749 2.3.1): HTTP Basic, or in the form body.
    client_auth: Literal["basic", "body"] = "basic"


UpstreamAuth = NoAuth | HeaderAuth | ClientCredentialsAuth
# PATCH bodies: an empty one is a mistake, not a no-op.
_NEEDS_A_FIELD = (TenantUpdate, UserUpdate)


class ServerAuthUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /servers/{id}/auth: replaces the server's credential (`{"kind": "none"}` removes it)."""

    auth: UpstreamAuth


class ServerCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: ServerName
    endpoint_url: Annotated[str, Meta(min_length=1, max_length=500)]
    tenant_id: uuid.UUID | None = None
    transport_type: Transport = "http"
    tags: Annotated[list[Tag], Meta(max_length=50)] = []
    description: Annotated[str, Meta(max_length=2000)] | None = None
    # Write-only: the admin API shows the kind and what is not secret, never the secret.
    auth: UpstreamAuth | None = None


class ServerMaintenance(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /servers/{id}/maintenance: true sets MAINTENANCE (probes stop); false returns to UNKNOWN (they resume)."""

    maintenance: bool


class ServerUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH /servers/{id}: only the fields given change. `settings` merges into the server's
    overrides of the `[upstreams]` settings (a null value removes that override)."""

    description: Annotated[str, Meta(max_length=2000)] | None | Unset = UNSET
    endpoint_url: Annotated[str, Meta(min_length=1, max_length=500)] | Unset = UNSET
    transport_type: Transport | Unset = UNSET
    tags: Annotated[list[Tag], Meta(max_length=50)] | Unset = UNSET
    settings: dict[str, Any] | Unset = UNSET
    is_active: bool | Unset = UNSET


_NEEDS_A_FIELD = (*_NEEDS_A_FIELD, ServerUpdate)


class ToolApproval(msgspec.Struct, forbid_unknown_fields=True):
    """POST /servers/{id}/tools/{name}/approve: optionally, the definition hash reviewed (409 if it moved on)."""

    definition_hash: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")] | None = None


# How a tenant wants tools whose definition changed since approval treated (tenants.settings "tool_pinning"):
# flagged for the admins only, or also withheld from the data plane until approved.
TOOL_PINNING = ("flag", "withhold")


# Globs (fnmatch syntax) over tool and prompt names, and over resource URIs: printable, no control characters.
NameGlob = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
UriGlob = Annotated[str, Meta(min_length=1, max_length=2048, pattern=r"^[^\x00-\x1f\x7f]+$")]
Effect = Literal[ACCESS_EFFECTS]  # type: ignore[valid-type]


class AccessRuleCreate(msgspec.Struct, forbid_unknown_fields=True):
    """An access rule (gateway/auth/access.py has the evaluation).

    Subject: at most one of `role`, `user_id`, `api_key_id`; none is the whole
    tenant. Object: `server_id` or `server_name` (neither: every server of the
    tenant), and at most one of `tool`, `resource`, `prompt` (a glob; none:
    everything on the server).
    """

    effect: Effect
    tenant_id: uuid.UUID | None = None
    role: Role | None = None
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    server_id: uuid.UUID | None = None
    server_name: ServerName | None = None
    tool: NameGlob | None = None
    resource: UriGlob | None = None
    prompt: NameGlob | None = None
    description: Annotated[str, Meta(max_length=2000)] | None = None


def _access_rule_problems(values: dict[str, Any]) -> list[dict[str, str]]:
    errors = []
    for group, what in ((("role", "user_id", "api_key_id"), "subject"), (("server_id", "server_name"), "server"),
                        (("tool", "resource", "prompt"), "object")):
        given = [name for name in group if values.get(name) is not None]
        for name in given[1:]:
            errors.append({"field": name, "message": f"give at most one {what}: {', '.join(given)} were given"})
    return errors


# Routing rules (registry/routing.py has the semantics): which replica of a server answers a call.
Strategy = Literal[ROUTING_STRATEGIES]  # type: ignore[valid-type]
Priority = Annotated[int, Meta(ge=0, le=10_000)]
RouteTags = Annotated[list[Tag], Meta(max_length=50)]


class RoutingTarget(msgspec.Struct, forbid_unknown_fields=True):
    """One replica: a server of the rule's tenant, and its share of the calls."""

    server_id: uuid.UUID
    weight: Weight = 1


Targets = Annotated[list[RoutingTarget], Meta(max_length=100)]


class RoutingRuleCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A routing rule: calls to a server matching `match_server` (glob), carrying every tag of `match_tags`,
    for a tool matching `match_tool` (glob; none: every call) go to one of the replicas: the servers in
    `targets` and the tenant's servers carrying every tag of `target_tags` (at least one of the two).
    The enabled rule with the lowest `priority` (then name) decides."""

    name: Name
    tenant_id: uuid.UUID | None = None
    priority: Priority = 100
    enabled: bool = True
    match_server: NameGlob | None = None
    match_tool: NameGlob | None = None
    match_tags: RouteTags = []
    strategy: Strategy = "weighted_round_robin"
    targets: Targets = []
    target_tags: RouteTags = []
    description: Annotated[str, Meta(max_length=2000)] | None = None


class RoutingRuleUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH /routing-rules/{id}: only the fields given change (null clears a glob or the description)."""

    name: Name | Unset = UNSET
    priority: Priority | Unset = UNSET
    enabled: bool | Unset = UNSET
    match_server: NameGlob | None | Unset = UNSET
    match_tool: NameGlob | None | Unset = UNSET
    match_tags: RouteTags | Unset = UNSET
    strategy: Strategy | Unset = UNSET
    targets: Targets | Unset = UNSET
    target_tags: RouteTags | Unset = UNSET
    description: Annotated[str, Meta(max_length=2000)] | None | Unset = UNSET


_NEEDS_A_FIELD = (*_NEEDS_A_FIELD, RoutingRuleUpdate)


def _routing_rule_problems(values: dict[str, Any], *, creating: bool) -> list[dict[str, str]]:
    """What is wrong with a rule's replicas as given: a server listed twice; on creation, no replica at all
    (a change is checked against the stored rule, and whether servers exist, by the service)."""
    errors = []
    targets, target_tags = values.get("targets") or [], values.get("target_tags") or []
    if creating and not targets and not target_tags:
        errors.append({"field": "targets", "message": "give at least one target server or target tag "
                                                      "(targets and target_tags are both empty)"})
    seen: set[uuid.UUID] = set()
    for i, target in enumerate(targets):
        if target.server_id in seen:
            errors.append({"field": f"targets[{i}].server_id", "message": "names a server already listed"})
        seen.add(target.server_id)
    return errors


# System configuration (controlplane/system_config.py): a setting's key (in the path) and category.
CONFIG_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,127}$"
CONFIG_CATEGORY_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
MAX_CONFIG_VALUE = 65_536  # bytes of the value as JSON
ConfigCategory = Annotated[str, Meta(pattern=CONFIG_CATEGORY_PATTERN)]


class ConfigSet(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /config/{key}: the value (any JSON, up to 64 KiB encoded), and what a new setting is.

    Fields left out keep what the stored row says (or, for a new tenant
    override, what the deployment's value says; else the defaults below).
    `tenant_id` left out: the caller's scope (the operator: the deployment's
    value; a tenant ADMIN: its own tenant's override); null: the deployment's
    value (the operator only); a tenant's id: that tenant's override.
    """

    value: Any
    category: ConfigCategory | Unset = UNSET  # default "general"
    sensitive: bool | Unset = UNSET  # default false; true: stored sealed, never shown again
    runtime: bool | Unset = UNSET  # default true; false: applies after a restart
    description: Annotated[str, Meta(max_length=1000)] | None | Unset = UNSET
    tenant_id: uuid.UUID | None | Unset = UNSET


def config_key_problem(key: str) -> str | None:
    """Why `key` cannot name a setting, or None."""
    if re.fullmatch(CONFIG_KEY_PATTERN, key) is None:
        return (f"must match {CONFIG_KEY_PATTERN}: a lowercase letter, then up to 127 lowercase letters, digits, "
                "'_', '.' or '-'")
    return None


def _config_value_problems(values: dict[str, Any]) -> list[dict[str, str]]:
    if "value" in values and len(msgspec.json.encode(values["value"])) > MAX_CONFIG_VALUE:
        return [{"field": "value", "message": f"is larger than {MAX_CONFIG_VALUE // 1024} KiB of JSON"}]
    return []


def _extra_checks(cls: type, values: dict[str, Any]) -> list[dict[str, str]]:
    errors = []
    if cls is ConfigSet:
        errors.extend(_config_value_problems(values))
    if cls is AccessRuleCreate:
        errors.extend(_access_rule_problems(values))
    if cls is ServerCreate and isinstance(values.get("endpoint_url"), str):
        problems = endpoint_problems(values.get("transport_type", "http"), values["endpoint_url"])
        errors.extend({"field": "endpoint_url", "message": m} for m in problems)
    if cls is ServerUpdate and isinstance(values.get("settings"), dict):
        errors.extend(server_settings_problems(values["settings"]))
    if cls in (TenantCreate, TenantUpdate) and isinstance(values.get("settings"), dict):
        pinning = values["settings"].get("tool_pinning", "flag")
        if pinning not in TOOL_PINNING:
            errors.append({"field": "settings.tool_pinning", "message": f"must be one of {', '.join(TOOL_PINNING)}"})
        # Names redacted from the tenant's audit entries besides the built-in ones (records/sanitize.py).
        redact = values["settings"].get("audit_redact_keys", [])
        if not (isinstance(redact, list) and len(redact) <= 100
                and all(isinstance(n, str) and 1 <= len(n.strip()) <= 64 for n in redact)):
            errors.append({"field": "settings.audit_redact_keys",
                           "message": "must be a list of at most 100 names of 1 to 64 characters"})
    if cls is ServerCreate and "__" in values.get("name", ""):
        errors.append({"field": "name", "message": "must not contain '__' (it separates server and tool in /mcp)"})
    if cls is ApiKeyCreate and isinstance(values.get("expires_at"), datetime):
        if values["expires_at"].tzinfo is None:
            errors.append({"field": "expires_at", "message": "must include a UTC offset, e.g. 2030-01-01T00:00:00Z"})
        elif values["expires_at"] <= datetime.now(timezone.utc):
            errors.append({"field": "expires_at", "message": "is in the past; a new key must expire later"})
    if cls in (UserCreate, UserUpdate) and isinstance(values.get("email"), str):
        values["email"] = values["email"].lower()
    if cls is ApiKeyImport:
        if isinstance(values.get("key"), str):
            problem = legacy_key_problem(values["key"])
            if problem is not None:
                errors.append({"field": "key", "message": problem})
        if isinstance(values.get("expires_at"), datetime):
            errors.extend(_extra_checks(ApiKeyCreate, {"expires_at": values["expires_at"]}))
    if cls in (TenantCreate, TenantUpdate) and isinstance(values.get("settings"), dict):
        if len(msgspec.json.encode(values["settings"])) > 65_536:
            errors.append({"field": "settings", "message": "is larger than 64 KiB of JSON"})
    auth = values.get("auth")
    if cls in (ServerCreate, ServerAuthUpdate) and auth is not None:
        errors.extend(_auth_problems(auth, values.get("transport_type", "http") if cls is ServerCreate else None))
    errors.extend(_lifecycle_problems(cls, values))
    return errors


def endpoint_problems(transport: str, url: str) -> list[str]:
    """What is wrong with `url` as the endpoint of a server of this transport (nothing, usually)."""
    parts = urlsplit(url)
    if transport == "stdio":
        return []  # a command line, checked when the stdio transport starts it
    if transport == "websocket":
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            return ["must be a ws:// or wss:// URL with a host"]
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        return ["must be an http:// or https:// URL with a host"]
    return []


def server_settings_problems(settings: dict[str, Any]) -> list[dict[str, str]]:
    """Each key of a server's settings checked against `UpstreamSettings` (null removes an override)."""
    known = {f.name: f.type for f in msgspec.structs.fields(UpstreamSettings)}
    errors = []
    for key, value in settings.items():
        if key not in known:
            errors.append({"field": f"settings.{key}",
                           "message": f"unknown setting (known: {', '.join(sorted(known))})"})
            continue
        if value is None:
            continue
        try:
            # The key's own type and range; rules across keys are checked with the stored ones (service.py).
            msgspec.convert(value, known[key])
        except msgspec.ValidationError as exc:
            errors.append({"field": f"settings.{key}", "message": _message(exc)})
    return errors


def legacy_key_problem(token: str) -> str | None:
    """Why `token` cannot be an imported legacy key, or None.

    It must be usable as a bearer token (visible ASCII, no spaces), long enough
    not to be guessed in a few tries, and not shaped like a gateway key or a JWT
    (those are recognized by their shape and would never reach the legacy lookup).
    """
    from gateway.auth.keys import KEY_SCHEME

    if not 16 <= len(token) <= 512 or not all("\x21" <= ch <= "\x7e" for ch in token):
        return "must be 16 to 512 visible ASCII characters without spaces"
    if token.startswith(f"{KEY_SCHEME}_"):
        return f"starts with '{KEY_SCHEME}_', the gateway's own key format; gateway keys cannot be imported"
    if token.startswith("eyJ") and token.count(".") == 2:
        return "is shaped like a JWT, which the gateway verifies as a token, not as a key"
    return None


# Analytics windows (records/analytics.py): whole hours, up to 30 days.
ANALYTICS_HOURS_MAX = 720
ANALYTICS_HOURS_DEFAULT = 24


def analytics_hours(raw: str | None) -> int:
    """The `hours` query parameter of the analytics routes, or ValidationFailed (422)."""
    if raw is None:
        return ANALYTICS_HOURS_DEFAULT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= ANALYTICS_HOURS_MAX:
        raise ValidationFailed(
            [{"field": "hours", "message": f"must be a whole number of hours from 1 to {ANALYTICS_HOURS_MAX}"}]
        )
    return int(raw)


def _auth_problems(auth: Any, transport: str | None) -> list[dict[str, str]]:
    errors = []
    if transport == "stdio" and not isinstance(auth, NoAuth):
        errors.append({"field": "auth", "message": "a stdio server runs on the gateway host and takes no credential"})
    if isinstance(auth, HeaderAuth) and auth.header_name.lower() in RESERVED_HEADERS:
        errors.append({"field": "auth.header_name", "message": f"'{auth.header_name}' is set by the gateway itself"})
    if isinstance(auth, ClientCredentialsAuth):
        parts = urlsplit(auth.token_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            errors.append({"field": "auth.token_url", "message": "must be an http:// or https:// URL with a host"})
    return errors


def _message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return text.split(" - at ")[0].replace("`", "")


def _nested_field(name: str, exc: msgspec.ValidationError) -> str:
    """`auth.header_value` for an error inside the credential object, `targets[0].weight` inside a routing
    rule's targets (other fields keep their plain name)."""
    text = str(exc)
    if name not in ("auth", "targets"):
        return name
    _, _, at = text.partition(" - at `$")
    path = at.rstrip("`") if at.startswith((".", "[")) else ""
    missing = re.match(r"Object missing required field `(\w+)`", text)
    return f"{name}{path}.{missing.group(1)}" if missing else name + path


def validate(cls: type[msgspec.Struct], body: bytes) -> msgspec.Struct:
    """Decode `body` into `cls`, or raise ValidationFailed listing every problem."""
    try:
        raw = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise ValidationFailed([{"field": "$", "message": f"body is not valid JSON: {exc}"}]) from None
    if not isinstance(raw, dict):
        raise ValidationFailed([{"field": "$", "message": "body must be a JSON object"}])
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    errors: list[dict[str, str]] = []
    values: dict[str, Any] = {}
    for name in raw:
        if name not in fields:
            errors.append({"field": name, "message": f"unknown field (allowed: {', '.join(fields)})"})
    for name, field in fields.items():
        if name not in raw:
            if field.required:
                errors.append({"field": name, "message": "is required"})
            continue
        try:
            values[name] = msgspec.convert(raw[name], field.type)
        except msgspec.ValidationError as exc:
            field_name, message = _nested_field(name, exc), _message(exc)
            if field_name == "auth.kind":
                message += f" (kinds: {', '.join(UPSTREAM_AUTH_KINDS)})"
            if field_name == "strategy":
                message += f" (strategies: {', '.join(ROUTING_STRATEGIES)})"
            errors.append({"field": field_name, "message": message})
    if not raw and cls in _NEEDS_A_FIELD:
        names = ", ".join(fields)
        errors.append({"field": "$", "message": f"nothing to change: give at least one of {names}"})
    errors.extend(_extra_checks(cls, values))
    if cls in (RoutingRuleCreate, RoutingRuleUpdate) and not any(e["field"].startswith("target") for e in errors):
        # Only once both converted: an invalid list is not an empty one.
        errors.extend(_routing_rule_problems(values, creating=cls is RoutingRuleCreate))
    if errors:
        raise ValidationFailed(errors)
    return cls(**values)


def validate_limit_patch(body: bytes) -> dict[str, Any]:
    """A PATCH /rate-limits body: LimitSettings keys -> value, or None to remove the override.

    Every key is checked strictly against `LimitSettings` (gateway/snapshot.py,
    `limit_setting_problems`); every problem is listed and nothing is returned
    unless all keys pass. In a table setting (`roles`, `costs`) a null entry
    removes that entry from the override.
    """
    from gateway.snapshot import LIMIT_KEYS, MERGED_LIMIT_KEYS, limit_setting_problems

    try:
        raw = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise ValidationFailed([{"field": "$", "message": f"body is not valid JSON: {exc}"}]) from None
    if not isinstance(raw, dict):
        raise ValidationFailed([{"field": "$", "message": "body must be a JSON object of limit settings"}])
    if not raw:
        raise ValidationFailed([{"field": "$", "message": "nothing to change: give at least one limit setting"}])
    errors = []
    for key, value in raw.items():
        if value is None and key in LIMIT_KEYS:
            continue  # removes the override
        if key in MERGED_LIMIT_KEYS and isinstance(value, dict):
            value = {entry: item for entry, item in value.items() if item is not None}
        errors.extend({"field": field, "message": message} for field, message in limit_setting_problems(key, value))
    if errors:
        raise ValidationFailed(errors)
    return raw


# Retention policies (records/retention.py) and alert rules (records/alerts.py).
RetentionTable = Literal[RETENTION_TABLES]  # type: ignore[valid-type]
RetentionDays = Annotated[int, Meta(ge=1, le=36_500)]
AlertMetric = Literal[ALERT_METRICS]  # type: ignore[valid-type]
Threshold = Annotated[float, Meta(ge=0, le=1e12)]
WindowMinutes = Annotated[int, Meta(ge=1, le=10_080)]
WebhookUrl = Annotated[str, Meta(min_length=1, max_length=1000)]


class RetentionPolicyCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Keep rows of `table_name` for `days`. No `tenant_id`: the operator's is the deployment's policy, a
    tenant ADMIN's its own tenant's; a tenant's id: that tenant's (its own, for a tenant ADMIN)."""

    table_name: RetentionTable
    days: RetentionDays
    tenant_id: uuid.UUID | None = None
    enabled: bool = True


class RetentionPolicyUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH /retention-policies/{id}: only the fields given change."""

    days: RetentionDays | Unset = UNSET
    enabled: bool | Unset = UNSET


class AlertRuleCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A performance alert: `metric` of `server_id` (none: each server of the tenant) over the last
    `window_minutes`, firing above `threshold` (error_rate a fraction 0..1, latency in ms, request_rate per
    minute; health fires while UNHEALTHY and takes no threshold); `webhook_url` is POSTed each firing and
    resolution."""

    name: Name
    metric: AlertMetric
    tenant_id: uuid.UUID | None = None
    server_id: uuid.UUID | None = None
    threshold: Threshold | None = None
    window_minutes: WindowMinutes = 5
    webhook_url: WebhookUrl | None = None
    enabled: bool = True
    description: Annotated[str, Meta(max_length=2000)] | None = None


class AlertRuleUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH /alerts/{id}: only the fields given change (null clears server_id, webhook_url, description)."""

    name: Name | Unset = UNSET
    metric: AlertMetric | Unset = UNSET
    server_id: uuid.UUID | None | Unset = UNSET
    threshold: Threshold | Unset = UNSET
    window_minutes: WindowMinutes | Unset = UNSET
    webhook_url: WebhookUrl | None | Unset = UNSET
    enabled: bool | Unset = UNSET
    description: Annotated[str, Meta(max_length=2000)] | None | Unset = UNSET


_NEEDS_A_FIELD = (*_NEEDS_A_FIELD, RetentionPolicyUpdate, AlertRuleUpdate)


def alert_threshold_problems(metric: str, threshold: float | None) -> list[dict[str, str]]:
    """What is wrong with `threshold` for a rule on `metric` (nothing, usually)."""
    if metric == "health":
        return []
    if threshold is None:
        return [{"field": "threshold", "message": f"is required for metric {metric}"}]
    if metric == "error_rate" and threshold > 1:
        return [{"field": "threshold", "message": "an error rate is a fraction from 0 to 1 (0.05: 5%)"}]
    return []


def _lifecycle_problems(cls: type, values: dict[str, Any]) -> list[dict[str, str]]:
    errors = []
    if cls is AlertRuleCreate and "metric" in values:
        errors.extend(alert_threshold_problems(values["metric"], values.get("threshold")))
    if cls in (AlertRuleCreate, AlertRuleUpdate) and isinstance(values.get("webhook_url"), str):
        parts = urlsplit(values["webhook_url"])
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment or parts.username:
            errors.append({"field": "webhook_url",
                           "message": "must be an http:// or https:// URL with a host (no fragment, no user)"})
    return errors


def schema_components() -> dict[str, Any]:
    """JSON Schemas of the request bodies, for the OpenAPI document."""
    _, components = msgspec.json.schema_components(
        [TenantCreate, TenantUpdate, UserCreate, UserUpdate, ApiKeyCreate, ApiKeyRotate, ApiKeyImport, ServerCreate,
         ServerAuthUpdate, AccessRuleCreate, LimitSettings, ServerUpdate, ToolApproval, UpstreamSettings,
         RoutingRuleCreate, RoutingRuleUpdate],
        ref_template="#/components/schemas/{name}",
    )
    return components
