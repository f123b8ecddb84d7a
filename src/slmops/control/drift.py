"""Drift of each (model version, device class) on the control plane: windows from the database, the pure
comparison from :mod:`slmops.telemetry.drift`, pinned references.

A (version, class) is compared against its **reference**: the range an operator pinned (``drift_references``), or
else the first :attr:`DriftSchedule.reference_s` (two days) of that version's windows on that class. The windows
are merged into steps of :attr:`DriftSchedule.step_s` (one hour); the **current** steps are those that start
within the last :attr:`DriftSchedule.current_steps` step lengths before ``now`` (three hours), compared per signal
with PSI and a two-sample test (:func:`slmops.telemetry.drift.compare`). When a shift began is estimated over the
monitored steps after the reference, within the last :attr:`DriftSchedule.horizon_s` (seven days). The schedule
comes from the server settings (``SLMOPS_DRIFT_STEP_S`` and the like, :func:`schedule_of`), the thresholds from
:class:`~slmops.telemetry.drift.DriftConfig`'s defaults.

What one call reads, so it can run on every controller tick of a large fleet:

- :func:`drift_facts` (the alert rules): per (version, class) with windows in the current steps, the rows of the
  reference range and of the current steps only -- no change-point search.
- :func:`drift_overview` / :func:`drift_entry` (CLI, dashboard): the rows of the reference range and of the
  horizon.
- Only ``window_start`` and two members of each window's JSON body (``latency_ms`` and ``drift``) are selected,
  never the whole body; rows are found through ``ix_telemetry_windows_version_start``.
- A closed reference range is read once and kept in memory (per plane, at most 1,024 ranges) while its window
  count stays the same; each call then counts its rows instead of reading them.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from slmops.control.db import DriftReferenceRow, TelemetryWindowRow
from slmops.control.repository import iso, parse_iso, version_names
from slmops.core.wire import DriftSummary, Histogram
from slmops.errors import ConfigError, NotFoundError
from slmops.telemetry.aggregate import merge_histograms
from slmops.telemetry.alerts import DriftFact
from slmops.telemetry.changepoint import cusum_alarms
from slmops.telemetry.drift import (
    SIGNALS,
    DriftConfig,
    DriftLevel,
    DriftPoint,
    DriftReport,
    DriftVerdict,
    ShiftEstimate,
    compare,
    merge_summaries,
    shift_start,
)

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane
    from slmops.control.settings import ServerSettings

__all__ = [
    "DEFAULT_SCHEDULE",
    "DriftEntry",
    "DriftReference",
    "DriftSchedule",
    "drift_entry",
    "drift_facts",
    "drift_overview",
    "pin_reference",
    "schedule_of",
    "unpin_reference",
    "worst_level",
]

_W = TelemetryWindowRow
_Pins = dict[tuple[str, str], DriftReferenceRow]
_SEVERITY: dict[DriftLevel, int] = {"insufficient": 0, "ok": 1, "warn": 2, "alert": 3}


@dataclass(frozen=True)
class DriftSchedule:
    """Which steps are compared: the step length, the default reference length, how many of the last steps are
    the current set, and how far back the shift start is searched."""

    step_s: float = 3600.0
    reference_s: float = 2 * 86400.0  # without a pinned range: the version's first two days on the class
    current_steps: int = 3
    horizon_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if not (self.step_s > 0 and self.reference_s >= self.step_s and self.horizon_s >= self.step_s):
            raise ConfigError(
                f"need step_s > 0 and reference_s, horizon_s >= step_s (seconds); got step_s={self.step_s}, "
                f"reference_s={self.reference_s}, horizon_s={self.horizon_s}"
            )
        if self.current_steps < 1:
            raise ConfigError(f"current_steps must be at least 1; got {self.current_steps}")

    def floor(self, moment: datetime) -> datetime:
        """The start of the step that contains ``moment``."""
        return datetime.fromtimestamp(math.floor(moment.timestamp() / self.step_s) * self.step_s, UTC)

    def ceil(self, moment: datetime) -> datetime:
        """The start of the first step that starts at or after ``moment``."""
        return datetime.fromtimestamp(math.ceil(moment.timestamp() / self.step_s) * self.step_s, UTC)


DEFAULT_SCHEDULE = DriftSchedule()


def schedule_of(settings: ServerSettings) -> DriftSchedule:
    """The schedule the server's settings give (``SLMOPS_DRIFT_STEP_S``, ``..._REFERENCE_S``,
    ``..._CURRENT_STEPS``, ``..._HORIZON_S``)."""
    return DriftSchedule(
        step_s=settings.drift_step_s,
        reference_s=settings.drift_reference_s,
        current_steps=settings.drift_current_steps,
        horizon_s=settings.drift_horizon_s,
    )


@dataclass(frozen=True)
class DriftReference:
    """The reference range of a (version, class): windows starting in ``since <= start < until``."""

    kind: Literal["pinned", "first"]  # first: the version's first ``reference_s`` on the class
    since: datetime
    until: datetime
    pinned_by: str | None = None
    pinned_at: datetime | None = None


@dataclass(frozen=True)
class DriftEntry:
    """The drift of one (version, class) at ``now``: its reference and the report of the pure comparison."""

    version_digest: str
    device_class: str
    model: str | None  # None: the registry does not know the digest
    version: str | None  # the version label (v3)
    reference: DriftReference
    report: DriftReport
    now: datetime
    reference_steps: int  # steps of the reference with data
    monitored_steps: int  # steps after the reference within the horizon

    @property
    def level(self) -> DriftLevel:
        return worst_level(self.report.verdicts)

    @property
    def shift_began(self) -> datetime | None:
        """The earliest shift start among the signals that warn or alert now; None when none does."""
        drifting = {v.signal for v in self.report.verdicts if v.level in ("warn", "alert")}
        starts = [s.began for s in self.report.shifts if s.signal in drifting and s.began is not None]
        return min(starts) if starts else None

    @property
    def name(self) -> str:
        """``model@version`` when the registry knows the digest, else the digest."""
        return f"{self.model}@{self.version}" if self.model and self.version else self.version_digest


def worst_level(verdicts: Sequence[DriftVerdict]) -> DriftLevel:
    """alert > warn > ok > insufficient; ``insufficient`` when there is no verdict."""
    levels = [v.level for v in verdicts]
    return max(levels, key=lambda level: _SEVERITY[level]) if levels else "insufficient"


# ---------------------------------------------------------------------------------------------------- reading


def _digest(plane: ControlPlane, version: str) -> str:
    return version if version.startswith("sha256:") else plane.registry.resolve(version).digest


def _pairs(session: Session, since: datetime, until: datetime) -> list[tuple[str, str]]:
    rows = session.execute(
        select(_W.version_digest, _W.device_class)
        .where(_W.version_digest.is_not(None), _W.window_start >= iso(since), _W.window_start < iso(until))
        .group_by(_W.version_digest, _W.device_class)
    ).all()
    return sorted((str(d), str(c)) for d, c in rows)


def _first_start(session: Session, digest: str, device_class: str) -> datetime | None:
    first = session.scalar(
        select(func.min(_W.window_start)).where(_W.version_digest == digest, _W.device_class == device_class)
    )
    return parse_iso(first) if first else None


def _pinned(row: DriftReferenceRow) -> DriftReference:
    return DriftReference("pinned", parse_iso(row.start), parse_iso(row.end), row.pinned_by, parse_iso(row.pinned_at))


def _reference(
    session: Session,
    digest: str,
    device_class: str,
    schedule: DriftSchedule,
    pins: _Pins,
) -> DriftReference | None:
    pin = pins.get((digest, device_class))
    if pin is not None:
        return _pinned(pin)
    first = _first_start(session, digest, device_class)
    if first is None:
        return None
    since = schedule.floor(first)
    return DriftReference("first", since, since + timedelta(seconds=schedule.reference_s))


def _where(digest: str, device_class: str, since: datetime, until: datetime) -> tuple[ColumnElement[bool], ...]:
    return (
        _W.version_digest == digest,
        _W.device_class == device_class,
        _W.window_start >= iso(since),
        _W.window_start < iso(until),
    )


def _points(
    session: Session, digest: str, device_class: str, since: datetime, until: datetime, schedule: DriftSchedule
) -> list[DriftPoint]:
    """The windows starting in ``[since, until)`` merged per step (what :func:`drift_series` does, without building
    whole windows): only ``window_start`` and the body's ``latency_ms`` and ``drift`` are selected."""
    if not since < until:
        return []
    rows = session.execute(
        select(_W.window_start, _W.body["latency_ms"], _W.body["drift"]).where(
            *_where(digest, device_class, since, until)
        )
    ).all()
    steps: dict[int, tuple[Histogram, DriftSummary | None]] = {}
    for start, latency_json, summary_json in rows:
        key = math.floor(parse_iso(start).timestamp() / schedule.step_s)
        latency = Histogram.model_validate(latency_json) if latency_json else Histogram()
        summary = DriftSummary.model_validate(summary_json) if summary_json else None
        if key in steps:
            merged_latency, merged = steps[key]
            latency = merge_histograms(merged_latency, latency)
            if merged is not None:
                summary = merged if summary is None else merge_summaries(merged, summary)
        steps[key] = (latency, summary)
    return [
        DriftPoint(start=datetime.fromtimestamp(key * schedule.step_s, UTC), latency_ms=latency, summary=summary)
        for key, (latency, summary) in sorted(steps.items())
    ]


