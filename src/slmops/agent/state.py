"""The agent's data directory and the state it persists there.

Layout (directory mode 0700, secrets and state mode 0600)::

    <data-dir>/
      agent.lock              held (flock) by the one agent that uses this directory
      device.key              the device's ed25519 private key (PKCS#8 PEM)
      identity.json           device id, server URL, enrollment state, trusted manifest keys
      credential              the device credential (bearer token)
      state.json              AgentState, written atomically before and after every step
      outbox.db               SQLite: events not yet accepted by the control plane (bounded)
      blobs/sha256/<hex>      the verified blob cache, shared by all versions
      downloads/<hex>.partial a resumable download, and <hex>.etag the ETag its bytes came with
      slots/<hex>/            one staged version: manifest.json and files/<path> (hard links into the cache)
      slots/current           symlink to the active slot; slots/previous: symlink to the rollback slot
      serving.marker          the version being loaded or served; left behind only by a process that died
      tuning.json             measured serving configurations by (model digest, device fingerprint)
                              (slmops.runtime.tuning)
      tuf/                    TUF metadata (root.json, timestamp.json, ...) once the control plane serves it
                              (slmops.tuf.client)
      feedback.db             SQLite: local completions and ratings, when feedback is on (slmops.feedback.store)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.agent._files import atomic_write, private_dir
from slmops.core.wire import AgentPhase, DesiredState, Health
from slmops.errors import ConfigError, ConflictError

__all__ = ["AgentLock", "AgentState", "DataDir", "ProbeRecord", "StateStore", "default_data_dir"]


def default_data_dir() -> Path:
    from slmops.config import Settings

    return Settings().resolved_home / "agent"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def lock_file(self) -> Path:
        return self.root / "agent.lock"

    @property
    def key_file(self) -> Path:
        return self.root / "device.key"

    @property
    def identity_file(self) -> Path:
        return self.root / "identity.json"

    @property
    def credential_file(self) -> Path:
        return self.root / "credential"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def outbox_file(self) -> Path:
        return self.root / "outbox.db"

    @property
    def telemetry_file(self) -> Path:
        return self.root / "telemetry.db"

    @property
    def blob_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def download_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def slot_dir(self) -> Path:
        return self.root / "slots"

    @property
    def marker_file(self) -> Path:
        return self.root / "serving.marker"

    def initialize(self) -> None:
        try:
            private_dir(self.root)
            for sub in (self.blob_dir, self.download_dir, self.slot_dir):
                sub.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the agent data directory {self.root}: {exc.strerror}; pass a writable --data-dir"
            ) from exc


class AgentLock:
    """An exclusive ``flock`` on ``agent.lock``: two agents never share a data directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise ConflictError(
                f"another agent (pid {owner}) already uses the data directory {self.path.parent}; "
                "stop it or pass another --data-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class ProbeRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    reason: str = ""
    decode_tokens_per_s: float | None = None


class AgentState(BaseModel):
    """Everything the agent must remember across restarts, except what the disk itself says.

    The ``current``/``previous`` symlinks, the slot directories and the blob cache are the truth for what is
    active, staged and cached; this file records decisions and counters.
    """

    model_config = ConfigDict(extra="ignore")

    schema_version: int = 1
    desired: DesiredState | None = None
    etag: str | None = None
    active: str | None = None  # the version this file believes is active (compared with slots/current)
    committed: bool = True
    probation_until: float | None = None  # unix seconds
    switching_from: str | None = None  # set before an atomic switch, cleared after
    switching_to: str | None = None
    verified: list[str] = Field(default_factory=list)
    probes: dict[str, ProbeRecord] = Field(default_factory=dict)
    failed: dict[str, str] = Field(default_factory=dict)
    crash_counts: dict[str, int] = Field(default_factory=dict)
    health_failures: int = 0
    phase: AgentPhase = "starting"
    health: Health = "unknown"
    last_error: str | None = None
    step: str | None = None  # "kind digest" of the step being executed, persisted before it runs
    last_crash_run: str | None = None  # the run id of the last serving marker counted as a crash


class StateStore:
    """``state.json``, read once and rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        try:
            return AgentState.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return AgentState()
        except ValidationError as exc:
            raise ConfigError(
                f"the agent state {self.path} is not valid ({exc.error_count()} problem(s)); "
                "move it away to start from the slots on disk"
            ) from None

    def save(self, state: AgentState) -> None:
        atomic_write(self.path, state.model_dump_json(indent=1).encode("utf-8"))
