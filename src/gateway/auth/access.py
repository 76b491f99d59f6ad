"""Who may use which server, tool, resource and prompt: access rules and role permissions.

This module owns the decision and nothing else: no I/O, no HTTP, no JSON. The
data plane asks `decide(snapshot, principal, server, kind, name)` (or, for a
server as a whole, `usable`) and turns a denial into a refusal
(`gateway.dataplane.enforce`).

The model (ServerAccessControl), one row of `server_access_rules` each:

- effect: `allow` or `deny`;
- subject: the whole tenant, a role, a user, or an API key;
- object: one server or every server of the tenant, and within it everything,
  or the tools, resources or prompts whose name (URI for resources) matches a
  glob (`fnmatch` syntax, case-sensitive: `*` also matches `/`).

Evaluation for one principal and one object (a tool, resource or prompt of a
server), over the rules of the principal's tenant whose object covers it:

1. a `deny` rule whose subject is the principal: denied (deny wins);
2. an `allow` rule whose subject is the principal: allowed;
3. an `allow` rule for anyone else: denied. An object that some allow rule
   covers is on an allowlist, and only those the list names reach it;
4. no rule covers it: allowed (the tenant's own servers are open to its
   principals by default, as they were before rules existed).

So "allow role ADMIN on server prod" makes prod ADMIN-only and leaves every
other server as it was; "deny user X on tool glob delete_*" takes those tools
from X only. Adding a rule never silently opens something: an allow rule can
only restrict others, and a deny rule only restricts its subject.

A server as a whole (`usable`): not usable when a server-wide deny applies to
the principal, or when a server-wide allow covers it and no allow rule of the
principal's mentions that server at all. A server that is not usable denies
every object in it, and the data plane shows it as a server that does not exist.

Role permissions on MCP methods are one table, `ROLE_METHODS` below: READONLY
may list and read but not call tools; every other role may use every method.
`config://` resources are readable by ADMIN users only. Both are part of
`decide`, so a list filtered with it shows exactly what the calls would allow.

Cost: rules are compiled once per snapshot (globs to regular expressions,
rules indexed by server id); a tenant without rules for a server costs one
dict lookup per decision.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.snapshot import ServerEntry, Snapshot

EFFECTS = ("allow", "deny")
# What a rule is about within a server ("server": all of it).
OBJECT_TYPES = ("server", "tool", "resource", "prompt")
# Kinds of object a decision is about.
TOOL, RESOURCE, PROMPT = "tool", "resource", "prompt"
ADMIN = "ADMIN"

# -- role permissions on MCP methods -----------------------------------------------------------------
# Methods that list or read and change nothing upstream. Everything else (tools/call,
# and any method not named here, so a new method is closed until it is reviewed)
# needs a role that may act.
READ_METHODS = frozenset(
    {
        "initialize", "ping", "server/discover", "subscriptions/listen",
        "tools/list", "prompts/list", "prompts/get",
        "resources/list", "resources/templates/list", "resources/read",
        "resources/subscribe", "resources/unsubscribe",
        "completion/complete", "logging/setLevel",
    }
)
# Role -> the methods it may use (None: every method). Notifications and
# responses (a client's answers to the server's questions) are always allowed.
ROLE_METHODS: dict[str, frozenset[str] | None] = {
    "ADMIN": None,
    "USER": None,
    "SERVICE": None,
    "READONLY": READ_METHODS,
}
# The method that uses an object of each kind: a kind is usable only by roles that may call it.
USE_METHOD = {TOOL: "tools/call", RESOURCE: "resources/read", PROMPT: "prompts/get"}


class Principal(Protocol):
    """Who is asking: an API key entry (`KeyEntry`), or anything that names the same four things."""

    id: uuid.UUID | None  # the API key's id (None for a credential that is not a key)
    tenant_id: uuid.UUID
    user_id: uuid.UUID | None
    role: str


class Decision:
    """Allowed, or denied with a reason a person can act on. True when allowed."""

    __slots__ = ("allowed", "reason")

    def __init__(self, allowed: bool, reason: str = "") -> None:
        self.allowed = allowed
        self.reason = reason

    def __bool__(self) -> bool:
        return self.allowed

    def __repr__(self) -> str:
        return "ALLOWED" if self.allowed else f"denied({self.reason!r})"


ALLOWED = Decision(True)


def denied(reason: str) -> Decision:
    return Decision(False, reason)


def method_permitted(principal: Principal, method: str | None) -> Decision:
    """Whether the principal's role may use `method` at all (the role table)."""
    allowed = ROLE_METHODS.get(principal.role, READ_METHODS)  # an unknown role gets the least
    if allowed is None or method is None or method in allowed or method.startswith("notifications/"):
        return ALLOWED
    if method == "tools/call":
        return denied(f"role {principal.role} may list and read but not call tools")
    return denied(f"role {principal.role} may not use {method} (it may list and read only)")


