"""Sign-in sessions and OAuth state.

- sessions: `provider` and `subject` (who vouched for the user), `created_ip`
  and `user_agent` (where the session began), `ended_at` (signed out or
  revoked), and an index on (tenant_id, is_active) for a tenant's listing.
- signin_states: sign-ins in progress, found by the SHA-256 of their `state`
  and deleted when used; they hold the PKCE verifier and the OIDC nonce.

Only nullable columns are added to `sessions`, so no table is rebuilt on SQLite.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _new_columns() -> list[sa.Column]:
    return [
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.Column("subject", sa.String(length=255), nullable=True),
        sa.Column("created_ip", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    ]


def upgrade() -> None:
    for column in _new_columns():
        op.add_column("sessions", column)
    op.create_index(op.f("ix_sessions_tenant_id_is_active"), "sessions", ["tenant_id", "is_active"], unique=False)
    op.create_table(
        "signin_states",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signin_states")),
        sa.UniqueConstraint("state_hash", name=op.f("uq_signin_states_state_hash")),
    )
    op.create_index(op.f("ix_signin_states_expires_at"), "signin_states", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_signin_states_expires_at"), table_name="signin_states")
    op.drop_table("signin_states")
    op.drop_index(op.f("ix_sessions_tenant_id_is_active"), table_name="sessions")
    # SQLite (3.35+) drops a column that no constraint names.
    for column in reversed(_new_columns()):
        op.drop_column("sessions", column.name)
