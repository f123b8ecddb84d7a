"""The device's local feedback store: completions, their ratings, and the upload queue (one SQLite file).

Every completion the local API answers is recorded under its id, so a rating can name it later. What is kept
depends on the policy in effect when the completion was made (:class:`~slmops.runtime.policy.PolicySnapshot`):

- feedback text allowed (the blueprint's ``spec.feedback.mode`` is ``opt_in`` *and* the site opted in): the id,
  the version digest, the prompt messages (the site's system prompt left out), the answer and the time;
- otherwise: the id, the version digest and the time, nothing else. A rating of such a completion keeps its
  ``rating`` and ``score`` (counted per version) but never the text of a correction.

Rows live ``retention_days`` (the blueprint's) from the completion and the store holds at most ``max_rows`` of
them; expired and surplus rows (the oldest first) are deleted at every insert and by :meth:`FeedbackStore.purge`.
A completion is rated at most once: a second rating is refused (:class:`~slmops.errors.ConflictError`, HTTP 409),
so a retried or repeated click never counts twice.

The upload queue holds :class:`~slmops.core.feedback.FeedbackSample` values, already redacted, until the control
plane acknowledges their ids; it survives restarts, is bounded (``max_queued``, oldest dropped first) and counts
how many samples were queued per UTC day, for the blueprint's ``max_samples_per_day``. Which samples go in is the
agent's decision (:mod:`slmops.agent.feedback`); this module only keeps them.

The file is opened explicitly (:meth:`FeedbackStore.open`), in WAL mode, and shared by the local API's worker
threads and the agent's loop behind one lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from slmops.core.feedback import FeedbackSample
from slmops.errors import ConflictError, NotFoundError

__all__ = [
    "FeedbackStore",
    "FeedbackStoreConfig",
    "RatedCompletion",
    "RatingCounts",
    "UploadDecision",
    "rfc3339",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY, version_digest TEXT, created REAL NOT NULL, expires REAL NOT NULL,
    messages TEXT, answer TEXT,                          -- NULL unless feedback text was allowed
    rating TEXT, score REAL, correction TEXT, rated REAL -- NULL until rated
);
CREATE INDEX IF NOT EXISTS completions_expires ON completions (expires);
CREATE INDEX IF NOT EXISTS completions_created ON completions (created);
CREATE TABLE IF NOT EXISTS uploads (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                    body TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def rfc3339(moment: float) -> str:
    """A UNIX time as RFC 3339 in UTC (``2026-12-03T12:00:00.123456Z``)."""
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class FeedbackStoreConfig:
    max_rows: int = 20_000  # completions kept (rated or not); the oldest go first
    max_queued: int = 2_000  # samples waiting for upload; the oldest go first


@dataclass(frozen=True)
class RatedCompletion:
    """A completion and the rating just stored for it. ``messages`` and ``answer`` are None when no text was kept."""

    completion_id: str
    version_digest: str | None
    created: float
    rated: float
    rating: Literal["up", "down"] | None
    score: float | None
    correction: str | None
    messages: list[dict[str, str]] | None
    answer: str | None

    @property
    def has_text(self) -> bool:
        return self.messages is not None and self.answer is not None


@dataclass(frozen=True)
class UploadDecision:
    """What happens to a rating beyond the local store: queued for upload or not, and why."""

    queued: bool
    reason: str


@dataclass(frozen=True)
class RatingCounts:
    up: int = 0
    down: int = 0
    scored: int = 0
    score_sum: float = 0.0


class FeedbackStore:
    def __init__(
        self, path: Path, config: FeedbackStoreConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.config = config or FeedbackStoreConfig()
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------------------- lifecycle

    def open(self) -> Self:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a power cut may lose the last completions, never
        db.executescript(_SCHEMA)  # corrupt the file; the upload queue commits with FULL (see _transaction)
        self._db = db
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            if db is None:
                raise RuntimeError("FeedbackStore.open() was not called")
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                if durable:
                    db.execute("PRAGMA synchronous=NORMAL")

    # ----------------------------------------------------------------------------------------------- completions

    def record(
        self,
        completion_id: str,
        version_digest: str | None,
        *,
        retention_days: float,
        messages: list[dict[str, str]] | None = None,
        answer: str | None = None,
    ) -> None:
        """Keep a completion for ``retention_days``: with its text only when ``messages`` and ``answer`` are given
        (the caller passes them only when feedback text is allowed)."""
        now = self.clock()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO completions (id, version_digest, created, expires, messages, answer) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    completion_id,
                    version_digest,
                    now,
                    now + retention_days * 86400.0,
                    None if messages is None else json.dumps(messages, ensure_ascii=False),
                    answer if messages is not None else None,
                ),
            )
            self._purge(db, now)

    def _purge(self, db: sqlite3.Connection, now: float) -> int:
        removed = int(db.execute("DELETE FROM completions WHERE expires <= ?", (now,)).rowcount)
        (count,) = db.execute("SELECT COUNT(*) FROM completions").fetchone()
        surplus = int(count) - self.config.max_rows
        if surplus > 0:
            removed += int(
                db.execute(
                    "DELETE FROM completions WHERE id IN (SELECT id FROM completions ORDER BY created LIMIT ?)",
                    (surplus,),
                ).rowcount
            )
        return removed

    def purge(self) -> int:
        """Delete expired completions and those beyond ``max_rows``; returns how many went."""
        with self._transaction() as db:
            return self._purge(db, self.clock())

    def rate(
        self,
        completion_id: str,
        *,
        rating: Literal["up", "down"] | None = None,
        score: float | None = None,
        correction: str | None = None,
    ) -> RatedCompletion:
        """Store the rating of a kept completion. A correction's text is kept only when the completion's text was.

        Raises :class:`~slmops.errors.NotFoundError` for an unknown or expired id and
        :class:`~slmops.errors.ConflictError` when the completion is already rated."""
        now = self.clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT version_digest, created, messages, answer, rated FROM completions WHERE id = ? AND expires > ?",
                (completion_id, now),
            ).fetchone()
            if row is None:
                raise NotFoundError(
                    f"no completion '{completion_id}' on this device: it is unknown or older than the blueprint's "
                    "retention; rate a completion by the id its answer carried"
                )
            digest, created, messages_json, answer, rated = row
            if rated is not None:
                raise ConflictError(
                    f"completion '{completion_id}' was already rated at {rfc3339(rated)}; a completion is rated once"
                )
            messages = None if messages_json is None else json.loads(messages_json)
            kept_correction = correction if messages is not None else None
            db.execute(
                "UPDATE completions SET rating = ?, score = ?, correction = ?, rated = ? WHERE id = ?",
                (rating, score, kept_correction, now, completion_id),
            )
        return RatedCompletion(
            completion_id=completion_id,
            version_digest=digest,
            created=float(created),
            rated=now,
            rating=rating,
            score=score,
            correction=kept_correction,
            messages=messages,
            answer=answer,
        )

    def has_text(self, completion_id: str) -> bool | None:
        """Whether the completion's text is kept (None: no such completion)."""
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT messages IS NOT NULL FROM completions WHERE id = ?", (completion_id,))
                .fetchone()
            )
        return None if row is None else bool(row[0])

    def counts(self) -> dict[str | None, RatingCounts]:
        """Ratings of the kept completions per version digest (numbers only)."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT version_digest, SUM(rating = 'up'), SUM(rating = 'down'), COUNT(score), "
                    "COALESCE(SUM(score), 0) FROM completions WHERE rated IS NOT NULL GROUP BY version_digest"
                )
                .fetchall()
            )
        return {row[0]: RatingCounts(int(row[1] or 0), int(row[2] or 0), int(row[3]), float(row[4])) for row in rows}

    def size(self) -> int:
        with self._lock:
            (count,) = self._connection().execute("SELECT COUNT(*) FROM completions").fetchone()
        return int(count)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("FeedbackStore.open() was not called")
        return self._db

    # ----------------------------------------------------------------------------------------------- upload queue

    def queue(self, sample: FeedbackSample, *, day: str, daily_cap: int) -> bool:
        """Queue a (redacted) sample unless ``daily_cap`` samples were already queued on ``day`` (UTC
        ``YYYY-MM-DD``); returns whether it was queued. Counting and queueing are one transaction."""
        key = f"queued:{day}"
        body = sample.model_dump_json()
        with self._transaction(durable=True) as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            today = int(row[0]) if row else 0
            if today >= daily_cap:
                return False
            db.execute("INSERT OR IGNORE INTO uploads (id, body, size) VALUES (?, ?, ?)", (sample.id, body, len(body)))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(today + 1)))
            db.execute("DELETE FROM meta WHERE key LIKE 'queued:%' AND key < ?", (f"queued:{day}",))
            (count,) = db.execute("SELECT COUNT(*) FROM uploads").fetchone()
            if int(count) > self.config.max_queued:
                db.execute(
                    "DELETE FROM uploads WHERE seq IN (SELECT seq FROM uploads ORDER BY seq LIMIT ?)",
                    (int(count) - self.config.max_queued,),
                )
        return True

    def queued_on(self, day: str) -> int:
        with self._lock:
            row = self._connection().execute("SELECT value FROM meta WHERE key = ?", (f"queued:{day}",)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, limit: int) -> list[FeedbackSample]:
        """The oldest queued samples, at most ``limit``."""
        with self._lock:
            rows = self._connection().execute("SELECT body FROM uploads ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [FeedbackSample.model_validate_json(row[0]) for row in rows]

    def acknowledge(self, ids: list[str]) -> int:
        """Drop these samples from the queue; returns how many went."""
        removed = 0
        with self._transaction(durable=True) as db:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                removed += int(db.execute(f"DELETE FROM uploads WHERE id IN ({marks})", chunk).rowcount)
        return removed

    def clear_queue(self) -> int:
        """Drop every queued sample (consent withdrawn); returns how many went."""
        with self._transaction(durable=True) as db:
            return int(db.execute("DELETE FROM uploads").rowcount)

    def queued(self) -> int:
        with self._lock:
            (count,) = self._connection().execute("SELECT COUNT(*) FROM uploads").fetchone()
        return int(count)

    def debug_row(self, completion_id: str) -> dict[str, Any] | None:
        """The stored columns of one completion (for tests and `slmops agent status`)."""
        with self._lock:
            cursor = self._connection().execute("SELECT * FROM completions WHERE id = ?", (completion_id,))
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        return None if row is None else dict(zip(names, row, strict=True))
