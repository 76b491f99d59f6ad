"""Routing rules: which replica of a server answers a call.

What it owns: the rules of table `routing_rules`, compiled into the snapshot
as a `RoutingTable` (globs turned into regular expressions, replicas resolved
to the tenant's active servers), and the `Router`, this process' memory of
each replica's calls in flight and latency, which picks one replica per call.
What it must not do: read the database or the network on the request path.

A rule applies to a call addressed to a server whose name matches
`match_server` (a glob; none: any), which carries every tag of `match_tags`,
for a tool matching `match_tool` (a glob; none: any call, lists included).
The first enabled rule of the tenant by `priority` (then name) decides. Its
replicas are the servers listed in `targets` ({"server_id", "weight"}) and the
tenant's servers carrying every tag of `target_tags` (weight 1 unless
listed), never another tenant's. The strategies:

- weighted_round_robin: smooth weighted round robin (each pick adds every
  candidate's weight to its credit, takes the highest, and charges it the
  total), so 3:1 weights give a a b a, a a b a, ... not bursts;
- least_outstanding: the fewest calls in flight on this process, relative to
  weight; ties go round robin;
- lowest_latency: the lowest moving average of recent latency (a replica not
  yet measured goes first, so each is measured; one call in `_EXPLORE` goes
  round robin, so a replica that was slow once is measured again).

A replica that is UNHEALTHY or in MAINTENANCE, or whose circuit breaker
refuses, is skipped (the caller's `usable`); with none left the call is
refused (503), never sent to a replica known to be down. A rule whose
replicas are all gone (unregistered) routes nothing: the addressed server
answers as if there were no rule.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("weighted_round_robin", "least_outstanding", "lowest_latency")
# Weight of a smoothed latency sample: about the last ten calls count.
_EWMA = 0.2
# lowest_latency: one call in this many goes round robin, to keep every replica's figure fresh.
_EXPLORE = 16
# Routing answers remembered per table, by (server, tool); past this many, the memory starts over.
_MEMO_MAX = 8192


@dataclass(frozen=True, slots=True)
class Replica:
    server: Any  # snapshot.ServerEntry
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled rule."""

    id: uuid.UUID
    name: str
    priority: int
    strategy: str
    server_pattern: re.Pattern | None
    tool_pattern: re.Pattern | None
    match_tags: frozenset[str]
    replicas: tuple[Replica, ...]

    def matches(self, server, tool: str | None) -> bool:
        if self.server_pattern is not None and self.server_pattern.fullmatch(server.name) is None:
            return False
        if self.match_tags and not self.match_tags.issubset(server.tags):
            return False
        if self.tool_pattern is not None and (tool is None or self.tool_pattern.fullmatch(tool) is None):
            return False
        return True


def _glob(pattern: str | None) -> re.Pattern | None:
    if pattern is None or pattern in ("", "*"):
        return None
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Every tenant's rules in the order they are tried."""

    by_tenant: dict[uuid.UUID, tuple[Route, ...]] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, rows: Iterable[Mapping[str, Any]], servers: Iterable[Any]) -> RoutingTable:
        """Compile rule rows (table routing_rules) against the snapshot's servers."""
        by_id = {}
        by_tenant_servers: dict[uuid.UUID, list] = {}
        for server in servers:
            by_id[server.id] = server
            by_tenant_servers.setdefault(server.tenant_id, []).append(server)
        compiled: dict[uuid.UUID, list[Route]] = {}
        for row in rows:
            if not row["enabled"]:
                continue
            tenant_id = row["tenant_id"]
            weights: dict[uuid.UUID, int] = {}
            for target in row["targets"] or ():
                try:
                    server_id = uuid.UUID(str(target["server_id"]))
                    weight = int(target.get("weight", 1))
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue  # the admin API validates; a bad stored value routes nothing
                server = by_id.get(server_id)
                if server is not None and server.tenant_id == tenant_id and weight > 0:
                    weights[server_id] = weight
            wanted_tags = frozenset(row["target_tags"] or ())
            if wanted_tags:
                for server in by_tenant_servers.get(tenant_id, ()):
                    if wanted_tags.issubset(server.tags):
                        weights.setdefault(server.id, 1)
            replicas = tuple(Replica(by_id[s], w) for s, w in sorted(weights.items(), key=lambda i: by_id[i[0]].name))
            if not replicas:
                continue
            compiled.setdefault(tenant_id, []).append(Route(
                id=row["id"], name=row["name"], priority=row["priority"], strategy=row["strategy"],
                server_pattern=_glob(row["match_server"]), tool_pattern=_glob(row["match_tool"]),
                match_tags=frozenset(row["match_tags"] or ()), replicas=replicas,
            ))
        return cls({t: tuple(sorted(rs, key=lambda r: (r.priority, r.name))) for t, rs in compiled.items()})

    def route(self, server, tool: str | None) -> Route | None:
        """The rule deciding a call to `server` (the addressed one) for `tool`, or None."""
        routes = self.by_tenant.get(server.tenant_id)
        if routes is None:
            return None
        # The answer depends only on the server and the tool: remembered for this table's life.
        memo = self._memo
        key = (server.id, tool)
        if key in memo:
            return memo[key]
        found = None
        for route in routes:
            if route.matches(server, tool):
                found = route
                break
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[key] = found
        return found


