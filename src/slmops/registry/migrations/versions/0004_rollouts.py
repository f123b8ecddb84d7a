"""rollouts: releases, their cohorts and events, and leases for singleton jobs

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("blueprint", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("from_digest", sa.String(71), nullable=True),
        sa.Column("from_label", sa.String(200), nullable=True),
        sa.Column("from_digests", sa.JSON(), nullable=False),
        sa.Column("to_name", sa.String(128), nullable=False),
        sa.Column("to_digest", sa.String(71), nullable=False),
        sa.Column("to_label", sa.String(200), nullable=False),
        sa.Column("to_digests", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("stage_started_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=True),
        sa.Column("evaluated_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_releases_blueprint", "releases", ["blueprint"])
    op.create_index("ix_releases_state", "releases", ["state"])
    op.create_table(
        "release_members",
        sa.Column("release_id", sa.String(32), sa.ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("device_class", sa.String(80), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("joined_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "release_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("release_id", sa.String(32), sa.ForeignKey("releases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("numbers", sa.JSON(), nullable=False),
    )
    op.create_index("ix_release_events_release_id", "release_events", ["release_id"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_telemetry_windows_received", "telemetry_windows", ["version_digest", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_windows_received", "telemetry_windows")
    op.drop_table("leases")
    op.drop_index("ix_release_events_release_id", "release_events")
    op.drop_table("release_events")
    op.drop_table("release_members")
    op.drop_index("ix_releases_state", "releases")
    op.drop_index("ix_releases_blueprint", "releases")
    op.drop_table("releases")
