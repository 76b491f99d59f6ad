"""Row-level security: the database's own wall between tenants, behind `Actor.tenant_filter`.

PostgreSQL only (SQLite has none), on the real migrations. Three properties:
every tenant-owned table in the migrated schema has a policy (read from the
catalog, so a new table without one fails here); as `gateway_tenant` with a
tenant set, a connection sees and changes only that tenant's rows, whatever
the SQL says; and the control plane's `service.scoped` really puts a tenant's
transactions there, so a query that forgets its filter still finds nothing of
another tenant.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from gateway.controlplane import permissions, service, sessions
from gateway.db.engine import create_engine
from gateway.db.tables import metadata

# Tables no tenant owns; every other table must carry row-level security.
NOT_TENANT_OWNED = {"alembic_version", "config_state", "gateway_secrets", "signin_states", "limit_settings"}
# Of those, what gateway_tenant may touch at all (config_state: read and bump the version;
# limit_settings: read, for GET /rate-limits).
TENANT_ROLE_REACHES = {"config_state", "limit_settings"}
# The column a table's owning tenant is read from (every other tenant-owned table: tenant_id).
TENANT_COLUMN = {"tenants": "id"}
# References a tenant's row may not point across tenants (foreign-key checks run as the owner).
REFERENCES = {
    "server_tools": {"server_id": "mcp_servers"},
    "server_resources": {"server_id": "mcp_servers"},
    "server_resource_templates": {"server_id": "mcp_servers"},
    "server_prompts": {"server_id": "mcp_servers"},
    "alert_rules": {"server_id": "mcp_servers"},
    "alert_events": {"rule_id": "alert_rules"},
    "enhanced_api_keys": {"user_id": "users"},
    "sessions": {"user_id": "users"},
    "server_access_rules": {"user_id": "users", "api_key_id": "enhanced_api_keys", "server_id": "mcp_servers"},
}
RLS_REFUSAL = "row-level security"
RECORDS = {"audit_logs", "request_logs", "server_metrics"}


def _rows(tag: str) -> dict[str, dict]:
    """One row of a tenant in every tenant-owned table, each pointing at the tenant's own objects."""
    tenant, user, server, key, rule = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    mine = {"tenant_id": tenant}
    return {
        "tenants": {"id": tenant, "name": f"rls-{tag}", "status": "active", "settings": {}, "is_platform": False},
        "users": {**mine, "id": user, "username": f"u-{tag}", "email": f"{tag}@example.com", "role": "ADMIN"},
        "mcp_servers": {**mine, "id": server, "name": f"s-{tag}", "endpoint_url": "http://127.0.0.1:1/mcp"},
        "server_tools": {**mine, "id": uuid.uuid4(), "server_id": server, "name": f"tool-{tag}"},
        "server_resources": {**mine, "id": uuid.uuid4(), "server_id": server, "uri": f"demo://{tag}"},
        "server_resource_templates": {**mine, "id": uuid.uuid4(), "server_id": server,
                                      "uri_template": f"demo://{tag}/{{id}}"},
        "server_prompts": {**mine, "id": uuid.uuid4(), "server_id": server, "name": f"prompt-{tag}"},
        "retention_policies": {**mine, "id": uuid.uuid4(), "table_name": "request_logs", "days": 30},
        "alert_rules": {**mine, "id": rule, "name": f"alert-{tag}", "server_id": server, "metric": "error_rate",
                        "threshold": 0.5},
        "alert_events": {**mine, "id": uuid.uuid4(), "rule_id": rule, "state": "firing", "threshold": 0.5,
                         "fired_at": later},
        "system_config": {**mine, "id": uuid.uuid4(), "key": f"k-{tag}", "value": {"v": 1}},
        "system_config_history": {**mine, "id": uuid.uuid4(), "key": f"k-{tag}", "version": 1, "change": "set"},
        "routing_rules": {**mine, "id": uuid.uuid4(), "name": f"route-{tag}", "match_server": f"s-{tag}",
                          "targets": [{"server_id": str(server), "weight": 1}]},
        "enhanced_api_keys": {**mine, "id": key, "user_id": user, "name": f"k-{tag}", "key_prefix": f"p{tag}",
                              "key_hash": "h", "salt": "s", "scopes": ["admin"]},
        "sessions": {**mine, "id": uuid.uuid4(), "user_id": user, "token_hash": f"session-{tag}", "expires_at": later},
        "server_access_rules": {**mine, "id": uuid.uuid4(), "effect": "deny", "user_id": user, "server_id": server},
        "audit_logs": {**mine, "id": uuid.uuid4(), "action": "test", "outcome": "ok"},
        "request_logs": {**mine, "id": uuid.uuid4(), "status_code": 200, "duration_ms": 1.0, "request_bytes": 1,
                         "response_bytes": 1},
        "server_metrics": {**mine, "id": uuid.uuid4(), "server_id": server, "window_start": later,
                           "window_seconds": 60, "request_count": 1, "error_count": 0},
    }


