"""Registry tables (SQLAlchemy 2) and the engine set-up; the schema itself is created by Alembic migrations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from slmops.errors import ConfigError

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


SQLITE_SYNCHRONOUS = ("NORMAL", "FULL")


def _sqlite_pragmas(synchronous: str) -> Any:
    def apply(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return apply


def make_engine(url: str, synchronous: str | None = None) -> Engine:
    """An engine for the registry database; SQLite gets WAL, foreign keys and ``synchronous`` (from
    ``SLMOPS_SQLITE_SYNCHRONOUS``, default NORMAL).

    In WAL mode, NORMAL never corrupts the database and a committed transaction survives the process being killed;
    only a power loss or OS crash can lose the last transactions before a checkpoint (it skips the fsync per
    commit, which was the largest single cost of a device heartbeat). FULL fsyncs every commit.
    """
    synchronous = (synchronous or os.environ.get("SLMOPS_SQLITE_SYNCHRONOUS") or "NORMAL").upper()
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ConfigError(f"SLMOPS_SQLITE_SYNCHRONOUS must be NORMAL or FULL; got {synchronous!r}")
    is_file = url.startswith("sqlite") and ":memory:" not in url and url.rstrip("/") not in ("sqlite:", "sqlite:/")
    # A pool as large as the server's worker threads (40): connections returned beyond the pool are closed, and
    # opening a SQLite connection (with its pragmas) cost more than the query under load.
    engine = (
        create_engine(url, future=True, pool_size=40, max_overflow=10) if is_file else create_engine(url, future=True)
    )
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(synchronous))
    return engine


def _head_revision() -> str:
    return max(p.name.split("_", 1)[0] for p in (_MIGRATIONS / "versions").glob("[0-9]*_*.py"))


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        value = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(value) if value is not None else None


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a cheap check when it is there already)."""
    if _current_revision(engine) == _head_revision():
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
