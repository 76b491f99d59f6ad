"""Records that cannot be lost and their lifecycle: audit chain, retention, alerts, system configuration.

- audit_logs: `role`, and the tenant's hash chain (`chain_seq`, `prev_hash`,
  `entry_hash`; unique per tenant and position).
- retention_policies: days to keep each record table, the deployment's
  default (tenant_id NULL) and tenants' overrides; when it last ran.
- alert_rules and alert_events: performance alert rules and their firings.
- system_config and system_config_history: key/value settings by category,
  tenant overrides, sealed sensitive values, versions.
- The new tables are tenant-owned with row-level security like the others
  (migration 0006); rows with tenant_id NULL are the operator's, which no
  tenant sees.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ROLE = "gateway_tenant"
TENANT = "NULLIF(current_setting('gateway.tenant_id', true), '')::uuid"
POLICY = "tenant_isolation"
NEW_TENANT_TABLES = {
    "retention_policies": {},
    "alert_rules": {"server_id": "mcp_servers"},
    "alert_events": {"rule_id": "alert_rules"},
    "system_config": {},
    "system_config_history": {},
}
NO_NULL_DEFAULT = "tenant_id IS NULL"


def _stamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _tenant(table: str) -> list:
    return [
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"),
                                ondelete="CASCADE"),
    ]


def upgrade() -> None:
    op.add_column("audit_logs", sa.Column("role", sa.String(length=16), nullable=True))
    op.add_column("audit_logs", sa.Column("chain_seq", sa.BigInteger(), nullable=True))
    op.add_column("audit_logs", sa.Column("prev_hash", sa.String(length=64), nullable=True))
    op.add_column("audit_logs", sa.Column("entry_hash", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_audit_logs_tenant_id_chain_seq"), "audit_logs", ["tenant_id", "chain_seq"], unique=True)

    op.create_table(
        "retention_policies",
        sa.Column("id", sa.Uuid(), nullable=False),
        *_tenant("retention_policies"),
        sa.Column("table_name", sa.String(length=64), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_deleted", sa.BigInteger(), nullable=False, server_default="0"),
        *_stamps(),
        sa.CheckConstraint(
            "table_name IN ('request_logs', 'audit_logs', 'server_metrics', 'alert_events')",
            name=op.f("ck_retention_policies_table_name"),
        ),
        sa.CheckConstraint("days BETWEEN 1 AND 36500", name=op.f("ck_retention_policies_days")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retention_policies")),
    )
    op.create_index(op.f("ix_retention_policies_tenant_id_table_name"), "retention_policies",
                    ["tenant_id", "table_name"], unique=True)
    op.create_index("ix_retention_policies_default_table", "retention_policies", ["table_name"], unique=True,
                    postgresql_where=sa.text(NO_NULL_DEFAULT), sqlite_where=sa.text(NO_NULL_DEFAULT))

    op.create_table(
        "alert_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        *_tenant("alert_rules"),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("window_minutes", sa.Integer(), nullable=False),
        sa.Column("webhook_url", sa.String(length=1000), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        *_stamps(),
        sa.CheckConstraint(
            "metric IN ('error_rate', 'latency_p95', 'latency_p99', 'health', 'request_rate')",
            name=op.f("ck_alert_rules_metric"),
        ),
        sa.CheckConstraint("window_minutes BETWEEN 1 AND 10080", name=op.f("ck_alert_rules_window_minutes")),
        sa.ForeignKeyConstraint(["server_id"], ["mcp_servers.id"], name=op.f("fk_alert_rules_server_id_mcp_servers"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_rules")),
    )
    op.create_index(op.f("ix_alert_rules_tenant_id_name"), "alert_rules", ["tenant_id", "name"], unique=True)

    op.create_table(
        "alert_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        *_tenant("alert_events"),
        sa.Column("rule_id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('firing', 'resolved')", name=op.f("ck_alert_events_state")),
        sa.ForeignKeyConstraint(["rule_id"], ["alert_rules.id"], name=op.f("fk_alert_events_rule_id_alert_rules"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
    )
    op.create_index(op.f("ix_alert_events_tenant_id_fired_at"), "alert_events", ["tenant_id", "fired_at"])
    op.create_index(op.f("ix_alert_events_rule_id_state"), "alert_events", ["rule_id", "state"])

    op.create_table(
        "system_config",
        sa.Column("id", sa.Uuid(), nullable=False),
        *_tenant("system_config"),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("value", _JSON, nullable=True),
        sa.Column("value_sealed", sa.Text(), nullable=True),
        sa.Column("sensitive", sa.Boolean(), nullable=False),
        sa.Column("runtime", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.Uuid(), nullable=True),
        *_stamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_system_config")),
    )
    op.create_index(op.f("ix_system_config_tenant_id_key"), "system_config", ["tenant_id", "key"], unique=True)
    op.create_index("ix_system_config_default_key", "system_config", ["key"], unique=True,
                    postgresql_where=sa.text(NO_NULL_DEFAULT), sqlite_where=sa.text(NO_NULL_DEFAULT))

    op.create_table(
        "system_config_history",
        sa.Column("id", sa.Uuid(), nullable=False),
        *_tenant("system_config_history"),
        sa.Column("config_id", sa.Uuid(), nullable=True),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("value", _JSON, nullable=True),
        sa.Column("value_sealed", sa.Text(), nullable=True),
        sa.Column("sensitive", sa.Boolean(), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("changed_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_system_config_history")),
    )
    op.create_index(op.f("ix_system_config_history_tenant_id_key_version"), "system_config_history",
                    ["tenant_id", "key", "version"])

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
    # Dropping a table drops its indexes, policies and grants.
    for table in ("system_config_history", "system_config", "alert_events", "alert_rules", "retention_policies"):
        op.drop_table(table)
    op.drop_index(op.f("ix_audit_logs_tenant_id_chain_seq"), table_name="audit_logs")
    for column in ("entry_hash", "prev_hash", "chain_seq", "role"):
        op.drop_column("audit_logs", column)
