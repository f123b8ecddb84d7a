"""Content-addressed blobs in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, moto's server).

A blob lives under the key ``<prefix>sha256/<hex>``, the same name the directory store gives its file, and obeys
the same rule: absent, or complete and correct. Bytes stream through sha256 while they upload. A blob smaller
than one part is held in memory and PUT only once its digest matched; a larger one goes up as a multipart upload
straight to its final key, which S3 makes visible only at ``CompleteMultipartUpload`` — sent after the digest
matched, aborted otherwise. A writer killed half-way leaves an incomplete multipart upload that nobody can read
and :meth:`S3BlobStore.sweep_temporary` aborts. When the caller does not know the digest yet, the stream is first
spooled to a local temporary file (the key is the digest, so it must be known before the first part goes up).

Reads are HEAD (has, size, modified_at), a streamed GET (open, verify) and presigned GET URLs, which the control
plane hands to agents so that it serves no model bytes itself. Code that needs a local file (a runtime loading a
GGUF) gets a verified copy from a read-through cache (:meth:`S3BlobStore.local_path`).

Every botocore failure becomes an :class:`~slmops.errors.SLMOpsError` that says what to do: a missing bucket or
refused credentials are a :class:`~slmops.errors.ConfigError`, an endpoint that cannot be reached an
:class:`~slmops.errors.UnavailableError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from slmops.errors import ConfigError, IntegrityError, MissingExtraError, NotFoundError, SLMOpsError, UnavailableError
from slmops.registry.blobstore import CHUNK_BYTES, BlobRef, DirectoryBlobStore, Progress, _hex, hash_file

if TYPE_CHECKING:
    from slmops.config import Settings

__all__ = ["S3BlobStore", "S3Config", "parse_s3_url"]

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "403",
}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix/"); the prefix is empty or ends with a slash."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not url.startswith("s3://") or not _BUCKET_RE.match(bucket):
        raise ConfigError(
            f"SLMOPS_BLOB_URL is {url!r}; expected s3://BUCKET or s3://BUCKET/PREFIX with a bucket name of 3-63 "
            "lower-case letters, digits, dots and hyphens"
        )
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""  # empty, or ends with "/"
    endpoint_url: str | None = None  # None: AWS
    presign_endpoint_url: str | None = None  # the endpoint devices reach, when it differs from endpoint_url
    region: str | None = None
    access_key_id: str | None = None  # None (both): boto3's chain (AWS_* variables, profiles, instance roles)
    secret_access_key: str | None = None
    addressing_style: str | None = None  # "auto" | "path" | "virtual"; None: path with an endpoint URL
    part_bytes: int = 16 << 20
    max_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def where(self) -> str:
        return f"{self.url} at {self.endpoint_url or 'AWS'}"


class _Body(io.RawIOBase):
    """A botocore streaming body as a raw file whose read errors are SLMOps errors."""

    def __init__(self, body: Any, store: S3BlobStore, what: str) -> None:
        self._body = body
        self._store = store
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._store._errors(self._what):
            data: bytes = self._body.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def _read_full(stream: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes; shorter only at the end of the stream."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(min(left, CHUNK_BYTES))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class S3BlobStore:
    """Blobs as objects ``<prefix>sha256/<hex>`` in one bucket; local copies in ``cache_dir``."""

    def __init__(self, config: S3Config, cache_dir: Path) -> None:
        self.config = config
        self.root = cache_dir
        self.cache = DirectoryBlobStore(cache_dir)
        self._client: Any = None
        self._presigner: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        bucket, prefix = parse_s3_url(settings.blob_url or "")
        secret = settings.s3_secret_access_key
        if (settings.s3_access_key_id is None) != (secret is None):
            raise ConfigError(
                "only one of SLMOPS_S3_ACCESS_KEY_ID and SLMOPS_S3_SECRET_ACCESS_KEY is set; set both, or neither "
                "to use boto3's credential chain (AWS_* variables, ~/.aws profiles, instance roles)"
            )
        config = S3Config(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=settings.s3_endpoint_url,
            presign_endpoint_url=settings.s3_presign_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            addressing_style=settings.s3_addressing_style,
            part_bytes=settings.s3_part_bytes,
            max_attempts=settings.s3_max_attempts,
            connect_timeout_s=settings.s3_connect_timeout_s,
            read_timeout_s=settings.s3_read_timeout_s,
        )
        return cls(config, settings.blob_cache_dir)

    # ------------------------------------------------------------------ connection and errors

    def _connect(self, endpoint_url: str | None) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise MissingExtraError("s3", "the S3 blob store (SLMOPS_BLOB_URL=s3://...)", "boto3") from None
        cfg = self.config
        style = cfg.addressing_style or ("path" if cfg.endpoint_url else "auto")
        region = cfg.region or ("us-east-1" if cfg.endpoint_url else None)
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": style},
            retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            max_pool_connections=16,
        )
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            config=config,
        )

    @property
    def _s3(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect(self.config.endpoint_url)
        return self._client

    def _translate(self, exc: Exception, what: str) -> SLMOpsError | None:
        """The SLMOps error for a botocore failure, or None when ``exc`` is not one."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        cfg = self.config
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = f"{code} {error.get('Message', '')}".strip()
            if code == "NoSuchBucket":
                return ConfigError(
                    f"the bucket {cfg.bucket!r} does not exist at {cfg.endpoint_url or 'AWS'} ({what}); create it "
                    f"(`aws s3 mb s3://{cfg.bucket}` or `mc mb ALIAS/{cfg.bucket}`) or fix SLMOPS_BLOB_URL"
                )
            if code in _CREDENTIAL_CODES or status == 403:
                return ConfigError(
                    f"object storage {cfg.where} refused the credentials for {what} ({detail or status}); check "
                    "SLMOPS_S3_ACCESS_KEY_ID / SLMOPS_S3_SECRET_ACCESS_KEY (or the AWS_* variables) and the "
                    "bucket policy"
                )
            if code in _BUSY_CODES or status >= 500:
                return UnavailableError(f"object storage {cfg.where} failed {what} ({detail}); retry later")
            return SLMOpsError(f"object storage {cfg.where} rejected {what}: {detail or status}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ConfigError(
                f"no credentials for object storage {cfg.where} ({what}); set SLMOPS_S3_ACCESS_KEY_ID and "
                "SLMOPS_S3_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
            return UnavailableError(
                f"cannot reach object storage {cfg.where} for {what} ({type(exc).__name__}); check that it runs "
                "and that SLMOPS_S3_ENDPOINT_URL points at it; retry later"
            )
        if isinstance(exc, BotoCoreError):
            return SLMOpsError(f"object storage {cfg.where} failed {what}: {exc}")
        return None

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            translated = self._translate(exc, what)
            if translated is None:
                raise
            raise translated from exc

    def _key(self, digest: str) -> str:
        return f"{self.config.prefix}sha256/{_hex(digest)}"

    def _head(self, digest: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        key = self._key(digest)
        with self._errors(f"looking up blob {digest}"):
            try:
                answer: dict[str, Any] = self._s3.head_object(Bucket=self.config.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return answer

    def _require(self, digest: str) -> dict[str, Any]:
        head = self._head(digest)
        if head is None:
            raise NotFoundError(f"blob {digest} is not in {self.config.url}")
        return head

    # ------------------------------------------------------------------ the BlobStore interface

    def initialize(self) -> None:
        """Check that the bucket exists and the credentials may use it; create the local cache directory."""
        from botocore.exceptions import ClientError

        self.cache.initialize()
        cfg = self.config
        with self._errors(f"opening the blob store {cfg.url}"):
            try:
                self._s3.head_bucket(Bucket=cfg.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    raise ConfigError(
                        f"the bucket {cfg.bucket!r} does not exist at {cfg.endpoint_url or 'AWS'}; create it "
                        f"(`aws s3 mb s3://{cfg.bucket}` or `mc mb ALIAS/{cfg.bucket}`) or fix SLMOPS_BLOB_URL"
                    ) from None
                raise

    def has(self, digest: str) -> bool:
        return self._head(digest) is not None

    def size(self, digest: str) -> int:
        return int(self._require(digest)["ContentLength"])

    def modified_at(self, digest: str) -> float:
        return float(self._require(digest)["LastModified"].timestamp())

    def open(self, digest: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        what = f"reading blob {digest}"
        with self._errors(what):
            try:
                answer = self._s3.get_object(Bucket=self.config.bucket, Key=self._key(digest))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    raise NotFoundError(f"blob {digest} is not in {self.config.url}") from None
                raise
        return cast(BinaryIO, io.BufferedReader(_Body(answer["Body"], self, what), CHUNK_BYTES))

    def put_file(self, path: Path, expected_digest: str | None = None, progress: Progress | None = None) -> BlobRef:
        digest = expected_digest if expected_digest is not None else hash_file(path).digest
        if self.has(digest):
            # Already stored; the stored copy was verified when it was written.
            if progress is not None:
                progress(path.stat().st_size)
            return BlobRef(digest, self.size(digest))
        with path.open("rb") as handle:
            return self._upload(handle, digest, progress)

    def put_stream(
        self, stream: IO[bytes], expected_digest: str | None = None, progress: Progress | None = None
    ) -> BlobRef:
        if expected_digest is not None:
            _hex(expected_digest)
            return self._upload(stream, expected_digest, progress)
        self.cache.initialize()
        with tempfile.TemporaryFile(prefix=".spool-", dir=self.root) as spool:
            hasher = hashlib.sha256()
            while chunk := stream.read(CHUNK_BYTES):
                hasher.update(chunk)
                spool.write(chunk)
            spool.seek(0)
            return self._upload(cast(IO[bytes], spool), "sha256:" + hasher.hexdigest(), progress)

    def _check(self, expected: str, hasher: Any, size: int) -> None:
        digest = "sha256:" + hasher.hexdigest()
        if digest != expected:
            raise IntegrityError(
                f"blob content does not match its name: expected {expected}, got {digest} ({size} bytes); the "
                "source is corrupt or was changed, nothing was stored"
            )

    def _upload(self, stream: IO[bytes], digest: str, progress: Progress | None) -> BlobRef:
        cfg, key, what = self.config, self._key(digest), f"storing blob {digest}"
        hasher = hashlib.sha256()
        chunk = _read_full(stream, cfg.part_bytes)
        hasher.update(chunk)
        size = len(chunk)
        if len(chunk) < cfg.part_bytes:  # one part: verify in memory, then PUT
            self._check(digest, hasher, size)
            with self._errors(what):
                self._s3.put_object(Bucket=cfg.bucket, Key=key, Body=chunk, ContentType="application/octet-stream")
            if progress is not None:
                progress(size)
            return BlobRef(digest, size)
        with self._errors(what):
            upload_id = self._s3.create_multipart_upload(
                Bucket=cfg.bucket, Key=key, ContentType="application/octet-stream"
            )["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            while chunk:
                number = len(parts) + 1
                with self._errors(f"{what} (part {number})"):
                    answer = self._s3.upload_part(
                        Bucket=cfg.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                if progress is not None:
                    progress(len(chunk))
                chunk = _read_full(stream, cfg.part_bytes)
                hasher.update(chunk)
                size += len(chunk)
            self._check(digest, hasher, size)  # nothing is visible under the key until this passed
            with self._errors(what):
                self._s3.complete_multipart_upload(
                    Bucket=cfg.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(Bucket=cfg.bucket, Key=key, UploadId=upload_id)
            raise
        return BlobRef(digest, size)

    def delete(self, digest: str) -> None:
        with self._errors(f"deleting blob {digest}"):
            self._s3.delete_object(Bucket=self.config.bucket, Key=self._key(digest))
        self.cache.delete(digest)

    def digests(self) -> Iterator[str]:
        cfg = self.config
        start = f"{cfg.prefix}sha256/"
        with self._errors(f"listing the blobs of {cfg.url}"):
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    name = str(item["Key"]).removeprefix(start)
                    if _HEX_RE.match(name):
                        yield "sha256:" + name

    def verify(self, digest: str, progress: Progress | None = None) -> BlobRef:
        hasher = hashlib.sha256()
        size = 0
        with self.open(digest) as handle:
            while chunk := handle.read(CHUNK_BYTES):
                hasher.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        return BlobRef("sha256:" + hasher.hexdigest(), size)

    def sweep_temporary(self, older_than_s: float, now: float | None = None) -> int:
        """Abort multipart uploads under the prefix whose last part is older than ``older_than_s``."""
        import time

        cfg = self.config
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = self.cache.sweep_temporary(older_than_s, now)
        with self._errors(f"sweeping unfinished uploads of {cfg.url}"):
            pages = self._s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=cfg.bucket, Prefix=f"{cfg.prefix}sha256/"
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    key, upload_id = upload["Key"], upload["UploadId"]
                    last = upload["Initiated"].timestamp()
                    parts = self._s3.list_parts(Bucket=cfg.bucket, Key=key, UploadId=upload_id).get("Parts", [])
                    last = max([last, *(part["LastModified"].timestamp() for part in parts)])
                    if last <= cutoff:
                        self._s3.abort_multipart_upload(Bucket=cfg.bucket, Key=key, UploadId=upload_id)
                        removed += 1
        return removed

    def local_path(self, digest: str) -> Path:
        """A verified local copy (read-through cache under ``root``), fetched on first use."""
        if not self.cache.has(digest):
            self.cache.initialize()
            with self.open(digest) as handle:
                self.cache.put_stream(handle, expected_digest=digest)
        return self.cache.path(digest)

    def presigned_url(self, digest: str, expires_s: int) -> str:
        """A GET URL for the blob, signed for ``expires_s`` seconds (no request is sent to make it)."""
        if self._presigner is None:
            endpoint = self.config.presign_endpoint_url
            self._presigner = self._connect(endpoint) if endpoint else self._s3
        with self._errors(f"signing a download URL for blob {digest}"):
            url: str = self._presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.config.bucket, "Key": self._key(digest)}, ExpiresIn=expires_s
            )
        return url
