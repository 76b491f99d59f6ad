"""Gateway configuration: one TOML file plus `GATEWAY_<SECTION>_<KEY>` overrides.

This module owns the shape of the configuration, its defaults (the embedded
default: a SQLite file and in-process state) and its validation. It is read
once at start-up; a bad value stops start-up with a message that names the key,
where the value came from, and what is wrong. Nothing here does I/O beyond
reading the file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

Port = Annotated[int, Meta(ge=0, le=65535)]
Positive = Annotated[float, Meta(gt=0)]
PositiveInt = Annotated[int, Meta(ge=1)]


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range."""


def _check_ranges(name: str, values: list[str]) -> None:
    from gateway.netaddr import networks

    networks(values, name)  # ValueError naming the entry


class DatabaseConfig(msgspec.Struct, forbid_unknown_fields=True):
    # sqlite:///relative.db, sqlite:////absolute.db, or postgresql://user@host/db
    url: str = "sqlite:///gateway.db"
    pool_min: Annotated[int, Meta(ge=0)] = 1
    pool_max: PositiveInt = 10


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True):
    # Empty: state stays in process (one gateway process). redis://host:6379/0 to share.
    url: str = ""
    # Every key and channel the gateway uses starts with this, so deployments
    # (and test runs) sharing one Redis never collide.
    key_prefix: str = "gw:"


class DataPlaneConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    # Largest request body accepted on the MCP path; larger ones get 413.
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    upstream_connect_timeout: Positive = 5.0
    # Time allowed for an upstream to start answering (headers).
    upstream_timeout: Positive = 60.0
    # Keep-alive connections kept per upstream, and how long an idle one lives.
    upstream_pool_size: PositiveInt = 64
    upstream_idle_seconds: Positive = 30.0
    # Browser origins allowed besides loopback ones ("*": any). Requests without
    # an Origin header (non-browser clients) are always allowed.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    # Load balancers and proxies in front of the gateway (CIDR ranges). A request
    # from one of them is attributed to the address it names in X-Forwarded-For
    # (the last hop not itself trusted) for limits, bans and request logs; from
    # anywhere else the header is ignored. Empty: the peer address, always.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # Relayed SSE streams: a GET stream with no byte for this long is ended (the
    # client reconnects); a call's stream (POST) idles out after upstream_timeout
    # instead. Any byte, a progress event included, restarts the clock.
    stream_idle_timeout: Positive = 300.0
    # No relayed stream lives longer than this.
    stream_max_duration: Positive = 3600.0
    # Items per page of the aggregate endpoint's (/mcp) tools/list and prompts/list.
    aggregate_page_size: Annotated[int, Meta(ge=1, le=1000)] = 200
    # While a client listens for list changes on /mcp or a facade, the lists behind
    # it are fetched again this often (configuration changes are announced at once).
    list_watch_interval: Positive = 10.0
    # Routing rules, circuit breakers, per-upstream queues and retries around every
    # upstream call (dataplane/guard.py). false: calls go straight out, for
    # measuring what the guard costs; never in production.
    upstream_guard: bool = True

    def __post_init__(self) -> None:
        _check_ranges("trusted_proxies", self.trusted_proxies)


class ControlPlaneConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8081


class WriterConfig(msgspec.Struct, forbid_unknown_fields=True):
    # Records waiting in memory; past this, request logs are dropped and counted.
    max_queue: PositiveInt = 100_000
    batch_size: PositiveInt = 2_000
    flush_interval: Positive = 0.5
    # How long a clean shutdown may spend flushing what is queued.
    shutdown_timeout: Positive = 10.0
    # Calls, errors and latency per upstream server and tool are summed over
    # windows this long, then written to server_metrics (records/server_stats.py).
    server_metrics_window: Annotated[float, Meta(ge=0.05, le=3600)] = 60.0
    # Where audit entries go when the database cannot take them, until it can
    # (records/spill.py). Empty: `gateway-spill` next to the SQLite file, or in
    # the working directory with PostgreSQL.
    spill_dir: str = ""
    # A spill segment is closed (and replayed, then deleted, as a whole) past this size.
    spill_segment_bytes: Annotated[int, Meta(ge=4096)] = 16 * 1024 * 1024
    # A request_logs row per request and server_metrics rows per window. false:
    # neither (nor the per-tool counters), for measuring what the records cost
    # (bench/proxy.py --compare records); never in production.
    request_logs: bool = True


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True):
    # An audit entry for every authenticated operation (records/audit.py). false:
    # none at all, for measuring what the audit trail costs; never in production.
    enabled: bool = True
    # Each entry also as one JSON line on the "gateway.audit" logger (INFO).
    log: bool = True
    # Parameter names redacted from every tenant's entries besides the built-in
    # list (records/sanitize.py SECRET_NAMES), matched the same way: as
    # substrings, case-insensitively, '-' and ' ' read as '_'. A tenant adds its
    # own in its settings, "audit_redact_keys": [...].
    redact_keys: list[str] = msgspec.field(default_factory=list)


