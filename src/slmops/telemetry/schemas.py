"""Operator API schemas of telemetry (``GET /api/v1/telemetry/rollup``); pydantic only, so the CLI can use them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from slmops.core.wire import Histogram

__all__ = ["ClassRollup", "TelemetryRollup"]


class ClassRollup(BaseModel):
    """A version's telemetry summed over the devices of one class."""

    model_config = ConfigDict(frozen=True)

    device_class: str
    devices: int
    windows: int
    requests: int
    errors: int
    crashes: int
    restarts: int
    rollbacks: int
    prompt_tokens: int
    completion_tokens: int
    error_rate: float | None  # errors / requests; None without requests
    latency_ms: Histogram
    ttft_ms: Histogram
    per_token_ms: Histogram


class TelemetryRollup(BaseModel):
    model_config = ConfigDict(frozen=True)

    version_digest: str
    since: str  # windows starting at or after this time ...
    until: str  # ... and before this one (RFC 3339 UTC)
    classes: list[ClassRollup]
