"""Feedback in the control plane: storing what devices upload, listing it for operators, curating datasets.

A device posts a :class:`~slmops.core.feedback.FeedbackBatch` (``POST /api/v1/devices/{id}/feedback``). The
server checks again what the device already checked (defense in depth) and puts a sample in ``rejected`` (never
stored) when:

- the device's current desired state has ``feedback.mode: off`` (its blueprint does not allow feedback);
- the sample's ``version_digest`` is no version the device runs or ran: its active or previous version, the
  version (or adapter base) its desired state names, or one its telemetry windows or events reported;
- the device has reached its ``feedback.max_samples_per_day`` today (UTC day of arrival; stored samples count);
- the sample's text is larger than :data:`MAX_SAMPLE_CHARS` in all, or its ``time`` is not an RFC 3339 time.

A sample is stored once per (device, sample id): a retried batch acknowledges the stored ids again, even after
the blueprint turned feedback off. Each row keeps the device's class and the release whose cohort held the device
with the sample's version, never the device id (see :mod:`slmops.control.feedback_tables`).

Curation reads the stored samples as :class:`~slmops.feedback.curate.FeedbackRecord`, runs the pure
:func:`~slmops.feedback.curate.curate`, and registers the two JSONL files as a dataset version
(:mod:`slmops.registry.datasets`) with its lineage.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from slmops.control._unit_of_work import commit_retrying
from slmops.control.db import DeviceEventRow, DeviceRow, ReleaseMemberRow, ReleaseRow, TelemetryWindowRow
from slmops.control.desired_state import desired_state_for
from slmops.control.feedback_tables import FeedbackSampleRow
from slmops.control.repository import iso
from slmops.control.telemetry import parse_time
from slmops.core._wire_base import Wire
from slmops.core.feedback import FeedbackAck, FeedbackBatch, FeedbackMessage, FeedbackSample
from slmops.core.manifest import is_digest
from slmops.errors import ConfigError, NotFoundError
from slmops.feedback.curate import CurationParams, FeedbackRecord, curate, to_jsonl
from slmops.registry.datasets import DatasetLineage, DatasetRegistry, DatasetVersion

if TYPE_CHECKING:
    from slmops.control.plane import ControlPlane

__all__ = [
    "MAX_LIST_LIMIT",
    "MAX_SAMPLE_CHARS",
    "CurateRequest",
    "CurateResult",
    "FeedbackPage",
    "RatingFilter",
    "curate_dataset",
    "device_ref",
    "list_feedback",
    "store_feedback",
]

MAX_SAMPLE_CHARS = 64_000
"""Prompt, answer and correction of one sample together, in characters."""
MAX_LIST_LIMIT = 1000
MAX_CURATED_SAMPLES = 200_000
RatingFilter = Literal["up", "down", "correction"]


class FeedbackPage(Wire):
    samples: list[FeedbackRecord]
    next: str | None = None  # pass as `after` for the next page; None on the last one


class CurateRequest(Wire):
    name: str = Field(min_length=1, max_length=128)
    params: CurationParams = Field(default_factory=CurationParams)


class CurateResult(Wire):
    dataset: DatasetVersion
    created: bool  # False: the same data curated the same way is this existing version


def device_ref(device_id: str) -> str:
    """The pseudonym a device's samples are stored under (never shown or exported)."""
    return hashlib.sha256(f"slmops-feedback-device\x00{device_id}".encode()).hexdigest()


def _row_id(ref: str, sample_id: str) -> str:
    return hashlib.sha256(f"{ref}\x00{sample_id}".encode()).hexdigest()


def _chars(sample: FeedbackSample) -> int:
    return sum(len(m.content) for m in sample.messages) + len(sample.answer) + len(sample.correction or "")


def _known_versions(session: Session, device: DeviceRow, desired: set[str]) -> set[str]:
    known = {d for d in (device.active_digest, device.previous_digest) if d} | desired
    known |= {
        d
        for d in session.scalars(
            select(TelemetryWindowRow.version_digest)
            .where(TelemetryWindowRow.device_id == device.id, TelemetryWindowRow.version_digest.is_not(None))
            .distinct()
        )
        if d
    }
    known |= {
        d
        for d in session.scalars(
            select(DeviceEventRow.version_digest)
            .where(DeviceEventRow.device_id == device.id, DeviceEventRow.version_digest.is_not(None))
            .distinct()
        )
        if d
    }
    return known


