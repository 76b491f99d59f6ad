"""The rate-limit tiers, in the order a request meets them.

Before authentication, by client address: the deny list (403), a ban (429 until
it ends), the per-address bucket (`ip_per_minute`; addresses in `ip_allow`
skip both the bucket and bans). A request whose credentials fail is charged
to the address's anonymous bucket (`anonymous_per_minute`) and gets 429
instead of 401 once that is spent, so guessing keys is slow.

After authentication, by principal: the key's hour and day quotas
(`rate_limit_per_hour`/`_per_day`), the user's bucket by role (`roles`), then
the global bucket through the fair queue. With capacity to spare a tenant may
borrow beyond its weighted share, up to `tenant_burst_factor` times it (the
tenant's bucket); when the global bucket is empty, requests wait in per-tenant
queues served by weight (limits/fairness.py) up to `queue_deadline`, and only a
full queue or a missed deadline is refused.

Every bucket is shared by all processes (limits/shared.py); a decision reads
no network. The request path is synchronous unless the request has to queue:
`admit_now` decides every tier at once and only answers a `Pending` to await
(`wait`) when the global bucket is contended. What a principal needs (its
buckets, its tenant's state) is looked up once and kept in a `_Principal`,
and what an address needs in an `_Address`, so a decision is a few attribute
reads and compiled bucket calls, not a dozen dictionary lookups (every
`uuid.UUID` hash is a Python call). Both caches are dropped when the settings
change or the shared buckets forget one of theirs (`SharedBuckets.epoch`). A request costs 1 token on every tier, or what `costs` says for
its method or tool. A tier that refuses gives back what the tiers before it
took, so a refused request costs nothing. A refusal by a limit of the client's own
(address, anonymous, key, user) counts as a violation of its address
(limits/bans.py), and enough of them ban it; a full tenant or gateway does not.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from gateway.config import LimitSettings
from gateway.limits.fairness import FairQueue, FairQueueRefusal, QueueClosed, QueueFull
from gateway.limits.bans import BanList
from gateway.limits.shared import SharedBucket, SharedBuckets

HOUR = 3600.0
DAY = 86400.0
# Tenants that sent nothing for this long do not count when shares are cut.
_TENANT_ACTIVE = 60.0
# How often the tenants' shares are recomputed.
_SHARES_EVERY = 1.0
# Refusals that count against the client's address toward a ban: limits of its
# own, not the shared capacity of its tenant or of the gateway.
_OWN_TIERS = frozenset({"ip", "anonymous", "api_key", "user"})


@dataclass(eq=False)
class Limited(Exception):
    """A tier refused: which, its limit and window, and when to try again."""

    # Not frozen: raising and re-raising an exception writes its __traceback__.

    tier: str  # ip_deny, ip_ban, ip, anonymous, api_key, user, tenant, global
    limit: float
    window: str  # "minute", "hour", "day", or "" when no count applies
    retry_after: float  # seconds; inf: not by waiting
    reason: str = ""
    status: int = 429  # 403: the deny list; 503: shutting down

    @property
    def retry_seconds(self) -> int:
        """Retry-After as sent: whole seconds, at least 1 (an hour when waiting never helps)."""
        return max(1, math.ceil(self.retry_after)) if self.retry_after != math.inf else 3600


def _per_minute(per_minute: float, burst_seconds: float) -> tuple[float, float]:
    """(capacity, refill per second) of a per-minute limit: `burst_seconds` of it, at least one request."""
    rate = per_minute / 60.0
    return max(1.0, rate * burst_seconds), rate


class _Tenant:
    """A tenant as the tenant tier sees it: when it was last active, its weight, its bucket."""

    __slots__ = ("id", "weight", "seen", "active", "bucket", "factor")

    def __init__(self, tenant_id: uuid.UUID, weight: int) -> None:
        self.id = tenant_id
        self.weight = weight
        self.seen = -math.inf
        self.active = False  # counted among the tenants sharing the global rate
        self.bucket: SharedBucket | None = None  # for `factor`; None: look it up again
        self.factor = 1.0


class _Principal:
    """One API key's tiers, looked up once: (bucket, tier, limit, window) in order, and its tenant."""

    __slots__ = ("key", "tiers", "tenant")

    def __init__(self, key, tiers: tuple, tenant: _Tenant) -> None:
        # The KeyEntry (or JWT principal) it was built from: a different one builds it again.
        self.key = key
        self.tiers = tiers
        self.tenant = tenant


