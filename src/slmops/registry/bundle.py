"""Air-gapped transfer: a plain tar of signed manifests, blobs and public keys.

Layout of a bundle::

    slmops-bundle.json          index: format, version, manifests in parent-first order, blobs, keys, aliases
    manifests/<hex>.json        SignedManifest envelopes, named by manifest digest
    blobs/sha256/<hex>          file bytes, named by their digest
    keys/<key_id>.pub           public keys of the signers

Importing never extracts the archive: each member is checked (a regular file, a name of exactly the shapes
above, a bounded size) and streamed into the blob store, which verifies its digest. Then every manifest is
verified — digest, trusted signature, every file present with its size — and only then are the versions
registered, in one transaction. On failure the blobs this import added are removed again.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from slmops.core.manifest import SignedManifest, canonical_json
from slmops.errors import BundleError, IntegrityError, SignatureError
from slmops.registry.blobstore import Progress
from slmops.registry.service import Registry
from slmops.registry.signing import key_id_for, parse_public_key, verify_envelope

__all__ = ["BUNDLE_FORMAT", "BundleContents", "export_bundle", "import_bundle"]

BUNDLE_FORMAT = "slmops-bundle"
BUNDLE_VERSION = 1
_INDEX = "slmops-bundle.json"
_MANIFEST_RE = re.compile(r"^manifests/([0-9a-f]{64})\.json$")
_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_KEY_RE = re.compile(r"^keys/([0-9a-f]{16})\.pub$")
_DIRS = {"manifests", "blobs", "blobs/sha256", "keys"}
_MAX_JSON_BYTES = 16 << 20
_MAX_MEMBERS = 100_000

ProgressFactory = Callable[[str, int], Progress]


@dataclass(frozen=True)
class BundleContents:
    manifests: list[SignedManifest]
    blob_count: int
    blob_bytes: int
    added: list[str]
    keys_trusted: list[str]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_bundle(
    registry: Registry,
    refs: list[str],
    output: Path,
    *,
    with_ancestors: bool = True,
    progress: ProgressFactory | None = None,
) -> BundleContents:
    """Write the referenced versions (a NAME means all its versions) and their ancestors to a tar file."""
    chosen: list[SignedManifest] = []
    for ref in refs:
        if "@" in ref:
            chosen.append(registry.resolve(ref))
        else:
            chosen.extend(registry.versions(ref))
    envelopes = registry.ancestors(chosen) if with_ancestors else chosen
    for envelope in envelopes:
        registry.require_verified(envelope.digest)
    blobs: dict[str, int] = {}
    keys: set[str] = set()
    for envelope in envelopes:
        for entry in envelope.manifest.files:
            blobs[entry.digest] = entry.size
        keys.update(s.key_id for s in envelope.signatures)
    exported = {e.digest for e in envelopes}
    aliases: dict[str, dict[str, str]] = {}
    for name in sorted({e.manifest.name for e in envelopes}):
        mapping = {a: d for a, d in registry.alias_digests(name).items() if d in exported}
        if mapping:
            aliases[name] = mapping
    index = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "manifests": [e.digest for e in envelopes],
        "blobs": [{"digest": d, "size": s} for d, s in sorted(blobs.items())],
        "keys": sorted(keys),
        "aliases": aliases,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, _INDEX, canonical_json(index))
        for key_id in sorted(keys):
            _add_bytes(tar, f"keys/{key_id}.pub", registry.keys.public_key_text(key_id).encode())
        for envelope in envelopes:
            _add_bytes(tar, f"manifests/{envelope.digest.removeprefix('sha256:')}.json", envelope.to_json().encode())
        for digest, size in sorted(blobs.items()):
            info = tarfile.TarInfo(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            info.size = size
            info.mode = 0o444
            callback = progress(digest[:19], size) if progress is not None else None
            with registry.blobs.open(digest) as handle:
                tar.addfile(info, _CountingReader(handle, callback) if callback else handle)
    tmp.replace(output)
    return BundleContents(envelopes, len(blobs), sum(blobs.values()), [], [])


class _CountingReader(io.RawIOBase):
    def __init__(self, inner: Any, progress: Progress) -> None:
        self._inner = inner
        self._progress = progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._inner.read(size)
        self._progress(len(data))
        return data


def _check_member(member: tarfile.TarInfo, bundle: Path) -> None:
    name = member.name
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise BundleError(f"{bundle} contains an unsafe path {name!r}; refusing the whole bundle")
    if member.issym() or member.islnk():
        raise BundleError(f"{bundle} contains a link {name!r} -> {member.linkname!r}; refusing the whole bundle")
    if member.isdir():
        if name.rstrip("/") not in _DIRS:
            raise BundleError(f"{bundle} contains an unexpected directory {name!r}")
        return
    if not member.isreg():
        raise BundleError(f"{bundle} contains {name!r}, which is not a regular file (device, FIFO...); refusing")
    if not (name == _INDEX or _MANIFEST_RE.match(name) or _BLOB_RE.match(name) or _KEY_RE.match(name)):
        raise BundleError(f"{bundle} contains an unexpected member {name!r}; it is not an slmops bundle")
    if not _BLOB_RE.match(name) and member.size > _MAX_JSON_BYTES:
        raise BundleError(f"{bundle}: {name} is {member.size} bytes, more than a manifest or key can be")


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise BundleError(f"cannot read {member.name} from the bundle")
    return handle.read(_MAX_JSON_BYTES + 1)


def import_bundle(
    registry: Registry, bundle: Path, *, trust_signers: bool = False, progress: ProgressFactory | None = None
) -> BundleContents:
    """Verify everything in a bundle, then register it; idempotent."""
    added_blobs: list[str] = []
    try:
        return _import(registry, bundle, trust_signers, progress, added_blobs)
    except BaseException:
        for digest in added_blobs:
            registry.blobs.delete(digest)
        raise


def _import(
    registry: Registry,
    bundle: Path,
    trust_signers: bool,
    progress: ProgressFactory | None,
    added_blobs: list[str],
) -> BundleContents:
    read = _BundleReader(registry, bundle, progress, added_blobs)
    read.read_all()
    index = read.checked_index()
    ordered = [read.envelopes[d] for d in index["manifests"]]
    trusted, newly_trusted = _signer_keys(registry, read.keys, trust_signers, bundle)
    for envelope in ordered:
        _verify_manifest(registry, envelope, read, trusted, bundle)
    for key_id in newly_trusted:
        registry.keys.trust(read.keys[key_id], f"{bundle}: keys/{key_id}.pub")
    added = registry.adopt(ordered, _index_aliases(index))
    added_blobs.clear()  # registered now: keep them
    return BundleContents(ordered, len(read.blobs), sum(read.blobs.values()), added, newly_trusted)


class _BundleReader:
    """One pass over a bundle's members: checks each, parses the index, manifests and keys, and streams the blobs
    into the blob store (which verifies their digests), recording in ``added_blobs`` the ones it added."""

    def __init__(
        self, registry: Registry, bundle: Path, progress: ProgressFactory | None, added_blobs: list[str]
    ) -> None:
        self.registry = registry
        self.bundle = bundle
        self.progress = progress
        self.added_blobs = added_blobs
        self.index: dict[str, Any] | None = None
        self.envelopes: dict[str, SignedManifest] = {}
        self.keys: dict[str, str] = {}
        self.blobs: dict[str, int] = {}

    def read_all(self) -> None:
        bundle = self.bundle
        if not bundle.is_file():
            raise BundleError(f"{bundle} is not a file; give the path of a bundle made by `slmops model export`")
        try:
            tar = tarfile.open(bundle, "r:")  # noqa: SIM115 - closed by the `with tar:` below
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(
                f"{bundle} is not an uncompressed tar archive ({exc}); make bundles with `slmops model export`"
            ) from None
        with tar:
            try:
                for count, member in enumerate(tar, start=1):
                    if count > _MAX_MEMBERS:
                        raise BundleError(f"{bundle} has more than {_MAX_MEMBERS} members; not an slmops bundle")
                    _check_member(member, bundle)
                    if not member.isdir():
                        self._read_member(tar, member)
            except (tarfile.TarError, EOFError) as exc:
                raise BundleError(f"{bundle} is truncated or corrupt ({exc}); copy it again") from None

    def checked_index(self) -> dict[str, Any]:
        """The index, once it is known to list exactly the manifests the bundle holds."""
        if self.index is None:
            raise BundleError(f"{self.bundle} has no {_INDEX}; it is not an slmops bundle")
        order = self.index["manifests"]
        missing = [d for d in order if d not in self.envelopes]
        if missing or set(self.envelopes) - set(order):
            raise BundleError(
                f"{self.bundle}: the index and the manifests disagree (missing: {', '.join(missing) or 'none'})"
            )
        return self.index

    def _read_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        if name == _INDEX:
            self.index = _parse_index(_read_small(tar, member), self.bundle)
        elif match := _MANIFEST_RE.match(name):
            envelope = _parse_envelope(_read_small(tar, member), name, self.bundle)
            if envelope.digest != f"sha256:{match.group(1)}":
                raise IntegrityError(
                    f"{self.bundle}: {name} holds manifest {envelope.digest}, not the one it is named after"
                )
            self.envelopes[envelope.digest] = envelope
        elif match := _KEY_RE.match(name):
            self.keys[match.group(1)] = _read_small(tar, member).decode("utf-8", errors="replace")
        elif match := _BLOB_RE.match(name):
            self._store_blob(tar, member, f"sha256:{match.group(1)}")

    def _store_blob(self, tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str) -> None:
        bundle, name = self.bundle, member.name
        if self.index is not None and _listed_size(self.index, digest) != member.size:
            raise BundleError(f"{bundle}: blob {name} ({member.size} bytes) is not listed in its index")
        existed = self.registry.blobs.has(digest)
        handle = tar.extractfile(member)
        if handle is None:
            raise BundleError(f"cannot read {name} from {bundle}")
        callback = self.progress(digest[:19], member.size) if self.progress is not None else None
        try:
            ref = self.registry.blobs.put_stream(handle, expected_digest=digest, progress=callback)
        except IntegrityError as exc:
            raise IntegrityError(f"{bundle}: blob {name} is corrupt or was tampered with: {exc}") from None
        if not existed:
            self.added_blobs.append(digest)
        self.blobs[digest] = ref.size


def _signer_keys(
    registry: Registry, keys: dict[str, str], trust_signers: bool, bundle: Path
) -> tuple[dict[str, Ed25519PublicKey], list[str]]:
    """(the keys to verify with, the bundle's keys to trust once everything verified); every key file must hold
    the key it is named after."""
    trusted = registry.keys.trusted()
    newly_trusted: list[str] = []
    for key_id, text in keys.items():
        public = parse_public_key(text, f"{bundle}: keys/{key_id}.pub")
        if key_id_for(public) != key_id:
            raise SignatureError(f"{bundle}: keys/{key_id}.pub holds a different key ({key_id_for(public)})")
        if key_id not in trusted and trust_signers:
            trusted[key_id] = public
            newly_trusted.append(key_id)
    return trusted, newly_trusted


def _verify_manifest(
    registry: Registry,
    envelope: SignedManifest,
    read: _BundleReader,
    trusted: dict[str, Ed25519PublicKey],
    bundle: Path,
) -> None:
    """A trusted signature, every file's blob present with its size, every parent in the bundle or the registry."""
    label = f"{envelope.manifest.name}@{envelope.manifest.version}"
    try:
        verify_envelope(envelope, trusted)
    except SignatureError as exc:
        signers = ", ".join(s.key_id for s in envelope.signatures)
        if any(k in read.keys and k not in trusted for k in (s.key_id for s in envelope.signatures)):
            raise SignatureError(
                f"{label} in {bundle} is signed by key {signers}, which this registry does not trust; "
                "check the key id with the sender, then re-run with --trust (or `slmops keys trust KEYFILE`)"
            ) from None
        raise SignatureError(f"{bundle}: {exc}") from None
    for entry in envelope.manifest.files:
        size = read.blobs.get(entry.digest)
        if size is None and registry.blobs.has(entry.digest):
            size = registry.blobs.size(entry.digest)
        if size is None:
            raise BundleError(f"{bundle}: {label} file {entry.path} needs blob {entry.digest}, which is missing")
        if size != entry.size:
            raise IntegrityError(
                f"{bundle}: {label} file {entry.path}: expected {entry.size} bytes, blob has {size} bytes"
            )
    for parent in envelope.manifest.lineage.parents:
        if parent not in read.envelopes and not registry.has_version(parent):
            raise BundleError(
                f"{bundle}: {label} derives from {parent}, which is neither in the bundle nor in this registry; "
                "export with ancestors (the default)"
            )


def _index_aliases(index: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        name: {str(a): str(d) for a, d in mapping.items()}
        for name, mapping in index.get("aliases", {}).items()
        if isinstance(mapping, dict)
    }


def _listed_size(index: dict[str, Any], digest: str) -> int | None:
    for item in index.get("blobs", []):
        if isinstance(item, dict) and item.get("digest") == digest and isinstance(item.get("size"), int):
            return int(item["size"])
    return None


def _parse_index(data: bytes, bundle: Path) -> dict[str, Any]:
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle}: {_INDEX} is not JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle}: {_INDEX} does not describe an slmops bundle")
    if index.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{bundle} is bundle format version {index.get('version')!r}; this slmops reads version {BUNDLE_VERSION} "
            "(upgrade slmops on this side)"
        )
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not all(isinstance(m, str) for m in manifests):
        raise BundleError(f"{bundle}: {_INDEX} has no list of manifests")
    return index


def _parse_envelope(data: bytes, name: str, bundle: Path) -> SignedManifest:
    try:
        return SignedManifest.from_json(data)
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{bundle}: {name} is not a valid signed manifest ({first})") from None
