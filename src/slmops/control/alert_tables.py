"""Tables of the alerts the controller evaluates: each alert's state, and the outbox of webhook deliveries.

Declared on the registry's ``Base`` like :mod:`slmops.control.db`, so one Alembic history (revision ``0007``)
covers them. Times are RFC 3339 UTC strings with second precision, as in the other control-plane tables.

``alert_deliveries`` is an outbox: a transition is written there in the same unit of work that changes the alert's
state, and a row leaves the pending set only when a receiver accepted it, so delivery is at least once across
restarts and replicas.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from slmops.registry.db import Base

__all__ = ["AlertDeliveryRow", "AlertRow"]


class AlertRow(Base):
    """An alert of one rule and label set; pending, firing, or resolved (kept for the retention time)."""

    __tablename__ = "alerts"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule: Mapped[str] = mapped_column(String(64), index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending, firing, resolved
    active_since: Mapped[str] = mapped_column(String(40))
    fired_at: Mapped[str | None] = mapped_column(String(40))
    resolved_at: Mapped[str | None] = mapped_column(String(40))
    value: Mapped[float] = mapped_column(Float)
    summary: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[str] = mapped_column(String(40))


class AlertDeliveryRow(Base):
    """One transition to one webhook: pending until a receiver accepts it (or refuses it for good)."""

    __tablename__ = "alert_deliveries"

    transition_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the Idempotency-Key
    webhook: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)  # of the alert
    kind: Mapped[str] = mapped_column(String(16))  # firing, resolved
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, exactly as signed and sent
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, refused
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # HTTP requests made so far
    created_at: Mapped[str] = mapped_column(String(40))
    next_attempt_at: Mapped[str | None] = mapped_column(String(40))  # None once delivered or refused
    delivered_at: Mapped[str | None] = mapped_column(String(40))
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_alert_deliveries_due", "status", "next_attempt_at"),)