class SnapshotConfig(msgspec.Struct, forbid_unknown_fields=True):
    # Safety net behind the Redis change signal: how often each process checks
    # the configuration version in the database.
    poll_interval: Positive = 1.0


class SessionsConfig(msgspec.Struct, forbid_unknown_fields=True):
    # Key material for sealing session ids (any string of 32+ characters).
    # Empty: one is generated once and kept in the database, shared by every process.
    secret: str = ""
    # Open sessions per API key (2025-era sessions and bridged SSE/WebSocket
    # connections), across every process when Redis is configured. 0: no cap.
    max_per_key: Annotated[int, Meta(ge=0)] = 100
    # A session with no request for this long stops counting against the cap.
    idle_timeout: Positive = 3600.0

Role = Literal["ADMIN", "USER", "SERVICE", "READONLY"]
PerMinute = Annotated[int, Meta(ge=0, le=100_000_000)]  # 0: the tier is off


def _role_defaults() -> dict[str, int]:
    return {"ADMIN": 1000, "USER": 100, "SERVICE": 1000, "READONLY": 100}


class LimitSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The limits an admin may change at runtime (`/api/v1/rate-limits`); the `[limits]` section gives the defaults.

    Every "per minute" limit is a token bucket refilled at that rate that holds
    `burst_seconds` of it (at least one request's worth), shared by every
    gateway process through Redis (limits/shared.py).
    """

    # Across the whole deployment; contended capacity is shared between tenants
    # by weight (tenants.weight) through the fair queue.
    global_per_minute: PerMinute = 5000
    # A tenant may take up to this multiple of its weighted share of the
    # capacity while the tenants it shares with leave theirs unused.
    tenant_burst_factor: Annotated[float, Meta(ge=1.0, le=1000.0)] = 2.0
    # Per user, by role.
    roles: dict[Role, PerMinute] = msgspec.field(default_factory=_role_defaults)
    # Requests without valid credentials, per client address.
    anonymous_per_minute: PerMinute = 20
    # Per client address, every request.
    ip_per_minute: PerMinute = 600
    # How much of a per-minute limit may be spent at once (60: a whole minute's worth).
    burst_seconds: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    # What one request costs in tokens, by method ("tools/call") or tool
    # ("tools/call:<tool name>"); the tool's entry wins. Unlisted: 1.
    costs: dict[str, Annotated[float, Meta(gt=0, le=1000)]] = msgspec.field(default_factory=dict)
    # Requests of one tenant waiting for contended capacity, and how long one may wait.
    queue_max: Annotated[int, Meta(ge=0, le=100_000)] = 64
    queue_deadline: Annotated[float, Meta(ge=0, le=60)] = 2.0
    # An address refused this many times within ban_window seconds is banned for ban_seconds.
    ban_violations: Annotated[int, Meta(ge=0, le=1_000_000)] = 50
    ban_window: Annotated[float, Meta(gt=0, le=86_400)] = 60.0
    ban_seconds: Annotated[float, Meta(gt=0, le=30 * 86_400)] = 600.0
    # CIDR ranges never limited by address nor banned, and ranges always refused (403).
    ip_allow: list[str] = msgspec.field(default_factory=list)
    ip_deny: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        # A role left out keeps its default limit (0 turns a role's tier off).
        self.roles = {**_role_defaults(), **self.roles}
        for name in ("ip_allow", "ip_deny"):
            _check_ranges(name, getattr(self, name))


class LimitsConfig(LimitSettings, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # How often each process reports what it admitted to Redis and takes its
    # share of what is left (limits/shared.py).
    sync_interval: Annotated[float, Meta(ge=0.005, le=5.0)] = 0.05
    # While Redis is unreachable: "local" (each process admits limit / N, N the
    # processes last seen alive) or "closed" (refuse what a shared tier decides).
    redis_down_policy: Literal["local", "closed"] = "local"


class UpstreamSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How the gateway watches, protects and spreads traffic over each upstream.

    The `[upstreams]` section gives the deployment's values; a server's own
    `settings` (mcp_servers.settings, same keys) override them for that server.
    """

    # Health (registry/health.py). A generous timeout: a slow answer is DEGRADED, not a failure.
    health_interval: Annotated[float, Meta(ge=0.1, le=86_400)] = 30.0
    health_timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0
    # auto: ping (server/discover for 2026-07-28 upstreams, which have no ping), or tools/list for a
    # server that lacks it; ping: no fallback ("method not found" is an answer); list: always tools/list.
    # stdio servers: their process state as well.
    health_probe: Literal["auto", "ping", "list"] = "auto"
    unhealthy_after: Annotated[int, Meta(ge=1, le=100)] = 3  # consecutive failures to become UNHEALTHY
    healthy_after: Annotated[int, Meta(ge=1, le=100)] = 2  # consecutive successes to leave it
    degraded_latency_ms: Annotated[float, Meta(gt=0, le=600_000)] = 2000.0
    degraded_error_rate: Annotated[float, Meta(gt=0, le=1)] = 0.2  # of real traffic over the breaker window
    # Capability discovery (registry/discovery.py): how often tools, resources and prompts are re-read.
    discovery_interval: Annotated[float, Meta(ge=10, le=86_400)] = 300.0
    # Circuit breaker (_fast/breaker): trips on `breaker_failure_rate` of at least
    # `breaker_minimum_calls` calls in the last `breaker_window` seconds, or on
    # `breaker_consecutive_failures` in a row; stays open `breaker_open_seconds`
    # x the times it opened in a row (capped), then lets `breaker_half_open_calls` through.
    breaker_enabled: bool = True
    breaker_window: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    breaker_minimum_calls: Annotated[int, Meta(ge=1, le=1_000_000)] = 20
    breaker_failure_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    breaker_consecutive_failures: Annotated[int, Meta(ge=1, le=1_000_000)] = 5
    breaker_open_seconds: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    breaker_max_open_seconds: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    breaker_half_open_calls: Annotated[int, Meta(ge=1, le=1000)] = 3
    # Request queue per upstream: calls in flight at once, how many may wait, for how long.
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 1024
    queue_max: Annotated[int, Meta(ge=0, le=100_000)] = 1024
    queue_deadline: Annotated[float, Meta(ge=0, le=300)] = 5.0
    # Retries of safe calls only (lists; tools annotated readOnlyHint or idempotentHint),
    # at most `retry_budget` of the calls plus `retry_budget_min` per second.
    retry_attempts: Annotated[int, Meta(ge=0, le=5)] = 2
    retry_budget: Annotated[float, Meta(ge=0, le=1)] = 0.2
    retry_budget_min: Annotated[float, Meta(ge=0, le=10_000)] = 10.0

    def __post_init__(self) -> None:
        if self.breaker_max_open_seconds < self.breaker_open_seconds:
            raise ValueError("breaker_max_open_seconds must be at least breaker_open_seconds")


def server_settings(defaults: UpstreamSettings, overrides: Mapping[str, Any] | None) -> UpstreamSettings:
    """`defaults` with a server's own settings applied; raises msgspec.ValidationError naming a bad key."""
    if not overrides:
        return defaults
    return msgspec.convert({**msgspec.structs.asdict(defaults), **overrides}, UpstreamSettings)


class KeysConfig(msgspec.Struct, forbid_unknown_fields=True):
    # After a rotation the old key keeps working this long (seconds), so that
    # clients can move to the new one; a rotation request may ask for 0..rotation_grace_max.
    rotation_grace: Annotated[int, Meta(ge=0)] = 86_400
    rotation_grace_max: Annotated[int, Meta(ge=0)] = 30 * 86_400
    # Keys used since the last flush get `last_used_at` set, in one UPDATE, this often.
    last_used_flush_interval: Positive = 30.0


class SecretsConfig(msgspec.Struct, forbid_unknown_fields=True):
    # Key material (32+ characters) for upstream credentials at rest (AES-GCM) and
    # the lookup digests of imported legacy keys. Empty: one is generated once and
    # kept in the database (then the database alone can open the credentials).
    key: str = ""

Scope = Literal["read", "write", "admin", "proxy", "metrics", "health"]


class IssuerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One trusted token issuer: `[[auth.issuers]]` tables in the TOML file."""

    # Exactly the `iss` of its tokens, e.g. https://login.microsoftonline.com/<tid>/v2.0.
    issuer: str
    # Empty: <issuer>/.well-known/openid-configuration.
    discovery_url: str = ""
    # "entra": Microsoft Entra ID v2.0 (tenant in `tid`, roles in `roles`, and
    # `tid` must be the tenant the issuer URL names).
    kind: Literal["oidc", "entra"] = "oidc"
    # The `aud` its tokens must carry. Empty: auth.resource_uri.
    audience: str = ""
    # Which gateway tenant a token belongs to: a fixed `tenant` (id or name),
    # or the value of `tenant_claim` looked up in `tenant_map` (value -> id or name).
    tenant: str = ""
    tenant_claim: str = ""  # empty: "tid" for entra, "tenant" otherwise; dots reach into objects
    tenant_map: dict[str, str] = msgspec.field(default_factory=dict)
    role_claim: str = "roles"  # a string or a list of strings; dots reach into objects
    role_map: dict[str, Role] = msgspec.field(default_factory=dict)  # claim value -> role
    default_role: Role = "USER"
    # Gateway scopes every token of this issuer holds (`proxy` is needed for MCP calls).
    scopes: list[Scope] = msgspec.field(default_factory=lambda: ["proxy"])
    rate_limit_per_hour: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    rate_limit_per_day: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True):
    # The gateway's canonical URI (RFC 8707 / RFC 9728 `resource`), e.g.
    # https://mcp.example.com: the audience a token must carry, and where the
    # protected-resource metadata says the gateway is. Required with issuers.
    resource_uri: str = ""
    issuers: list[IssuerConfig] = msgspec.field(default_factory=list)
    # OAuth scopes a client should ask the issuer for (protected-resource metadata
    # `scopes_supported`, and `scope` in 401 challenges when set).
    scopes_supported: list[str] = msgspec.field(default_factory=list)
    # Clock skew tolerated on exp, nbf and iat.
    leeway: Annotated[float, Meta(ge=0, le=300)] = 30.0
    # A token naming a key id the gateway does not hold makes it fetch the
    # issuer's keys again, at most once per this many seconds per issuer.
    jwks_min_refetch_interval: Annotated[float, Meta(ge=0)] = 30.0
    # Every issuer's keys are fetched again this often (keys it retired stop working).
    jwks_refresh_interval: Positive = 3600.0


class SigninProviderConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One sign-in provider: `[[signin.providers]]` tables in the TOML file (auth/signin.py)."""

    # In URLs: /auth/login/<name>, /auth/callback/<name>.
    name: str
    # "github": a GitHub OAuth app (identity from GET /user and /user/emails);
    # "oidc": any OpenID Connect provider, found by its discovery document.
    kind: Literal["github", "oidc"]
    client_id: str
    client_secret: str
    # oidc: the provider's issuer (`iss`); its document is <issuer>/.well-known/openid-configuration
    # unless discovery_url says otherwise.
    issuer: str = ""
    discovery_url: str = ""
    # github: empty means github.com (GitHub Enterprise Server: https://<host>/login/oauth/... and
    # https://<host>/api/v3).
    authorize_url: str = ""
    token_url: str = ""
    api_url: str = ""
    # Empty: ["openid", "email", "profile"] (oidc) or ["read:user", "user:email"] (github).
    scopes: list[str] = msgspec.field(default_factory=list)
    # Where the control plane is reached from a browser; the callback is <base>/auth/callback/<name>.
    # Empty: signin.redirect_base_url.
    redirect_base_url: str = ""
    # oidc: accept an `email` claim that comes without `email_verified: true`
    # (for providers that only assert addresses they own, such as a company directory).
    trust_unverified_email: bool = False
    # Sign-in maps a verified email to an existing gateway user. With a tenant
    # here, an unknown address in one of create_users_domains becomes a new user
    # of that tenant (id or name) with create_users_role instead.
    create_users_tenant: str = ""
    create_users_domains: list[str] = msgspec.field(default_factory=list)
    create_users_role: Role = "READONLY"


class SigninConfig(msgspec.Struct, forbid_unknown_fields=True):
    providers: list[SigninProviderConfig] = msgspec.field(default_factory=list)
    # The control plane's external base URL (e.g. https://gateway-admin.example.com), for callbacks.
    redirect_base_url: str = ""
    # A sign-in session lasts this long (seconds), then its user signs in again.
    session_ttl: Annotated[int, Meta(ge=60, le=30 * 86_400)] = 8 * 3600
    # Between /auth/login and the provider's redirect back: how long a sign-in may take.
    state_ttl: Annotated[int, Meta(ge=30, le=3600)] = 600


Days = Annotated[int, Meta(ge=0, le=36_500)]  # 0: keep forever


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The job that deletes old records (records/retention.py); one process runs it at a time.

    The `*_days` keys apply where no retention policy (`/api/v1/retention-policies`)
    says otherwise: a tenant's policy, else the deployment's, else these.
    """

    enabled: bool = True
    # A run is due when the last one (any process's) is this old (seconds).
    interval: Annotated[float, Meta(ge=0.05, le=7 * 86_400)] = 3600.0
    # Rows per DELETE statement, each committed on its own, with a pause between
    # them so no table is locked for long and the writer keeps appending.
    batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 5000
    batch_pause: Annotated[float, Meta(ge=0, le=60)] = 0.05
    request_logs_days: Days = 30
    audit_logs_days: Days = 365
    server_metrics_days: Days = 30
    alert_events_days: Days = 90


class AlertsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The performance alert evaluator (records/alerts.py); one process evaluates at a time."""

    enabled: bool = True
    # Every enabled rule is evaluated this often (seconds).
    interval: Annotated[float, Meta(ge=0.05, le=3600)] = 30.0
    # A webhook POST gets this long (seconds); a failed one is tried again
    # `webhook_retries` times, after webhook_backoff, then twice that, and so on.
    webhook_timeout: Annotated[float, Meta(gt=0, le=120)] = 5.0
    webhook_retries: Annotated[int, Meta(ge=0, le=10)] = 3
    webhook_backoff: Annotated[float, Meta(ge=0, le=600)] = 1.0


class LogConfig(msgspec.Struct, forbid_unknown_fields=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "text"


class Config(msgspec.Struct, forbid_unknown_fields=True):
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    dataplane: DataPlaneConfig = msgspec.field(default_factory=DataPlaneConfig)
    controlplane: ControlPlaneConfig = msgspec.field(default_factory=ControlPlaneConfig)
    writer: WriterConfig = msgspec.field(default_factory=WriterConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    snapshot: SnapshotConfig = msgspec.field(default_factory=SnapshotConfig)
    sessions: SessionsConfig = msgspec.field(default_factory=SessionsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    upstreams: UpstreamSettings = msgspec.field(default_factory=UpstreamSettings)
    keys: KeysConfig = msgspec.field(default_factory=KeysConfig)
    secrets: SecretsConfig = msgspec.field(default_factory=SecretsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    signin: SigninConfig = msgspec.field(default_factory=SigninConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    @property
    def uses_postgres(self) -> bool:
        return self.database.url.startswith(("postgresql://", "postgres://"))


ENV_PREFIX = "GATEWAY_"
# Variables that share the prefix but are not configuration keys.
_NOT_CONFIG = {"GATEWAY_CONFIG", "GATEWAY_NO_EXTENSIONS", "GATEWAY_CYTHON_DEBUG"}


def _sections() -> dict[str, type[msgspec.Struct]]:
    return {f.name: f.type for f in msgspec.structs.fields(Config)}


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate.

    `path` defaults to `$GATEWAY_CONFIG`; with neither, the defaults apply.
    """
    env = os.environ if env is None else env
    path = path or env.get("GATEWAY_CONFIG") or None
    raw: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [{section}] must be a table, got {type(values).__name__}")
            raw[section] = dict(values)
            for key in values:
                origin[(section, key)] = f"{path} [{section}] {key}"

    sections = _sections()
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_CONFIG:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            raise ConfigError(f"{name}: unknown setting (sections are {', '.join(sections)})")
        raw.setdefault(section, {})[key] = value
        origin[(section, key)] = f"environment variable {name}"
    return _validate(raw, origin, sections)


def _validate(
    raw: dict[str, dict[str, Any]],
    origin: dict[tuple[str, str], str],
    sections: dict[str, type[msgspec.Struct]],
) -> Config:
    problems: list[str] = []
    built: dict[str, msgspec.Struct] = {}
    for section, values in raw.items():
        cls = sections.get(section)
        if cls is None:
            problems.append(f"[{section}]: unknown section (sections are {', '.join(sections)})")
            continue
        fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
        good: dict[str, Any] = {}
        for key, value in values.items():
            where = origin.get((section, key), f"{section}.{key}")
            if key not in fields:
                problems.append(f"{where}: unknown key {section}.{key} (known: {', '.join(fields)})")
                continue
            table = _table_type(fields[key])
            if table is not None:
                good[key] = _tables(f"{section}.{key}", where, value, table, problems)
                continue
            if isinstance(value, str) and getattr(fields[key], "__origin__", None) is dict:
                # Tables come from the environment as JSON objects.
                try:
                    value = json.loads(value)
                except ValueError:
                    problems.append(f"{where}: {section}.{key} must be a JSON object, got {value!r}")
                    continue
            if isinstance(value, str) and getattr(fields[key], "__origin__", None) is list:
                # Lists come from the environment comma-separated.
                value = [item.strip() for item in value.split(",") if item.strip()]
            try:
                # strict=False lets environment strings become ints, floats and bools.
                good[key] = msgspec.convert(value, fields[key], strict=False)
            except msgspec.ValidationError as exc:
                problems.append(f"{where}: {section}.{key} = {value!r}: {str(exc).split(' - at')[0]}")
        try:
            built[section] = cls(**good)
        except (TypeError, ValueError) as exc:  # a check across keys (__post_init__)
            problems.append(f"[{section}]: {exc}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    config = Config(**built)
    _check_urls(config)
    _check_auth(config.auth)
    _check_signin(config.signin)
    return config


def _table_type(field_type: Any) -> type[msgspec.Struct] | None:
    """The element type of a list-of-tables setting (`[[auth.issuers]]`), else None."""
    if getattr(field_type, "__origin__", None) is not list:
        return None
    (item,) = field_type.__args__
    return item if isinstance(item, type) and issubclass(item, msgspec.Struct) else None


def _tables(name: str, where: str, value: Any, table: type[msgspec.Struct], problems: list[str]) -> list:
    """Each table checked on its own, so an error says which one and which key (auth.issuers[1].kind)."""
    if not isinstance(value, list):
        # A list of tables cannot be spelled as one environment variable.
        problems.append(f"{where}: {name} is a list of tables; set it in the TOML file as [[{name}]]")
        return []
    built = []
    for index, item in enumerate(value):
        try:
            built.append(msgspec.convert(item, table, strict=False))
        except msgspec.ValidationError as exc:
            message, _, at = str(exc).partition(" - at `$")
            problems.append(f"{where}: {name}[{index}]{at.rstrip('`')}: {message}")
    return built


def _check_auth(auth: AuthConfig) -> None:
    if not auth.issuers:
        return
    if not auth.resource_uri:
        raise ConfigError(
            "auth.resource_uri is required when auth.issuers is set: the gateway's canonical URI "
            "(e.g. https://mcp.example.com), which tokens must name as their audience"
        )
    _check_absolute("auth.resource_uri", auth.resource_uri)
    seen: set[str] = set()
    for index, issuer in enumerate(auth.issuers):
        name = f"auth.issuers[{index}]"
        _check_absolute(f"{name}.issuer", issuer.issuer)
        if issuer.discovery_url:
            _check_absolute(f"{name}.discovery_url", issuer.discovery_url)
        if issuer.issuer in seen:
            raise ConfigError(f"{name}.issuer = {issuer.issuer!r} is configured twice")
        seen.add(issuer.issuer)
        if bool(issuer.tenant) == bool(issuer.tenant_map):
            raise ConfigError(
                f"{name} ({issuer.issuer}): set exactly one of `tenant` (every token belongs to that tenant) "
                "and `tenant_map` (the tenant claim's value -> tenant id or name)"
            )
        if issuer.kind == "entra" and entra_tenant(issuer.issuer) is None:
            raise ConfigError(
                f"{name}.issuer = {issuer.issuer!r}: an entra issuer reads "
                "https://login.microsoftonline.com/<tenant id>/v2.0"
            )


_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _check_signin(signin: SigninConfig) -> None:
    if signin.redirect_base_url:
        _check_absolute("signin.redirect_base_url", signin.redirect_base_url)
    seen: set[str] = set()
    for index, provider in enumerate(signin.providers):
        name = f"signin.providers[{index}]"
        if not _PROVIDER_NAME.fullmatch(provider.name):
            raise ConfigError(
                f"{name}.name = {provider.name!r}: use lowercase letters, digits, '-' and '_' (it is a URL segment)"
            )
        if provider.name in seen:
            raise ConfigError(f"{name}.name = {provider.name!r} is configured twice")
        seen.add(provider.name)
        name = f"{name} ({provider.name})"
        if not provider.client_id or not provider.client_secret:
            raise ConfigError(f"{name}: client_id and client_secret are required (from the provider's app registration)")
        if not (provider.redirect_base_url or signin.redirect_base_url):
            raise ConfigError(
                f"{name}: set redirect_base_url (here or in [signin]): the control plane's URL as a browser reaches it"
            )
        if provider.redirect_base_url:
            _check_absolute(f"{name}.redirect_base_url", provider.redirect_base_url)
        if provider.kind == "oidc":
            if not provider.issuer:
                raise ConfigError(f"{name}: an oidc provider needs `issuer`")
            _check_absolute(f"{name}.issuer", provider.issuer)
            for key in ("authorize_url", "token_url", "api_url"):
                if getattr(provider, key):
                    raise ConfigError(f"{name}.{key}: an oidc provider takes its URLs from its discovery document")
            if provider.discovery_url:
                _check_absolute(f"{name}.discovery_url", provider.discovery_url)
        else:
            if provider.issuer or provider.discovery_url or provider.trust_unverified_email:
                raise ConfigError(
                    f"{name}: issuer, discovery_url and trust_unverified_email are for oidc providers "
                    "(a github provider uses authorize_url, token_url and api_url)"
                )
            for key in ("authorize_url", "token_url", "api_url"):
                if getattr(provider, key):
                    _check_absolute(f"{name}.{key}", getattr(provider, key))
        if provider.create_users_tenant and not provider.create_users_domains:
            raise ConfigError(
                f"{name}: create_users_tenant needs create_users_domains (the email domains whose people may "
                "become users); otherwise anyone with an account there would get one"
            )


def entra_tenant(issuer: str) -> str | None:
    """The directory (tenant) id in an Entra ID v2.0 issuer URL."""
    parts = urlsplit(issuer).path.strip("/").split("/")
    return parts[0] if len(parts) == 2 and parts[1] == "v2.0" and parts[0] else None


def _check_absolute(name: str, url: str) -> None:
    # https only; http is allowed for loopback addresses (a local issuer, tests).
    parts = urlsplit(url)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ConfigError(f"{name} = {url!r}: must be an https:// URL (http:// only for loopback hosts)")
    if not parts.hostname or parts.fragment or parts.query:
        raise ConfigError(f"{name} = {url!r}: must be an absolute URL without query or fragment")


def _check_urls(config: Config) -> None:
    db = urlsplit(config.database.url)
    if db.scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"database.url = {config.database.url!r}: scheme must be sqlite or postgresql "
            "(e.g. sqlite:///gateway.db or postgresql://user@127.0.0.1/gateway)"
        )
    if config.database.pool_min > config.database.pool_max:
        raise ConfigError(
            f"database.pool_min ({config.database.pool_min}) is larger than database.pool_max "
            f"({config.database.pool_max})"
        )
    if config.sessions.secret and len(config.sessions.secret) < 32:
        raise ConfigError("sessions.secret is too short: use at least 32 random characters")
    if config.secrets.key and len(config.secrets.key) < 32:
        raise ConfigError("secrets.key is too short: use at least 32 random characters")
    if config.keys.rotation_grace > config.keys.rotation_grace_max:
        raise ConfigError(
            f"keys.rotation_grace ({config.keys.rotation_grace}) is longer than keys.rotation_grace_max "
            f"({config.keys.rotation_grace_max})"
        )
    if config.redis.url and urlsplit(config.redis.url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"redis.url = {config.redis.url!r}: scheme must be redis, rediss or unix")


def describe() -> list[tuple[str, str, str]]:
    """(TOML key, environment variable, default) for every setting, for docs and `config get`."""
    rows = []
    defaults = Config()
    for section, cls in _sections().items():
        for f in msgspec.structs.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            rows.append((f"{section}.{f.name}", f"GATEWAY_{section.upper()}_{f.name.upper()}", repr(value)))
    return rows
