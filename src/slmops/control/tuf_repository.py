"""The control plane's part of TUF: keep the uploaded offline roles, sign the online ones, serve all of them.

Who holds which key (see :mod:`slmops.tuf.metadata` for the roles):

- root and targets keys never reach the server. The operator signs ``N.root.json`` and ``targets.json`` in CI
  (``slmops keys tuf …``) and uploads them; the server checks a root against the previous one (version + 1, a
  threshold of the old *and* the new root keys) and a targets file against the root's targets keys and threshold.
- snapshot and timestamp keys live on the control plane, in ``<SLMOPS_HOME>/keys/tuf-online/`` (created on first
  use; ``GET /api/v1/tuf/online-keys`` shows the public halves for the root ceremony). Each accepted targets or
  root upload publishes a new snapshot and timestamp; a read of ``timestamp.json`` re-signs the timestamp when it
  expires within ``timestamp_refresh_before_s`` (and the snapshot within ``snapshot_refresh_before_s``), so an
  idle fleet never sees expired metadata while the server runs, and a server that stops sees it within a day.

TUF is off until a first root is uploaded: then ``/api/v1/tuf/*`` answers 404 and agents keep verifying manifest
signatures only. The root pin (:mod:`slmops.tuf.pin`) for agents enrolled before TUF is signed at request time
with the registry's manifest signing key, which those agents already trust.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session

from slmops.control.repository import iso
from slmops.control.tuf_tables import TufMetadataRow
from slmops.errors import ConflictError, NotFoundError
from slmops.tuf import metadata as tufmd
from slmops.tuf.pin import RootPin, sign_root_pin

if TYPE_CHECKING:
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
    from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp  # type: ignore[attr-defined]

    from slmops.control.plane import ControlPlane

__all__ = [
    "ONLINE_ROLES",
    "Published",
    "TufSettings",
    "online_public_keys",
    "read_metadata",
    "read_target",
    "refresh_online_roles",
    "root_pin",
    "upload_root",
    "upload_targets",
]

ONLINE_ROLES = ("snapshot", "timestamp")
_lock = threading.Lock()  # one publisher per process; replicas meet at the table's primary key


class TufSettings(BaseSettings):
    """Expiry of the online roles, from ``SLMOPS_TUF_`` environment variables (defaults in :class:`Expiry`)."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_TUF_", frozen=True, extra="ignore")

    snapshot_expiry_s: float = Field(default=tufmd.DEFAULT_EXPIRY.snapshot_s, gt=0)
    timestamp_expiry_s: float = Field(default=tufmd.DEFAULT_EXPIRY.timestamp_s, gt=0)
    snapshot_refresh_before_s: float = Field(default=tufmd.DEFAULT_EXPIRY.snapshot_refresh_before_s, ge=0)
    timestamp_refresh_before_s: float = Field(default=tufmd.DEFAULT_EXPIRY.timestamp_refresh_before_s, ge=0)

    def expiry(self) -> tufmd.Expiry:
        return tufmd.Expiry(
            snapshot_s=self.snapshot_expiry_s,
            timestamp_s=self.timestamp_expiry_s,
            snapshot_refresh_before_s=self.snapshot_refresh_before_s,
            timestamp_refresh_before_s=self.timestamp_refresh_before_s,
        )


@dataclass(frozen=True)
class Published:
    role: str
    version: int
    snapshot_version: int | None
    timestamp_version: int | None


# --------------------------------------------------------------------------------------------------- keys


def _online_signer(plane: ControlPlane, role: str) -> CryptoSigner:
    from slmops.tuf.keys import create_key_file, load_signer

    path = plane.settings.home / "keys" / "tuf-online" / f"{role}.key"
    return load_signer(path) if path.exists() else create_key_file(path)


def online_public_keys(plane: ControlPlane) -> dict[str, list[dict[str, Any]]]:
    """The public keys of the online roles, for the root ceremony (created on first call)."""
    from slmops.tuf.keys import key_to_dict

    return {role: [key_to_dict(_online_signer(plane, role).public_key)] for role in ONLINE_ROLES}