def _releases_by_version(session: Session, device_id: str) -> dict[str, str]:
    """version digest → the release (most recently joined) whose new versions include it and whose cohort holds
    the device."""
    rows = session.execute(
        select(ReleaseRow.id, ReleaseRow.to_digests, ReleaseRow.to_digest)
        .join(ReleaseMemberRow, ReleaseMemberRow.release_id == ReleaseRow.id)
        .where(ReleaseMemberRow.device_id == device_id)
        .order_by(ReleaseMemberRow.joined_at)
    ).all()
    found: dict[str, str] = {}
    for release_id, to_digests, to_digest in rows:
        for digest in {to_digest, *(to_digests or [])}:
            found[digest] = release_id  # later joins win
    return found


def store_feedback(plane: ControlPlane, device_id: str, batch: FeedbackBatch) -> FeedbackAck:
    """Store the acceptable samples not stored yet (one unit of work); see the module docstring for what is
    rejected."""
    state = desired_state_for(plane, device_id)
    policy = state.feedback
    desired = set()
    if state.model is not None:
        desired.add(state.model.digest)
        if state.model.base is not None:
            desired.add(state.model.base.digest)
    ref = device_ref(device_id)
    samples = list({s.id: s for s in batch.samples}.values())

    def work(session: Session) -> FeedbackAck:
        device = session.get(DeviceRow, device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id}")
        ids = {s.id: _row_id(ref, s.id) for s in samples}
        stored = set(session.scalars(select(FeedbackSampleRow.id).where(FeedbackSampleRow.id.in_(ids.values()))))
        accepted = [s.id for s in samples if ids[s.id] in stored]
        rejected: dict[str, str] = {}
        fresh = [s for s in samples if ids[s.id] not in stored]
        if not fresh:
            return FeedbackAck(accepted_ids=accepted)
        if policy.mode == "off":
            why = "feedback is off for this device: its blueprint's spec.feedback.mode is off"
            return FeedbackAck(accepted_ids=accepted, rejected={s.id: why for s in fresh})
        now = plane.clock()
        day_start = iso(now.replace(hour=0, minute=0, second=0, microsecond=0))
        today = session.scalar(
            select(func.count())
            .select_from(FeedbackSampleRow)
            .where(FeedbackSampleRow.device_ref == ref, FeedbackSampleRow.received_at >= day_start)
        )
        room = policy.max_samples_per_day - int(today or 0)
        known = _known_versions(session, device, desired)
        releases = _releases_by_version(session, device_id)
        received_at = iso(now)
        for sample in fresh:
            reason = _reason(sample, known)
            if reason is None and room <= 0:
                reason = (
                    f"this device reached its limit of {policy.max_samples_per_day} feedback samples today "
                    "(spec.feedback.max_samples_per_day); keep it for tomorrow or drop it"
                )
            if reason is not None:
                rejected[sample.id] = reason
                continue
            room -= 1
            accepted.append(sample.id)
            session.add(
                FeedbackSampleRow(
                    id=ids[sample.id],
                    device_ref=ref,
                    sample_id=sample.id,
                    completion_id=sample.completion_id,
                    version_digest=sample.version_digest,
                    device_class=device.device_class,
                    release_id=releases.get(sample.version_digest),
                    rated_at=iso(parse_time(sample.time, "time")),
                    rating=sample.rating,
                    score=sample.score,
                    messages=[m.model_dump(mode="json") for m in sample.messages],
                    answer=sample.answer,
                    correction=sample.correction,
                    redactions=dict(sample.redactions),
                    received_at=received_at,
                )
            )
        return FeedbackAck(accepted_ids=accepted, rejected=rejected)

    return commit_retrying(
        plane.engine, work, attempts=3, conflict="feedback from this device is being stored concurrently; retry"
    )


def _reason(sample: FeedbackSample, known: set[str]) -> str | None:
    if sample.version_digest not in known:
        return (
            f"version {sample.version_digest[:80]} is not one this device runs or ran; "
            "report it in a heartbeat before sending feedback about it"
        )
    if _chars(sample) > MAX_SAMPLE_CHARS:
        return f"the sample has {_chars(sample)} characters of text; at most {MAX_SAMPLE_CHARS} are accepted"
    try:
        parse_time(sample.time, "time")
    except ConfigError as exc:
        return exc.message
    return None


def _record(row: FeedbackSampleRow) -> FeedbackRecord:
    return FeedbackRecord(
        id=row.id,
        version_digest=row.version_digest,
        device_class=row.device_class,
        release_id=row.release_id,
        rated_at=row.rated_at,
        received_at=row.received_at,
        rating=row.rating,  # type: ignore[arg-type]  # stored from the Literal
        score=row.score,
        messages=[FeedbackMessage.model_validate(m) for m in row.messages],
        answer=row.answer,
        correction=row.correction,
        redactions=dict(row.redactions),
    )


