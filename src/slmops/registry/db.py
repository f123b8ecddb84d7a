"""Registry tables (SQLAlchemy 2) and the engine set-up; the schema itself is created by Alembic migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Engine,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["AliasRow", "Base", "FileRow", "ParentRow", "VersionRow", "make_engine", "migrate"]

_MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    pass


class VersionRow(Base):
    __tablename__ = "model_versions"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    label: Mapped[str] = mapped_column(String(16))
    number: Mapped[int] = mapped_column()
    variant: Mapped[str | None] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(16))
    content_key: Mapped[str] = mapped_column(String(71))
    total_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[str] = mapped_column(String(40))
    envelope: Mapped[str] = mapped_column(Text)  # SignedManifest as canonical JSON

    __table_args__ = (
        UniqueConstraint("name", "label", name="uq_version_label"),
        UniqueConstraint("name", "content_key", name="uq_version_content"),
    )


class FileRow(Base):
    __tablename__ = "version_files"

    version_digest: Mapped[str] = mapped_column(
        String(71), ForeignKey("model_versions.digest", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    blob_digest: Mapped[str] = mapped_column(String(71))
    size: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_version_files_blob", "blob_digest"),)


class ParentRow(Base):
    __tablename__ = "version_parents"

    child_digest: Mapped[str] = mapped_column(
        String(71), ForeignKey("model_versions.digest", ondelete="CASCADE"), primary_key=True
    )
    parent_digest: Mapped[str] = mapped_column(String(71), primary_key=True)

    __table_args__ = (Index("ix_version_parents_parent", "parent_digest"),)


class AliasRow(Base):
    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_digest: Mapped[str] = mapped_column(String(71), ForeignKey("model_versions.digest"))
    updated_at: Mapped[str] = mapped_column(String(40))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for the registry database; SQLite gets WAL, durable commits and foreign keys."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
