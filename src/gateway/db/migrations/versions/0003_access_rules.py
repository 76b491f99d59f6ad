"""Access rules: allow/deny for a tenant, role, user or API key on a server, tool, resource or prompt.

One table, `server_access_rules` (see gateway/db/tables.py and gateway/auth/access.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_access_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("effect", sa.String(length=8), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("tool", sa.String(length=255), nullable=True),
        sa.Column("resource", sa.String(length=2048), nullable=True),
        sa.Column("prompt", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("effect IN ('allow', 'deny')", name=op.f("ck_server_access_rules_effect")),
        sa.CheckConstraint(
            "role IN ('ADMIN', 'USER', 'SERVICE', 'READONLY')", name=op.f("ck_server_access_rules_role")
        ),
        sa.CheckConstraint(
            "(CASE WHEN role IS NULL THEN 0 ELSE 1 END + CASE WHEN user_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN api_key_id IS NULL THEN 0 ELSE 1 END) <= 1",
            name=op.f("ck_server_access_rules_one_subject"),
        ),
        sa.CheckConstraint(
            "(CASE WHEN tool IS NULL THEN 0 ELSE 1 END + CASE WHEN resource IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN prompt IS NULL THEN 0 ELSE 1 END) <= 1",
            name=op.f("ck_server_access_rules_one_object"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_server_access_rules_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_server_access_rules_user_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["enhanced_api_keys.id"],
            name=op.f("fk_server_access_rules_api_key_id_enhanced_api_keys"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["server_id"], ["mcp_servers.id"], name=op.f("fk_server_access_rules_server_id_mcp_servers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_server_access_rules")),
    )
    op.create_index(
        op.f("ix_server_access_rules_tenant_id_server_id"), "server_access_rules", ["tenant_id", "server_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_server_access_rules_tenant_id_server_id"), table_name="server_access_rules")
    op.drop_table("server_access_rules")