def _tenant_of(table: str, row: dict) -> uuid.UUID:
    return row[TENANT_COLUMN.get(table, "tenant_id")]


@pytest.fixture
async def seeded(pg_url):
    """An engine on a migrated database holding tenants A and B (one row each in every tenant-owned table)."""
    engine = create_engine(pg_url)
    a, b = _rows("a"), _rows("b")
    async with engine.begin() as conn:
        for rows in (a, b):
            for table, row in rows.items():
                await conn.execute(sa.insert(metadata.tables[table]).values(**row))
    yield engine, a, b
    await engine.dispose()


async def _as_tenant(conn, tenant: uuid.UUID | None) -> None:
    """What `service.scoped` does, spelled out: the tests below check the policies, not the helper."""
    await conn.execute(sa.text("SET LOCAL ROLE gateway_tenant"))
    if tenant is not None:
        await conn.execute(sa.text("SELECT set_config('gateway.tenant_id', :t, true)"), {"t": str(tenant)})


async def _refused(conn, statement, match: str) -> None:
    """`statement` fails with `match`; a savepoint keeps the transaction usable afterwards."""
    savepoint = await conn.begin_nested()
    try:
        with pytest.raises(DBAPIError, match=match):
            await conn.execute(statement)
    finally:
        await savepoint.rollback()


def _actor(rows: dict, *, reach: str = permissions.TENANT) -> service.Actor:
    user = rows["users"]
    return service.Actor(user_id=user["id"], tenant_id=user["tenant_id"], api_key_id=rows["enhanced_api_keys"]["id"],
                         role="ADMIN", is_operator=False, scopes=frozenset({"admin", "read", "write"}), reach=reach)


# -- the schema -----------------------------------------------------------------------------------------
async def test_every_tenant_owned_table_has_row_level_security(seeded):
    engine, a, _ = seeded
    async with engine.connect() as conn:
        tables = (await conn.execute(sa.text(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,"
            " EXISTS (SELECT FROM information_schema.columns k WHERE k.table_schema = current_schema()"
            "         AND k.table_name = c.relname AND k.column_name = 'tenant_id') AS has_tenant,"
            " (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid AND p.polcmd = '*'"
            "  AND p.polqual IS NOT NULL AND p.polwithcheck IS NOT NULL"
            "  AND p.polroles = ARRAY[(SELECT oid FROM pg_roles WHERE rolname = 'gateway_tenant')]) AS policies,"
            " has_table_privilege('gateway_tenant', c.oid, 'SELECT') AS reachable"
            " FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'"
        ))).mappings().all()
    owned = {t["relname"] for t in tables if t["relname"] not in NOT_TENANT_OWNED}
    # Every table that is not declared tenant-free is tenant-owned: it names its tenant and has a policy.
    for t in tables:
        name = t["relname"]
        if name in NOT_TENANT_OWNED:
            assert not t["relrowsecurity"]
            assert t["reachable"] == (name in TENANT_ROLE_REACHES), name
            continue
        assert t["has_tenant"] or name in TENANT_COLUMN, f"{name}: a table no tenant owns belongs in NOT_TENANT_OWNED"
        assert t["relrowsecurity"], f"{name}: tenant-owned without ENABLE ROW LEVEL SECURITY"
        assert not t["relforcerowsecurity"], f"{name}: FORCE would hide rows from the data plane's loader"
        assert t["policies"] == 1, f"{name}: needs one policy TO gateway_tenant with USING and WITH CHECK"
        assert t["reachable"], name
    # ... and the tests below cover it (a new tenant-owned table must get a row in _rows).
    assert owned == set(a), f"tenant-owned tables not covered by this test: {owned ^ set(a)}"


