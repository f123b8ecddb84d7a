"""Named leases in the database: of several server replicas, only the one holding a lease runs its singleton job
(the rollout controller holds ``rollout-controller``).

A lease is taken or renewed for ``ttl_s`` seconds; a holder that stops renewing (it died, hangs, or lost the
database) loses it when it expires, and handing it back makes it expire at once. A holder can be late: it may still
be working on a decision when its lease has passed to another replica. Its writes are therefore fenced: the
conditional UPDATE that records a decision also requires :func:`holds` (the lease still held, unexpired, by the
writer) in the same statement, so a replica that lost the lease cannot write what the new holder decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Engine, case, exists, update
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.control.db import LeaseRow

__all__ = ["Lease", "acquire_lease", "current_lease", "holds", "release_lease"]


@dataclass(frozen=True)
class Lease:
    """Who holds a lease, since when and until when (epoch seconds)."""

    name: str
    holder: str
    acquired_at: float
    expires_at: float


def acquire_lease(engine: Engine, name: str, holder: str, ttl_s: float, now: float) -> bool:
    """Take or renew the lease ``name`` for ``ttl_s``; True when ``holder`` holds it afterwards.

    One conditional UPDATE (held by us, or expired) then, if no row exists yet, one INSERT: atomic on SQLite and
    PostgreSQL alike, so two replicas never both believe they hold it. ``acquired_at`` is when the current holder
    took it (a renewal keeps it, a takeover sets it).
    """
    with Session(engine) as session:
        result = session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at < now))
            .values(
                holder=holder,
                expires_at=now + ttl_s,
                acquired_at=case((LeaseRow.holder == holder, LeaseRow.acquired_at), else_=now),
            )
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


def current_lease(engine: Engine, name: str) -> Lease | None:
    """The lease row as it is (possibly expired: compare ``expires_at`` with the time), or None if never taken."""
    with Session(engine) as session:
        row = session.get(LeaseRow, name)
        return None if row is None else Lease(row.name, row.holder, row.acquired_at, row.expires_at)


def holds(name: str, holder: str, now: float) -> ColumnElement[bool]:
    """A SQL condition, true while ``holder`` holds the lease ``name`` unexpired at ``now``: add it to the WHERE of
    a write that only the holder may make (the fence)."""
    return exists().where(LeaseRow.name == name, LeaseRow.holder == holder, LeaseRow.expires_at >= now)
