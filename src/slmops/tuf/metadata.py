"""TUF roles for slmops releases, built and checked with the ``tuf`` library (python-tuf), never by hand.

The Update Framework splits trust over four roles, each a signed JSON document with a version and an expiry:

- **root** names the keys of every role and each role's threshold (how many of its keys must sign). It is signed by
  the root keys (offline, e.g. 2 of 3 held by different people) and rotates by publishing ``N+1.root.json`` signed
  by a threshold of both the old and the new root keys; a client walks that chain ("fast-forward").
- **targets** lists what may be installed. Here one target per released model variant: the path
  ``manifests/<hex>.json`` names the manifest digest; length and sha256 are those of the manifest's canonical JSON
  (the bytes its ed25519 signature signs, so the target hash *is* the manifest digest), and ``custom`` carries the
  hardware ids (device classes, e.g. ``x86_64-8gb``) it is for. Signed offline, in the operator's CI.
- **snapshot** pins the version of targets (no mix-and-match of metadata from different moments). Online key.
- **timestamp** pins the snapshot and expires soon, so a withheld update (a freeze) shows as expired metadata
  within a day. Online key, re-signed by the control plane before it expires.

This module is the pure part: make, sign, bump and check metadata objects. Where the keys live and who uploads what
is :mod:`slmops.tuf.keys` (files), the control plane's ``slmops.control.tuf_repository`` (online roles) and
``slmops keys tuf …`` (offline roles).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from securesystemslib.signer import Key, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from slmops.errors import SignatureError

__all__ = [
    "DEFAULT_EXPIRY",
    "HARDWARE_IDS",
    "Expiry",
    "TufMetadataError",
    "add_target",
    "bump",
    "check_new_root",
    "check_targets",
    "hardware_ids_of",
    "new_root",
    "new_targets",
    "next_snapshot",
    "next_timestamp",
    "parse",
    "remove_target",
    "sign",
    "target_path",
    "to_bytes",
]

HARDWARE_IDS = "hardware_ids"  # the key of a target's custom field listing the device classes it is for


class TufMetadataError(SignatureError):
    """TUF metadata that does not parse, verify, or follow the previous version (an upload answered 422)."""

    code = "invalid_request"


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata is valid (seconds), and how long before expiry the online roles are re-signed.

    Defaults: root one year, targets 90 days (offline roles: a ceremony), snapshot 7 days, timestamp 1 day; the
    control plane re-signs snapshot 2 days and timestamp 6 hours before they expire."""

    root_s: float = 365 * 86400.0
    targets_s: float = 90 * 86400.0
    snapshot_s: float = 7 * 86400.0
    timestamp_s: float = 86400.0
    snapshot_refresh_before_s: float = 2 * 86400.0
    timestamp_refresh_before_s: float = 6 * 3600.0

    def expires(self, role: str, now: datetime) -> datetime:
        seconds = {"root": self.root_s, "targets": self.targets_s, "snapshot": self.snapshot_s}.get(
            role, self.timestamp_s
        )
        return (now + timedelta(seconds=seconds)).replace(microsecond=0)


DEFAULT_EXPIRY = Expiry()
_SERIALIZER = JSONSerializer(compact=False)


def to_bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(_SERIALIZER)


def parse(data: bytes, role: str) -> Metadata[Any]:
    """Metadata of ``role`` from bytes, or :class:`TufMetadataError` saying what was found."""
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as exc:
        raise TufMetadataError(f"the {role} metadata does not parse as TUF metadata: {exc}") from None
    if md.signed.type != role:
        raise TufMetadataError(f"expected {role} metadata but the document is {md.signed.type} metadata")
    return md


def new_root(
    keys: Mapping[str, Sequence[Key]],
    thresholds: Mapping[str, int],
    now: datetime,
    expiry: Expiry = DEFAULT_EXPIRY,
    version: int = 1,
) -> Metadata[Root]:
    """Unsigned root metadata naming ``keys[role]`` with ``thresholds[role]`` (default 1) for each top-level role."""
    missing = sorted(TOP_LEVEL_ROLE_NAMES - set(keys))
    if missing:
        raise TufMetadataError(f"root needs keys for every role; none given for {', '.join(missing)}")
    root = Root(version=version, expires=expiry.expires("root", now), consistent_snapshot=True)
    for role in TOP_LEVEL_ROLE_NAMES:
        threshold = thresholds.get(role, 1)
        if not 1 <= threshold <= len(keys[role]):
            raise TufMetadataError(
                f"the {role} threshold must be between 1 and its {len(keys[role])} key(s), got {threshold}"
            )
        root.roles[role] = Role([], threshold)
        for key in keys[role]:
            root.add_key(key, role)
    return Metadata(root)


def new_targets(now: datetime, expiry: Expiry = DEFAULT_EXPIRY, version: int = 1) -> Metadata[Targets]:
    return Metadata(Targets(version=version, expires=expiry.expires("targets", now)))


def target_path(manifest_digest: str) -> str:
    """``sha256:ab…`` -> ``manifests/ab….json``: one target per manifest, named by its digest."""
    hexdigest = manifest_digest.removeprefix("sha256:")
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise TufMetadataError(f"a manifest digest looks like sha256:<64 hex digits>, got {manifest_digest!r}")
    return f"manifests/{hexdigest}.json"


