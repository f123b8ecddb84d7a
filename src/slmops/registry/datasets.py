"""Dataset versions in the registry: curated feedback as content-addressed, versioned sets of JSONL files.

A dataset version is a :class:`DatasetManifest` (name, label ``v1``, ``v2`` …, its files with their blob digests,
the counts and curation parameters that made it, and its lineage: the model versions, device classes and releases
its samples came from; never a device id) whose digest is the sha256 of its canonical JSON. The files
(``train.jsonl``, ``heldout.jsonl``) are blobs in the registry's blob store, next to the model files, and
``GET /api/v1/blobs/{digest}`` serves them to operators. Registering the same files with the same curation again
returns the existing version (its *content key* leaves out the name and label), like a model import.

References are like models': ``NAME`` (the latest), ``NAME@v2``, ``NAME@latest``, ``NAME@sha256:...`` or a bare
manifest digest. Each public method is one unit of work.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field
from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from slmops.core._wire_base import Wire
from slmops.core.manifest import canonical_json, digest_bytes, is_digest
from slmops.errors import ConfigError, ConflictError, IntegrityError, NotFoundError
from slmops.registry.db import Base

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from slmops.registry.blobstore import BlobStore
    from slmops.registry.service import Registry

__all__ = [
    "DATASET_FORMAT",
    "DatasetFile",
    "DatasetFileRow",
    "DatasetLineage",
    "DatasetManifest",
    "DatasetRegistry",
    "DatasetResult",
    "DatasetSummary",
    "DatasetVersion",
    "DatasetVersionRow",
    "dataset_blob_digests",
    "write_atomic",
]

DATASET_FORMAT = "slmops.feedback-sft.jsonl/v1"
"""Lines as :class:`slmops.feedback.curate.TrainingRecord` (messages, completion, source)."""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_LABEL_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
_FILE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\.jsonl$")
LATEST = "latest"


class DatasetVersionRow(Base):
    __tablename__ = "dataset_versions"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    number: Mapped[int] = mapped_column(Integer)
    content_key: Mapped[str] = mapped_column(String(71))
    manifest: Mapped[str] = mapped_column(Text)  # canonical JSON, exactly what was hashed
    created_at: Mapped[str] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("name", "number", name="uq_dataset_version_number"),
        UniqueConstraint("name", "content_key", name="uq_dataset_version_content"),
    )


class DatasetFileRow(Base):
    __tablename__ = "dataset_files"

    dataset_digest: Mapped[str] = mapped_column(
        String(71), ForeignKey("dataset_versions.digest", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    blob_digest: Mapped[str] = mapped_column(String(71))
    size: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_dataset_files_blob", "blob_digest"),)


class DatasetFile(Wire):
    path: str  # train.jsonl, heldout.jsonl
    digest: str
    size: int  # bytes
    records: int  # lines


class DatasetLineage(Wire):
    """Where the samples came from: model version digests (with ``name@label`` where the registry knows them),
    device classes and releases. No device identifiers."""

    versions: list[str] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict)  # version digest → "name@v3"
    device_classes: list[str] = Field(default_factory=list)
    releases: list[str] = Field(default_factory=list)


class DatasetManifest(Wire):
    name: str
    version: str  # v1, v2, …
    format: Literal["slmops.feedback-sft.jsonl/v1"] = "slmops.feedback-sft.jsonl/v1"  # DATASET_FORMAT
    files: list[DatasetFile]  # sorted by path
    counts: dict[str, int] = Field(default_factory=dict)
    curation: dict[str, Any] = Field(default_factory=dict)  # the parameters, as given to the curation
    lineage: DatasetLineage = Field(default_factory=DatasetLineage)

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def digest(self) -> str:
        return digest_bytes(self.canonical())

    def content_key(self) -> str:
        """The digest of everything but the name and label: the same data made the same way."""
        return digest_bytes(canonical_json(self.model_dump(mode="json", exclude={"name", "version"})))

    def file(self, path: str) -> DatasetFile:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise NotFoundError(
            f"dataset {self.name}@{self.version} has no file {path!r}; it has {', '.join(f.path for f in self.files)}"
        )


class DatasetVersion(Wire):
    digest: str
    manifest: DatasetManifest
    created_at: str
    created_by: str

    @property
    def reference(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


class DatasetSummary(Wire):
    name: str
    versions: int
    latest: str  # label
    latest_digest: str
    created_at: str  # of the latest


@dataclass(frozen=True)
class DatasetResult:
    version: DatasetVersion
    created: bool


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _version_of(row: DatasetVersionRow) -> DatasetVersion:
    manifest = DatasetManifest.model_validate_json(row.manifest)
    return DatasetVersion(digest=row.digest, manifest=manifest, created_at=row.created_at, created_by=row.created_by)


def dataset_blob_digests(session: Session) -> set[str]:
    """Every blob a dataset version references (the registry's garbage collection must keep them)."""
    return set(session.scalars(select(DatasetFileRow.blob_digest).distinct()))


class DatasetRegistry:
    """The dataset versions of one registry (its database and blob store)."""

    def __init__(self, engine: Engine, blobs: BlobStore, clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self.blobs = blobs
        self.clock = clock

    @classmethod
    def of(cls, registry: Registry) -> DatasetRegistry:
        return cls(registry.engine, registry.blobs, registry.clock)

    # ------------------------------------------------------------------ writing

    def register(
        self,
        name: str,
        files: dict[str, bytes],
        *,
        records: dict[str, int],
        counts: dict[str, int] | None = None,
        curation: dict[str, Any] | None = None,
        lineage: DatasetLineage | None = None,
        created_by: str = "local",
    ) -> DatasetResult:
        """Store ``files`` (path → bytes, ``records`` lines each) as blobs and register the next version of
        ``name``; the same content registered again returns the existing version (``created`` False)."""
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"dataset name {name!r} is not valid; use lower-case letters, digits, '.', '_' and '-' "
                "(up to 128, starting with a letter or digit), e.g. support-feedback"
            )
        if not files:
            raise ConfigError("a dataset version needs at least one file (e.g. train.jsonl)")
        entries = []
        for path in sorted(files):
            if not _FILE_RE.match(path):
                raise ConfigError(f"dataset file name {path!r} is not valid; expected a plain name like train.jsonl")
            ref = self.blobs.put_stream(io.BytesIO(files[path]))
            entries.append(DatasetFile(path=path, digest=ref.digest, size=ref.size, records=records.get(path, 0)))
        draft = DatasetManifest(
            name=name,
            version="v1",
            files=entries,
            counts=dict(sorted((counts or {}).items())),
            curation=curation or {},
            lineage=lineage or DatasetLineage(),
        )
        content_key = draft.content_key()
        for _attempt in range(8):
            with Session(self.engine) as session:
                existing = session.scalar(
                    select(DatasetVersionRow).where(
                        DatasetVersionRow.name == name, DatasetVersionRow.content_key == content_key
                    )
                )
                if existing is not None:
                    return DatasetResult(_version_of(existing), created=False)
                top = session.scalar(select(func.max(DatasetVersionRow.number)).where(DatasetVersionRow.name == name))
                number = (top or 0) + 1
                manifest = draft.model_copy(update={"version": f"v{number}"})
                row = DatasetVersionRow(
                    digest=manifest.digest,
                    name=name,
                    number=number,
                    content_key=content_key,
                    manifest=manifest.canonical().decode("utf-8"),
                    created_at=_timestamp(self.clock()),
                    created_by=created_by,
                )
                session.add(row)
                session.flush()
                for entry in manifest.files:
                    session.add(
                        DatasetFileRow(
                            dataset_digest=row.digest, path=entry.path, blob_digest=entry.digest, size=entry.size
                        )
                    )
                try:
                    session.commit()
                except SQLIntegrityError:
                    session.rollback()
                    continue  # another writer took this label or registered the same content; look again
                return DatasetResult(_version_of(row), created=True)
        raise ConflictError(f"could not allocate a version label for dataset '{name}' after 8 attempts; retry")

    # ------------------------------------------------------------------ reading

    def datasets(self) -> list[DatasetSummary]:
        with Session(self.engine) as session:
            rows = session.scalars(select(DatasetVersionRow).order_by(DatasetVersionRow.name, DatasetVersionRow.number))
            by_name: dict[str, list[DatasetVersionRow]] = {}
            for row in rows:
                by_name.setdefault(row.name, []).append(row)
        return [
            DatasetSummary(
                name=name,
                versions=len(rows_),
                latest=f"v{rows_[-1].number}",
                latest_digest=rows_[-1].digest,
                created_at=rows_[-1].created_at,
            )
            for name, rows_ in by_name.items()
        ]

    def versions(self, name: str) -> list[DatasetVersion]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(DatasetVersionRow).where(DatasetVersionRow.name == name).order_by(DatasetVersionRow.number)
            ).all()
        if not rows:
            raise NotFoundError(self._unknown(name))
        return [_version_of(row) for row in rows]

    def resolve(self, ref: str) -> DatasetVersion:
        """The version for NAME (latest), NAME@vN, NAME@latest, NAME@sha256:... or a bare manifest digest."""
        with Session(self.engine) as session:
            if is_digest(ref):
                row = session.get(DatasetVersionRow, ref)
                if row is None:
                    raise NotFoundError(f"no dataset version with digest {ref} in this registry")
                return _version_of(row)
            name, sep, selector = ref.partition("@")
            if not name or (sep and not selector):
                raise NotFoundError(
                    f"'{ref}' is not a dataset reference; use NAME, NAME@v2, NAME@latest or NAME@sha256:..."
                )
            selector = selector or LATEST
            query = select(DatasetVersionRow).where(DatasetVersionRow.name == name)
            match = _LABEL_RE.match(selector)
            if selector == LATEST:
                row = session.scalar(query.order_by(DatasetVersionRow.number.desc()).limit(1))
            elif match:
                row = session.scalar(query.where(DatasetVersionRow.number == int(match.group(1))))
            elif is_digest(selector):
                row = session.scalar(query.where(DatasetVersionRow.digest == selector))
            else:
                row = None
            if row is not None:
                return _version_of(row)
            known = session.scalars(
                select(DatasetVersionRow.number)
                .where(DatasetVersionRow.name == name)
                .order_by(DatasetVersionRow.number)
            ).all()
        if not known:
            raise NotFoundError(self._unknown(name))
        raise NotFoundError(
            f"dataset '{name}' has no version '{selector}'; known versions: {', '.join(f'v{n}' for n in known)} "
            f"(run `slmops dataset show {name}`)"
        )

    def read(self, ref: str, path: str) -> bytes:
        """The bytes of one file of a version, checked against its digest."""
        entry = self.resolve(ref).manifest.file(path)
        with self.blobs.open(entry.digest) as handle:
            data = handle.read()
        if digest_bytes(data) != entry.digest:
            raise IntegrityError(
                f"blob {entry.digest} of dataset file {path} does not match its digest; "
                "the blob store is corrupt (run `slmops model verify` and re-curate the dataset)"
            )
        return data

    def export(self, ref: str, directory: Path) -> list[Path]:
        """Write a version's files and its ``manifest.json`` into ``directory`` (each file atomically)."""
        version = self.resolve(ref)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in version.manifest.files:
            written.append(write_atomic(directory / entry.path, self.read(version.digest, entry.path)))
        written.append(write_atomic(directory / "manifest.json", canonical_json(version.model_dump(mode="json"))))
        return written

    def _unknown(self, name: str) -> str:
        with Session(self.engine) as session:
            names = session.scalars(select(DatasetVersionRow.name).distinct().order_by(DatasetVersionRow.name)).all()
        hint = f"known datasets: {', '.join(names)}" if names else "there are none yet"
        return f"no dataset named '{name}' ({hint}); make one with `slmops feedback curate {name}`"


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsynced, then renamed."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
