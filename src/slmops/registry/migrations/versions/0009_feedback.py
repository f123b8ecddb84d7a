"""feedback_samples, dataset_versions and dataset_files: rated completions devices uploaded, and curated datasets

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback_samples",
        sa.Column("id", sa.String(64), primary_key=True),  # sha256 of (device_ref, sample_id): retries collide
        sa.Column("device_ref", sa.String(64), nullable=False),  # pseudonym of the device; never exported
        sa.Column("sample_id", sa.String(64), nullable=False),  # as made on the device
        sa.Column("completion_id", sa.String(64), nullable=False),
        sa.Column("version_digest", sa.String(71), nullable=False),
        sa.Column("device_class", sa.String(80), nullable=False),
        sa.Column("release_id", sa.String(32), nullable=True),
        sa.Column("rated_at", sa.String(40), nullable=False),
        sa.Column("rating", sa.String(8), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("redactions", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_feedback_samples_received", "feedback_samples", ["received_at", "id"])
    op.create_index(
        "ix_feedback_samples_version_class_received",
        "feedback_samples",
        ["version_digest", "device_class", "received_at"],
    )
    op.create_index("ix_feedback_samples_class_received", "feedback_samples", ["device_class", "received_at"])
    op.create_index("ix_feedback_samples_device_received", "feedback_samples", ["device_ref", "received_at"])
    op.create_table(
        "dataset_versions",
        sa.Column("digest", sa.String(71), primary_key=True),  # sha256 of the canonical manifest
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),  # label v<number>
        sa.Column("content_key", sa.String(71), nullable=False),  # all but name and number: same data, same version
        sa.Column("manifest", sa.Text(), nullable=False),  # canonical JSON, exactly what was hashed
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.UniqueConstraint("name", "number", name="uq_dataset_version_number"),
        sa.UniqueConstraint("name", "content_key", name="uq_dataset_version_content"),
    )
    op.create_index("ix_dataset_versions_name", "dataset_versions", ["name"])
    op.create_table(
        "dataset_files",
        sa.Column(
            "dataset_digest",
            sa.String(71),
            sa.ForeignKey("dataset_versions.digest", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("path", sa.String(255), primary_key=True),
        sa.Column("blob_digest", sa.String(71), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_dataset_files_blob", "dataset_files", ["blob_digest"])


def downgrade() -> None:
    op.drop_table("dataset_files")
    op.drop_table("dataset_versions")
    op.drop_index("ix_feedback_samples_device_received", table_name="feedback_samples")
    op.drop_index("ix_feedback_samples_class_received", table_name="feedback_samples")
    op.drop_index("ix_feedback_samples_version_class_received", table_name="feedback_samples")
    op.drop_index("ix_feedback_samples_received", table_name="feedback_samples")
    op.drop_table("feedback_samples")
