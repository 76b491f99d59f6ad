"""Row-level security on tenant-owned tables (PostgreSQL; nothing on SQLite).

The second wall behind `Actor.tenant_filter` (controlplane/service.py): the
control plane switches to the NOLOGIN role `gateway_tenant` with
`gateway.tenant_id` set for every transaction it opens for a tenant's actor,
and these policies then show and accept only that tenant's rows, whatever the
query says.

- Every table with a `tenant_id` (and `tenants` by its `id`) gets ENABLE ROW
  LEVEL SECURITY and one policy `TO gateway_tenant`. Not FORCE: the owner (the
  data plane's snapshot loader, the records writer, migrations, the operator's
  view) keeps seeing every row.
- A written row's references must be visible to the tenant too (a key's user,
  a rule's server): foreign-key checks run as the owner and would otherwise
  accept another tenant's ids.
- `gateway_tenant` gets only what the control plane needs for a tenant:
  config_state is read and bumped; records are read and appended;
  signin_states and gateway_secrets are not reachable at all.

The role is cluster-wide: it is created when missing and left in place on
downgrade (other databases on the cluster may use it); only this database's
grants and policies are removed. Creating it needs CREATEROLE (or create it
beforehand and grant it to the gateway's login role).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ROLE = "gateway_tenant"
# NULLIF: once set in a session, a custom setting reads '' outside the transaction that set it.
TENANT = "NULLIF(current_setting('gateway.tenant_id', true), '')::uuid"
POLICY = "tenant_isolation"

# Table -> (column the tenant is read from, references a written row must have in the same tenant).
TENANT_OWNED: dict[str, tuple[str, dict[str, str]]] = {
    "tenants": ("id", {}),
    "users": ("tenant_id", {}),
    "mcp_servers": ("tenant_id", {}),
    "server_tools": ("tenant_id", {"server_id": "mcp_servers"}),
    "server_resources": ("tenant_id", {"server_id": "mcp_servers"}),
    "enhanced_api_keys": ("tenant_id", {"user_id": "users"}),
    "sessions": ("tenant_id", {"user_id": "users"}),
    "server_access_rules": (
        "tenant_id", {"user_id": "users", "api_key_id": "enhanced_api_keys", "server_id": "mcp_servers"}
    ),
    "audit_logs": ("tenant_id", {}),
    "request_logs": ("tenant_id", {}),
    "server_metrics": ("tenant_id", {}),
}
RECORDS = ("audit_logs", "request_logs", "server_metrics")
GRANTS = {
    **{table: "SELECT, INSERT, UPDATE, DELETE" for table in TENANT_OWNED if table not in RECORDS},
    **{table: "SELECT, INSERT" for table in RECORDS},
    "config_state": "SELECT, UPDATE",
}


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgresql():
        return
    op.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
        f"THEN CREATE ROLE {ROLE} NOLOGIN; END IF; END $$"
    )
    op.execute(f"GRANT {ROLE} TO current_user")
    op.execute(f"DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO {ROLE}', current_schema()); END $$")
    for table, privileges in GRANTS.items():
        op.execute(f"GRANT {privileges} ON {table} TO {ROLE}")
    for table, (column, references) in TENANT_OWNED.items():
        mine = f"{column} = {TENANT}"
        # The referenced table's own policy limits the subquery to the tenant's rows.
        checks = [f"({table}.{col} IS NULL OR EXISTS (SELECT 1 FROM {ref} r WHERE r.id = {table}.{col}))"
                  for col, ref in references.items()]
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {POLICY} ON {table} TO {ROLE} USING ({mine}) "
            f"WITH CHECK ({' AND '.join([mine, *checks])})"
        )


def downgrade() -> None:
    if not _postgresql():
        return
    for table in TENANT_OWNED:
        op.execute(f"DROP POLICY IF EXISTS {POLICY} ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    for table in GRANTS:
        op.execute(f"REVOKE ALL ON {table} FROM {ROLE}")
    op.execute(f"DO $$ BEGIN EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM {ROLE}', current_schema()); END $$")