class _Address:
    """A client address as the address tiers see it."""

    __slots__ = ("key", "allowed", "denied", "bucket")

    def __init__(self, key: str, allowed: bool, denied: bool, bucket: SharedBucket | None) -> None:
        self.key = key  # as bans know it (normalized)
        self.allowed = allowed
        self.denied = denied
        self.bucket = bucket  # the per-address bucket, None when there is none or it is skipped


class Pending:
    """An admitted-so-far request that must queue for the global bucket: pass it to `Limiter.wait`."""

    __slots__ = ("principal", "cost", "address", "taken", "source")

    def __init__(self, principal: _Principal, cost: float, address: str | None, taken: list,
                 source: SharedBucket) -> None:
        self.principal = principal
        self.cost = cost
        self.address = address
        self.taken = taken  # the buckets already charged, refunded if the wait fails
        self.source = source  # the global bucket


# Cached principals and addresses, each: past this many, the cache starts over.
_CACHE_MAX = 65_536


class Limiter:
    def __init__(self, shared: SharedBuckets, settings: LimitSettings, bans: BanList, *, clock=time.monotonic) -> None:
        self.shared = shared
        self.bans = bans
        self.clock = clock
        self.fair = FairQueue(max_queue=settings.queue_max, deadline=settings.queue_deadline)
        self.refusals: dict[str, int] = {}
        self._tenants: dict[uuid.UUID, _Tenant] = {}
        self._active: list[_Tenant] = []
        self._active_weight = 0
        self._shares_at = -math.inf
        self._principals: dict = {}  # key prefix (a JWT principal: its id) -> _Principal
        self._addresses: dict[str, _Address] = {}
        self._epoch = -1
        self._global_bucket: SharedBucket | None = None
        self.configure(settings)

    def configure(self, settings: LimitSettings) -> None:
        """Apply new settings (a snapshot change); buckets take their new limits as they are next used."""
        self.settings = settings
        burst = settings.burst_seconds
        self._global = _per_minute(settings.global_per_minute, burst) if settings.global_per_minute else None
        self._roles = {role: _per_minute(n, burst) for role, n in settings.roles.items() if n}
        self._ip = _per_minute(settings.ip_per_minute, burst) if settings.ip_per_minute else None
        self._anonymous = _per_minute(settings.anonymous_per_minute, burst) if settings.anonymous_per_minute else None
        self._costs = dict(settings.costs)
        self._burst_factor = settings.tenant_burst_factor
        self.fair.reconfigure(settings.queue_max, settings.queue_deadline)
        self.bans.reconfigure(settings)  # thresholds, allow and deny ranges
        self._forget()

    def _forget(self) -> None:
        """Drop every cached lookup: the next decisions look their buckets up again."""
        self._principals = {}
        self._addresses = {}
        self._global_bucket = None
        for tenant in self._tenants.values():
            tenant.bucket = None
        self._shares_at = -math.inf
        self._epoch = self.shared.epoch

    # -- before authentication ---------------------------------------------------------------------

    def check_address(self, address: str | None, now: float) -> None:
        """Deny list, ban, per-address bucket: raises Limited. A decision, not a charge to keep: see `admit`."""
        if address is None:
            return
        if self._epoch != self.shared.epoch:
            self._forget()
        state = self._addresses.get(address)
        if state is None:
            state = self._address(address, now)
        if state.denied:
            raise self._refused(Limited("ip_deny", 0, "", math.inf, "this address is not allowed to use the gateway",
                                        status=403), None, now)
        if state.allowed:
            return
        ban = self.bans.ban_of(state.key, now)
        if ban is not None:
            raise self._refused(Limited("ip_ban", 0, "", max(1.0, ban.seconds_left()),
                                        f"this address is banned ({ban.reason})"), None, now)
        bucket = state.bucket
        if bucket is not None and not bucket.try_acquire(1.0, now):
            raise self._refused(Limited("ip", self.settings.ip_per_minute, "minute",
                                        bucket.retry_after(1.0, now)), address, now)

    def _address(self, address: str, now: float) -> _Address:
        key, allowed, denied = self.bans.classify(address)
        bucket = None
        if self._ip is not None and not allowed and not denied:
            capacity, rate = self._ip
            bucket = self.shared.bucket(("ip", address), capacity, rate, now)
        if len(self._addresses) >= _CACHE_MAX:
            self._addresses = {}
        state = self._addresses[address] = _Address(key, allowed, denied, bucket)
        return state

    def anonymous(self, address: str | None, now: float) -> Limited | None:
        """A request whose credentials failed: charge its address; the refusal to send instead of 401, if any."""
        if address is None or self._anonymous is None or self.bans.is_allowed_range(address):
            return None
        capacity, rate = self._anonymous
        bucket = self.shared.bucket(("anon", address), capacity, rate, now)
        if bucket.try_acquire(1.0, now):
            return None
        return self._refused(Limited("anonymous", self.settings.anonymous_per_minute, "minute",
                                     bucket.retry_after(1.0, now)), address, now)

    # -- after authentication ----------------------------------------------------------------------

    def cost(self, method: str | None, target: str | None) -> float:
        costs = self._costs
        if not costs or method is None:
            return 1.0
        if target is not None:
            cost = costs.get(f"{method}:{target}")
            if cost is not None:
                return cost
        return costs.get(method, 1.0)

    def close(self) -> None:
        """Shutdown: every request waiting in the fair queue is refused at once."""
        self.fair.close()

    async def admit(self, key, weight: int, address: str | None, cost: float = 1.0) -> None:
        """Charge every tier of an authenticated request, or raise Limited having charged none."""
        pending = self.admit_now(key, weight, address, cost, self.clock())
        if pending is not None:
            await self.wait(pending)

    def admit_now(self, key, weight: int, address: str | None, cost: float, now: float) -> Pending | None:
        """Charge every tier it can decide now: None when the request is admitted.

        A `Pending` when every tier but the global one admitted it and the global
        bucket is contended: `await wait(pending)` queues it fairly. Raises
        Limited having charged nothing.
        """
        if self._epoch != self.shared.epoch:
            self._forget()
        try:
            handle = key.prefix
        except AttributeError:  # a JWT's principal (auth/oidc.py): no key, its id instead
            handle = key.id
        principal = self._principals.get(handle)
        if principal is None or principal.key is not key:
            if principal is not None and principal.key == key:
                # The same key in a newer snapshot: compared once (a dataclass's __eq__, ~4k instructions),
                # then known by its identity again.
                principal.key = key
            else:
                principal = self._principal(key, handle, now)
        taken = None
        for bucket, tier, limit, window in principal.tiers:
            if not bucket.try_acquire(cost, now):
                refused = Limited(tier, limit, window, bucket.retry_after(cost, now))
                if taken is not None:
                    for earlier in taken:
                        earlier.refund(cost)
                raise self._refused(refused, address, now)
            if taken is None:
                taken = [bucket]
            else:
                taken.append(bucket)
        if self._global is None:
            return None
        tenant = principal.tenant
        tenant.seen = now
        if weight != tenant.weight or not tenant.active:
            tenant.weight = weight
            self._activate(tenant)
        if now - self._shares_at >= _SHARES_EVERY:
            self._cut_shares(now)
        bucket = self._global_bucket
        if bucket is None:
            capacity, rate = self._global
            bucket = self._global_bucket = self.shared.bucket("global", capacity, rate, now)
        if not self.fair.try_admit(tenant.id, weight, cost, now, bucket):
            return Pending(principal, cost, address, taken or [], bucket)
        # Capacity to spare: the tenant may borrow, up to its burst factor. (Under
        # contention the fair queue gives each tenant its weighted share instead.)
        if tenant.factor < 1.0:
            mine = tenant.bucket
            if mine is None:
                capacity, rate = self._global
                factor = tenant.factor
                mine = tenant.bucket = self.shared.bucket(("tenant", tenant.id), capacity * factor, rate * factor, now)
            if not mine.try_acquire(cost, now):
                refused = Limited("tenant", self.settings.global_per_minute * tenant.factor, "minute",
                                  mine.retry_after(cost, now))
                bucket.refund(cost)
                for earlier in taken or ():
                    earlier.refund(cost)
                raise self._refused(refused, address, now)
        return None

    async def wait(self, pending: Pending) -> None:
        """Queue for the global bucket in the tenant's turn, or raise Limited having refunded every tier."""
        tenant = pending.principal.tenant
        try:
            await self.fair.wait(tenant.id, tenant.weight, pending.cost, pending.source)
        except (QueueClosed, FairQueueRefusal) as exc:
            for bucket in pending.taken:
                bucket.refund(pending.cost)
            if isinstance(exc, QueueClosed):
                refused = Limited("global", 0, "", 1.0, "the gateway is shutting down", status=503)
            else:
                refused = Limited("global", self.settings.global_per_minute, "minute", exc.retry_after,
                                  "the gateway is at capacity and this tenant's queue "
                                  + ("is full" if isinstance(exc, QueueFull) else "did not move in time"))
            raise self._refused(refused, pending.address, self.clock()) from None
        except BaseException:
            for bucket in pending.taken:  # cancelled (the client went away): it was never admitted
                bucket.refund(pending.cost)
            raise

    def _principal(self, key, handle, now: float) -> _Principal:
        shared = self.shared
        tiers = []
        if key.rate_limit_per_hour:
            n = key.rate_limit_per_hour
            tiers.append((shared.bucket(("key-hour", key.id), n, n / HOUR, now), "api_key", n, "hour"))
        if key.rate_limit_per_day:
            n = key.rate_limit_per_day
            tiers.append((shared.bucket(("key-day", key.id), n, n / DAY, now), "api_key", n, "day"))
        role = self._roles.get(key.role)
        if role is not None:
            tiers.append((shared.bucket(("user", key.user_id), role[0], role[1], now), "user",
                          self.settings.roles[key.role], "minute"))
        tenant = self._tenants.get(key.tenant_id)
        if tenant is None:
            tenant = self._tenants[key.tenant_id] = _Tenant(key.tenant_id, 0)
        if len(self._principals) >= _CACHE_MAX:
            self._principals = {}
        principal = self._principals[handle] = _Principal(key, tuple(tiers), tenant)
        return principal

    def _activate(self, tenant: _Tenant) -> None:
        """A tenant joins the active ones (or changed weight): cut the shares again at once."""
        if not tenant.active:
            tenant.active = True
            self._active.append(tenant)
        self._shares_at = -math.inf

    def _cut_shares(self, now: float) -> None:
        """Each active tenant's weighted share of the global rate x the burst factor; the idle leave."""
        self._shares_at = now
        active = []
        for tenant in self._active:
            if now - tenant.seen > _TENANT_ACTIVE:
                tenant.active = False
                tenant.bucket = None
            else:
                active.append(tenant)
        self._active = active
        total = self._active_weight = sum(t.weight for t in active)
        for tenant in active:
            factor = tenant.weight / total * self._burst_factor if total else 1.0
            if factor != tenant.factor:
                tenant.factor = factor
                tenant.bucket = None  # looked up again with the new limits
        if len(self._tenants) > len(active) + _CACHE_MAX:
            self._tenants = {t.id: t for t in active}
            self._principals = {}

    def _refused(self, refused: Limited, address: str | None, now: float) -> Limited:
        self.refusals[refused.tier] = self.refusals.get(refused.tier, 0) + 1
        if address is not None and refused.tier in _OWN_TIERS:
            self.bans.violation(address, now)
        return refused
