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
no network. A request costs 1 token on every tier, or what `costs` says for
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


@dataclass(frozen=True, slots=True)
class Limited(Exception):
    """A tier refused: which, its limit and window, and when to try again."""

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


class Limiter:
    def __init__(self, shared: SharedBuckets, settings: LimitSettings, bans: BanList, *, clock=time.monotonic) -> None:
        self.shared = shared
        self.bans = bans
        self.clock = clock
        self.fair = FairQueue(max_queue=settings.queue_max, deadline=settings.queue_deadline)
        self.refusals: dict[str, int] = {}
        self._tenant_seen: dict[uuid.UUID, float] = {}
        self._tenant_weights: dict[uuid.UUID, int] = {}
        self._active_weight = 0
        self._shares_at = -math.inf
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
        self.fair.reconfigure(settings.queue_max, settings.queue_deadline)
        self.bans.reconfigure(settings)  # thresholds, allow and deny ranges
        self._shares_at = -math.inf

    # -- before authentication ---------------------------------------------------------------------

    def check_address(self, address: str | None, now: float) -> None:
        """Deny list, ban, per-address bucket: raises Limited. A decision, not a charge to keep: see `admit`."""
        if address is None:
            return
        bans = self.bans
        if bans.is_denied(address):
            raise self._refused(Limited("ip_deny", 0, "", math.inf, "this address is not allowed to use the gateway",
                                        status=403), None, now)
        if bans.is_allowed_range(address):
            return
        ban = bans.check(address, now)
        if ban is not None:
            raise self._refused(Limited("ip_ban", 0, "", max(1.0, ban.seconds_left()),
                                        f"this address is banned ({ban.reason})"), None, now)
        if self._ip is not None:
            capacity, rate = self._ip
            bucket = self.shared.bucket(("ip", address), capacity, rate, now)
            if not bucket.try_acquire(1.0, now):
                raise self._refused(Limited("ip", self.settings.ip_per_minute, "minute",
                                            bucket.retry_after(1.0, now)), address, now)

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
        now = self.clock()
        taken: list[SharedBucket] = []
        try:
            if key.rate_limit_per_hour:
                self._take(taken, ("key-hour", key.id), key.rate_limit_per_hour,
                           key.rate_limit_per_hour / HOUR, cost, now, "api_key", key.rate_limit_per_hour, "hour")
            if key.rate_limit_per_day:
                self._take(taken, ("key-day", key.id), key.rate_limit_per_day,
                           key.rate_limit_per_day / DAY, cost, now, "api_key", key.rate_limit_per_day, "day")
            role = self._roles.get(key.role)
            if role is not None:
                self._take(taken, ("user", key.user_id), role[0], role[1], cost, now, "user",
                           self.settings.roles[key.role], "minute")
            if self._global is not None:
                capacity, rate = self._global
                share = self._share(key.tenant_id, weight, now)
                bucket = self.shared.bucket("global", capacity, rate, now)
                if self.fair.try_admit(key.tenant_id, weight, cost, now, bucket):
                    # Capacity to spare: the tenant may borrow, up to its burst factor. (Under
                    # contention the fair queue gives each tenant its weighted share instead.)
                    taken.append(bucket)
                    factor = share * self.settings.tenant_burst_factor
                    if factor < 1.0:
                        self._take(taken, ("tenant", key.tenant_id), capacity * factor, rate * factor, cost, now,
                                   "tenant", self.settings.global_per_minute * factor, "minute")
                else:
                    try:
                        await self.fair.wait(key.tenant_id, weight, cost, bucket)
                    except QueueClosed:
                        raise Limited("global", 0, "", 1.0, "the gateway is shutting down", status=503) from None
                    except FairQueueRefusal as exc:
                        raise Limited("global", self.settings.global_per_minute, "minute", exc.retry_after,
                                      "the gateway is at capacity and this tenant's queue "
                                      + ("is full" if isinstance(exc, QueueFull) else "did not move in time")) from None
        except Limited as refused:
            for bucket in taken:
                bucket.refund(cost)
            raise self._refused(refused, address, self.clock()) from None

    def _take(self, taken, key, capacity, rate, cost, now, tier, limit, window) -> None:
        bucket = self.shared.bucket(key, capacity, rate, now)
        if not bucket.try_acquire(cost, now):
            raise Limited(tier, limit, window, bucket.retry_after(cost, now))
        taken.append(bucket)

    def _share(self, tenant_id: uuid.UUID, weight: int, now: float) -> float:
        """This tenant's weighted share of the global rate among the tenants active lately (0..1]."""
        seen = self._tenant_seen
        if tenant_id not in seen:
            self._shares_at = -math.inf  # a tenant joins: cut the shares again
        seen[tenant_id] = now
        self._tenant_weights[tenant_id] = weight
        if now - self._shares_at >= _SHARES_EVERY:
            self._shares_at = now
            for tenant in [t for t, at in seen.items() if now - at > _TENANT_ACTIVE]:
                del seen[tenant]
                self._tenant_weights.pop(tenant, None)
            self._active_weight = sum(self._tenant_weights.values())
        return weight / self._active_weight if self._active_weight else 1.0

    def _refused(self, refused: Limited, address: str | None, now: float) -> Limited:
        self.refusals[refused.tier] = self.refusals.get(refused.tier, 0) + 1
        if address is not None and refused.tier in _OWN_TIERS:
            self.bans.violation(address, now)
        return refused

