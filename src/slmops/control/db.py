"""Control-plane tables, declared on the registry's ``Base`` so one Alembic history covers both.

Times are stored as RFC 3339 UTC strings with second precision (``2025-01-31T12:00:00Z``), like the registry's;
they sort as text, which the atomic enrollment-token update relies on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from slmops.registry.db import Base

__all__ = [
    "ACTIVE_RELEASE_STATES",
    "ApiTokenRow",
    "BlueprintRow",
    "DeviceEventRow",
    "DeviceRow",
    "DriftReferenceRow",
    "EnrollmentTokenRow",
    "LeaseRow",
    "ReleaseEventRow",
    "ReleaseMemberRow",
    "ReleaseRow",
    "TelemetryWindowRow",
]


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[str] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(64))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class EnrollmentTokenRow(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[str] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[str] = mapped_column(String(40))
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    auto_approve: Mapped[bool] = mapped_column(Boolean, default=False)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    credential_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    enrollment_token_id: Mapped[str | None] = mapped_column(String(32))
    hostname: Mapped[str] = mapped_column(String(255))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    device_class: Mapped[str] = mapped_column(String(80))
    enrolled_at: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[str] = mapped_column(String(40))
    last_seen: Mapped[str | None] = mapped_column(String(40))
    phase: Mapped[str | None] = mapped_column(String(32))
    health: Mapped[str | None] = mapped_column(String(16))
    active_digest: Mapped[str | None] = mapped_column(String(71))
    previous_digest: Mapped[str | None] = mapped_column(String(71))
    last_error: Mapped[str | None] = mapped_column(Text)
    desired_generation: Mapped[str | None] = mapped_column(String(64))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    last_claim_timestamp: Mapped[int | None] = mapped_column(BigInteger)  # of the last claim that got a credential


class DeviceEventRow(Base):
    __tablename__ = "device_events"

    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    time: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(64))
    version_digest: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[str] = mapped_column(String(40))
    seq: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_device_events_device_seq", "device_id", "seq"),)


class BlueprintRow(Base):
    __tablename__ = "blueprints"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[str] = mapped_column(Text)  # the blueprint as canonical JSON
    source: Mapped[str] = mapped_column(Text)  # the YAML text as applied
    digest: Mapped[str] = mapped_column(String(71))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(40))
    current: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_blueprints_current", "current"),)


ACTIVE_RELEASE_STATES = ("running", "paused")  # the states of a release that desired state and the controller read


class ReleaseRow(Base):
    """A release: one blueprint moving from one model version to another through stages."""

    __tablename__ = "releases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    blueprint: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # running, paused, halted, aborted, completed
    from_digest: Mapped[str | None] = mapped_column(String(71))  # the version the blueprint resolved to at start
    from_label: Mapped[str | None] = mapped_column(String(200))
    from_digests: Mapped[list[str]] = mapped_column(JSON)  # it and its variants: the baseline's versions
    to_name: Mapped[str] = mapped_column(String(128))
    to_digest: Mapped[str] = mapped_column(String(71))
    to_label: Mapped[str] = mapped_column(String(200))
    to_digests: Mapped[list[str]] = mapped_column(JSON)  # it and its variants: the canaries' versions
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)  # a core.rollout.RolloutPolicy
    stage_index: Mapped[int] = mapped_column(Integer)
    stage_started_at: Mapped[float] = mapped_column(Float)  # epoch seconds (server clock)
    started_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)  # why it is in its state (the last decision)
    revision: Mapped[int] = mapped_column(Integer)  # bumped by every change; guards concurrent updates
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the last stage evaluation
    evaluated_at: Mapped[float | None] = mapped_column(Float)


class ReleaseMemberRow(Base):
    """A device in a release's cohort, recorded when it first entered (membership never shrinks)."""

    __tablename__ = "release_members"

    release_id: Mapped[str] = mapped_column(String(32), ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(80))
    stage_index: Mapped[int] = mapped_column(Integer)  # the stage in which it joined
    joined_at: Mapped[float] = mapped_column(Float)


class ReleaseEventRow(Base):
    """Every decision about a release, with the numbers that led to it."""

    __tablename__ = "release_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[str] = mapped_column(String(32), ForeignKey("releases.id", ondelete="CASCADE"), index=True)
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    stage_index: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    numbers: Mapped[dict[str, Any]] = mapped_column(JSON)


class LeaseRow(Base):
    """A named lease: the one server replica that holds it runs the singleton job (the rollout controller)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)  # epoch seconds
    acquired_at: Mapped[float] = mapped_column(Float)


class TelemetryWindowRow(Base):
    """One telemetry window of a device, stored once per (device, window id)."""

    __tablename__ = "telemetry_windows"

    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    window_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_digest: Mapped[str | None] = mapped_column(String(71))
    device_class: Mapped[str] = mapped_column(String(80))
    window_start: Mapped[str] = mapped_column(String(40))  # normalized RFC 3339 UTC, second precision
    window_s: Mapped[float] = mapped_column(Float)
    received_at: Mapped[str] = mapped_column(String(40))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # the TelemetryWindow as sent

    __table_args__ = (
        Index("ix_telemetry_windows_version_start", "version_digest", "window_start"),
        Index("ix_telemetry_windows_received", "version_digest", "received_at"),
        Index("ix_telemetry_windows_version_class_start", "version_digest", "device_class", "window_start"),
        Index("ix_telemetry_windows_start", "window_start"),
    )


class DriftReferenceRow(Base):
    """The reference window an operator pinned for one (model version, device class); without one the version's
    first windows are the reference."""

    __tablename__ = "drift_references"

    version_digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(80), primary_key=True)
    start: Mapped[str] = mapped_column(String(40))  # RFC 3339 UTC, inclusive
    end: Mapped[str] = mapped_column(String(40))  # RFC 3339 UTC, exclusive
    pinned_by: Mapped[str] = mapped_column(String(64))
    pinned_at: Mapped[str] = mapped_column(String(40))


# The alerts' tables live in their own module on the same metadata; imported here so that whoever sees these
# tables (the app, migrations, their test) sees those too.
from slmops.control import alert_tables as _alert_tables  # noqa: E402,F401
from slmops.control import feedback_tables as _feedback_tables  # noqa: E402,F401
from slmops.control import site_tables as _site_tables  # noqa: E402,F401
from slmops.control import tuf_tables as _tuf_tables  # noqa: E402,F401
