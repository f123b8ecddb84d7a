"""The model registry: immutable signed manifests in SQL, their bytes in a blob store, aliases that move.

Each public method is one unit of work: it validates, writes blobs (content-addressed, so harmless if the call
later fails), then commits all of its rows in one transaction. A version is either fully registered — manifest,
files, parents, ``latest`` alias — or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.config import Settings
from slmops.core.lineage import LineageNode, build_lineage
from slmops.core.manifest import (
    FileEntry,
    License,
    Lineage,
    Manifest,
    ModelFacts,
    ModelFormat,
    RuntimeHints,
    SignedManifest,
    Source,
    is_digest,
)
from slmops.core.requirements import estimate_requirements
from slmops.errors import ConflictError, IntegrityError, NotFoundError, SLMOpsError
from slmops.registry.blobstore import BlobRef, BlobStore, Progress, open_blob_store
from slmops.registry.datasets import dataset_blob_digests
from slmops.registry.db import AliasRow, FileRow, ParentRow, VersionRow, make_engine, migrate
from slmops.registry.signing import KeyRing, verify_envelope
from slmops.registry.sources import inspect_source

__all__ = [
    "GcReport",
    "ImportResult",
    "ModelSummary",
    "ProgressFactory",
    "Registry",
    "VerifyProblem",
    "VerifyReport",
    "parse_ref",
]

ProgressFactory = Callable[[str, int], Progress]
"""Given a description and a total byte count, returns a callback that is told how many bytes were just done."""

_ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_LABEL_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
LATEST = "latest"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name``, ``name@v3``, ``name@stable`` or ``name@sha256:...`` → (name, selector or None)."""
    name, sep, selector = ref.partition("@")
    if not name or (sep and not selector):
        raise NotFoundError(f"'{ref}' is not a model reference; use NAME, NAME@v3, NAME@ALIAS or NAME@sha256:DIGEST")
    return name, selector or None


@dataclass(frozen=True)
class ImportResult:
    envelope: SignedManifest
    created: bool
    skipped: list[str] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest:
        return self.envelope.manifest


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: int
    latest: str
    aliases: dict[str, str]
    total_bytes: int
    formats: list[str]


@dataclass(frozen=True)
class VerifyProblem:
    path: str
    expected: str
    actual: str


@dataclass(frozen=True)
class VerifyReport:
    name: str
    version: str
    digest: str
    signed_by: str | None
    files_checked: int
    bytes_checked: int
    problems: list[VerifyProblem]

    @property
    def ok(self) -> bool:
        return self.signed_by is not None and not self.problems


@dataclass(frozen=True)
class GcReport:
    removed: list[str]
    freed_bytes: int
    kept_young: int
    temporary_removed: int
    dry_run: bool


