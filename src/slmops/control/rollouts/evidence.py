"""The evidence a stage is judged on, per device class: cohort counts and the canaries' and the baseline's
telemetry, as :class:`slmops.core.rollout.ClassEvidence`.

Canaries: windows on the new versions received since the stage began, from devices in the cohort. Baseline: windows
on the old versions received since the release began, from the blueprint's devices. Failed activations:
canaries that rolled the new version back or failed its probe on the device. Telemetry is read incrementally
(:class:`Accumulator`), so a controller tick costs the windows that arrived since the last one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.control.db import DeviceEventRow, ReleaseRow, TelemetryWindowRow
from slmops.control.devices import is_online
from slmops.control.repository import iso, parse_iso
from slmops.control.rollouts.cohort import Winners, recorded_members, release_scope
from slmops.core.rollout import ClassEvidence, GroupTotals, StageEvaluation
from slmops.core.wire import LATENCY_BUCKETS_MS, Histogram
from slmops.telemetry.aggregate import histogram_samples

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = ["FAILED_ACTIVATION_EVENTS", "Accumulator", "AccumulatorKey", "gather_evidence", "progress"]

FAILED_ACTIVATION_EVENTS = ("rolled_back", "probe_failed")
_HISTOGRAMS = {"latency": "latency_ms", "ttft": "ttft_ms", "per_token": "per_token_ms"}
AccumulatorKey = tuple[str, str, float]  # (release id, "canary" or "baseline", since)


class _Group:
    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.windows = 0
        self.requests = 0
        self.errors = 0
        self.crashes = 0
        self.counts: dict[str, list[int]] = {}

    def add(self, device_id: str, body: dict[str, Any]) -> None:
        self.devices.add(device_id)
        self.windows += 1
        self.requests += int(body.get("requests", 0))
        self.errors += int(body.get("errors", 0))
        self.crashes += int(body.get("crashes", 0))
        for metric, key in _HISTOGRAMS.items():
            counts = (body.get(key) or {}).get("counts") or []
            if len(counts) != len(LATENCY_BUCKETS_MS) + 1:
                continue  # another bucket layout: not comparable, left out
            into = self.counts.setdefault(metric, [0] * len(counts))
            for i, count in enumerate(counts):
                into[i] += int(count)

    def totals(self) -> GroupTotals:
        samples: dict[str, Sequence[float]] = {
            metric: histogram_samples(Histogram(bounds=list(LATENCY_BUCKETS_MS), counts=counts))
            for metric, counts in self.counts.items()
        }
        return GroupTotals(
            devices=len(self.devices),
            windows=self.windows,
            requests=self.requests,
            errors=self.errors,
            crashes=self.crashes,
            samples_ms=samples,
        )


class Accumulator:
    """Telemetry of some versions received since a moment, summed per device class, read incrementally.

    Each read asks only for rows received at or after ``cursor - OVERLAP_S`` (the newest ``received_at`` seen,
    less an overlap for rows whose transaction took its time stamp before a concurrent read but committed after
    it), and skips the rows of the overlap it already counted, so a controller tick costs the new windows, not
    all of them.
    """

    OVERLAP_S = 30.0

    def __init__(self, digests: Sequence[str], since: float) -> None:
        self.digests = list(digests)
        self.since = since
        self.cursor = since
        self.seen: dict[tuple[str, str], float] = {}
        self.by_class: dict[str, _Group] = {}

    def read(self, session: Session, scope: dict[str, str], only: set[str] | None = None) -> dict[str, _Group]:
        if not self.digests:
            return self.by_class
        low = max(self.since, self.cursor - self.OVERLAP_S)
        rows = session.execute(
            select(
                TelemetryWindowRow.device_id,
                TelemetryWindowRow.window_id,
                TelemetryWindowRow.received_at,
                TelemetryWindowRow.body,
            ).where(
                TelemetryWindowRow.version_digest.in_(self.digests),
                TelemetryWindowRow.received_at >= iso(datetime.fromtimestamp(low, UTC)),
            )
        )
        for device_id, window_id, received_at, body in rows:
            key = (device_id, window_id)
            if key in self.seen:
                continue
            moment = parse_iso(received_at).timestamp()
            self.seen[key] = moment
            self.cursor = max(self.cursor, moment)
            device_class = scope.get(device_id)
            if device_class is None or (only is not None and device_id not in only):
                continue  # another blueprint's device, or (for canaries) not in the cohort
            self.by_class.setdefault(device_class, _Group()).add(device_id, body)
        horizon = self.cursor - self.OVERLAP_S
        self.seen = {k: t for k, t in self.seen.items() if t >= horizon}
        return self.by_class


def gather_evidence(
    plane: ControlPlane,
    session: Session,
    row: ReleaseRow,
    *,
    winners: Winners | None = None,
    accumulators: dict[AccumulatorKey, Accumulator] | None = None,
) -> list[ClassEvidence]:
    """Per class: cohort counts and the canaries' and baseline's telemetry (see the module docstring)."""
    scope_rows = release_scope(plane, session, row.blueprint, winners)
    scope = {d: r.device_class for d, r in scope_rows.items()}
    members = {d for d in recorded_members(session, row.id) if d in scope}
    to_digests = set(row.to_digests)
    accumulators = accumulators if accumulators is not None else {}
    canary_key = (row.id, "canary", row.stage_started_at)
    baseline_key = (row.id, "baseline", row.started_at)
    canary_acc = accumulators.setdefault(canary_key, Accumulator(row.to_digests, row.stage_started_at))
    baseline_acc = accumulators.setdefault(baseline_key, Accumulator(row.from_digests, row.started_at))
    for stale in [k for k in accumulators if k[0] == row.id and k not in (canary_key, baseline_key)]:
        del accumulators[stale]  # an earlier stage's canaries
    canary = canary_acc.read(session, scope, members)
    baseline = baseline_acc.read(session, scope)
    rolled: dict[str, set[str]] = defaultdict(set)
    started = iso(datetime.fromtimestamp(row.started_at, UTC))
    for device_id, digest in session.execute(
        select(DeviceEventRow.device_id, DeviceEventRow.version_digest).where(
            DeviceEventRow.kind.in_(FAILED_ACTIVATION_EVENTS),
            DeviceEventRow.version_digest.in_(list(to_digests)),
            DeviceEventRow.received_at >= started,
        )
    ):
        if device_id in members and digest in to_digests:
            rolled[scope[device_id]].add(device_id)
    by_class: dict[str, list[str]] = defaultdict(list)
    for device_id, device_class in scope.items():
        by_class[device_class].append(device_id)
    evidence: list[ClassEvidence] = []
    for device_class in sorted(by_class):
        in_class = by_class[device_class]
        class_members = [d for d in in_class if d in members]
        online = sum(1 for d in class_members if is_online(plane, scope_rows[d].last_seen))
        switched = sum(1 for d in class_members if scope_rows[d].active_digest in to_digests)
        canary_group = canary.get(device_class, _Group())
        evidence.append(
            ClassEvidence(
                device_class=device_class,
                devices=len(in_class),
                members=len(class_members),
                online_members=online,
                switched=switched,
                reporting=len(canary_group.devices & members),
                rolled_back=len(rolled.get(device_class, set())),
                canary=canary_group.totals(),
                baseline=baseline.get(device_class, _Group()).totals(),
            )
        )
    return evidence


def progress(evidence: Iterable[ClassEvidence], evaluation: StageEvaluation) -> list[dict[str, Any]]:
    """The per-class progress stored with a release (what ``slmops rollout status`` shows)."""
    verdicts = {v.device_class: v for v in evaluation.classes}
    rendered = {c["device_class"]: c for c in evaluation.numbers()["classes"]}  # type: ignore[attr-defined]
    out = []
    for ev in evidence:
        verdict = verdicts.get(ev.device_class)
        out.append(
            {
                "device_class": ev.device_class,
                "devices": ev.devices,
                "members": ev.members,
                "online_members": ev.online_members,
                "switched": ev.switched,
                "reporting": ev.reporting,
                "rolled_back": ev.rolled_back,
                "status": verdict.status if verdict else "not judged",
                "reason": verdict.reason if verdict else "",
                "gates": rendered.get(ev.device_class, {}).get("gates", []),
            }
        )
    return out
