"""Upstream management: discovery, tool pinning, health detail, routing rules.

- mcp_servers: `settings` (per-server overrides of health, breaker and pool
  settings), the last health probe (`health_checked_at`, `health_detail`) and
  the last discovery (`discovered_at`, `discovery_error`).
- server_tools: `title`, `output_schema`, and pinning: the hash of the
  definition last discovered, the hash and body of the approved one,
  `pin_status` ('approved' | 'changed') and when it changed.
- server_resources: `title`, `annotations`.
- New tenant-owned tables `server_resource_templates`, `server_prompts`
  (discovered) and `routing_rules` (written by admins), with the same
  row-level security as the others (migration 0006).
- server_metrics: p50 and p99 beside the average and p95.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ROLE = "gateway_tenant"
TENANT = "NULLIF(current_setting('gateway.tenant_id', true), '')::uuid"
POLICY = "tenant_isolation"
NEW_TENANT_TABLES = {
    "server_resource_templates": {"server_id": "mcp_servers"},
    "server_prompts": {"server_id": "mcp_servers"},
    "routing_rules": {},
}


def _stamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _discovered(table: str, key: str, key_type: sa.types.TypeEngine, *columns: sa.Column) -> None:
    op.create_table(
        table,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column(key, key_type, nullable=False),
        *columns,
        *_stamps(),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["server_id"], ["mcp_servers.id"], name=op.f(f"fk_{table}_server_id_mcp_servers"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.UniqueConstraint("server_id", key, name=op.f(f"uq_{table}_server_id_{key}")),
    )


def upgrade() -> None:
    # Plain ALTERs where no constraint changes: a batch would rebuild the table on
    # SQLite, and an earlier downgrade dropping a column under a CHECK would then fail.
    op.add_column("mcp_servers", sa.Column("settings", _JSON, nullable=False, server_default="{}"))
    op.add_column("mcp_servers", sa.Column("health_checked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("mcp_servers", sa.Column("health_detail", _JSON, nullable=True))
    op.add_column("mcp_servers", sa.Column("discovered_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("mcp_servers", sa.Column("discovery_error", sa.Text(), nullable=True))
    with op.batch_alter_table("server_tools") as batch:
        batch.add_column(sa.Column("title", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("output_schema", _JSON, nullable=True))
        batch.add_column(sa.Column("definition_hash", sa.String(length=64), nullable=False, server_default=""))
        batch.add_column(sa.Column("approved_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("approved_definition", _JSON, nullable=True))
        batch.add_column(sa.Column("pin_status", sa.String(length=16), nullable=False, server_default="approved"))
        batch.add_column(sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint("pin_status", "pin_status IN ('approved', 'changed')")
    op.add_column("server_resources", sa.Column("title", sa.String(length=255), nullable=True))
    op.add_column("server_resources", sa.Column("annotations", _JSON, nullable=True))
    op.add_column("server_metrics", sa.Column("p50_response_ms", sa.Float(), nullable=True))
    op.add_column("server_metrics", sa.Column("p99_response_ms", sa.Float(), nullable=True))

    _discovered(
        "server_resource_templates", "uri_template", sa.String(length=2048),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("title", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("mime_type", sa.String(length=255), nullable=True),
        sa.Column("annotations", _JSON, nullable=True),
    )
    _discovered(
        "server_prompts", "name", sa.String(length=255),
        sa.Column("title", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("arguments", _JSON, nullable=False),
    )
    op.create_table(
        "routing_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("match_server", sa.String(length=255), nullable=True),
        sa.Column("match_tool", sa.String(length=255), nullable=True),
        sa.Column("match_tags", _JSON, nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("targets", _JSON, nullable=False),
        sa.Column("target_tags", _JSON, nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        *_stamps(),
        sa.CheckConstraint(
            "strategy IN ('weighted_round_robin', 'least_outstanding', 'lowest_latency')",
            name=op.f("ck_routing_rules_strategy"),
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_routing_rules_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_rules")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_routing_rules_tenant_id_name")),
    )
    op.create_index(op.f("ix_routing_rules_tenant_id_priority"), "routing_rules", ["tenant_id", "priority"])

    if op.get_bind().dialect.name == "postgresql":
        for table, references in NEW_TENANT_TABLES.items():
            mine = f"tenant_id = {TENANT}"
            checks = [f"({table}.{col} IS NULL OR EXISTS (SELECT 1 FROM {ref} r WHERE r.id = {table}.{col}))"
                      for col, ref in references.items()]
            op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {ROLE}")
            op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            op.execute(
                f"CREATE POLICY {POLICY} ON {table} TO {ROLE} USING ({mine}) "
                f"WITH CHECK ({' AND '.join([mine, *checks])})"
            )


def downgrade() -> None:
    # Dropping a table drops its policies and grants.
    op.drop_index(op.f("ix_routing_rules_tenant_id_priority"), table_name="routing_rules")
    op.drop_table("routing_rules")
    op.drop_table("server_prompts")
    op.drop_table("server_resource_templates")
    op.drop_column("server_metrics", "p99_response_ms")
    op.drop_column("server_metrics", "p50_response_ms")
    op.drop_column("server_resources", "annotations")
    op.drop_column("server_resources", "title")
    with op.batch_alter_table("server_tools") as batch:
        batch.drop_constraint(op.f("ck_server_tools_pin_status"), type_="check")
        for column in ("changed_at", "pin_status", "approved_definition", "approved_hash", "definition_hash",
                       "output_schema", "title"):
            batch.drop_column(column)
    for column in ("discovery_error", "discovered_at", "health_detail", "health_checked_at", "settings"):
        op.drop_column("mcp_servers", column)
