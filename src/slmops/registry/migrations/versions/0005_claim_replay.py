"""devices: the timestamp of the last claim that obtained a credential, so a replayed claim is refused

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("last_claim_timestamp", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # a plain ALTER TABLE (SQLite >= 3.35): rebuilding the table would cascade-delete the devices' events
    op.drop_column("devices", "last_claim_timestamp")
