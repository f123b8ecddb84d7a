from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import slmops.control.telemetry  # noqa: F401  (control tables, telemetry's and control.db's, share the schema history)
from slmops.registry.db import Base, make_engine, migrate


def test_migrations_create_exactly_the_tables_the_code_declares(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    migrate(engine)
    migrate(engine)  # idempotent

    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()

    assert diff == []
    assert {"model_versions", "version_files", "version_parents", "model_aliases", "alembic_version"} <= tables
    assert mode == "wal"
    engine.dispose()
