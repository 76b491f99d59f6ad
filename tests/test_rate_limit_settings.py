"""Limits changed at runtime through /api/v1/rate-limits reach every process's `Snapshot.limits`.

Real gateways on one PostgreSQL database and one Redis (and one on SQLite): a
change made through one process's admin API shows in another process's
snapshot; bad bodies are refused with nothing changed; only the operator
writes; a stored override that no longer validates is ignored, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
import sqlalchemy as sa

from gateway.controlplane import service
from gateway.db import migrate
from gateway.db.engine import create_engine
from gateway.db.tables import limit_settings
from gateway.snapshot import read_version

LIMITS = {"ip_per_minute": 700, "queue_max": 32}  # this deployment's [limits] defaults


@pytest.fixture(autouse=True)
def _documented_defaults(monkeypatch):
    """These tests compare against the documented [limits] defaults: not the harness's generous ones."""
    import harness

    monkeypatch.setattr(harness, "GENEROUS_LIMITS", {})


async def _within(predicate, limit: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < limit, "the change never arrived"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_change_reaches_another_process_within_a_second(
    pg_url, redis_url, redis_prefix, mcp_upstream, make_gateway
):
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    # Polling every 60 s: only the change signal can deliver within the test.
    a = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60}, limits=LIMITS)
    b = await make_gateway(pg_url, redis=redis, snapshot={"poll_interval": 60}, limits=LIMITS)
    await asyncio.sleep(0.2)  # both subscribed
    assert b.gateway.store.current.limits.ip_per_minute == 700  # the configured default
    assert b.gateway.store.current.limits_overridden == frozenset()

    status, body = await a.admin("PATCH", "/rate-limits", {"ip_per_minute": 42, "roles": {"USER": 7}})
    assert status == 200, body
    assert body["limits"]["ip_per_minute"] == 42 and body["overridden"] == ["ip_per_minute", "roles"]
    on_b = b.gateway.store
    took = await _within(lambda: on_b.current.limits.ip_per_minute == 42)
    assert took < 1.0
    assert on_b.current.limits.roles == {"ADMIN": 1000, "USER": 7, "SERVICE": 1000, "READONLY": 100}
    assert on_b.current.limits.queue_max == 32  # not overridden: still this deployment's default
    assert on_b.current.limits_overridden == {"ip_per_minute", "roles"}

    # Tenant weights travel the same way (PATCH /tenants/{id}).
    t = await a.tenancy("acme", mcp_upstream)
    tenant = uuid.UUID(t.tenant_id)
    await _within(lambda: tenant in on_b.current.tenants)
    assert on_b.current.tenants[tenant].weight == 100
    status, _ = await a.admin("PATCH", f"/tenants/{t.tenant_id}", {"weight": 7})
    assert status == 200
    took = await _within(lambda: on_b.current.tenants[tenant].weight == 7)
    assert took < 1.0

    status, _ = await a.admin("DELETE", "/rate-limits")
    assert status == 200
    took = await _within(lambda: on_b.current.limits.ip_per_minute == 700)
    assert took < 1.0 and on_b.current.limits_overridden == frozenset()


