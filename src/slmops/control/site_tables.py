"""The table of site adaptations: what each site (device label ``site=<name>``) set, one row per site.

Declared on the registry's ``Base`` like :mod:`slmops.control.db`, so one Alembic history (revision ``0010``)
covers it. The adaptation is stored as the JSON of :class:`~slmops.core.adaptation.SiteAdaptation`; what a device
applies is resolved from it against its blueprint's limits at desired-state time (:mod:`slmops.core.sites`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from slmops.registry.db import Base

__all__ = ["SiteAdaptationRow"]


class SiteAdaptationRow(Base):
    __tablename__ = "site_adaptations"

    site: Mapped[str] = mapped_column(String(128), primary_key=True)
    adaptation: Mapped[dict[str, Any]] = mapped_column(JSON)  # SiteAdaptation as JSON
    updated_at: Mapped[str] = mapped_column(String(40))  # RFC 3339 UTC
    updated_by: Mapped[str] = mapped_column(String(64))