# -- the policies -----------------------------------------------------------------------------------------
async def test_a_tenant_sees_only_its_own_rows(seeded):
    engine, a, b = seeded
    async with engine.begin() as conn:
        await _as_tenant(conn, _tenant_of("tenants", a["tenants"]))
        for table, row in a.items():
            column = TENANT_COLUMN.get(table, "tenant_id")
            found = (await conn.execute(sa.text(f"SELECT {column}, id FROM {table}"))).all()
            assert found == [(_tenant_of(table, row), row["id"])], table
            by_id = (await conn.execute(sa.text(f"SELECT id FROM {table} WHERE id = :id"), {"id": b[table]["id"]}))
            assert by_id.all() == [], table
        # Outside the tenant role's reach altogether.
        for table in NOT_TENANT_OWNED - TENANT_ROLE_REACHES - {"alembic_version"}:
            await _refused(conn, sa.text(f"SELECT * FROM {table}"), "permission denied")
    # The owner (data plane loader, operator) still sees both tenants.
    async with engine.connect() as conn:
        for table in a:
            assert (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar() == 2, table


async def test_without_a_tenant_the_role_sees_nothing(seeded):
    engine, a, _ = seeded
    async with engine.begin() as conn:
        await _as_tenant(conn, None)
        for table in a:
            assert (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar() == 0, table
    # A setting left empty by an earlier transaction on the same connection reads as no tenant, not an error.
    async with engine.connect() as conn:
        async with conn.begin():
            await _as_tenant(conn, _tenant_of("tenants", a["tenants"]))
        async with conn.begin():
            await _as_tenant(conn, None)
            assert (await conn.execute(sa.text("SELECT count(*) FROM users"))).scalar() == 0


async def test_a_tenant_cannot_write_another_tenants_rows(seeded):
    engine, a, b = seeded
    a_tenant = _tenant_of("tenants", a["tenants"])
    b_tenant = _tenant_of("tenants", b["tenants"])
    async with engine.begin() as conn:
        await _as_tenant(conn, a_tenant)
        for table, row in b.items():
            t = metadata.tables[table]
            column = TENANT_COLUMN.get(table, "tenant_id")
            # Insert a row of B's (a fresh id, B's tenant).
            await _refused(conn, sa.insert(t).values({**row, "id": uuid.uuid4()}), RLS_REFUSAL)
            change = sa.update(t).where(t.c.id == row["id"]).values(created_at=sa.func.now())
            delete = sa.delete(t).where(t.c.id == row["id"])
            move = sa.update(t).where(t.c.id == a[table]["id"]).values({column: b_tenant})
            if table in RECORDS:
                # Records are append-only for a tenant: no update or delete at all.
                for statement in (change, delete, move):
                    await _refused(conn, statement, "permission denied")
                continue
            # Change or delete B's row: nothing matches.
            assert (await conn.execute(change)).rowcount == 0, table
            assert (await conn.execute(delete)).rowcount == 0, table
            # Move one of A's rows to B.
            await _refused(conn, move, RLS_REFUSAL)
        # A row of A's that points at B's objects (a key for B's user, a rule on B's server).
        for table, references in REFERENCES.items():
            t = metadata.tables[table]
            for column, target in references.items():
                unique = {c.name: f"x{uuid.uuid4().hex[:12]}" for c in t.c
                          if c.unique and c.name != "id" and isinstance(c.type, sa.String)}
                foreign = {**a[table], **unique, "id": uuid.uuid4(), column: b[target]["id"]}
                await _refused(conn, sa.insert(t).values(foreign), RLS_REFUSAL)
        # Control: the same writes of A's own rows are accepted (the refusals above are not just any error).
        servers = metadata.tables["mcp_servers"]
        await conn.execute(sa.insert(servers).values({**a["mcp_servers"], "id": uuid.uuid4(), "name": "s-a2"}))
        touched = await conn.execute(
            sa.update(servers).where(servers.c.id == a["mcp_servers"]["id"]).values(description="mine")
        )
        assert touched.rowcount == 1
    async with engine.connect() as conn:
        for table in b:
            column = TENANT_COLUMN.get(table, "tenant_id")
            count = (await conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {column} = :t"),
                                        {"t": b_tenant})).scalar()
            assert count == 1, table


# -- the control plane's transactions ----------------------------------------------------------------------
async def test_scoped_transactions_run_as_the_tenant_and_the_operator_as_owner(seeded):
    engine, a, b = seeded
    async with service.scoped(engine, _actor(a)) as conn:
        found = (await conn.execute(sa.text("SELECT tenant_id FROM users UNION ALL SELECT tenant_id FROM sessions")))
        assert set(found.scalars()) == {a["tenants"]["id"]}
        assert (await conn.execute(sa.text("SELECT current_user"))).scalar() == service.TENANT_ROLE
    operator = service.Actor(user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), api_key_id=None, role="ADMIN",
                             is_operator=True)
    async with service.scoped(engine, operator) as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM users"))).scalar() == 2
    # The role and tenant end with the transaction: the pooled connection goes back as the owner.
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT current_user"))).scalar() != service.TENANT_ROLE
        assert (await conn.execute(sa.text("SELECT count(*) FROM users"))).scalar() == 2


