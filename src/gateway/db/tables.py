"""The gateway's schema as SQLAlchemy Core tables (PostgreSQL and SQLite).

The control plane owns this schema: it reads and writes these tables, and the
Alembic migrations in `gateway/db/migrations` create them (a test checks the
migrations and these definitions agree). The data plane never queries them on
the request path; it reads a snapshot built from them, and its records reach
`request_logs`, `audit_logs` and `server_metrics` through the batched writer.

Every tenant-owned row carries `tenant_id`, so scoping a query is one predicate.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSONB on PostgreSQL (indexable, compact), JSON text on SQLite.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

ROLES = ("ADMIN", "USER", "SERVICE", "READONLY")
TRANSPORTS = ("http", "websocket", "stdio", "sse")
HEALTH_STATES = ("HEALTHY", "UNHEALTHY", "DEGRADED", "UNKNOWN", "MAINTENANCE")
SCOPES = ("read", "write", "admin", "proxy", "metrics", "health")
TENANT_STATES = ("active", "suspended")
ACCESS_EFFECTS = ("allow", "deny")
# How the gateway authenticates itself to an upstream server (dataplane/credentials.py).
UPSTREAM_AUTH_KINDS = ("none", "header", "oauth2_client_credentials")
# A discovered tool's definition against the one an admin approved (registry/discovery.py).
TOOL_PIN_STATES = ("approved", "changed")
# How a routing rule picks one replica (registry/routing.py).
ROUTING_STRATEGIES = ("weighted_round_robin", "least_outstanding", "lowest_latency")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _id() -> sa.Column:
    return sa.Column("id", sa.Uuid, primary_key=True, default=uuid.uuid4)


def _stamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
        sa.Column("updated_at", Timestamp, nullable=False, default=utcnow, onupdate=utcnow),
    ]


def _tenant_fk(nullable: bool = False) -> sa.Column:
    return sa.Column("tenant_id", sa.Uuid, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=nullable)


def _one_of(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=name)


tenants = sa.Table(
    "tenants",
    metadata,
    _id(),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("status", sa.String(16), nullable=False, default="active"),
    sa.Column("settings", Json, nullable=False, default=dict),
    # The operator's own tenant (created by `gateway bootstrap`): its ADMIN
    # users administer every tenant.
    sa.Column("is_platform", sa.Boolean, nullable=False, default=False),
    # The tenant's share under fair scheduling, relative to other tenants (1..1000).
    sa.Column("weight", sa.Integer, nullable=False, default=100, server_default="100"),
    *_stamps(),
    _one_of("status", TENANT_STATES, "status"),
    sa.CheckConstraint("weight BETWEEN 1 AND 1000", name="weight"),
)

users = sa.Table(
    "users",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("username", sa.String(255), nullable=False, unique=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False, default="USER"),
    sa.Column("is_active", sa.Boolean, nullable=False, default=True),
    *_stamps(),
    _one_of("role", ROLES, "role"),
    sa.Index(None, "tenant_id", "role", "is_active"),
)

mcp_servers = sa.Table(
    "mcp_servers",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("endpoint_url", sa.String(500), nullable=False),
    sa.Column("transport_type", sa.String(16), nullable=False, default="http"),
    sa.Column("health_status", sa.String(16), nullable=False, default="UNKNOWN"),
    sa.Column("avg_response_time", sa.Float, nullable=True),
    sa.Column("tags", Json, nullable=False, default=list),
    sa.Column("capabilities", Json, nullable=False, default=dict),
    sa.Column("is_active", sa.Boolean, nullable=False, default=True),
    # The gateway's own credential for this upstream: the kind and what may be
    # shown (a header's name, a token URL) in clear, the whole of it sealed
    # (AES-GCM, dataplane/credentials.py). Never returned by the admin API.
    sa.Column("auth_kind", sa.String(32), nullable=False, default="none", server_default="none"),
    sa.Column("auth_summary", Json, nullable=True),
    sa.Column("auth_sealed", sa.Text, nullable=True),
    # Per-server overrides of the deployment's upstream settings: {"health": {...},
    # "breaker": {...}, "pool": {...}} (config.UpstreamSettings names the keys).
    sa.Column("settings", Json, nullable=False, default=dict, server_default="{}"),
    # The last health probe (registry/health.py): when, and what it saw
    # ({"latency_ms", "error", "consecutive_failures", ...}).
    sa.Column("health_checked_at", Timestamp, nullable=True),
    sa.Column("health_detail", Json, nullable=True),
    # The last capability discovery (registry/discovery.py): when, and why it failed.
    sa.Column("discovered_at", Timestamp, nullable=True),
    sa.Column("discovery_error", sa.Text, nullable=True),
    *_stamps(),
    sa.UniqueConstraint("tenant_id", "name"),
    _one_of("transport_type", TRANSPORTS, "transport_type"),
    _one_of("auth_kind", UPSTREAM_AUTH_KINDS, "auth_kind"),
    _one_of("health_status", HEALTH_STATES, "health_status"),
    sa.Index(None, "tenant_id", "health_status"),
)

server_tools = sa.Table(
    "server_tools",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("server_id", sa.Uuid, sa.ForeignKey("mcp_servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("input_schema", Json, nullable=False, default=dict),
    sa.Column("annotations", Json, nullable=True),
    sa.Column("title", sa.String(255), nullable=True),
    sa.Column("output_schema", Json, nullable=True),
    sa.Column("success_count", sa.BigInteger, nullable=False, default=0),
    sa.Column("error_count", sa.BigInteger, nullable=False, default=0),
    sa.Column("avg_execution_time", sa.Float, nullable=True),
    # Tool-definition pinning: SHA-256 of the definition as last discovered, and
    # of the one an admin approved (the first one seen is approved by itself).
    # `pin_status` is 'changed' while they differ.
    sa.Column("definition_hash", sa.String(64), nullable=False, default="", server_default=""),
    sa.Column("approved_hash", sa.String(64), nullable=True),
    sa.Column("approved_definition", Json, nullable=True),
    sa.Column("pin_status", sa.String(16), nullable=False, default="approved", server_default="approved"),
    sa.Column("changed_at", Timestamp, nullable=True),
    *_stamps(),
    sa.UniqueConstraint("server_id", "name"),
    _one_of("pin_status", TOOL_PIN_STATES, "pin_status"),
    sa.Index(None, "name", "server_id"),
)

server_resources = sa.Table(
    "server_resources",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("server_id", sa.Uuid, sa.ForeignKey("mcp_servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("uri", sa.String(2048), nullable=False),
    sa.Column("name", sa.String(255), nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("mime_type", sa.String(255), nullable=True),
    sa.Column("title", sa.String(255), nullable=True),
    sa.Column("annotations", Json, nullable=True),
    *_stamps(),
    sa.UniqueConstraint("server_id", "uri"),
)

server_resource_templates = sa.Table(
    "server_resource_templates",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("server_id", sa.Uuid, sa.ForeignKey("mcp_servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("uri_template", sa.String(2048), nullable=False),
    sa.Column("name", sa.String(255), nullable=True),
    sa.Column("title", sa.String(255), nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("mime_type", sa.String(255), nullable=True),
    sa.Column("annotations", Json, nullable=True),
    *_stamps(),
    sa.UniqueConstraint("server_id", "uri_template"),
)

server_prompts = sa.Table(
    "server_prompts",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("server_id", sa.Uuid, sa.ForeignKey("mcp_servers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("title", sa.String(255), nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("arguments", Json, nullable=False, default=list),
    *_stamps(),
    sa.UniqueConstraint("server_id", "name"),
)

# Routing rules (registry/routing.py): a call addressed to a server whose name
# matches `match_server` (glob), carrying every tag in `match_tags`, for a tool
# matching `match_tool` (glob), goes to one of the rule's replicas: the servers
# listed in `targets` ([{"server_id", "weight"}]) and the tenant's servers that
# carry every tag in `target_tags`. Lowest `priority` first; the first match wins.
routing_rules = sa.Table(
    "routing_rules",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=100),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("match_server", sa.String(255), nullable=True),
    sa.Column("match_tool", sa.String(255), nullable=True),
    sa.Column("match_tags", Json, nullable=False, default=list),
    sa.Column("strategy", sa.String(32), nullable=False, default="weighted_round_robin"),
    sa.Column("targets", Json, nullable=False, default=list),
    sa.Column("target_tags", Json, nullable=False, default=list),
    sa.Column("description", sa.Text, nullable=True),
    *_stamps(),
    sa.UniqueConstraint("tenant_id", "name"),
    _one_of("strategy", ROUTING_STRATEGIES, "strategy"),
    sa.Index(None, "tenant_id", "priority"),
)

enhanced_api_keys = sa.Table(
    "enhanced_api_keys",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    # `gw_<key_prefix>_<secret>`: the prefix finds the row, the salted hash
    # of the whole key proves it. The plaintext is never stored.
    sa.Column("key_prefix", sa.String(32), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(128), nullable=False),
    sa.Column("salt", sa.String(64), nullable=False),
    sa.Column("scopes", Json, nullable=False, default=list),
    sa.Column("rate_limit_per_hour", sa.Integer, nullable=False, default=1000),
    sa.Column("rate_limit_per_day", sa.Integer, nullable=False, default=10000),
    sa.Column("expires_at", Timestamp, nullable=True),
    sa.Column("is_active", sa.Boolean, nullable=False, default=True),
    sa.Column("last_used_at", Timestamp, nullable=True),
    # Set when the key was rotated: the key that replaces it (its grace period
    # is this key's expires_at).
    sa.Column("replaced_by", sa.Uuid, nullable=True),
    # Imported legacy keys only (any format, no `gw_` prefix): HMAC-SHA256 of
    # the key under a gateway secret, which finds the row in one lookup; the
    # salted hash still proves the key. `key_prefix` is then a random handle.
    sa.Column("lookup_digest", sa.String(64), nullable=True),
    *_stamps(),
    sa.Index(None, "tenant_id", "is_active"),
    sa.Index(None, "user_id"),
    sa.Index(None, "lookup_digest", unique=True),
    sa.CheckConstraint("rate_limit_per_hour BETWEEN 1 AND 100000", name="rate_limit_per_hour"),
    sa.CheckConstraint("rate_limit_per_day BETWEEN 1 AND 1000000", name="rate_limit_per_day"),
)

# Sign-in sessions (controlplane/sessions.py): the token is stored only as its
# SHA-256; `provider` and `subject` say who vouched for the user, `created_ip`
# and `user_agent` where it began, `ended_at` when it was signed out or revoked.
sessions = sa.Table(
    "sessions",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("token_hash", sa.String(128), nullable=False, unique=True),
    sa.Column("is_active", sa.Boolean, nullable=False, default=True),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Column("last_seen_at", Timestamp, nullable=True),
    sa.Column("provider", sa.String(64), nullable=True),
    sa.Column("subject", sa.String(255), nullable=True),
    sa.Column("created_ip", sa.String(64), nullable=True),
    sa.Column("user_agent", sa.String(512), nullable=True),
    sa.Column("ended_at", Timestamp, nullable=True),
    *_stamps(),
    sa.Index(None, "user_id", "is_active"),
    sa.Index(None, "tenant_id", "is_active"),
)

# Sign-ins in progress: between /auth/login and the provider's redirect back.
# Found by the SHA-256 of `state` and deleted when used (single use); the PKCE
# verifier and the OIDC nonce wait here, never in the browser.
signin_states = sa.Table(
    "signin_states",
    metadata,
    _id(),
    sa.Column("state_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("code_verifier", sa.String(128), nullable=False),
    sa.Column("nonce", sa.String(128), nullable=True),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
    sa.Index(None, "expires_at"),
)

# Access rules (the ServerAccessControl model; evaluated in gateway.auth.access).
# Subject: at most one of role / user_id / api_key_id, none = the whole tenant.
# Object: server_id (NULL = every server of the tenant) and at most one glob of
# tool / resource / prompt, none = the whole server. A rule goes with the user,
# key or server it names (CASCADE): it never passes to a later namesake.
server_access_rules = sa.Table(
    "server_access_rules",
    metadata,
    _id(),
    _tenant_fk(),
    sa.Column("effect", sa.String(8), nullable=False),
    sa.Column("role", sa.String(16), nullable=True),
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
    sa.Column("api_key_id", sa.Uuid, sa.ForeignKey("enhanced_api_keys.id", ondelete="CASCADE"), nullable=True),
    sa.Column("server_id", sa.Uuid, sa.ForeignKey("mcp_servers.id", ondelete="CASCADE"), nullable=True),
    sa.Column("tool", sa.String(255), nullable=True),
    sa.Column("resource", sa.String(2048), nullable=True),
    sa.Column("prompt", sa.String(255), nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    *_stamps(),
    _one_of("effect", ACCESS_EFFECTS, "effect"),
    _one_of("role", ROLES, "role"),
    sa.CheckConstraint(
        "(CASE WHEN role IS NULL THEN 0 ELSE 1 END + CASE WHEN user_id IS NULL THEN 0 ELSE 1 END"
        " + CASE WHEN api_key_id IS NULL THEN 0 ELSE 1 END) <= 1",
        name="one_subject",
    ),
    sa.CheckConstraint(
        "(CASE WHEN tool IS NULL THEN 0 ELSE 1 END + CASE WHEN resource IS NULL THEN 0 ELSE 1 END"
        " + CASE WHEN prompt IS NULL THEN 0 ELSE 1 END) <= 1",
        name="one_object",
    ),
    sa.Index(None, "tenant_id", "server_id"),
)

# Records: append-only, written in batches by gateway.records.writer. Their
# tenant, user, key and server ids are plain columns (no foreign keys): a log
# row must outlive the object it mentions, and COPY must not pay for checks.
audit_logs = sa.Table(
    "audit_logs",
    metadata,
    _id(),
    sa.Column("tenant_id", sa.Uuid, nullable=True),
    sa.Column("user_id", sa.Uuid, nullable=True),
    sa.Column("api_key_id", sa.Uuid, nullable=True),
    sa.Column("action", sa.String(128), nullable=False),
    sa.Column("resource_type", sa.String(64), nullable=True),
    sa.Column("resource_id", sa.String(255), nullable=True),
    sa.Column("details", Json, nullable=True),
    sa.Column("client_ip", sa.String(64), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("duration_ms", sa.Float, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
    # Who acted, by role (the user's, or the token's mapped role).
    sa.Column("role", sa.String(16), nullable=True),
    # The tenant's hash chain (records/audit.py): position, the previous entry's
    # hash and this entry's, set when the entry is written; NULL for entries
    # without a tenant (the operator's platform-wide actions chain under none).
    sa.Column("chain_seq", sa.BigInteger, nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=True),
    sa.Column("entry_hash", sa.String(64), nullable=True),
    sa.Index(None, "tenant_id", "created_at"),
    sa.Index(None, "tenant_id", "chain_seq", unique=True),
)

request_logs = sa.Table(
    "request_logs",
    metadata,
    _id(),
    sa.Column("tenant_id", sa.Uuid, nullable=True),
    sa.Column("user_id", sa.Uuid, nullable=True),
    sa.Column("api_key_id", sa.Uuid, nullable=True),
    sa.Column("server_id", sa.Uuid, nullable=True),
    sa.Column("server_name", sa.String(255), nullable=True),
    sa.Column("method", sa.String(128), nullable=True),
    sa.Column("tool_name", sa.String(255), nullable=True),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("request_bytes", sa.Integer, nullable=False),
    sa.Column("response_bytes", sa.Integer, nullable=False),
    sa.Column("client_ip", sa.String(64), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
    sa.Index(None, "tenant_id", "created_at"),
    sa.Index(None, "server_id", "created_at"),
)

server_metrics = sa.Table(
    "server_metrics",
    metadata,
    _id(),
    sa.Column("tenant_id", sa.Uuid, nullable=True),
    sa.Column("server_id", sa.Uuid, nullable=False),
    sa.Column("tool_name", sa.String(255), nullable=True),
    sa.Column("window_start", Timestamp, nullable=False),
    sa.Column("window_seconds", sa.Integer, nullable=False),
    sa.Column("request_count", sa.Integer, nullable=False),
    sa.Column("error_count", sa.Integer, nullable=False),
    sa.Column("avg_response_ms", sa.Float, nullable=True),
    sa.Column("p50_response_ms", sa.Float, nullable=True),
    sa.Column("p95_response_ms", sa.Float, nullable=True),
    sa.Column("p99_response_ms", sa.Float, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
    sa.Index(None, "server_id", "window_start"),
)

# Records retention (records/retention.py): rows of `table_name` older than
# `days` are deleted by a scheduled job; tenant_id NULL is the deployment's
# default, a tenant's own row overrides it for that tenant.
RETENTION_TABLES = ("request_logs", "audit_logs", "server_metrics", "alert_events")
retention_policies = sa.Table(
    "retention_policies",
    metadata,
    _id(),
    _tenant_fk(nullable=True),
    sa.Column("table_name", sa.String(64), nullable=False),
    sa.Column("days", sa.Integer, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("last_run_at", Timestamp, nullable=True),
    sa.Column("last_deleted", sa.BigInteger, nullable=False, default=0, server_default="0"),
    *_stamps(),
    _one_of("table_name", RETENTION_TABLES, "table_name"),
    sa.CheckConstraint("days BETWEEN 1 AND 36500", name="days"),
    sa.Index(None, "tenant_id", "table_name", unique=True),
    sa.Index("ix_retention_policies_default_table", "table_name", unique=True,
             postgresql_where=sa.text("tenant_id IS NULL"), sqlite_where=sa.text("tenant_id IS NULL")),
)

# Performance alerts (records/alerts.py): a rule on a metric of one server (or
# of every server of the tenant) over a window; its firings and resolutions
# are alert_events.
ALERT_METRICS = ("error_rate", "latency_p95", "latency_p99", "health", "request_rate")
ALERT_STATES = ("firing", "resolved")
alert_rules = sa.Table(
    "alert_rules",
    metadata,
    _id(),
    _tenant_fk(nullable=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("server_id", sa.Uuid, sa.ForeignKey("mcp_servers.id", ondelete="CASCADE"), nullable=True),
    sa.Column("metric", sa.String(32), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("window_minutes", sa.Integer, nullable=False, default=5),
    sa.Column("webhook_url", sa.String(1000), nullable=True),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("description", sa.Text, nullable=True),
    *_stamps(),
    _one_of("metric", ALERT_METRICS, "metric"),
    sa.CheckConstraint("window_minutes BETWEEN 1 AND 10080", name="window_minutes"),
    sa.Index(None, "tenant_id", "name", unique=True),
)

alert_events = sa.Table(
    "alert_events",
    metadata,
    _id(),
    _tenant_fk(nullable=True),
    sa.Column("rule_id", sa.Uuid, sa.ForeignKey("alert_rules.id", ondelete="CASCADE"), nullable=False),
    sa.Column("server_id", sa.Uuid, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("fired_at", Timestamp, nullable=False),
    sa.Column("resolved_at", Timestamp, nullable=True),
    sa.Column("notified_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
    _one_of("state", ALERT_STATES, "state"),
    sa.Index(None, "tenant_id", "fired_at"),
    sa.Index(None, "rule_id", "state"),
)

# System configuration (controlplane: /api/v1/config): key/value settings by
# category; tenant_id NULL is the deployment's value, a tenant's row overrides
# it for that tenant. A sensitive value is kept sealed (auth/sealing.py) in
# `value_sealed` and never returned in clear; `runtime` settings apply without
# a restart (every process within a second). Every change is a row of
# system_config_history.
system_config = sa.Table(
    "system_config",
    metadata,
    _id(),
    _tenant_fk(nullable=True),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("category", sa.String(64), nullable=False, default="general"),
    sa.Column("value", Json, nullable=True),
    sa.Column("value_sealed", sa.Text, nullable=True),
    sa.Column("sensitive", sa.Boolean, nullable=False, default=False),
    sa.Column("runtime", sa.Boolean, nullable=False, default=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("version", sa.Integer, nullable=False, default=1),
    sa.Column("updated_by", sa.Uuid, nullable=True),
    *_stamps(),
    sa.Index(None, "tenant_id", "key", unique=True),
    sa.Index("ix_system_config_default_key", "key", unique=True,
             postgresql_where=sa.text("tenant_id IS NULL"), sqlite_where=sa.text("tenant_id IS NULL")),
)

system_config_history = sa.Table(
    "system_config_history",
    metadata,
    _id(),
    _tenant_fk(nullable=True),
    sa.Column("config_id", sa.Uuid, nullable=True),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("value", Json, nullable=True),
    sa.Column("value_sealed", sa.Text, nullable=True),
    sa.Column("sensitive", sa.Boolean, nullable=False, default=False),
    sa.Column("change", sa.String(16), nullable=False),  # set | delete
    sa.Column("changed_by", sa.Uuid, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),  # when the change was made
    sa.Index(None, "tenant_id", "key", "version"),
)

# One row: bumped in the same transaction as every configuration write, so
# each gateway process can tell cheaply whether its snapshot is stale.
config_state = sa.Table(
    "config_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False, default=utcnow),
)

# The limits an admin changed at runtime (`/api/v1/rate-limits`): one row for
# the deployment, holding only the keys the admin set (`LimitSettings` field ->
# value); the `[limits]` section supplies the rest. The snapshot applies them.
# `updated_by` / `updated_by_key`: who changed them last (plain ids, no foreign
# keys, like the records: they outlive the user).
limit_settings = sa.Table(
    "limit_settings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("overrides", Json, nullable=False, default=dict),
    sa.Column("updated_by", sa.Uuid, nullable=True),
    sa.Column("updated_by_key", sa.Uuid, nullable=True),
    sa.Column("updated_at", Timestamp, nullable=False, default=utcnow),
    sa.CheckConstraint("id = 1", name="one_row"),
)

# Secrets the gateway generates for itself and every process must share (the
# session-sealing key when none is configured). Created once, never updated.
gateway_secrets = sa.Table(
    "gateway_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False, default=utcnow),
)

RECORD_TABLES = ("audit_logs", "request_logs", "server_metrics")
