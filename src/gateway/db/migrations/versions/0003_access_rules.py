"""Access rules (allow/deny on servers, tools and resources).

Reserved in the revision chain while the work lands; until then it changes nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
