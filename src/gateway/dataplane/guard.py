"""Protection and routing around every call the gateway sends upstream.

What it owns, per upstream server (all decided in this process, no network):
- routing: a call addressed to a server that a routing rule covers goes to
  one of the rule's replicas (registry/routing.py), skipping replicas that
  are UNHEALTHY, in MAINTENANCE or behind an open circuit breaker;
- the circuit breaker (registry/breakers.py, shared through Redis): an open
  one refuses at once with 503 and Retry-After;
- the request queue: at most `max_concurrency` calls in flight; more wait,
  tenants served in their weighted turn (limits/fairness.py, the fair queue of
  the rate limiter, with the upstream's free slots as the capacity), at most
  `queue_max` per tenant and `queue_deadline` seconds, else 503;
- the retry budget: a failed safe call (the caller decides which are safe) may go again, to another
  replica where there is one, while the budget holds: each call adds
  `retry_budget` of a retry, and `retry_budget_min` more come every second,
  so retries never multiply load during an outage;
- what each call taught: the breaker's count, the router's latency and calls
  in flight, passive health (registry/health.py `observe`) and the figures
  per server and tool (records/server_stats.py).

What counts as a failure: a transport error, a timeout or an HTTP 5xx from
the upstream. A JSON-RPC error answer, a tool's `isError` result, a 4xx:
the upstream is up and answering, so a success for breaker and health.

What it must not do: hold a slot or a trial call after the call ended (every
`enter` has exactly one `leave`, also when the client goes away).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

from gateway._fast.breaker import ADMITTED, OPEN
from gateway._fast.token_bucket import TokenBucket
from gateway.dataplane.jsonrpc import UPSTREAM_UNAVAILABLE, Refusal
from gateway.limits.fairness import FairQueue, FairQueueRefusal, QueueClosed
from gateway.registry.routing import Router

# Health states a replica is never chosen in.
_DOWN = frozenset({"UNHEALTHY", "MAINTENANCE"})
# List calls: the same question twice gives the same answer, so they may be retried.
SAFE_METHODS = frozenset({
    "tools/list", "resources/list", "resources/templates/list", "prompts/list", "ping", "server/discover",
})


class _Slots:
    """An upstream's calls in flight, as a capacity source for the fair queue."""

    __slots__ = ("limit", "in_flight", "queue")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.queue: FairQueue | None = None

    def try_acquire(self, cost: float, now: float) -> bool:
        if self.in_flight < self.limit:
            self.in_flight += 1
            return True
        return False

    def retry_after(self, cost: float, now: float) -> float:
        # No clock frees a slot: a call ending does, and wakes the queue (`free`).
        return 3600.0

    def refund(self, cost: float) -> None:
        self.free()

    def free(self) -> None:
        self.in_flight -= 1
        queue = self.queue
        if queue is not None and queue.queued:
            queue.wake()


class _Upstream:
    """What the guard keeps for one upstream server, and its references into the boards it reports to.

    `breaker` and `replica` are the server's own CircuitBreaker and ReplicaStats,
    kept so a call costs one lookup (this object) instead of one per board;
    they are fetched again after every configuration change (`epoch`).
    """

    __slots__ = ("slots", "queue", "budget", "settings", "breaker", "replica", "epoch")

    def __init__(self, settings, now: float) -> None:
        self.breaker = None
        self.replica = None
        self.epoch = -1
        self.settings = settings
        self.slots = _Slots(settings.max_concurrency)
        self.queue = FairQueue(max_queue=settings.queue_max, deadline=settings.queue_deadline)
        self.slots.queue = self.queue
        self.budget = _budget(settings, now)

    def reconfigure(self, settings, now: float) -> None:
        if settings is self.settings:
            return
        old, self.settings = self.settings, settings
        self.slots.limit = settings.max_concurrency
        self.queue.reconfigure(settings.queue_max, settings.queue_deadline)
        if (settings.retry_budget, settings.retry_budget_min) != (old.retry_budget, old.retry_budget_min):
            self.budget = _budget(settings, now)


def _budget(settings, now: float) -> TokenBucket:
    """Retries left for one upstream: a token bucket refilled at `retry_budget_min` a second, to which
    each call gives back `retry_budget` of a retry (`refund`); a retry takes one token."""
    return TokenBucket(max(1.0, settings.retry_budget_min), settings.retry_budget_min, now)


