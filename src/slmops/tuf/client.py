"""The device's TUF client: ``tuf.ngclient.Updater`` over an httpx fetcher that resumes and stops at the cap.

:class:`TufClient` answers one question for the agent: *is this manifest a current target for my hardware id?*
It refreshes the top-level metadata in TUF's order (root chain, timestamp, snapshot, targets), which refuses an
older timestamp or snapshot than the one the device already trusts (rollback), expired metadata (freeze),
metadata that do not match what the snapshot pins (mix-and-match) and roles signed below their threshold; then it
looks the manifest up by digest, checks the target's ``custom.hardware_ids`` names the device class, and fetches
the target (the manifest's canonical JSON) through the fetcher, which verifies length and sha256.

The metadata directory (``<agent data>/tuf``) is the trust state: ``root_history/N.root.json`` and the last
trusted ``timestamp.json``, ``snapshot.json``, ``targets.json`` (written atomically by the ``Updater``), plus
``targets/`` with the fetched manifests.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from slmops.errors import SignatureError, UnavailableError
from slmops.tuf.metadata import hardware_ids_of, target_path

__all__ = ["HttpxFetcher", "TufClient", "TufRejectedError", "TufVerdict"]


class TufRejectedError(SignatureError):
    """The update metadata refuses a version: ``check`` says which protection fired."""

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check


_CHECKS: tuple[tuple[type[Exception], str], ...] = (
    (tuf_errors.ExpiredMetadataError, "expired"),
    (tuf_errors.BadVersionNumberError, "version"),
    (tuf_errors.UnsignedMetadataError, "threshold"),
    (tuf_errors.LengthOrHashMismatchError, "hash"),
    (tuf_errors.DownloadLengthMismatchError, "length"),
    (tuf_errors.RepositoryError, "repository"),
)


class HttpxFetcher(FetcherInterface):
    """Downloads for the ``Updater`` with an ``httpx.Client``. A cut connection resumes with ``Range: bytes=N-``
    (and ``If-Range`` with the first answer's ETag; a ``200`` starts over, so two versions are never spliced); the
    download stops at ``max_length`` bytes, the length TUF declares, before reading more (a body announced longer
    is refused before its first byte). ``received`` counts the bytes of the last download that were kept."""

    def __init__(
        self,
        http: httpx.Client,
        headers: Callable[[], dict[str, str]] | None = None,
        *,
        max_attempts: int = 3,
    ) -> None:
        self._http = http
        self._headers = headers or dict
        self.max_attempts = max_attempts
        self.received = 0
        self.resumed_from: list[int] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        with self.download_file(url, 1 << 40) as handle:
            data = handle.read()
        return iter([data])

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        with tempfile.TemporaryFile() as out:
            self.received, self.resumed_from = 0, []
            etag: str | None = None
            for attempt in range(1, self.max_attempts + 1):
                try:
                    etag = self._receive(url, max_length, out, etag)
                    break
                except (httpx.TransportError, _Cut) as exc:
                    if attempt == self.max_attempts:
                        raise tuf_errors.DownloadError(
                            f"{url} broke off after {self.received} bytes, {attempt} times: {type(exc).__name__}"
                        ) from None
            out.seek(0)
            yield out

    def _receive(self, url: str, max_length: int, out: IO[bytes], etag: str | None) -> str | None:
        headers = self._headers()
        offset = self.received
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            if etag:
                headers["If-Range"] = etag
        with self._http.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status >= 400:
                raise tuf_errors.DownloadHTTPError(f"GET {url} answered HTTP {status}", status)
            if (
                status == 206
                and offset > 0
                and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
            ):
                self.resumed_from.append(offset)
            else:  # a full body (or an answer we cannot append): start over
                out.seek(0)
                out.truncate()
                self.received, offset = 0, 0
                etag = response.headers.get("ETag")
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and offset + int(declared) > max_length:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{url} announces {offset + int(declared)} bytes but at most {max_length} are expected; refused"
                )
            try:
                for chunk in response.iter_bytes():
                    if self.received + len(chunk) > max_length:
                        raise tuf_errors.DownloadLengthMismatchError(
                            f"{url} sent more than the {max_length} bytes expected; stopped at the cap"
                        )
                    out.write(chunk)
                    self.received += len(chunk)
            except httpx.RemoteProtocolError as exc:
                raise _Cut(str(exc)) from None
        return etag


class _Cut(Exception):
    """The connection closed before the announced length: resume."""


@dataclass(frozen=True)
class TufVerdict:
    """A manifest the metadata lists as a current target for the device's hardware id."""

    target_path: str
    length: int
    hardware_ids: list[str]
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    root_version: int


class TufClient:
    """One device's TUF client over ``metadata_url`` (``…/api/v1/tuf/``); ``metadata_dir`` holds its trust."""

    def __init__(self, metadata_dir: Path, metadata_url: str, fetcher: FetcherInterface) -> None:
        self.metadata_dir = metadata_dir
        self.metadata_url = metadata_url.rstrip("/") + "/"
        self.fetcher = fetcher

    def has_root(self) -> bool:
        return (self.metadata_dir / "root.json").exists()

    def install_root(self, root_bytes: bytes) -> int:
        """Make ``root_bytes`` the trust anchor (checked to be signed to its own threshold); returns its version."""
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            updater = self._updater(root_bytes)
        except (tuf_errors.RepositoryError, ValueError) as exc:
            raise TufRejectedError(f"the TUF root to install does not verify: {exc}", "threshold") from None
        return int(updater._trusted_set.root.version)

    def _updater(self, bootstrap: bytes | None) -> Updater:
        return Updater(
            str(self.metadata_dir),
            self.metadata_url,
            target_dir=str(self.metadata_dir / "targets"),
            target_base_url=self.metadata_url + "targets/",
            fetcher=self.fetcher,
            config=UpdaterConfig(prefix_targets_with_hash=False),
            bootstrap=bootstrap,
        )

    def check(self, manifest_digest: str, hardware_id: str) -> TufVerdict:
        """Refresh the metadata and return the target of ``manifest_digest`` if it is current for ``hardware_id``;
        otherwise :class:`TufRejectedError` (refused) or :class:`UnavailableError` (could not fetch: retry)."""
        path = target_path(manifest_digest)
        try:
            updater = self._updater(None)
            updater.refresh()
            info = updater.get_targetinfo(path)
            if info is None:
                raise TufRejectedError(
                    f"the manifest {manifest_digest} is not a current target of the update metadata "
                    "(not released, withdrawn, or an old version replayed); nothing installed",
                    "not_a_target",
                )
            self._check_target(info, manifest_digest, hardware_id)
            if updater.find_cached_target(info) is None:
                updater.download_target(info)
            trusted = updater._trusted_set
            return TufVerdict(
                target_path=path,
                length=info.length,
                hardware_ids=hardware_ids_of(info),
                targets_version=trusted.targets.version,
                snapshot_version=trusted.snapshot.version,
                timestamp_version=trusted.timestamp.version,
                root_version=trusted.root.version,
            )
        except TufRejectedError:
            raise
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise TufRejectedError(f"TUF refused a download: {exc}", "length") from None
        except tuf_errors.DownloadError as exc:
            raise UnavailableError(f"cannot fetch the TUF metadata: {exc}; retrying later") from None
        except (tuf_errors.RepositoryError, OSError) as exc:
            check = next((name for kind, name in _CHECKS if isinstance(exc, kind)), "repository")
            raise TufRejectedError(
                f"TUF refused the update metadata ({type(exc).__name__}: {exc}); nothing installed", check
            ) from None

    @staticmethod
    def _check_target(info: TargetFile, manifest_digest: str, hardware_id: str) -> None:
        if info.hashes.get("sha256") != manifest_digest.removeprefix("sha256:"):
            raise TufRejectedError(
                f"the target {info.path} hashes to sha256:{info.hashes.get('sha256')}, not {manifest_digest}", "hash"
            )
        ids = hardware_ids_of(info)
        if hardware_id not in ids:
            raise TufRejectedError(
                f"the manifest {manifest_digest} is released for hardware ids {', '.join(ids) or 'none'}, "
                f"not for this device's {hardware_id}; nothing installed",
                "hardware_id",
            )