async def _reads_and_writes_across(engine, actor: service.Actor, b: dict) -> list[str]:
    """Every service call below that reaches one of B's rows (with the tenant filter broken)."""
    leaks = []
    listed = {
        "users": await service.list_users(engine, actor, limit=100, after=None),
        "enhanced_api_keys": await service.list_api_keys(engine, actor, limit=100, after=None),
        "mcp_servers": await service.list_servers(engine, actor, limit=100, after=None),
        "server_access_rules": await service.list_access_rules(engine, actor, limit=100, after=None),
        "sessions": await sessions.list_sessions(engine, actor, limit=100, after=None),
    }
    leaks += [f"list {table}" for table, items in listed.items() if any(i["id"] == b[table]["id"] for i in items)]
    attempts = {
        "get server": service.get_server(engine, actor, b["mcp_servers"]["id"]),
        "revoke key": service.revoke_api_key(engine, actor, b["enhanced_api_keys"]["id"]),
        "get rule": service.get_access_rule(engine, actor, b["server_access_rules"]["id"]),
        "delete rule": service.delete_access_rule(engine, actor, b["server_access_rules"]["id"]),
        "revoke session": sessions.revoke_session(engine, actor, b["sessions"]["id"]),
    }
    for what, call in attempts.items():
        try:
            await call
        except service.NotFound:
            continue
        leaks.append(what)
    return leaks


async def test_a_query_without_its_tenant_filter_still_finds_nothing_of_another_tenant(seeded, monkeypatch):
    engine, a, b = seeded
    # The first wall broken: every query's tenant predicate is TRUE.
    monkeypatch.setattr(service.Actor, "tenant_filter", lambda self, table: sa.true())
    assert await _reads_and_writes_across(engine, _actor(a), b) == []
    # B's rows are untouched.
    async with engine.connect() as conn:
        keys, rules, live = (await conn.execute(sa.text(
            "SELECT (SELECT is_active FROM enhanced_api_keys WHERE id = :k),"
            " (SELECT count(*) FROM server_access_rules WHERE id = :r),"
            " (SELECT is_active FROM sessions WHERE id = :s)"
        ), {"k": b["enhanced_api_keys"]["id"], "r": b["server_access_rules"]["id"], "s": b["sessions"]["id"]})).one()
    assert (keys, rules, live) == (True, 1, True)


async def test_without_the_second_wall_the_broken_filter_would_leak(seeded, monkeypatch):
    """The control for the test above: with the role switch off, the same calls do reach B's rows."""
    engine, a, b = seeded
    monkeypatch.setattr(service.Actor, "tenant_filter", lambda self, table: sa.true())
    monkeypatch.setattr(service, "_ENTER_TENANT", sa.text("SELECT :tenant"))
    leaks = await _reads_and_writes_across(engine, _actor(a), b)
    assert set(leaks) == {
        "list users", "list enhanced_api_keys", "list mcp_servers", "list server_access_rules", "list sessions",
        "get server", "revoke key", "get rule", "delete rule", "revoke session",
    }
