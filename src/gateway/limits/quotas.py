"""Per-API-key quotas: `rate_limit_per_hour` and `rate_limit_per_day`.

Each key gets two token buckets from `gateway._fast` (compiled): one holding an
hour's allowance and refilling it over an hour, one likewise for the day. A
request must find a token in both; if the day refuses after the hour agreed,
the hour's token is given back, so a refused request costs nothing.

Buckets live here, not in the snapshot, so a configuration reload keeps each
key's remaining allowance; `resize` applies changed limits and forgets keys
that are gone. State is per process in this version (Redis leasing comes with
the distributed limiter).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from gateway._fast.token_bucket import TokenBucket
from gateway.snapshot import KeyEntry, Snapshot

HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    window: str  # "hour" or "day"
    limit: int
    retry_after: float


class _KeyBuckets:
    __slots__ = ("hour", "day", "per_hour", "per_day", "is_key")

    def __init__(self, per_hour: int, per_day: int, now: float, is_key: bool = True) -> None:
        # False for a token principal (auth/oidc.py): not in the snapshot, so kept while it has used any allowance.
        self.is_key = is_key
        self.per_hour = per_hour
        self.per_day = per_day
        self.hour = TokenBucket(per_hour, per_hour / HOUR, now)
        self.day = TokenBucket(per_day, per_day / DAY, now)


class KeyQuotas:
    def __init__(self) -> None:
        self._buckets: dict[uuid.UUID, _KeyBuckets] = {}

    def try_acquire(self, key: KeyEntry, now: float, cost: float = 1.0) -> QuotaRefusal | None:
        """None when admitted; otherwise which window refused and when to retry."""
        buckets = self._buckets.get(key.id)
        if buckets is None:
            buckets = self._buckets[key.id] = _KeyBuckets(
                key.rate_limit_per_hour, key.rate_limit_per_day, now, isinstance(key, KeyEntry)
            )
        if not buckets.hour.try_acquire(cost, now):
            return QuotaRefusal("hour", buckets.per_hour, buckets.hour.retry_after(cost, now))
        if not buckets.day.try_acquire(cost, now):
            buckets.hour.refund(cost)
            return QuotaRefusal("day", buckets.per_day, buckets.day.retry_after(cost, now))
        return None

    def resize(self, snapshot: Snapshot, now: float) -> None:
        """Apply limits changed in the new snapshot; forget keys it no longer has.

        Token principals are never in the snapshot: their buckets are forgotten
        only when full again, when a fresh pair would be the same.
        """
        live = {key.id: key for key in snapshot.keys_by_prefix.values()}
        for key_id in list(self._buckets):
            key = live.get(key_id)
            if key is None:
                buckets = self._buckets[key_id]
                if buckets.is_key or (
                    buckets.hour.available(now) >= buckets.per_hour and buckets.day.available(now) >= buckets.per_day
                ):
                    del self._buckets[key_id]
                continue
            buckets = self._buckets[key_id]
            if key.rate_limit_per_hour != buckets.per_hour:
                buckets.per_hour = key.rate_limit_per_hour
                buckets.hour.reconfigure(key.rate_limit_per_hour, key.rate_limit_per_hour / HOUR, now)
            if key.rate_limit_per_day != buckets.per_day:
                buckets.per_day = key.rate_limit_per_day
                buckets.day.reconfigure(key.rate_limit_per_day, key.rate_limit_per_day / DAY, now)
