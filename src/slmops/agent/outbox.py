"""A bounded, on-disk store-and-forward buffer of device events (SQLite).

Events wait here until the control plane's :class:`~slmops.core.wire.StatusAck` names their ids; only those are
deleted, so a lost acknowledgement means a resend that the server de-duplicates by id, never a lost event. The buffer
is bounded by count and by bytes: the oldest events are dropped first and counted, and the count travels as one
``events_dropped`` event with a stable id until it is acknowledged.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from slmops.core.wire import MAX_EVENTS_PER_REPORT, MAX_WINDOWS_PER_BATCH, DeviceEvent, TelemetryWindow

__all__ = ["Outbox", "OutboxConfig", "TelemetryOutbox", "TelemetryOutboxConfig", "new_event"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                   body TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def new_event(
    kind: str, version_digest: str | None = None, detail: dict[str, Any] | None = None, now: datetime | None = None
) -> DeviceEvent:
    """An event with a fresh random id and the current UTC time. ``detail`` holds numbers and reasons only."""
    moment = now or datetime.now(UTC)
    return DeviceEvent(
        id=f"ev-{secrets.token_hex(12)}",
        time=moment.isoformat().replace("+00:00", "Z"),
        kind=kind,
        version_digest=version_digest,
        detail=detail or {},
    )


@dataclass(frozen=True)
class OutboxConfig:
    max_events: int = 10_000
    max_bytes: int = 4 << 20


class _SQLiteBuffer:
    """A durable SQLite file (WAL, synchronous commits) opened explicitly: one table of JSON bodies with unique ids
    and sizes, and a ``meta`` table of keys and values; subclasses name their schema and that table."""

    _schema: str
    _table: str

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self) -> Self:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(self._schema)
        self._db = db
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{type(self).__name__}.open() was not called")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _meta(self, key: str, default: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _delete_ids(self, db: sqlite3.Connection, ids: list[str]) -> int:
        """Delete the rows with these ids (in chunks under SQLite's variable limit); returns how many went."""
        removed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            removed += db.execute(f"DELETE FROM {self._table} WHERE id IN ({marks})", chunk).rowcount
        return removed

    def size(self) -> tuple[int, int]:
        """(rows, bytes) waiting."""
        count, size = self.db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM {self._table}").fetchone()
        return int(count), int(size)

    def dropped(self) -> int:
        """How many of the oldest rows were dropped because the buffer was full (and not yet reported)."""
        return int(self._meta("dropped", "0"))


class Outbox(_SQLiteBuffer):
    _schema = _SCHEMA
    _table = "events"

    def __init__(self, path: Path, config: OutboxConfig | None = None) -> None:
        super().__init__(path)
        self.config = config or OutboxConfig()

    def add(self, event: DeviceEvent) -> None:
        body = event.model_dump_json()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO events (id, body, size) VALUES (?, ?, ?)", (event.id, body, len(body)))
            dropped = 0
            while True:
                count, size = self.size()
                if count <= self.config.max_events and size <= self.config.max_bytes:
                    break
                db.execute("DELETE FROM events WHERE seq = (SELECT MIN(seq) FROM events)")
                dropped += 1
            if dropped:
                self._set_meta("dropped", str(int(self._meta("dropped", "0")) + dropped))
                if self._meta("dropped_id", "") == "":
                    self._set_meta("dropped_id", f"ev-dropped-{secrets.token_hex(10)}")
                    self._set_meta("dropped_since", datetime.now(UTC).isoformat().replace("+00:00", "Z"))

    def pending(self, limit: int = MAX_EVENTS_PER_REPORT) -> list[DeviceEvent]:
        """The oldest events not yet acknowledged, led by the ``events_dropped`` event when some were dropped."""
        events: list[DeviceEvent] = []
        dropped = int(self._meta("dropped", "0"))
        if dropped:
            events.append(
                DeviceEvent(
                    id=self._meta("dropped_id", "ev-dropped"),
                    time=self._meta("dropped_since", datetime.now(UTC).isoformat()),
                    kind="events_dropped",
                    detail={"count": dropped, "reason": "the on-disk event buffer was full"},
                )
            )
        rows = self.db.execute("SELECT body FROM events ORDER BY seq LIMIT ?", (limit - len(events),)).fetchall()
        events.extend(DeviceEvent.model_validate(json.loads(row[0])) for row in rows)
        return events

    def acknowledge(self, ids: list[str]) -> int:
        """Delete the acknowledged events; returns how many were removed."""
        with self._transaction() as db:
            removed = 0
            dropped_id = self._meta("dropped_id", "")
            if dropped_id and dropped_id in ids:
                for key in ("dropped", "dropped_id", "dropped_since"):
                    db.execute("DELETE FROM meta WHERE key = ?", (key,))
                removed += 1
            removed += self._delete_ids(db, ids)
        return removed


_TELEMETRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                    body TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class TelemetryOutboxConfig:
    max_windows: int = 20_000  # two weeks of 60 s windows of one version
    max_bytes: int = 32 << 20


class TelemetryOutbox(_SQLiteBuffer):
    """Telemetry windows waiting for the control plane's :class:`~slmops.core.wire.TelemetryAck`, on disk (SQLite).

    Like :class:`Outbox`: only acknowledged ids are deleted (a lost ack means a resend the server de-duplicates by
    window id), and the buffer is bounded by count and bytes, dropping the oldest windows first and counting them.
    """

    _schema = _TELEMETRY_SCHEMA
    _table = "windows"

    def __init__(self, path: Path, config: TelemetryOutboxConfig | None = None) -> None:
        super().__init__(path)
        self.config = config or TelemetryOutboxConfig()

    def add(self, windows: list[TelemetryWindow]) -> int:
        """Buffer windows (an id already buffered is kept as it was); returns how many old windows were dropped."""
        with self._transaction() as db:
            for window in windows:
                body = window.model_dump_json()
                db.execute(
                    "INSERT OR IGNORE INTO windows (id, body, size) VALUES (?, ?, ?)", (window.id, body, len(body))
                )
            count, size = self.size()
            dropped = 0
            while count > self.config.max_windows or size > self.config.max_bytes:
                seq, gone = db.execute("SELECT seq, size FROM windows ORDER BY seq LIMIT 1").fetchone()
                db.execute("DELETE FROM windows WHERE seq = ?", (seq,))
                count, size, dropped = count - 1, size - gone, dropped + 1
            if dropped:
                self._set_meta("dropped", str(int(self._meta("dropped", "0")) + dropped))
        return dropped

    def pending(self, limit: int = MAX_WINDOWS_PER_BATCH) -> list[TelemetryWindow]:
        rows = self.db.execute("SELECT body FROM windows ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [TelemetryWindow.model_validate_json(row[0]) for row in rows]

    def acknowledge(self, ids: list[str]) -> int:
        """Delete the acknowledged windows; returns how many were removed."""
        with self._transaction() as db:
            return self._delete_ids(db, ids)
