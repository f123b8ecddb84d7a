"""drift_references: the reference window an operator pinned for a (model version, device class)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_references",
        sa.Column("version_digest", sa.String(71), primary_key=True),
        sa.Column("device_class", sa.String(80), primary_key=True),
        sa.Column("start", sa.String(40), nullable=False),  # RFC 3339 UTC, inclusive
        sa.Column("end", sa.String(40), nullable=False),  # RFC 3339 UTC, exclusive
        sa.Column("pinned_by", sa.String(64), nullable=False),
        sa.Column("pinned_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("drift_references")