# -- rules ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AccessRule:
    """One rule as stored (the snapshot keeps them for inspection)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    effect: str
    role: str | None
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    server_id: uuid.UUID | None  # None: every server of the tenant
    tool: str | None
    resource: str | None
    prompt: str | None

    @property
    def object_type(self) -> str:
        if self.tool is not None:
            return TOOL
        if self.resource is not None:
            return RESOURCE
        if self.prompt is not None:
            return PROMPT
        return "server"


_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_AND_NEWLINE = str.maketrans("", "", "\t\n\r")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def normalize_uri(uri: str) -> str:
    """A URI as a WHATWG URL parser would read it, for matching: outer whitespace and
    control characters stripped, tabs and newlines removed, the scheme lower-cased.

    Upstreams that parse URIs do this before they look a resource up, so a rule
    must see the same text, or " config://x" would slip past "config://*".
    """
    uri = uri.strip(_C0_AND_SPACE).translate(_TAB_AND_NEWLINE)
    scheme = _SCHEME.match(uri)
    if scheme is not None and not scheme.group().islower():
        uri = scheme.group().lower() + uri[scheme.end():]
    return uri


def is_config_uri(uri: str) -> bool:
    return normalize_uri(uri).startswith("config:")


class _Compiled:
    """A rule ready to evaluate: its subject test and its object test."""

    __slots__ = ("rule", "allow", "role", "user_id", "api_key_id", "kind", "pattern", "match")

    def __init__(self, rule: AccessRule) -> None:
        self.rule = rule
        self.allow = rule.effect == "allow"
        self.role, self.user_id, self.api_key_id = rule.role, rule.user_id, rule.api_key_id
        self.kind = rule.object_type
        pattern = rule.tool if rule.tool is not None else rule.prompt
        if rule.resource is not None:
            pattern = normalize_uri(rule.resource)
        # Compiled once per snapshot; fnmatch.translate anchors the end, fullmatch the start.
        self.pattern = fnmatch.translate(pattern) if pattern is not None else None
        self.match = re.compile(self.pattern).fullmatch if pattern is not None else None

    def applies_to(self, principal: Principal) -> bool:
        if self.role is not None:
            return principal.role == self.role
        if self.user_id is not None:
            return principal.user_id == self.user_id
        if self.api_key_id is not None:
            return principal.id == self.api_key_id
        return True  # the whole tenant

    def covers(self, name: str) -> bool:
        """Whether it covers item `name` of a kind it is about (a server-wide rule covers every item)."""
        return self.match is None or self.match(name) is not None


class _KindRules:
    """The rules about one kind of item on one server: denies, allows, and one test for "any allow covers it"."""

    __slots__ = ("denies", "allows", "listed")

    def __init__(self, rules: list[_Compiled]) -> None:
        self.denies = tuple(r for r in rules if not r.allow)
        self.allows = tuple(r for r in rules if r.allow)
        if any(r.match is None for r in self.allows):
            self.listed: Callable[[str], object] | None = _always  # a server-wide allow covers every item
        elif self.allows:
            # Every allow glob as one alternation: one regex call, however many rules.
            self.listed = re.compile("|".join(f"(?:{r.pattern})" for r in self.allows)).fullmatch
        else:
            self.listed = None


def _always(name: str) -> bool:
    return True


_MEMO_ENTRIES = 4096


class ServerRules:
    """The rules of one server's tenant that concern it (its own and the tenant-wide ones).

    Decisions are remembered per (principal, kind, name): the rules cannot
    change under it (a new snapshot has new `ServerRules`), and a principal
    asks about the same few items again and again. Bounded; cleared when full.
    """

    __slots__ = ("rules", "kinds", "server_wide", "allow_kinds", "_memo")

    def __init__(self, rules: list[_Compiled]) -> None:
        self.rules = tuple(rules)
        self.server_wide = tuple(r for r in rules if r.kind == "server")
        self.kinds = {
            kind: _KindRules([r for r in rules if r.kind in ("server", kind)]) for kind in (TOOL, RESOURCE, PROMPT)
        }
        self.allow_kinds = frozenset(kind for kind, k in self.kinds.items() if k.allows)
        self._memo: dict[tuple, Decision] = {}

    def decide(self, principal: Principal, kind: str, name: str) -> Decision:
        memo_key = (principal.id, principal.user_id, principal.role, kind, name)
        decision = self._memo.get(memo_key)
        if decision is None:
            decision = self._decide(principal, self.kinds[kind], name)
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            self._memo[memo_key] = decision
        return decision

    @staticmethod
    def _decide(principal: Principal, rules: _KindRules, name: str) -> Decision:
        for rule in rules.denies:
            if rule.applies_to(principal) and rule.covers(name):
                return denied(f"access rule {rule.rule.id} denies it to you")
        for rule in rules.allows:
            if rule.applies_to(principal) and rule.covers(name):
                return ALLOWED
        if rules.listed is not None and rules.listed(name):
            return denied("access rules allow it to others only")
        return ALLOWED

    def usable(self, principal: Principal) -> Decision:
        memo_key = (principal.id, principal.user_id, principal.role, "server", None)
        decision = self._memo.get(memo_key)
        if decision is None:
            decision = self._usable(principal)
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            self._memo[memo_key] = decision
        return decision

    def _usable(self, principal: Principal) -> Decision:
        for rule in self.server_wide:
            if not rule.allow and rule.applies_to(principal):
                return denied(f"access rule {rule.rule.id} denies this server to you")
        if any(r.allow for r in self.server_wide) and not any(r.allow and r.applies_to(principal) for r in self.rules):
            return denied("access rules allow this server to others only")
        return ALLOWED

    def may_hide(self, principal: Principal, kind: str) -> bool:
        """Whether some item of `kind` could be denied to this principal (so a list needs filtering)."""
        rules = self.kinds[kind]
        return bool(rules.allows) or any(r.applies_to(principal) for r in rules.denies)


class AccessPolicy:
    """Every tenant's rules, compiled and indexed by server id. Immutable once built (but for memos)."""

    __slots__ = ("rules", "by_server")

    def __init__(self, rules: Iterable[AccessRule] = (), servers: Iterable[ServerEntry] = ()) -> None:
        self.rules: tuple[AccessRule, ...] = tuple(rules)
        by_tenant: dict[uuid.UUID, list[_Compiled]] = {}
        for rule in self.rules:
            by_tenant.setdefault(rule.tenant_id, []).append(_Compiled(rule))
        # Server id -> its rules; a server without any is absent (the common case: one failed lookup).
        self.by_server: dict[uuid.UUID, ServerRules] = {}
        for server in servers:
            mine = [r for r in by_tenant.get(server.tenant_id, ()) if r.rule.server_id in (None, server.id)]
            if mine:
                self.by_server[server.id] = ServerRules(mine)

    def for_server(self, server: ServerEntry) -> ServerRules | None:
        """The rules concerning `server`; None (the common case) when there are none."""
        return self.by_server.get(server.id)


