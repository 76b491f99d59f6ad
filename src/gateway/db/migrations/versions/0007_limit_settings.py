"""Limit settings changed at runtime through the admin API.

- limit_settings: one row (id 1) with the admin's overrides of the `[limits]`
  defaults as JSON (only the keys the admin set), who set them and when. The
  row is created here, empty, so writers only ever update it.
- PostgreSQL: `gateway_tenant` (migration 0006) may read it: a tenant ADMIN
  reads the deployment's limits; only the operator changes them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    table = op.create_table(
        "limit_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("overrides", _JSON, nullable=False),
        sa.Column("updated_by", sa.Uuid(), nullable=True),
        sa.Column("updated_by_key", sa.Uuid(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_limit_settings_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limit_settings")),
    )
    op.bulk_insert(table, [{"id": 1, "overrides": {}, "updated_at": datetime.now(timezone.utc)}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("GRANT SELECT ON limit_settings TO gateway_tenant")


def downgrade() -> None:
    # Dropping the table drops its grants.
    op.drop_table("limit_settings")
