"""Who may do what on the control plane: one table, consulted for every admin route.

A caller needs both a role that may take the action and a key scope that
allows it. The role also sets the caller's reach for that action:

- `all`: every tenant (the operator: an ADMIN of the platform tenant);
- `tenant`: the caller's own tenant;
- `own`: only the caller's own rows (its user, its API keys).

Scopes on the control plane: `read` allows reads; `admin` allows every read
and write the role allows; `write` allows reads and the management of API
keys (self-service keys for USERs without an administrative credential).
`proxy`, `metrics` and `health` mean nothing here (they are data-plane scopes).

Applying the reach to queries is `service.Actor`'s job (one place); this
module only decides. Objects outside the reach are reported as not found,
actions outside the role as 403.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL, TENANT, OWN = "all", "tenant", "own"
READ = frozenset({"read", "write", "admin"})
KEY_WRITE = frozenset({"write", "admin"})
ADMIN = frozenset({"admin"})
_EVERY_ROLE = {"ADMIN": TENANT, "USER": TENANT, "SERVICE": TENANT, "READONLY": TENANT}
_OWN_FOR_OTHERS = {"ADMIN": TENANT, "USER": OWN, "SERVICE": OWN, "READONLY": OWN}


@dataclass(frozen=True, slots=True)
class Permission:
    scopes: frozenset[str]  # the key must hold one of these
    roles: dict[str, str] = field(default_factory=dict)  # role -> reach; a role not listed may not
    operator_only: bool = False
    summary: str = ""

    def describe_roles(self) -> str:
        if self.operator_only:
            return "the gateway operator"
        listed = [f"{role} ({reach})" for role, reach in self.roles.items()]
        return ", ".join(["the gateway operator", *listed])


PERMISSIONS: dict[str, Permission] = {
    "tenants.create": Permission(ADMIN, operator_only=True, summary="create tenants"),
    "tenants.update": Permission(ADMIN, operator_only=True, summary="suspend, reactivate, reweigh tenants"),
    "tenants.read": Permission(READ, dict(_EVERY_ROLE), summary="read tenants"),
    "users.write": Permission(ADMIN, {"ADMIN": TENANT}, summary="create and change users"),
    "users.read": Permission(READ, dict(_OWN_FOR_OTHERS), summary="read users"),
    "keys.write": Permission(KEY_WRITE, {"ADMIN": TENANT, "USER": OWN}, summary="create, rotate, revoke API keys"),
    "keys.import": Permission(ADMIN, {"ADMIN": TENANT}, summary="import legacy API keys"),
    "keys.read": Permission(READ, dict(_OWN_FOR_OTHERS), summary="read API keys (never their secrets)"),
    "servers.write": Permission(ADMIN, {"ADMIN": TENANT}, summary="register, change and unregister servers, set "
                                "their credentials, discover them and approve their tools' definitions"),
    "servers.read": Permission(READ, dict(_EVERY_ROLE), summary="read servers"),
    # Health (registry/health.py): everyone reads it with the server; a tenant ADMIN takes a server
    # out of (and back into) probing and routing for maintenance.
    "servers.health": Permission(READ, dict(_EVERY_ROLE), summary="read servers' health"),
    "servers.maintenance": Permission(ADMIN, {"ADMIN": TENANT}, summary="put servers in or out of maintenance"),
    # Analytics (records/analytics.py): a tenant ADMIN reads its own tenant's figures (every key's quota
    # use among them); the database's size and statistics belong to the deployment, so to the operator.
    "analytics.read": Permission(READ, {"ADMIN": TENANT}, summary="read analytics (server health, request "
                                 "performance, tenant usage)"),
    "analytics.database": Permission(READ, operator_only=True, summary="read the database's size and statistics"),
    # Routing rules (registry/routing.py): like access rules, a tenant ADMIN's business; a `read` key reads them.
    "routing.read": Permission(READ, {"ADMIN": TENANT}, summary="read routing rules"),
    "routing.write": Permission(ADMIN, {"ADMIN": TENANT}, summary="create, change and delete routing rules"),
    # Sign-in sessions (controlplane/sessions.py): everyone their own, a tenant ADMIN the tenant's.
    "sessions.read": Permission(READ, dict(_OWN_FOR_OTHERS), summary="read sign-in sessions"),
    "sessions.revoke": Permission(KEY_WRITE, dict(_OWN_FOR_OTHERS), summary="revoke sign-in sessions"),
    # Records retention (records/retention.py): the operator sets the deployment's policies and runs the job
    # now; a tenant ADMIN reads and sets its own tenant's overrides.
    "retention.read": Permission(READ, {"ADMIN": TENANT}, summary="read retention policies"),
    "retention.write": Permission(ADMIN, {"ADMIN": TENANT}, summary="set and delete retention policies"),
    "retention.run": Permission(ADMIN, operator_only=True, summary="run the retention job now"),
    # Performance alerts (records/alerts.py): like routing rules, a tenant ADMIN's business.
    "alerts.read": Permission(READ, {"ADMIN": TENANT}, summary="read alert rules and their events"),
    "alerts.write": Permission(ADMIN, {"ADMIN": TENANT}, summary="create, change and delete alert rules"),
    # The deployment's limits (/api/v1/rate-limits): a tenant ADMIN reads them (and its own
    # tenant's weight) to know what its users get; only the operator changes them.
    "limits.read": Permission(READ, {"ADMIN": TENANT}, summary="read the deployment's rate limits"),
    "limits.write": Permission(ADMIN, operator_only=True, summary="change the deployment's rate limits"),
    # Per-address bans (limits/bans.py): addresses are not any tenant's, so the operator's alone.
    "bans.read": Permission(READ, operator_only=True, summary="list banned addresses"),
    "bans.write": Permission(ADMIN, operator_only=True, summary="ban and unban addresses"),
    # System configuration (controlplane/system_config.py): a tenant ADMIN reads the deployment's values
    # (sensitive ones never in clear) and its own tenant's overrides, and writes only those overrides; the
    # deployment's values are the operator's (checked in system_config.py).
    "config.read": Permission(READ, {"ADMIN": TENANT}, summary="read system configuration"),
    "config.write": Permission(ADMIN, {"ADMIN": TENANT}, summary="set and delete system configuration"),
}

# A route registered without naming its action gets this: what every admin
# route required before the table existed (a tenant ADMIN with `admin` scope).
STRICT = Permission(ADMIN, {"ADMIN": TENANT}, summary="administer the caller's tenant")

# Routes that answer without credentials (they describe the API, not its data).
PUBLIC = "public"


class Refused(Exception):
    """The caller's role or key scope does not allow the action."""


def reach_of(action: str | None, *, role: str, scopes: frozenset[str], is_operator: bool) -> str:
    """The caller's reach for `action`, or Refused saying what is missing."""
    rule = PERMISSIONS[action] if action is not None else STRICT
    if is_operator:
        reach = ALL
    elif rule.operator_only:
        raise Refused(f"only the gateway operator may {rule.summary or action}")
    else:
        reach = rule.roles.get(role)
        if reach is None:
            raise Refused(f"the {role} role may not {rule.summary or action} (allowed: {rule.describe_roles()})")
    if not scopes & rule.scopes:
        needed = ", ".join(f"'{s}'" for s in sorted(rule.scopes))
        raise Refused(f"this API key lacks the scope to {rule.summary or action}: it needs one of {needed}")
    return reach