EMPTY_POLICY = AccessPolicy()


# -- the questions the data plane asks -------------------------------------------------------------------
def usable(snapshot: Snapshot, principal: Principal, server: ServerEntry) -> Decision:
    """May the principal use `server` at all? (If not, the server is shown as missing.)"""
    if server.tenant_id != principal.tenant_id:
        return denied("not a server of your tenant")
    rules = snapshot.access.by_server.get(server.id)
    return ALLOWED if rules is None else rules.usable(principal)


def unrestricted(snapshot: Snapshot, principal: Principal, server: ServerEntry) -> bool:
    """True when nothing on `server` can be refused to this principal but `config://` resources:
    its role may use every method and no rule concerns the server. The request path's fast exit."""
    return (
        ROLE_METHODS.get(principal.role, READ_METHODS) is None
        and server.id not in snapshot.access.by_server
        and server.tenant_id == principal.tenant_id
    )


def decide(snapshot: Snapshot, principal: Principal, server: ServerEntry, kind: str, name: str) -> Decision:
    """May the principal use the tool, resource or prompt `name` (a URI for resources) of `server`?

    What the role table says of the kind's method, then `config://` for ADMIN
    only, then the access rules (module docstring).
    """
    role = method_permitted(principal, USE_METHOD[kind])
    if not role:
        return role
    if kind == RESOURCE:
        name = normalize_uri(name)
        if principal.role != ADMIN and name.startswith("config:"):
            return denied("config:// resources are readable by ADMIN users only")
    if server.tenant_id != principal.tenant_id:
        return denied("not a server of your tenant")
    rules = snapshot.access.by_server.get(server.id)
    return ALLOWED if rules is None else rules.decide(principal, kind, name)


def may_hide(snapshot: Snapshot, principal: Principal, server: ServerEntry, kind: str) -> bool:
    """Could `decide` deny some item of `kind` on `server` to this principal? False: a list passes as it is."""
    if not method_permitted(principal, USE_METHOD[kind]):
        return True  # every item: the role may not use any
    if kind == RESOURCE and principal.role != ADMIN:
        return True  # config:// resources
    rules = snapshot.access.by_server.get(server.id)
    return rules is not None and rules.may_hide(principal, kind)
