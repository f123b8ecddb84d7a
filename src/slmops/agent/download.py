"""Resumable, verified, parallel blob downloads into the agent's blob cache.

Each blob is fetched into ``downloads/<hex>.partial``; the ETag its bytes came with is kept in ``<hex>.etag``. A
resumed fetch asks for ``Range: bytes=N-`` with ``If-Range: <etag>``: ``206`` appends, ``200`` means the file
changed on the server, so the partial is discarded and the download restarts from 0 (two versions are never
spliced). When all bytes are there, the partial is streamed through sha256 into the cache
(:meth:`DirectoryBlobStore.put_file`), which refuses bytes that do not match the digest. Failures are retried a
bounded number of times with full-jitter exponential backoff, within one overall deadline; a free-disk check runs
before anything is fetched. A blob already in the cache is never downloaded again.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from slmops.agent.client import ControlPlaneClient
from slmops.errors import IntegrityError, UnavailableError
from slmops.registry.blobstore import DirectoryBlobStore

__all__ = ["BlobWant", "DownloadConfig", "DownloadReport", "Downloader", "full_jitter_delay"]


@dataclass(frozen=True)
class DownloadConfig:
    max_parallel: int = 3
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    deadline_s: float = 3600.0
    disk_margin_bytes: int = 32 << 20


@dataclass(frozen=True)
class BlobWant:
    digest: str
    size: int


@dataclass
class DownloadReport:
    fetched: list[str] = field(default_factory=list)  # blob digests now in the cache
    bytes_received: int = 0
    resumed_from: dict[str, int] = field(default_factory=dict)  # digest -> offset of the first resumed request
    attempts: int = 0


def full_jitter_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """AWS "full jitter": uniform in [0, min(max, base * 2**attempt)]; ``attempt`` counts from 1."""
    return rng.uniform(0.0, min(max_s, base_s * (2 ** max(0, attempt - 1))))


ChunkHook = Callable[[str, int], None]
"""Called with (blob digest, bytes in the partial file) after each chunk is written."""


class Downloader:
    def __init__(
        self,
        client: ControlPlaneClient,
        cache: DirectoryBlobStore,
        partial_dir: Path,
        config: DownloadConfig | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        disk_free: Callable[[Path], int] | None = None,
        on_chunk: ChunkHook | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.partial_dir = partial_dir
        self.config = config or DownloadConfig()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._disk_free = disk_free or (lambda path: shutil.disk_usage(path).free)
        self._on_chunk = on_chunk
        self._lock = threading.Lock()

    def _partial(self, digest: str) -> Path:
        return self.partial_dir / (digest.removeprefix("sha256:") + ".partial")

    def _etag_file(self, digest: str) -> Path:
        return self.partial_dir / (digest.removeprefix("sha256:") + ".etag")

    def _discard(self, digest: str) -> None:
        for path in (self._partial(digest), self._etag_file(digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def check_disk(self, wants: list[BlobWant]) -> None:
        needed = 0
        for want in wants:
            partial = self._partial(want.digest)
            have = partial.stat().st_size if partial.exists() else 0
            needed += max(0, want.size - have)
        free = self._disk_free(self.partial_dir)
        if free < needed + self.config.disk_margin_bytes:
            raise UnavailableError(
                f"not enough free disk in {self.partial_dir}: the download needs {needed} bytes plus a margin of "
                f"{self.config.disk_margin_bytes}, but only {free} are free; free some space (old slots, other files)"
            )

    def fetch(self, wants: list[BlobWant]) -> DownloadReport:
        """Bring every wanted blob into the cache, or raise after the retries or the deadline ran out."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        missing = [w for w in {w.digest: w for w in wants}.values() if not self.cache.has(w.digest)]
        report = DownloadReport()
        if not missing:
            return report
        self.check_disk(missing)
        deadline = self._clock() + self.config.deadline_s
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=max(1, self.config.max_parallel), thread_name_prefix="download") as pool:
            futures = [pool.submit(self._fetch_one, want, deadline, report) for want in missing]
            for future in futures:
                exc = future.exception()
                if exc is not None:
                    errors.append(exc)
        if errors:
            raise errors[0]
        return report

    def _fetch_one(self, want: BlobWant, deadline: float, report: DownloadReport) -> None:
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                report.attempts += 1
            try:
                self._attempt(want, deadline, report)
            except (UnavailableError, IntegrityError):
                now = self._clock()
                if attempt >= self.config.max_attempts or now >= deadline:
                    raise
                delay = full_jitter_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, self._rng)
                self._sleep(min(delay, max(0.0, deadline - now)))
                continue
            with self._lock:
                report.fetched.append(want.digest)
            return

    def _attempt(self, want: BlobWant, deadline: float, report: DownloadReport) -> None:
        digest = want.digest
        if self.cache.has(digest):
            self._discard(digest)
            return
        partial, etag_file = self._partial(digest), self._etag_file(digest)
        offset = partial.stat().st_size if partial.exists() else 0
        etag = etag_file.read_text().strip() if etag_file.exists() else None
        if offset > want.size or (offset > 0 and not etag):
            self._discard(digest)  # longer than the blob, or bytes we cannot prove are one file: start over
            offset, etag = 0, None
        if offset < want.size or want.size == 0:
            offset = self._receive(want, offset, etag, deadline, report)
        if offset != want.size:
            raise UnavailableError(f"blob {digest} ended after {offset} of {want.size} bytes; resuming later")
        try:
            self.cache.put_file(partial, expected_digest=digest)
        except IntegrityError:
            self._discard(digest)
            raise
        self._discard(digest)

    def _receive(self, want: BlobWant, offset: int, etag: str | None, deadline: float, report: DownloadReport) -> int:
        digest = want.digest
        partial, etag_file = self._partial(digest), self._etag_file(digest)
        with self.client.blob(digest, offset, etag) as response:
            if response.status_code == 416:
                self._discard(digest)
                raise UnavailableError(f"the server refused the range {offset}- of blob {digest}; starting over")
            if response.status_code == 206 and offset > 0:
                start = _content_range_start(response.headers.get("Content-Range", ""))
                if start != offset or (etag and response.headers.get("ETag", etag) != etag):
                    self._discard(digest)
                    raise UnavailableError(f"the server answered a resume of blob {digest} inconsistently; restarting")
                with self._lock:
                    report.resumed_from.setdefault(digest, offset)
                mode = "ab"
            elif response.status_code == 200:
                offset, mode = 0, "wb"  # a full body: the file changed or the server ignores ranges; never splice
                new_etag = response.headers.get("ETag")
                if new_etag:
                    etag_file.write_text(new_etag)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        etag_file.unlink()
            else:
                raise UnavailableError(f"unexpected HTTP {response.status_code} for blob {digest}; retrying")
            with partial.open(mode) as out:
                for chunk in response.iter_bytes():  # as received: a cut connection loses no byte it delivered
                    if offset + len(chunk) > want.size:
                        out.close()
                        self._discard(digest)
                        raise IntegrityError(
                            f"blob {digest} is longer than the {want.size} bytes its manifest says; refused"
                        )
                    out.write(chunk)
                    out.flush()
                    offset += len(chunk)
                    with self._lock:
                        report.bytes_received += len(chunk)
                    if self._on_chunk is not None:
                        self._on_chunk(digest, offset)
                    if self._clock() >= deadline:
                        raise UnavailableError(f"the download deadline passed while fetching blob {digest}")
        return offset


def _content_range_start(value: str) -> int | None:
    # "bytes 100-999/1000"
    unit, _, rest = value.partition(" ")
    if unit != "bytes":
        return None
    first, _, _ = rest.partition("-")
    try:
        return int(first)
    except ValueError:
        return None
