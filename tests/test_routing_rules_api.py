"""Routing rules through the admin API and the CLI, and into every process's snapshot.

Real gateways on PostgreSQL (two on one Redis for the change signal): rules
are created, listed, read, changed and deleted; every invalid body is one 422
naming its fields with nothing written; names are unique per tenant; another
tenant's rule is not found and another tenant's server is refused as a target
exactly like a server that does not exist; a rule written through one
process routes in another's `Snapshot.routing` within a second. What the data
plane does with a route is tests/registry/ (registry/routing.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest

from gateway.snapshot import read_version

NOWHERE = "http://127.0.0.1:9/mcp"  # servers that are only routed to in these tests, never called


async def _key(gw, tenant_id: str, name: str, role: str = "ADMIN", scopes=("admin", "read")) -> str:
    status, user = await gw.admin("POST", "/users", {"tenant_id": tenant_id, "username": name,
                                                     "email": f"{name}@example.com", "role": role})
    assert status == 201, user
    status, key = await gw.admin("POST", "/api-keys", {"user_id": user["id"], "name": name, "scopes": list(scopes)})
    assert status == 201, key
    return key["key"]


async def _server(gw, tenant_id: str, name: str, tags=()) -> str:
    status, server = await gw.admin("POST", "/servers", {"tenant_id": tenant_id, "name": name,
                                                         "endpoint_url": NOWHERE, "tags": list(tags)})
    assert status == 201, server
    return server["id"]


class Tenant:
    """A tenant with servers files (the demo upstream), files-b and files-c (tagged replica), and an admin key."""

    async def setup(self, gw, name: str, upstream: str) -> Tenant:
        t = await gw.tenancy(name, upstream, server_name="files")
        self.id, self.files = t.tenant_id, t.server_id
        self.files_b = await _server(gw, self.id, "files-b", ["replica"])
        self.files_c = await _server(gw, self.id, "files-c", ["replica", "eu"])
        self.admin_key = await _key(gw, self.id, f"{name}-admin")
        return self


@pytest.fixture
async def acme(gateway, mcp_upstream):
    return gateway, await Tenant().setup(gateway, "acme", mcp_upstream)


async def _rules(gw, query: str = "", key: str | None = None) -> list[dict]:
    status, page = await gw.admin("GET", f"/routing-rules{query}", key=key)
    assert status == 200, page
    return page["items"]


# -- create, list, read, change, delete ----------------------------------------------------------
async def test_rules_are_created_listed_read_changed_and_deleted(acme):
    gw, t = acme
    version = await read_version(gw.gateway.engine)
    status, rule = await gw.admin("POST", "/routing-rules", {
        "tenant_id": t.id, "name": "search-replicas", "priority": 10, "match_server": "files", "match_tool": "search_*",
        "match_tags": [], "strategy": "least_outstanding", "targets": [{"server_id": t.files, "weight": 3},
                                                                        {"server_id": t.files_b}],
        "target_tags": ["eu"], "description": "spread the searches",
    })
    assert status == 201, rule
    assert rule["tenant_id"] == t.id and rule["name"] == "search-replicas" and rule["enabled"] is True
    assert rule["priority"] == 10 and rule["strategy"] == "least_outstanding"
    assert rule["match_server"] == "files" and rule["match_tool"] == "search_*" and rule["match_tags"] == []
    assert rule["targets"] == [{"server_id": t.files, "weight": 3, "server_name": "files"},
                               {"server_id": t.files_b, "weight": 1, "server_name": "files-b"}]
    assert rule["target_tags"] == ["eu"] and rule["description"] == "spread the searches"
    # The defaults: priority 100, weighted round robin, enabled, any server and tool.
    status, plain = await gw.admin("POST", "/routing-rules", {"tenant_id": t.id, "name": "all-replicas",
                                                              "target_tags": ["replica"]})
    assert status == 201, plain
    assert (plain["priority"], plain["strategy"], plain["enabled"]) == (100, "weighted_round_robin", True)
    assert plain["match_server"] is None and plain["match_tool"] is None and plain["targets"] == []
    assert await read_version(gw.gateway.engine) == version + 2  # every write moves the version

    assert {r["id"] for r in await _rules(gw)} == {rule["id"], plain["id"]}
    assert {r["id"] for r in await _rules(gw, f"?tenant_id={t.id}")} == {rule["id"], plain["id"]}
    assert await _rules(gw, f"?tenant_id={uuid.uuid4()}") == []
    status, page = await gw.admin("GET", "/routing-rules?limit=1")
    assert len(page["items"]) == 1 and page["next_cursor"]
    status, rest = await gw.admin("GET", f"/routing-rules?limit=1&cursor={page['next_cursor']}")
    assert len(rest["items"]) == 1 and rest["items"][0]["id"] != page["items"][0]["id"]
    status, got = await gw.admin("GET", f"/routing-rules/{rule['id']}")
    assert status == 200 and got == rule

    # PATCH changes what it gives; null clears a glob.
    status, changed = await gw.admin("PATCH", f"/routing-rules/{rule['id']}", {
        "priority": 5, "strategy": "lowest_latency", "match_tool": None, "enabled": False,
        "targets": [{"server_id": t.files_c, "weight": 1000}],
    })
    assert status == 200, changed
    assert (changed["priority"], changed["strategy"], changed["match_tool"], changed["enabled"]) == (
        5, "lowest_latency", None, False)
    assert changed["targets"] == [{"server_id": t.files_c, "weight": 1000, "server_name": "files-c"}]
    assert changed["match_server"] == "files" and changed["target_tags"] == ["eu"]  # not given: unchanged
    status, got = await gw.admin("GET", f"/routing-rules/{rule['id']}")
    assert got == changed
    assert await read_version(gw.gateway.engine) == version + 3

    # A target unregistered since is shown without a name (the rule stays; the snapshot skips it).
    status, _ = await gw.admin("DELETE", f"/servers/{t.files_c}")
    assert status == 200
    status, got = await gw.admin("GET", f"/routing-rules/{rule['id']}")
    assert got["targets"] == [{"server_id": t.files_c, "weight": 1000, "server_name": None}]

    status, gone = await gw.admin("DELETE", f"/routing-rules/{rule['id']}")
    assert status == 200 and gone == got
    for method in ("GET", "PATCH", "DELETE"):
        status, body = await gw.admin(method, f"/routing-rules/{rule['id']}", {"priority": 1} if method == "PATCH"
                                      else None)
        assert (status, body) == (404, {"error": {"code": "not_found", "message": "routing rule not found"}})
    assert [r["id"] for r in await _rules(gw)] == [plain["id"]]
    status, body = await gw.admin("GET", "/routing-rules/not-a-uuid")
    assert status == 404


async def test_a_tenant_admin_manages_its_own_tenants_rules(acme):
    gw, t = acme
    # Without naming the tenant: its own.
    status, rule = await gw.admin("POST", "/routing-rules", {"name": "r", "targets": [{"server_id": t.files}]},
                                  key=t.admin_key)
    assert status == 201 and rule["tenant_id"] == t.id, rule
    # The operator must name one.
    status, body = await gw.admin("POST", "/routing-rules", {"name": "r2", "targets": [{"server_id": t.files}]})
    assert status == 422 and body["error"]["details"] == [{"field": "tenant_id",
                                                           "message": "is required for the operator"}]
    # A `read` key of an ADMIN reads, and writes nothing; other roles do neither.
    reader = await _key(gw, t.id, "acme-reader", scopes=("read",))
    assert [r["id"] for r in await _rules(gw, key=reader)] == [rule["id"]]
    status, body = await gw.admin("PATCH", f"/routing-rules/{rule['id']}", {"priority": 1}, key=reader)
    assert status == 403 and "'admin'" in body["error"]["message"]
    for role in ("USER", "SERVICE", "READONLY"):
        key = await _key(gw, t.id, f"acme-as-{role.lower()}", role=role, scopes=("admin", "read", "write"))
        for method, path in (("GET", "/routing-rules"), ("GET", f"/routing-rules/{rule['id']}"),
                             ("DELETE", f"/routing-rules/{rule['id']}")):
            status, body = await gw.admin(method, path, key=key)
            assert status == 403 and body["error"]["code"] == "forbidden", (role, method, path, body)
    status, got = await gw.admin("GET", f"/routing-rules/{rule['id']}")
    assert status == 200 and got["priority"] == 100


# -- validation ----------------------------------------------------------------------------------
def _long(n: int) -> str:
    return "a" * n


# (fields over a valid body, the fields the 422 names). FILES: acme's server; RANDOM: a server nobody has.
INVALID = [
    ({"strategy": "random"}, ["strategy"]),
    ({"targets": [{"server_id": "FILES", "weight": 0}]}, ["targets[0].weight"]),
    ({"targets": [{"server_id": "FILES", "weight": 1001}]}, ["targets[0].weight"]),
    ({"targets": [{"server_id": "FILES", "weight": 1.5}]}, ["targets[0].weight"]),
    ({"targets": [{"server_id": "FILES", "weight": "2"}]}, ["targets[0].weight"]),
    ({"targets": [{"weight": 2}]}, ["targets[0].server_id"]),
    ({"targets": [{"server_id": "not-a-uuid"}]}, ["targets[0].server_id"]),
    ({"targets": [{"server_id": "FILES", "colour": "red"}]}, ["targets[0]"]),
    ({"targets": [{"server_id": "FILES"}, {"server_id": "FILES"}]}, ["targets[1].server_id"]),
    ({"targets": [{"server_id": "RANDOM"}]}, ["targets[0].server_id"]),
    ({"targets": [{"server_id": "FILES"}, {"server_id": "RANDOM"}]}, ["targets[1].server_id"]),
    ({"targets": [], "target_tags": []}, ["targets"]),
    ({"targets": None}, ["targets"]),
    ({"match_server": _long(256)}, ["match_server"]),
    ({"match_tool": _long(256)}, ["match_tool"]),
    ({"match_tool": "bad\nglob"}, ["match_tool"]),
    ({"match_server": ""}, ["match_server"]),
    ({"priority": -1}, ["priority"]),
    ({"priority": 10_001}, ["priority"]),
    ({"name": ""}, ["name"]),
    ({"name": None}, ["name"]),
    ({"match_tags": [""]}, ["match_tags"]),
    ({"target_tags": "replica"}, ["target_tags"]),
    ({"enabled": "yes"}, ["enabled"]),
    ({"colour": "blue"}, ["colour"]),
    # Every bad field in one answer.
    ({"strategy": "random", "priority": 10_001, "match_tool": _long(256)}, ["match_tool", "priority", "strategy"]),
]


async def test_an_invalid_rule_is_422_naming_the_field_and_writes_nothing(acme):
    gw, t = acme
    version = await read_version(gw.gateway.engine)
    for fields, expected in INVALID:
        replace = {"FILES": t.files, "RANDOM": str(uuid.uuid4())}
        targets = [{**f, "server_id": replace.get(f.get("server_id"), f.get("server_id"))} if "server_id" in f else f
                   for f in fields.get("targets") or ()]
        body = {"tenant_id": t.id, "name": "r", "targets": [{"server_id": t.files}], **fields}
        if fields.get("targets"):
            body["targets"] = targets
        if body["name"] is None:
            del body["name"]
        status, answer = await gw.admin("POST", "/routing-rules", body)
        assert status == 422, (fields, answer)
        assert answer["error"]["code"] == "validation_failed"
        assert sorted(d["field"] for d in answer["error"]["details"]) == expected, (fields, answer)
        assert all(d["message"] for d in answer["error"]["details"])
    # The messages say what would do.
    status, answer = await gw.admin("POST", "/routing-rules", {"tenant_id": t.id, "name": "r", "strategy": "x"})
    messages = {d["field"]: d["message"] for d in answer["error"]["details"]}
    assert "weighted_round_robin, least_outstanding, lowest_latency" in messages["strategy"]
    assert "target_tags" in messages["targets"]
    assert await _rules(gw) == []
    assert await read_version(gw.gateway.engine) == version


async def test_an_invalid_change_is_422_and_leaves_the_rule_as_it_was(acme):
    gw, t = acme
    status, rule = await gw.admin("POST", "/routing-rules", {"tenant_id": t.id, "name": "r", "priority": 7,
                                                             "targets": [{"server_id": t.files, "weight": 2}]})
    assert status == 201, rule
    status, other = await gw.admin("POST", "/routing-rules", {"tenant_id": t.id, "name": "other",
                                                              "target_tags": ["replica"]})
    assert status == 201, other
    version = await read_version(gw.gateway.engine)
    for fields, expected in (
        ({"strategy": "random"}, ["strategy"]),
        ({"targets": [{"server_id": t.files, "weight": 0}]}, ["targets[0].weight"]),
        ({"targets": [{"server_id": str(uuid.uuid4())}]}, ["targets[0].server_id"]),
        ({"targets": [{"server_id": t.files}, {"server_id": t.files, "weight": 2}]}, ["targets[1].server_id"]),
        ({"targets": []}, ["targets"]),  # and no target_tags: no replica left
        ({"match_server": _long(256), "priority": 10_001}, ["match_server", "priority"]),
        ({}, ["$"]),
        ({"tenant_id": t.id}, ["tenant_id"]),  # a rule does not move between tenants
    ):
        status, answer = await gw.admin("PATCH", f"/routing-rules/{rule['id']}", fields)
        assert status == 422, (fields, answer)
        assert sorted(d["field"] for d in answer["error"]["details"]) == expected, (fields, answer)
    # The rule without targets must keep its tags (the one with targets may drop its own).
    status, answer = await gw.admin("PATCH", f"/routing-rules/{other['id']}", {"target_tags": []})
    assert status == 422 and [d["field"] for d in answer["error"]["details"]] == ["target_tags"], answer
    status, got = await gw.admin("GET", f"/routing-rules/{rule['id']}")
    assert (got["priority"], got["strategy"], got["targets"]) == (
        7, "weighted_round_robin", [{"server_id": t.files, "weight": 2, "server_name": "files"}])
    status, got = await gw.admin("GET", f"/routing-rules/{other['id']}")
    assert got == other
    assert await read_version(gw.gateway.engine) == version


async def test_names_are_unique_per_tenant(acme, mcp_upstream):
    gw, t = acme
    body = {"tenant_id": t.id, "name": "spread", "target_tags": ["replica"]}
    status, first = await gw.admin("POST", "/routing-rules", body)
    assert status == 201, first
    version = await read_version(gw.gateway.engine)
    status, answer = await gw.admin("POST", "/routing-rules", {**body, "priority": 1})
    assert status == 409 and answer["error"]["code"] == "conflict" and "spread" in answer["error"]["message"]
    status, second = await gw.admin("POST", "/routing-rules", {**body, "name": "spread-2"})
    assert status == 201
    status, answer = await gw.admin("PATCH", f"/routing-rules/{second['id']}", {"name": "spread"})
    assert status == 409 and "spread" in answer["error"]["message"], answer
    assert await read_version(gw.gateway.engine) == version + 1  # only spread-2
    # Another tenant has a namespace of its own.
    globex = await Tenant().setup(gw, "globex", mcp_upstream)
    status, theirs = await gw.admin("POST", "/routing-rules", {**body, "tenant_id": globex.id})
    assert status == 201 and theirs["tenant_id"] == globex.id
    assert {r["name"] for r in await _rules(gw, f"?tenant_id={t.id}")} == {"spread", "spread-2"}


# -- tenants -------------------------------------------------------------------------------------
async def test_another_tenants_rule_is_not_found(acme, mcp_upstream):
    gw, t = acme
    globex = await Tenant().setup(gw, "globex", mcp_upstream)
    status, mine = await gw.admin("POST", "/routing-rules", {"name": "mine", "targets": [{"server_id": t.files}]},
                                  key=t.admin_key)
    assert status == 201, mine
    status, theirs = await gw.admin("POST", "/routing-rules", {"name": "theirs", "target_tags": ["replica"]},
                                    key=globex.admin_key)
    assert status == 201, theirs
    assert [r["id"] for r in await _rules(gw, key=globex.admin_key)] == [theirs["id"]]
    assert await _rules(gw, f"?tenant_id={t.id}", key=globex.admin_key) == []
    missing = str(uuid.uuid4())
    for method, body in (("GET", None), ("PATCH", {"priority": 1, "enabled": False}), ("DELETE", None)):
        answers = [await gw.admin(method, f"/routing-rules/{rule_id}", body, key=globex.admin_key)
                   for rule_id in (mine["id"], missing)]
        assert answers[0] == answers[1] == (404, {"error": {"code": "not_found", "message": "routing rule not found"}})
    # Nor can globex write into acme's tenant.
    status, answer = await gw.admin("POST", "/routing-rules", {"tenant_id": t.id, "name": "probe",
                                                               "target_tags": ["replica"]}, key=globex.admin_key)
    assert status == 404, answer
    status, got = await gw.admin("GET", f"/routing-rules/{mine['id']}", key=t.admin_key)
    assert status == 200 and got == mine  # untouched
    assert [r["id"] for r in await _rules(gw, f"?tenant_id={t.id}")] == [mine["id"]]


async def test_another_tenants_server_is_refused_like_a_missing_one(acme, mcp_upstream):
    gw, t = acme
    globex = await Tenant().setup(gw, "globex", mcp_upstream)
    version = await read_version(gw.gateway.engine)

    async def attempt(server_id: str, key: str | None, method: str = "POST", path: str = "/routing-rules"):
        body = {"name": "probe", "targets": [{"server_id": t.files}, {"server_id": server_id, "weight": 2}]}
        if key is None:
            body["tenant_id"] = t.id  # the operator, for acme
        if method == "PATCH":
            body = {"targets": body["targets"]}
        return await gw.admin(method, path, body, key=key)

    for key in (t.admin_key, None):
        theirs = await attempt(globex.files, key)
        random = await attempt(str(uuid.uuid4()), key)
        assert theirs == random, (theirs, random)
        assert theirs[0] == 422 and theirs[1]["error"]["details"] == [
            {"field": "targets[1].server_id", "message": "no server with this id in the rule's tenant"}]
        assert globex.files not in str(theirs)
    assert await _rules(gw) == []
    assert await read_version(gw.gateway.engine) == version
    # And on a change.
    status, rule = await gw.admin("POST", "/routing-rules", {"name": "r", "targets": [{"server_id": t.files}]},
                                  key=t.admin_key)
    assert status == 201
    path = f"/routing-rules/{rule['id']}"
    theirs = await attempt(globex.files, t.admin_key, "PATCH", path)
    random = await attempt(str(uuid.uuid4()), t.admin_key, "PATCH", path)
    assert theirs == random and theirs[0] == 422, theirs
    status, got = await gw.admin("GET", path)
    assert got == rule


# -- into the data plane's snapshot --------------------------------------------------------------
async def _within(predicate, limit: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < limit, "the change never arrived"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_rule_routes_in_every_process_after_the_change_signal(
    pg_url, redis_url, redis_prefix, mcp_upstream, make_gateway
):
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    # Polling every 60 s: only the change signal can deliver within the test.
    a = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    b = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60})
    await asyncio.sleep(0.2)  # both subscribed
    t = await Tenant().setup(a, "acme", mcp_upstream)
    tenant = uuid.UUID(t.id)
    store = b.gateway.store
    await _within(lambda: store.current.server(tenant, "files-c") is not None)

    def route(tool: str | None):
        return store.current.routing.route(store.current.server(tenant, "files"), tool)

    assert route("search_docs") is None
    status, rule = await a.admin("POST", "/routing-rules", {
        "name": "search", "match_server": "files", "match_tool": "search_*", "strategy": "lowest_latency",
        "targets": [{"server_id": t.files, "weight": 3}], "target_tags": ["eu"],
    }, key=t.admin_key)
    assert status == 201, rule
    took = await _within(lambda: route("search_docs") is not None)
    assert took < 1.0
    compiled = route("search_docs")
    assert compiled.id == uuid.UUID(rule["id"]) and compiled.name == "search" and compiled.strategy == "lowest_latency"
    assert {(r.server.name, r.weight) for r in compiled.replicas} == {("files", 3), ("files-c", 1)}
    assert route("echo") is None and route(None) is None  # the tool glob decides

    # A change reaches it the same way: every call to files, all the replicas.
    status, changed = await a.admin("PATCH", f"/routing-rules/{rule['id']}",
                                    {"match_tool": None, "target_tags": ["replica"], "strategy": "least_outstanding"},
                                    key=t.admin_key)
    assert status == 200, changed
    await _within(lambda: route("echo") is not None)
    compiled = route("echo")
    assert compiled.strategy == "least_outstanding"
    assert {(r.server.name, r.weight) for r in compiled.replicas} == {("files", 3), ("files-b", 1), ("files-c", 1)}
    # A lower priority number decides first.
    status, first = await a.admin("POST", "/routing-rules", {"name": "first", "priority": 1,
                                                             "targets": [{"server_id": t.files_b}]}, key=t.admin_key)
    assert status == 201, first
    await _within(lambda: route("echo").name == "first")
    # Disabled: it routes nothing; deleted: gone.
    status, _ = await a.admin("PATCH", f"/routing-rules/{first['id']}", {"enabled": False}, key=t.admin_key)
    assert status == 200
    await _within(lambda: route("echo").name == "search")
    for made in (first, rule):
        status, _ = await a.admin("DELETE", f"/routing-rules/{made['id']}", key=t.admin_key)
        assert status == 200
    await _within(lambda: route("echo") is None)
    assert store.current.routing.by_tenant.get(tenant) is None


# -- the CLI -------------------------------------------------------------------------------------
def _cli(pg_url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = pg_url
    return subprocess.run([sys.executable, "-m", "gateway", *argv], env=env, capture_output=True, text=True,
                          timeout=60)


async def test_routes_on_the_command_line(pg_url, acme):
    gw, t = acme
    made = await asyncio.to_thread(
        _cli, pg_url, "routes", "create", "spread", "--tenant", t.id, "--server", "files", "--tool", "search_*",
        "--target", "files:3", "--target", t.files_b, "--target-tag", "eu", "--strategy", "least_outstanding",
        "--priority", "20",
    )
    assert made.returncode == 0, made.stderr
    (line,) = [x for x in made.stdout.splitlines() if x.startswith("routing_rule_id=")]
    rule_id = line.partition("=")[2]
    status, rule = await gw.admin("GET", f"/routing-rules/{rule_id}")
    assert status == 200, rule
    assert rule["targets"] == [{"server_id": t.files, "weight": 3, "server_name": "files"},
                               {"server_id": t.files_b, "weight": 1, "server_name": "files-b"}]
    assert (rule["match_server"], rule["match_tool"], rule["target_tags"], rule["strategy"], rule["priority"]) == (
        "files", "search_*", ["eu"], "least_outstanding", 20)
    # The poll (0.2 s) brings the CLI's change to the running gateway.
    store = gw.gateway.store
    files = store.current.server(uuid.UUID(t.id), "files")
    await _within(lambda: store.current.routing.route(files, "search_x") is not None)

    listed = await asyncio.to_thread(_cli, pg_url, "routes", "list", "--tenant", t.id)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert rule_id in line and "spread" in line and "files:3" in line and "files-b:1" in line and "tags eu" in line

    for argv, said in (
        (("--target", "nosuch"), "nosuch"),
        (("--target", "files:0"), "targets[0].weight"),
        (("--strategy", "random"), "invalid choice"),
        ((), "targets"),  # no replica
    ):
        refused = await asyncio.to_thread(_cli, pg_url, "routes", "create", "bad", "--tenant", t.id, *argv)
        assert refused.returncode == 2 and said in refused.stderr, (argv, refused.stderr)
    again = await asyncio.to_thread(_cli, pg_url, "routes", "create", "spread", "--tenant", t.id, "--target", "files")
    assert again.returncode == 2 and "already exists" in again.stderr

    gone = await asyncio.to_thread(_cli, pg_url, "routes", "delete", rule_id)
    assert gone.returncode == 0 and "spread" in gone.stderr, gone.stderr
    assert await _rules(gw) == []
    await _within(lambda: store.current.routing.route(files, "search_x") is None)
