"""telemetry_windows: indexes for drift (a version's windows on one class in time order; the pairs active lately)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_telemetry_windows_version_class_start",
        "telemetry_windows",
        ["version_digest", "device_class", "window_start"],
    )
    op.create_index("ix_telemetry_windows_start", "telemetry_windows", ["window_start"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_windows_start", table_name="telemetry_windows")
    op.drop_index("ix_telemetry_windows_version_class_start", table_name="telemetry_windows")
