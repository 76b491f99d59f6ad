"""Locust users for the gateway, one class per traffic shape; pick them by class name or by tag.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 1m ModernToolCalls
    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 1m --tags modern legacy

| class | tag | traffic |
| --- | --- | --- |
| ModernToolCalls | modern | 2026-07-28 stateless `tools/call` on `/servers/{name}/mcp` (echo/add/word_count 6:3:1), a `tools/list` now and then |
| LegacySessions | legacy | 2025-11-25 sessions: initialize, notifications/initialized, 3-6 calls with `Mcp-Session-Id`, DELETE |
| AggregateCalls | aggregate | `/mcp`: `tools/list` over every server of the tenant, then calls of namespaced `{server}__{tool}` tools |
| TenantMix | tenants | stateless calls, each from a tenant drawn by the tenants' weights in the targets file |
| AbusiveClient | abusive | one address hammering with a key of a tiny quota: 429 (api_key), then 429 (ip_ban) |

Each user is one client: it keeps one API key (and, but for TenantMix, one tenant) for its life.
The targets file comes from loadtests/provision.py (`LOADTEST_TARGETS`, default
loadtests/targets.json); `--host` overrides the gateway URL written there. How answers are
counted (failures, and 429s reported apart): loadtests/common.py and the README.
"""

from __future__ import annotations

import random

from common import TOOL_ARGUMENTS, McpUser, pick_tool
from locust import constant, events, tag, task


@events.init.add_listener
def _select_classes_by_tag(environment, **_kwargs) -> None:
    """`--tags modern` runs ModernToolCalls alone: leave out the classes with no task the tags select.

    Locust filters tasks by tag but keeps a class whose tasks were all filtered out (it then
    fails to start it); here such a class is not run at all, on the master or a lone runner.
    """
    options = environment.parsed_options
    tags = set(getattr(options, "tags", None) or ())
    excluded = set(getattr(options, "exclude_tags", None) or ())
    if not tags and not excluded:
        return

    def selected(task) -> bool:
        task_tags = getattr(task, "locust_tag_set", set())
        return (not tags or bool(tags & task_tags)) and not excluded & task_tags

    kept = [user for user in environment.user_classes if any(selected(t) for t in user.tasks)]
    if kept:
        environment.user_classes = kept


def _tenant_key_server(targets: dict) -> tuple[dict, str, str]:
    tenant = random.choice(targets["tenants"])
    return tenant, random.choice(tenant["keys"]), random.choice(tenant["servers"])


class ModernToolCalls(McpUser):
    """2026-07-28 stateless calls on one server's endpoint: the `_meta` envelope plus Mcp-Method/Mcp-Name."""

    def on_start(self) -> None:
        super().on_start()
        self.tenant, self.key, server = _tenant_key_server(self.targets)
        self.path = f"/servers/{server}/mcp"

    @tag("modern")
    @task(20)
    def call_tool(self) -> None:
        tool, arguments = pick_tool()
        self.rpc(self.path, "tools/call", {"name": tool, "arguments": arguments}, key=self.key,
                 name=f"modern: tools/call {tool}", modern=True)

    @tag("modern")
    @task(1)
    def list_tools(self) -> None:
        self.rpc(self.path, "tools/list", {}, key=self.key, name="modern: tools/list", modern=True)


class LegacySessions(McpUser):
    """2025-11-25 sessions, start to end; a user stopped mid-session still ends it (on_stop)."""

    def on_start(self) -> None:
        super().on_start()
        self.tenant, self.key, server = _tenant_key_server(self.targets)
        self.path = f"/servers/{server}/mcp"
        self.session: str | None = None

    def on_stop(self) -> None:
        if self.session is not None:
            self.delete_session(self.path, key=self.key, session=self.session, name="legacy: DELETE session")
            self.session = None

    @tag("legacy")
    @task
    def session_lifecycle(self) -> None:
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "locust", "version": "1"}}
        answer = self.rpc(self.path, "initialize", params, key=self.key, name="legacy: initialize", modern=False)
        if answer.result is None:
            return
        session = answer.headers.get("mcp-session-id")
        if not session:
            # Counted as its own failure: the calls below would all fail for the same reason.
            self.environment.events.request.fire(
                request_type="POST", name="legacy: initialize", response_time=0, response_length=0,
                exception=AssertionError("initialize answered without an Mcp-Session-Id"), context={},
            )
            return
        self.session = session
        if not self.notify(self.path, "notifications/initialized", key=self.key,
                           name="legacy: notifications/initialized", session=session):
            return
        for _ in range(random.randint(3, 6)):
            tool, arguments = pick_tool()
            answer = self.rpc(self.path, "tools/call", {"name": tool, "arguments": arguments}, key=self.key,
                              name=f"legacy: tools/call {tool}", modern=False, session=session)
            if answer.result is None and answer.status != 200:
                break  # the session is unusable (gone, refused): end it and start another
        self.delete_session(self.path, key=self.key, session=session, name="legacy: DELETE session")
        self.session = None


