"""Settings read from ``SLMOPS_`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Where slmops keeps its state on this machine.

    ``SLMOPS_HOME`` holds the registry database (a SQLite file), the blob directory and the signing keys.
    ``SLMOPS_DATABASE_URL`` points the registry at another database (PostgreSQL at scale).
    ``SLMOPS_BLOB_URL=s3://BUCKET/PREFIX`` keeps the blobs in S3-compatible object storage instead of the blob
    directory (``SLMOPS_S3_ENDPOINT_URL`` for MinIO, Ceph or moto; credentials from ``SLMOPS_S3_ACCESS_KEY_ID`` /
    ``SLMOPS_S3_SECRET_ACCESS_KEY`` or, when those are unset, boto3's usual chain: ``AWS_*`` variables, profiles,
    instance roles). Local copies the S3 store needs (a runtime loading a GGUF file) go to ``blob-cache/``.
    """

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", frozen=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".slmops")
    database_url: str | None = None
    blob_url: str | None = None  # None: the blob directory under home; "s3://bucket/prefix": object storage
    s3_endpoint_url: str | None = None  # None: AWS; e.g. http://127.0.0.1:9000 for MinIO
    s3_presign_endpoint_url: str | None = None  # the endpoint devices reach, if not s3_endpoint_url
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] | None = None  # None: path with an endpoint URL
    s3_part_bytes: int = Field(default=16 << 20, ge=5 << 20, le=5 << 30)  # multipart part size (S3: 5 MiB-5 GiB)
    s3_max_attempts: int = Field(default=3, ge=1)  # botocore's retries of one call, first attempt included
    s3_connect_timeout_s: float = Field(default=5.0, gt=0)
    s3_read_timeout_s: float = Field(default=60.0, gt=0)

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_home / 'registry.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.resolved_home / "blobs"

    @property
    def blob_cache_dir(self) -> Path:
        return self.resolved_home / "blob-cache"

    @property
    def key_dir(self) -> Path:
        return self.resolved_home / "keys"