async def test_polling_carries_a_change_without_redis(pg_url, make_gateway):
    a = await make_gateway(pg_url, snapshot={"poll_interval": 0.2})
    b = await make_gateway(pg_url, snapshot={"poll_interval": 0.2})
    status, _ = await a.admin("PATCH", "/rate-limits", {"global_per_minute": 123})
    assert status == 200
    await _within(lambda: b.gateway.store.current.limits.global_per_minute == 123)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"enabled": False}, "enabled"),  # a [limits] key, but not one that changes at runtime
        ({"ip_per_minute": "600"}, "ip_per_minute"),  # strict: no strings for numbers
        ({"ip_per_minute": 1.5}, "ip_per_minute"),
        ({"ip_per_minute": True}, "ip_per_minute"),
        ({"ip_per_minute": -1}, "ip_per_minute"),
        ({"global_per_minute": 10**12}, "global_per_minute"),
        ({"tenant_burst_factor": 0.5}, "tenant_burst_factor"),
        ({"roles": {"USER": 10**9}}, "roles.USER"),
        ({"roles": {"BOSS": 5}}, "roles.BOSS"),
        ({"roles": [1]}, "roles"),
        ({"costs": {"tools/call": 0}}, "costs.tools/call"),
        ({"ip_allow": ["10.0.0.0/8", "not-a-network"]}, "ip_allow"),
        ({"ip_allow": ["10.0.0.0/8", 7]}, "ip_allow[1]"),
        ({"ip_deny": "10.0.0.0/8"}, "ip_deny"),
        ({"ip_per_minute": 700, "queue_max": -5}, "queue_max"),  # one bad key: the good one is not applied either
        ({}, "$"),
        ([], "$"),
    ],
    ids=lambda x: repr(x) if isinstance(x, (dict, list)) else x,
)
async def test_invalid_bodies_change_nothing(gateway, body, field):
    store = gateway.gateway.store
    status, before = await gateway.admin("GET", "/rate-limits")
    assert status == 200
    version = await read_version(gateway.gateway.engine)

    status, answer = await gateway.admin("PATCH", "/rate-limits", body)
    assert status == 422, answer
    assert answer["error"]["code"] == "validation_failed"
    assert field in [d["field"] for d in answer["error"]["details"]], answer

    status, after = await gateway.admin("GET", "/rate-limits")
    assert after == before
    assert await read_version(gateway.gateway.engine) == version
    assert store.current.limits_overridden == frozenset()


async def test_a_tenant_admin_reads_but_only_the_operator_writes(gateway, mcp_upstream):
    acme = await gateway.tenancy("acme", mcp_upstream)
    other = await gateway.tenancy("other", mcp_upstream)
    keys = {}
    for role in ("ADMIN", "USER"):
        name = f"{role.lower()}-{uuid.uuid4().hex[:6]}"
        status, user = await gateway.admin("POST", "/users", {"tenant_id": acme.tenant_id, "username": name,
                                                              "email": f"{name}@acme.test", "role": role})
        assert status == 201, user
        status, key = await gateway.admin("POST", "/api-keys", {"user_id": user["id"], "name": "k",
                                                                "scopes": ["read", "write", "admin"]})
        assert status == 201, key
        keys[role] = key["key"]
    status, _ = await gateway.admin("PATCH", "/rate-limits", {"queue_max": 5})
    assert status == 200

    # A tenant ADMIN sees the deployment's limits and its own tenant's weight, no other tenant's.
    status, seen = await gateway.admin("GET", "/rate-limits", key=keys["ADMIN"])
    assert status == 200, seen
    assert seen["limits"]["queue_max"] == 5 and seen["overridden"] == ["queue_max"]
    assert [w["tenant_id"] for w in seen["tenant_weights"]] == [acme.tenant_id]
    status, everything = await gateway.admin("GET", "/rate-limits")
    assert {acme.tenant_id, other.tenant_id} <= {w["tenant_id"] for w in everything["tenant_weights"]}

    for method, body in (("PATCH", {"queue_max": 1}), ("DELETE", None)):
        status, answer = await gateway.admin(method, "/rate-limits", body, key=keys["ADMIN"])
        assert status == 403 and "operator" in answer["error"]["message"], answer
    assert (await gateway.admin("GET", "/rate-limits", key=keys["USER"]))[0] == 403
    assert gateway.gateway.store.current.limits.queue_max == 5


