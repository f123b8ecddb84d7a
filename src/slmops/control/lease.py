"""Named leases in the database: of several server replicas, only the one holding a lease runs its singleton job
(the rollout controller holds ``rollout-controller``).

A lease is taken or renewed for ``ttl_s`` seconds; a holder that stops renewing loses it when it expires, and
handing it back makes it expire at once.
"""

from __future__ import annotations

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control.db import LeaseRow

__all__ = ["acquire_lease", "release_lease"]


def acquire_lease(engine: Engine, name: str, holder: str, ttl_s: float, now: float) -> bool:
    """Take or renew the lease ``name`` for ``ttl_s``; True when ``holder`` holds it afterwards.

    One conditional UPDATE (held by us, or expired) then, if no row exists yet, one INSERT: atomic on SQLite and
    PostgreSQL alike, so two replicas never both believe they hold it.
    """
    with Session(engine) as session:
        result = session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at < now))
            .values(holder=holder, expires_at=now + ttl_s)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) == 1:
            session.commit()
            return True
        if session.get(LeaseRow, name) is not None:
            session.rollback()
            return False
        session.add(LeaseRow(name=name, holder=holder, expires_at=now + ttl_s, acquired_at=now))
        try:
            session.commit()
        except SQLIntegrityError:
            return False
        return True


def release_lease(engine: Engine, name: str, holder: str) -> None:
    """Hand the lease back (it expires now) if ``holder`` holds it."""
    with Session(engine) as session:
        session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == name, LeaseRow.holder == holder)
            .values(expires_at=0.0)
            .execution_options(synchronize_session=False)
        )
        session.commit()