class Registry:
    """Model versions, blobs and aliases under one SLMOPS_HOME (or a database URL plus a blob directory)."""

    def __init__(
        self, engine: Engine, blobs: BlobStore, keys: KeyRing, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.engine = engine
        self.blobs = blobs
        self.keys = keys
        self.clock = clock

    @classmethod
    def open(cls, settings: Settings | None = None) -> Registry:
        settings = settings or Settings()
        home = settings.resolved_home
        home.mkdir(parents=True, exist_ok=True)
        registry = cls(
            make_engine(settings.resolved_database_url),
            open_blob_store(settings),
            KeyRing(settings.key_dir),
        )
        registry.initialize()
        return registry

    def initialize(self) -> None:
        self.blobs.initialize()
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ writing

    def import_model(
        self,
        source: Path,
        name: str,
        *,
        license: License | None = None,
        runtime: RuntimeHints | None = None,
        source_kind: str | None = None,
        origin: str | None = None,
        progress: ProgressFactory | None = None,
    ) -> ImportResult:
        """Validate a GGUF file or a model directory and register it as the next version of ``name``.

        Importing the same bytes again returns the existing version (``created`` is False).
        """
        inspected = inspect_source(source)
        hints = _merge_hints(inspected.runtime, runtime)
        kind = source_kind or ("file" if source.is_file() else "directory")
        result = self.register(
            name,
            inspected.format,
            inspected.files,
            facts=inspected.facts,
            runtime=hints,
            weight_bytes=inspected.weight_bytes,
            license=license,
            source=Source(kind=kind, origin=origin if origin is not None else str(source)),
            progress=progress,
        )
        return ImportResult(result.envelope, result.created, inspected.skipped)

    def register(
        self,
        name: str,
        format: ModelFormat,
        files: dict[str, Path],
        *,
        facts: ModelFacts,
        runtime: RuntimeHints,
        weight_bytes: int,
        source: Source,
        lineage: Lineage | None = None,
        variant: str | None = None,
        license: License | None = None,
        metrics: dict[str, float] | None = None,
        progress: ProgressFactory | None = None,
    ) -> ImportResult:
        """Store already-validated files as blobs and register a signed manifest for them."""
        lineage = lineage or Lineage()
        entries: list[FileEntry] = []
        for rel in sorted(files):
            path = files[rel]
            size = path.stat().st_size
            callback = progress(rel, size) if progress is not None else None
            ref = self.blobs.put_file(path, progress=callback)
            entries.append(FileEntry(path=rel, digest=ref.digest, size=ref.size))
        signer = self.keys.ensure_signing_key()
        for parent in lineage.parents:
            self._require_version(parent)
        draft = Manifest(
            name=name,
            version="v1",
            variant=variant,
            format=format,
            files=entries,
            facts=facts,
            runtime=runtime,
            requirements=estimate_requirements(facts, weight_bytes),
            metrics=metrics or {},
            lineage=lineage,
            license=license,
            source=source,
            created_at=_timestamp(self.clock()),
        )
        content_key = draft.content_key()
        for _attempt in range(8):
            with Session(self.engine) as session:
                existing = session.scalar(
                    select(VersionRow).where(VersionRow.name == name, VersionRow.content_key == content_key)
                )
                if existing is not None:
                    return ImportResult(SignedManifest.from_json(existing.envelope), created=False)
                number = (session.scalar(select(func.max(VersionRow.number)).where(VersionRow.name == name)) or 0) + 1
                manifest = draft.model_copy(update={"version": f"v{number}"})
                envelope = SignedManifest(
                    manifest=manifest, digest=manifest.digest, signatures=[signer.sign(manifest.canonical())]
                )
                self._add_version(session, envelope, content_key)
                self._set_alias(session, name, LATEST, envelope.digest)
                try:
                    session.commit()
                except SQLIntegrityError:
                    session.rollback()
                    continue  # another writer took this label or registered the same content; look again
                return ImportResult(envelope, created=True)
        raise ConflictError(f"could not allocate a version label for '{name}' after 8 attempts; retry the import")

    def adopt(self, envelopes: list[SignedManifest], aliases: dict[str, dict[str, str]] | None = None) -> list[str]:
        """Register manifests signed elsewhere (from a bundle), whose blobs are already stored and verified.

        All or nothing, in one transaction. Versions already present are skipped; a label that is taken here by a
        different version is a conflict. ``aliases`` (name → alias → digest) are set only where this registry has
        no such alias yet. Returns the digests that were added.
        """
        added: list[str] = []
        with Session(self.engine) as session:
            for envelope in envelopes:
                manifest = envelope.manifest
                if session.get(VersionRow, envelope.digest) is not None:
                    continue
                taken = session.scalar(
                    select(VersionRow).where(VersionRow.name == manifest.name, VersionRow.label == manifest.version)
                )
                if taken is not None:
                    raise ConflictError(
                        f"this registry already has {manifest.name}@{manifest.version} as {taken.digest}, "
                        f"but the bundle's {manifest.name}@{manifest.version} is {envelope.digest}; "
                        "the two registries diverged — import into a fresh SLMOPS_HOME, or remove the local version"
                    )
                same_content = session.scalar(
                    select(VersionRow).where(
                        VersionRow.name == manifest.name, VersionRow.content_key == manifest.content_key()
                    )
                )
                if same_content is not None:
                    raise ConflictError(
                        f"this registry already holds the same files as {manifest.name}@{manifest.version} under "
                        f"{same_content.label} ({same_content.digest}); the bundle's version was registered separately"
                    )
                self._add_version(session, envelope, manifest.content_key())
                added.append(envelope.digest)
            session.flush()
            names = {e.manifest.name for e in envelopes}
            for name in names:
                newest = session.scalars(
                    select(VersionRow).where(VersionRow.name == name).order_by(VersionRow.number.desc()).limit(1)
                ).first()
                if newest is not None:
                    self._set_alias(session, name, LATEST, newest.digest)
            for name, mapping in (aliases or {}).items():
                for alias, digest in mapping.items():
                    free = session.get(AliasRow, (name, alias)) is None
                    if alias != LATEST and free and session.get(VersionRow, digest) is not None:
                        self._set_alias(session, name, alias, digest)
            session.commit()
        return added

    def alias_digests(self, name: str) -> dict[str, str]:
        with Session(self.engine) as session:
            rows = session.scalars(select(AliasRow).where(AliasRow.name == name)).all()
        return {row.alias: row.version_digest for row in rows}

    def _add_version(self, session: Session, envelope: SignedManifest, content_key: str) -> None:
        manifest = envelope.manifest
        match = _LABEL_RE.match(manifest.version)
        assert match is not None  # the manifest validator guarantees the label shape
        session.add(
            VersionRow(
                digest=envelope.digest,
                name=manifest.name,
                label=manifest.version,
                number=int(match.group(1)),
                variant=manifest.variant,
                format=manifest.format,
                content_key=content_key,
                total_size=manifest.total_size,
                created_at=manifest.created_at,
                envelope=envelope.to_json(),
            )
        )
        session.flush()
        for entry in manifest.files:
            session.add(
                FileRow(version_digest=envelope.digest, path=entry.path, blob_digest=entry.digest, size=entry.size)
            )
        for parent in manifest.lineage.parents:
            session.add(ParentRow(child_digest=envelope.digest, parent_digest=parent))

    def _set_alias(self, session: Session, name: str, alias: str, digest: str) -> None:
        row = session.get(AliasRow, (name, alias))
        now = _timestamp(self.clock())
        if row is None:
            session.add(AliasRow(name=name, alias=alias, version_digest=digest, updated_at=now))
        else:
            row.version_digest = digest
            row.updated_at = now

    def tag(self, ref: str, alias: str) -> SignedManifest:
        """Point ``alias`` of the referenced model at the referenced version."""
        if not _ALIAS_RE.match(alias) or _LABEL_RE.match(alias):
            raise ConflictError(
                f"alias {alias!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-' starting with a letter, "
                "and not look like a version label (v1, v2, ...)"
            )
        if alias == LATEST:
            raise ConflictError("'latest' always points at the newest version and cannot be set by hand")
        envelope = self.resolve(ref)
        with Session(self.engine) as session:
            self._set_alias(session, envelope.manifest.name, alias, envelope.digest)
            session.commit()
        return envelope

    def untag(self, name: str, alias: str) -> None:
        with Session(self.engine) as session:
            row = session.get(AliasRow, (name, alias))
            if row is None:
                raise NotFoundError(f"model '{name}' has no alias '{alias}'")
            if alias == LATEST:
                raise ConflictError("'latest' always points at the newest version and cannot be removed")
            session.delete(row)
            session.commit()

    def remove(self, ref: str, force: bool = False) -> SignedManifest:
        """Unregister one version. Its blobs stay until `gc`. Refuses when variants derive from it, unless forced."""
        envelope = self.resolve(ref)
        name = envelope.manifest.name
        with Session(self.engine) as session:
            children = session.scalars(
                select(VersionRow)
                .join(ParentRow, ParentRow.child_digest == VersionRow.digest)
                .where(ParentRow.parent_digest == envelope.digest)
            ).all()
            if children and not force:
                labels = ", ".join(f"{c.name}@{c.label}" for c in children)
                raise ConflictError(
                    f"{name}@{envelope.manifest.version} has variants derived from it ({labels}); remove them first, "
                    "or pass --force to keep them with a dangling parent"
                )
            aliases = session.scalars(select(AliasRow).where(AliasRow.version_digest == envelope.digest)).all()
            for alias in aliases:
                session.delete(alias)
            session.execute(delete(FileRow).where(FileRow.version_digest == envelope.digest))
            session.execute(delete(ParentRow).where(ParentRow.child_digest == envelope.digest))
            session.execute(delete(VersionRow).where(VersionRow.digest == envelope.digest))
            newest = session.scalars(
                select(VersionRow).where(VersionRow.name == name).order_by(VersionRow.number.desc()).limit(1)
            ).first()
            if newest is not None:
                self._set_alias(session, name, LATEST, newest.digest)
            session.commit()
        return envelope

    def gc(self, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blobs no version references. Blobs younger than ``grace_s`` are kept: an import may be
        between writing its blobs and registering its manifest."""
        with Session(self.engine) as session:
            referenced = set(session.scalars(select(FileRow.blob_digest).distinct())) | dataset_blob_digests(session)
        now = self.clock().timestamp()
        removed: list[str] = []
        freed = 0
        young = 0
        for digest in list(self.blobs.digests()):
            if digest in referenced:
                continue
            if now - self.blobs.modified_at(digest) < grace_s:
                young += 1
                continue
            freed += self.blobs.size(digest)
            removed.append(digest)
            if not dry_run:
                self.blobs.delete(digest)
        temporary = 0 if dry_run else self.blobs.sweep_temporary(grace_s, now)
        return GcReport(sorted(removed), freed, young, temporary, dry_run)

    # ------------------------------------------------------------------ reading

    def models(self) -> list[ModelSummary]:
        with Session(self.engine) as session:
            rows = session.scalars(select(VersionRow).order_by(VersionRow.name, VersionRow.number)).all()
            aliases = session.scalars(select(AliasRow)).all()
        labels = {row.digest: row.label for row in rows}
        summaries: dict[str, list[VersionRow]] = {}
        for row in rows:
            summaries.setdefault(row.name, []).append(row)
        result = []
        for name, versions in summaries.items():
            named = {a.alias: labels.get(a.version_digest, "?") for a in aliases if a.name == name}
            result.append(
                ModelSummary(
                    name=name,
                    versions=len(versions),
                    latest=versions[-1].label,
                    aliases=dict(sorted(named.items())),
                    total_bytes=sum(v.total_size for v in versions),
                    formats=sorted({v.format for v in versions}),
                )
            )
        return result

    def versions(self, name: str) -> list[SignedManifest]:
        with Session(self.engine) as session:
            rows = session.scalars(select(VersionRow).where(VersionRow.name == name).order_by(VersionRow.number)).all()
        if not rows:
            raise NotFoundError(self._unknown_model(name))
        return [SignedManifest.from_json(row.envelope) for row in rows]

    def aliases(self, name: str) -> dict[str, str]:
        """alias → version label for one model."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(AliasRow.alias, VersionRow.label)
                .join(VersionRow, VersionRow.digest == AliasRow.version_digest)
                .where(AliasRow.name == name)
                .order_by(AliasRow.alias)
            ).all()
        return {alias: label for alias, label in rows}

    def resolve(self, ref: str) -> SignedManifest:
        """The manifest for NAME (latest), NAME@vN, NAME@ALIAS, NAME@sha256:... or a bare digest."""
        if is_digest(ref):
            return self._require_version(ref)
        name, selector = parse_ref(ref)
        selector = selector or LATEST
        with Session(self.engine) as session:
            if is_digest(selector):
                row = session.get(VersionRow, selector)
                row = row if row is not None and row.name == name else None
            elif _LABEL_RE.match(selector):
                row = session.scalar(select(VersionRow).where(VersionRow.name == name, VersionRow.label == selector))
            else:
                alias = session.get(AliasRow, (name, selector))
                row = session.get(VersionRow, alias.version_digest) if alias is not None else None
            if row is not None:
                return SignedManifest.from_json(row.envelope)
            known = session.scalars(
                select(VersionRow.label).where(VersionRow.name == name).order_by(VersionRow.number)
            ).all()
            aliases = session.scalars(select(AliasRow.alias).where(AliasRow.name == name)).all()
        if not known:
            raise NotFoundError(self._unknown_model(name))
        raise NotFoundError(
            f"model '{name}' has no version or alias '{selector}'; known versions: {', '.join(known)}"
            + (f"; aliases: {', '.join(sorted(aliases))}" if aliases else "")
            + f" (run `slmops model list {name}`)"
        )

    def _require_version(self, digest: str) -> SignedManifest:
        with Session(self.engine) as session:
            row = session.get(VersionRow, digest)
        if row is None:
            raise NotFoundError(f"no model version with digest {digest} in this registry")
        return SignedManifest.from_json(row.envelope)

    def has_version(self, digest: str) -> bool:
        with Session(self.engine) as session:
            return session.get(VersionRow, digest) is not None

    def children(self, digest: str) -> list[SignedManifest]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(VersionRow)
                .join(ParentRow, ParentRow.child_digest == VersionRow.digest)
                .where(ParentRow.parent_digest == digest)
                .order_by(VersionRow.name, VersionRow.number)
            ).all()
        return [SignedManifest.from_json(row.envelope) for row in rows]

    def lineage(self, name: str) -> list[LineageNode]:
        """The derivation tree of every version of ``name`` and of everything derived from them."""
        collected: dict[str, SignedManifest] = {e.digest: e for e in self.versions(name)}
        frontier = list(collected)
        while frontier:
            digest = frontier.pop()
            for child in self.children(digest):
                if child.digest not in collected:
                    collected[child.digest] = child
                    frontier.append(child.digest)
        return build_lineage(list(collected.values()))

    def _unknown_model(self, name: str) -> str:
        with Session(self.engine) as session:
            names = session.scalars(select(VersionRow.name).distinct().order_by(VersionRow.name)).all()
        hint = f"known models: {', '.join(names)}" if names else "the registry is empty"
        return f"no model named '{name}' ({hint}); import one with `slmops model import PATH --name NAME`"

    def blob_path(self, digest: str) -> Path:
        """A local file with the blob's verified bytes (the blob itself, or a cached copy from object storage)."""
        return self.blobs.local_path(digest)

    # ------------------------------------------------------------------ checking

    def verify(self, ref: str, progress: ProgressFactory | None = None) -> VerifyReport:
        """Check the manifest signature against trusted keys and re-hash every file."""
        envelope = self.resolve(ref)
        return self.verify_envelope(envelope, progress)

    def verify_envelope(self, envelope: SignedManifest, progress: ProgressFactory | None = None) -> VerifyReport:
        manifest = envelope.manifest
        problems: list[VerifyProblem] = []
        signed_by: str | None = None
        try:
            signed_by = verify_envelope(envelope, self.keys.trusted())
        except SLMOpsError as exc:
            problems.append(VerifyProblem(path="<signature>", expected="a valid trusted signature", actual=str(exc)))
        checked = 0
        for entry in manifest.files:
            callback = progress(entry.path, entry.size) if progress is not None else None
            try:
                actual: BlobRef = self.blobs.verify(entry.digest, callback)
            except NotFoundError:
                problems.append(VerifyProblem(entry.path, entry.digest, "missing from the blob store"))
                continue
            checked += actual.size
            if actual.digest != entry.digest:
                problems.append(VerifyProblem(entry.path, entry.digest, actual.digest))
            elif actual.size != entry.size:
                problems.append(VerifyProblem(entry.path, f"{entry.size} bytes", f"{actual.size} bytes"))
        return VerifyReport(
            name=manifest.name,
            version=manifest.version,
            digest=envelope.digest,
            signed_by=signed_by,
            files_checked=len(manifest.files),
            bytes_checked=checked,
            problems=problems,
        )

    def require_verified(self, ref: str, progress: ProgressFactory | None = None) -> VerifyReport:
        report = self.verify(ref, progress)
        if not report.ok:
            lines = [f"{p.path}: expected {p.expected}, got {p.actual}" for p in report.problems]
            raise IntegrityError(
                f"{report.name}@{report.version} failed verification:\n  "
                + "\n  ".join(lines)
                + "\nre-import the model or restore the blob store from backup"
            )
        return report

    def ancestors(self, envelopes: Iterable[SignedManifest]) -> list[SignedManifest]:
        """The given versions plus every ancestor present here, parents before children."""
        seen: dict[str, SignedManifest] = {}
        order: list[SignedManifest] = []

        def visit(envelope: SignedManifest) -> None:
            if envelope.digest in seen:
                return
            seen[envelope.digest] = envelope
            for parent in envelope.manifest.lineage.parents:
                if self.has_version(parent):
                    visit(self._require_version(parent))
            order.append(envelope)

        for envelope in envelopes:
            visit(envelope)
        return order


def _merge_hints(found: RuntimeHints, given: RuntimeHints | None) -> RuntimeHints:
    if given is None:
        return found
    return RuntimeHints(
        chat_template=given.chat_template or found.chat_template,
        stop_tokens=given.stop_tokens or found.stop_tokens,
        bos_token=given.bos_token or found.bos_token,
        eos_token=given.eos_token or found.eos_token,
    )
