"""The agent's configuration: one frozen value, read by the daemon and every part it drives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmops.agent.download import DownloadConfig
from slmops.agent.nudge import NudgeConfig
from slmops.agent.outbox import OutboxConfig, TelemetryOutboxConfig
from slmops.core.reconcile import Policy

__all__ = ["AgentConfig"]


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    server_url: str | None = None
    enroll_token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    poll_interval_s: float | None = None  # None: what the control plane said at enrollment
    poll_jitter: float = 0.2  # each wait is the interval times a random factor in [1 - jitter, 1 + jitter]
    probation_s: float = 120.0
    health_interval_s: float = 60.0
    heartbeat_interval_s: float = 60.0
    request_timeout_s: float = 30.0
    memory_bytes: int | None = None
    cpu_cores: int | None = None
    capabilities_file: Path | None = None
    api_port: int | None = None  # serve the local API here instead of the blueprint's port (several agents per host)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    policy: Policy = field(default_factory=Policy)
    telemetry_window_s: float = 60.0  # one telemetry window per version this long (closed at the next poll after)
    telemetry: TelemetryOutboxConfig = field(default_factory=TelemetryOutboxConfig)
    # the served model's surprise at the prompts (a drift signal): the fraction of requests scored (0: off) and how
    # many prompt tokens are scored (on gemma3-270m here a scored request takes ~0.3 s longer; BENCHMARKS.md)
    prompt_nll_sample_rate: float = 0.05
    prompt_nll_max_tokens: int = 32
    # the site's consent to let redacted feedback text leave this device (`slmops agent --feedback-opt-in`); text
    # leaves only when the blueprint's spec.feedback.mode is opt_in too. Never set by the control plane.
    feedback_opt_in: bool = False
    # choose the serving configuration (threads, OpenMP wait policy, batch) by measuring candidates at activation,
    # within this many seconds per model and device (slmops.runtime.tuning); 0 turns it off (llama.cpp's default
    # threads, OMP_WAIT_POLICY=passive unless set). A blueprint's runtime.threads overrides the measurement.
    tune_budget_s: float = 30.0
    # when a newly measured configuration needs another OpenMP wait policy than this process loaded, Agent.run
    # returns at a safe point with restart_requested set, for the caller to re-execute the agent (restart_process)
    restart_for_tuning: bool = False
    # MQTT nudges (agent/nudge.py): poll at once when the control plane says the desired state changed; None: off.
    # The poll interval stays the fallback whenever the broker is away.
    nudge: NudgeConfig | None = None
