"""Migrations: they run on PostgreSQL and SQLite, match the table definitions, and go down again."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.db import migrate
from gateway.db.engine import create_engine
from gateway.db.tables import metadata

EXPECTED_TABLES = {
    "tenants", "users", "mcp_servers", "server_tools", "server_resources", "enhanced_api_keys", "sessions",
    "audit_logs", "request_logs", "server_metrics", "config_state", "signin_states",
}


async def _diff_and_tables(url: str):
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:

            def inspect(sync_conn):
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                names = set(sync_conn.dialect.get_table_names(sync_conn))
                indexes = {
                    ix["name"] for t in names for ix in sync_conn.dialect.get_indexes(sync_conn, t)
                }
                return compare_metadata(ctx, metadata), names, indexes

            return await conn.run_sync(inspect)
    finally:
        await engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("empty_pg_url")


def test_upgrade_creates_the_schema_the_code_defines(empty_url):
    assert asyncio.run(migrate.current_revision(empty_url)) is None
    migrate.upgrade(empty_url)
    assert asyncio.run(migrate.current_revision(empty_url)) == migrate.head_revision()
    diff, tables, indexes = asyncio.run(_diff_and_tables(empty_url))
    assert diff == [], f"migrations and gateway/db/tables.py disagree: {diff}"
    assert EXPECTED_TABLES <= tables
    for index in (
        "ix_mcp_servers_tenant_id_health_status",
        "ix_server_tools_name_server_id",
        "ix_users_tenant_id_role_is_active",
        "ix_request_logs_tenant_id_created_at",
    ):
        assert index in indexes


def test_downgrade_to_base_and_up_again(empty_url):
    migrate.upgrade(empty_url)
    migrate.downgrade(empty_url, "base")
    _, tables, _ = asyncio.run(_diff_and_tables(empty_url))
    assert tables & EXPECTED_TABLES == set()
    migrate.upgrade(empty_url)
    assert asyncio.run(migrate.current_revision(empty_url)) == migrate.head_revision()


def test_check_current_refuses_an_unmigrated_database(empty_url):
    with pytest.raises(migrate.SchemaNotCurrent, match="gateway migrate"):
        asyncio.run(migrate.check_current(empty_url))
    migrate.upgrade(empty_url)
    asyncio.run(migrate.check_current(empty_url))


def test_serve_refuses_an_unmigrated_database(empty_url):
    import subprocess
    import sys

    env = {"GATEWAY_DATABASE_URL": empty_url, "GATEWAY_DATAPLANE_PORT": "0", "GATEWAY_CONTROLPLANE_PORT": "0",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "no gateway schema" in proc.stderr and "gateway migrate" in proc.stderr


def test_redact_url_hides_passwords():
    assert migrate.redact_url("postgresql://u:s3cret@db/x") == "postgresql://u:***@db/x"
    assert migrate.redact_url("sqlite:///gateway.db") == "sqlite:///gateway.db"
