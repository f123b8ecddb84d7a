"""Settings read from ``SLMOPS_`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Where slmops keeps its state on this machine.

    ``SLMOPS_HOME`` holds the registry database (a SQLite file), the blob directory and the signing keys.
    ``SLMOPS_DATABASE_URL`` points the registry at another database (PostgreSQL at scale).
    """

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", frozen=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".slmops")
    database_url: str | None = None

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
    def key_dir(self) -> Path:
        return self.resolved_home / "keys"
