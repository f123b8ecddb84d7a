"""Alembic environment: migrations run on the connection the registry hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from slmops.registry.db import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")

if connection is None:  # `alembic` run by hand with sqlalchemy.url set in its config
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set sqlalchemy.url, or run migrations through slmops")
    with create_engine(url).begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()