@dataclass
class _Cached:
    windows: int
    points: list[DriftPoint]


# Reference steps of closed reference ranges, per control plane; reused while the range holds as many windows as
# when it was read (a window arriving late for it is counted, and the range read again).
_REFERENCE_CACHE: weakref.WeakKeyDictionary[ControlPlane, dict[tuple[str, str, str, str], _Cached]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_ENTRIES = 1024  # per plane; the oldest is dropped beyond
_CACHE_LOCK = threading.Lock()  # the controller's thread and the request threads share it


def _reference_points(
    plane: ControlPlane,
    session: Session,
    digest: str,
    device_class: str,
    since: datetime,
    until: datetime,
    now: datetime,
    schedule: DriftSchedule,
) -> list[DriftPoint]:
    if until > now:  # still filling: not cached
        return _points(session, digest, device_class, since, until, schedule)
    count = session.scalar(select(func.count()).select_from(_W).where(*_where(digest, device_class, since, until)))
    key = (digest, device_class, iso(since), iso(until))
    with _CACHE_LOCK:
        hit = _REFERENCE_CACHE.setdefault(plane, {}).get(key)
    if hit is not None and hit.windows == count:
        return hit.points
    points = _points(session, digest, device_class, since, until, schedule)
    with _CACHE_LOCK:
        cache = _REFERENCE_CACHE.setdefault(plane, {})
        cache.pop(key, None)
        cache[key] = _Cached(int(count or 0), points)
        while len(cache) > _CACHE_ENTRIES:
            del cache[next(iter(cache))]
    return points


def _pins(session: Session) -> _Pins:
    return {(p.version_digest, p.device_class): p for p in session.scalars(select(DriftReferenceRow))}


def _latest_shift(estimate: ShiftEstimate, monitored: Sequence[DriftPoint], config: DriftConfig) -> ShiftEstimate:
    """The start of the shift still going on: the CUSUM restarts after each alarm, so a lasting shift raises a
    chain of alarms, each beginning right after the one before; the estimate is the first alarm of the last chain
    (an earlier, isolated false alarm does not date it)."""
    alarms = cusum_alarms(
        estimate.window_psi, target=estimate.null_mean, scale=estimate.null_scale, k=config.cusum_k, h=config.cusum_h
    )
    if not alarms:
        return estimate
    first = len(alarms) - 1
    # one step of too few samples (None) may lie between two alarms of a chain
    while first > 0 and alarms[first].began <= alarms[first - 1].detected + 2:
        first -= 1
    chain = alarms[first]
    return replace(estimate, began=monitored[chain.began].start, detected=monitored[chain.detected].start)


def _current_since(now: datetime, schedule: DriftSchedule) -> datetime:
    """The start of the first current step: the steps that start within the last ``current_steps`` steps."""
    return schedule.ceil(now - timedelta(seconds=schedule.current_steps * schedule.step_s))


def _entry(
    plane: ControlPlane,
    session: Session,
    digest: str,
    device_class: str,
    now: datetime,
    pins: _Pins,
    labels: dict[str, tuple[str, str]],
    *,
    search_shift: bool,
    config: DriftConfig,
    schedule: DriftSchedule,
) -> DriftEntry | None:
    reference = _reference(session, digest, device_class, schedule, pins)
    if reference is None:
        return None
    current_since = _current_since(now, schedule)
    monitor_since = current_since if not search_shift else now - timedelta(seconds=schedule.horizon_s)
    # monitored steps start after the reference's last step, so no step holds windows of both
    monitor_since = max(schedule.ceil(monitor_since), schedule.ceil(reference.until))
    monitored = _points(session, digest, device_class, monitor_since, now, schedule)
    current = [p for p in monitored if p.start >= current_since]
    if not search_shift and not any(p.summary is not None for p in current):
        return None  # nothing to judge now: no fact
    ref_points = _reference_points(
        plane, session, digest, device_class, reference.since, reference.until, now, schedule
    )
    if not any(p.summary is not None for p in (*ref_points, *monitored)):
        return None
    report = DriftReport(
        reference_since=ref_points[0].start if ref_points else None,
        reference_until=ref_points[-1].start if ref_points else None,
        current_since=current[0].start if current else None,
        verdicts=compare(ref_points, current, config),
        shifts=[_latest_shift(shift_start(ref_points, monitored, s, config), monitored, config) for s in SIGNALS]
        if search_shift
        else [],
    )
    model, label = labels.get(digest, (None, None))
    return DriftEntry(
        version_digest=digest,
        device_class=device_class,
        model=model,
        version=label,
        reference=reference,
        report=report,
        now=now,
        reference_steps=len(ref_points),
        monitored_steps=len(monitored),
    )


def _entries(
    plane: ControlPlane, now: datetime, *, search_shift: bool, config: DriftConfig | None, schedule: DriftSchedule
) -> list[DriftEntry]:
    config = config or DriftConfig()
    with Session(plane.engine) as session:
        since = now - timedelta(seconds=schedule.horizon_s) if search_shift else _current_since(now, schedule)
        pairs = _pairs(session, since, now)
        pins = _pins(session)
        labels = version_names(session, {d for d, _ in pairs})
        found = (
            _entry(plane, session, d, c, now, pins, labels, search_shift=search_shift, config=config, schedule=schedule)
            for d, c in pairs
        )
        return [e for e in found if e is not None]


def drift_overview(
    plane: ControlPlane, now: datetime, *, config: DriftConfig | None = None, schedule: DriftSchedule | None = None
) -> list[DriftEntry]:
    """One entry per (version, class) with windows within the horizon, at least one carrying a drift summary;
    sorted by digest, then class. Shift starts are searched."""
    return _entries(plane, now, search_shift=True, config=config, schedule=schedule or schedule_of(plane.settings))


def drift_entry(
    plane: ControlPlane,
    version: str,
    device_class: str,
    now: datetime,
    *,
    config: DriftConfig | None = None,
    schedule: DriftSchedule | None = None,
) -> DriftEntry:
    """The entry of one (version, class); ``version`` is a digest or ``NAME@REF``."""
    digest = _digest(plane, version)
    with Session(plane.engine) as session:
        _require_windows(session, digest, device_class, version)
        entry = _entry(
            plane,
            session,
            digest,
            device_class,
            now,
            _pins(session),
            version_names(session, {digest}),
            search_shift=True,
            config=config or DriftConfig(),
            schedule=schedule or schedule_of(plane.settings),
        )
    if entry is None:
        raise NotFoundError(
            f"version {version} on class {device_class} has no windows with drift summaries in its reference or "
            "its last days (agents too old to send them?); see `slmops telemetry rollup`"
        )
    return entry


def drift_facts(
    plane: ControlPlane, now: datetime, *, config: DriftConfig | None = None, schedule: DriftSchedule | None = None
) -> list[DriftFact]:
    """One fact per (version, class, signal) of every (version, class) with windows in the current steps, for the
    alert rules. ``version`` is ``model@label`` when the registry knows the digest, else the digest. Reads the
    reference and the current steps only (no shift search)."""
    return [
        DriftFact(version=entry.name, device_class=entry.device_class, verdict=verdict)
        for entry in _entries(
            plane, now, search_shift=False, config=config, schedule=schedule or schedule_of(plane.settings)
        )
        for verdict in entry.report.verdicts
    ]


# ---------------------------------------------------------------------------------------------------- pinning


def _require_windows(session: Session, digest: str, device_class: str, version: str) -> None:
    found = session.scalar(
        select(_W.window_id).where(_W.version_digest == digest, _W.device_class == device_class).limit(1)
    )
    if found is not None:
        return
    classes = sorted(
        session.scalars(select(_W.device_class).where(_W.version_digest == digest).group_by(_W.device_class))
    )
    if not classes:
        raise NotFoundError(
            f"no telemetry windows of version {version}; is it deployed? (see `slmops telemetry rollup {version}`)"
        )
    raise NotFoundError(
        f"version {version} has no telemetry windows on class {device_class!r}; classes with windows: "
        + ", ".join(classes)
    )


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None:
        raise ConfigError(f"{what} must carry a time zone (e.g. 2025-06-01T00:00:00Z); got {moment.isoformat()}")
    return moment.astimezone(UTC)


def pin_reference(
    plane: ControlPlane, version: str, device_class: str, start: datetime, end: datetime, pinned_by: str
) -> DriftReference:
    """Pin the reference of (version, class) to the windows starting in ``[start, end)`` (one unit of work);
    replaces an earlier pin. The version and class must have windows (else :class:`NotFoundError`), and the range
    must be non-empty and hold some of them (else :class:`ConfigError`)."""
    start, end = _aware(start, "start"), _aware(end, "end")
    digest = _digest(plane, version)
    with Session(plane.engine) as session:
        _require_windows(session, digest, device_class, version)
        if not start < end:
            raise ConfigError(f"the reference needs start < end; got start {iso(start)}, end {iso(end)}")
        in_range = session.scalar(
            select(func.count())
            .select_from(_W)
            .where(
                _W.version_digest == digest,
                _W.device_class == device_class,
                _W.window_start >= iso(start),
                _W.window_start < iso(end),
            )
        )
        if not in_range:
            span = session.execute(
                select(func.min(_W.window_start), func.max(_W.window_start)).where(
                    _W.version_digest == digest, _W.device_class == device_class
                )
            ).one()
            raise ConfigError(
                f"no windows of version {version} on class {device_class} start in {iso(start)} .. {iso(end)}; "
                f"its windows start from {span[0]} to {span[1]}: pick a range within that"
            )
        row = session.get(DriftReferenceRow, (digest, device_class))
        if row is None:
            row = DriftReferenceRow(version_digest=digest, device_class=device_class)
            session.add(row)
        row.start, row.end, row.pinned_by, row.pinned_at = iso(start), iso(end), pinned_by, plane.now_iso()
        pinned = _pinned(row)
        session.commit()
    return pinned


def unpin_reference(plane: ControlPlane, version: str, device_class: str) -> DriftReference:
    """Remove the pinned reference of (version, class) (one unit of work): the version's first windows are the
    reference again. Returns the pin that was removed."""
    digest = _digest(plane, version)
    with Session(plane.engine) as session:
        row = session.get(DriftReferenceRow, (digest, device_class))
        if row is None:
            raise NotFoundError(
                f"no pinned drift reference for version {version} on class {device_class}; "
                "see the pinned ones with `slmops drift show`"
            )
        removed = _pinned(row)
        session.delete(row)
        session.commit()
    return removed