# --------------------------------------------------------------------------------------------------- storage


def _latest(session: Session, role: str) -> TufMetadataRow | None:
    return session.scalar(
        select(TufMetadataRow).where(TufMetadataRow.role == role).order_by(TufMetadataRow.version.desc()).limit(1)
    )


def _loaded(session: Session, role: str) -> Metadata[Any] | None:
    row = _latest(session, role)
    return tufmd.parse(row.body, role) if row is not None else None


def _add(session: Session, plane: ControlPlane, md: Metadata[Any], body: bytes | None = None) -> bytes:
    """Store ``md``: as ``body`` when given (an uploaded root or targets file, kept exactly as signed), else as
    serialized here (the online roles)."""
    body = tufmd.to_bytes(md) if body is None else body
    session.add(
        TufMetadataRow(
            role=md.signed.type,
            version=md.signed.version,
            body=body,
            expires=iso(md.signed.expires),
            created_at=plane.now_iso(),
        )
    )
    session.flush()
    return body


def _publish_online(
    session: Session, plane: ControlPlane, now: datetime, *, snapshot: bool
) -> tuple[int | None, int | None]:
    """A new snapshot (when ``snapshot``) and a new timestamp, signed with the online keys; nothing without targets."""
    expiry = TufSettings().expiry()
    targets_row = _latest(session, "targets")
    if targets_row is None:
        return None, None
    snap_row = _latest(session, "snapshot")
    if snapshot or snap_row is None:
        previous = cast("Metadata[Snapshot] | None", tufmd.parse(snap_row.body, "snapshot") if snap_row else None)
        snap_md = tufmd.next_snapshot(targets_row.version, previous, now, expiry)
        snap_bytes = _add(session, plane, tufmd.sign(snap_md, [_online_signer(plane, "snapshot")]))
        snap_version = snap_md.signed.version
    else:
        snap_bytes, snap_version = snap_row.body, snap_row.version
    previous_ts = cast("Metadata[Timestamp] | None", _loaded(session, "timestamp"))
    ts_md = tufmd.next_timestamp(snap_bytes, previous_ts, now, expiry)
    _add(session, plane, tufmd.sign(ts_md, [_online_signer(plane, "timestamp")]))
    return snap_version, ts_md.signed.version


def _check_online_keys(plane: ControlPlane, root: Metadata[Root]) -> None:
    for role in ONLINE_ROLES:
        ours = _online_signer(plane, role).public_key.keyid
        named = root.signed.roles[role].keyids
        if ours not in named:
            raise tufmd.TufMetadataError(
                f"root v{root.signed.version} names {role} key(s) {', '.join(k[:12] for k in named)} but this control "
                f"plane signs {role} with {ours[:12]}; put the keys of `GET /api/v1/tuf/online-keys` into the root"
            )


# --------------------------------------------------------------------------------------------------- operations


def upload_root(plane: ControlPlane, data: bytes) -> Published:
    """Accept the next root (the first one turns TUF on) and re-publish snapshot and timestamp under it."""
    now = plane.clock()
    with _lock, Session(plane.engine) as session:
        trusted = cast("Metadata[Root] | None", _loaded(session, "root"))
        root = tufmd.check_new_root(trusted, data, now)
        _check_online_keys(plane, root)
        _add(session, plane, root, data)
        snap, ts = _publish_online(session, plane, now, snapshot=True)
        _commit(session, "root")
    return Published("root", root.signed.version, snap, ts)


