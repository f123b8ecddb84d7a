"""The edge agent: enrollment, the reconcile loop, resumable verified downloads, model slots with an atomic switch
and self-rollback, the local model API, and a bounded store-and-forward event buffer.

The agent talks to the control plane only through :mod:`slmops.core.wire`; it never imports ``slmops.control``.
"""

from __future__ import annotations

from slmops.agent.capabilities import cpu_flags, detect_accelerator, measure_capabilities
from slmops.agent.client import ControlPlaneClient, DesiredFetch
from slmops.agent.daemon import PAUSE_ENV, Agent, AgentConfig, local_status
from slmops.agent.download import BlobWant, DownloadConfig, Downloader, DownloadReport, full_jitter_delay
from slmops.agent.identity import DeviceKey, Identity, IdentityStore
from slmops.agent.outbox import Outbox, OutboxConfig, new_event
from slmops.agent.runtime import LlamaRuntime, ModelRuntime
from slmops.agent.slots import Slots
from slmops.agent.state import AgentLock, AgentState, DataDir, ProbeRecord, StateStore, default_data_dir

__all__ = [
    "PAUSE_ENV",
    "Agent",
    "AgentConfig",
    "AgentLock",
    "AgentState",
    "BlobWant",
    "ControlPlaneClient",
    "DataDir",
    "DesiredFetch",
    "DeviceKey",
    "DownloadConfig",
    "DownloadReport",
    "Downloader",
    "Identity",
    "IdentityStore",
    "LlamaRuntime",
    "ModelRuntime",
    "Outbox",
    "OutboxConfig",
    "ProbeRecord",
    "Slots",
    "StateStore",
    "cpu_flags",
    "default_data_dir",
    "detect_accelerator",
    "full_jitter_delay",
    "local_status",
    "measure_capabilities",
    "new_event",
]
