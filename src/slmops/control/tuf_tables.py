"""The table of TUF metadata the control plane serves: every version of every top-level role, as signed bytes.

Declared on the registry's ``Base`` like :mod:`slmops.control.db`, so one Alembic history (revision ``0011``)
covers it. Rows are never updated: a new version is a new row, so ``N.root.json`` (the root chain clients walk)
and ``N.snapshot.json`` / ``N.targets.json`` (consistent snapshots) stay servable while replicas publish.
"""

from __future__ import annotations

from sqlalchemy import Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from slmops.registry.db import Base

__all__ = ["TufMetadataRow"]


class TufMetadataRow(Base):
    __tablename__ = "tuf_metadata"

    role: Mapped[str] = mapped_column(String(16), primary_key=True)  # root, targets, snapshot, timestamp
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)  # the signed metadata exactly as served
    expires: Mapped[str] = mapped_column(String(40))  # RFC 3339 UTC, from the metadata
    created_at: Mapped[str] = mapped_column(String(40))