class Ticket:
    """One call let through by `UpstreamGuard.enter`: give it back with `leave`, once.

    `ok` is what the call found: True (answered), False (transport error,
    timeout, 5xx), None (no result: not sent, or the client went away).
    `held`: a relayed stream took the ticket over and gives it back at its end.
    """

    __slots__ = ("server", "breaker", "started", "upstream", "ok", "held", "left", "tenant_id", "tool")

    def __init__(self, server, breaker: int, started: float, upstream: _Upstream, tenant_id, tool) -> None:
        self.server = server
        self.tenant_id = tenant_id
        self.tool = tool  # the tool called, for per-tool figures; None for other methods
        self.breaker = breaker  # the breaker's ticket
        self.started = started
        self.upstream = upstream
        self.ok: bool | None = None
        self.held = False
        self.left = False


class UpstreamGuard:
    def __init__(self, breakers, health=None, stats=None, *, clock: Callable[[], float] = time.monotonic) -> None:
        """`breakers`: a BreakerBoard; `health`: a HealthMonitor, `stats`: a ServerStats (their `observe`), or None."""
        self.breakers = breakers
        self.health = health
        self.stats = stats
        self.router = Router()
        self.clock = clock
        self._upstreams: dict[uuid.UUID, _Upstream] = {}
        self._epoch = 0  # configurations seen: an _Upstream of an older one fetches its references again

    def configure(self, snapshot) -> None:
        """Follow a new snapshot: breakers for its servers, new queue and budget settings, forget the gone."""
        servers = {s.id: s for s in snapshot.servers.values()}
        self.breakers.configure((s.id, s.settings) for s in servers.values())
        self._epoch += 1
        now = self.clock()
        for server_id in [s for s in self._upstreams if s not in servers]:
            upstream = self._upstreams.pop(server_id)
            upstream.queue.close()
        for server_id, upstream in self._upstreams.items():
            upstream.reconfigure(servers[server_id].settings, now)

    def close(self) -> None:
        """Shutdown: every call waiting for a slot is refused at once."""
        for upstream in self._upstreams.values():
            upstream.queue.close()

    # -- routing ----------------------------------------------------------------------------------------

    def usable(self, server, now: float | None = None) -> bool:
        """Whether a call may be sent to `server` now: not down, breaker not refusing."""
        if server.health_status in _DOWN:
            return False
        if now is None:
            now = self.clock()
        breaker = self._upstream(server, now).breaker
        return breaker is None or breaker.retry_after(now) == 0.0

    def route(self, snapshot, server, tool: str | None):
        """The server that takes a call addressed to `server` and the rule that chose it (None: no rule).

        Raises Refusal(503) when a rule covers the call and none of its replicas is usable.
        """
        route = snapshot.routing.route(server, tool) if snapshot.routing.by_tenant else None
        if route is None:
            return server, None
        now = self.clock()
        chosen = self.router.choose(route, lambda s: self.usable(s, now))
        if chosen is None:
            raise Refusal(
                503, UPSTREAM_UNAVAILABLE,
                f"No replica of '{server.name}' can take calls now (routing rule '{route.name}': every replica "
                "is unhealthy, in maintenance or behind an open circuit breaker); retry later",
                headers={"Retry-After": str(self._retry_seconds(route.replicas, now))},
            )
        return chosen, route

    def replicas(self, snapshot, server, tool: str | None) -> tuple:
        """Every replica a routing rule gives a call to `server`, or ()."""
        route = snapshot.routing.route(server, tool) if snapshot.routing.by_tenant else None
        return tuple(r.server for r in route.replicas) if route is not None else ()

    def failover(self, route, tried: list):
        """The replica of `route` (or None) a retry goes to: a usable one not tried yet, the least busy first."""
        if route is None:
            return None
        now = self.clock()
        left = [r.server for r in route.replicas if r.server not in tried and self.usable(r.server, now)]
        if not left:
            return None
        return min(left, key=lambda r: self.router.outstanding(r.id))

    # -- one call ---------------------------------------------------------------------------------------

    async def enter(self, server, tenant_id, tool: str | None = None, tenants=None) -> Ticket:
        """Let one call to `server` go: its breaker agrees and it has a slot (it may wait for one).

        `tenants` (the snapshot's, for the tenant's weight) is read only when the call has to wait.
        Raises Refusal(503) with Retry-After when the breaker is open or the queue refuses.
        """
        now = self.clock()
        upstream = self._upstreams.get(server.id)
        if upstream is None or upstream.epoch != self._epoch:
            upstream = self._upstream(server, now)
        breaker = upstream.breaker
        trial = breaker.allow(now) if breaker is not None else ADMITTED
        if not trial:
            retry = self.breakers.retry_after(server.id, now)
            raise Refusal(
                503, UPSTREAM_UNAVAILABLE,
                f"Server '{server.name}' is failing and its circuit breaker is open: calls are refused for "
                f"{_seconds(retry)} s, then a few are tried again",
                headers={"Retry-After": str(_seconds(retry))},
                data={"breaker": "open", "retry_after": _seconds(retry)},
            )
        slots = upstream.slots
        if not upstream.queue.try_admit(tenant_id, 100, 1.0, now, slots):
            tenant = tenants.get(tenant_id) if tenants is not None else None
            weight = tenant.weight if tenant is not None else 100
            try:
                await upstream.queue.wait(tenant_id, weight, 1.0, slots)
            except (FairQueueRefusal, QueueClosed) as exc:
                if breaker is not None:
                    breaker.release(trial)
                retry = _seconds(min(exc.retry_after, upstream.settings.queue_deadline or 1.0))
                raise Refusal(
                    503, UPSTREAM_UNAVAILABLE,
                    f"Server '{server.name}' has {slots.limit} calls in flight and its queue "
                    f"{'is full' if 'full' in str(exc) else 'did not move in time'}; retry in {retry} s",
                    headers={"Retry-After": str(retry)},
                ) from None
            except BaseException:
                if breaker is not None:
                    breaker.release(trial)
                raise
            now = self.clock()
        upstream.budget.refund(upstream.settings.retry_budget)
        upstream.replica.started()
        return Ticket(server, trial, now, upstream, tenant_id, tool)

    def _upstream(self, server, now: float) -> _Upstream:
        """The guard's state of `server`, its references to the boards fetched for this configuration."""
        upstream = self._upstreams.get(server.id)
        if upstream is None:
            upstream = self._upstreams[server.id] = _Upstream(server.settings, now)
        if upstream.epoch != self._epoch:
            upstream.breaker = self.breakers.breaker(server.id)
            upstream.replica = self.router.stats(server.id)
            upstream.epoch = self._epoch
        return upstream

    def leave(self, ticket: Ticket, *, stream_ended: bool = False) -> None:
        """The call ended, as `ticket.ok` says; a ticket a stream holds is given back only when it ended."""
        if ticket.left or (ticket.held and not stream_ended):
            return
        ticket.left = True
        ok = ticket.ok
        upstream = ticket.upstream
        upstream.slots.free()
        breaker = upstream.breaker if upstream.epoch == self._epoch else self.breakers.breaker(ticket.server.id)
        if ok is None:
            if breaker is not None:
                breaker.release(ticket.breaker)
            upstream.replica.finished(None)
            return
        server_id = ticket.server.id
        now = self.clock()
        if breaker is not None and breaker.record(ok, now):
            self.breakers.transition(server_id, breaker, now)
        elapsed = now - ticket.started
        upstream.replica.finished(elapsed if ok else None)
        if self.health is not None:
            self.health.observe(server_id, ok, elapsed * 1000.0)
        if self.stats is not None:
            self.stats.observe(ticket.tenant_id, server_id, ticket.tool, ok, elapsed)

    def may_retry(self, server) -> bool:
        """Whether the retry budget of `server` allows one more attempt now (and takes it)."""
        upstream = self._upstreams.get(server.id)
        if upstream is None or upstream.settings.retry_attempts == 0:
            return False
        return upstream.budget.try_acquire(1.0, self.clock())

    # -- what metrics show ------------------------------------------------------------------------------

    def queue_figures(self) -> list[tuple[tuple[str, str], float]]:
        """(server id, in_flight | queued) -> count, for every upstream called since start."""
        figures = []
        for server_id, upstream in self._upstreams.items():
            figures.append(((str(server_id), "in_flight"), upstream.slots.in_flight))
            figures.append(((str(server_id), "queued"), upstream.queue.queued))
        return figures

    def _retry_seconds(self, replicas, now: float) -> int:
        waits = [self.breakers.retry_after(r.server.id, now) for r in replicas
                 if self.breakers.state(r.server.id) == OPEN]
        return _seconds(min(waits)) if waits else 5


def _seconds(value: float) -> int:
    """Retry-After as sent: whole seconds, at least 1."""
    return max(1, math.ceil(value)) if math.isfinite(value) else 3600
