"""The limiter's decisions on one process, with a clock the test moves.

What the end-to-end tests (test_rate_limits.py) cannot pin down cheaply: that
the cached per-key and per-address state never outlives what it was built
from (a new key entry, new settings, a bucket the shared store forgot), that a
refusal charges nothing, and that a request leaving the fair queue (refused or
cancelled) gets back what the tiers before the global one took.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid

import pytest

from gateway.config import LimitSettings
from gateway.limits.bans import BanList
from gateway.limits.limiter import Limited, Limiter, Pending
from gateway.limits.shared import SharedBuckets
from gateway.snapshot import KeyEntry

HIGH = 100_000_000
ROLES = ("ADMIN", "USER", "SERVICE", "READONLY")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**changes) -> LimitSettings:
    base = dict(global_per_minute=HIGH, roles={r: HIGH for r in ROLES}, anonymous_per_minute=HIGH,
                ip_per_minute=HIGH, tenant_burst_factor=1000.0, ban_violations=0)
    return LimitSettings(**{**base, **changes})


def key_entry(tenant: uuid.UUID, *, prefix: str = "k1", per_hour: int = 100_000, role: str = "USER") -> KeyEntry:
    return KeyEntry(
        id=uuid.uuid5(uuid.NAMESPACE_DNS, prefix), prefix=prefix, key_hash="h", salt="s", tenant_id=tenant,
        user_id=uuid.uuid5(uuid.NAMESPACE_URL, prefix), role=role, scopes=frozenset({"proxy"}),
        rate_limit_per_hour=per_hour, rate_limit_per_day=1_000_000, expires_at=None, key_active=True,
        user_active=True,
    )


def limiter(clock: Clock, **changes) -> Limiter:
    s = settings(**changes)
    return Limiter(SharedBuckets(None, clock=clock), s, BanList(None, "t:", s, clock=clock), clock=clock)


def admit(lim: Limiter, key: KeyEntry, clock: Clock, weight: int = 100, cost: float = 1.0) -> Pending | None:
    return lim.admit_now(key, weight, "192.0.2.1", cost, clock.now)


def refused_tier(lim: Limiter, key: KeyEntry, clock: Clock, weight: int = 100) -> str:
    with pytest.raises(Limited) as refused:
        admit(lim, key, clock, weight)
    return refused.value.tier


def bucket_of(lim: Limiter, kind: str):
    return next(b for k, b in lim.shared._buckets.items() if (k if isinstance(k, str) else k[0]) == kind)


def test_a_refusal_gives_back_what_earlier_tiers_took():
    clock = Clock()
    lim = limiter(clock, roles={"USER": 2})  # the user's bucket holds 2 (a minute's worth, at least one)
    key = key_entry(uuid.uuid4(), per_hour=5)
    assert admit(lim, key, clock) is None
    assert admit(lim, key, clock) is None
    assert refused_tier(lim, key, clock) == "user"
    assert refused_tier(lim, key, clock) == "user"
    # The hour and day quotas were charged for the two admitted requests only.
    assert bucket_of(lim, "key-hour").spent == 2.0
    assert bucket_of(lim, "key-day").spent == 2.0
    assert bucket_of(lim, "global").spent == 2.0


def test_a_new_key_entry_applies_its_quota_at_once():
    clock = Clock()
    lim = limiter(clock)
    key = key_entry(uuid.uuid4(), per_hour=10)
    for _ in range(2):
        assert admit(lim, key, clock) is None
    # The admin lowered the quota: the next snapshot carries a new entry for the same key, and
    # the bucket keeps what it holds, at most the new capacity.
    lowered = dataclasses.replace(key, rate_limit_per_hour=1)
    assert admit(lim, lowered, clock) is None
    with pytest.raises(Limited) as refused:
        admit(lim, lowered, clock)
    assert (refused.value.tier, refused.value.limit, refused.value.window) == ("api_key", 1, "hour")


def test_an_equal_entry_from_a_newer_snapshot_keeps_the_tiers_and_is_then_known_by_identity():
    clock = Clock()
    lim = limiter(clock)
    key = key_entry(uuid.uuid4(), per_hour=3)
    assert admit(lim, key, clock) is None
    principal = lim._principals[key.prefix]
    # A snapshot reload makes a new entry with the same values: the same tiers go on counting (one more
    # admitted, then the quota of 3 refuses) ...
    again = dataclasses.replace(key)
    assert again == key and again is not key
    assert admit(lim, again, clock) is None
    assert lim._principals[key.prefix] is principal
    # ... and the principal now holds the new entry, so later requests compare identities, not 15 fields.
    assert principal.key is again
    assert admit(lim, again, clock) is None
    with pytest.raises(Limited) as refused:
        admit(lim, again, clock)
    assert (refused.value.tier, refused.value.limit) == ("api_key", 3)


def test_new_settings_apply_to_cached_principals_and_addresses():
    clock = Clock()
    lim = limiter(clock)
    key = key_entry(uuid.uuid4())
    assert admit(lim, key, clock) is None
    lim.check_address("192.0.2.1", clock.now)
    lim.configure(settings(roles={"USER": 1}, ip_deny=["192.0.2.0/24"]))
    assert admit(lim, key, clock) is None
    assert refused_tier(lim, key, clock) == "user"
    with pytest.raises(Limited) as refused:
        lim.check_address("192.0.2.1", clock.now)
    assert (refused.value.tier, refused.value.status) == ("ip_deny", 403)


def test_a_bucket_the_shared_store_forgot_is_looked_up_again():
    clock = Clock()
    lim = limiter(clock, roles={"USER": 3})
    key = key_entry(uuid.uuid4())
    assert admit(lim, key, clock) is None
    shared = lim.shared
    user_bucket = bucket_of(lim, "user")
    # Fill the store past its forgetting threshold, then let everything idle out.
    for i in range(1100):
        shared.bucket(("filler", i), 1.0, 1.0, clock.now)
    clock.now += 3600.0
    shared._forget_idle(clock.now)
    assert user_bucket not in shared._buckets.values()
    assert admit(lim, key, clock) is None
    live = bucket_of(lim, "user")
    assert live is not user_bucket  # the decision used the bucket the store holds, not the forgotten one
    assert live.spent == 1.0


def test_tenant_tier_borrows_up_to_the_burst_factor_then_lends_when_others_idle():
    clock = Clock()
    # Global 600/min, a bucket of 60 s: 600 tokens. Weights 1:3, burst factor 1: tenant A may hold 25%.
    lim = limiter(clock, global_per_minute=600, tenant_burst_factor=1.0)
    a, b = uuid.uuid4(), uuid.uuid4()
    key_a, key_b = key_entry(a, prefix="a"), key_entry(b, prefix="b")
    assert admit(lim, key_b, clock, weight=300) is None
    admitted = 0
    while admitted < 1000:
        try:
            assert admit(lim, key_a, clock, weight=100) is None
        except Limited as refused:
            assert refused.tier == "tenant"
            break
        admitted += 1
    assert admitted == 150  # a quarter of the 600 the global bucket holds
    # B goes quiet for longer than the activity window: A's share is the whole bucket again.
    clock.now += 61.0
    for _ in range(300):
        assert admit(lim, key_a, clock, weight=100) is None


async def test_a_request_leaving_the_queue_gets_its_tokens_back():
    clock = Clock()
    lim = limiter(clock, global_per_minute=1, queue_deadline=60.0)
    key = key_entry(uuid.uuid4(), per_hour=10)
    assert admit(lim, key, clock) is None  # the one global token
    pending = admit(lim, key, clock)
    assert isinstance(pending, Pending)
    hour = bucket_of(lim, "key-hour")
    assert hour.spent == 2.0
    waiting = asyncio.ensure_future(lim.wait(pending))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert hour.spent == 1.0  # the cancelled request was never admitted: its hour token came back
    # Shutdown refuses whoever waits, with 503, and refunds likewise.
    pending = admit(lim, key, clock)
    waiting = asyncio.ensure_future(lim.wait(pending))
    await asyncio.sleep(0)
    lim.close()
    with pytest.raises(Limited) as refused:
        await waiting
    assert refused.value.status == 503
    assert hour.spent == 1.0


def test_address_tiers_deny_allow_ban_and_bucket():
    clock = Clock()
    lim = limiter(clock, ip_per_minute=2, ip_allow=["10.0.0.0/8"], ip_deny=["203.0.113.0/24"], ban_violations=3)
    with pytest.raises(Limited) as refused:
        lim.check_address("203.0.113.9", clock.now)
    assert refused.value.status == 403
    for _ in range(50):
        lim.check_address("10.1.2.3", clock.now)  # allowed: no bucket, no ban
    lim.check_address("198.51.100.7", clock.now)
    lim.check_address("198.51.100.7", clock.now)
    tiers = []
    for _ in range(4):
        with pytest.raises(Limited) as refused:
            lim.check_address("198.51.100.7", clock.now)
        tiers.append(refused.value.tier)
    assert tiers == ["ip", "ip", "ip", "ip_ban"]  # the third violation bans it
    clock.now += 700.0  # past ban_seconds (600)
    lim.check_address("198.51.100.7", clock.now)
    assert math.isfinite(lim.refusals["ip"])


def test_a_token_principal_is_limited_by_its_id_across_requests():
    from gateway.auth.oidc import TokenPrincipal

    clock = Clock()
    lim = limiter(clock)
    fields = dict(id=uuid.uuid4(), tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), role="USER",
                  scopes=frozenset({"proxy"}), rate_limit_per_hour=2, rate_limit_per_day=100,
                  expires_at=clock.now + 3600, issuer="https://issuer.example", subject="alice")
    # Each request verifies the token anew: equal principals, distinct objects, one quota.
    assert admit(lim, TokenPrincipal(**fields), clock) is None
    assert admit(lim, TokenPrincipal(**fields), clock) is None
    assert refused_tier(lim, TokenPrincipal(**fields), clock) == "api_key"