def _digest(plane: ControlPlane, version: str) -> str:
    return version if is_digest(version) else plane.registry.resolve(version).digest


def _time(text: str | None, what: str) -> str | None:
    return iso(parse_time(text, what)) if text is not None else None


def list_feedback(
    plane: ControlPlane,
    *,
    version: str | None = None,
    device_class: str | None = None,
    rating: RatingFilter | None = None,
    since: str | None = None,
    until: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> FeedbackPage:
    """Stored samples in arrival order (oldest first), ``limit`` at a time; ``after`` is the previous page's
    ``next``. ``version`` is a digest or NAME@REF."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ConfigError(f"limit must be between 1 and {MAX_LIST_LIMIT}; got {limit}")
    query = select(FeedbackSampleRow)
    if version is not None:
        query = query.where(FeedbackSampleRow.version_digest == _digest(plane, version))
    if device_class is not None:
        query = query.where(FeedbackSampleRow.device_class == device_class)
    if rating == "correction":
        query = query.where(FeedbackSampleRow.correction.is_not(None))
    elif rating is not None:
        query = query.where(FeedbackSampleRow.rating == rating)
    if (start := _time(since, "since")) is not None:
        query = query.where(FeedbackSampleRow.received_at >= start)
    if (end := _time(until, "until")) is not None:
        query = query.where(FeedbackSampleRow.received_at < end)
    if after is not None:
        at, sep, last_id = after.partition("/")
        if not sep or not at or not last_id:
            raise ConfigError(f"after must be the `next` of a previous page; got {after[:80]!r}")
        query = query.where(
            or_(
                FeedbackSampleRow.received_at > at,
                (FeedbackSampleRow.received_at == at) & (FeedbackSampleRow.id > last_id),
            )
        )
    query = query.order_by(FeedbackSampleRow.received_at, FeedbackSampleRow.id).limit(limit + 1)
    with Session(plane.engine) as session:
        rows = session.scalars(query).all()
    page = [_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return FeedbackPage(samples=page, next=f"{page[-1].received_at}/{page[-1].id}" if more and page else None)


def _model_labels(plane: ControlPlane, digests: list[str]) -> dict[str, str]:
    labels = {}
    for digest in digests:
        try:
            manifest = plane.registry.resolve(digest).manifest
        except NotFoundError:
            continue  # a version removed from the registry since: the digest alone stays in the lineage
        labels[digest] = f"{manifest.name}@{manifest.version}"
    return labels


def curate_dataset(plane: ControlPlane, request: CurateRequest, actor: str) -> CurateResult:
    """Curate the stored samples the parameters select and register the result as the next version of
    ``request.name`` (or return the existing version with the same content)."""
    params = request.params.model_copy(
        update={
            "versions": sorted({_digest(plane, v) for v in request.params.versions}),
            "device_classes": sorted(set(request.params.device_classes)),
            "since": _time(request.params.since, "since"),
            "until": _time(request.params.until, "until"),
        }
    )
    query = select(FeedbackSampleRow)
    if params.versions:
        query = query.where(FeedbackSampleRow.version_digest.in_(params.versions))
    if params.device_classes:
        query = query.where(FeedbackSampleRow.device_class.in_(params.device_classes))
    if params.since is not None:
        query = query.where(FeedbackSampleRow.received_at >= params.since)
    if params.until is not None:
        query = query.where(FeedbackSampleRow.received_at < params.until)
    with Session(plane.engine) as session:
        count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        if count > MAX_CURATED_SAMPLES:
            raise ConfigError(
                f"the selection holds {count} samples; at most {MAX_CURATED_SAMPLES} are curated at once: "
                "narrow it with since/until, versions or device classes"
            )
        records = [_record(row) for row in session.scalars(query)]
    curated = curate(records, params)
    lineage = DatasetLineage(
        versions=curated.versions,
        models=_model_labels(plane, curated.versions),
        device_classes=curated.device_classes,
        releases=curated.releases,
    )
    result = DatasetRegistry.of(plane.registry).register(
        request.name,
        {"train.jsonl": to_jsonl(curated.train), "heldout.jsonl": to_jsonl(curated.heldout)},
        records={"train.jsonl": len(curated.train), "heldout.jsonl": len(curated.heldout)},
        counts=curated.counts,
        curation=params.model_dump(mode="json"),
        lineage=lineage,
        created_by=actor[:64],
    )
    return CurateResult(dataset=result.version, created=result.created)