async def test_null_restores_the_default_and_delete_resets(pg_url, make_gateway):
    gw = await make_gateway(pg_url, limits=LIMITS)
    store = gw.gateway.store
    status, body = await gw.admin("PATCH", "/rate-limits", {
        "ip_per_minute": 50, "roles": {"USER": 5}, "costs": {"tools/call": 2, "tools/call:big": 10},
        "ip_deny": ["192.0.2.0/24"], "tenant_burst_factor": 3,
    })
    assert status == 200, body
    assert body["overridden"] == ["costs", "ip_deny", "ip_per_minute", "roles", "tenant_burst_factor"]
    assert body["defaults"]["ip_per_minute"] == 700 and body["limits"]["tenant_burst_factor"] == 3.0
    assert body["updated_by"] and body["updated_at"]
    # The answer comes after this process reloaded: its snapshot already shows the change.
    assert store.current.limits.ip_per_minute == 50 and store.current.limits.ip_deny == ["192.0.2.0/24"]

    status, body = await gw.admin("PATCH", "/rate-limits", {"ip_per_minute": None, "roles": {"ADMIN": 9}})
    assert status == 200, body
    assert body["limits"]["ip_per_minute"] == 700 and "ip_per_minute" not in body["overridden"]
    assert body["limits"]["roles"] == {"ADMIN": 9, "USER": 5, "SERVICE": 1000, "READONLY": 100}  # merged
    assert store.current.limits.ip_per_minute == 700

    # In a table setting, a null entry removes that entry; the last one removes the override.
    status, body = await gw.admin("PATCH", "/rate-limits", {"costs": {"tools/call": None}})
    assert body["limits"]["costs"] == {"tools/call:big": 10.0} and "costs" in body["overridden"]
    status, body = await gw.admin("PATCH", "/rate-limits", {"costs": {"tools/call:big": None}})
    assert body["limits"]["costs"] == {} and "costs" not in body["overridden"]

    status, body = await gw.admin("DELETE", "/rate-limits")
    assert status == 200
    assert body["overridden"] == [] and body["limits"] == body["defaults"]
    assert store.current.limits.roles["USER"] == 100 and store.current.limits_overridden == frozenset()
    status, again = await gw.admin("GET", "/rate-limits")
    assert again["limits"] == body["defaults"] and again["overridden"] == []


async def test_a_stored_override_that_no_longer_validates_is_ignored(gateway, caplog):
    engine = gateway.gateway.engine
    async with engine.begin() as conn:
        await conn.execute(sa.update(limit_settings).where(limit_settings.c.id == 1).values(overrides={
            "removed_setting": 1, "ip_per_minute": 10**12, "roles": {"USER": "lots"}, "queue_max": 5,
        }))
        await service.bump_version(conn)
    with caplog.at_level(logging.WARNING, logger="gateway.snapshot"):
        snapshot = await gateway.gateway.store.refresh()
    assert snapshot.limits.queue_max == 5 and snapshot.limits_overridden == {"queue_max"}
    assert snapshot.limits.ip_per_minute == 600 and snapshot.limits.roles["USER"] == 100
    assert {"removed_setting", "ip_per_minute", "roles"} <= {r.args[0] for r in caplog.records}

    status, body = await gateway.admin("GET", "/rate-limits")
    assert status == 200
    assert set(body["ignored"]) == {"removed_setting", "ip_per_minute", "roles"}
    assert body["overridden"] == ["queue_max"]
    # The operator can still change other keys, and null clears a stale one.
    status, body = await gateway.admin("PATCH", "/rate-limits", {"ip_per_minute": None, "ban_seconds": 30})
    assert status == 200, body
    assert set(body["ignored"]) == {"removed_setting", "roles"}


async def test_sqlite_embedded_default(sqlite_url, make_gateway):
    gw = await make_gateway(sqlite_url)
    status, body = await gw.admin("GET", "/rate-limits")
    assert status == 200 and body["overridden"] == [] and body["updated_by"] is None
    status, body = await gw.admin("PATCH", "/rate-limits", {"anonymous_per_minute": 3, "ip_allow": ["127.0.0.1"]})
    assert status == 200, body
    assert gw.gateway.store.current.limits.anonymous_per_minute == 3
    status, answer = await gw.admin("PATCH", "/rate-limits", {"anonymous_per_minute": "3"})
    assert status == 422 and answer["error"]["details"][0]["field"] == "anonymous_per_minute"
    status, body = await gw.admin("DELETE", "/rate-limits")
    assert status == 200 and gw.gateway.store.current.limits.anonymous_per_minute == 20


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("empty_pg_url")


async def _overrides_row(url: str):
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: set(c.dialect.get_table_names(c)))
            if "limit_settings" not in names:
                return None
            return (await conn.execute(sa.select(limit_settings.c.id, limit_settings.c.overrides))).all()
    finally:
        await engine.dispose()


def test_migration_0007_up_and_down(empty_url):
    migrate.upgrade(empty_url, "0006")
    assert asyncio.run(_overrides_row(empty_url)) is None
    migrate.upgrade(empty_url, "0007")
    assert [tuple(r) for r in asyncio.run(_overrides_row(empty_url))] == [(1, {})]
    migrate.downgrade(empty_url, "0006")
    assert asyncio.run(_overrides_row(empty_url)) is None
    migrate.upgrade(empty_url)
    assert asyncio.run(_overrides_row(empty_url)) == [(1, {})]
