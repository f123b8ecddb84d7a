"""Feedback and privacy on the wire: what a blueprint allows, and the redacted samples an agent uploads.

Prompt and answer text leave a device only when both hold: the blueprint's ``spec.feedback.mode`` is ``opt_in``
*and* the device's own configuration opts in (``slmops agent --feedback-opt-in``, set by the site, never by the
control plane). Then only samples that passed the on-device redactor leave, at most ``max_samples_per_day`` of them.

::

    spec:
      feedback:
        mode: opt_in                 # off (default) | opt_in
        sample_rate: 0.5             # share of rated completions whose (redacted) text is queued for upload
        max_samples_per_day: 200
        retention_days: 30           # how long the device keeps ratings in its local store
        redaction: {presidio: true}  # names and locations too, where the device has slmops[privacy]
      privacy:
        dp: {epsilon_per_window: 1.0, epsilon_per_day: 24.0}   # Laplace/geometric noise on reported aggregates

Endpoint: ``POST /api/v1/devices/{id}/feedback`` (device credential): :class:`FeedbackBatch` →
:class:`FeedbackAck`. A sample's ``id`` is made on the device, so a retried upload never duplicates. A sample
carries no device identifier; the control plane keeps which (version, device class) it came from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slmops.core._wire_base import Wire

__all__ = [
    "MAX_FEEDBACK_SAMPLES_PER_BATCH",
    "MAX_FEEDBACK_TEXT_CHARS",
    "REDACTION_TYPES",
    "DifferentialPrivacy",
    "FeedbackAck",
    "FeedbackBatch",
    "FeedbackMessage",
    "FeedbackPolicy",
    "FeedbackSample",
    "PrivacyPolicy",
    "RedactionPolicy",
]

MAX_FEEDBACK_SAMPLES_PER_BATCH = 100
MAX_FEEDBACK_TEXT_CHARS = 16_000
REDACTION_TYPES = ("EMAIL", "PHONE", "IBAN", "CARD", "IP", "PERSON", "LOCATION")
"""Placeholder types; a replaced span becomes ``<TYPE>`` (for example ``<EMAIL>``)."""


class RedactionPolicy(Wire):
    presidio: bool = False  # also names and locations through Presidio, where installed (slmops[privacy])


class FeedbackPolicy(Wire):
    mode: Literal["off", "opt_in"] = "off"
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    max_samples_per_day: int = Field(default=100, ge=0, le=100_000)
    retention_days: float = Field(default=30.0, gt=0, le=3650)
    redaction: RedactionPolicy = Field(default_factory=RedactionPolicy)


class DifferentialPrivacy(Wire):
    epsilon_per_window: float = Field(gt=0, le=100)  # spent by one telemetry window's counters and histograms
    epsilon_per_day: float = Field(gt=0, le=10_000)  # the device's budget; windows beyond it report no aggregates

    @model_validator(mode="after")
    def _budget_covers_a_window(self) -> DifferentialPrivacy:
        if self.epsilon_per_day < self.epsilon_per_window:
            raise ValueError("epsilon_per_day must be at least epsilon_per_window")
        return self


class PrivacyPolicy(Wire):
    dp: DifferentialPrivacy | None = None  # None: aggregates are reported exactly


class FeedbackMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_FEEDBACK_TEXT_CHARS)


class FeedbackSample(Wire):
    """One rated completion, redacted on the device. ``messages`` is the prompt (system prompt excluded)."""

    id: str = Field(min_length=1, max_length=64)
    completion_id: str = Field(min_length=1, max_length=64)
    version_digest: str  # the model version (an adapter version when one was loaded) that answered
    time: str  # RFC 3339, UTC, when the rating was given
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    messages: list[FeedbackMessage] = Field(min_length=1, max_length=64)
    answer: str = Field(max_length=MAX_FEEDBACK_TEXT_CHARS)
    correction: str | None = Field(default=None, max_length=MAX_FEEDBACK_TEXT_CHARS)
    redactions: dict[str, int] = Field(default_factory=dict)  # spans replaced per placeholder type

    @model_validator(mode="after")
    def _rated(self) -> FeedbackSample:
        if self.rating is None and self.score is None and self.correction is None:
            raise ValueError("a feedback sample needs a rating, a score or a correction")
        return self


class FeedbackBatch(Wire):
    samples: list[FeedbackSample] = Field(max_length=MAX_FEEDBACK_SAMPLES_PER_BATCH)


class FeedbackAck(Wire):
    accepted_ids: list[str]  # stored now or earlier: the agent may drop them from its upload queue
    rejected: dict[str, str] = Field(default_factory=dict)  # id → why (for example: feedback is off for this device)
