"""The edge agent: enrollment and the loop (:mod:`~slmops.agent.daemon`), the plan's steps
(:mod:`~slmops.agent.reconcile`), resumable verified downloads, model slots with an atomic switch and self-rollback
(:mod:`~slmops.agent.switch`), the local model API, status and telemetry reports (:mod:`~slmops.agent.reporting`),
and bounded store-and-forward buffers of events and telemetry.

The agent talks to the control plane only through :mod:`slmops.core.wire`; it never imports ``slmops.control``.
"""

from __future__ import annotations

from slmops.agent._pause import PAUSE_ENV
from slmops.agent.capabilities import cpu_flags, detect_accelerator, measure_capabilities
from slmops.agent.client import ControlPlaneClient, DesiredFetch
from slmops.agent.config import AgentConfig
from slmops.agent.daemon import Agent
from slmops.agent.download import BlobWant, DownloadConfig, Downloader, DownloadReport, full_jitter_delay
from slmops.agent.identity import DeviceKey, Identity, IdentityStore
from slmops.agent.local_status import local_status
from slmops.agent.outbox import Outbox, OutboxConfig, TelemetryOutbox, TelemetryOutboxConfig, new_event
from slmops.agent.reconcile import Reconciler
from slmops.agent.reporting import Reporter
from slmops.agent.runtime import LlamaRuntime, ModelRuntime
from slmops.agent.slots import Slots
from slmops.agent.state import AgentLock, AgentState, DataDir, ProbeRecord, StateStore, default_data_dir
from slmops.agent.switch import SlotSwitch

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
    "Reconciler",
    "Reporter",
    "SlotSwitch",
    "Slots",
    "StateStore",
    "TelemetryOutbox",
    "TelemetryOutboxConfig",
    "cpu_flags",
    "default_data_dir",
    "detect_accelerator",
    "full_jitter_delay",
    "local_status",
    "measure_capabilities",
    "new_event",
]
