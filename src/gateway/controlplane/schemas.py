"""Request bodies of the admin API, and validation that reports every bad field.

msgspec stops at the first error; an admin fixing a request wants them all.
`validate` decodes the JSON once, then converts field by field, collecting
one message per invalid or unknown field, and raises `ValidationFailed` (422).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from gateway.db.tables import ACCESS_EFFECTS
from gateway.db.tables import HEALTH_STATES, ROLES, SCOPES, TRANSPORTS

Name = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"\S")]
ServerName = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Email = Annotated[str, Meta(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Role = Literal[ROLES]  # type: ignore[valid-type]
Scope = Literal[SCOPES]  # type: ignore[valid-type]
Transport = Literal[TRANSPORTS]  # type: ignore[valid-type]
Health = Literal[HEALTH_STATES]  # type: ignore[valid-type]
Tag = Annotated[str, Meta(min_length=1, max_length=64)]


class ValidationFailed(Exception):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    settings: dict[str, Any] = {}


class UserCreate(msgspec.Struct, forbid_unknown_fields=True):
    username: Name
    email: Email
    tenant_id: uuid.UUID | None = None
    role: Role = "USER"


class ApiKeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    name: Name
    scopes: Annotated[list[Scope], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["proxy"])
    rate_limit_per_hour: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    rate_limit_per_day: Annotated[int, Meta(ge=1, le=1_000_000)] = 10000
    expires_at: datetime | None = None


class ServerCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: ServerName
    endpoint_url: Annotated[str, Meta(min_length=1, max_length=500)]
    tenant_id: uuid.UUID | None = None
    transport_type: Transport = "http"
    tags: Annotated[list[Tag], Meta(max_length=50)] = []
    description: Annotated[str, Meta(max_length=2000)] | None = None


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


def _extra_checks(cls: type, values: dict[str, Any]) -> list[dict[str, str]]:
    errors = []
    if cls is AccessRuleCreate:
        errors.extend(_access_rule_problems(values))
    if cls is ServerCreate and isinstance(values.get("endpoint_url"), str):
        url = values["endpoint_url"]
        parts = urlsplit(url)
        transport = values.get("transport_type", "http")
        if transport == "stdio":
            pass  # a command line, checked when the stdio transport starts it
        elif transport == "websocket":
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                errors.append({"field": "endpoint_url", "message": "must be a ws:// or wss:// URL with a host"})
        elif parts.scheme not in ("http", "https") or not parts.hostname:
            errors.append({"field": "endpoint_url", "message": "must be an http:// or https:// URL with a host"})
    if cls is ServerCreate and "__" in values.get("name", ""):
        errors.append({"field": "name", "message": "must not contain '__' (it separates server and tool in /mcp)"})
    if cls is ApiKeyCreate and isinstance(values.get("expires_at"), datetime):
        if values["expires_at"].tzinfo is None:
            errors.append({"field": "expires_at", "message": "must include a UTC offset, e.g. 2030-01-01T00:00:00Z"})
        elif values["expires_at"] <= datetime.now(timezone.utc):
            errors.append({"field": "expires_at", "message": "is in the past; a new key must expire later"})
    if cls is UserCreate and isinstance(values.get("email"), str):
        values["email"] = values["email"].lower()
    return errors


def _message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return text.split(" - at ")[0].replace("`", "")


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
            errors.append({"field": name, "message": _message(exc)})
    errors.extend(_extra_checks(cls, values))
    if errors:
        raise ValidationFailed(errors)
    return cls(**values)


def schema_components() -> dict[str, Any]:
    """JSON Schemas of the request bodies, for the OpenAPI document."""
    _, components = msgspec.json.schema_components(
        [TenantCreate, UserCreate, ApiKeyCreate, ServerCreate, AccessRuleCreate], ref_template="#/components/schemas/{name}"
    )
    return components
