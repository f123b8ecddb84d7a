"""registry: model versions, their files, parents and aliases

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, index=True),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(128), nullable=True),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("content_key", sa.String(71), nullable=False),
        sa.Column("total_size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.UniqueConstraint("name", "label", name="uq_version_label"),
        sa.UniqueConstraint("name", "content_key", name="uq_version_content"),
    )
    op.create_table(
        "version_files",
        sa.Column(
            "version_digest",
            sa.String(71),
            sa.ForeignKey("model_versions.digest", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("path", sa.String(1024), primary_key=True),
        sa.Column("blob_digest", sa.String(71), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_version_files_blob", "version_files", ["blob_digest"])
    op.create_table(
        "version_parents",
        sa.Column(
            "child_digest",
            sa.String(71),
            sa.ForeignKey("model_versions.digest", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("parent_digest", sa.String(71), primary_key=True),
    )
    op.create_index("ix_version_parents_parent", "version_parents", ["parent_digest"])
    op.create_table(
        "model_aliases",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("version_digest", sa.String(71), sa.ForeignKey("model_versions.digest"), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("model_aliases")
    op.drop_index("ix_version_parents_parent", "version_parents")
    op.drop_table("version_parents")
    op.drop_index("ix_version_files_blob", "version_files")
    op.drop_table("version_files")
    op.drop_table("model_versions")
