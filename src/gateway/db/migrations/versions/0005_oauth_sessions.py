"""Sign-in sessions and OAuth state.

Reserved in the revision chain while the work lands; until then it changes nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
