"""The table of feedback samples devices uploaded (redacted on the device, opt-in only).

Declared on the registry's ``Base`` like :mod:`slmops.control.db`, so one Alembic history (revision ``0009``)
covers it; importing this module also declares the dataset tables of :mod:`slmops.registry.datasets`, made from
these samples. Times are RFC 3339 UTC strings with second precision, as in the other control-plane tables.

**No device id is stored.** A sample keeps a *device reference*: ``sha256("slmops-feedback-device\\0" + device
id)``, enough to scope a device's sample ids (so a retried upload never duplicates and two devices' ids never
collide) and to count a device's samples per day for its ``max_samples_per_day``. The reference never leaves the
control plane: the operator API, exports and datasets carry only the model version, the device class and the
release the device was in when it sent the sample. Someone who holds the devices table can still link the two
(the server must, to enforce the limit); someone who only reads samples or datasets cannot.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from slmops.registry import datasets as _datasets  # noqa: F401  (the dataset tables, on the same metadata)
from slmops.registry.db import Base

__all__ = ["FeedbackSampleRow"]


class FeedbackSampleRow(Base):
    """One rated completion from one device, stored once per (device, sample id)."""

    __tablename__ = "feedback_samples"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of (device_ref, sample_id)
    device_ref: Mapped[str] = mapped_column(String(64))  # pseudonym of the device; never leaves the server
    sample_id: Mapped[str] = mapped_column(String(64))  # as made on the device
    completion_id: Mapped[str] = mapped_column(String(64))
    version_digest: Mapped[str] = mapped_column(String(71))
    device_class: Mapped[str] = mapped_column(String(80))  # the device's class when the sample arrived
    release_id: Mapped[str | None] = mapped_column(String(32))  # the release whose cohort held the device, if any
    rated_at: Mapped[str] = mapped_column(String(40))
    rating: Mapped[str | None] = mapped_column(String(8))  # up, down
    score: Mapped[float | None] = mapped_column(Float)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"role": ..., "content": ...}], the prompt
    answer: Mapped[str] = mapped_column(Text)
    correction: Mapped[str | None] = mapped_column(Text)
    redactions: Mapped[dict[str, int]] = mapped_column(JSON)  # spans replaced on the device, per type
    received_at: Mapped[str] = mapped_column(String(40))

    __table_args__ = (
        Index("ix_feedback_samples_received", "received_at", "id"),
        Index("ix_feedback_samples_version_class_received", "version_digest", "device_class", "received_at"),
        Index("ix_feedback_samples_class_received", "device_class", "received_at"),
        Index("ix_feedback_samples_device_received", "device_ref", "received_at"),
    )