def upload_targets(plane: ControlPlane, data: bytes) -> Published:
    """Accept a targets file signed by the root's targets keys, newer than the current one, naming only manifests
    this registry holds; then publish a snapshot and timestamp naming it."""
    now = plane.clock()
    with _lock, Session(plane.engine) as session:
        root = cast("Metadata[Root] | None", _loaded(session, "root"))
        if root is None:
            raise NotFoundError("no TUF root was uploaded; upload one first with `slmops keys tuf upload`")
        current = _latest(session, "targets")
        targets = tufmd.check_targets(root, current.version if current else None, data, now)
        for path, target in targets.signed.targets.items():
            digest = "sha256:" + str(target.hashes.get("sha256", ""))
            if path != tufmd.target_path(digest) or not plane.registry.has_version(digest):
                raise NotFoundError(
                    f"the target {path} is not the manifest of a version in this registry; register or pull it first"
                )
        _add(session, plane, targets, data)
        snap, ts = _publish_online(session, plane, now, snapshot=True)
        _commit(session, "targets")
    return Published("targets", targets.signed.version, snap, ts)


def _commit(session: Session, what: str) -> None:
    try:
        session.commit()
    except DbIntegrityError:
        session.rollback()
        raise ConflictError(f"another replica published TUF {what} metadata at the same moment; upload again") from None


def refresh_online_roles(plane: ControlPlane) -> tuple[int | None, int | None]:
    """Re-sign the snapshot and/or timestamp when they expire within their refresh margins; (snapshot, timestamp)
    versions published, None where nothing was due."""
    expiry = TufSettings().expiry()
    now = plane.clock()
    with _lock, Session(plane.engine) as session:
        snap, ts = _loaded(session, "snapshot"), _loaded(session, "timestamp")
        if snap is None or ts is None:
            return None, None
        snap_due = (snap.signed.expires - now).total_seconds() <= expiry.snapshot_refresh_before_s
        ts_due = (ts.signed.expires - now).total_seconds() <= expiry.timestamp_refresh_before_s
        if not (snap_due or ts_due):
            return None, None
        published = _publish_online(session, plane, now, snapshot=snap_due)
        try:
            session.commit()
        except DbIntegrityError:  # another replica refreshed first: theirs is as good
            session.rollback()
            return None, None
    return (published[0] if snap_due else None), published[1]


def read_metadata(plane: ControlPlane, role: str, version: int | None) -> bytes:
    """The bytes of ``role`` (the latest, or ``version``), refreshing the online roles first when due."""
    if role == "timestamp" or (role == "snapshot" and version is None):
        refresh_online_roles(plane)
    with Session(plane.engine) as session:
        row = _latest(session, role) if version is None else session.get(TufMetadataRow, (role, version))
    if row is None:
        which = f"{version}.{role}.json" if version is not None else f"{role}.json"
        raise NotFoundError(f"this control plane has no TUF metadata {which}")
    return row.body


def read_target(plane: ControlPlane, hexdigest: str) -> bytes:
    """The canonical manifest bytes of a current target."""
    digest = f"sha256:{hexdigest}"
    with Session(plane.engine) as session:
        row = _latest(session, "targets")
    targets = cast("Metadata[Targets] | None", tufmd.parse(row.body, "targets") if row else None)
    if targets is None or tufmd.target_path(digest) not in targets.signed.targets:
        raise NotFoundError(f"the manifest {digest} is not a current TUF target")
    data = plane.registry.resolve(digest).manifest.canonical()
    if hashlib.sha256(data).hexdigest() != hexdigest:  # the registry checks this too; never serve a mismatch
        raise NotFoundError(f"the manifest {digest} in this registry does not hash to its digest")
    return data


def root_pin(plane: ControlPlane) -> RootPin:
    """The current root, signed for agents enrolled before TUF by the key that signs manifests here."""
    from slmops.registry.signing import KeyRing

    with Session(plane.engine) as session:
        row = _latest(session, "root")
        published = _latest(session, "timestamp") is not None
    if row is None or not published:  # a root without targets yet: agents would refuse everything, so TUF stays off
        raise NotFoundError("TUF is not set up on this control plane (no root and targets uploaded)")
    ring = KeyRing(plane.settings.registry_settings().key_dir)
    if not ring.has_signing_key:
        raise NotFoundError("this control plane has no manifest signing key to sign the TUF root pin with")
    return sign_root_pin(row.body, row.version, ring.signer())