def add_target(
    targets: Metadata[Targets],
    manifest_bytes: bytes,
    hardware_ids: Iterable[str],
    *,
    name: str = "",
    version: str = "",
) -> TargetFile:
    """Add (or replace) the target of one manifest: its canonical JSON bytes and the device classes it is for."""
    ids = sorted({h.strip() for h in hardware_ids if h.strip()})
    if not ids:
        raise TufMetadataError("a target needs at least one hardware id (a device class such as x86_64-8gb)")
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    custom: dict[str, Any] = {HARDWARE_IDS: ids}
    if name:
        custom["name"], custom["version"] = name, version
    target = TargetFile.from_data(target_path(digest), manifest_bytes, ["sha256"])
    target.unrecognized_fields["custom"] = custom
    targets.signed.targets[target.path] = target
    return target


def remove_target(targets: Metadata[Targets], manifest_digest: str) -> bool:
    return targets.signed.targets.pop(target_path(manifest_digest), None) is not None


def hardware_ids_of(target: TargetFile) -> list[str]:
    custom = target.custom
    ids = custom.get(HARDWARE_IDS) if isinstance(custom, dict) else None
    return [str(i) for i in ids] if isinstance(ids, list) else []


def sign(md: Metadata[Any], signers: Iterable[Signer]) -> Metadata[Any]:
    """Append one signature per signer (replacing an earlier signature by the same key)."""
    for signer in signers:
        md.sign(signer, append=True)
    return md


def bump(md: Metadata[Any], now: datetime, expiry: Expiry = DEFAULT_EXPIRY) -> Metadata[Any]:
    """The next version: version + 1, a fresh expiry, no signatures."""
    md.signed.version += 1
    md.signed.expires = expiry.expires(md.signed.type, now)
    md.signatures.clear()
    return md


def next_snapshot(
    targets_version: int, previous: Metadata[Snapshot] | None, now: datetime, expiry: Expiry = DEFAULT_EXPIRY
) -> Metadata[Snapshot]:
    """Unsigned snapshot naming ``targets_version``, one version above ``previous``."""
    version = previous.signed.version + 1 if previous is not None else 1
    snapshot = Snapshot(
        version=version,
        expires=expiry.expires("snapshot", now),
        meta={"targets.json": MetaFile(version=targets_version)},
    )
    return Metadata(snapshot)


def next_timestamp(
    snapshot_bytes: bytes, previous: Metadata[Timestamp] | None, now: datetime, expiry: Expiry = DEFAULT_EXPIRY
) -> Metadata[Timestamp]:
    """Unsigned timestamp naming the snapshot (its version, length and sha256), one version above ``previous``."""
    snapshot = parse(snapshot_bytes, "snapshot")
    version = previous.signed.version + 1 if previous is not None else 1
    meta = MetaFile.from_data(snapshot.signed.version, snapshot_bytes, ["sha256"])
    return Metadata(Timestamp(version=version, expires=expiry.expires("timestamp", now), snapshot_meta=meta))


def _verify(delegator: Metadata[Root], role: str, md: Metadata[Any], what: str) -> None:
    try:
        delegator.signed.verify_delegate(role, md.signed_bytes, md.signatures)
    except RepositoryError as exc:
        raise TufMetadataError(f"{what}: {exc}") from None


def check_new_root(trusted: Metadata[Root] | None, data: bytes, now: datetime) -> Metadata[Root]:
    """The root in ``data`` if it may follow ``trusted`` (None: it is the first): version trusted + 1, signed by a
    threshold of the trusted root's keys *and* of its own, and not expired."""
    new = cast(Metadata[Root], parse(data, "root"))
    expected = trusted.signed.version + 1 if trusted is not None else new.signed.version
    if trusted is None and new.signed.version != 1:
        raise TufMetadataError(f"the first root must be version 1, got version {new.signed.version}")
    if new.signed.version != expected:
        raise TufMetadataError(f"the next root must be version {expected}, got version {new.signed.version}")
    if trusted is not None:
        _verify(
            trusted, "root", new, f"root v{new.signed.version} is not signed by the threshold of root v{expected - 1}"
        )
    _verify(new, "root", new, f"root v{new.signed.version} is not signed by the threshold of its own root keys")
    if new.signed.is_expired(now):
        raise TufMetadataError(f"root v{new.signed.version} expired at {new.signed.expires.isoformat()}")
    return new


def check_targets(root: Metadata[Root], current: int | None, data: bytes, now: datetime) -> Metadata[Targets]:
    """The targets in ``data`` if the root's targets keys signed it to threshold, its version is above ``current``
    and it has not expired."""
    new = cast(Metadata[Targets], parse(data, "targets"))
    _verify(root, "targets", new, f"targets v{new.signed.version} is not signed by the threshold of the targets keys")
    if current is not None and new.signed.version <= current:
        raise TufMetadataError(
            f"targets v{new.signed.version} is not newer than the current v{current}; bump the version and sign again"
        )
    if new.signed.is_expired(now):
        raise TufMetadataError(f"targets v{new.signed.version} expired at {new.signed.expires.isoformat()}")
    return new
