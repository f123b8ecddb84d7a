"""What the parts of one agent share: its config, data directory, persisted state, event outbox, model slots,
runtime, identity, control-plane client and clock, with the few actions every part takes (persist the state,
buffer an event, note an error)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from slmops.agent.capabilities import measure_capabilities
from slmops.agent.client import ControlPlaneClient
from slmops.agent.config import AgentConfig
from slmops.agent.identity import IdentityStore
from slmops.agent.outbox import Outbox, new_event
from slmops.agent.runtime import ModelRuntime
from slmops.agent.slots import Slots
from slmops.agent.state import AgentState, DataDir, StateStore
from slmops.core.reconcile import Step
from slmops.core.wire import Capabilities, RuntimeConfig
from slmops.errors import UnavailableError
from slmops.registry.blobstore import DirectoryBlobStore

__all__ = ["AgentContext"]


class AgentContext:
    """One agent's shared parts. ``state`` is replaced by the persisted one at ``Agent.open()``; ``client`` exists
    between ``open()`` and ``close()``."""

    def __init__(
        self,
        config: AgentConfig,
        data: DataDir,
        *,
        runtime: ModelRuntime,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.data = data
        self.runtime = runtime
        self.clock = clock
        self.store = StateStore(data.state_file)
        self.state = AgentState()
        self.outbox = Outbox(data.outbox_file, config.outbox)
        self.identities = IdentityStore(data)
        self.cache = DirectoryBlobStore(data.blob_dir)
        self.slots = Slots(data.slot_dir, self.cache)
        self.client: ControlPlaneClient | None = None
        self.run_id = secrets.token_hex(8)  # names this process in the serving marker
        self.capabilities: Capabilities | None = None  # the last measurement; None after a switch
        self.offline_since: float | None = None  # when the control plane stopped answering

    def save(self) -> None:
        self.store.save(self.state)

    def event(self, kind: str, digest: str | None = None, **detail: Any) -> None:
        self.outbox.add(new_event(kind, digest, detail))

    def note_error(self, message: str, step: Step | None = None) -> None:
        """Persist the error as ``last_error`` (phase ``error``); one event per distinct error, not one per poll."""
        if message != self.state.last_error:
            self.event(f"{step.kind}_failed" if step else "error", step.digest if step else None, reason=message[:1000])
        self.state.last_error = message[:2000]
        self.state.phase = "error"
        self.state.step = None
        self.save()

    def note_unreachable(self, exc: UnavailableError) -> None:
        """Remember when the control plane stopped answering, with one event per outage."""
        if self.offline_since is None:
            self.offline_since = self.clock()
            self.event("control_plane_unreachable", None, reason=str(exc)[:300])

    def require_client(self) -> ControlPlaneClient:
        if self.client is None:
            raise RuntimeError("Agent.open() was not called")
        return self.client

    def measure_capabilities(self) -> Capabilities:
        active = self.slots.current()
        probe = self.state.probes.get(active) if active else None
        self.capabilities = measure_capabilities(
            self.data.root,
            memory_bytes=self.config.memory_bytes,
            cpu_cores=self.config.cpu_cores,
            capabilities_file=self.config.capabilities_file,
            probe_decode_tokens_per_s=probe.decode_tokens_per_s if probe and probe.ok else None,
        )
        return self.capabilities

    def runtime_config(self) -> RuntimeConfig:
        """The desired runtime config, on the configured local API port when there is one."""
        runtime = self.state.desired.runtime if self.state.desired is not None else RuntimeConfig()
        if self.config.api_port is not None:
            runtime = runtime.model_copy(update={"port": self.config.api_port})
        return runtime
