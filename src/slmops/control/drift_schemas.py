"""Operator API schemas of drift (``GET /api/v1/drift``, pinning a reference); pydantic only, so the CLI and the
dashboard can use them. Times are RFC 3339 UTC strings, like the other control-plane schemas."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from slmops.control.drift import DriftEntry, DriftReference
from slmops.control.repository import iso
from slmops.telemetry.drift import DriftLevel, Signal

__all__ = [
    "DriftEntryPublic",
    "DriftPin",
    "DriftReferencePublic",
    "DriftSignalPublic",
    "entry_public",
    "reference_public",
]


class _Schema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DriftReferencePublic(_Schema):
    """Windows starting in ``since <= start < until`` are the reference."""

    kind: Literal["pinned", "first"]  # first: the version's first days on the class (no pin)
    since: str
    until: str
    pinned_by: str | None = None
    pinned_at: str | None = None


class DriftSignalPublic(_Schema):
    """One signal's verdict (current steps against the reference) and its estimated shift start."""

    signal: Signal
    level: DriftLevel
    psi: float | None  # None: too few samples
    p_value: float | None
    test: str  # chi2, fisher, or empty when insufficient
    reference_n: int
    current_n: int
    reason: str
    numbers: dict[str, float]  # reference_mean/current_mean, or reference_rate/current_rate
    shift_began: str | None  # the first step of the change-point run; None: no change point in the horizon
    shift_detected: str | None  # the step at which the change point was found


class DriftEntryPublic(_Schema):
    """The drift of one (model version, device class)."""

    version_digest: str
    model: str | None  # None: the registry does not know the digest
    version: str | None  # the version label, e.g. v3
    device_class: str
    level: DriftLevel  # the worst signal: alert > warn > ok > insufficient
    shift_began: str | None  # the earliest shift start among the signals that warn or alert
    evaluated_at: str
    step_s: float
    reference: DriftReferencePublic
    reference_steps: int  # steps with data in the reference
    current_since: str | None  # the first current step with data
    monitored_steps: int  # steps after the reference within the horizon
    signals: list[DriftSignalPublic]


class DriftPin(_Schema):
    """Pin the reference of (version, class) to the windows starting in ``[start, end)``."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "version": "tiny@v1",
                    "device_class": "x86_64-8gb",
                    "start": "2025-06-01T00:00:00Z",
                    "end": "2025-06-03T00:00:00Z",
                }
            ]
        },
    )

    version: str = Field(min_length=1, max_length=200, description="a digest or NAME@REF")
    device_class: str = Field(min_length=1, max_length=80)
    start: AwareDatetime
    end: AwareDatetime

    @field_validator("start", "end", mode="before")
    @classmethod
    def _rfc3339_text(cls, value: object) -> object:
        # as the schema says: a date-time string (pydantic alone would also take a number of epoch seconds)
        if not isinstance(value, str | datetime):
            raise ValueError("must be an RFC 3339 time like 2025-06-01T00:00:00Z")
        return value


def reference_public(reference: DriftReference) -> DriftReferencePublic:
    return DriftReferencePublic(
        kind=reference.kind,
        since=iso(reference.since),
        until=iso(reference.until),
        pinned_by=reference.pinned_by,
        pinned_at=iso(reference.pinned_at) if reference.pinned_at else None,
    )


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def entry_public(entry: DriftEntry, step_s: float) -> DriftEntryPublic:
    shifts = {s.signal: s for s in entry.report.shifts}
    signals = []
    for verdict in entry.report.verdicts:
        shift = shifts.get(verdict.signal)
        signals.append(
            DriftSignalPublic(
                signal=verdict.signal,
                level=verdict.level,
                psi=_finite(verdict.psi),
                p_value=_finite(verdict.p_value),
                test=verdict.test,
                reference_n=verdict.reference_n,
                current_n=verdict.current_n,
                reason=verdict.reason,
                numbers={k: v for k, v in verdict.numbers.items() if _finite(v) is not None},
                shift_began=iso(shift.began) if shift and shift.began else None,
                shift_detected=iso(shift.detected) if shift and shift.detected else None,
            )
        )
    began = entry.shift_began
    return DriftEntryPublic(
        version_digest=entry.version_digest,
        model=entry.model,
        version=entry.version,
        device_class=entry.device_class,
        level=entry.level,
        shift_began=iso(began) if began else None,
        evaluated_at=iso(entry.now),
        step_s=step_s,
        reference=reference_public(entry.reference),
        reference_steps=entry.reference_steps,
        current_since=iso(entry.report.current_since) if entry.report.current_since else None,
        monitored_steps=entry.monitored_steps,
        signals=signals,
    )
