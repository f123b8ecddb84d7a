"""Wire schemas between the edge agent and the control plane (HTTP+JSON under ``/api/v1``).

The agent and the control plane share only these models and the rest of ``core/``. Endpoints:

============================================  =====================  ===============================================
``POST /api/v1/enroll``                       enrollment token       :class:`EnrollRequest` → :class:`EnrollResponse`
                                                                      (200 approved, 202 pending)
``POST /api/v1/enroll/claim``                 device key signature   :class:`ClaimRequest` → :class:`EnrollResponse`
``GET  /api/v1/devices/{id}/desired``         device credential      :class:`DesiredState`, ``ETag``; ``304`` when
                                                                      ``If-None-Match`` matches
``POST /api/v1/devices/{id}/status``          device credential      :class:`StatusReport` → :class:`StatusAck`
``GET  /api/v1/blobs/{digest}``               device credential      bytes; ``Range``, ``If-Range``, ``ETag``
``POST /api/v1/devices/{id}/telemetry``       device credential      :class:`TelemetryBatch` → :class:`TelemetryAck`
============================================  =====================  ===============================================

A device credential is sent as ``Authorization: Bearer <credential>`` and can read or write only its own device's
records, and only the blobs of the model versions its desired state names. Nothing here carries prompt or
completion text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from slmops.core._wire_base import Wire as _Wire
from slmops.core.adaptation import LocalAdaptation
from slmops.core.feedback import FeedbackPolicy, PrivacyPolicy
from slmops.core.manifest import SignedManifest

__all__ = [
    "API_PREFIX",
    "FINISH_REASONS",
    "LATENCY_BUCKETS_MS",
    "NLL_BUCKETS",
    "RUNTIME_FORMATS",
    "TOKEN_BUCKETS",
    "AgentPhase",
    "AllowedAdaptations",
    "Capabilities",
    "ClaimRequest",
    "DesiredModel",
    "DesiredState",
    "DeviceEvent",
    "DriftSummary",
    "EnrollRequest",
    "EnrollResponse",
    "FinishReason",
    "Health",
    "Histogram",
    "RuntimeConfig",
    "RuntimeTuning",
    "StatusAck",
    "StatusReport",
    "TelemetryAck",
    "TelemetryBatch",
    "TelemetryWindow",
    "claim_message",
]

API_PREFIX = "/api/v1"
MAX_EVENTS_PER_REPORT = 100


# The inference runtimes a device can run, by the manifest format each one serves.
RUNTIME_FORMATS: dict[str, str] = {"llama.cpp": "gguf", "onnxruntime-genai": "onnx"}


class RuntimeTuning(_Wire):
    """The serving configuration a device chose for its active model by measuring candidates at activation
    (see :mod:`slmops.runtime.tuning`), with what it measured for the winner."""

    runtime: str = Field(default="llama.cpp", max_length=32)
    model_digest: str = Field(default="", max_length=80)  # the manifest digest it was measured with
    threads: int = Field(ge=1, le=256)
    # active: threads spin between parallel regions; passive: they sleep at once; bounded: the OpenMP runtime's own
    # default, spin a few milliseconds then sleep (OMP_WAIT_POLICY unset); None: the runtime has no OpenMP threads
    omp_wait_policy: Literal["active", "passive", "bounded"] | None = None
    batch_tokens: int = Field(ge=1, le=1 << 16)
    decode_tokens_per_s: float = Field(ge=0)
    prefill_tokens_per_s: float = Field(ge=0)
    candidates_measured: int = Field(default=1, ge=1, le=256)
    measured_at: int = Field(default=0, ge=0)  # unix seconds


class Capabilities(_Wire):
    """What a device measured about itself."""

    memory_bytes: int = Field(ge=0)
    disk_free_bytes: int = Field(ge=0)
    cpu_cores: int = Field(ge=1)
    cpu_flags: list[str] = Field(default_factory=list, max_length=64)  # avx, avx2, avx512f, fma, f16c, neon, ...
    accelerator: str | None = None  # e.g. "cuda", "metal", "npu"; None for CPU only
    os: str = ""
    arch: str = ""  # x86_64, aarch64, ...
    probe_decode_tokens_per_s: float | None = Field(default=None, ge=0)
    # The runtimes installed on the device (keys of RUNTIME_FORMATS); an agent that does not say runs llama.cpp only.
    runtimes: list[str] = Field(default_factory=lambda: ["llama.cpp"], max_length=16)
    tuning: RuntimeTuning | None = None  # the active model's measured serving configuration


class EnrollRequest(_Wire):
    token: str = Field(min_length=1, max_length=256)
    public_key: str = Field(min_length=1, max_length=256)  # "ed25519 <base64 of 32 bytes>"
    capabilities: Capabilities
    labels: dict[str, str] = Field(default_factory=dict)
    hostname: str = Field(default="", max_length=255)


def claim_message(device_id: str, timestamp: int) -> bytes:
    """The bytes a pending device signs with its key to claim its credential once approved."""
    return f"slmops-claim:{device_id}:{timestamp}".encode()


class ClaimRequest(_Wire):
    device_id: str = Field(min_length=1, max_length=64)
    timestamp: int  # unix seconds; the server refuses claims more than a few minutes off its clock
    signature: str = Field(max_length=256)  # base64 ed25519 signature of claim_message(device_id, timestamp)


class EnrollResponse(_Wire):
    device_id: str
    state: Literal["approved", "pending"]
    credential: str | None = None  # present once approved; shown once, stored hashed by the server
    trusted_keys: list[str] = Field(default_factory=list)  # public keys ("ed25519 <b64>") that sign manifests
    poll_interval_s: float = 30.0


class RuntimeConfig(_Wire):
    threads: int | None = Field(default=None, ge=1, le=256)
    context_tokens: int = Field(default=2048, ge=16, le=1 << 20)
    port: int = Field(default=8089, ge=1, le=65535)  # the local OpenAI-compatible API, on 127.0.0.1


class AllowedAdaptations(_Wire):
    system_prompt: bool = False
    adapter: bool = False


class DesiredModel(_Wire):
    name: str
    version: str
    digest: str  # manifest digest
    variant: str | None = None
    envelope: SignedManifest  # the signed manifest, so the agent verifies files and signature itself
    # When the version is an adapter (see slmops.core.adapters): its base's signed manifest. The agent's slot holds
    # the pair (base files + adapter files); the blob cache means only the adapter's bytes travel when the base was
    # already there.
    base: SignedManifest | None = None


class DesiredState(_Wire):
    device_id: str
    generation: str  # also the ETag value; changes whenever anything below changes
    model: DesiredModel | None = None
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    adaptations: AllowedAdaptations = Field(default_factory=AllowedAdaptations)
    feedback: FeedbackPolicy = Field(default_factory=FeedbackPolicy)
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    local: LocalAdaptation = Field(default_factory=LocalAdaptation)
    blueprint: str | None = None  # "name@revision" that produced this state
    reason: str = ""  # why this model/variant, or why none


AgentPhase = Literal[
    "starting",
    "idle",
    "downloading",
    "verifying",
    "staging",
    "probing",
    "activating",
    "serving",
    "rolling_back",
    "error",
]
Health = Literal["ok", "degraded", "failing", "unknown"]


class DeviceEvent(_Wire):
    """Something that happened on the device. ``id`` is made by the agent, so a retried upload never duplicates."""

    id: str = Field(min_length=1, max_length=64)
    time: str  # RFC 3339, UTC
    kind: str = Field(max_length=64)  # download_started, verified, activated, probe_failed, rolled_back, crash, ...
    version_digest: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)  # numbers and reasons; never prompt or completion text


class StatusReport(_Wire):
    phase: AgentPhase
    health: Health = "unknown"
    active_digest: str | None = None
    previous_digest: str | None = None
    desired_generation: str | None = None
    last_error: str | None = Field(default=None, max_length=2000)
    capabilities: Capabilities | None = None
    agent_version: str = ""
    events: list[DeviceEvent] = Field(default_factory=list, max_length=MAX_EVENTS_PER_REPORT)


class StatusAck(_Wire):
    accepted_event_ids: list[str]  # ids stored now or earlier: the agent may drop them from its buffer
    server_time: str


# Upper bounds of the latency histogram buckets, in milliseconds; one more bucket counts everything above the last.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    5,
    10,
    20,
    35,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    7500,
    10000,
    20000,
    60000,
)
MAX_WINDOWS_PER_BATCH = 100


class Histogram(_Wire):
    """Counts per bucket: ``counts[i]`` is the number of samples <= ``bounds[i]`` and > ``bounds[i-1]``; the last
    count is everything above the last bound. Aggregates only: no sample can be traced back to a request."""

    bounds: list[float] = Field(default_factory=lambda: list(LATENCY_BUCKETS_MS), max_length=64)
    counts: list[int] = Field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1), max_length=65)
    sum: float = 0.0


# Upper bounds of the token-count buckets (one more bucket counts everything above the last), roughly x1.5 apart.
TOKEN_BUCKETS: tuple[float, ...] = (
    *(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    *(768, 1024, 1536, 2048, 3072, 4096, 8192, 16384, 32768),
)
# Upper bounds of the per-prompt mean negative log-likelihood buckets, in nats per token.
NLL_BUCKETS: tuple[float, ...] = (
    *(0.5, 1.0, 1.5, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75),
    *(4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0, 10.0),
)
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "error", "other"]
FINISH_REASONS: tuple[FinishReason, ...] = get_args(FinishReason)


def _empty(bounds: Sequence[float]) -> Histogram:
    return Histogram(bounds=list(bounds), counts=[0] * (len(bounds) + 1), sum=0.0)


class DriftSummary(_Wire):
    """What one device served in one window, as distributions: counts only, never text.

    ``prompt_nll`` counts requests by the model's mean negative log-likelihood of the prompt tokens (nats per
    token); its ``sum`` over its count is the window's mean prompt NLL.
    """

    requests: int = Field(default=0, ge=0)  # completed requests summarized
    prompt_tokens: Histogram = Field(default_factory=lambda: _empty(TOKEN_BUCKETS))
    completion_tokens: Histogram = Field(default_factory=lambda: _empty(TOKEN_BUCKETS))
    finish_reasons: dict[FinishReason, int] = Field(default_factory=dict)
    empty_outputs: int = Field(default=0, ge=0)
    prompt_nll: Histogram = Field(default_factory=lambda: _empty(NLL_BUCKETS))

    @model_validator(mode="after")
    def _consistent(self) -> DriftSummary:
        for name in ("prompt_tokens", "completion_tokens", "prompt_nll"):
            hist: Histogram = getattr(self, name)
            if len(hist.counts) != len(hist.bounds) + 1 or any(c < 0 for c in hist.counts):
                raise ValueError(f"{name}: need len(bounds) + 1 non-negative counts; got {len(hist.counts)} counts")
        if any(c < 0 for c in self.finish_reasons.values()):
            raise ValueError("finish_reasons: counts must be >= 0")
        if self.empty_outputs > self.requests:
            raise ValueError(f"empty_outputs ({self.empty_outputs}) cannot exceed requests ({self.requests})")
        return self


class TelemetryWindow(_Wire):
    """What one device measured in one time window for one model version. Numbers only, never text."""

    id: str = Field(min_length=1, max_length=64)  # made by the agent, so a retried upload never double-counts
    version_digest: str | None = None
    window_start: str  # RFC 3339, UTC
    window_s: float = Field(gt=0, le=86400)
    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    crashes: int = Field(default=0, ge=0)
    restarts: int = Field(default=0, ge=0)
    rollbacks: int = Field(default=0, ge=0)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    latency_ms: Histogram = Field(default_factory=Histogram)  # whole request
    ttft_ms: Histogram = Field(default_factory=Histogram)  # time to first token
    per_token_ms: Histogram = Field(default_factory=Histogram)  # decode time per generated token
    decode_tokens_per_s: float | None = Field(default=None, ge=0)  # mean over the window
    memory_rss_bytes: int | None = Field(default=None, ge=0)  # peak in the window
    drift: DriftSummary | None = None  # distributions of what was served (drift detection); None from older agents


class TelemetryBatch(_Wire):
    windows: list[TelemetryWindow] = Field(max_length=MAX_WINDOWS_PER_BATCH)


class TelemetryAck(_Wire):
    accepted_ids: list[str]  # stored now or earlier: the agent may drop them from its buffer
