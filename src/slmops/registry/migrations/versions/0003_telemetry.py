"""telemetry: windows per (device, window id)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_windows",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("window_id", sa.String(64), primary_key=True),
        sa.Column("version_digest", sa.String(71), nullable=True),
        sa.Column("device_class", sa.String(80), nullable=False),
        sa.Column("window_start", sa.String(40), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("received_at", sa.String(40), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
    )
    op.create_index("ix_telemetry_windows_version_start", "telemetry_windows", ["version_digest", "window_start"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_windows_version_start", "telemetry_windows")
    op.drop_table("telemetry_windows")
