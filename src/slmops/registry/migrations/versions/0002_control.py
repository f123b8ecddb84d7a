"""control plane: API tokens, enrollment tokens, devices, device events, blueprints

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.String(40), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("auto_approve", sa.Boolean(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(128), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("credential_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("enrollment_token_id", sa.String(32), nullable=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("device_class", sa.String(80), nullable=False),
        sa.Column("enrolled_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
        sa.Column("last_seen", sa.String(40), nullable=True),
        sa.Column("phase", sa.String(32), nullable=True),
        sa.Column("health", sa.String(16), nullable=True),
        sa.Column("active_digest", sa.String(71), nullable=True),
        sa.Column("previous_digest", sa.String(71), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("desired_generation", sa.String(64), nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
    )
    op.create_table(
        "device_events",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("time", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("version_digest", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
    )
    op.create_index("ix_device_events_device_seq", "device_events", ["device_id", "seq"])
    op.create_table(
        "blueprints",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("revision", sa.Integer(), primary_key=True),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(71), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_blueprints_current", "blueprints", ["current"])


def downgrade() -> None:
    op.drop_index("ix_blueprints_current", "blueprints")
    op.drop_table("blueprints")
    op.drop_index("ix_device_events_device_seq", "device_events")
    op.drop_table("device_events")
    op.drop_table("devices")
    op.drop_table("enrollment_tokens")
    op.drop_table("api_tokens")
