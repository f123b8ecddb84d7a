"""Data access for the control plane. Every method works inside the caller's session and at most flushes;
the service that owns the session commits once per call."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, aliased

from slmops.control.db import (
    ACTIVE_RELEASE_STATES,
    ApiTokenRow,
    BlueprintRow,
    DeviceEventRow,
    DeviceRow,
    EnrollmentTokenRow,
    ReleaseMemberRow,
    ReleaseRow,
)
from slmops.registry.db import VersionRow
from slmops.telemetry.aggregate import rfc3339

__all__ = ["UNVERSIONED", "ControlRepository", "iso", "parse_iso", "version_labels", "version_names"]

UNVERSIONED = "(no version)"  # how a window without a version digest is shown


def iso(moment: datetime) -> str:
    """RFC 3339 UTC with second precision; sorts as text and :func:`parse_iso` reads it back."""
    return rfc3339(moment)


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def version_names(session: Session, digests: Iterable[str]) -> dict[str, tuple[str, str]]:
    """(model name, version label) of each digest the registry knows; unknown digests are left out."""
    wanted = sorted(set(digests))
    if not wanted:
        return {}
    rows = session.execute(
        select(VersionRow.digest, VersionRow.name, VersionRow.label).where(VersionRow.digest.in_(wanted))
    )
    return {digest: (name, label) for digest, name, label in rows}


def version_labels(session: Session, digests: Iterable[str | None]) -> dict[str, str]:
    """``NAME@LABEL`` of each digest the registry knows; an unknown digest is shown as itself."""
    wanted = {d for d in digests if d}
    names = version_names(session, wanted)
    return {d: f"{names[d][0]}@{names[d][1]}" if d in names else d for d in wanted}


class ControlRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # ------------------------------------------------------------ API tokens

    def add_api_token(self, row: ApiTokenRow) -> None:
        self.session.add(row)
        self.session.flush()

    def api_token(self, name: str) -> ApiTokenRow | None:
        return self.session.get(ApiTokenRow, name)

    def api_token_by_hash(self, token_hash: str) -> ApiTokenRow | None:
        return self.session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == token_hash))

    def api_tokens(self) -> Sequence[ApiTokenRow]:
        return self.session.scalars(select(ApiTokenRow).order_by(ApiTokenRow.name)).all()

    def revoke_api_token(self, name: str) -> bool:
        """Revoke a token unless it is the last active admin token: False then, and nothing changes.

        The active admin tokens are locked first (on PostgreSQL; SQLite runs one writer at a time), so two admin
        tokens revoked at the same moment cannot both go.
        """
        active_admins = (ApiTokenRow.role == "admin", ApiTokenRow.revoked.is_(False))
        self.session.execute(
            select(ApiTokenRow.name).where(*active_admins).order_by(ApiTokenRow.name).with_for_update()
        )
        other = aliased(ApiTokenRow)
        another_admin = exists().where(other.role == "admin", other.revoked.is_(False), other.name != name)
        result = self.session.execute(
            update(ApiTokenRow)
            .where(ApiTokenRow.name == name, (ApiTokenRow.role != "admin") | another_admin)
            .values(revoked=True)
            .execution_options(synchronize_session=False)
        )
        return getattr(result, "rowcount", 0) == 1

    # ------------------------------------------------------------ enrollment tokens

    def add_enrollment_token(self, row: EnrollmentTokenRow) -> None:
        self.session.add(row)
        self.session.flush()

    def enrollment_token_by_hash(self, token_hash: str) -> EnrollmentTokenRow | None:
        return self.session.scalar(select(EnrollmentTokenRow).where(EnrollmentTokenRow.token_hash == token_hash))

    def enrollment_tokens(self) -> Sequence[EnrollmentTokenRow]:
        return self.session.scalars(select(EnrollmentTokenRow).order_by(EnrollmentTokenRow.created_at)).all()

    def consume_enrollment_token(self, token_hash: str, now: str) -> bool:
        """Count one use, atomically: at most ``max_uses`` concurrent callers ever get True."""
        result = self.session.execute(
            update(EnrollmentTokenRow)
            .where(
                EnrollmentTokenRow.token_hash == token_hash,
                EnrollmentTokenRow.uses < EnrollmentTokenRow.max_uses,
                EnrollmentTokenRow.expires_at > now,
                EnrollmentTokenRow.revoked.is_(False),
            )
            .values(uses=EnrollmentTokenRow.uses + 1)
            .execution_options(synchronize_session=False)
        )
        return getattr(result, "rowcount", 0) == 1

    # ------------------------------------------------------------ devices

    def add_device(self, row: DeviceRow) -> None:
        self.session.add(row)
        self.session.flush()

    def device(self, device_id: str) -> DeviceRow | None:
        return self.session.get(DeviceRow, device_id)

    def device_by_public_key(self, public_key: str) -> DeviceRow | None:
        return self.session.scalar(select(DeviceRow).where(DeviceRow.public_key == public_key))

    def device_by_credential(self, credential_hash: str) -> DeviceRow | None:
        return self.session.scalar(select(DeviceRow).where(DeviceRow.credential_hash == credential_hash))

    def record_claim(self, device_id: str, timestamp: int, credential_hash: str, now: str) -> bool:
        """Give an approved device a new credential for a claim newer than its last recorded one, atomically: of
        two requests with the same claim at most one gets True."""
        result = self.session.execute(
            update(DeviceRow)
            .where(
                DeviceRow.id == device_id,
                DeviceRow.state == "approved",
                DeviceRow.last_claim_timestamp.is_(None) | (DeviceRow.last_claim_timestamp < timestamp),
            )
            .values(credential_hash=credential_hash, last_claim_timestamp=timestamp, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return getattr(result, "rowcount", 0) == 1

    def record_pending_claim(self, device_id: str, timestamp: int) -> bool:
        """Remember a pending device's verified claim, so it cannot be replayed once the device is approved: True
        when the device is still pending and ``timestamp`` is not older than its last recorded claim."""
        result = self.session.execute(
            update(DeviceRow)
            .where(
                DeviceRow.id == device_id,
                DeviceRow.state == "pending",
                DeviceRow.last_claim_timestamp.is_(None) | (DeviceRow.last_claim_timestamp <= timestamp),
            )
            .values(last_claim_timestamp=timestamp)
            .execution_options(synchronize_session=False)
        )
        return getattr(result, "rowcount", 0) == 1

    def devices(self, states: Iterable[str] | None = None) -> Sequence[DeviceRow]:
        query = select(DeviceRow).order_by(DeviceRow.enrolled_at, DeviceRow.id)
        if states is not None:
            query = query.where(DeviceRow.state.in_(list(states)))
        return self.session.scalars(query).all()

    # ------------------------------------------------------------ device events

    def known_event_ids(self, device_id: str, event_ids: Iterable[str]) -> set[str]:
        ids = list(event_ids)
        if not ids:
            return set()
        rows = self.session.scalars(
            select(DeviceEventRow.event_id).where(
                DeviceEventRow.device_id == device_id, DeviceEventRow.event_id.in_(ids)
            )
        )
        return set(rows)

    def last_event_seq(self, device_id: str) -> int:
        return (
            self.session.scalar(
                select(func.coalesce(func.max(DeviceEventRow.seq), 0)).where(DeviceEventRow.device_id == device_id)
            )
            or 0
        )

    def add_events(self, rows: Iterable[DeviceEventRow]) -> None:
        self.session.add_all(list(rows))
        self.session.flush()

    def events(self, device_id: str, limit: int) -> Sequence[DeviceEventRow]:
        return self.session.scalars(
            select(DeviceEventRow)
            .where(DeviceEventRow.device_id == device_id)
            .order_by(DeviceEventRow.seq.desc())
            .limit(limit)
        ).all()

    # ------------------------------------------------------------ blueprints

    def current_blueprints(self) -> Sequence[BlueprintRow]:
        return self.session.scalars(
            select(BlueprintRow).where(BlueprintRow.current.is_(True)).order_by(BlueprintRow.name)
        ).all()

    def current_blueprint(self, name: str) -> BlueprintRow | None:
        return self.session.scalar(
            select(BlueprintRow).where(BlueprintRow.name == name, BlueprintRow.current.is_(True))
        )

    def blueprint_revision(self, name: str, revision: int) -> BlueprintRow | None:
        return self.session.get(BlueprintRow, (name, revision))

    def blueprint_revisions(self, name: str) -> Sequence[BlueprintRow]:
        return self.session.scalars(
            select(BlueprintRow).where(BlueprintRow.name == name).order_by(BlueprintRow.revision)
        ).all()

    def latest_blueprint_revision(self, name: str) -> int:
        return (
            self.session.scalar(
                select(func.coalesce(func.max(BlueprintRow.revision), 0)).where(BlueprintRow.name == name)
            )
            or 0
        )

    def add_blueprint_revision(self, row: BlueprintRow) -> None:
        """Add a revision and make it the only current one of its name."""
        self.session.execute(
            update(BlueprintRow)
            .where(BlueprintRow.name == row.name, BlueprintRow.current.is_(True))
            .values(current=False)
        )
        row.current = True
        self.session.add(row)
        self.session.flush()

    # ------------------------------------------------------------ releases

    def active_releases(self, blueprint: str | None = None) -> Sequence[ReleaseRow]:
        """The running and paused releases (of one blueprint, if given), oldest first."""
        query = select(ReleaseRow).where(ReleaseRow.state.in_(ACTIVE_RELEASE_STATES))
        if blueprint is not None:
            query = query.where(ReleaseRow.blueprint == blueprint)
        return self.session.scalars(query.order_by(ReleaseRow.started_at, ReleaseRow.id)).all()

    def release_member_ids(self, release_id: str) -> frozenset[str]:
        return frozenset(
            self.session.scalars(select(ReleaseMemberRow.device_id).where(ReleaseMemberRow.release_id == release_id))
        )
