"""Routing rules compiled against servers, and the Router's choice of replica under each strategy."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from gateway.registry.routing import RoutingTable, Router

TENANT = uuid.uuid4()
OTHER = uuid.uuid4()


@dataclass(frozen=True)
class Server:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    tags: tuple[str, ...] = ()
    health_status: str = "HEALTHY"


def servers(*names: str, tenant=TENANT, tags=()) -> dict[str, Server]:
    return {n: Server(uuid.uuid4(), tenant, n, tuple(tags)) for n in names}


def rule(name="r", *, priority=10, targets=(), target_tags=(), match_server=None, match_tool=None, match_tags=(),
         strategy="weighted_round_robin", tenant=TENANT, enabled=True) -> dict:
    return {
        "id": uuid.uuid4(), "tenant_id": tenant, "name": name, "priority": priority, "enabled": enabled,
        "match_server": match_server, "match_tool": match_tool, "match_tags": list(match_tags), "strategy": strategy,
        "targets": [{"server_id": str(s.id), "weight": w} for s, w in targets], "target_tags": list(target_tags),
    }


def picks(router: Router, route, n: int, usable=lambda s: True) -> list[str]:
    return [router.choose(route, usable).name for _ in range(n)]


def test_matching_by_server_glob_tool_glob_and_tags_first_by_priority():
    s = servers("search-a", "search-b", "mail")
    tagged = Server(uuid.uuid4(), TENANT, "tagged", ("eu",))
    table = RoutingTable.build([
        rule("late", priority=50, match_server="search-*", targets=[(s["search-b"], 1)]),
        rule("early", priority=5, match_server="search-*", match_tool="web_*", targets=[(s["search-a"], 1)]),
        rule("eu", priority=1, match_tags=["eu"], targets=[(tagged, 1)]),
        rule("off", priority=0, match_server="*", targets=[(s["mail"], 1)], enabled=False),
    ], [*s.values(), tagged])
    assert table.route(s["search-a"], "web_search").name == "early"
    assert table.route(s["search-a"], "other").name == "late"
    assert table.route(s["search-b"], None).name == "late"  # lists match a rule without a tool glob
    assert table.route(s["mail"], "web_search") is None  # the disabled rule never routes
    assert table.route(tagged, None).name == "eu"


def test_replicas_stay_in_the_tenant_and_come_from_targets_and_tags():
    mine = servers("a", "b", tags=("pool",))
    theirs = servers("x", tenant=OTHER, tags=("pool",))
    table = RoutingTable.build([
        rule(match_server="a", targets=[(theirs["x"], 5), (mine["a"], 3)], target_tags=["pool"]),
    ], [*mine.values(), *theirs.values()])
    route = table.route(mine["a"], None)
    assert {(r.server.name, r.weight) for r in route.replicas} == {("a", 3), ("b", 1)}


def test_a_rule_whose_replicas_are_gone_routes_nothing():
    gone = Server(uuid.uuid4(), TENANT, "gone")
    s = servers("a")
    table = RoutingTable.build([rule(match_server="a", targets=[(gone, 1)])], s.values())
    assert table.route(s["a"], None) is None


def test_weighted_round_robin_is_smooth_and_exact():
    s = servers("a", "b", "c")
    table = RoutingTable.build([rule(targets=[(s["a"], 5), (s["b"], 1), (s["c"], 1)])], s.values())
    route = table.route(s["a"], None)
    chosen = picks(Router(), route, 70)
    assert (chosen.count("a"), chosen.count("b"), chosen.count("c")) == (50, 10, 10)
    # Smooth: every cycle of 7 already holds the exact shares, the light ones spread inside it.
    for cycle in range(10):
        window = chosen[cycle * 7:(cycle + 1) * 7]
        assert (window.count("a"), window.count("b"), window.count("c")) == (5, 1, 1)
        assert window[0] == "a" and "b" in window[1:4] and "c" in window[3:6]


def test_unusable_replicas_are_skipped_and_none_left_is_none():
    s = servers("a", "b")
    table = RoutingTable.build([rule(targets=[(s["a"], 1), (s["b"], 1)])], s.values())
    route = table.route(s["a"], None)
    router = Router()
    assert set(picks(router, route, 6, usable=lambda srv: srv.name != "a")) == {"b"}
    assert router.choose(route, lambda srv: False) is None


def test_least_outstanding_prefers_the_idle_replica_relative_to_weight():
    s = servers("a", "b")
    table = RoutingTable.build([rule(strategy="least_outstanding", targets=[(s["a"], 2), (s["b"], 1)])],
                               s.values())
    route = table.route(s["a"], None)
    router = Router()
    for _ in range(3):
        router.started(s["a"].id)  # a: 3 in flight / weight 2 = 1.5
    router.started(s["b"].id)  # b: 1 / 1 = 1.0
    assert router.choose(route, lambda srv: True).name == "b"
    router.finished(s["a"].id, 0.01)
    router.finished(s["a"].id, 0.01)  # a: 1 / 2 = 0.5
    assert router.choose(route, lambda srv: True).name == "a"


def test_lowest_latency_measures_each_then_prefers_the_fastest_and_still_explores():
    s = servers("fast", "slow")
    table = RoutingTable.build([rule(strategy="lowest_latency", targets=[(s["fast"], 1), (s["slow"], 1)])],
                               s.values())
    route = table.route(s["fast"], None)
    router = Router()
    first = {router.choose(route, lambda srv: True).name for _ in range(2)}
    assert first == {"fast", "slow"}  # the unmeasured go first
    for server, seconds in ((s["fast"], 0.010), (s["slow"], 0.200)):
        router.started(server.id)
        router.finished(server.id, seconds)
    chosen = picks(router, route, 64)
    assert chosen.count("fast") >= 56 and chosen.count("slow") >= 2  # one call in 16 explores
