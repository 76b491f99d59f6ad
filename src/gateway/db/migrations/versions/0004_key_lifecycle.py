"""API key lifecycle, tenant weight, upstream credentials.

- enhanced_api_keys: `replaced_by` (rotation), `lookup_digest` (imported
  legacy keys, unique), and CHECKs on the per-key limits (1..100000 an hour,
  1..1000000 a day).
- tenants: `weight` (fair scheduling share, 1..1000, default 100).
- mcp_servers: `auth_kind` (none | header | oauth2_client_credentials),
  `auth_summary` (what may be shown), `auth_sealed` (the sealed credential).

SQLite: columns with a CHECK are added with the CHECK inline (SQLite's ADD
COLUMN allows that); the key table is rebuilt in batch mode to add CHECKs to
existing columns. `tenants` and `mcp_servers` are never rebuilt: other tables
reference them with ON DELETE CASCADE, and with foreign keys on, dropping the
old table during a rebuild would delete their rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import conv

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
# Final names (naming convention already applied), as op.f() would mark them.
_HOURLY = conv("ck_enhanced_api_keys_rate_limit_per_hour")
_DAILY = conv("ck_enhanced_api_keys_rate_limit_per_day")
_AUTH_KINDS = "auth_kind IN ('none', 'header', 'oauth2_client_credentials')"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("enhanced_api_keys") as batch:
        batch.add_column(sa.Column("replaced_by", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("lookup_digest", sa.String(length=64), nullable=True))
        batch.create_check_constraint(_HOURLY, "rate_limit_per_hour BETWEEN 1 AND 100000")
        batch.create_check_constraint(_DAILY, "rate_limit_per_day BETWEEN 1 AND 1000000")
    op.create_index(
        op.f("ix_enhanced_api_keys_lookup_digest"), "enhanced_api_keys", ["lookup_digest"], unique=True
    )
    if sqlite:
        op.execute(
            "ALTER TABLE tenants ADD COLUMN weight INTEGER DEFAULT '100' NOT NULL "
            "CONSTRAINT ck_tenants_weight CHECK (weight BETWEEN 1 AND 1000)"
        )
        op.execute(
            "ALTER TABLE mcp_servers ADD COLUMN auth_kind VARCHAR(32) DEFAULT 'none' NOT NULL "
            f"CONSTRAINT ck_mcp_servers_auth_kind CHECK ({_AUTH_KINDS})"
        )
    else:
        op.add_column("tenants", sa.Column("weight", sa.Integer(), server_default="100", nullable=False))
        op.create_check_constraint(op.f("ck_tenants_weight"), "tenants", "weight BETWEEN 1 AND 1000")
        op.add_column(
            "mcp_servers", sa.Column("auth_kind", sa.String(length=32), server_default="none", nullable=False)
        )
        op.create_check_constraint(op.f("ck_mcp_servers_auth_kind"), "mcp_servers", _AUTH_KINDS)
    op.add_column("mcp_servers", sa.Column("auth_summary", _JSON, nullable=True))
    op.add_column("mcp_servers", sa.Column("auth_sealed", sa.Text(), nullable=True))


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # SQLite (3.35+) drops a column unless a constraint names it; the CHECKs added
    # inline above go with their column.
    op.drop_column("mcp_servers", "auth_sealed")
    op.drop_column("mcp_servers", "auth_summary")
    if not sqlite:
        op.drop_constraint(op.f("ck_mcp_servers_auth_kind"), "mcp_servers", type_="check")
        op.drop_constraint(op.f("ck_tenants_weight"), "tenants", type_="check")
    op.drop_column("mcp_servers", "auth_kind")
    op.drop_column("tenants", "weight")
    op.drop_index(op.f("ix_enhanced_api_keys_lookup_digest"), table_name="enhanced_api_keys")
    with op.batch_alter_table("enhanced_api_keys") as batch:
        batch.drop_constraint(_DAILY, type_="check")
        batch.drop_constraint(_HOURLY, type_="check")
        batch.drop_column("lookup_digest")
        batch.drop_column("replaced_by")
