"""One unit of work that may meet its own twin: rows written concurrently by another request.

Heartbeats, telemetry batches and enrollments are retried by their senders, so the same rows can arrive twice at
once. The loser's commit (or flush) then hits a unique constraint; looking again in a fresh session finds the rows
the winner stored and answers from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from slmops.errors import ConflictError

__all__ = ["commit_retrying"]

T = TypeVar("T")


def commit_retrying(engine: Engine, work: Callable[[Session], T], *, attempts: int, conflict: str) -> T:
    """Run ``work`` in a new session and commit once; on a unique-constraint conflict start again in a new session,
    at most ``attempts`` times, then raise :class:`ConflictError` with the message ``conflict``."""
    for _attempt in range(attempts):
        with Session(engine) as session:
            try:
                result = work(session)
                session.commit()
            except SQLIntegrityError:
                session.rollback()
                continue
            return result
    raise ConflictError(conflict)
