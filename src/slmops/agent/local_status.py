"""What ``slmops agent status`` shows: the agent's data directory read without taking its lock."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from slmops.agent.identity import IdentityStore
from slmops.agent.outbox import Outbox
from slmops.agent.slots import Slots
from slmops.agent.state import DataDir, StateStore
from slmops.errors import ConfigError, SLMOpsError
from slmops.registry.blobstore import DirectoryBlobStore

__all__ = ["local_status"]


def local_status(data_dir: Path) -> dict[str, Any]:
    """What ``slmops agent status`` shows, read without taking the agent's lock."""
    data = DataDir(data_dir)
    if not data.root.is_dir():
        raise ConfigError(f"no agent data directory at {data_dir}; pass --data-dir or start the agent first")
    identity = IdentityStore(data).identity()
    state = StateStore(data.state_file).load()
    slots = Slots(data.slot_dir, DirectoryBlobStore(data.blob_dir))
    events, size = (0, 0)
    if data.outbox_file.exists():
        outbox = Outbox(data.outbox_file).open()
        try:
            events, size = outbox.size()
        finally:
            outbox.close()

    def label(digest: str | None) -> str | None:
        if digest is None:
            return None
        with contextlib.suppress(SLMOpsError):
            manifest = slots.manifest(digest).manifest
            return f"{manifest.name}@{manifest.version}"
        return None

    active, previous = slots.current(), slots.previous()
    return {
        "data_dir": str(data.root),
        "device_id": identity.device_id if identity else None,
        "server": identity.server_url if identity else None,
        "enrollment": identity.state if identity else "not enrolled",
        "active": active,
        "active_version": label(active),
        "previous": previous,
        "previous_version": label(previous),
        "committed": state.committed,
        "phase": state.phase,
        "health": state.health,
        "last_error": state.last_error,
        "desired_generation": state.desired.generation if state.desired else None,
        "failed": state.failed,
        "crash_counts": state.crash_counts,
        "outbox_events": events,
        "outbox_bytes": size,
    }
