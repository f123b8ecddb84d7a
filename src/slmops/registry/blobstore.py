"""Content-addressed blob storage: bytes named by their sha256.

A blob is either absent or complete and correct. Writers stream into a temporary file in the blob directory,
hash while they write, fsync, verify the digest, then ``os.replace`` the file to its final name and fsync the
directory. Two processes writing the same blob both end with the same bytes under the same name; a writer killed
half-way leaves only a ``.tmp-`` file that readers never see and :meth:`DirectoryBlobStore.sweep_temporary`
removes.

Two stores implement :class:`BlobStore`: :class:`DirectoryBlobStore` (the default) and
:class:`~slmops.registry.s3store.S3BlobStore` (S3-compatible object storage, ``SLMOPS_BLOB_URL=s3://...``);
:func:`open_blob_store` picks one from the settings. Code that needs a file on the local disk (a runtime loading a
GGUF file) asks :meth:`BlobStore.local_path`; the control plane asks :meth:`BlobStore.presigned_url` whether the
agents can fetch a blob from the store directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol

from slmops.errors import ConfigError, IntegrityError, NotFoundError

if TYPE_CHECKING:
    from slmops.config import Settings

__all__ = [
    "CHUNK_BYTES",
    "BlobRef",
    "BlobStore",
    "DirectoryBlobStore",
    "Progress",
    "hash_file",
    "open_blob_store",
]

CHUNK_BYTES = 1 << 20
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"

Progress = Callable[[int], None]
"""Called with the number of bytes just processed."""


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX_RE.match(hexpart):
        raise NotFoundError(f"'{digest}' is not a blob digest; expected 'sha256:<64 hex digits>'")
    return hexpart


def hash_file(path: Path, progress: Progress | None = None) -> BlobRef:
    """sha256 and size of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return BlobRef("sha256:" + hasher.hexdigest(), size)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore(Protocol):
    """Where blob bytes live. The registry only ever talks to this interface.

    ``root`` is a local directory the store owns: the blobs themselves, or (object storage) the read-through cache
    that :meth:`local_path` fills; callers may put scratch directories in it (same filesystem as local copies).
    """

    root: Path

    def initialize(self) -> None: ...

    def has(self, digest: str) -> bool: ...

    def size(self, digest: str) -> int: ...

    def open(self, digest: str) -> BinaryIO: ...

    def put_stream(
        self, stream: IO[bytes], expected_digest: str | None = None, progress: Progress | None = None
    ) -> BlobRef: ...

    def put_file(self, path: Path, expected_digest: str | None = None, progress: Progress | None = None) -> BlobRef: ...

    def delete(self, digest: str) -> None: ...

    def digests(self) -> Iterator[str]: ...

    def verify(self, digest: str, progress: Progress | None = None) -> BlobRef:
        """Re-hash a stored blob; the returned digest is what the bytes really are."""
        ...

    def modified_at(self, digest: str) -> float:
        """When the blob was stored (epoch seconds); the registry's garbage collection spares young blobs."""
        ...

    def sweep_temporary(self, older_than_s: float, now: float | None = None) -> int:
        """Remove what writers that died left behind; returns how many leftovers were removed."""
        ...

    def local_path(self, digest: str) -> Path:
        """A local file holding the blob's verified bytes (the blob itself, or a cached copy); never write to it."""
        ...

    def presigned_url(self, digest: str, expires_s: int) -> str | None:
        """A URL anyone holding it may GET the blob from for ``expires_s``, or None: serve the bytes yourself."""
        ...


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name: ``SLMOPS_BLOB_URL=s3://...`` or the blob directory under SLMOPS_HOME."""
    url = settings.blob_url
    if not url:
        return DirectoryBlobStore(settings.blob_dir)
    if url.startswith("s3://"):
        from slmops.registry.s3store import S3BlobStore

        return S3BlobStore.from_settings(settings)
    if url.startswith("file://"):
        return DirectoryBlobStore(Path(url.removeprefix("file://")).expanduser())
    raise ConfigError(
        f"SLMOPS_BLOB_URL is {url!r}; expected s3://BUCKET/PREFIX (object storage) or file:///DIR (a directory), "
        "or leave it unset for the blob directory under SLMOPS_HOME"
    )


class DirectoryBlobStore:
    """Blobs as read-only files ``<root>/sha256/<hex>`` on a local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir = root / "sha256"

    def initialize(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the blob directory {self._dir}: {exc.strerror}; check SLMOPS_HOME"
            ) from exc

    def path(self, digest: str) -> Path:
        """The local file of a blob (it may not exist)."""
        return self._dir / _hex(digest)

    def local_path(self, digest: str) -> Path:
        path = self.path(digest)
        if not path.is_file():
            raise NotFoundError(f"blob {digest} is not in {self._dir}")
        return path

    def presigned_url(self, digest: str, expires_s: int) -> str | None:
        return None  # a directory has no URL of its own: the control plane serves the bytes

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self._dir}") from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return self.path(digest).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self._dir}") from None

    def put_file(self, path: Path, expected_digest: str | None = None, progress: Progress | None = None) -> BlobRef:
        if expected_digest is not None and self.has(expected_digest):
            # Already stored; the stored copy was verified when it was written.
            size = path.stat().st_size
            if progress is not None:
                progress(size)
            return BlobRef(expected_digest, self.size(expected_digest))
        with path.open("rb") as handle:
            return self.put_stream(handle, expected_digest, progress)

    def put_stream(
        self, stream: IO[bytes], expected_digest: str | None = None, progress: Progress | None = None
    ) -> BlobRef:
        if expected_digest is not None:
            _hex(expected_digest)
        hasher = hashlib.sha256()
        size = 0
        tmp = self._dir / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            with tmp.open("xb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise IntegrityError(
                    f"blob content does not match its name: expected {expected_digest}, got {digest} "
                    f"({size} bytes); the source is corrupt or was changed, nothing was stored"
                )
            final = self.path(digest)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(self._dir)
            return BlobRef(digest, size)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def digests(self) -> Iterator[str]:
        if not self._dir.is_dir():
            return
        for entry in os.scandir(self._dir):
            if entry.is_file(follow_symlinks=False) and _HEX_RE.match(entry.name):
                yield "sha256:" + entry.name

    def verify(self, digest: str, progress: Progress | None = None) -> BlobRef:
        """Re-hash a stored blob; the returned digest is what the bytes really are."""
        try:
            return hash_file(self.path(digest), progress)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self._dir}") from None

    def sweep_temporary(self, older_than_s: float, now: float | None = None) -> int:
        """Remove temp files left by writers that died; returns how many were removed."""
        if not self._dir.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for entry in os.scandir(self._dir):
            if entry.name.startswith(_TMP_PREFIX) and entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def modified_at(self, digest: str) -> float:
        try:
            return self.path(digest).stat().st_mtime
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self._dir}") from None