class AggregateCalls(McpUser):
    """The tenant as one server on `/mcp`: list every tool (all pages), then call namespaced ones."""

    def on_start(self) -> None:
        super().on_start()
        self.tenant, self.key, _ = _tenant_key_server(self.targets)
        self.tools: list[str] = []
        self.list_tools()

    @tag("aggregate")
    @task(1)
    def list_tools(self) -> None:
        names: list[str] = []
        cursor = None
        for _ in range(100):  # pages; a gateway that never stops paging is a failure of its own
            params = {"cursor": cursor} if cursor else {}
            answer = self.rpc("/mcp", "tools/list", params, key=self.key, name="mcp: tools/list", modern=True)
            if answer.result is None:
                return
            names += [t["name"] for t in answer.result.get("tools", ()) if isinstance(t, dict) and "name" in t]
            cursor = answer.result.get("nextCursor")
            if not cursor:
                break
        # Only the tools whose arguments we know (the stub's, the demo server's).
        self.tools = [n for n in names if n.rpartition("__")[2] in TOOL_ARGUMENTS] or self.tools

    @tag("aggregate")
    @task(20)
    def call_tool(self) -> None:
        if not self.tools:
            self.list_tools()
            if not self.tools:
                return
        name = random.choice(self.tools)
        tool = name.rpartition("__")[2]
        self.rpc("/mcp", "tools/call", {"name": name, "arguments": TOOL_ARGUMENTS[tool]}, key=self.key,
                 name=f"mcp: tools/call {tool}", modern=True)


class TenantMix(McpUser):
    """Every call from a tenant drawn by weight (the targets file's `weight`, cycled from --weights)."""

    def on_start(self) -> None:
        super().on_start()
        self.tenants = self.targets["tenants"]
        self.weights = [t.get("weight", 1) for t in self.tenants]

    @tag("tenants")
    @task
    def call_tool(self) -> None:
        tenant = random.choices(self.tenants, self.weights)[0]
        tool, arguments = pick_tool()
        self.rpc(f"/servers/{random.choice(tenant['servers'])}/mcp", "tools/call",
                 {"name": tool, "arguments": arguments}, key=random.choice(tenant["keys"]),
                 name=f"tenant {tenant['name']}: tools/call", modern=True)


class AbusiveClient(McpUser):
    """One client address (X-Forwarded-For, from 198.18.0.0/15, the benchmarking range) spending a tiny quota.

    Expect a few 200s, then 429 from the `api_key` tier, then, once the address has
    `limits.ban_violations` refusals, 429 from `ip_ban` until the ban ends. The gateway must
    trust the load generator as a proxy (`dataplane.trusted_proxies`), or every refusal is
    charged to the load generator's own address and a ban stops every user on it.
    """

    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        abuse = self.targets["abusive"]
        self.key = random.choice(abuse["keys"])
        self.path = f"/servers/{abuse['servers'][0]}/mcp"
        self.address = f"198.{random.randint(18, 19)}.{random.randint(0, 255)}.{random.randint(1, 254)}"

    @tag("abusive")
    @task
    def hammer(self) -> None:
        self.rpc(self.path, "tools/call", {"name": "echo", "arguments": {"text": "again"}}, key=self.key,
                 name="abusive: tools/call", modern=True, headers={"X-Forwarded-For": self.address})