EMPTY_ROUTING = RoutingTable()


class ReplicaStats:
    """What the strategies know of one server on this process: calls in flight, smoothed latency."""

    __slots__ = ("outstanding", "latency")

    def __init__(self) -> None:
        self.outstanding = 0
        self.latency = -1.0  # seconds, smoothed; negative: not measured yet

    def started(self) -> None:
        self.outstanding += 1

    def finished(self, seconds: float | None) -> None:
        """A call `started` ended; `seconds` its latency when it got an answer (None: failed or cancelled)."""
        if self.outstanding > 0:
            self.outstanding -= 1
        if seconds is not None:
            latency = self.latency
            self.latency = seconds if latency < 0 else latency + _EWMA * (seconds - latency)


class Router:
    """Picks a replica for each call and keeps what the strategies need (this process only)."""

    def __init__(self) -> None:
        self._stats: dict[uuid.UUID, ReplicaStats] = {}
        self._credit: dict[tuple[uuid.UUID, uuid.UUID], float] = {}  # (rule, server) -> smooth WRR credit
        self._turn: dict[uuid.UUID, int] = {}  # rule -> round-robin position for ties
        self._calls: dict[uuid.UUID, int] = {}  # rule -> lowest_latency picks, for exploring

    def choose(self, route: Route, usable: Callable[[Any], bool]) -> Any | None:
        """The replica that takes this call, among those `usable` says yes to; None if none is."""
        replicas = route.replicas
        if len(replicas) == 1:
            only = replicas[0].server
            return only if usable(only) else None
        candidates = [r for r in replicas if usable(r.server)]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0].server
        if route.strategy == "least_outstanding":
            return self._least_outstanding(route, candidates)
        if route.strategy == "lowest_latency":
            return self._lowest_latency(route, candidates)
        return self._weighted_round_robin(route, candidates)

    def stats(self, server_id: uuid.UUID) -> ReplicaStats:
        """The figures of `server_id` (made when first asked): a caller may keep it and call it directly."""
        stats = self._stats.get(server_id)
        if stats is None:
            stats = self._stats[server_id] = ReplicaStats()
        return stats

    def started(self, server_id: uuid.UUID) -> None:
        self.stats(server_id).started()

    def finished(self, server_id: uuid.UUID, seconds: float | None) -> None:
        """A call `started` ended; `seconds` its latency when it got an answer (None: failed or cancelled)."""
        stats = self._stats.get(server_id)
        if stats is not None:
            stats.finished(seconds)

    def outstanding(self, server_id: uuid.UUID) -> int:
        stats = self._stats.get(server_id)
        return 0 if stats is None else stats.outstanding

    def latency(self, server_id: uuid.UUID) -> float | None:
        stats = self._stats.get(server_id)
        return None if stats is None or stats.latency < 0 else stats.latency

    def _weighted_round_robin(self, route: Route, candidates: list[Replica]) -> Any:
        credit = self._credit
        total = 0
        best = None
        best_credit = 0.0
        for replica in candidates:
            slot = (route.id, replica.server.id)
            value = credit.get(slot, 0.0) + replica.weight
            credit[slot] = value
            total += replica.weight
            if best is None or value > best_credit:
                best, best_credit = replica, value
        credit[(route.id, best.server.id)] = best_credit - total
        return best.server

    def _tie_break(self, route: Route, tied: list[Replica]) -> Any:
        turn = self._turn.get(route.id, 0)
        self._turn[route.id] = turn + 1
        return tied[turn % len(tied)].server

    def _least_outstanding(self, route: Route, candidates: list[Replica]) -> Any:
        loads = [(self.outstanding(r.server.id) / r.weight, r) for r in candidates]
        lowest = min(load for load, _ in loads)
        return self._tie_break(route, [r for load, r in loads if load == lowest])

    def _lowest_latency(self, route: Route, candidates: list[Replica]) -> Any:
        unmeasured = [r for r in candidates if self.latency(r.server.id) is None]
        if unmeasured:
            return self._tie_break(route, unmeasured)
        calls = self._calls.get(route.id, 0) + 1
        self._calls[route.id] = calls
        if calls % _EXPLORE == 0:
            return self._tie_break(route, candidates)
        return min(candidates, key=lambda r: self.latency(r.server.id)).server
